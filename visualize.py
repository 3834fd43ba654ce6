"""visualize.py -- pictures of where SPoT's tokens go (arXiv 2507.01654).

Each function draws one kind of figure and returns the matplotlib Figure (pass path= to also
save it: a PNG when the path has no extension). The idea each one shows:

    plot_placements         subpixel tokens: each token's k x k window at its continuous
                            position, over the faint patch grid. Off-grid windows straddle grid
                            cells, which a grid cannot do (sparse feature selection)
    plot_priors             the spatial priors, one panel each (the paper's Figure 2)
    plot_trajectories       SPoT-ON (the oracle search): paths from the prior's start to the
                            oracle's placement, per token
    save_trajectory_gif     the same search, animated, for one image

The figures of RESULTS.md's findings are drawn by experiments/figures.py, with the drawing
primitives and the checkpoint loading below: accuracy vs token budget and training curves (from
the same results/ that experiments/tables.py writes RESULTS.md from), and finding 3's saliency
map vs the oracle's placements (from a checkpoint).

Run it (every command writes files; none opens a window; `--help` lists a command's flags):

    python visualize.py priors --image-size 32 --window 4 --tokens 16 --out priors.png
    python visualize.py priors --dataset shapes --tokens 16 --out priors.png   # on a test image
    python visualize.py placements --checkpoint runs/shapes/checkpoint.pt \\
        --search-from isotropic --tokens 16 --index 0 --search-steps 5 --out placements.png
    python visualize.py trajectories --checkpoint runs/shapes/checkpoint.pt --tokens 16 \\
        --n-images 4 --out traj.png --gif traj.gif

Drawing convention (the same as spot.py's coordinates)
------------------------------------------------------
Images are drawn with imshow(extent=(0, W, H, 0)), so pixel i covers [i, i+1) on both axes and
the axes are in *pixel units*. A position (y, x) in [0, 1] is the centre P = (y H, x W) of a
k x k window, and the window is the square [P - k/2, P + k/2] on each axis. So a grid-cell
centre P = (i + 0.5) k draws a square exactly covering grid cell i, [i k, (i + 1) k].
"""

import argparse
import math
from pathlib import Path

# Without a display (a server, CI, a test run) pyplot picks the file-only Agg backend itself.
import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.backend_bases import FigureCanvasBase

import spot
import train
import utils

WINDOW_COLOR = "#ffd400"                    # token windows: yellow reads on dark and light images


# -----------------------------------------------------------------------------
# Input checks: every error names the argument and says what is accepted

def _as_numpy(value):
    """A tensor (any device, with or without grad) or array-like -> numpy array."""
    return value.numpy(force=True) if torch.is_tensor(value) else np.asarray(value)


