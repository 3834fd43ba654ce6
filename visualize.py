"""
visualize.py -- pictures of where SPoT's tokens go, and what it buys.

Each function draws one kind of figure and returns the matplotlib Figure (pass path= to also
save it: a PNG when the path has no extension). Read them beside PAPER.md:

    plot_placements         PAPER §1/§2  each token's k x k window at its subpixel position, over
                                         the faint patch grid: off-grid windows straddle grid
                                         cells, which is exactly what a grid cannot do (§1)
    plot_priors             PAPER §3     one panel per spatial prior (the paper's Figure 2)
    plot_trajectories       PAPER §4     SPoT-ON paths: prior start -> oracle end, per token
    save_trajectory_gif     PAPER §4     the same search, animated, for one image
    plot_training_curves    PAPER §5     validation accuracy vs training time: grid ViT, its
                                         retrofit (its clock starts where the grid ViT's ended),
                                         SPoT from scratch
    plot_budget_curves      PAPER §6     accuracy vs token budget, one line per (method, prior);
                                         findings 1 and 2 (off-grid beats grid when sparse;
                                         centre priors win at few tokens, coverage at many)
    plot_saliency_vs_oracle PAPER §6     saliency map vs oracle placements: finding 3 (oracle
                                         tokens lean only slightly toward salient pixels)
    label-free (command)    issue 13     the same N tokens placed by a prior, the learned head,
                                         the label-free entropy search and the label oracle

Try it (the CLI always writes files; it never opens a window):

    python visualize.py priors --image-size 32 --window 4 --tokens 16 --out priors.png
    python visualize.py priors --dataset shapes --tokens 16 --out priors.png   # on a test image
    python visualize.py placements --checkpoint runs/shapes/checkpoint.pt --prior isotropic \\
                                   --tokens 16 --index 0 --oracle-steps 5 --out placements.png
    python visualize.py trajectories --checkpoint runs/shapes/checkpoint.pt --tokens 16 \\
                                     --n-images 4 --out traj.png --gif traj.gif
    python visualize.py budget --results runs/oracle/results.json --out budget.png --metric top1
    python visualize.py table --results runs/grid-eval runs/spot-eval --out table.md  # one table
    python visualize.py training --runs runs/grid-vit runs/retrofit runs/spot --keys val_acc,val_acc@4
    python visualize.py saliency --checkpoint runs/shapes/checkpoint.pt --tokens 16 --out sal.png
    python visualize.py label-free --checkpoint runs/shapes/checkpoint.pt --placer runs/placer/placer.pt

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
import sys
from pathlib import Path

import matplotlib

# No display (a server, CI, a test run): pick the file-only Agg backend before pyplot loads.
if not os.environ.get("DISPLAY") and not os.environ.get("MPLBACKEND"):
    matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.backend_bases import FigureCanvasBase  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

import utils  # noqa: E402
import spot  # noqa: E402

__all__ = ["plot_placements", "plot_trajectories", "plot_priors", "plot_budget_curves",
           "plot_saliency_vs_oracle", "save_trajectory_gif", "main"]

DPI = 150                                   # saved PNGs: sharp, yet a few hundred kB at most
METRICS = {"top1": "top-1 accuracy (%)", "knn": "kNN accuracy (%)"}
WINDOW_COLOR = "#ffd400"                    # token windows: yellow reads on dark and light images
START_COLOR = "#00e5ff"                     # prior / start positions (cyan)
END_COLOR = "#ff2d55"                       # oracle / end positions (red)


# -----------------------------------------------------------------------------
# Input checks: every error names the argument and says what is accepted

def _as_numpy(value):
    if torch.is_tensor(value):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def _image_hwc(image, name="image"):
    """(C, H, W) with C in {1, 3}, float in [0, 1] or uint8 -> numpy (H, W, 3) float in [0, 1].

    A 2-D (H, W) array is taken as a grey image. Floats are clipped to [0, 1] (bilinear
    resizing can overshoot slightly), uint8 is divided by 255.
    """
    array = _as_numpy(image)
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3 or array.shape[0] not in (1, 3) or min(array.shape[1:]) < 1:
        raise ValueError(f"{name} must be (C, H, W) with C = 1 or 3 (or a grey (H, W)), "
                         f"float in [0, 1] or uint8, got shape {tuple(array.shape)}")
    if array.dtype == np.uint8:
        array = array.astype(np.float32) / 255.0
    elif np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ValueError(f"{name} contains NaN or inf; expected floats in [0, 1]")
        array = np.clip(array.astype(np.float32), 0.0, 1.0)
    else:
        raise ValueError(f"{name} must be float in [0, 1] or uint8, got dtype {array.dtype}")
    if array.shape[0] == 1:
        array = np.repeat(array, 3, axis=0)
    return array.transpose(1, 2, 0)


def _positions_array(positions, name="positions", ndim=2):
    """Positions -> numpy float array whose last axis is (y, x); ndim=2 means (N, 2)."""
    array = _as_numpy(positions)
    shapes = {2: "(N, 2)", 3: "(steps + 1, N, 2)", 4: "(steps + 1, B, N, 2)"}
    if array.ndim != ndim or array.shape[-1] != 2 or array.shape[-2] < 1:
        raise ValueError(f"{name} must have shape {shapes[ndim]} holding (y, x) in [0, 1], "
                         f"got {tuple(array.shape)}")
    if not np.issubdtype(array.dtype, np.floating) or not np.isfinite(array).all():
        raise ValueError(f"{name} must be finite floats (y, x) in [0, 1], got dtype "
                         f"{array.dtype} (or NaN/inf values)")
    return array.astype(np.float64)


def _with_default_suffix(path, suffix=".png"):
    """A path without an extension gets `suffix`. matplotlib would add ".png" silently, so the
    file written would not be the one the caller named; appending it here keeps them the same."""
    path = Path(path)
    return path if path.suffix else path.with_name(path.name + suffix)


def _write_atomically(path, write):
    """Call write(temporary path) beside `path`, then rename the result onto `path`.

    A failure mid-write (an error, Ctrl-C, a full disk) leaves the previous file, or none, never
    a half-written one: os.replace within one folder is atomic. The temporary name keeps the
    extension, because matplotlib and Pillow choose the file format from it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _finish(fig, path):
    """Save the figure if path is given (".png" when it has no extension) and return it."""
    if path is not None:
        _write_atomically(_with_default_suffix(path),
                          lambda tmp: fig.savefig(tmp, dpi=DPI, bbox_inches="tight"))
    return fig


