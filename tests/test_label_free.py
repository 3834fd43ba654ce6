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
from experiments.label_free import gap_rows
from experiments.tables import combined_markdown, results_markdown
from test_oracle import patched_data, write_checkpoint  # noqa: F401
from test_visualize import assert_png, fake_shapes, save_tiny_checkpoint  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")      # conftest.py


def test_gap_rows_known_answers():
    # 1,000 images: the oracle gets all, the best prior (center, not the weaker isotropic) half,
    # the label-free method three quarters: +25 points, half of the gap closed.
    n = 1000
    index = torch.arange(n)
    per_image = {("prior", "isotropic", 8): (index % 4 == 0)[None],
                 ("prior", "center", 8): torch.stack([index % 2 == 0, index % 2 == 0]),   # 2 draws
                 ("spot-learned", "isotropic", 8): torch.cat([index % 4 != 3, torch.ones(500, dtype=torch.bool)]),
                 ("spot-on", "isotropic", 8): torch.ones(n, dtype=torch.bool)}
    rows = [{"method": "prior", "prior": prior, "tokens": 8, "top1": top1}
            for prior, top1 in (("isotropic", 25.0), ("center", 50.0))]
    (gap,) = gap_rows(rows, per_image, [8, 16])          # 16: nothing recorded, no row
    assert gap["method"] == "spot-learned" and gap["best_prior"] == "center" and gap["n_images"] == n
    assert gap["gain"] == pytest.approx(25.0) and gap["gap_closed"] == pytest.approx(0.5)
    assert gap["gain_low"] < 25 < gap["gain_high"] and gap["gap_closed_low"] < 0.5 < gap["gap_closed_high"]
    # paired: the method is right wherever the prior is, so the gain's interval (+-1.96 sqrt(
    # 0.25 * 0.75 / n) = +-2.7 points) is narrower than that of two independent accuracies (75 %
    # and 50 % of 1,000 images: +-1.96 sqrt((0.1875 + 0.25) / n) = +-4.1)
    assert 2 * 2.3 < gap["gain_high"] - gap["gain_low"] < 2 * 3.1
    # the comparison runs on the searched images only (the first 1,000), whatever the prior saw
    assert (per_image["spot-learned", "isotropic", 8].shape[-1], gap["n_images"]) == (1500, 1000)


def test_combined_table_of_several_models_repeats_each_models_cells(tmp_path, patched_data):
    """The combined table (experiments/tables.py): one results table for a grid baseline (prior
    rows only) and a SPoT model (with SPoT-ON, transfer and finding 3): each model's cells are
    exactly its own results.md's."""
    import visualize

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
                and not r.startswith(tuple(f"| {run} | {p} |" for p in ("isotropic", "spot-on", "salient")))]
        assert own and mine == own
    assert "| g | 2 |" in text                                   # the reverse transfer, by run name
    assert "| tiny-spot | spot-on |" in text                     # finding 3 with its model column
    assert visualize.main(["budget", "--results", str(tmp_path / "g"), str(tmp_path / "s"),
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
