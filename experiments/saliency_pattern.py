"""
experiments/saliency_pattern.py -- where does the spectral-residual map's fixed pattern come from?

Averaged over CIFAR-10's test images, spot.saliency_map shows bright lines at pixels 7-8, 15-16
and 23-24: the borders of JPEG's 8 x 8 blocks (the JPEG copy of CIFAR-10 these runs read). This
script names the cause and tries fixes. The metric ("pattern"): the largest gap between the
average map of N images and its Gaussian blur (sigma = 1/8 of the side, edges replicated),
divided by the map's mean. "grid": the part of that gap that is periodic on JPEG's 8 px grid
(peak-to-peak of the gap's row + column profile folded onto the 8 phases, borders left out);
"phase": the two brightest phases (7|0 = the lines at pixels 7-8, 15-16, 23-24). "lift": on the
built-in shapes data (data.make_shapes(N, 32, return_info=True)), the map's mass inside the
object's mask over the mask's share of the image (1 = blind; > 1 finds objects).

    controls   the same map on inputs that separate the causes, as is and with the fix:
               (a) smooth random images with no JPEG (blurred noise, 32 and 128 px) and the same
               re-encoded as JPEG; (b) the CIFAR images shifted by 1-4 px, circularly or with
               replicated edges, before the map (a pattern in the images moves with them, one
               made by the algorithm stays); (c) the CIFAR images re-encoded at JPEG quality 95
               and 75, and once after a 4 px shift (the new blocks sit 4 px off the old ones).
    variants   (d) a local copy of spot.saliency_map with one change at a time (padding,
               window, resize, pre-blur, local mean, final blur, an amplitude floor) on
               CIFAR-10, Imagenette, the smooth noise and the shapes (also JPEG'd at quality 75, and
               at 30 % contrast).

Writes OUT/results.json and OUT/average_maps.png (the average maps before and after the fix)
and OUT/examples.png (a few CIFAR images with both maps).

    python -m experiments.saliency_pattern --out runs/saliency-pattern

Finding (session 7, 1,000 test images each): the lines are JPEG's block edges, made visible by
the algorithm's whitening. They move with the images when these are shifted (phase 7|0 -> 0|1 ->
... -> 3|4 for 1-4 px); smooth noise shows none without JPEG and the same lines once JPEG'd; a
4 px shift re-encoded at quality 95 keeps the old (shifted) lines, at 75 new blocks replace them.
The spectral residual divides every frequency by its local average amplitude, i.e. it whitens
the spectrum, so the weak, broadband block edges -- most of what a 32 px JPEG holds at high
frequencies -- weigh as much as the image's structure; at 128 px the map's blur (sigma 3.2 image
px) smooths the 8 px lines away. A floor under the amplitude (each spectrum's mean amplitude
added before the log, where spot adds 1e-8) leaves frequencies weaker than average as weak as
they are: CIFAR-10 1.42 -> 0.25, Imagenette 0.27 -> 0.25, and the shapes' lift 5.7 -> 9.1. It
also removes the algorithm's own artifact, bright borders on smooth noise (2.2 -> 0.15 at 128
px). A constant floor (4) does as well for images in [0, 1] at no token cost, but it is not
contrast-invariant (lift 3.3 on shapes at 30 % contrast, against 4.7 for the mean floor).
"""

import argparse
import io
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import data
import oracle
import spot

BLOCK = 8                             # JPEG's block side, pixels


# -----------------------------------------------------------------------------
# The measures

def gaussian_blur(maps, sigma):
    """(B, H, W) or (H, W) -> the same, a separable Gaussian blur with replicated edges."""
    radius = max(1, int(3 * sigma))
    taps = torch.exp(-0.5 * (torch.arange(-radius, radius + 1) / sigma) ** 2)
    taps = (taps / taps.sum()).to(maps.dtype)
    x = maps.reshape(-1, 1, *maps.shape[-2:])
    x = F.pad(x, (radius,) * 4, mode="replicate")
    x = F.conv2d(F.conv2d(x, taps.view(1, 1, 1, -1)), taps.view(1, 1, -1, 1))
    return x.reshape(maps.shape)


def gap(average):
    """(H, W) average map -> (H, W) its difference from its blur (sigma = side / 8) / its mean."""
    return (average - gaussian_blur(average, average.shape[-1] / 8)) / average.mean()


def pattern(average):
    """The metric: the largest |gap| (0 = nothing image-independent at a fine scale)."""
    return gap(average).abs().max().item()