# -----------------------------------------------------------------------------
# Drawing primitives, all in pixel units (see "Drawing convention" above)

def _show_image(ax, image_hwc, margin=0.0):
    """imshow with pixel i spanning [i, i+1): extent = (left, right, bottom, top).

    margin (pixels) widens the view beyond the image, so windows that hang over the edge (they
    read zeros there) stay visible; the outside is drawn in a neutral grey."""
    height, width = image_hwc.shape[:2]
    ax.imshow(image_hwc, extent=(0, width, height, 0), interpolation="nearest")
    ax.set_xlim(-margin, width + margin)
    ax.set_ylim(height + margin, -margin)   # y grows downward, like image rows
    ax.set_facecolor("#d9d9d9")
    ax.set_xticks([])
    ax.set_yticks([])


def _draw_grid(ax, height, width, window):
    """The patch grid Ω_grid as faint lines. When k does not divide the image, the grid covers
    only the top-left (H//k)k x (W//k)k pixels (like spot.grid_positions)."""
    rows, cols = height // window, width // window
    for i in range(rows + 1):
        ax.plot([0, cols * window], [i * window] * 2, color="white", lw=0.6, alpha=0.45, zorder=2)
        ax.plot([0, cols * window], [i * window] * 2, color="black", lw=0.6, alpha=0.25,
                ls=(0, (2, 2)), zorder=2)
    for j in range(cols + 1):
        ax.plot([j * window] * 2, [0, rows * window], color="white", lw=0.6, alpha=0.45, zorder=2)
        ax.plot([j * window] * 2, [0, rows * window], color="black", lw=0.6, alpha=0.25,
                ls=(0, (2, 2)), zorder=2)


def _to_pixels(positions, height, width):
    """(..., 2) normalized (y, x) -> (..., 2) pixel-unit (row, col) centres: P = (y H, x W)."""
    return positions * np.array([height, width], dtype=np.float64)


def _draw_windows(ax, centres_px, window, color=WINDOW_COLOR, alpha=1.0, lw=1.3, zorder=3):
    """One square [P - k/2, P + k/2]^2 per token. Rectangle wants its (x, y) corner first."""
    half = window / 2
    for row, col in centres_px:
        ax.add_patch(Rectangle((col - half, row - half), window, window, fill=False,
                               edgecolor=color, lw=lw, alpha=alpha, zorder=zorder))


