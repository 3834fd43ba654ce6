"""
experiments/figures.py -- the figures of RESULTS.md's findings: from the committed results, and
finding 3's saliency figure from a checkpoint.

experiments/tables.py writes RESULTS.md's tables from results/*/results.json (oracle.py's and
experiments.label_free's evaluations) and results/*/metrics.jsonl (train.py's runs); this file
draws its curves from the same files. visualize.py draws where the tokens go (the spatial priors,
placements, SPoT-ON's trajectories); the saliency figure here reuses its drawing primitives, in
its pixel units, and its checkpoint loading. Each function returns the matplotlib Figure (pass
path= to also save it: a PNG when the path has no extension):

    plot_budget_curves      the paper's results table as curves: accuracy vs token budget, one
                            line per (method, prior). Findings 1 and 2 (off-grid beats the grid
                            at sparse budgets; centre-biased priors win at few tokens, even
                            coverage as the budget grows)
    plot_training_curves    retrofitting: validation accuracy vs training time of a grid ViT,
                            its retrofit (whose clock starts where the grid ViT's ended) and
                            SPoT trained from scratch
    plot_frontier           beyond the paper: the label-free frontier, top-1 vs compute in
                            tokens' worth of every label-free method, control and ceiling
                            beside the best fixed prior (results/label-free-frontier.json)
    plot_saliency_vs_oracle finding 3: an image's saliency map beside the image, with SPoT-ON's
                            placements on both. Oracle tokens lean only slightly toward salient
                            pixels: where they end up is decided by how they work together

Run it from the repository root (every command writes a file; none opens a window; `--help`
lists a command's flags):

    python -m experiments.figures budget --results results/cifar10-grid-vit \\
        results/cifar10-retrofit results/cifar10-spot --out figures/cifar10_budget.png
    python -m experiments.figures training --runs results/cifar10-grid-vit \\
        results/cifar10-retrofit results/cifar10-spot --keys val_acc,val_acc@4,val_acc@16 \\
        --out figures/cifar10_training.png
    python -m experiments.figures frontier --out figures/label_free_frontier.png
    python -m experiments.figures saliency --checkpoint runs/shapes/checkpoint.pt --tokens 16 \\
        --search-steps 20 --index 0 --out figures/saliency.png
"""

import argparse
import json
import os
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch

import oracle
import spot
import utils
import visualize
from experiments import frontier

METRICS = {"top1": "top-1 accuracy", "knn": "kNN accuracy"}     # results.json fields

# -----------------------------------------------------------------------------
# The paper's results table as curves: accuracy vs token budget

# Method -> (line style, marker, legend name). Every oracle variant is dashed in some way.
METHOD_STYLES = {"prior": ("-", "o", "prior"), "spot-on": ("--", "s", "SPoT-ON (label oracle)"),
                 "spot-on-entropy": ((0, (1, 1.5)), "^", "SPoT-ON (entropy, label-free)"),
                 "best-of-k": ((0, (2, 1)), "*", "best of K by confidence"),
                 "spot-on-snapped": ((0, (5, 2, 1, 2)), "v", "SPoT-ON snapped to grid"),
                 "spot-on-transfer": ((0, (6, 3)), "D", "SPoT-ON transferred"),
                 "spot-learned": ((0, (3, 1, 1, 1)), "P", "SPoT-learned (glance + place)")}
PRIOR_COLORS = {"uniform": "#1f77b4", "gaussian": "#ff7f0e", "sobol": "#2ca02c",
                "isotropic": "#d62728", "center": "#9467bd", "salient": "#8c564b",
                "salient-model": "#e377c2", "grid": "black"}


