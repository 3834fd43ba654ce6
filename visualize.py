"""
visualize.py -- pictures of where SPoT's tokens go, and what it buys (arXiv 2507.01654).

Each function draws one kind of figure and returns the matplotlib Figure (pass path= to also
save it: a PNG when the path has no extension). The idea each one shows:

    plot_placements         subpixel tokens: each token's k x k window at its continuous
                            position, over the faint patch grid. Off-grid windows straddle grid
                            cells, which a grid cannot do (sparse feature selection)
    plot_priors             the spatial priors, one panel each (the paper's Figure 2)
    plot_trajectories       SPoT-ON (the oracle search): paths from the prior's start to the
                            oracle's placement, per token
    save_trajectory_gif     the same search, animated, for one image
    plot_training_curves    retrofitting: validation accuracy vs training time of a grid ViT, its
                            retrofit (whose clock starts where the grid ViT's ended) and SPoT
                            trained from scratch
    plot_budget_curves      the paper's results table as curves: accuracy vs token budget, one
                            line per (method, prior). Findings 1 and 2 (off-grid beats the grid at
                            sparse budgets; centre-biased priors win at few tokens, even coverage
                            as the budget grows)
    plot_saliency_vs_oracle finding 3: saliency map vs oracle placements (oracle tokens lean
                            only slightly toward salient pixels)

Run it (every command writes files; none opens a window; `--help` lists a command's flags):

    python visualize.py priors --image-size 32 --window 4 --tokens 16 --out priors.png
    python visualize.py priors --dataset shapes --tokens 16 --out priors.png   # on a test image
    python visualize.py placements --checkpoint runs/shapes/checkpoint.pt --search-from isotropic \\
                                   --tokens 16 --index 0 --search-steps 5 --out placements.png
    python visualize.py trajectories --checkpoint runs/shapes/checkpoint.pt --tokens 16 \\
                                     --n-images 4 --out traj.png --gif traj.gif
    python visualize.py saliency --checkpoint runs/shapes/checkpoint.pt --tokens 16 --out sal.png
    python visualize.py budget --results runs/oracle/results.json --out budget.png --metric top1
    python visualize.py training --runs runs/grid-vit runs/retrofit runs/spot --keys val_acc,val_acc@4

Drawing convention (the same as spot.py's coordinates)
------------------------------------------------------
Images are drawn with imshow(extent=(0, W, H, 0)), so pixel i covers [i, i+1) on both axes and
the axes are in *pixel units*. A position (y, x) in [0, 1] is the centre P = (y H, x W) of a
k x k window, and the window is the square [P - k/2, P + k/2] on each axis. So a grid-cell
centre P = (i + 0.5) k draws a square exactly covering grid cell i, [i k, (i + 1) k].
"""

import argparse
import json
import math
import os
from pathlib import Path

# Without a display (a server, CI, a test run) pyplot picks the file-only Agg backend itself.
import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.backend_bases import FigureCanvasBase
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle

import spot
import train
import utils

DPI = 150                                   # saved PNGs: sharp, yet a few hundred kB at most
METRICS = {"top1": "top-1 accuracy (%)", "knn": "kNN accuracy (%)"}
WINDOW_COLOR = "#ffd400"                    # token windows: yellow reads on dark and light images
START_COLOR = "#00e5ff"                     # prior / start positions (cyan)
END_COLOR = "#ff2d55"                       # oracle / end positions (red)


# -----------------------------------------------------------------------------
# Input checks: every error names the argument and says what is accepted

def _as_numpy(value):
    return value.detach().cpu().numpy() if torch.is_tensor(value) else np.asarray(value)