def _on_grid(centres_px, window, height, width, tol=1e-3):
    """How many centres sit exactly on a grid-cell centre (i + 0.5) k, inside the grid."""
    cell = centres_px / window - 0.5                       # grid index; integer iff on the grid
    on = np.all(np.abs(cell - np.round(cell)) < tol, axis=-1)
    inside = (np.round(cell[:, 0]) >= 0) & (np.round(cell[:, 0]) < height // window) \
        & (np.round(cell[:, 1]) >= 0) & (np.round(cell[:, 1]) < width // window)
    return int((on & inside).sum())


# -----------------------------------------------------------------------------
# PAPER §1/§2: token windows at their subpixel positions

def plot_placements(image, positions, window, grid=True, ax=None, title=None, path=None):
    """Draw each token's k x k window (a square outline) at its subpixel position on the image.

    image:     (C, H, W) float in [0, 1] or uint8 (C = 1 or 3)
    positions: (N, 2) (y, x) window centres in [0, 1]
    window:    k, the token window side in pixels
    grid:      draw the patch grid faintly beneath, so misalignment (PAPER §1) is visible
    ax:        draw into this Axes instead of a new figure
    title:     default "N tokens, k = ..., M on the grid"
    Returns the Figure.
    """
    img = _image_hwc(image)
    height, width = img.shape[:2]
    spot.check_window(window, (height, width))
    centres = _to_pixels(_positions_array(positions), height, width)      # (N, 2) pixel units

    if ax is None:
        fig, ax = plt.subplots(figsize=(4.2, 4.2 * height / width + 0.4))
    fig = ax.figure
    _show_image(ax, img, margin=window / 2)
    if grid:
        _draw_grid(ax, height, width, window)
    _draw_windows(ax, centres, window)
    ax.scatter(centres[:, 1], centres[:, 0], s=14, c=WINDOW_COLOR, edgecolors="black",
               linewidths=0.6, zorder=4)
    if title is None:
        title = (f"{len(centres)} tokens, k = {window}, "
                 f"{_on_grid(centres, window, height, width)} on the grid")
    ax.set_title(title, fontsize=9)
    return _finish(fig, path)


# -----------------------------------------------------------------------------
# PAPER §3: the spatial priors side by side (the paper's Figure 2)

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
    if isinstance(priors, str):
        priors = (priors,)
    priors = list(priors)
    unknown = [p for p in priors if p not in spot.PRIORS]
    if not priors or unknown:
        raise ValueError(f"priors must be a non-empty list of names from {spot.PRIORS}, "
                         f"got {priors!r}")
    if image is not None:
        canvas = _image_hwc(image)
        if canvas.shape[:2] != (height, width):
            raise ValueError(f"image is {canvas.shape[0]}x{canvas.shape[1]} but image_size is "
                             f"{height}x{width}; they must match")
        images = torch.from_numpy(canvas.transpose(2, 0, 1).copy())[None]   # (1, 3, H, W)
    else:
        canvas = np.full((height, width, 3), 0.93, dtype=np.float32)       # light grey page
        images = None
        priors = [p for p in priors if p != "salient"]                      # nothing to be salient
        if not priors:
            raise ValueError("priors=['salient'] needs image=(C, H, W): the salient prior "
                             "samples positions from the image's saliency map")

    cols = min(4, len(priors))
    rows = math.ceil(len(priors) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols, 3.0 * rows * height / width + 0.5),
                             squeeze=False, layout="constrained")
    for ax, prior in zip(axes.flat, priors):
        # A fresh generator per prior: each panel is reproducible on its own.
        generator = torch.Generator().manual_seed(seed)
        try:
            positions = spot.sample_positions(prior, 1, int(n_tokens), (height, width), window,
                                              generator=generator, images=images)[0]
        except ValueError as error:          # e.g. "grid" with more tokens than grid cells
            _show_image(ax, canvas)
            ax.set_title(prior, fontsize=10)
            ax.text(width / 2, height / 2, str(error).split(";")[0][:60], ha="center",
                    va="center", fontsize=6, wrap=True)
            continue
        plot_placements(canvas.transpose(2, 0, 1), positions, window, grid=True, ax=ax,
                        title=prior)
    for ax in list(axes.flat)[len(priors):]:
        ax.axis("off")
    fig.suptitle(f"Spatial priors (PAPER §3): {n_tokens} tokens, {window}x{window} windows, "
                 f"{height}x{width} image", fontsize=11)
    return _finish(fig, path)


# -----------------------------------------------------------------------------
# PAPER §4: SPoT-ON trajectories

def _token_colors(n):
    """n distinct-ish colours: a cyclic colormap, so neighbouring tokens differ."""
    return plt.get_cmap("hsv")(np.linspace(0, 1, n, endpoint=False))


def _draw_trajectory(ax, track_px, window, colors):
    """track_px (steps + 1, N, 2) in pixel units: paths, hollow starts, filled ends, end windows."""
    for n in range(track_px.shape[1]):
        ax.plot(track_px[:, n, 1], track_px[:, n, 0], color=colors[n], lw=1.2, alpha=0.9, zorder=4)
    for n in range(track_px.shape[1]):
        _draw_windows(ax, track_px[-1, n:n + 1], window, color=colors[n], alpha=0.55, lw=0.9)
    ax.scatter(track_px[0, :, 1], track_px[0, :, 0], s=22, facecolors="none",
               edgecolors=colors, linewidths=1.2, zorder=5)
    ax.scatter(track_px[-1, :, 1], track_px[-1, :, 0], s=16, c=colors, edgecolors="black",
               linewidths=0.5, zorder=6)


def _trajectory_legend_handles():
    return [Line2D([], [], ls="none", marker="o", mfc="none", mec="black", label="start (prior)"),
            Line2D([], [], ls="none", marker="o", mfc="grey", mec="black", label="end (oracle)"),
            Line2D([], [], color="grey", lw=1.2, label="path (one colour per token)"),
            Rectangle((0, 0), 1, 1, fill=False, edgecolor="grey", label="final k x k window")]


def plot_trajectories(images, trajectory, window, n_images=4, path=None, titles=None):
    """SPoT-ON's search paths over the first n_images images (PAPER §4).

    images:     (B, C, H, W) float in [0, 1] or uint8
    trajectory: (steps + 1, B, N, 2) positions at every step; trajectory[0] is the prior start,
                trajectory[-1] the oracle's final placement (oracle.OracleResult.trajectory)
    window:     k
    titles:     optional list of at least n_images panel titles (e.g. "label: pred")
    Returns the Figure.
    """
    array = _as_numpy(images)
    if array.ndim != 4:
        raise ValueError(f"images must be (B, C, H, W), got shape {tuple(array.shape)}")
    track = _positions_array(trajectory, "trajectory", ndim=4)            # (S+1, B, N, 2)
    if track.shape[1] != array.shape[0]:
        raise ValueError(f"trajectory has {track.shape[1]} images (axis 1) but images has "
                         f"{array.shape[0]}; trajectory must be (steps + 1, B, N, 2)")
    if isinstance(n_images, bool) or not isinstance(n_images, (int, np.integer)) or n_images < 1:
        raise ValueError(f"n_images must be an int >= 1, got {n_images!r}")
    n_images = min(int(n_images), array.shape[0])
    if titles is not None and (isinstance(titles, str) or len(titles) < n_images):
        raise ValueError(f"titles must be a list of at least n_images={n_images} strings, "
                         f"got {titles!r}")
    height, width = array.shape[-2:]
    spot.check_window(window, (height, width))

    cols = min(4, n_images)
    rows = math.ceil(n_images / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows * height / width + 0.8),
                             squeeze=False, layout="constrained")
    colors = _token_colors(track.shape[2])
    for b, ax in zip(range(n_images), axes.flat):
        img = _image_hwc(array[b], f"images[{b}]")
        track_px = _to_pixels(track[:, b], height, width)                 # (S+1, N, 2)
        _show_image(ax, img, margin=window / 2)
        _draw_grid(ax, height, width, window)
        _draw_trajectory(ax, track_px, window, colors)
        moved = np.linalg.norm(track_px[-1] - track_px[0], axis=-1).mean()
        title = titles[b] if titles is not None else f"image {b}"
        ax.set_title(f"{title}\nmean move {moved:.2f} px in {len(track) - 1} steps", fontsize=9)
    for ax in list(axes.flat)[n_images:]:
        ax.axis("off")
    fig.suptitle("SPoT-ON oracle search (PAPER §4): from prior to oracle placement", fontsize=11)
    fig.legend(handles=_trajectory_legend_handles(), loc="outside lower center", ncol=4,
               fontsize=8, frameon=False)
    return _finish(fig, path)


