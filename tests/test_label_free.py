"""experiments.label_free: the gap analysis, the label-free figure, and the combined table of
several models (experiments/tables.py); the learned placer's rows are tested end to end in
tests/test_placement.py."""
import dataclasses
import json

import pytest
import torch

import oracle
import spot
from experiments import label_free
from experiments.label_free import comparison_rows
from experiments.tables import combined_markdown, results_markdown
from test_oracle import patched_data, write_checkpoint  # noqa: F401
from test_visualize import assert_png, fake_shapes, save_tiny_checkpoint  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")      # conftest.py


def test_comparison_rows_known_answers():
    # 1,000 images: the oracle gets all, the best prior chosen on validation (center) half, the
    # label-free method three quarters: +25 points, half of the gap closed; the control (K=2) a
    # quarter: the method beats it by 50 points.
    n = 1000
    index = torch.arange(n)
    reference = {("top1", "prior", "center", 8): torch.stack([index % 2 == 0, index % 2 == 0]).numpy(),  # 2 draws
                 ("top1", "spot-on", "isotropic", 8): torch.ones(n, dtype=torch.bool).numpy()}
    per_image = {("top1", "spot-learned", "isotropic", 8): index % 4 != 3,
                 ("top1", "spot-on-entropy", "isotropic", 8): (index % 4 != 3)[:500],   # searched: first 500
                 ("top1", "best-of-k", "K=2", 8): index % 4 == 0}
    choices = {"best_prior": {8: {"prior": "center"}}, "control_k": {8: {"k": 2}}}
    rows = [{"method": "spot-learned", "prior": "isotropic", "tokens": 8, "top1": 75.0, "cost_vs_prior": 1.4},
            {"method": "spot-on-entropy", "prior": "isotropic", "tokens": 8, "top1": 75.0, "cost_vs_prior": 3.2},
            {"method": "best-of-k", "prior": "K=2", "tokens": 8, "top1": 25.0, "cost_vs_prior": 2},
            {"method": "spot-learned", "prior": "isotropic", "tokens": 16, "top1": None}]   # n/a: no row
    learned, entropy, control = comparison_rows(per_image, reference, choices, rows)
    assert learned["best_prior"] == "center" and learned["n_images"] == n and learned["control_k"] == 2
    assert learned["gain"] == pytest.approx(25.0) and learned["gap_closed"] == pytest.approx(0.5)
    assert learned["vs_control"] == pytest.approx(50.0) and control["gain"] == pytest.approx(-25.0)
    assert learned["gain_low"] < 25 < learned["gain_high"] and learned["gap_closed_low"] < 0.5 < learned["gap_closed_high"]
    # paired: the method is right wherever the prior is, so the gain's interval (+-1.96 sqrt(
    # 0.25 * 0.75 / n) = +-2.7 points) is narrower than that of two independent accuracies (75 %
    # and 50 % of 1,000 images: +-1.96 sqrt((0.1875 + 0.25) / n) = +-4.1)
    assert 2 * 2.3 < learned["gain_high"] - learned["gain_low"] < 2 * 3.1
    # the entropy search read the first 500 images only: it is compared there, and no gap is
    # closed on images the oracle searched but it did not
    assert entropy["n_images"] == 500 and entropy["gain"] == pytest.approx(25.0) and "gap_closed" not in entropy
    assert entropy["control_k"] == 2                     # cost 3.2 -> the largest K <= 3


def test_combined_table_of_several_models_repeats_each_models_cells(tmp_path, patched_data):
    """The combined table (experiments/tables.py): one results table for a grid baseline (prior
    rows only) and a SPoT model (with SPoT-ON, transfer and finding 3): each model's cells are
    exactly its own results.md's."""
    from experiments import figures

    grid, spot_ckpt = write_checkpoint(tmp_path / "g.pt", 0), write_checkpoint(tmp_path / "s.pt", 1)
    common = ["--tokens", "2,4", "--priors", "grid,isotropic", "--knn-limit", "8", "--oracle-steps", "1",
              "--no-progress"]
    assert oracle.main(["--checkpoint", grid, "--name", "tiny-grid-vit", "--search-limit", "0",
                        "--out", str(tmp_path / "g")] + common) == 0
    assert oracle.main(["--checkpoint", spot_ckpt, "--name", "tiny-spot", "--transfer-checkpoint", grid,
                        "--search-limit", "5", "--saliency-limit", "4", "--out", str(tmp_path / "s")] + common) == 0
    text = combined_markdown([json.loads((tmp_path / name / "results.json").read_text()) for name in ("g", "s")])
    rows = [line for line in text.splitlines() if line.startswith("| tiny-")]
    grid_rows = [r for r in rows if r.startswith("| tiny-grid-vit |")]
    assert len(grid_rows) == 2 and "ViT (patch grid)" in grid_rows[0]       # grid, isotropic
    assert any("SPoT-ON (label oracle)" in r for r in rows if r.startswith("| tiny-spot |"))
    for name, run in (("g", "tiny-grid-vit"), ("s", "tiny-spot")):    # the same cells as its own table
        own = [line for line in results_markdown(json.loads((tmp_path / name / "results.json").read_text())).splitlines()
               if line.startswith(("| ViT", "| SPoT"))]
        mine = ["| " + r[len(f"| {run} | "):] for r in rows if r.startswith(f"| {run} | ")
                and ", read on the " not in r]                          # finding 3's rows
        assert own and mine == own
    assert "| g | 2 |" in text                                   # the reverse transfer, by run name
    assert "| tiny-spot | spot-on, read on the model map |" in text     # finding 3 with its model column
    assert figures.main(["budget", "--results", str(tmp_path / "g"), str(tmp_path / "s"),
                         "--out", str(tmp_path / "b.png")]) == 0
    assert (tmp_path / "b.png").stat().st_size > 10_000


def test_cli_label_free_figure(tmp_path, capsys, fake_shapes):
    """The label-free figure: prior, the learned head, the entropy search and the oracle side by side;
    a placer made for another model is refused with a message, not a traceback."""
    from experiments import placement

    checkpoint = save_tiny_checkpoint(tmp_path / "checkpoint.pt")
    model = spot.load_checkpoint(checkpoint)
    config = model.config
    for name, dim in (("placer.pt", config.dim), ("other.pt", config.dim + 4)):
        placer = placement.GlancePlacer(placement.PlacerConfig(
            image_size=config.image_size, window=config.window, dim=dim, width=16, heads=2))
        torch.save({"placer_config": dataclasses.asdict(placer.config), "placer": placer.state_dict()},
                   tmp_path / name)
    args = ["figure", "--checkpoint", str(checkpoint), "--tokens", "4", "--n-images", "2", "--steps", "2"]
    label_free.main(args + ["--placer", str(tmp_path / "placer.pt"), "--out", str(tmp_path / "lf.png")])
    assert_png(tmp_path / "lf.png")
    with pytest.raises(SystemExit) as exit_info:
        label_free.main(args + ["--placer", str(tmp_path / "other.pt"), "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "error:" in err and "Traceback" not in err
    assert "another model" in err