def _image_hwc(image, name="image"):
    """(C, H, W) with C in {1, 3}, float in [0, 1] or uint8 -> numpy (H, W, 3) float in [0, 1].

    A 2-D (H, W) array is taken as a grey image. Floats are clipped to [0, 1] (bilinear
    resizing can overshoot slightly), uint8 is divided by 255.
    """
    array = _as_numpy(image)
    array = array[None] if array.ndim == 2 else array
    floats = np.issubdtype(array.dtype, np.floating)
    if (array.ndim != 3 or array.shape[0] not in (1, 3) or min(array.shape[1:]) < 1
            or not (floats or array.dtype == np.uint8) or (floats and not np.isfinite(array).all())):
        raise ValueError(f"{name} must be (C, H, W) with C = 1 or 3 (or a grey (H, W)), finite "
                         f"floats in [0, 1] or uint8, got {array.dtype} of shape {array.shape}")
    array = np.clip(array.astype(np.float32), 0, 1) if floats else array.astype(np.float32) / 255
    return np.repeat(array, 3 // array.shape[0], axis=0).transpose(1, 2, 0)


def _positions_array(positions, name="positions", ndim=2):
    """Positions -> numpy float array whose last axis is (y, x); ndim=2 means (N, 2)."""
    array = _as_numpy(positions)
    shape = {2: "(N, 2)", 3: "(steps + 1, N, 2)", 4: "(steps + 1, B, N, 2)"}[ndim]
    if (array.ndim != ndim or array.shape[-1] != 2 or array.shape[-2] < 1
            or not np.issubdtype(array.dtype, np.floating) or not np.isfinite(array).all()):
        raise ValueError(f"{name} must have shape {shape} holding finite floats (y, x) in [0, 1], "
                         f"got {array.dtype} of shape {array.shape}")
    return array.astype(np.float64)


def _with_default_suffix(path, suffix=".png"):
    """A path without an extension gets `suffix`. matplotlib would add ".png" silently, so the
    file written would not be the one the caller named; appending it here keeps them the same."""
    path = Path(path)
    return path if path.suffix else path.with_name(path.name + suffix)


def _finish(fig, path):
    """Save the figure if path is given (".png" when it has no extension) and return it. The
    temporary file of utils.write_atomic keeps the extension: savefig picks the format from it."""
    if path is not None:
        utils.write_atomic(_with_default_suffix(path), lambda tmp: fig.savefig(tmp, dpi=DPI, bbox_inches="tight"))
    return fig


def _panels(n, side, height, width, extra):
    """A figure of n square-ish panels, at most 4 a row (the unused ones blank) -> (fig, axes)."""
    cols, rows = min(4, n), math.ceil(n / min(4, n))
    fig, axes = plt.subplots(rows, cols, figsize=(side * cols, side * rows * height / width + extra),
                             squeeze=False, layout="constrained")
    for ax in axes.flat[n:]:
        ax.axis("off")
    return fig, axes.flat[:n]


# -----------------------------------------------------------------------------
# Drawing primitives, all in pixel units (see "Drawing convention" above)

def _show_image(ax, image, window=None, grid=False, title=None, title_size=9, **imshow):
    """imshow with pixel i spanning [i, i+1): extent = (left, right, bottom, top).

    With a window k the view widens by k/2 beyond the image, so windows that hang over the edge
    (they read zeros there) stay visible, the outside in a neutral grey; grid=True draws the
    patch grid of k x k cells over the image; title, if given, titles the panel. y grows downward,
    like image rows."""
    height, width = image.shape[:2]
    margin = (window or 0) / 2
    ax.imshow(image, extent=(0, width, height, 0), interpolation="nearest", **imshow)
    ax.set(xlim=(-margin, width + margin), ylim=(height + margin, -margin), facecolor="#d9d9d9",
           xticks=[], yticks=[])
    if grid:
        _draw_grid(ax, height, width, window)
    if title is not None:
        ax.set_title(title, fontsize=title_size)


def _draw_grid(ax, height, width, window):
    """The patch grid as faint lines (white under black dashes: visible on any image). When k
    does not divide the image, the grid covers only the top-left (H//k)k x (W//k)k pixels (like
    spot.grid_positions)."""
    rows, cols = height // window, width // window
    lines = [([0, cols * window], [i * window] * 2) for i in range(rows + 1)] \
        + [([j * window] * 2, [0, rows * window]) for j in range(cols + 1)]
    for xs, ys in lines:
        ax.plot(xs, ys, color="white", lw=0.6, alpha=0.45, zorder=2)
        ax.plot(xs, ys, color="black", lw=0.6, alpha=0.25, ls=(0, (2, 2)), zorder=2)


def _to_pixels(positions, height, width):
    """(..., 2) normalized (y, x) -> (..., 2) pixel-unit (row, col) centres: P = (y H, x W)."""
    return positions * np.array([height, width], dtype=np.float64)


def _draw_windows(ax, centres_px, window, color=WINDOW_COLOR, alpha=1.0, lw=1.3, zorder=3):
    """One square [P - k/2, P + k/2]^2 per token. Rectangle wants its (x, y) corner first."""
    for row, col in centres_px:
        ax.add_patch(Rectangle((col - window / 2, row - window / 2), window, window, fill=False,
                               edgecolor=color, lw=lw, alpha=alpha, zorder=zorder))


def _dots(ax, centres_px, color, size, hollow=False, **style):
    """Token centres as markers: hollow rings (start positions), or dots with a black rim."""
    style = {**(dict(facecolors="none", edgecolors=color, linewidths=1.2, zorder=5) if hollow
                else dict(c=color, edgecolors="black", linewidths=0.5, zorder=6)), **style}
    ax.scatter(centres_px[..., 1], centres_px[..., 0], s=size, **style)


def _on_grid(centres_px, window, height, width, tol=1e-3):
    """How many centres sit exactly on a grid-cell centre (i + 0.5) k, inside the grid."""
    cell = centres_px / window - 0.5                       # grid index; integer iff on the grid
    index = np.round(cell)
    inside = (index >= 0).all(-1) & (index[:, 0] < height // window) & (index[:, 1] < width // window)
    return int((np.all(np.abs(cell - index) < tol, axis=-1) & inside).sum())


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
    img = _image_hwc(image)
    height, width = img.shape[:2]
    spot.check_window(window, (height, width))
    centres = _to_pixels(_positions_array(positions), height, width)      # (N, 2) pixel units
    if ax is None:
        ax = plt.subplots(figsize=(4.2, 4.2 * height / width + 0.4))[1]
    _show_image(ax, img, window, grid, title if title is not None else
                f"{len(centres)} tokens, k = {window}, {_on_grid(centres, window, height, width)} on the grid")
    _draw_windows(ax, centres, window)
    _dots(ax, centres, WINDOW_COLOR, 14, linewidths=0.6, zorder=4)
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
    height, width = spot.to_hw(image_size)
    spot.check_window(window, (height, width))
    if isinstance(n_tokens, bool) or not isinstance(n_tokens, (int, np.integer)) or n_tokens < 1:
        raise ValueError(f"n_tokens must be an int >= 1, got {n_tokens!r}")
    priors = [priors] if isinstance(priors, str) else list(priors)
    if not priors or not set(priors) <= set(spot.PRIORS):
        raise ValueError(f"priors must be a non-empty list of names from {spot.PRIORS}, got {priors!r}")
    if image is None and set(priors) == {"salient"}:
        raise ValueError("priors=['salient'] needs image=(C, H, W): the salient prior samples "
                         "positions from the image's saliency map")
    canvas = np.full((height, width, 3), 0.93, np.float32) if image is None else _image_hwc(image)
    if canvas.shape[:2] != (height, width):
        raise ValueError(f"image is {canvas.shape[0]}x{canvas.shape[1]} but image_size is "
                         f"{height}x{width}; they must match")
    images = None if image is None else torch.from_numpy(canvas.transpose(2, 0, 1).copy())[None]
    priors = [p for p in priors if image is not None or p != "salient"]   # blank: nothing salient

    fig, axes = _panels(len(priors), 3.0, height, width, 0.5)
    for ax, prior in zip(axes, priors):
        # A fresh generator per prior: each panel is reproducible on its own.
        generator = torch.Generator().manual_seed(seed)
        try:
            positions = spot.sample_positions(prior, 1, int(n_tokens), (height, width), window,
                                              generator=generator, images=images)[0]
        except ValueError as error:          # e.g. "grid" with more tokens than grid cells
            _show_image(ax, canvas, title=prior, title_size=10)
            ax.text(width / 2, height / 2, str(error).split(";")[0][:60], ha="center",
                    va="center", fontsize=6, wrap=True)
            continue
        plot_placements(canvas.transpose(2, 0, 1), positions, window, ax=ax, title=prior)
    fig.suptitle(f"Spatial priors: {n_tokens} tokens, {window}x{window} windows, "
                 f"{height}x{width} image", fontsize=11)
    return _finish(fig, path)


# -----------------------------------------------------------------------------
# SPoT-ON (the oracle search): trajectories

def _token_colors(n):
    """n distinct-ish colours: a cyclic colormap, so neighbouring tokens differ."""
    return plt.get_cmap("hsv")(np.linspace(0, 1, n, endpoint=False))


def _draw_trajectory(ax, track_px, window, colors):
    """track_px (steps + 1, N, 2) in pixel units: paths, hollow starts, filled ends, end windows."""
    for n in range(track_px.shape[1]):
        ax.plot(track_px[:, n, 1], track_px[:, n, 0], color=colors[n], lw=1.2, alpha=0.9, zorder=4)
        _draw_windows(ax, track_px[-1, n:n + 1], window, color=colors[n], alpha=0.55, lw=0.9)
    _dots(ax, track_px[0], colors, 22, hollow=True)
    _dots(ax, track_px[-1], colors, 16)


def _legend_below(fig, handles):
    """The figure's legend in one row under its panels (the figure has a constrained layout)."""
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=8, frameon=False)


def _marker(label, face, edge="black"):
    """A legend entry for a scatter marker (face "none": hollow)."""
    return Line2D([], [], ls="none", marker="o", mfc=face, mec=edge, label=label)


def plot_trajectories(images, trajectory, window, n_images=4, path=None, titles=None):
    """SPoT-ON's search paths over the first n_images images.

    images:     (B, C, H, W) float in [0, 1] or uint8
    trajectory: (steps + 1, B, N, 2) positions at every step; trajectory[0] is the prior start,
                trajectory[-1] the oracle's final placement (oracle.OracleResult.trajectory)
    window:     k
    titles:     optional list of at least n_images panel titles (e.g. "label: pred")
    Returns the Figure.
    """
    array = _as_numpy(images)
    track = _positions_array(trajectory, "trajectory", ndim=4)            # (S+1, B, N, 2)
    if array.ndim != 4 or track.shape[1] != array.shape[0]:
        raise ValueError(f"images must be (B, C, H, W) and trajectory (steps + 1, B, N, 2) with the "
                         f"same B, got images {array.shape} and trajectory {track.shape}")
    if isinstance(n_images, bool) or not isinstance(n_images, (int, np.integer)) or n_images < 1:
        raise ValueError(f"n_images must be an int >= 1, got {n_images!r}")
    n_images = min(int(n_images), len(array))
    if titles is not None and (isinstance(titles, str) or len(titles) < n_images):
        raise ValueError(f"titles must be a list of at least n_images={n_images} strings, got {titles!r}")
    height, width = array.shape[-2:]
    spot.check_window(window, (height, width))

    fig, axes = _panels(n_images, 3.2, height, width, 0.8)
    colors = _token_colors(track.shape[2])
    for b, ax in enumerate(axes):
        track_px = _to_pixels(track[:, b], height, width)                 # (S+1, N, 2)
        moved = np.linalg.norm(track_px[-1] - track_px[0], axis=-1).mean()
        title = titles[b] if titles is not None else f"image {b}"
        _show_image(ax, _image_hwc(array[b], f"images[{b}]"), window, grid=True,
                    title=f"{title}\nmean move {moved:.2f} px in {len(track) - 1} steps")
        _draw_trajectory(ax, track_px, window, colors)
    fig.suptitle("SPoT-ON oracle search: from prior to oracle placement", fontsize=11)
    _legend_below(fig, [_marker("start (prior)", "none"), _marker("end (oracle)", "grey"),
                        Line2D([], [], color="grey", lw=1.2, label="path (one colour per token)"),
                        Rectangle((0, 0), 1, 1, fill=False, edgecolor="grey", label="final k x k window")])
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

    img = _image_hwc(image)
    height, width = img.shape[:2]
    track_px = _to_pixels(_positions_array(trajectory, "trajectory", ndim=3), height, width)
    spot.check_window(window, (height, width))
    if path is None or Path(path).suffix.lower() != ".gif":
        raise ValueError(f"path must be a file name ending in .gif, got {path!r}")
    if not isinstance(fps, (int, float)) or isinstance(fps, bool) or not 0 < fps < math.inf:
        raise ValueError(f"fps must be a finite number > 0, got {fps!r}")
    colors = _token_colors(track_px.shape[1])
    fig, ax = plt.subplots(figsize=(4.0, 4.0 * height / width + 0.4))

    def write(tmp):
        # PillowWriter keeps the frames in memory and writes the file when `saving` closes, even
        # when a frame failed: hence the temporary file of utils.write_atomic.
        writer = PillowWriter(fps=fps)
        with writer.saving(fig, str(tmp), dpi=100):
            for step in range(len(track_px)):
                # Redraw from scratch each frame: simplest, and cheap at these sizes.
                ax.clear()
                _show_image(ax, img, window, True, f"SPoT-ON step {step} / {len(track_px) - 1}", title_size=10)
                _draw_trajectory(ax, track_px[: step + 1], window, colors)
                writer.grab_frame()
            for _ in range(int(math.ceil(fps))):          # hold the result for about a second
                writer.grab_frame()

    utils.write_atomic(path, write)
    return fig


# -----------------------------------------------------------------------------
# The paper's results table as curves: accuracy vs token budget

# Method -> (line style, marker, legend name). Every oracle variant is dashed in some way.
METHOD_STYLES = {"prior": ("-", "o", "prior"), "spot-on": ("--", "s", "SPoT-ON (label oracle)"),
                 "spot-on-entropy": ((0, (1, 1.5)), "^", "SPoT-ON (entropy, label-free)"),
                 "best-of-k": ((0, (2, 1)), "*", "best of K by confidence"),
                 "spot-on-snapped": ((0, (5, 2, 1, 2)), "v", "SPoT-ON snapped to grid"),
                 "spot-on-transfer": ((0, (6, 3)), "D", "SPoT-ON transferred"),
                 "spot-learned": ((0, (3, 1, 1, 1)), "P", "SPoT-learned (glance + place)")}
PRIOR_COLORS = {"uniform": "#1f77b4", "gaussian": "#ff7f0e", "sobol": "#2ca02c", "isotropic": "#d62728",
                "center": "#9467bd", "salient": "#8c564b", "salient-model": "#e377c2", "grid": "black"}


def _load_results(results):
    """A results dict, or a path to results.json (or to the folder holding it) -> dict."""
    if isinstance(results, (str, os.PathLike)):
        file = Path(results) / "results.json" if Path(results).is_dir() else Path(results)
        if not file.is_file():
            raise ValueError(f"results must be a dict or the path of an existing results.json "
                             f"(as oracle.py writes), but {file} does not exist")
        try:
            results = json.loads(file.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"results file {file} is not valid JSON: {error}") from None
    rows = results.get("rows") if isinstance(results, dict) else None
    if not isinstance(rows, list) or not rows or not all(
            isinstance(row, dict) and {"method", "prior", "tokens"} <= set(row) for row in rows):
        raise ValueError("results must hold a non-empty 'rows' list of dicts with at least 'method', "
                         "'prior' and 'tokens' (the schema of oracle.py's results.json)")
    return results


def _budget_lines(rows, metric):
    """rows -> {(method, prior): {tokens: value}} and {(method, prior): {tokens: (low, high)}}
    (the rows' 95 % intervals, where results.json has them), in drawing order."""
    lines, bands = {}, {}
    for row in rows:
        if row.get(metric) is None:
            continue
        key, tokens = (row["method"], row["prior"]), int(row["tokens"])
        lines.setdefault(key, {})[tokens] = float(row[metric])
        if row.get(f"{metric}_low") is not None:
            bands.setdefault(key, {})[tokens] = (row[f"{metric}_low"], row[f"{metric}_high"])
    if not lines:
        raise ValueError(f"results has no non-null {metric!r} values to plot; "
                         f"try metric={'knn' if metric == 'top1' else 'top1'!r}")

    rank = {name: i for i, name in enumerate([*METHOD_STYLES, *spot.PRIORS])}  # unknown names last
    order = sorted(lines, key=lambda key: (rank.get(key[0], 99), rank.get(key[1], 99), key[1]))
    return {key: lines[key] for key in order}, bands


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
    lines, bands = _budget_lines(results["rows"], metric)
    own_figure = ax is None
    if own_figure:
        ax = plt.subplots(figsize=(7.5, 4.8))[1]
    extra_colors = iter(plt.get_cmap("tab10").colors[::-1])
    for (method, prior), points in lines.items():
        tokens, values = zip(*sorted(points.items()))
        style, marker, name = METHOD_STYLES.get(method, ((0, (3, 1)), "x", method))
        color = PRIOR_COLORS.get(prior) or next(extra_colors, "grey")
        baseline = method == "prior" and prior == "grid"
        ax.plot(tokens, values, ls=style, marker=marker, color=color, ms=5,
                lw=2.6 if baseline else 1.5, zorder=5 if baseline else 3,
                label="patch grid (ViT baseline)" if baseline else f"{name}: {prior}")
        band = bands.get((method, prior), {})
        if len(band) == len(tokens):                          # shade the 95 % intervals
            ax.fill_between(tokens, *zip(*(band[t] for t in tokens)), color=color, alpha=0.12, lw=0)

    all_tokens = sorted({t for line in lines.values() for t in line})
    ax.set_xscale("log", base=2)
    ax.set_xticks(all_tokens, [str(t) for t in all_tokens])
    ax.minorticks_off()
    ax.set(xlabel="tokens per image (log2 scale)", ylabel=METRICS[metric])
    ax.grid(True, alpha=0.3)
    settings = results.get("settings") or {}
    where = ", ".join(f"{k}={settings[k]}" for k in ("run", "dataset", "split") if k in settings) \
        or settings.get("checkpoint", "")
    ax.set_title(f"{METRICS[metric].split(' (')[0]} vs token budget" + (f"\n{where}" if where else ""),
                 fontsize=10)
    if own_figure:                      # never re-layout a figure the caller owns
        ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8, frameon=False)
        ax.figure.tight_layout()
    else:                               # a panel of a bigger figure: the legend goes below it
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, fontsize=7, frameon=False)
    return _finish(ax.figure, path)