def save_trajectory_gif(image, trajectory, window, path, fps=4):
    """Animate one image's SPoT-ON search as a GIF: windows move step by step (PAPER §4).

    image:      (C, H, W) float in [0, 1] or uint8
    trajectory: (steps + 1, N, 2) for this one image (e.g. result.trajectory[:, b])
    path:       where to write the .gif (required)
    fps:        frames per second; the final frame is held for an extra second
    Returns the Figure (showing the last frame).
    """
    from matplotlib.animation import PillowWriter

    img = _image_hwc(image)
    height, width = img.shape[:2]
    track = _positions_array(trajectory, "trajectory", ndim=3)            # (S+1, N, 2)
    spot.check_window(window, (height, width))
    if path is None or Path(path).suffix.lower() != ".gif":
        raise ValueError(f"path must be a file name ending in .gif, got {path!r}")
    if not isinstance(fps, (int, float)) or isinstance(fps, bool) or not 0 < fps < math.inf:
        raise ValueError(f"fps must be a finite number > 0, got {fps!r}")
    track_px = _to_pixels(track, height, width)
    colors = _token_colors(track.shape[1])
    fig, ax = plt.subplots(figsize=(4.0, 4.0 * height / width + 0.4))

    def write(tmp):
        # PillowWriter keeps the frames in memory and writes the file when `saving` closes,
        # even when a frame failed: hence the temporary file (see _write_atomically).
        writer = PillowWriter(fps=fps)
        with writer.saving(fig, str(tmp), dpi=100):
            for step in range(len(track_px)):
                # Redraw from scratch each frame: simplest, and cheap at these sizes.
                ax.clear()
                _show_image(ax, img, margin=window / 2)
                _draw_grid(ax, height, width, window)
                _draw_trajectory(ax, track_px[: step + 1], window, colors)
                ax.set_title(f"SPoT-ON step {step} / {len(track_px) - 1}", fontsize=10)
                writer.grab_frame()
            for _ in range(int(math.ceil(fps))):          # hold the result for about a second
                writer.grab_frame()

    _write_atomically(path, write)
    return fig


# -----------------------------------------------------------------------------
# PAPER §6: accuracy vs token budget

# Method -> (line style, marker, legend name). Every oracle variant is dashed in some way.
METHOD_STYLES = {
    "prior": ("-", "o", "prior"),
    "spot-on": ("--", "s", "SPoT-ON (label oracle)"),
    "spot-on-entropy": ((0, (1, 1.5)), "^", "SPoT-ON (entropy oracle)"),
    "spot-on-snapped": ((0, (5, 2, 1, 2)), "v", "SPoT-ON snapped to grid"),
    "spot-on-transfer": ((0, (6, 3)), "D", "SPoT-ON transferred"),
    "spot-learned": ((0, (3, 1, 1, 1)), "P", "SPoT-learned (glance + place)"),
}
PRIOR_COLORS = {"uniform": "#1f77b4", "gaussian": "#ff7f0e", "sobol": "#2ca02c",
                "isotropic": "#d62728", "center": "#9467bd", "salient": "#8c564b",
                "grid": "black"}


def _load_results(results):
    """A results dict, or a path to results.json (or to the folder holding it) -> dict."""
    if isinstance(results, (str, os.PathLike)):
        file = Path(results)
        if file.is_dir():
            file = file / "results.json"
        if not file.is_file():
            raise ValueError(f"results must be a dict or the path of an existing results.json "
                             f"(as oracle.py writes), but {file} does not exist")
        try:
            results = json.loads(file.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"results file {file} is not valid JSON: {error}") from None
    if not isinstance(results, dict):
        raise ValueError(f"results must be a dict or a path to results.json, "
                         f"got {type(results).__name__}")
    rows = results.get("rows")
    if not isinstance(rows, list) or not rows:
        raise ValueError("results must hold a non-empty 'rows' list of {'method', 'prior', "
                         "'tokens', 'top1', 'knn'} dicts (the schema oracle.py writes)")
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not {"method", "prior", "tokens"} <= set(row):
            raise ValueError(f"results['rows'][{i}] must be a dict with at least 'method', "
                             f"'prior' and 'tokens', got {row!r}")
    return results


