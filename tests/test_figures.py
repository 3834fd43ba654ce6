"""Tests for experiments/figures.py: the figures of RESULTS.md's findings (accuracy vs token
budget, training curves, finding 3's saliency vs the oracle) are real, non-blank PNGs, and bad
input is a clear ValueError or a one-line CLI error. Synthetic inputs only (a hand-written results
dict, hand-written run folders, random images; the saliency command: a tiny untrained checkpoint
and a stand-in dataset, from tests/test_visualize.py)."""
import json
import re

import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402
import torch  # noqa: E402

from experiments.figures import (build_parser, main, plot_budget_curves,  # noqa: E402
                                 plot_saliency_vs_oracle, plot_training_curves)
# close_figures, fake_shapes and image are fixtures: pytest finds them by name in this module.
from test_visualize import (DAMAGES, H, K, W, assert_png, assert_search_flags,  # noqa: E402, F401
                            close_figures, damaged_checkpoint, exit_message, fake_shapes, image,
                            save_tiny_checkpoint)


def results_dict():
    rows = []
    for tokens, base in ((4, 20.0), (16, 45.0), (64, 70.0)):
        rows.append({"method": "prior", "prior": "grid", "tokens": tokens, "top1": base - 10,
                     "knn": base - 12})
        for prior, bonus in (("isotropic", 5.0), ("center", 8.0)):
            rows.append({"method": "prior", "prior": prior, "tokens": tokens, "top1": base + bonus,
                         "knn": None})
            rows.append({"method": "spot-on", "prior": prior, "tokens": tokens,
                         "top1": min(99.0, base + 30), "knn": base + 25})
        rows.append({"method": "spot-on-snapped", "prior": "isotropic", "tokens": tokens,
                     "top1": base + 15, "knn": None})
    return {"settings": {"dataset": "shapes", "steps": 5}, "rows": rows}


# -----------------------------------------------------------------------------
# plot_budget_curves

def test_budget_curves_from_dict_and_file(tmp_path):
    results = results_dict()
    fig = plot_budget_curves(results, path=tmp_path / "b.png")
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and "tokens" in ax.get_xlabel() and ax.get_title()
    labels = [line.get_label() for line in ax.get_lines()]
    assert "patch grid (ViT baseline)" in labels and len(labels) == 6
    styles = {line.get_label(): line.get_linestyle() for line in ax.get_lines()}
    assert styles["prior: isotropic"] == "-" and styles["SPoT-ON (label oracle): isotropic"] == "--"
    assert_png(tmp_path / "b.png")

    file = tmp_path / "run" / "results.json"
    file.parent.mkdir()
    file.write_text(json.dumps(results))
    for source in (file, str(file.parent)):      # a file, or the folder that holds it
        fig = plot_budget_curves(source, metric="knn")
        # knn is null for the plain priors except grid: only 3 lines carry knn values
        assert len(fig.axes[0].get_lines()) == 3


@pytest.mark.parametrize("results, kwargs, match", [
    (None, {"metric": "top5"}, "metric"),
    ({"settings": {}, "rows": []}, {}, "rows"),
    ({"settings": {}}, {}, "rows"),
    ({"rows": [{"method": "prior", "tokens": 4}]}, {}, "prior"),
    ({"rows": [{"method": "prior", "prior": "grid", "tokens": 4, "top1": None}]}, {}, "top1"),
    ("/nonexistent/results.json", {}, "does not exist"),
    ([1, 2], {}, "results"),
])
def test_budget_curves_rejects_bad_input(results, kwargs, match):
    with pytest.raises(ValueError, match=match):
        plot_budget_curves(results_dict() if results is None else results, **kwargs)


# -----------------------------------------------------------------------------
# plot_training_curves

def test_training_curves_start_a_retrofit_where_its_source_ended(tmp_path):
    def write_run(name, values, init_from=None):
        folder = tmp_path / name
        folder.mkdir()
        lines = [{"epoch": i + 1, "elapsed_s": 60.0 * (i + 1), "val_acc": v, "val_acc@16": v - 10}
                 for i, v in enumerate(values)] + [{"final": True, "test_acc": 1.0, "elapsed_s": 999}]
        (folder / "metrics.jsonl").write_text("\n".join(json.dumps(m) for m in lines) + "\n")
        (folder / "run.json").write_text(json.dumps({"args": {"init_from": init_from}}))
        return str(folder)

    grid = write_run("grid-vit", [40, 50, 60])
    retrofit = write_run("retrofit", [70, 75], init_from="runs/grid-vit/checkpoint.pt")
    fig = plot_training_curves([grid, retrofit], path=tmp_path / "t.png")
    assert_png(tmp_path / "t.png")
    lines = {line.get_label(): line for line in fig.axes[0].lines}
    assert list(lines["grid-vit"].get_xdata()) == [1, 2, 3]          # minutes; the final line skipped
    assert list(lines["retrofit (from grid-vit)"].get_xdata()) == [3, 4, 5]
    assert list(lines["retrofit (from grid-vit)"].get_ydata()) == [60, 70, 75]
    assert list(fig.axes[1].lines[1].get_ydata()) == [50, 60, 65]   # val_acc@16
    assert main(["training", "--runs", grid, retrofit, "--keys", "val_acc", "--out", str(tmp_path / "c.png")]) == 0
    with pytest.raises(ValueError, match="metrics.jsonl"):
        plot_training_curves([str(tmp_path)])