def _load_results(results):
    """A results dict, or a path to results.json (or to the folder holding it) -> dict."""
    if isinstance(results, (str, os.PathLike)):
        file = Path(results)
        if file.is_dir():
            file /= "results.json"
        if not file.is_file():
            raise ValueError(f"results must be a dict or the path of an existing results.json "
                             f"(as oracle.py writes), but {file} does not exist")
        try:
            results = json.loads(file.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"results file {file} is not valid JSON: {error}") from None
    rows = results.get("rows") if isinstance(results, dict) else None
    if not isinstance(rows, list) or not rows or not all(
            {"method", "prior", "tokens"} <= set(row) for row in rows):
        raise ValueError("results must hold a non-empty 'rows' list of dicts with at least "
                         "'method', 'prior' and 'tokens' (the schema of oracle.py's results.json)")
    return results


def _budget_lines(rows, metric):
    """rows -> {(method, prior): {tokens: (value, low, high)}} in drawing order, where low and
    high are the row's 95 % interval (None where results.json has none)."""
    lines = {}
    for row in rows:
        if row.get(metric) is not None:
            lines.setdefault((row["method"], row["prior"]), {})[int(row["tokens"])] = (
                float(row[metric]), row.get(f"{metric}_low"), row.get(f"{metric}_high"))
    if not lines:
        raise ValueError(f"results has no non-null {metric!r} values to plot; "
                         f"try metric={'knn' if metric == 'top1' else 'top1'!r}")
    # Known methods, then known priors, in the order of their tables; unknown names last.
    rank = {name: i for i, name in enumerate([*METHOD_STYLES, *spot.PRIORS])}
    return {key: lines[key] for key in
            sorted(lines, key=lambda key: (rank.get(key[0], 99), rank.get(key[1], 99), key[1]))}