def grid(average, period=BLOCK):
    """-> (strength, phase): peak-to-peak of the gap folded onto a grid of `period` px (JPEG's
    8 px blocks; a model's windows), the two brightest phases ("7|0": bright at pixels 7 and 8
    of each block pair). Borders (1/8 side) left out."""
    g = gap(average)
    side = g.shape[-1]
    margin = side // 8
    inner = g[margin:side - margin, margin:side - margin]
    profile = inner.mean(0) + inner.mean(1)                   # columns' + rows' mean gap
    phase = (torch.arange(len(profile)) + margin) % period
    fold = torch.stack([profile[phase == p].mean() for p in range(period)])
    top = sorted(fold.argsort(descending=True)[:2].tolist())
    if top == [0, period - 1]:                      # the pair across a border: "7|0"
        top = top[::-1]
    return (fold.max() - fold.min()).item(), "|".join(map(str, top))


def lift(maps, mask):
    """The maps' mean mass inside the objects over the objects' mean share of the image."""
    return ((maps * mask).flatten(1).sum(1).mean() / mask.mean()).item()


# -----------------------------------------------------------------------------
# spot.saliency_map, with one knob per candidate fix (the defaults are spot.saliency_map)

DEFAULTS = dict(size=64, pad="reflect", window=False, resize="bilinear", preblur=0.0, local=3,
                blur=0.025, floor=None)


def saliency(images, **change):
    """spot.saliency_map(images) with `change` applied (keys of DEFAULTS) -> (B, H, W).

    pad: "reflect", "replicate", "zero" (the mean grey) or None (no padding); window: a Hann
    window over the padded image; resize: "bilinear", "bicubic" or None (the native size);
    preblur: a Gaussian of that many image pixels before anything; local: the local mean's side;
    blur: the final blur's sigma as a share of `size`; floor: added to the amplitude before the
    log -- None: spot's 1e-8, "mean": each image's mean amplitude, a number: that constant.
    """
    knob = {**DEFAULTS, **change}
    gray = images.float().mean(dim=1, keepdim=True)                    # (B, 1, H, W)
    if knob["preblur"]:
        gray = gaussian_blur(gray, knob["preblur"])
    size = knob["size"] if knob["resize"] else gray.shape[-1]
    small = gray if size == gray.shape[-1] else F.interpolate(
        gray, size=size, mode=knob["resize"], align_corners=False)
    pad = size // 4 if knob["pad"] else 0
    if knob["pad"] == "zero":
        small = F.pad(small - small.mean((2, 3), keepdim=True), (pad,) * 4)
    elif pad:
        small = F.pad(small, (pad,) * 4, mode=knob["pad"])
    if knob["window"]:
        hann = torch.hann_window(small.shape[-1], periodic=False)
        small = (small - small.mean((2, 3), keepdim=True)) * (hann[:, None] * hann)
    spectrum = torch.fft.fft2(small)
    amplitude = spectrum.abs()
    floor = {None: 1e-8, "mean": amplitude.mean((2, 3), keepdim=True) + 1e-8}.get(
        knob["floor"], knob["floor"])
    log_amplitude = torch.log(amplitude + floor)
    local_mean = F.avg_pool2d(log_amplitude, knob["local"], stride=1, padding=knob["local"] // 2,
                              count_include_pad=False)
    maps = torch.fft.ifft2(spectrum * torch.exp(-local_mean)).abs() ** 2
    sigma = max(size * knob["blur"], 0.5)                    # spot's blur, same kernel
    radius = int(3 * sigma)
    taps = torch.exp(-0.5 * (torch.arange(-radius, radius + 1) / sigma) ** 2)
    kernel = taps[:, None] * taps / taps.sum() ** 2
    maps = F.conv2d(maps, kernel[None, None], padding=radius)
    maps = maps[..., pad:pad + size, pad:pad + size]
    if size != images.shape[-1]:
        maps = F.interpolate(maps, size=images.shape[-2:], mode="bilinear", align_corners=False)
    maps = maps[:, 0].clamp_min(0)
    return maps / maps.flatten(1).sum(1).clamp_min(1e-12)[:, None, None]


FIX = dict(floor="mean")            # the best fix (see the module docstring)