# -----------------------------------------------------------------------------
# Retrofitting: training curves (the grid ViT, its retrofit, SPoT from scratch)

def _load_run(run):
    """A run folder (metrics.jsonl, run.json as train.py writes them) -> (name, epochs, args)."""
    folder = Path(run).parent if Path(run).is_file() else Path(run)
    metrics = folder / "metrics.jsonl"
    if not metrics.is_file():
        raise ValueError(f"{folder} holds no metrics.jsonl (pass run folders written by train.py)")
    lines = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    epochs = [m for m in lines if not m.get("final") and not m.get("partial")]
    info = folder / "run.json"
    args = json.loads(info.read_text()).get("args", {}) if info.is_file() else {}
    return folder.name, epochs, args


def plot_training_curves(runs, keys=("val_acc", "val_acc@16"), path=None):
    """Validation accuracy vs training time, one line per run, one panel per metric.

    runs: run folders. A run started with --init-from another run in the list (retrofitting)
    starts its clock where that run's ended, so the x axis is the total CPU time behind a model.
    keys: metrics.jsonl fields, e.g. "val_acc" (full grid) and "val_acc@16" (16 isotropic tokens).
    """
    loaded = {name: (epochs, args) for name, epochs, args in map(_load_run, runs)}
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for name, (epochs, args) in loaded.items():
            source = Path(args.get("init_from") or "").parent.name
            parent = loaded.get(source, ([], {}))[0]
            start = parent[-1]["elapsed_s"] if parent else 0.0
            points = [(start + m["elapsed_s"], m[key]) for m in epochs if key in m]
            handover = [m[key] for m in parent if key in m]
            if points and handover:          # a retrofit starts from its source's last value
                points.insert(0, (start, handover[-1]))
            if points:                       # x: minutes
                ax.plot(*zip(*((t / 60, v) for t, v in points)), marker="o", ms=3,
                        label=name + (f" (from {source})" if parent else ""))
        ax.set(xlabel="training time (minutes on the CPU of the runs)", ylabel=f"{key} (%)")
        ax.set_title("validation, full grid" if key == "val_acc" else
                     f"validation, {key.split('@')[-1]} isotropic tokens", fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _finish(fig, path)


# -----------------------------------------------------------------------------
# Finding 3: do oracle tokens go where the saliency is?

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
    img = _image_hwc(image)
    height, width = img.shape[:2]
    end = _positions_array(positions)
    start = None if start_positions is None else _positions_array(start_positions, "start_positions")
    if window is not None:
        spot.check_window(window, (height, width))

    import oracle  # lazily: only this figure needs oracle.saliency_read

    saliency = spot.saliency_map(torch.from_numpy(img.transpose(2, 0, 1).copy())[None])[0]  # (H, W)
    # Saliency read / image mean (no window: the map's value at each centre, a 1 x 1 window).
    ratio = lambda pos: oracle.saliency_read(saliency[None], torch.as_tensor(pos).float()[None], window or 1).item()
    report = ", ".join(f"{name} {ratio(pos):.2f}x" for name, pos in (("oracle", end), ("start", start))
                       if pos is not None)

    fig, axes = plt.subplots(1, 2, figsize=(8.4, 4.2 * height / width + 0.9), layout="constrained")
    _show_image(axes[0], img, window, title="image")
    # The map is drawn in units of its own mean, so the colour bar reads like the title's ratios.
    _show_image(axes[1], saliency.numpy() / saliency.mean().item(), window, title="spectral-residual saliency "
                "(x image mean)", cmap="magma")
    end_px = _to_pixels(end, height, width)
    for ax in axes:
        if window is not None:
            _draw_windows(ax, end_px, window, color=END_COLOR, alpha=0.7, lw=0.9)
        if start is not None:                 # hollow starts, and a thin line start -> end per token
            track_px = _to_pixels(np.stack([start, end]), height, width)            # (2, N, 2)
            _dots(ax, track_px[0], START_COLOR, 24, hollow=True)
            ax.plot(track_px[..., 1], track_px[..., 0], color="white", lw=0.6, alpha=0.7, zorder=4)
        _dots(ax, end_px, END_COLOR, 18)
    handles = [_marker("start (prior)", "none", START_COLOR)] * (start is not None) \
        + [_marker("oracle position", END_COLOR)]
    _legend_below(fig, handles)
    fig.suptitle(f"Saliency vs oracle placement (finding 3)\nsaliency read / image mean: {report}", fontsize=10)
    # One colour bar for both panels (constrained layout keeps the panels the same size).
    fig.colorbar(axes[1].images[0], ax=list(axes), fraction=0.025, pad=0.02)
    return _finish(fig, path)


# -----------------------------------------------------------------------------
# Command line


# What --out may end in: every format matplotlib saves without extra software, PNG first.
IMAGE_FORMATS = ("png", *sorted(set(FigureCanvasBase.get_supported_filetypes()) - {"png"}))

# ImageNet class folders are WordNet ids; figures title them by name (Imagenette's ten classes).
WORDNET_NAMES = {"n01440764": "tench", "n02102040": "English springer", "n02979186": "cassette player",
                 "n03000684": "chain saw", "n03028079": "church", "n03394916": "French horn", "n03417042":
                 "garbage truck", "n03425413": "gas pump", "n03445777": "golf ball", "n03888257": "parachute"}


def _file_type(formats):
    """argparse type of --out / --gif -> the Path that will be written: no extension means
    formats[0]; its folder is created and proven writable now (utils.check_out_dir), so a bad
    name fails before any work, with the flag named by argparse."""
    def parse(text):
        path = _with_default_suffix(text, "." + formats[0])
        if Path(text).is_dir() or path.suffix.lower()[1:] not in formats:
            raise argparse.ArgumentTypeError(f"{text} must name a file (not a folder) ending in "
                                             f".{', .'.join(formats)}")
        try:
            utils.check_out_dir(path.parent, "folder")
        except ValueError as error:
            raise argparse.ArgumentTypeError(f"{error} (to write {path})") from None
        return path
    return parse


def _one_budget(text):
    """argparse type of --tokens: the grammar of utils.parse_tokens, but a figure draws ONE
    budget. The text is kept: 'all' and the upper bound need the patch grid (_budget)."""
    try:
        if len(utils.parse_tokens(text, n_grid=2**40)) == 1:
            return text
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"this figure draws one budget: N >= 1, or 'all' (the full "
                                     f"patch grid), got {text!r}")