def plot_budget_curves(results, path=None, metric="top1", ax=None):
    """Accuracy vs number of tokens (log2 axis), one line per (method, prior) -- PAPER §6.

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

    # Group into lines: (method, prior) -> {tokens: value}
    lines, bands = {}, {}           # (method, prior) -> {tokens: value} / {tokens: (low, high)}
    for row in results["rows"]:
        value = row.get(metric)
        if value is None:
            continue
        key, tokens = (row["method"], row["prior"]), int(row["tokens"])
        lines.setdefault(key, {})[tokens] = float(value)
        if row.get(f"{metric}_low") is not None:             # the row's 95 % interval
            bands.setdefault(key, {})[tokens] = (row[f"{metric}_low"], row[f"{metric}_high"])
    if not lines:
        raise ValueError(f"results has no non-null {metric!r} values to plot; "
                         f"try metric={'knn' if metric == 'top1' else 'top1'!r}")

    own_figure = ax is None
    if own_figure:
        fig, ax = plt.subplots(figsize=(7.5, 4.8))
    fig = ax.figure
    method_order = list(METHOD_STYLES)
    prior_order = list(spot.PRIORS)

    def order(key):
        method, prior = key
        return (method_order.index(method) if method in method_order else len(method_order),
                prior_order.index(prior) if prior in prior_order else len(prior_order), prior)

    extra_colors = iter(plt.get_cmap("tab10").colors[::-1])
    for method, prior in sorted(lines, key=order):
        points = sorted(lines[(method, prior)].items())
        tokens, values = zip(*points)
        style, marker, name = METHOD_STYLES.get(method, ((0, (3, 1)), "x", method))
        color = PRIOR_COLORS.get(prior) or next(extra_colors, "grey")
        baseline = method == "prior" and prior == "grid"
        label = "patch grid (ViT baseline)" if baseline else f"{name}: {prior}"
        ax.plot(tokens, values, ls=style, marker=marker, color=color, ms=5,
                lw=2.6 if baseline else 1.5, zorder=5 if baseline else 3, label=label)
        band = bands.get((method, prior), {})
        if len(band) == len(tokens):                          # shade the 95 % intervals
            ax.fill_between(tokens, *zip(*(band[t] for t in tokens)), color=color, alpha=0.12, lw=0)

    all_tokens = sorted({t for line in lines.values() for t in line})
    ax.set_xscale("log", base=2)
    ax.set_xticks(all_tokens)
    ax.set_xticklabels([str(t) for t in all_tokens])
    ax.minorticks_off()
    ax.set_xlabel("tokens per image (log2 scale)")
    ax.set_ylabel(METRICS[metric])
    ax.grid(True, alpha=0.3)
    settings = results.get("settings") or {}
    where = ", ".join(f"{k}={settings[k]}" for k in ("run", "dataset", "split") if k in settings) \
        or settings.get("checkpoint", "")
    ax.set_title(f"{METRICS[metric].split(' (')[0]} vs token budget (PAPER §6)"
                 + (f"\n{where}" if where else ""), fontsize=10)
    if own_figure:
        ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8, frameon=False)
    else:                               # a panel of a bigger figure: the legend goes below it
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, fontsize=7, frameon=False)
    if own_figure:                      # never re-layout a figure the caller owns
        fig.tight_layout()
    return _finish(fig, path)


# -----------------------------------------------------------------------------
# PAPER §5: training curves (the grid ViT, its retrofit, SPoT from scratch)

def _load_run(run):
    """A run folder (metrics.jsonl, run.json as train.py writes them) -> (name, epochs, args)."""
    folder = Path(run)
    if folder.is_file():
        folder = folder.parent
    metrics = folder / "metrics.jsonl"
    if not metrics.is_file():
        raise ValueError(f"{folder} holds no metrics.jsonl (pass run folders written by train.py)")
    lines = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    epochs = [m for m in lines if not m.get("final") and not m.get("partial")]
    info = folder / "run.json"
    args = json.loads(info.read_text()).get("args", {}) if info.is_file() else {}
    return folder.name, epochs, args


def plot_training_curves(runs, keys=("val_acc", "val_acc@16"), path=None):
    """Validation accuracy vs training time, one line per run, one panel per metric -- PAPER §5.

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
            if points:
                minutes, values = zip(*((t / 60, v) for t, v in points))
                ax.plot(minutes, values, marker="o", ms=3,
                        label=name + (f" (from {source})" if parent else ""))
        ax.set_xlabel("training time (minutes on the CPU of the runs)")
        ax.set_ylabel(f"{key} (%)")
        ax.set_title("validation, full grid" if key == "val_acc" else
                     f"validation, {key.split('@')[-1]} isotropic tokens", fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _finish(fig, path)


# -----------------------------------------------------------------------------
# PAPER §6, finding 3: do oracle tokens go where the saliency is?

def plot_saliency_vs_oracle(image, positions, start_positions=None, window=None, path=None):
    """The image's saliency map beside the image, with the oracle's final positions on both.

    image:           (C, H, W) float in [0, 1] or uint8
    positions:       (N, 2) the oracle's final positions
    start_positions: optional (N, 2) where the search started (drawn hollow)
    window:          optional k: draw the oracle windows, and measure saliency over each window
                     (otherwise at the centre point)
    The title reports the mean saliency the tokens read relative to the map's mean: 1.0x means
    no preference for salient pixels, 2.0x twice as salient as a random spot (PAPER finding 3).
    Returns the Figure.
    """
    img = _image_hwc(image)
    height, width = img.shape[:2]
    end = _positions_array(positions)
    start = None if start_positions is None else _positions_array(start_positions,
                                                                  "start_positions")
    if window is not None:
        spot.check_window(window, (height, width))

    import oracle  # lazily: only this figure needs oracle.saliency_read

    tensor = torch.from_numpy(img.transpose(2, 0, 1).copy())[None]        # (1, 3, H, W)
    saliency = spot.saliency_map(tensor)[0]                               # (H, W), sums to 1
    mean = saliency.mean().item()
    # Saliency read / image mean (no window: the map's value at each centre, a 1 x 1 window).
    ratio = lambda pos: oracle.saliency_read(None, torch.as_tensor(pos).float()[None], window or 1,
                                             saliency[None]).item()
    report = f"saliency read / image mean: oracle {ratio(end):.2f}x"
    if start is not None:
        report += f", start {ratio(start):.2f}x"

    fig, axes = plt.subplots(1, 2, figsize=(8.4, 4.2 * height / width + 0.9), layout="constrained")
    _show_image(axes[0], img, margin=(window or 0) / 2)
    axes[0].set_title("image", fontsize=9)
    # The map is drawn in units of its own mean, so the colour bar reads like the title's ratios.
    shown = axes[1].imshow(saliency.numpy() / mean, extent=(0, width, height, 0),
                           cmap="magma", interpolation="nearest")
    axes[1].set_xlim(axes[0].get_xlim())
    axes[1].set_ylim(axes[0].get_ylim())
    axes[1].set_facecolor("#d9d9d9")
    axes[1].set_xticks([])
    axes[1].set_yticks([])
    axes[1].set_title("spectral-residual saliency (x image mean)", fontsize=9)

    end_px = _to_pixels(end, height, width)
    for ax in axes:
        if window is not None:
            _draw_windows(ax, end_px, window, color=END_COLOR, alpha=0.7, lw=0.9)
        if start is not None:
            start_px = _to_pixels(start, height, width)
            ax.scatter(start_px[:, 1], start_px[:, 0], s=24, facecolors="none",
                       edgecolors=START_COLOR, linewidths=1.2, zorder=5)
            for a, b in zip(start_px, end_px):            # thin arrows start -> end
                ax.plot([a[1], b[1]], [a[0], b[0]], color="white", lw=0.6, alpha=0.7, zorder=4)
        ax.scatter(end_px[:, 1], end_px[:, 0], s=18, c=END_COLOR, edgecolors="black",
                   linewidths=0.5, zorder=6)
    handles = [Line2D([], [], ls="none", marker="o", mfc=END_COLOR, mec="black",
                      label="oracle position")]
    if start is not None:
        handles.insert(0, Line2D([], [], ls="none", marker="o", mfc="none", mec=START_COLOR,
                                 label="start (prior)"))
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=8,
               frameon=False)
    fig.suptitle(f"Saliency vs oracle placement (PAPER §6, finding 3)\n{report}", fontsize=10)
    # One colour bar for both panels (constrained layout keeps the panels the same size).
    fig.colorbar(shown, ax=list(axes), fraction=0.025, pad=0.02)
    return _finish(fig, path)