def _image_hwc(image, window=None):
    """(C, H, W) with C in {1, 3} (grey or RGB), float in [0, 1] or uint8 -> numpy (H, W, 3)
    float in [0, 1]. Floats are clipped to [0, 1] (bilinear resizing can overshoot slightly),
    uint8 is divided by 255. A window k, if given, must fit in the image.
    """
    array = _as_numpy(image)
    floats = array.dtype.kind == "f"
    if (array.ndim != 3 or len(array) not in (1, 3)
            or not (floats or array.dtype == np.uint8) or not np.isfinite(array).all()):
        raise ValueError(f"image must be (C, H, W) with C = 1 or 3, finite floats in "
                         f"[0, 1] or uint8, got {array.dtype} of shape {array.shape}")
    if window is not None:
        utils.check_window(window, array.shape[1:])
    array = (np.clip(array, 0, 1) if floats else array / 255).astype("float32")
    return array.repeat(3 // len(array), 0).transpose(1, 2, 0)      # grey: the channel 3 times


def _positions_array(positions, name="positions", shape="(N, 2)"):
    """Positions -> numpy float64 array of `shape`, whose last axis is (y, x)."""
    array = _as_numpy(positions)
    if array.ndim != shape.count(",") + 1 or array.shape[-1] != 2 or not np.isfinite(array).all():
        raise ValueError(f"{name} must have shape {shape} holding finite floats (y, x) in [0, 1], "
                         f"got {array.dtype} of shape {array.shape}")
    return array.astype(float)


def _with_default_suffix(path, suffix=".png"):
    """A path without an extension gets `suffix`. matplotlib would add ".png" silently, so the
    file written would not be the one the caller named; appending it here keeps them the same."""
    path = Path(path)
    return path.with_suffix(path.suffix or suffix)


def _finish(fig, path):
    """Save the figure if path is given (".png" when it has no extension) and return it. The
    temporary file of utils.write_atomic keeps the extension: savefig picks the format from it."""
    if path:                     # 150 dpi: sharp, yet a few hundred kB at most
        utils.write_atomic(_with_default_suffix(path),
                           lambda tmp: fig.savefig(tmp, dpi=150, bbox_inches="tight"))
    return fig


def _panels(n, side, height, width, extra):
    """A figure of n panels of an H x W image, at most 4 a row (the unused ones blank), each
    `side` inches wide, plus `extra` inches for the titles -> (fig, the n axes)."""
    cols = min(4, n)
    rows = math.ceil(n / 4)
    fig = plt.figure(layout="constrained",
                     figsize=(side * cols, side * rows * height / width + extra))
    return fig, [fig.add_subplot(rows, cols, i + 1) for i in range(n)]


# -----------------------------------------------------------------------------
# Drawing primitives, all in pixel units (see "Drawing convention" above)

def _show_image(ax, image, title, window=None, grid=False, **imshow):
    """imshow with pixel i spanning [i, i+1): extent = (left, right, bottom, top); y grows
    downward, like image rows.

    With a window k the view widens by k/2 beyond the image, so windows that hang over the edge
    (they read zeros there) stay visible, the outside in a neutral grey; grid=True draws the
    patch grid of k x k cells over the image, as faint lines (white under black dashes: visible
    on any image). When k does not divide the image, the grid covers only the top-left
    (H//k)k x (W//k)k pixels (like spot.grid_positions)."""
    height, width = image.shape[:2]
    margin = (window or 0) / 2
    ax.imshow(image, extent=(0, width, height, 0), interpolation="nearest", **imshow)
    ax.axis((-margin, width + margin, height + margin, -margin))     # (left, right, bottom, top)
    ax.set(facecolor="#d9d9d9", xticks=[], yticks=[])
    ax.set_title(title, fontsize=9)
    if grid:        # cell edges at 0, k, 2k, ... <= H (rows) and <= W (columns)
        rows = np.arange(0, height + 1, window)
        cols = np.arange(0, width + 1, window)
        # white at 45% opacity, then black dashes at 25% over it (#rrggbbaa colours)
        for color, dashes in (("#ffffff73", "-"), ("#00000040", (0, (2, 2)))):
            ax.hlines(rows, 0, cols[-1], color, dashes, lw=0.6, zorder=2)
            ax.vlines(cols, 0, rows[-1], color, dashes, lw=0.6, zorder=2)


def _to_pixels(positions, height, width):
    """(..., 2) normalized (y, x) -> (..., 2) pixel-unit (row, col) centres: P = (y H, x W)."""
    return positions * [height, width]          # positions: a numpy array


def _draw_windows(ax, centres_px, window, color, **style):
    """One square [P - k/2, P + k/2]^2 per token. Rectangle wants its (x, y) corner first."""
    for row, col in centres_px:
        ax.add_patch(plt.Rectangle((col - window / 2, row - window / 2), window, window,
                                   fill=False, edgecolor=color, zorder=3, **style))


def _dots(ax, centres_px, color, size, hollow=False):
    """Token centres as markers: hollow rings (start positions), or dots with a black rim."""
    face, edge, rim = ("none", color, 1.2) if hollow else (color, "black", 0.5)
    ax.scatter(centres_px[..., 1], centres_px[..., 0], size, facecolors=face, edgecolors=edge,
               linewidths=rim, zorder=5)


# -----------------------------------------------------------------------------
# Subpixel tokens: token windows at their continuous positions

def plot_placements(image, positions, window, grid=True, ax=None, title=None, path=None):
    """Draw each token's k x k window (a square outline) at its subpixel position on the image.

    image:     (C, H, W) float in [0, 1] or uint8 (C = 1 or 3)
    positions: (N, 2) (y, x) window centres in [0, 1]
    window:    k, the token window side in pixels
    grid:      draw the patch grid faintly beneath, so tokens off the grid are visible
    ax:        draw into this Axes instead of a new figure
    title:     default "N tokens, k = ..., M on the grid"
    Returns the Figure.
    """
    img = _image_hwc(image, window)
    height, width = img.shape[:2]
    centres = _to_pixels(_positions_array(positions), height, width)      # (N, 2) pixel units
    ax = ax or _panels(1, 4.2, height, width, 0.4)[1][0]
    if title is None:        # count the tokens exactly on a grid-cell centre (i + 0.5) k
        cell = centres / window - 0.5                   # grid index; an integer iff on the grid
        index = np.round(cell)
        on_grid = (abs(cell - index) < 1e-3) & (index >= 0) \
            & (index < [height // window, width // window])                     # (N, 2)
        title = f"{len(centres)} tokens, k = {window}, {on_grid.all(-1).sum()} on the grid"
    _show_image(ax, img, title, window, grid)
    _draw_windows(ax, centres, window, WINDOW_COLOR, lw=1.3)
    _dots(ax, centres, WINDOW_COLOR, 14)
    return _finish(ax.figure, path)


# -----------------------------------------------------------------------------
# Spatial priors side by side (the paper's Figure 2)

def plot_priors(image_size, window, n_tokens, priors=spot.PRIORS, image=None, seed=0, path=None):
    """One panel per prior showing where its n_tokens tokens go.

    image_size: int or (H, W)
    priors:     names from spot.PRIORS. "salient" needs an image: without one it is skipped.
    image:      optional (C, H, W) image to draw on (its size must equal image_size); without it
                the panels are a blank canvas with the patch grid
    seed:       seeds the random priors (same seed -> same picture)
    Returns the Figure.
    """
    height, width = utils.to_hw(image_size)
    utils.positive_int(n_tokens, "n_tokens")      # here: the panels below turn errors into notes
    drawn = [p for p in priors if image is not None or p != "salient"]
    if not drawn or set(priors) - set(spot.PRIORS):
        raise ValueError(f"priors must be names from {spot.PRIORS}, at least one besides "
                         f"'salient' without image=(C, H, W) ('salient' samples positions from "
                         f"the image's saliency map, so it is skipped on a blank canvas), got "
                         f"{priors!r}")
    if image is None:                       # a blank canvas, with nothing salient
        image = np.full((1, height, width), 0.93)
    canvas = _image_hwc(image, window)                                   # (H, W, 3)
    if canvas.shape[:2] != (height, width):
        raise ValueError(f"image is {canvas.shape[0]}x{canvas.shape[1]} but image_size is "
                         f"{height}x{width}; they must match")
    images = torch.from_numpy(canvas).permute(2, 0, 1)[None]   # (1, 3, H, W)

    fig, axes = _panels(len(drawn), 3.0, height, width, 0.5)
    for ax, prior in zip(axes, drawn):
        try:        # a fresh generator per prior: each panel is reproducible on its own
            positions = spot.sample_positions(prior, 1, n_tokens, image_size, window,
                                              torch.Generator().manual_seed(seed), images)[0]
        except ValueError as error:  # e.g. "grid" with more tokens than grid cells: a note below
            positions = np.zeros((0, 2))
            ax.set_xlabel(str(error).split(";")[0], fontsize=6, wrap=True)
        plot_placements(image, positions, window, ax=ax, title=prior)
    fig.suptitle(f"Spatial priors: {n_tokens} tokens, {window}x{window} windows, "
                 f"{height}x{width} image")
    return _finish(fig, path)


# -----------------------------------------------------------------------------
# SPoT-ON (the oracle search): trajectories

def _draw_search(ax, image, track_px, window, title):
    """The image with its patch grid, and track_px (steps + 1, N, 2) in pixel units over it:
    per token a path, a hollow start, a filled end and its end window. The colours come from a
    cyclic colormap, so neighbouring tokens differ."""
    _show_image(ax, image, title, window, True)
    colors = plt.cm.hsv(np.linspace(0, 1, track_px.shape[1], endpoint=False))
    ax.set_prop_cycle(color=colors)          # (steps + 1, N) columns: a line per token, in turn
    ax.plot(track_px[..., 1], track_px[..., 0], lw=1.2, alpha=0.9, zorder=4)
    for end, color in zip(track_px[-1], colors):
        _draw_windows(ax, [end], window, color, alpha=0.55, lw=0.9)
    _dots(ax, track_px[0], colors, 22, hollow=True)
    _dots(ax, track_px[-1], colors, 16)


def _legend_below(fig, handles):
    """The figure's legend in one row under its panels (the figure has a constrained layout)."""
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=8,
               frameon=False)


def _marker(label, face, edge="black", shape="o"):
    """A legend entry for a scatter marker (face "none": hollow; shape "s": a square)."""
    return plt.Line2D([], [], ls="none", marker=shape, mfc=face, mec=edge, label=label)


def plot_trajectories(images, trajectory, window, n_images=4, path=None, titles=None):
    """SPoT-ON's search paths over the first n_images images.

    images:     (B, C, H, W) float in [0, 1] or uint8
    trajectory: (steps + 1, B, N, 2) positions at every step; trajectory[0] is the prior start,
                trajectory[-1] the oracle's final placement (oracle.OracleResult.trajectory)
    window:     k
    titles:     optional list of at least n_images panel titles (e.g. "label: pred")
    Returns the Figure.
    """
    track = _positions_array(trajectory, "trajectory", "(steps + 1, B, N, 2)")
    n_images = min(utils.positive_int(n_images, "n_images"), len(images))
    if titles is None:
        titles = [f"image {b}" for b in range(n_images)]
    if images.ndim != 4 or track.shape[1] != len(images) or len(titles) < n_images:
        raise ValueError(f"images must be (B, C, H, W) and trajectory (steps + 1, B, N, 2) with "
                         f"the same B, and titles (if given) a list of at least "
                         f"n_images={n_images} strings, got images {tuple(images.shape)}, "
                         f"trajectory {track.shape} and titles {titles!r}")
    height, width = _image_hwc(images[0], window).shape[:2]      # and k fits in the image

    fig, axes = _panels(n_images, 3.2, height, width, 0.8)
    for b, ax in enumerate(axes):
        track_px = _to_pixels(track[:, b], height, width)                 # (steps + 1, N, 2)
        moved = np.linalg.norm(track_px[-1] - track_px[0], axis=-1).mean()
        _draw_search(ax, _image_hwc(images[b]), track_px, window,
                     f"{titles[b]}\nmean move {moved:.2f} px in {len(track) - 1} steps")
    fig.suptitle("SPoT-ON oracle search: from prior to oracle placement")
    _legend_below(fig, [_marker("start (prior)", "none"), _marker("end (oracle)", "grey"),
                        plt.Line2D([], [], color="grey", lw=1.2,
                                   label="path (one colour per token)"),
                        _marker("final k x k window", "none", "grey", "s")])
    return _finish(fig, path)


def save_trajectory_gif(image, trajectory, window, path, fps=4):
    """Animate one image's SPoT-ON search as a GIF: windows move step by step.

    image:      (C, H, W) float in [0, 1] or uint8
    trajectory: (steps + 1, N, 2) for this one image (e.g. result.trajectory[:, b])
    path:       where to write the .gif (required)
    fps:        frames per second; the final frame is held for an extra second
    Returns the Figure (showing the last frame).
    """
    from matplotlib.animation import PillowWriter

    img = _image_hwc(image, window)
    height, width = img.shape[:2]
    track_px = _to_pixels(_positions_array(trajectory, "trajectory", "(steps + 1, N, 2)"),
                          height, width)
    if not (Path(path).suffix.lower() == ".gif" and 0 < fps < math.inf):
        raise ValueError(f"path must be a file name ending in .gif and fps a finite number > 0, "
                         f"got path {path!r} and fps {fps!r}")
    fig, (ax,) = _panels(1, 4.0, height, width, 0.4)

    def write(tmp):
        # PillowWriter keeps the frames in memory and writes the file when `saving` closes, even
        # when a frame failed: hence the temporary file of utils.write_atomic.
        writer = PillowWriter(fps=fps)
        with writer.saving(fig, tmp, dpi=100):
            for step in range(len(track_px)):
                # Redraw from scratch each frame: simplest, and cheap at these sizes.
                ax.clear()
                _draw_search(ax, img, track_px[: step + 1], window,
                             f"SPoT-ON step {step} / {len(track_px) - 1}")
                writer.grab_frame()
            for _ in range(math.ceil(fps)):               # hold the result for about a second
                writer.grab_frame()

    utils.write_atomic(path, write)
    return fig


# -----------------------------------------------------------------------------
# Command line


# What --out may end in: every format matplotlib saves without extra software, PNG first.
IMAGE_FORMATS = ("png", *sorted(set(FigureCanvasBase.get_supported_filetypes()) - {"png"}))

# ImageNet class folders are WordNet ids; figures title them by name (Imagenette's ten classes).
WORDNET_NAMES = {"n01440764": "tench", "n02102040": "English springer",
                 "n02979186": "cassette player", "n03000684": "chain saw", "n03028079": "church",
                 "n03394916": "French horn", "n03417042": "garbage truck",
                 "n03425413": "gas pump", "n03445777": "golf ball", "n03888257": "parachute"}


def _file_type(formats):
    """argparse type of --out / --gif -> the Path that will be written: no extension means
    formats[0]; its folder is created and proven writable now (utils.check_out_dir), so a bad
    name fails before any work, with the flag named by argparse."""
    def parse(text):
        path = _with_default_suffix(text, f".{formats[0]}")
        if Path(text).is_dir() or path.suffix.lower()[1:] not in formats:
            raise argparse.ArgumentTypeError(f"{text} must name a file (not a folder) ending in "
                                             f".{', .'.join(formats)}")
        try:
            utils.check_out_dir(path.parent, "folder")
        except ValueError as error:
            raise argparse.ArgumentTypeError(f"{error} (to write {path})")
        return path
    return parse


def _one_budget(text):
    """argparse type of --tokens: the grammar of utils.parse_tokens, but a figure draws ONE
    budget. The text is kept: 'all' and the upper bound need the patch grid (known later)."""
    try:
        (_,) = utils.parse_tokens(text, 2**40)          # a ValueError unless exactly one budget
        return text
    except ValueError:
        raise argparse.ArgumentTypeError(f"this figure draws one budget: N >= 1, or 'all' (the "
                                         f"full patch grid), got {text!r}")


def _pick(split, first, count=1):
    """Test images [first, first + count) as uint8, and their labels."""
    if first + count > len(split.labels):
        raise ValueError(f"--index {first}" + (f" with --n-images {count}" if count > 1 else "")
                         + f" reaches past the {len(split.labels)} images of this test split")
    return split.images[first:first + count], split.labels[first:first + count]


def _load(args, count=1):
    """The model of --checkpoint, and `count` test images from --index searched by SPoT-ON ->
    (window k, class names, uint8 images, labels, the search's trajectory (steps + 1, count, N, 2)
    and the classes predicted at its start and at its end: two (count,) tensors).

    The search starts from --tokens drawn from --search-from (seeded by --seed, as
    train.draw_positions draws them), its trajectory[0]; --search-steps 0 leaves them there.
    The dataset is the one named by the train args inside the checkpoint; data.load_model_and_data
    reads the file once, with weights_only=True, and words every failure as a message naming it."""
    import data
    import oracle

    model, dataset, _ = data.load_model_and_data(args.checkpoint)
    uint8, labels = _pick(dataset.test, args.index, count)
    window = model.config.window
    n_tokens = utils.parse_tokens(args.tokens, len(oracle.patch_grid(model)))[0]
    start = train.draw_positions(args.search_from, uint8, n_tokens, window, args.seed)
    steps = oracle.DEFAULT_STEPS if args.search_steps is None else args.search_steps
    lr = args.search_lr or oracle.DEFAULT_LR
    track = oracle.oracle_search(model, uint8.float() / 255, labels, start, steps, lr,
                                 args.objective).trajectory
    # Read through train.predict, the one evaluation loop: logits (count, classes) -> classes.
    predicted = [train.predict(model, uint8, track[step], "cpu", count)[0].argmax(-1)
                 for step in (0, -1)]
    classes = [WORDNET_NAMES.get(name, name) for name in dataset.classes]
    return window, classes, uint8, labels, track, predicted


def _cmd_priors(args):
    image, size = None, args.image_size or 32
    if args.dataset:
        import data

        dataset = data.load_dataset(args.dataset, args.data_dir, args.image_size, progress=False)
        image = _pick(dataset.test, args.index)[0][0]
        size = image.shape[-2:]
    n_tokens = utils.parse_tokens(args.tokens, len(spot.grid_positions(size, args.window)))[0]
    return plot_priors(size, args.window, n_tokens, priors=args.priors, image=image,
                       seed=args.seed, path=args.out)


def _cmd_placements(args):
    window, classes, uint8, labels, track, predicted = _load(args)
    names = [f"prior '{args.search_from}'", f"SPoT-ON, {args.search_steps} steps"]
    # With --search-steps 0 the prior's panel alone.
    fig, axes = _panels(1 + (args.search_steps > 0), 4.2, *uint8.shape[-2:], 0.6)
    for ax, name, step in zip(axes, names, (0, -1)):
        plot_placements(uint8[0], track[step, 0], window, ax=ax,
                        title=f"{name}\npredicted '{classes[predicted[step][0]]}'")
    fig.suptitle(f"test image {args.index}, label '{classes[labels[0]]}', "
                 f"{track.shape[2]} tokens")
    return _finish(fig, args.out)


def _cmd_trajectories(args):
    window, classes, uint8, labels, track, predicted = _load(args, args.n_images)
    titles = [f"#{args.index + i} '{classes[y]}'\npredicted {classes[p]} -> {classes[q]}"
              for i, (y, p, q) in enumerate(zip(labels, *predicted))]
    fig = plot_trajectories(uint8, track, window, args.n_images, args.out, titles)
    if args.gif:
        plt.close(save_trajectory_gif(uint8[0], track[:, 0], window, args.gif, args.fps))
    return fig


# The argparse types of the flags below (spelled as in oracle.py): ints >= 0 and >= 1, and
# finite floats > 0.
COUNT = utils.int_at_least(0)
ONE_OR_MORE = utils.int_at_least(1)
POSITIVE = utils.float_in(0, low_open=True)

# --tokens, --index, --seed (every command): which budget, which test image, which random draw.
IMAGE_FLAGS = (("--tokens", _one_budget, "16",
                "tokens per image: one budget N, or 'all' (the full patch grid)"),
               ("--index", COUNT, 0, "test image index (trajectories: the first one; priors: "
                "with --dataset)"),
               ("--seed", int, 0, "seed of the random priors"))


def _add_flags(sub, *flags):
    """sub.add_argument for each (flag, kind, default, help text) of flags: kind is the type
    (None: the text as given), or a tuple of the choices."""
    for flag, kind, default, text in flags:
        key = "choices" if isinstance(kind, tuple) else "type"
        sub.add_argument(flag, default=default, help=text, **{key: kind})


def _model_flags(sub, steps=None, steps_help="SPoT-ON steps (default: oracle.py's)"):
    """The flags of a command that reads test images through a trained model, and searches
    them with SPoT-ON, spelled as in every command of the project (--prior, --oracle-steps and
    --steps: hidden aliases)."""
    sub.add_argument("--checkpoint", required=True, help="checkpoint written by train.py")
    _add_flags(sub, *IMAGE_FLAGS,
               ("--search-from", spot.PRIORS, "isotropic",
                "prior the tokens are drawn from, and the search starts from"),
               ("--search-steps", COUNT, steps, steps_help),
               ("--search-lr", POSITIVE, None,
                "SPoT-ON step size in [0, 1] position units (default: oracle.py's)"),
               ("--objective", ("label", "entropy"), "label", "what the search minimizes: the "
                "label's loss (the oracle), or the label-free entropy of the model's prediction"))
    utils.add_alias(sub, "search_from", "--prior", choices=spot.PRIORS)
    utils.add_alias(sub, "search_steps", "--oracle-steps", "--steps", type=COUNT)


def build_parser():
    parser = argparse.ArgumentParser(
        prog="visualize.py", description=__doc__.split("\n\n")[0],
        epilog="Every command writes a figure (--out; no extension: .png) and never opens a "
        "window. 'COMMAND --help' lists a command's flags.")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    def add(name, func, help_text, *flags):
        sub = commands.add_parser(name, help=help_text, description=help_text,
                                  formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        sub.set_defaults(func=func, parser=sub, gif=None)    # main words its errors with sub
        _add_flags(sub, ("--out", _file_type(IMAGE_FORMATS), f"{name}.png",
                         "output figure (.png, .pdf, .svg, ...)"), *flags)
        return sub

    add("priors", _cmd_priors, "gallery of the spatial priors (the paper's Figure 2)",
        ("--image-size", ONE_OR_MORE, None, "canvas size in pixels (default 32, or the dataset's)"),
        ("--window", ONE_OR_MORE, 4, "token window k in pixels"),
        ("--priors", utils.name_list(spot.PRIORS), spot.PRIORS, "comma-separated prior names"),
        ("--dataset", None, None, "draw on a test image of this dataset (enables 'salient')"),
        ("--data-dir", None, None, "dataset folder (cifar10, folder)"),
        *IMAGE_FLAGS)
    _model_flags(add("placements", _cmd_placements,
                     "token windows on a test image, before and after SPoT-ON"),
                 0, "also run SPoT-ON for this many steps and show the result beside (0: no "
                 "search)")
    _model_flags(add("trajectories", _cmd_trajectories, "SPoT-ON search paths on test images",
                     ("--n-images", ONE_OR_MORE, 4, "how many test images"),
                     ("--gif", _file_type(("gif",)), None,
                      "also animate the first image into this .gif"),
                     ("--fps", POSITIVE, 4, "GIF frames per second")))
    return parser


def main(argv=None):
    """Entry point; argv defaults to sys.argv[1:]. Returns 0; a bad flag, file or dataset
    exits with status 2 and an 'error: ...' message (with the command's usage), never a
    traceback."""
    args = build_parser().parse_args(argv)
    with utils.usage_errors(args.parser):         # a message for the user, not a bug
        plt.close(args.func(args))
    print("wrote " + " and ".join(
        str(path) for path in (args.out, args.gif) if path))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