def _budget(text, image_size, window):
    """--tokens, now that the patch grid of image_size and window is known -> the token count."""
    return utils.parse_tokens(text, len(spot.grid_positions(image_size, window)))[0]


def _pick(split, first, count=1):
    """Test images [first, first + count) as uint8, and their labels."""
    if first + count > len(split.labels):
        raise ValueError(f"--index {first}" + (f" with --n-images {count}" if count > 1 else "")
                         + f" reaches past the {len(split.labels)} images of this test split")
    return split.images[first:first + count], split.labels[first:first + count]


def _load(args, count=1):
    """The model of --checkpoint, and `count` test images from --index searched by SPoT-ON ->
    (model, class names, uint8 images, labels, start positions (count, N, 2), OracleResult).

    The dataset is the one named by the train args inside the checkpoint; data.load_model_and_data
    reads the file once, with weights_only=True, and words every failure as a message naming it.
    The tokens start from --search-from (seeded by --seed); --search-steps 0 leaves them there."""
    import data
    import oracle

    model, dataset, _ = data.load_model_and_data(args.checkpoint)
    uint8, labels = _pick(dataset.test, args.index, count)
    images, size, window = uint8.float() / 255, model.config.image_size, model.config.window
    start = spot.sample_positions(args.search_from, count, _budget(args.tokens, size, window), size,
                                  window, generator=torch.Generator().manual_seed(args.seed), images=images)
    steps = oracle.DEFAULT_STEPS if args.search_steps is None else args.search_steps
    found = oracle.oracle_search(model, images, labels, start, steps=steps,
                                 lr=args.search_lr or oracle.DEFAULT_LR, objective=args.objective)
    classes = [WORDNET_NAMES.get(name, name) for name in dataset.classes]
    return model, classes, uint8, labels, start, found