# -----------------------------------------------------------------------------
# Command line

# What --out may end in: every format matplotlib saves without extra software, PNG first.
IMAGE_FORMATS = ("png", *sorted(set(FigureCanvasBase.get_supported_filetypes()) - {"png"}))


def _output_path(parser, flag, path, formats):
    """--out / --gif, checked at parse time -> the Path that will be written: no extension means
    formats[0], and its folder is created and proven writable (utils.check_out_dir)."""
    if Path(path).is_dir():
        parser.error(f"{flag}: {path} is a folder; name a file inside it")
    path = _with_default_suffix(path, "." + formats[0])
    if path.suffix.lower()[1:] not in formats:
        parser.error(f"{flag}: {path} must end in one of .{', .'.join(formats)}")
    try:
        utils.check_out_dir(path.parent, flag)
    except ValueError as error:
        parser.error(f"{error} (to write {path})")
    return path


# ImageNet class folders are WordNet ids; figures title them by name (Imagenette's ten classes).
WORDNET_NAMES = {"n01440764": "tench", "n02102040": "English springer", "n02979186": "cassette player",
                 "n03000684": "chain saw", "n03028079": "church", "n03394916": "French horn",
                 "n03417042": "garbage truck", "n03425413": "gas pump", "n03445777": "golf ball",
                 "n03888257": "parachute"}


def _model_and_test_split(checkpoint):
    """Checkpoint -> (model, test split, class names) of the dataset the model was trained on
    (named by the train args inside the checkpoint). data.load_model_and_data reads the file
    once, with weights_only=True, and words every failure as a message naming the file."""
    import data
    model, dataset, _ = data.load_model_and_data(checkpoint)
    return model, dataset.test, [WORDNET_NAMES.get(name, name) for name in dataset.classes]


def _pick(split, first, count=1):
    """Test images [first, first + count) as floats in [0, 1], and their labels."""
    if first + count > len(split.labels):
        raise ValueError(f"--index {first}" + (f" with --n-images {count}" if count > 1 else "")
                         + f" reaches past the {len(split.labels)} images of this test split")
    return split.images[first:first + count].float() / 255, split.labels[first:first + count]


def _start_positions(model, prior, tokens, images, seed):
    generator = torch.Generator().manual_seed(seed)
    return spot.sample_positions(prior, len(images), tokens, model.config.image_size,
                                 model.config.window, generator=generator, images=images)


def _search(model, images, labels, positions, objective, steps, lr):
    """oracle.oracle_search with only the options the user gave (else oracle.py's defaults)."""
    import oracle

    options = {name: value for name, value in (("steps", steps), ("lr", lr)) if value is not None}
    return oracle.oracle_search(model, images, labels, positions, objective=objective, **options)


def _predict(model, images, positions):
    with torch.no_grad():
        return model(images, positions).argmax(-1)


