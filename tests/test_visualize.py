"""Tests for visualize.py: every figure is a real, non-blank PNG, and bad input is a clear
ValueError. Synthetic inputs only (random images, hand-made trajectories), so the whole file
runs in a few seconds. (The figures of RESULTS.md's findings, experiments/figures.py, among them
finding 3's saliency figure: tests/test_figures.py, which reuses the helpers here.)"""
import dataclasses
import types

import matplotlib

matplotlib.use("Agg")

import matplotlib.image as mpimg  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import spot  # noqa: E402
import visualize  # noqa: E402
from visualize import (main, plot_placements, plot_priors, plot_trajectories,  # noqa: E402
                       save_trajectory_gif)

H = W = 32
K = 4


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


@pytest.fixture
def image():
    return torch.rand(3, H, W, generator=torch.Generator().manual_seed(0))


@pytest.fixture
def trajectory():
    """(steps + 1, B, N, 2): 2 images, 5 tokens each, drifting 4 steps from an even start."""
    gen = torch.Generator().manual_seed(1)
    start = torch.rand(2, 5, 2, generator=gen) * 0.8 + 0.1
    drift = (torch.rand(2, 5, 2, generator=gen) - 0.5) * 0.05
    return torch.stack([start + s * drift for s in range(5)])


def assert_png(path):
    """The file exists, decodes as an image, and is not a single flat colour."""
    assert path.is_file() and path.stat().st_size > 0
    pixels = mpimg.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 50 and pixels.shape[1] > 50
    assert pixels[..., :3].var() > 1e-4


# -----------------------------------------------------------------------------
# plot_placements

def test_placements_png(tmp_path, image):
    positions = spot.sample_positions("uniform", 1, 9, H, K,
                                      generator=torch.Generator().manual_seed(0))[0]
    fig = plot_placements(image, positions, K, path=tmp_path / "p.png")
    assert isinstance(fig, matplotlib.figure.Figure)
    assert_png(tmp_path / "p.png")


def test_placements_accepts_uint8_grey_and_numpy(tmp_path):
    grey = (np.random.default_rng(0).random((1, 20, 28)) * 255).astype(np.uint8)
    plot_placements(grey, np.array([[0.5, 0.5]]), 3, grid=False, path=tmp_path / "g.png")
    assert_png(tmp_path / "g.png")