VARIANTS = {                        # (d): one change at a time
    "spot.saliency_map before the fix": {},
    "replicate padding": dict(pad="replicate"),
    "zero padding": dict(pad="zero"),
    "no padding": dict(pad=None),
    "Hann window before the FFT": dict(window=True),
    "no resize (native size)": dict(resize=None),
    "bicubic resize": dict(resize="bicubic"),
    "pre-blur 0.5 px": dict(preblur=0.5),
    "pre-blur 1 px": dict(preblur=1.0),
    "5 x 5 local mean": dict(local=5),
    "7 x 7 local mean": dict(local=7),
    "final blur x2 (5 % of side)": dict(blur=0.05),
    "final blur x4 (10 % of side)": dict(blur=0.1),
    "amplitude floor 3 (a constant)": dict(floor=3.0),
    "amplitude floor 4 (a constant)": dict(floor=4.0),
    "amplitude floor = mean amplitude (FIX)": FIX,
    "FIX + no padding": dict(FIX, pad=None),
    "FIX + no resize": dict(FIX, resize=None),
}


# -----------------------------------------------------------------------------
# The inputs

def jpeg(images, quality):
    """(B, 3, H, W) in [0, 1] -> the same, each image encoded as JPEG at `quality` and decoded."""
    out = []
    for image in (images * 255).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy():
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, "JPEG", quality=quality)
        out.append(np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float() / 255


def smooth_noise(n, side, sigma, seed=0):
    """n colour images of blurred uniform noise (stationary: cut from a larger field, so no
    border is special), grey mean 0.5 and standard deviation 0.2, clamped to [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    margin = 4 * int(sigma) + 4
    field = torch.rand(n, 3, side + 2 * margin, side + 2 * margin, generator=g)
    x = gaussian_blur(field, sigma)[..., margin:margin + side, margin:margin + side]
    x = (x - x.mean((1, 2, 3), keepdim=True)) / x.std(dim=(1, 2, 3), keepdim=True)
    return (0.5 + 0.2 * x).clamp(0, 1)


def shift(images, pixels, circular):
    """Move the images `pixels` down and right: circularly, or replicating the top-left edges."""
    if circular:
        return torch.roll(images, (pixels, pixels), (2, 3))
    side = images.shape[-1]
    return F.pad(images, (pixels, 0, pixels, 0), mode="replicate")[..., :side, :side]


def load_inputs(n, cifar10_dir, imagenette_dir):
    """-> dict of named (n, 3, S, S) float image sets, and the shapes' (n, 32, 32) masks."""
    t0 = time.time()
    cifar = data.load_dataset("cifar10", cifar10_dir, progress=False).test.images[:n]
    imagenette = data.load_dataset("folder", imagenette_dir, 128, progress=False).test.images[:n]
    shapes, _, info = data.make_shapes(n, 32, return_info=True)
    sets = {"cifar": cifar.float() / 255, "imagenette": imagenette.float() / 255,
            "noise32": smooth_noise(n, 32, 1.5), "noise128": smooth_noise(n, 128, 3.0, seed=1),
            "shapes": shapes.float() / 255}
    sets["shapes_q75"] = jpeg(sets["shapes"], 75)
    sets["shapes_low"] = 0.35 + 0.3 * sets["shapes"]            # the same at 30 % contrast
    print(f"loaded {n} images of each set in {time.time() - t0:.0f} s", flush=True)
    return sets, info["mask"]


def controls(sets):
    """-> [(name, images)]: the inputs that separate the causes, (a)-(c)."""
    cifar, noise32, noise128 = sets["cifar"], sets["noise32"], sets["noise128"]
    rows = [("CIFAR-10 as is", cifar)]
    rows += [(f"CIFAR-10 circular shift {s} px", shift(cifar, s, True)) for s in (1, 2, 3, 4)]
    rows += [(f"CIFAR-10 padded shift {s} px", shift(cifar, s, False)) for s in (1, 2, 3, 4)]
    rows += [(f"CIFAR-10 re-encoded q{q}", jpeg(cifar, q)) for q in (95, 75)]
    rows += [(f"CIFAR-10 padded shift 4 px, then q{q}", jpeg(shift(cifar, 4, False), q))
             for q in (95, 75)]
    rows += [("noise 32 px, no JPEG", noise32), ("noise 32 px, JPEG q95", jpeg(noise32, 95)),
             ("noise 32 px, JPEG q75", jpeg(noise32, 75)), ("noise 128 px, no JPEG", noise128),
             ("noise 128 px, JPEG q75", jpeg(noise128, 75)),
             ("Imagenette as is", sets["imagenette"]),
             ("Imagenette padded shift 4 px", shift(sets["imagenette"], 4, False)),
             ("Imagenette re-encoded q75", jpeg(sets["imagenette"], 75)),
             ("shapes (rendered, no JPEG)", sets["shapes"]),
             ("shapes, JPEG q75", sets["shapes_q75"])]
    return rows


# -----------------------------------------------------------------------------
# The tables and the figures

def measure(images, change):
    """-> (average map, pattern, grid strength, grid phase) of saliency(images, **change)."""
    average = saliency(images, **change).mean(0)
    strength, phase = grid(average)
    return average, pattern(average), strength, phase


def control_table(sets, mask):
    print("\n(a)-(c) controls: the map as is | with the fix (floor = mean amplitude)\n")
    print("| input | pattern | grid | phase | pattern (fix) | grid (fix) |")
    print("|---|---|---|---|---|---|")
    rows = []
    for name, images in controls(sets):
        _, p, s, phase = measure(images, {})
        _, pf, sf, _ = measure(images, FIX)
        rows.append(dict(input=name, pattern=p, grid=s, phase=phase, pattern_fix=pf, grid_fix=sf))
        print(f"| {name} | {p:.3f} | {s:.3f} | {phase} | {pf:.3f} | {sf:.3f} |", flush=True)
    truth = mask.mean(0)            # where the shapes are: what a perfect map would average to
    strength, phase = grid(truth)
    rows.append(dict(input="shapes' object masks (the truth)", pattern=pattern(truth),
                     grid=strength, phase=phase))
    print(f"| shapes' object masks (the truth) | {pattern(truth):.3f} | {strength:.3f} | {phase} "
          f"| | |")
    return rows


def variant_table(sets, mask):
    print("\n(d) variants: pattern on each set (grid on CIFAR-10); lift on the shapes\n")
    print("| variant | CIFAR-10 | grid | Imagenette | noise 32 | noise 128 | lift | lift q75 "
          "| lift 30 % |")
    print("|---|---|---|---|---|---|---|---|---|")
    rows, averages = [], {}
    for name, change in VARIANTS.items():
        row = dict(variant=name, change={k: str(v) for k, v in change.items()})
        for key in ("cifar", "imagenette", "noise32", "noise128"):
            average, row[key], strength, _ = measure(sets[key], change)
            averages[name, key] = average
            if key == "cifar":
                row["cifar_grid"] = strength
        row["lift"] = lift(saliency(sets["shapes"], **change), mask)
        row["lift_q75"] = lift(saliency(sets["shapes_q75"], **change), mask)
        row["lift_low"] = lift(saliency(sets["shapes_low"], **change), mask)
        rows.append(row)
        print(f"| {name} | {row['cifar']:.3f} | {row['cifar_grid']:.3f} | "
              f"{row['imagenette']:.3f} | {row['noise32']:.3f} | {row['noise128']:.3f} | "
              f"{row['lift']:.2f} | {row['lift_q75']:.2f} | {row['lift_low']:.2f} |", flush=True)
    return rows, averages


def plot_averages(averages, n, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    before, after = "spot.saliency_map before the fix", "amplitude floor = mean amplitude (FIX)"
    sets = (("cifar", "CIFAR-10"), ("imagenette", "Imagenette 128 px"),
            ("noise128", "smooth noise 128 px"))
    fig, axes = plt.subplots(2, 3, figsize=(10, 6.8))
    for col, (key, title) in enumerate(sets):
        for row, name in enumerate((before, after)):
            average = averages[name, key]
            ax = axes[row, col]
            im = ax.imshow(average / average.mean(), cmap="magma", vmin=0, vmax=3)
            label = "before" if row == 0 else "fixed"
            ax.set_title(f"{title}, {label}\npattern {pattern(average):.2f}", fontsize=9)
            ax.set_xticks(range(0, average.shape[-1], BLOCK) if key == "cifar" else [])
            ax.set_yticks([])
    fig.colorbar(im, ax=axes, shrink=0.7, label="average map / its mean")
    fig.suptitle(f"Average spectral-residual map of {n:,} images; fixed: the "
                 "amplitude floored at its mean before the log", fontsize=10)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_examples(images, path, count=6):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    images = images[:count]
    rows = (("image", images.permute(0, 2, 3, 1)), ("as is", saliency(images)),
            ("fix", saliency(images, **FIX)))
    fig, axes = plt.subplots(3, count, figsize=(1.6 * count, 5))
    for r, (label, pictures) in enumerate(rows):
        for c in range(count):
            axes[r, c].imshow(pictures[c], cmap=None if r == 0 else "magma")
            axes[r, c].set_xticks([])
            axes[r, c].set_yticks([])
        axes[r, 0].set_ylabel(label)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -----------------------------------------------------------------------------
# The model's own map (oracle.gradient_saliency): does it carry its windows' grid?

def gradient_study(paths, n, data_dirs):
    """Each model (a checkpoint or an exported model.pt): its gradient map averaged over the
    first n test images -> ({name: pattern, window-grid strength and phase}, {name: average})."""
    rows, averages = {}, {}
    for path in paths:
        model, dataset, args = data.load_model_and_data(path, "cpu", data_dirs.get(
            dataset_of(path)))
        images = dataset.test.images[:n]
        average = oracle.gradient_saliency(model, images, "cpu", 100).mean(0)      # (H, W)
        window = model.config.window
        strength, phase = grid(average, window)
        name = Path(path).parent.name
        rows[name] = dict(dataset=args["dataset"], n=len(images), window=window,
                          pattern=pattern(average), window_grid=strength, phase=phase)
        averages[name] = average
        print(f"{name}: gradient map of {len(images)} test images: pattern "
              f"{rows[name]['pattern']:.3f}, on its {window} px windows' grid {strength:.3f} "
              f"(phase {phase})", flush=True)
    return rows, averages


def dataset_of(path):
    """A checkpoint's or model.pt's dataset name (train.py's --dataset), read safely."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    return (saved.get("args") or {}).get("dataset")


def plot_gradient_averages(rows, averages, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    columns = min(3, len(averages))                       # one dataset's three models a row
    lines = -(-len(averages) // columns)
    fig, axes = plt.subplots(lines, columns, figsize=(max(5, 3.4 * columns), 0.6 + 3.2 * lines),
                             squeeze=False)
    for ax in axes.flat[len(averages):]:
        ax.set_axis_off()
    for ax, (name, average) in zip(axes.flat, averages.items()):
        im = ax.imshow((average / average.mean()).numpy(), cmap="magma", vmin=0, vmax=3)
        row = rows[name]
        ax.set_title(f"{name}\npattern {row['pattern']:.2f}, {row['window']} px grid "
                     f"{row['window_grid']:.2f}", fontsize=9)
        ax.set_xticks(range(0, average.shape[-1], row["window"]))
        ax.set_xticklabels([])
        ax.set_yticks([])
    fig.colorbar(im, ax=axes, shrink=0.8, label="average map / its mean")
    fig.suptitle(f"The model's own gradient map (oracle.gradient_saliency),\naveraged over "
                 f"{next(iter(rows.values()))['n']:,} test images", fontsize=10)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m experiments.saliency_pattern",
                                     description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--n", type=int, default=1000, help="images per set (the first n)")
    parser.add_argument("--out", default="runs/saliency-pattern",
                        help="folder for results.json and the PNGs")
    parser.add_argument("--cifar10", default="data/cifar10", metavar="DIR",
                        help="CIFAR-10 (train.py --dataset cifar10 --data-dir DIR)")
    parser.add_argument("--imagenette", default="data/imagenette-128", metavar="DIR",
                        help="Imagenette at 128 px (class folders train/ and val/)")
    parser.add_argument("--gradient", nargs="+", metavar="MODEL", help="instead: the average "
                        "gradient map of these models (checkpoint.pt or results/NAME/model.pt), "
                        "read on --cifar10 or --imagenette, to OUT/gradient.json and "
                        "OUT/gradient_average_maps.png")
    args = parser.parse_args(argv)
    if args.n < 1:
        parser.error("--n must be >= 1")
    t0 = time.time()
    out = Path(args.out)
    if args.gradient:
        rows, averages = gradient_study(args.gradient, args.n,
                                        {"cifar10": args.cifar10, "folder": args.imagenette})
        out.mkdir(parents=True, exist_ok=True)
        plot_gradient_averages(rows, averages, out / "gradient_average_maps.png")
        (out / "gradient.json").write_text(json.dumps(rows, indent=2))
        print(f"wrote {out}/gradient.json, gradient_average_maps.png in {time.time() - t0:.0f} s")
        return 0
    sets, mask = load_inputs(args.n, args.cifar10, args.imagenette)
    # spot.saliency_map has the fix since this study: the local copy's FIX must be it exactly
    # (the local copy's defaults are the map as it was before).
    check = (saliency(sets["cifar"][:64], **FIX) - spot.saliency_map(sets["cifar"][:64])).abs()
    assert check.max() < 1e-6, f"FIX drifted from spot.saliency_map ({check.max().item():.2e})"
    control_rows = control_table(sets, mask)
    variant_rows, averages = variant_table(sets, mask)
    out.mkdir(parents=True, exist_ok=True)
    plot_averages(averages, args.n, out / "average_maps.png")
    plot_examples(sets["cifar"], out / "examples.png")
    result = dict(n=args.n, controls=control_rows, variants=variant_rows)
    (out / "results.json").write_text(json.dumps(result, indent=2))
    print(f"\nwrote {out}/results.json, average_maps.png, examples.png "
          f"in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