# -----------------------------------------------------------------------------
# plot_saliency_vs_oracle (finding 3)

def test_saliency_vs_oracle_png(tmp_path):
    # A bright square on a faintly textured background: spectral-residual saliency peaks at
    # the square's corners, so tokens there read more than the mean saliency, tokens far from
    # it less. (On a perfectly flat background the spectral residual of a square is a periodic
    # artefact, which is why the background is textured.)
    image = 0.4 + 0.1 * torch.rand(3, H, W, generator=torch.Generator().manual_seed(0))
    image[:, 6:14, 18:26] = 1.0
    on_blob = torch.tensor([[14 / H, 18 / W], [14 / H, 26 / W]])   # two corners of the square
    corner = torch.tensor([[0.8, 0.2], [0.85, 0.3]])
    fig = plot_saliency_vs_oracle(image, on_blob, start_positions=corner, window=K,
                                  path=tmp_path / "s.png")
    title = fig._suptitle.get_text()
    oracle_ratio = float(re.search(r"oracle ([0-9.]+)x", title).group(1))
    start_ratio = float(re.search(r"start ([0-9.]+)x", title).group(1))
    assert oracle_ratio > 1.0 > start_ratio
    assert_png(tmp_path / "s.png")
    plot_saliency_vs_oracle(image, on_blob)                      # start and window are optional


@pytest.mark.parametrize("kwargs, match", [
    ({"positions": torch.rand(4)}, "positions"),
    ({"start_positions": torch.rand(4, 3)}, "start_positions"),
    ({"window": 0}, "window"),
    ({"image": torch.rand(H, W, 3)}, "image"),
])
def test_saliency_rejects_bad_input(image, kwargs, match):
    args = {"image": image, "positions": torch.rand(4, 2), **kwargs}
    with pytest.raises(ValueError, match=match):
        plot_saliency_vs_oracle(**args)


# -----------------------------------------------------------------------------
# CLI

def test_cli_budget(tmp_path):
    results = tmp_path / "results.json"
    results.write_text(json.dumps(results_dict()))
    for metric in ("top1", "knn"):
        out = tmp_path / f"budget_{metric}.png"
        assert main(["budget", "--results", str(results), "--out", str(out),
                     "--metric", metric]) == 0
        assert_png(out)


def test_cli_errors_are_messages_not_tracebacks(tmp_path, capsys):
    missing = tmp_path / "missing.json"
    assert "does not exist" in exit_message(capsys, ["budget", "--results", str(missing),
                                                     "--out", str(tmp_path / "x.png")], main)
    assert "--metric" in exit_message(capsys, ["budget", "--results", "r.json", "--metric", "top5"],
                                      main)


def test_cli_saliency(tmp_path, capsys, fake_shapes):
    """The saliency command end to end (it was visualize.py's): a tiny untrained checkpoint, the
    real oracle search (2 steps), and a stand-in dataset."""
    out = tmp_path / "sa.png"
    assert main(["saliency", "--checkpoint", str(save_tiny_checkpoint(tmp_path / "checkpoint.pt")),
                 "--tokens", "9", "--search-from", "center", "--search-steps", "2",
                 "--search-lr", "0.02", "--out", str(out)]) == 0
    assert_png(out)
    assert capsys.readouterr().out.strip() == f"wrote {out}"


def test_cli_saliency_takes_visualize_search_flags(capsys):
    """The same flags as visualize.py's checkpoint figures, old spellings hidden aliases."""
    assert_search_flags(build_parser(), "saliency", capsys)


@pytest.mark.parametrize("damage, says", DAMAGES)
def test_cli_saliency_bad_checkpoint_is_a_message_naming_the_file(tmp_path, capsys, damage, says):
    path = damaged_checkpoint(tmp_path, damage)
    err = exit_message(capsys, ["saliency", "--checkpoint", str(path),
                                "--out", str(tmp_path / "x.png")], main)
    assert str(path) in err and says in err