def test_grid_centre_window_covers_exactly_its_cell(image):
    """A token at grid centre (i + 0.5) k / H draws the square [i k, (i + 1) k] (pixel units)."""
    positions = spot.grid_positions(H, K)                      # (64, 2), row-major
    fig = plot_placements(image, positions, K)
    ax = fig.axes[0]
    squares = [p for p in ax.patches if isinstance(p, matplotlib.patches.Rectangle)]
    assert len(squares) == len(positions)
    for n, square in enumerate(squares):
        row, col = divmod(n, W // K)
        assert square.get_xy() == pytest.approx((col * K, row * K))
        assert square.get_width() == square.get_height() == K
    assert "64 on the grid" in ax.get_title()
    # The image's extent puts pixel i on [i, i+1): left 0, right W, bottom H, top 0.
    assert ax.images[0].get_extent() == [0, W, H, 0]


def test_placements_draws_into_given_axes(image):
    fig, axes = plt.subplots(1, 2)
    out = plot_placements(image, torch.tensor([[0.3, 0.7]]), K, ax=axes[1], title="mine")
    assert out is fig and axes[1].get_title() == "mine"


@pytest.mark.parametrize("kwargs, match", [
    ({"positions": torch.rand(5, 3)}, "positions"),
    ({"positions": torch.rand(2, 5, 2)}, "positions"),
    ({"positions": torch.tensor([[float("nan"), 0.5]])}, "positions"),
    ({"window": 0}, "window"),
    ({"window": 2.5}, "window"),
    ({"window": 64}, "window"),
    ({"image": torch.rand(2, H, W)}, "image"),
    ({"image": torch.rand(4, 3, H, W)}, "image"),
])
def test_placements_rejects_bad_input(image, kwargs, match):
    args = {"image": image, "positions": torch.rand(4, 2), "window": K, **kwargs}
    with pytest.raises(ValueError, match=match):
        plot_placements(**args)


# -----------------------------------------------------------------------------
# plot_priors

def test_priors_gallery_blank_canvas_skips_salient(tmp_path):
    fig = plot_priors(H, K, 16, path=tmp_path / "priors.png")
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert "salient" not in titles and {"uniform", "isotropic", "grid"} <= set(titles)
    assert_png(tmp_path / "priors.png")


def test_priors_gallery_on_image_includes_salient(tmp_path, image):
    fig = plot_priors(H, K, 9, priors=("salient", "center"), image=image, seed=3,
                      path=tmp_path / "priors.png")
    assert [ax.get_title() for ax in fig.axes if ax.get_title()] == ["salient", "center"]
    assert_png(tmp_path / "priors.png")


def test_priors_grid_with_too_many_tokens_is_a_note_not_a_crash(tmp_path):
    plot_priors(16, 8, 9, priors=("grid", "isotropic"), path=tmp_path / "p.png")  # 4 cells only
    assert_png(tmp_path / "p.png")


@pytest.mark.parametrize("kwargs, match", [
    ({"priors": ("uniform", "nope")}, "priors"),
    ({"priors": ()}, "priors"),
    ({"priors": ("salient",)}, "salient"),
    ({"window": 0}, "window"),
    ({"n_tokens": 0}, "n_tokens"),
    ({"image_size": 0}, "image_size"),
    ({"image": torch.rand(3, 16, 16)}, "image"),
])
def test_priors_rejects_bad_input(kwargs, match):
    args = {"image_size": H, "window": K, "n_tokens": 8, **kwargs}
    with pytest.raises(ValueError, match=match):
        plot_priors(**args)


# -----------------------------------------------------------------------------
# plot_trajectories and the GIF

def test_trajectories_png(tmp_path, trajectory):
    images = torch.rand(2, 3, H, W)
    fig = plot_trajectories(images, trajectory, K, n_images=4, titles=["a", "b"],
                            path=tmp_path / "t.png")
    assert fig.legends, "the figure explains its markers"
    assert fig.axes[0].get_title().startswith("a")
    assert_png(tmp_path / "t.png")


@pytest.mark.parametrize("kwargs, match", [
    ({"trajectory": torch.rand(5, 2, 5)}, "trajectory"),
    ({"trajectory": torch.rand(5, 3, 5, 2)}, "trajectory"),
    ({"images": torch.rand(3, H, W)}, "images"),
    ({"window": -1}, "window"),
    ({"n_images": 0}, "n_images"),
    ({"titles": ["only one"]}, "titles"),
])
def test_trajectories_rejects_bad_input(trajectory, kwargs, match):
    args = {"images": torch.rand(2, 3, H, W), "trajectory": trajectory, "window": K, **kwargs}
    with pytest.raises(ValueError, match=match):
        plot_trajectories(**args)


def test_trajectory_gif(tmp_path, image, trajectory):
    from PIL import Image

    path = tmp_path / "t.gif"
    save_trajectory_gif(image, trajectory[:, 0], K, path, fps=8)
    with Image.open(path) as gif:
        assert gif.format == "GIF" and gif.n_frames >= 5     # 5 steps (+ held final frames)
        gif.seek(0)
        first = np.asarray(gif.convert("RGB"), dtype=np.float32)
    assert first.var() > 1e-4


@pytest.mark.parametrize("existing", [False, True])
def test_gif_failing_mid_write_leaves_no_partial_file(tmp_path, monkeypatch, image, trajectory,
                                                      existing):
    """A frame fails after the first: the target holds what it held before (nothing, or the
    old GIF), and no temporary file is left behind."""
    from matplotlib.animation import PillowWriter

    path = tmp_path / "t.gif"
    if existing:
        path.write_bytes(b"the previous gif")
    grab_frame = PillowWriter.grab_frame
    calls = []

    def failing_grab_frame(self, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("disk full")
        grab_frame(self, **kwargs)
    monkeypatch.setattr(PillowWriter, "grab_frame", failing_grab_frame)
    with pytest.raises(RuntimeError, match="disk full"):
        save_trajectory_gif(image, trajectory[:, 0], K, path)
    assert [p.name for p in tmp_path.iterdir()] == (["t.gif"] if existing else [])
    if existing:
        assert path.read_bytes() == b"the previous gif"


@pytest.mark.parametrize("kwargs, match", [
    ({"path": "out.png"}, "path"),
    ({"fps": 0}, "fps"),
    ({"trajectory": torch.rand(5, 2, 5, 2)}, "trajectory"),
    ({"window": 0}, "window"),
])
def test_gif_rejects_bad_input(tmp_path, image, trajectory, kwargs, match):
    args = {"image": image, "trajectory": trajectory[:, 0], "window": K,
            "path": tmp_path / "t.gif", **kwargs}
    with pytest.raises(ValueError, match=match):
        save_trajectory_gif(**args)


# -----------------------------------------------------------------------------
# CLI

def test_cli_priors(tmp_path, capsys):
    out = tmp_path / "priors.png"
    assert main(["priors", "--image-size", "32", "--window", "4", "--tokens", "16",
                 "--out", str(out)]) == 0
    assert_png(out)
    assert capsys.readouterr().out.strip() == f"wrote {out}"


def test_cli_says_the_name_it_really_wrote(tmp_path, capsys):
    """matplotlib appends .png to a name without an extension: 'wrote' must name that file."""
    main(["priors", "--tokens", "4", "--priors", "isotropic", "--out", str(tmp_path / "fig")])
    assert_png(tmp_path / "fig.png")
    assert capsys.readouterr().out.strip() == f"wrote {tmp_path / 'fig.png'}"
    main(["priors", "--tokens", "4", "--priors", "isotropic", "--out", str(tmp_path / "fig.svg")])
    assert (tmp_path / "fig.svg").read_text().lstrip().startswith("<?xml")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fig.png", "fig.svg"]   # no leftovers


def exit_message(capsys, argv, main=main):
    """Run main(argv) (visualize's, or another script's), expecting a clean failure: exit status
    2 and one 'error:' message."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "error:" in err and "Traceback" not in err
    return err


def test_cli_errors_are_messages_not_tracebacks(tmp_path, capsys):
    assert "window" in exit_message(capsys, ["priors", "--image-size", "8", "--window", "16",
                                             "--out", str(tmp_path / "p.png")])


@pytest.mark.parametrize("flag, value", [
    ("--tokens", "0"), ("--tokens", "two"), ("--tokens", "4,8"), ("--tokens", "4-16"),
    ("--index", "-1"), ("--n-images", "0"), ("--search-steps", "-1"), ("--steps", "-1"),
    ("--search-lr", "0"), ("--search-lr", "inf"), ("--search-lr", "nan"), ("--fps", "nan"),
    ("--search-from", "nowhere"), ("--lr", "0.01"),      # the search's old --lr is gone, not aliased
    ("--out", "{tmp}/fig.v2"),
    ("--out", "{tmp}/a_file/fig.png"),      # its folder would be a file
    ("--out", "{tmp}"),                     # a folder, not a file name
    ("--gif", "{tmp}/anim.png"),
])
def test_cli_checks_flags_before_loading_anything(tmp_path, capsys, monkeypatch, flag, value):
    """Every bad flag is reported by name at parse time: the checkpoint (which does not even
    exist here) is never opened."""
    import data

    def must_not_load(*args, **kwargs):
        raise AssertionError("loaded the checkpoint before checking the flags")
    monkeypatch.setattr(data, "load_model_and_data", must_not_load)
    (tmp_path / "a_file").write_text("")
    argv = ["trajectories", "--checkpoint", str(tmp_path / "none.pt"),
            "--out", str(tmp_path / "t.png"), flag, value.format(tmp=tmp_path)]
    assert flag in exit_message(capsys, argv)


def test_cli_placements_checks_oracle_steps(tmp_path, capsys):
    assert "--oracle-steps" in exit_message(capsys, [
        "placements", "--checkpoint", str(tmp_path / "none.pt"), "--oracle-steps", "-2",
        "--out", str(tmp_path / "p.png")])
    assert "--priors" in exit_message(capsys, ["priors", "--priors", "uniform,nope",
                                               "--out", str(tmp_path / "p.png")])


@pytest.mark.parametrize("command", ["placements", "trajectories"])
def test_cli_old_search_flags_are_hidden_aliases(command, capsys):
    assert_search_flags(visualize.build_parser(), command, capsys)


def assert_search_flags(parser, command, capsys):
    """--oracle-steps and --steps (and --prior for --search-from) still parse, into the new
    flags' values; --help shows only the new spellings. (Also experiments.figures' saliency.)"""
    base = [command, "--checkpoint", "c.pt"]
    for old in ("--oracle-steps", "--steps", "--search-steps"):
        args = parser.parse_args(base + [old, "3"])
        assert args.search_steps == 3
    assert parser.parse_args(base + ["--prior", "center"]).search_from == "center"
    defaults = parser.parse_args(base)
    assert defaults.search_from == "isotropic" and defaults.search_lr is None
    assert defaults.search_steps == (0 if command == "placements" else None)
    with pytest.raises(SystemExit):
        parser.parse_args([command, "--help"])
    shown = capsys.readouterr().out
    assert "--search-steps" in shown and "--search-lr" in shown and "--search-from" in shown
    assert "--oracle-steps" not in shown and "--steps" not in shown and "--prior " not in shown


def test_cli_tokens_grammar_one_budget(tmp_path, capsys, monkeypatch):
    """--tokens takes the one grammar of utils.parse_tokens ('all' = the full grid), but a figure
    draws one budget: a list is refused by name."""
    out, drawn, real = tmp_path / "p.png", [], visualize.plot_priors
    monkeypatch.setattr(visualize, "plot_priors",
                        lambda size, window, n, **kwargs: drawn.append(n) or real(size, window, n, **kwargs))
    main(["priors", "--priors", "grid", "--tokens", "all", "--out", str(out)])
    assert drawn == [64] and out.is_file()                 # 32 / 4 = 8 -> 8 x 8 grid cells
    assert "one budget" in exit_message(capsys, ["priors", "--tokens", "4,8", "--out", str(out)])
    assert "--tokens" in exit_message(capsys, ["priors", "--tokens", "300", "--out", str(out)])


def save_tiny_checkpoint(path):
    torch.manual_seed(0)
    model = spot.SPoTViT(spot.SPoTConfig(image_size=H, window=K, num_classes=3, dim=16, depth=1,
                                         heads=2))
    torch.save({"model_config": dataclasses.asdict(model.config), "model": model.state_dict(),
                "classes": ["a", "b", "c"],
                "args": {"dataset": "shapes", "data_dir": None, "image_size": H, "seed": 0}}, path)
    return path


@pytest.fixture
def fake_shapes(monkeypatch):
    """data.load_dataset -> 6 random test images of 3 classes (the real shapes take seconds)."""
    import data

    split = types.SimpleNamespace(images=torch.randint(0, 256, (6, 3, H, W), dtype=torch.uint8),
                                  labels=torch.tensor([0, 1, 2, 0, 1, 2]))
    dataset = types.SimpleNamespace(name="shapes", train=split, val=None, test=split,
                                    classes=["a", "b", "c"], image_size=(H, W))
    monkeypatch.setattr(data, "load_dataset", lambda *args, **kwargs: dataset)
    return dataset


def test_cli_checkpoint_commands(tmp_path, fake_shapes):
    """placements / trajectories end to end: a tiny untrained checkpoint, the real oracle search
    (2 steps), and a stand-in dataset. (experiments.figures' saliency: tests/test_figures.py.)"""
    ckpt = ["--checkpoint", str(save_tiny_checkpoint(tmp_path / "checkpoint.pt")), "--tokens", "9"]
    main(["placements", *ckpt, "--index", "1", "--search-steps", "2",
          "--out", str(tmp_path / "pl.png")])
    main(["trajectories", *ckpt, "--n-images", "2", "--search-steps", "2",
          "--out", str(tmp_path / "tr.png"), "--gif", str(tmp_path / "tr.gif")])
    for name in ("pl.png", "tr.png"):
        assert_png(tmp_path / name)
    assert (tmp_path / "tr.gif").stat().st_size > 0


def test_cli_index_past_the_test_split(tmp_path, capsys, fake_shapes):
    ckpt = ["--checkpoint", str(save_tiny_checkpoint(tmp_path / "c.pt"))]
    assert "--index 99" in exit_message(capsys, ["placements", *ckpt, "--index", "99",
                                                 "--out", str(tmp_path / "x.png")])
    assert "--n-images 4" in exit_message(capsys, ["trajectories", *ckpt, "--index", "3",
                                                   "--out", str(tmp_path / "x.png")])


def test_cli_reads_the_checkpoint_once_and_safely(tmp_path, monkeypatch, fake_shapes):
    """One torch.load, with weights_only=True: a checkpoint is a downloaded file, and a full
    unpickle of one could run any code."""
    calls = []
    real_load = torch.load

    def load(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)
    monkeypatch.setattr(torch, "load", load)
    main(["placements", "--checkpoint", str(save_tiny_checkpoint(tmp_path / "c.pt")),
          "--out", str(tmp_path / "p.png")])
    assert calls == [True]


# How a checkpoint file can be damaged, and what the error message must then say.
DAMAGES = [("truncated", "could not be read"), ("random", "could not be read"),
           ("empty", "could not be read"), ("folder", "is a directory"),
           ("missing", "does not exist")]


@pytest.mark.parametrize("command", ["placements", "trajectories"])
@pytest.mark.parametrize("damage, says", DAMAGES)
def test_cli_bad_checkpoint_is_a_message_naming_the_file(tmp_path, capsys, command, damage, says):
    path = damaged_checkpoint(tmp_path, damage)
    err = exit_message(capsys, [command, "--checkpoint", str(path),
                                "--out", str(tmp_path / "x.png")])
    assert str(path) in err and says in err


def damaged_checkpoint(tmp_path, damage):
    """tmp_path / "checkpoint.pt", damaged as DAMAGES names (also used by tests/test_figures.py)."""
    path = tmp_path / "checkpoint.pt"
    if damage == "truncated":
        whole = save_tiny_checkpoint(tmp_path / "whole.pt").read_bytes()
        path.write_bytes(whole[:len(whole) // 2])
    elif damage == "random":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "folder":
        path.mkdir()
    return path


def test_module_imports_without_optional_helpers():
    """visualize imports data and oracle lazily: importing it pulls in neither."""
    assert "oracle" not in vars(visualize) and "data" not in vars(visualize)