def _predict(model, uint8, positions):
    """Predicted classes (B,) through train.predict, the one evaluation loop."""
    import oracle

    return train.predict(model, uint8, positions, "cpu", len(uint8))[0].argmax(-1)


def _cmd_priors(args):
    image, size = None, args.image_size or 32
    if args.dataset is not None:
        import data

        dataset = data.load_dataset(args.dataset, args.data_dir, image_size=args.image_size, progress=False)
        image = _pick(dataset.test, args.index)[0][0]
        size = tuple(image.shape[-2:])
    return plot_priors(size, args.window, _budget(args.tokens, size, args.window), priors=args.priors,
                       image=image, seed=args.seed, path=args.out)


def _cmd_placements(args):
    model, classes, uint8, labels, start, found = _load(args)
    panels = [(f"prior '{args.search_from}'", start)] \
        + [(f"SPoT-ON, {args.search_steps} steps", found.positions)] * (args.search_steps > 0)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.8), squeeze=False,
                             layout="constrained")
    for ax, (name, positions) in zip(axes[0], panels):
        plot_placements(uint8[0], positions[0], model.config.window, ax=ax,
                        title=f"{name}\npredicted '{classes[_predict(model, uint8, positions)[0]]}'")
    fig.suptitle(f"test image {args.index}, label '{classes[labels[0]]}', {start.shape[1]} tokens", fontsize=10)
    return _finish(fig, args.out)