def _cmd_priors(args):
    image, image_size = None, args.image_size or 32
    if args.dataset is not None:
        import data

        dataset = data.load_dataset(args.dataset, args.data_dir, image_size=args.image_size,
                                    progress=False)
        image = _pick(dataset.test, args.index)[0][0]
        image_size = tuple(image.shape[-2:])
    plt.close(plot_priors(image_size, args.window, args.tokens, priors=args.priors, image=image,
                          seed=args.seed, path=args.out))


def _cmd_placements(args):
    model, split, classes = _model_and_test_split(args.checkpoint)
    images, labels = _pick(split, args.index)
    start = _start_positions(model, args.prior, args.tokens, images, args.seed)
    panels = [(f"prior '{args.prior}'", start)]
    if args.oracle_steps > 0:
        found = _search(model, images, labels, start, args.objective, args.oracle_steps, args.lr)
        panels.append((f"SPoT-ON, {args.oracle_steps} steps", found.positions.detach()))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.8), squeeze=False,
                             layout="constrained")
    for ax, (name, positions) in zip(axes[0], panels):
        pred = _predict(model, images, positions)[0].item()
        plot_placements(images[0], positions[0], model.config.window, ax=ax,
                        title=f"{name}\npredicted '{classes[pred]}'")
    fig.suptitle(f"test image {args.index}, label '{classes[labels[0].item()]}', "
                 f"{args.tokens} tokens", fontsize=10)
    plt.close(_finish(fig, args.out))


def _cmd_trajectories(args):
    model, split, classes = _model_and_test_split(args.checkpoint)
    images, labels = _pick(split, args.index, args.n_images)
    start = _start_positions(model, args.prior, args.tokens, images, args.seed)
    trajectory = _search(model, images, labels, start, args.objective, args.steps,
                         args.lr).trajectory.detach()
    before = _predict(model, images, trajectory[0])
    after = _predict(model, images, trajectory[-1])
    titles = [f"#{args.index + i} '{classes[y]}': predicted {classes[p]} -> {classes[q]}"
              for i, (y, p, q) in enumerate(zip(labels.tolist(), before.tolist(), after.tolist()))]
    window = model.config.window
    plt.close(plot_trajectories(images, trajectory, window, n_images=args.n_images,
                                titles=titles, path=args.out))
    if args.gif:
        plt.close(save_trajectory_gif(images[0], trajectory[:, 0], window, args.gif,
                                      fps=args.fps))


def _cmd_label_free(args):
    """Issue 13: one row per test image, one column per way of placing the same N tokens --
    the prior, the learned glance-then-place head (with --placer), the label-free entropy
    search, and the label oracle (the only column that reads the label)."""
    model, split, classes = _model_and_test_split(args.checkpoint)
    images, labels = _pick(split, args.index, args.n_images)
    start = _start_positions(model, args.prior, args.tokens, images, args.seed)
    columns = [(f"prior '{args.prior}'", start)]
    if args.placer:
        from experiments import placement

        placer = placement.load_placer(args.placer)[0]
        try:
            placement.check_fits(placer, model)
        except ValueError as error:
            raise ValueError(f"--placer {args.placer}: {error}") from None
        with torch.no_grad():
            columns.append(("SPoT-learned (label-free)", placement.place(model, placer, images, args.tokens)))
    for name, objective, y in (("entropy search (label-free)", "entropy", None),
                               ("SPoT-ON (label oracle)", "label", labels)):
        columns.append((name, _search(model, images, y, start, objective, args.steps, args.lr)
                        .positions.detach()))
    fig, axes = plt.subplots(len(images), len(columns), squeeze=False, layout="constrained",
                             figsize=(3.3 * len(columns), 3.6 * len(images)))
    for column, (name, positions) in enumerate(columns):
        predictions = _predict(model, images, positions)
        for row in range(len(images)):
            verdict = "right" if predictions[row] == labels[row] else "wrong"
            plot_placements(images[row], positions[row], model.config.window, ax=axes[row, column],
                            title=f"{name}\n'{classes[predictions[row]]}' ({verdict})")
            if column == 0:
                axes[row, 0].set_ylabel(f"#{args.index + row} '{classes[labels[row]]}'", fontsize=9)
    fig.suptitle(f"{args.tokens} tokens each, the same model; only the oracle reads the label",
                 fontsize=10)
    plt.close(_finish(fig, args.out))


def _cmd_budget(args):
    if len(args.results) == 1:
        plt.close(plot_budget_curves(args.results[0], path=args.out, metric=args.metric))
        return
    # Several models (e.g. grid ViT, retrofit, SPoT from scratch): one panel each, shared y axis.
    fig, axes = plt.subplots(1, len(args.results), figsize=(5.5 * len(args.results), 6.5), sharey=True)
    for ax, results in zip(axes, args.results):
        plot_budget_curves(results, metric=args.metric, ax=ax)
    fig.tight_layout()
    plt.close(_finish(fig, args.out))


def _cmd_training(args):
    plt.close(plot_training_curves(args.runs, keys=args.keys.split(","), path=args.out))


def _cmd_table(args):
    import oracle                       # (its imports are heavier than this file's other commands)

    text = oracle.combined_markdown([_load_results(results) for results in args.results])
    utils.write_atomic(args.out, text)


def _cmd_saliency(args):
    model, split, classes = _model_and_test_split(args.checkpoint)
    images, labels = _pick(split, args.index)
    start = _start_positions(model, args.prior, args.tokens, images, args.seed)
    found = _search(model, images, labels, start, args.objective, args.steps, args.lr)
    plt.close(plot_saliency_vs_oracle(images[0], found.positions.detach()[0], start[0],
                                      window=model.config.window, path=args.out))