def plot_budget_curves(results, path=None, metric="top1", ax=None):
    """Accuracy vs number of tokens (log2 axis), one line per (method, prior).

    results: dict {"settings": {...}, "rows": [{"method", "prior", "tokens", "top1", "knn"}]}
             or a path to results.json (or its folder), as written by oracle.py
    metric:  "top1" or "knn"; rows whose value is null are left out of the line
    Solid lines are priors without search, dashed ones oracle (SPoT-ON) variants, the colour is
    the prior; the patch-grid baseline (prior "grid", no search) is a thick black line; shaded
    bands are the rows' 95 % intervals where results.json has them (oracle.py writes them).
    Returns the Figure.
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {tuple(METRICS)}, got {metric!r}")
    results = _load_results(results)
    lines = _budget_lines(results["rows"], metric)
    own_figure = ax is None
    ax = ax or plt.subplots(figsize=(7.5, 4.8))[1]
    extra_colors = iter(plt.get_cmap("tab10").colors[::-1])
    for (method, prior), points in lines.items():
        tokens = sorted(points)
        values, low, high = zip(*map(points.get, tokens))
        style, marker, name = METHOD_STYLES.get(method, ((0, (3, 1)), "x", method))
        color = PRIOR_COLORS.get(prior) or next(extra_colors, "grey")
        baseline = method == "prior" and prior == "grid"
        ax.plot(tokens, values, ls=style, marker=marker, color=color, ms=5,
                lw=2.6 if baseline else 1.5, zorder=5 if baseline else 3,
                label="patch grid (ViT baseline)" if baseline else f"{name}: {prior}")
        if None not in low:                                   # shade the 95 % intervals
            ax.fill_between(tokens, low, high, color=color, alpha=0.12, lw=0)

    all_tokens = sorted(set().union(*lines.values()))
    ax.set_xscale("log", base=2)
    ax.set_xticks(all_tokens, all_tokens)
    ax.minorticks_off()
    ax.set(xlabel="tokens per image (log2 scale)", ylabel=f"{METRICS[metric]} (%)")
    ax.grid(True, alpha=0.3)
    settings = results.get("settings") or {}
    where = ", ".join(f"{k}={settings[k]}" for k in ("run", "dataset", "split") if k in settings)
    where = where or settings.get("checkpoint")
    ax.set_title(f"{METRICS[metric]} vs token budget" + (f"\n{where}" if where else ""),
                 fontsize=10)
    if own_figure:                      # never re-layout a figure the caller owns
        ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8, frameon=False)
        ax.figure.tight_layout()
    else:                               # a panel of a bigger figure: the legend goes below it
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, fontsize=7,
                  frameon=False)
    return visualize._finish(ax.figure, path)


# -----------------------------------------------------------------------------
# Retrofitting: training curves (the grid ViT, its retrofit, SPoT from scratch)

def _load_run(run):
    """A run folder (metrics.jsonl, run.json as train.py writes them) -> (its name, (its
    epochs' metrics, the name of the run it was initialized from with --init-from, or ""))."""
    folder = Path(run)
    metrics = folder / "metrics.jsonl"
    if not metrics.is_file():
        raise ValueError(f"{folder} holds no metrics.jsonl (pass run folders written by train.py)")
    epochs = [m for m in map(json.loads, metrics.read_text().splitlines())
              if not (m.get("final") or m.get("partial"))]
    info = folder / "run.json"
    args = json.loads(info.read_text()).get("args", {}) if info.is_file() else {}
    return folder.name, (epochs, Path(args.get("init_from") or "").parent.name)


def plot_training_curves(runs, keys=("val_acc", "val_acc@16"), path=None):
    """Validation accuracy vs training time, one line per run, one panel per metric.

    runs: run folders. A run started with --init-from another run in the list (retrofitting)
    starts its clock where that run's ended, so the x axis is the total CPU time behind a model.
    keys: metrics.jsonl fields, e.g. "val_acc" (full grid) and "val_acc@16" (16 isotropic tokens).
    """
    loaded = dict(map(_load_run, runs))
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for name, (epochs, source) in loaded.items():
            parent = loaded.get(source, [[]])[0]
            start = parent[-1]["elapsed_s"] if parent else 0.0
            # (minutes, value) from the start of the source run, if any
            points = [((start + m["elapsed_s"]) / 60, m[key]) for m in epochs if key in m]
            handover = [m[key] for m in parent if key in m]
            if points and handover:          # a retrofit starts from its source's last value
                points.insert(0, (start / 60, handover[-1]))
            if points:
                ax.plot(*zip(*points), marker="o", ms=3,
                        label=name + (f" (from {source})" if parent else ""))
        ax.set(xlabel="training time (minutes on the CPU of the runs)", ylabel=f"{key} (%)")
        ax.set_title("validation, full grid" if key == "val_acc" else
                     f"validation, {key.split('@')[-1]} isotropic tokens", fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return visualize._finish(fig, path)


# -----------------------------------------------------------------------------
# Finding 3: do oracle tokens go where the saliency is?

START_COLOR = "#00e5ff"                     # prior / start positions (cyan)
END_COLOR = "#ff2d55"                       # oracle / end positions (red)


def plot_saliency_vs_oracle(image, positions, start_positions=None, window=None, path=None):
    """The image's saliency map beside the image, with the oracle's final positions on both.

    image:           (C, H, W) float in [0, 1] or uint8
    positions:       (N, 2) the oracle's final positions
    start_positions: optional (N, 2) where the search started (drawn hollow)
    window:          optional k: draw the oracle windows, and measure saliency over each window
                     (otherwise at the centre point)
    The title reports the mean saliency the tokens read relative to the map's mean: 1.0x means
    no preference for salient pixels, 2.0x twice as salient as a random spot (finding 3).
    Returns the Figure.
    """
    # visualize's checks and drawing primitives, in its pixel units (its "Drawing convention").
    img = visualize._image_hwc(image, window)
    height, width = img.shape[:2]
    end = visualize._positions_array(positions)
    start = (None if start_positions is None
             else visualize._positions_array(start_positions, "start_positions"))

    saliency = spot.saliency_map(torch.from_numpy(img.transpose(2, 0, 1).copy())[None])[0]  # (H, W)
    # Saliency read / image mean (no window: the map's value at each centre, a 1 x 1 window).
    ratio = lambda pos: oracle.saliency_read(saliency[None], torch.as_tensor(pos).float()[None],
                                             window or 1).item()
    report = ", ".join(f"{name} {ratio(pos):.2f}x"
                       for name, pos in (("oracle", end), ("start", start)) if pos is not None)

    fig, axes = visualize._panels(2, 4.2, height, width, 0.9)
    visualize._show_image(axes[0], img, "image", window)
    # The map is drawn in units of its own mean, so the colour bar reads like the title's ratios.
    visualize._show_image(axes[1], saliency.numpy() / saliency.mean().item(),
                          "spectral-residual saliency (x image mean)", window, cmap="magma")
    end_px = visualize._to_pixels(end, height, width)
    for ax in axes:
        if window is not None:
            visualize._draw_windows(ax, end_px, window, END_COLOR, alpha=0.7, lw=0.9)
        if start is not None:          # hollow starts, and a thin line start -> end per token
            track_px = visualize._to_pixels(np.stack([start, end]), height, width)  # (2, N, 2)
            visualize._dots(ax, track_px[0], START_COLOR, 24, hollow=True)
            ax.plot(track_px[..., 1], track_px[..., 0], color="white", lw=0.6, alpha=0.7, zorder=4)
        visualize._dots(ax, end_px, END_COLOR, 18)
    visualize._legend_below(
        fig, [visualize._marker("start (prior)", "none", START_COLOR)] * (start is not None)
        + [visualize._marker("oracle position", END_COLOR)])
    fig.suptitle(f"Saliency vs oracle placement (finding 3)\nsaliency read / image mean: {report}",
                 fontsize=10)
    # One colour bar for both panels (constrained layout keeps the panels the same size).
    fig.colorbar(axes[1].images[0], ax=list(axes), fraction=0.025, pad=0.02)
    return visualize._finish(fig, path)


# -----------------------------------------------------------------------------
# The label-free frontier: accuracy vs compute, a panel per dataset

DESIGNS = ("glimpses", "glance-and-rank", "learned-move", "sketch",
           "layout-bank")                                 # frontier.FAMILIES' designs


def plot_frontier(combined, path=None, max_compute=40):
    """results/label-free-frontier.json (experiments.tables gathers it), or its content -> one
    panel per dataset: the first run's frontier (the best fixed prior at each token count) with
    every row, and 3 points above it the goal; a later run of the dataset (a model fine-tuned
    for a design, judged against its own priors) adds its frontier, dashed, and its design's
    rows only (frontier.draw). Rows costing more than `max_compute` tokens' worth (SPoT-ON and
    its label-free variant, hundreds) are left to the table, so the goal's range stays legible."""
    if not isinstance(combined, dict):
        combined = json.loads(Path(combined).read_text())
    rows = combined["rows"]
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    fig, axes = plt.subplots(1, len(datasets), figsize=(7 * len(datasets), 6.8), squeeze=False,
                             layout="constrained")
    for ax, dataset in zip(axes[0], datasets):
        runs = sorted({r["run"] for r in rows if r["dataset"] == dataset})
        for index, run in enumerate(runs):
            drawn = [r for r in rows if r["run"] == run and r["compute_tokens"] <= max_compute
                     and (index == 0 or frontier.family(r["method"]) in DESIGNS)]
            label = "best prior" if index == 0 else "best prior of a design's tuned model"
            front = combined["frontiers"][run]
            frontier.draw(ax, front, drawn, label, "k-" if index == 0 else "k--")
            if index == 0:                  # the goal: 3 points above the best prior
                ax.plot([f["compute_tokens"] for f in front], [f["top1"] + 3 for f in front],
                        "k:", lw=1, label="best prior + 3 points (the goal)")
        split = next(r["split"] for r in rows if r["dataset"] == dataset)
        ax.set_title(f"{dataset}, {split} split: hollow markers read the label; bars: 95 % "
                     f"intervals; up to {max_compute} tokens' worth", fontsize=10)
        ax.set_xlim(right=max_compute)
    legend = {}                        # one entry per label, whichever panel drew it first
    for ax in axes[0]:
        legend |= {label: handle for handle, label in zip(*ax.get_legend_handles_labels())
                   if label not in legend}
    fig.legend(legend.values(), legend.keys(), loc="outside lower center", ncol=4, fontsize=8)
    return visualize._finish(fig, path)


# -----------------------------------------------------------------------------
# Command line

def _cmd_budget(args):
    if len(args.results) == 1:
        return plot_budget_curves(args.results[0], args.out, args.metric)
    # Several models (e.g. grid ViT, retrofit, SPoT from scratch): one panel each, shared y axis.
    fig, axes = plt.subplots(1, len(args.results), figsize=(5.5 * len(args.results), 6.5),
                             sharey=True)
    for ax, results in zip(axes, args.results):
        plot_budget_curves(results, metric=args.metric, ax=ax)
    fig.tight_layout()
    return visualize._finish(fig, args.out)


def _cmd_saliency(args):
    # visualize._load reads --checkpoint (model and test split) and runs SPoT-ON on the image at
    # --index: trajectory[0] is the prior's draw the search started from, trajectory[-1] its end.
    window, _, uint8, _, track, _ = visualize._load(args)
    return plot_saliency_vs_oracle(uint8[0], track[-1, 0], track[0, 0], window, args.out)


def build_parser():
    parser = argparse.ArgumentParser(
        prog="python -m experiments.figures", description=__doc__.split("\n\n")[0],
        epilog="Every command writes a figure (--out; no extension: .png) and never opens a "
        "window. 'COMMAND --help' lists a command's flags.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name, func, help_text):
        sub = commands.add_parser(name, help=help_text, description=help_text,
                                  formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        sub.set_defaults(func=func)
        sub.add_argument("--out", type=visualize._file_type(visualize.IMAGE_FORMATS),
                         default=f"{name}.png", help="output figure (.png, .pdf, .svg, ...)")
        return sub

    p = add("budget", _cmd_budget, "accuracy vs token budget from oracle.py's results.json")
    p.add_argument("--results", required=True, nargs="+",
                   help="results.json (or folders): a panel each")
    p.add_argument("--metric", choices=METRICS, default="top1", help="which accuracy")

    p = add("training",
            lambda args: plot_training_curves(args.runs, args.keys.split(","), args.out),
            "validation accuracy vs training time of train.py runs (retrofitting)")
    p.add_argument("--runs", required=True, nargs="+", help="run folders (metrics.jsonl, run.json)")
    p.add_argument("--keys", default="val_acc,val_acc@16",
                   help="metrics.jsonl fields, a panel each")

    p = add("frontier", lambda args: plot_frontier(args.results, args.out),
            "the label-free frontier: top-1 vs compute of every method beside the best prior")
    p.add_argument("--results", default="results/label-free-frontier.json",
                   help="label-free-frontier.json (python -m experiments.tables writes it)")

    p = add("saliency", _cmd_saliency,
            "finding 3: saliency map vs SPoT-ON placement, on a test image of a checkpoint")
    # The flags of visualize.py's checkpoint figures (placements, trajectories), the same
    # spellings and defaults: --checkpoint, --tokens, --index, --seed, --search-*, --objective.
    visualize._model_flags(p)
    return parser


def main(argv=None):
    """Entry point; argv defaults to sys.argv[1:]. Returns 0; a bad flag, file, checkpoint or
    dataset exits with status 2 and one 'error: ...' line, never a traceback."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        plt.close(args.func(args))
    except (ValueError, utils.DataError) as error:     # a message for the user, not a bug
        parser.exit(2, f"{parser.prog} {args.command}: error: {error}\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