def _cmd_trajectories(args):
    model, classes, uint8, labels, _, found = _load(args, args.n_images)
    before, after = (_predict(model, uint8, found.trajectory[step]) for step in (0, -1))
    titles = [f"#{args.index + i} '{classes[y]}'\npredicted {classes[p]} -> {classes[q]}"
              for i, (y, p, q) in enumerate(zip(labels.tolist(), before.tolist(), after.tolist()))]
    fig = plot_trajectories(uint8, found.trajectory, model.config.window, n_images=args.n_images,
                            titles=titles, path=args.out)
    if args.gif:
        plt.close(save_trajectory_gif(uint8[0], found.trajectory[:, 0], model.config.window,
                                      args.gif, fps=args.fps))
    return fig


def _cmd_saliency(args):
    model, _, uint8, _, start, found = _load(args)
    return plot_saliency_vs_oracle(uint8[0], found.positions[0], start[0],
                                   window=model.config.window, path=args.out)


def _cmd_budget(args):
    if len(args.results) == 1:
        return plot_budget_curves(args.results[0], path=args.out, metric=args.metric)
    # Several models (e.g. grid ViT, retrofit, SPoT from scratch): one panel each, shared y axis.
    fig, axes = plt.subplots(1, len(args.results), figsize=(5.5 * len(args.results), 6.5), sharey=True)
    for ax, results in zip(axes, args.results):
        plot_budget_curves(results, metric=args.metric, ax=ax)
    fig.tight_layout()
    return _finish(fig, args.out)