def build_parser():
    parser = argparse.ArgumentParser(
        prog="visualize.py", description=__doc__.split("\n\n")[0].strip(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Every command writes a figure (--out; no extension means .png) and never opens "
               "a window. Run 'python visualize.py COMMAND --help' for a command's options.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    count, index = utils.int_at_least(1), utils.int_at_least(0)

    def add(name, help_text, func, out):
        sub = commands.add_parser(name, help=help_text, description=help_text,
                                  formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        sub.set_defaults(func=func)
        sub.add_argument("--out", default=out, help="output figure (.png, .pdf, .svg, ...)")
        return sub

    def add_search_options(sub, steps_flag="--steps", steps_default=None,
                           steps_help="oracle optimizer steps (default: oracle.py's)", objective=True):
        if objective:
            sub.add_argument("--objective", choices=("label", "entropy"), default="label",
                             help="oracle objective: the true label, or label-free prediction entropy")
        sub.add_argument(steps_flag, type=index, default=steps_default, help=steps_help)
        sub.add_argument("--lr", type=utils.float_in(0, low_open=True), default=None,
                         help="oracle learning rate in [0, 1] units (default: oracle.py's)")

    def add_model_options(sub):
        sub.add_argument("--checkpoint", required=True, help="checkpoint written by train.py")
        sub.add_argument("--prior", choices=spot.PRIORS, default="isotropic",
                         help="prior the tokens (and the oracle search) start from")
        sub.add_argument("--tokens", type=count, default=16, help="tokens per image")
        sub.add_argument("--index", type=index, default=0, help="(first) test image index")
        sub.add_argument("--seed", type=int, default=0, help="seed of the random priors")

    p = add("priors", "gallery of the spatial priors (PAPER §3, Figure 2)", _cmd_priors,
            "priors.png")
    p.add_argument("--image-size", type=count, default=None,
                   help="canvas size in pixels (default 32, or the dataset's size)")
    p.add_argument("--window", type=count, default=4, help="token window k in pixels")
    p.add_argument("--tokens", type=count, default=16, help="tokens per prior")
    p.add_argument("--priors", type=utils.name_list(spot.PRIORS), default=list(spot.PRIORS),
                   help="comma-separated prior names")
    p.add_argument("--dataset", default=None, help="draw on a test image of this dataset "
                   "(shapes, cifar10, folder); enables the 'salient' prior")
    p.add_argument("--data-dir", default=None, help="dataset folder (cifar10, folder)")
    p.add_argument("--index", type=index, default=0, help="test image index (with --dataset)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random priors")

    p = add("placements", "token windows on a test image, before/after the oracle (PAPER §1/§2)",
            _cmd_placements, "placements.png")
    add_model_options(p)
    add_search_options(p, "--oracle-steps", 0, "also run SPoT-ON for this many steps and show "
                       "the result beside (0: no search)")

    p = add("trajectories", "SPoT-ON search paths on test images (PAPER §4)", _cmd_trajectories,
            "trajectories.png")
    add_model_options(p)
    add_search_options(p)
    p.add_argument("--n-images", type=count, default=4, help="how many test images")
    p.add_argument("--gif", default=None, help="also animate the first image into this .gif")
    p.add_argument("--fps", type=utils.float_in(0, low_open=True), default=4, help="GIF frames per second")

    p = add("label-free", "label-free placements (prior, learned head, entropy search) vs the "
            "label oracle's on test images (issue 13)", _cmd_label_free, "label_free.png")
    add_model_options(p)
    add_search_options(p, objective=False)          # both searches run, one per objective
    p.add_argument("--placer", default=None, help="placer.pt from placement.py: adds its column")
    p.add_argument("--n-images", type=count, default=3, help="how many test images (rows)")

    p = add("budget", "accuracy vs token budget from oracle.py's results.json (PAPER §6)",
            _cmd_budget, "budget.png")
    p.add_argument("--results", required=True, nargs="+",
                   help="results.json (or the folder holding it); several: one panel each")
    p.add_argument("--metric", choices=tuple(METRICS), default="top1", help="which accuracy")

    p = add("training", "validation accuracy vs training time of train.py runs (PAPER §5)",
            _cmd_training, "training.png")
    p.add_argument("--runs", required=True, nargs="+", help="run folders (metrics.jsonl, run.json)")
    p.add_argument("--keys", default="val_acc,val_acc@16",
                   help="metrics.jsonl fields, one panel each (comma-separated)")

    p = add("table", "one markdown table of PAPER §6 for several models' results.json",
            _cmd_table, "table.md")
    p.add_argument("--results", required=True, nargs="+",
                   help="results.json files (or their folders), one per model, in table order")

    p = add("saliency", "saliency map vs oracle placement (PAPER §6, finding 3)", _cmd_saliency,
            "saliency.png")
    add_model_options(p)
    add_search_options(p)
    return parser


def main(argv=None):
    """Entry point; argv defaults to sys.argv[1:]. Returns 0; a bad flag, file or dataset
    exits with status 2 and one 'error: ...' line, never a traceback."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.out = _output_path(parser, "--out", args.out, ("md",) if args.command == "table" else IMAGE_FORMATS)
    if getattr(args, "gif", None):
        args.gif = _output_path(parser, "--gif", args.gif, ("gif",))
    try:
        args.func(args)
    except Exception as error:
        import data  # its DataError (missing data) is a message for the user, like ValueError

        if not isinstance(error, (ValueError, data.DataError)):
            raise
        parser.exit(2, f"{parser.prog} {args.command}: error: {error}\n")
    print("wrote " + " and ".join(str(path) for path in (args.out, getattr(args, "gif", None))
                                  if path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