def _image_flags(sub, index_help):
    """--tokens, --index, --seed: which budget, which test image, which random draw."""
    sub.add_argument("--tokens", type=_one_budget, default="16",
                     help="tokens per image: one budget N, or 'all' (the full patch grid)")
    sub.add_argument("--index", type=utils.int_at_least(0), default=0, help=index_help)
    sub.add_argument("--seed", type=int, default=0, help="seed of the random priors")


def _model_flags(sub, steps=None, steps_help="SPoT-ON steps (default: oracle.py's)"):
    """The flags of a command that reads test images through a trained model, and searches
    them with SPoT-ON, spelled as in every command of the project (old spellings hidden)."""
    sub.add_argument("--checkpoint", required=True, help="checkpoint written by train.py")
    _image_flags(sub, "(first) test image index")
    sub.add_argument("--search-from", choices=spot.PRIORS, default="isotropic",
                     help="prior the tokens are drawn from, and the search starts from")
    sub.add_argument("--search-steps", type=utils.int_at_least(0), default=steps, help=steps_help)
    sub.add_argument("--search-lr", type=utils.float_in(0, low_open=True),
                     help="SPoT-ON step size in [0, 1] position units (default: oracle.py's)")
    sub.add_argument("--objective", choices=("label", "entropy"), default="label", help="what the "
                     "search minimizes: the label's loss (the oracle), or label-free entropy")
    utils.add_alias(sub, "search_from", "--prior", choices=spot.PRIORS)
    utils.add_alias(sub, "search_steps", "--oracle-steps", "--steps", type=utils.int_at_least(0))


def build_parser():
    parser = argparse.ArgumentParser(prog="visualize.py", description=__doc__.split("\n\n")[0].strip(),
                                     epilog="Every command writes a figure (--out; no extension: .png) and "
                                     "never opens a window. 'COMMAND --help' lists a command's flags.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    count = utils.int_at_least(1)

    def add(name, func, help_text):
        sub = commands.add_parser(name, help=help_text, description=help_text,
                                  formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        sub.set_defaults(func=func)
        sub.add_argument("--out", type=_file_type(IMAGE_FORMATS), default=f"{name}.png",
                         help="output figure (.png, .pdf, .svg, ...)")
        return sub

    p = add("priors", _cmd_priors, "gallery of the spatial priors (the paper's Figure 2)")
    p.add_argument("--image-size", type=count, help="canvas size in pixels (default 32, or the dataset's)")
    p.add_argument("--window", type=count, default=4, help="token window k in pixels")
    p.add_argument("--priors", type=utils.name_list(spot.PRIORS), default=list(spot.PRIORS),
                   help="comma-separated prior names")
    p.add_argument("--dataset", help="draw on a test image of this dataset (enables 'salient')")
    p.add_argument("--data-dir", help="dataset folder (cifar10, folder)")
    _image_flags(p, "test image index (with --dataset)")

    p = add("placements", _cmd_placements, "token windows on a test image, before and after SPoT-ON")
    _model_flags(p, 0, "also run SPoT-ON for this many steps and show the result beside (0: no search)")

    p = add("trajectories", _cmd_trajectories, "SPoT-ON search paths on test images")
    _model_flags(p)
    p.add_argument("--n-images", type=count, default=4, help="how many test images")
    p.add_argument("--gif", type=_file_type(("gif",)), help="also animate the first image into this .gif")
    p.add_argument("--fps", type=utils.float_in(0, low_open=True), default=4, help="GIF frames per second")

    p = add("saliency", _cmd_saliency, "saliency map vs SPoT-ON placement (finding 3)")
    _model_flags(p)

    p = add("budget", _cmd_budget, "accuracy vs token budget from oracle.py's results.json")
    p.add_argument("--results", required=True, nargs="+", help="results.json (or folders): a panel each")
    p.add_argument("--metric", choices=tuple(METRICS), default="top1", help="which accuracy")

    p = add("training", lambda args: plot_training_curves(args.runs, args.keys.split(","), args.out),
            "validation accuracy vs training time of train.py runs (retrofitting)")
    p.add_argument("--runs", required=True, nargs="+", help="run folders (metrics.jsonl, run.json)")
    p.add_argument("--keys", default="val_acc,val_acc@16", help="metrics.jsonl fields, a panel each")
    return parser


def main(argv=None):
    """Entry point; argv defaults to sys.argv[1:]. Returns 0; a bad flag, file or dataset
    exits with status 2 and one 'error: ...' line, never a traceback."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        plt.close(args.func(args))
    except (ValueError, utils.DataError) as error:     # a message for the user, not a bug
        parser.exit(2, f"{parser.prog} {args.command}: error: {error}\n")
    print("wrote " + " and ".join(str(path) for path in (args.out, getattr(args, "gif", None)) if path))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
