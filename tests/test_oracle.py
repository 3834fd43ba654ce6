"""Tests of oracle.py: SPoT-ON (the frozen-model search), snapping, kNN, the evaluation table and its CLI."""
import json

import pytest
import torch
import torch.nn.functional as F

import data
import oracle
import spot
import utils
from oracle import OBJECTIVES, knn_predict, oracle_search, snap_to_grid
from dataclasses import asdict

from spot import SPoTConfig, SPoTViT
from conftest import ROOT


pytestmark = pytest.mark.usefixtures("one_thread")      # conftest.py


def tiny_model(seed=0, num_classes=3):
    torch.manual_seed(seed)
    return SPoTViT(SPoTConfig(image_size=16, window=4, num_classes=num_classes, dim=32, depth=1, heads=2))


def random_batch(B=3, N=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(B, 3, 16, 16, generator=g)
    labels = torch.randint(0, 3, (B,), generator=g)
    positions = torch.rand(B, N, 2, generator=g)
    return images, labels, positions


# -----------------------------------------------------------------------------
# A trained tiny model: class = the quadrant that holds a bright blob (learnable in seconds)

def blob_images(n, seed):
    """(n, 3, 16, 16) in [0, 1]: faint noise plus one Gaussian blob (sigma 1.5 px) at a random
    continuous point inside quadrant `label` (0 TL, 1 TR, 2 BL, 3 BR)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (n,), generator=g)
    centre = 2 + 4 * torch.rand(n, 2, generator=g)                        # in [2, 6] px
    centre = centre + 8 * torch.stack([labels // 2, labels % 2], 1)       # move to the quadrant
    grid = torch.arange(16) + 0.5
    dy = grid.view(1, 16, 1) - centre[:, 0].view(n, 1, 1)
    dx = grid.view(1, 1, 16) - centre[:, 1].view(n, 1, 1)
    blob = torch.exp(-(dy ** 2 + dx ** 2) / (2 * 1.5 ** 2))              # (n, 16, 16)
    images = 0.1 * torch.rand(n, 3, 16, 16, generator=g) + 0.9 * blob[:, None]
    return images.clamp(0, 1), labels


@pytest.fixture(scope="module")
def trained():
    """A model trained ~300 steps with 1-4 uniform tokens: few tokens often miss the blob."""
    torch.manual_seed(0)
    model = SPoTViT(SPoTConfig(image_size=16, window=4, num_classes=4, dim=32, depth=1, heads=2))
    images, labels = blob_images(2048, seed=1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(2)
    for step in range(300):
        idx = torch.randint(0, len(images), (64,), generator=g)
        n_tokens = 1 + step % 4
        pos = torch.rand(64, n_tokens, 2, generator=g)
        loss = F.cross_entropy(model(images[idx], pos), labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    for p in model.parameters():
        p.grad = None
    test_x, test_y = blob_images(128, seed=3)
    return model, test_x, test_y


# -----------------------------------------------------------------------------
# The model is frozen

@pytest.mark.parametrize("start_training", [True, False])
def test_search_freezes_model(start_training):
    model = tiny_model()
    model.train(start_training)
    model.blocks[0].attn.train(not start_training)   # mixed modes must come back exactly
    modes = [m.training for m in model.modules()]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    seen = []
    hook = model.register_forward_pre_hook(lambda mod, inp: seen.append(mod.training))
    images, labels, positions = random_batch()
    oracle_search(model, images, labels, positions, steps=3, lr=1e-2)
    hook.remove()
    assert seen and not any(seen), "the search must run in eval mode"
    assert [m.training for m in model.modules()] == modes
    assert all(p.grad is None for p in model.parameters())
    assert [p.requires_grad for p in model.parameters()] == flags
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_no_state_leaks_between_calls_and_inputs_untouched():
    model = tiny_model()
    images, labels, positions = random_batch()
    start = positions.clone()
    a = oracle_search(model, images, labels, positions, steps=4, lr=1e-2)
    b = oracle_search(model, images, labels, positions, steps=4, lr=1e-2)
    assert torch.equal(positions, start)
    assert torch.equal(a.positions, b.positions) and torch.equal(a.losses, b.losses)
    with torch.no_grad():    # works inside no_grad too (the search enables grad itself)
        c = oracle_search(model, images, labels, positions, steps=4, lr=1e-2)
    assert torch.equal(a.positions, c.positions)


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_batch_equals_per_image(objective):
    model = tiny_model()
    images, labels, positions = random_batch(B=4, N=6, seed=1)
    labels_arg = labels if objective == "label" else None
    batch = oracle_search(model, images, labels_arg, positions, steps=6, lr=2e-2, objective=objective)
    for b in range(4):
        one = oracle_search(model, images[b:b + 1], None if labels_arg is None else labels[b:b + 1],
                            positions[b:b + 1], steps=6, lr=2e-2, objective=objective)
        torch.testing.assert_close(batch.trajectory[:, b], one.trajectory[:, 0], atol=1e-5, rtol=0)
        torch.testing.assert_close(batch.losses[:, b], one.losses[:, 0], atol=1e-5, rtol=1e-5)


def test_shapes_start_and_projection():
    model = tiny_model()
    images, labels, positions = random_batch(B=2, N=7)
    result = oracle_search(model, images, labels, positions, steps=5, lr=1e3)   # huge steps
    assert result.trajectory.shape == (6, 2, 7, 2)
    assert result.losses.shape == (6, 2)
    assert result.positions.shape == (2, 7, 2)
    assert torch.equal(result.trajectory[0], positions)
    assert torch.equal(result.trajectory[-1], result.positions)
    assert result.trajectory.min() >= 0 and result.trajectory.max() <= 1
    # the recorded losses are the objective at the recorded positions
    with torch.no_grad():
        final = F.cross_entropy(model(images, result.positions), labels, reduction="none")
    torch.testing.assert_close(result.losses[-1], final)
    zero = oracle_search(model, images, labels, positions, steps=0)
    assert zero.trajectory.shape == (1, 2, 7, 2) and torch.equal(zero.positions, positions)


# -----------------------------------------------------------------------------
# The search does its job on a trained model

def test_label_oracle_lowers_loss_and_keeps_accuracy(trained):
    model, images, labels = trained
    start = spot.sample_positions("uniform", len(images), 2, 16, 4,
                                  generator=torch.Generator().manual_seed(0))
    result = oracle_search(model, images, labels, start, steps=20, lr=3e-2)
    assert result.losses[-1].mean() < 0.9 * result.losses[0].mean()
    with torch.no_grad():
        before = (model(images, start).argmax(1) == labels).float().mean()
        after = (model(images, result.positions).argmax(1) == labels).float().mean()
    assert after >= before
    assert after > before + 0.1   # 2 uniform tokens often miss the blob; the oracle finds it


def test_entropy_search_lowers_entropy_without_labels(trained):
    model, images, _ = trained
    start = spot.sample_positions("isotropic", len(images), 2, 16, 4)
    result = oracle_search(model, images, None, start, steps=20, lr=3e-2, objective="entropy")
    with torch.no_grad():
        p = model(images, result.positions).softmax(1)
    entropy = -(p * p.clamp_min(1e-12).log()).sum(1)
    torch.testing.assert_close(result.losses[-1], entropy, atol=1e-4, rtol=1e-4)
    assert result.losses[-1].mean() < result.losses[0].mean()


# -----------------------------------------------------------------------------
# Snapping and kNN

def test_snap_to_grid_known_points():
    # 16 px, window 4: cell centres at 0.125, 0.375, 0.625, 0.875 per axis
    points = torch.tensor([[[0.0, 1.0], [0.26, 0.49], [0.51, 0.74], [0.375, 0.625]]])
    expected = torch.tensor([[[0.125, 0.875], [0.375, 0.375], [0.625, 0.625], [0.375, 0.625]]])
    assert torch.equal(snap_to_grid(points, 16, 4), expected)
    # a window that does not divide the image: the grid covers the top-left 16 of 18 px
    cells = spot.grid_positions(18, 4)
    snapped = snap_to_grid(torch.tensor([[1.0, 0.0]]), 18, 4)
    assert torch.allclose(snapped, torch.tensor([[14 / 18, 2 / 18]]))
    # grid points are fixed points; random points land on grid cells; shapes are kept
    assert torch.equal(snap_to_grid(cells[None], 18, 4), cells[None])
    rand = torch.rand(2, 3, 9, 2)
    out = snap_to_grid(rand, 18, 4)
    assert out.shape == rand.shape
    assert ((out.reshape(-1, 1, 2) - cells).abs().sum(-1).min(1).values == 0).all()


def test_knn_predict_weighted_vote():
    bank = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    bank_y = torch.tensor([0, 0, 1, 1])
    queries = torch.tensor([[2.0, 0.1], [0.05, 3.0]])     # normalization makes the scale irrelevant
    assert knn_predict(bank, bank_y, queries, 2, k=3).tolist() == [0, 1]     # right on [0, 1], half on [1, 1]
    # k larger than the bank is fine
    assert knn_predict(bank, bank_y, queries, 2, k=20).tolist() == [0, 1]


# -----------------------------------------------------------------------------
# Bad inputs

def test_bad_inputs_raise_value_error():
    model = tiny_model()
    images, labels, positions = random_batch()
    with pytest.raises(ValueError, match="'label', 'entropy'"):
        oracle_search(model, images, labels, positions, objective="loss")
    with pytest.raises(ValueError, match="labels"):
        oracle_search(model, images, None, positions)
    with pytest.raises(ValueError, match="labels"):
        oracle_search(model, images, labels[:2], positions)
    with pytest.raises(ValueError, match="positions"):
        oracle_search(model, images, labels, positions[:2])
    with pytest.raises(ValueError, match="positions"):
        oracle_search(model, images, labels, positions[..., :1])
    with pytest.raises(ValueError, match="images"):
        oracle_search(model, (images * 255).to(torch.uint8), labels, positions)
    with pytest.raises(ValueError, match="steps"):
        oracle_search(model, images, labels, positions, steps=-1)
    with pytest.raises(ValueError, match="lr"):
        oracle_search(model, images, labels, positions, lr=0.0)
    with pytest.raises(ValueError, match="positions"):
        snap_to_grid(torch.rand(4, 3), 16, 4)


# -----------------------------------------------------------------------------
# Error bars

def test_bootstrap_interval_known_answers():
    # 10,000 images, exactly half right: the 95 % interval is 50 +- 1.96 sqrt(0.25 / n) = +-0.98
    correct = torch.arange(10_000) % 2 == 0
    mean, low, high = utils.bootstrap_interval(correct, resamples=1000)
    assert mean == 50.0 and abs((high - low) / 2 - 0.98) < 0.1 and low < 50 < high
    # all right: no spread at all; draws are averaged per image before resampling
    assert utils.bootstrap_interval(torch.ones(3, 50, dtype=torch.bool)) == (100.0, 100.0, 100.0)
    two_draws = torch.stack([correct, ~correct])          # every image right in one of two draws
    assert utils.bootstrap_interval(two_draws) == (50.0, 50.0, 50.0)
    # the same seed, the same interval
    assert utils.bootstrap_interval(correct[:300], seed=3) == utils.bootstrap_interval(correct[:300], seed=3)


# -----------------------------------------------------------------------------
# The command line (a fake tiny dataset: the real shapes data take ~15 s to generate)

def fake_dataset(n_train=24, n_test=12, size=16, classes=3):
    g = torch.Generator().manual_seed(0)
    split = lambda n: data.Split((torch.rand(n, 3, size, size, generator=g) * 255).to(torch.uint8),
                                 torch.randint(0, classes, (n,), generator=g))
    return data.Dataset(name="shapes", train=split(n_train), test=split(n_test),
                        classes=[str(c) for c in range(classes)], mean=(0.5,) * 3, std=(0.5,) * 3,
                        image_size=(size, size), val=split(n_test))


def write_checkpoint(path, seed, args=None):
    model = tiny_model(seed)
    torch.save({"model_config": asdict(model.config), "model": model.state_dict(),
                "args": args if args is not None else
                {"dataset": "shapes", "data_dir": None, "image_size": 16, "seed": 0},
                "classes": ["0", "1", "2"]}, path)
    return str(path)


@pytest.fixture
def patched_data(monkeypatch):
    calls = []

    def load(name, data_dir=None, image_size=None, seed=0, **kwargs):
        calls.append({"name": name, "data_dir": data_dir, "image_size": utils.to_hw(image_size)})
        return fake_dataset()
    monkeypatch.setattr(oracle.data, "load_dataset", load)
    return calls


def results_md(folder):
    """The markdown experiments/tables.py renders from the results.json oracle.py wrote in folder."""
    from experiments.tables import results_markdown
    return results_markdown(json.loads((folder / "results.json").read_text()))


def test_cli_writes_table(tmp_path, patched_data):
    ckpt = write_checkpoint(tmp_path / "a.pt", 0)
    other = write_checkpoint(tmp_path / "b.pt", 1)
    argv = ["--checkpoint", ckpt, "--tokens", "2,4,32", "--priors", "uniform,grid,salient",
            "--limit", "8", "--knn-limit", "10", "--search-steps", "2", "--batch-size", "3",
            "--transfer-checkpoint", other, "--no-progress"]
    assert oracle.main(argv + ["--out", str(tmp_path / "r1")]) == 0
    assert patched_data[0] == {"name": "shapes", "data_dir": None, "image_size": (16, 16)}
    results = json.loads((tmp_path / "r1" / "results.json").read_text())
    settings, rows = results["settings"], results["rows"]
    assert settings["checkpoint"] == ckpt and settings["n_test"] == 8 and "date" in settings
    for row in rows:
        assert {"method", "prior", "tokens", "top1", "knn", "top1_low", "top1_high", "knn_low",
                "knn_high", "n_images", "draws"} <= set(row)
        if row["top1"] is not None:
            assert row["top1_low"] <= row["top1"] <= row["top1_high"] and row["n_images"] == 8
        assert row["method"] in ("prior", "spot-on", "spot-on-snapped", "spot-on-transfer")
        for key in ("top1", "knn"):
            assert row[key] is None or 0 <= row[key] <= 100
    prior_rows = [r for r in rows if r["method"] == "prior"]
    assert len(prior_rows) == 9 + 3              # + the model-salient prior of finding 3, per budget
    assert {r["prior"] for r in prior_rows[-3:]} == {"salient-model"}
    # every row's correctness per image is in per_image.npz, and gives back the row's interval
    bits = utils.load_per_image(tmp_path / "r1" / "per_image.npz")
    for row in (r for r in rows if r["top1"] is not None):
        correct = torch.from_numpy(bits["top1", row["method"], row["prior"], row["tokens"]])
        assert correct.shape[-1] == row["n_images"]
        assert utils.bootstrap_interval(correct) == (row["top1"], row["top1_low"], row["top1_high"])
        if row["knn"] is not None:
            knn = utils.bootstrap_interval(torch.from_numpy(bits["knn", row["method"], row["prior"], row["tokens"]]))
            assert knn == (row["knn"], row["knn_low"], row["knn_high"])
    by = {(r["method"], r["prior"], r["tokens"]): r for r in rows}
    assert by[("prior", "grid", 32)]["top1"] is None          # 32 > 16 grid cells: n/a
    assert by[("prior", "grid", 4)]["knn"] is not None
    assert by[("spot-on", "isotropic", 32)]["top1"] is not None
    assert by[("spot-on-transfer", "isotropic", 2)]["source"] == other
    assert len(results["transfer_reverse"]) == 3
    md = results_md(tmp_path / "r1")
    table = [line for line in md.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| Method | Prior | 2 T | 4 T | 32 T |")
    assert "| grid |" in table[1] and "n/a" in table[1]       # the grid row comes first
    assert "SPoT-ON" in md
    # reproducible: the same command gives the same numbers, whatever the batch size
    assert oracle.main(argv[:-3] + ["--batch-size", "5", "--transfer-checkpoint", other,
                                    "--no-progress", "--out", str(tmp_path / "r2")]) == 0
    again = json.loads((tmp_path / "r2" / "results.json").read_text())["rows"]
    assert [(r["method"], r["prior"], r["tokens"], r["top1"], r["knn"]) for r in again] == \
        [(r["method"], r["prior"], r["tokens"], r["top1"], r["knn"]) for r in rows]


def test_saliency_read_is_relative_to_the_image_mean():
    images = torch.full((1, 3, 32, 32), 0.4)
    images[:, :, 8:16, 8:16] = 1.0                                   # one bright square
    saliency = spot.saliency_map(images)
    on = torch.tensor([[[8 / 32, 8 / 32]]])         # a 4 x 4 window on its corner (saliency = edges)
    off = torch.tensor([[[28 / 32, 28 / 32]]])                       # far from it
    read_on, read_off = oracle.saliency_read(saliency, on, 4), oracle.saliency_read(saliency, off, 4)
    assert read_on.shape == (1,) and read_on.item() > 1.5 > 0.5 > read_off.item()
    # a window covering the whole image reads exactly the image mean
    assert oracle.saliency_read(saliency, torch.tensor([[[0.5, 0.5]]]), 32).item() == pytest.approx(1.0, rel=1e-4)


def test_saliency_read_scores_only_the_in_image_part_of_a_window():
    """A window half off the image is scored on its in-image half: on a flat map every window
    reads exactly 1, at the corner too (zero padding would score the corner window 1/4)."""
    flat, ramp = torch.ones(1, 16, 16), torch.arange(16.0).repeat(16, 1)[None] + 1     # ramp: (1, 16, 16)
    for y, x in ((0.0, 0.0), (0.5, 1.0), (0.3, 0.7)):
        assert oracle.saliency_read(flat, torch.tensor([[[y, x]]]), 8).item() == pytest.approx(1.0, abs=1e-6)
    # the corner window covers pixels 0-3 of rows and columns: the ramp's mean there over its image mean
    corner = oracle.saliency_read(ramp, torch.tensor([[[0.0, 0.0]]]), 8).item()
    assert corner == pytest.approx(ramp[0, :4, :4].mean().item() / ramp.mean().item(), rel=1e-5)


def test_saliency_read_cancels_a_pattern_with_the_windows_period():
    """A map that repeats every k pixels (as a model's gradient through its k x k patch embedding
    does) reads exactly its mean through any k x k window inside the image, wherever it sits:
    k bilinear samples 1 px apart add up one whole period at any phase. So such a pattern cannot
    make tokens look more or less salient (experiments/saliency_pattern.py --gradient)."""
    k = 4
    torch.manual_seed(0)
    period = torch.rand(k, k) + 0.5
    tiled = period.repeat(8, 8)[None]                                           # (1, 32, 32)
    positions = 0.1 + 0.8 * torch.rand(1, 50, 2)           # 50 windows, inside, at any phase
    reads = torch.stack([oracle.saliency_read(tiled, positions[:, i:i + 1], k) for i in range(50)])
    assert torch.allclose(reads, torch.ones_like(reads), atol=1e-5)
    # a pattern of another period is not cancelled: the reads vary with the window's position
    other = torch.rand(5, 5).repeat(7, 7)[None, :32, :32] + 0.5
    reads = torch.stack([oracle.saliency_read(other, positions[:, i:i + 1], k) for i in range(50)])
    assert reads.std() > 0.01


def test_gradient_saliency_is_the_models_own_label_free_map():
    """|d logit of the predicted class / d pixel|, summed over channels: non-negative maps summing to
    1, the same in any batch size, equal to autograd through one image; the model is untouched."""
    model, uint8 = tiny_model(), fake_dataset().test.images[:5]
    model.train()
    maps = oracle.gradient_saliency(model, uint8, "cpu", batch_size=2)
    assert maps.shape == (5, 16, 16) and (maps >= 0).all()
    assert torch.allclose(maps.flatten(1).sum(1), torch.ones(5))
    assert torch.allclose(maps, oracle.gradient_saliency(model, uint8, "cpu", batch_size=5), atol=1e-6)
    assert model.training and all(p.grad is None for p in model.parameters())
    model.eval()
    image = (uint8[3:4].float() / 255).requires_grad_(True)
    cells = spot.grid_positions(16, 4)[None]
    model(image, cells).max().backward()                    # one image: its top logit is its prediction's
    expected = image.grad.abs().sum(1)[0]
    assert torch.allclose(maps[3], expected / expected.sum(), atol=1e-6)


def test_cli_draws_and_validation_split(tmp_path, patched_data):
    ckpt = write_checkpoint(tmp_path / "a.pt", 0)
    argv = ["--checkpoint", ckpt, "--tokens", "2,4", "--priors", "uniform,isotropic", "--draws", "3",
            "--knn-limit", "0", "--search-steps", "1", "--split", "val", "--name", "tiny-spot",
            "--search-limit", "6", "--saliency-limit", "5", "--no-progress", "--out", str(tmp_path / "v")]
    assert oracle.main(argv) == 0
    results = json.loads((tmp_path / "v" / "results.json").read_text())
    assert {r["n_images"] for r in results["rows"] if r["method"] == "prior" and r["prior"] != "salient-model"} == {12}
    assert {r["n_images"] for r in results["rows"] if r["prior"] == "salient-model"} == {5}     # finding 3's images
    assert {r["n_images"] for r in results["rows"] if r["method"] != "prior"} == {6}
    saliency = results["saliency"]                           # finding 3, per budget and saliency map
    assert {(r["saliency"], r["positions"], r["tokens"]) for r in saliency} == {
        (m, p, n) for m in ("spectral", "model") for p in ("isotropic", "spot-on", "salient", "salient-model")
        for n in (2, 4)}
    assert all(r["low"] <= r["mean"] <= r["high"] and r["n_images"] == 5 for r in saliency)
    assert "Finding 3" in results_md(tmp_path / "v")
    assert results["settings"]["split"] == "val" and results["settings"]["run"] == "tiny-spot"
    draws = {r["prior"]: r["draws"] for r in results["rows"] if r["method"] == "prior"}
    assert draws == {"uniform": 3, "isotropic": 1, "salient-model": 1}     # a lattice has nothing to redraw


def test_cli_search_limit_zero_gives_prior_rows_only(tmp_path, patched_data):
    ckpt = write_checkpoint(tmp_path / "a.pt", 0)
    argv = ["--checkpoint", ckpt, "--tokens", "2,4", "--priors", "grid,isotropic", "--knn-limit", "0",
            "--search-limit", "0", "--no-progress", "--out", str(tmp_path / "p")]
    assert oracle.main(argv) == 0
    results = json.loads((tmp_path / "p" / "results.json").read_text())
    assert {r["method"] for r in results["rows"]} == {"prior"} and len(results["rows"]) == 4
    assert "saliency" not in results and results["settings"]["n_searched"] == 0
    assert "SPoT-ON" not in results_md(tmp_path / "p").split("\n", 3)[3]


def test_cli_refuses_a_dataset_with_other_classes(tmp_path, patched_data, capsys):
    ckpt = write_checkpoint(tmp_path / "a.pt", 0)
    saved = torch.load(ckpt, weights_only=True)
    saved["classes"] = ["cat", "dog", "ship"]
    torch.save(saved, ckpt)
    with pytest.raises(SystemExit) as exit_info:
        oracle.main(["--checkpoint", ckpt, "--out", str(tmp_path / "o"), "--no-progress"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "cat" in err and "trained on" in err
    assert not (tmp_path / "o" / "results.json").exists()


@pytest.mark.parametrize("extra, message", [
    (["--priors", "grid,nope"], "isotropic"),
    (["--tokens", "4,0"], "--tokens"),
    (["--oracle-from", "nope"], "--oracle-from"),
    (["--oracle-lr", "inf"], "--oracle-lr"),
    (["--search-from", "nope"], "--search-from"),
    (["--search-lr", "nan"], "--search-lr"),
    (["--search-steps", "-1"], "--search-steps"),
    (["--tokens", "100000"], "--tokens"),
    (["--draws", "0"], "--draws"),
    (["--limit", "-3"], "--limit"),
])
def test_cli_bad_arguments(tmp_path, capsys, extra, message):
    ckpt = write_checkpoint(tmp_path / "a.pt", 0)
    with pytest.raises(SystemExit) as exit_info:
        oracle.main(["--checkpoint", ckpt, "--out", str(tmp_path / "o")] + extra)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_missing_bad_or_directory_checkpoint(tmp_path, capsys):
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(open(write_checkpoint(tmp_path / "a.pt", 0), "rb").read()[:300])
    for path, words in [(tmp_path / "missing.pt", "does not exist"), (tmp_path, "is a directory"),
                        (truncated, "could not be read")]:
        with pytest.raises(SystemExit) as exit_info:
            oracle.main(["--checkpoint", str(path), "--out", str(tmp_path / "o")])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err


def test_cli_bad_transfer_checkpoint_is_a_message(tmp_path, patched_data, capsys):
    ckpt = write_checkpoint(tmp_path / "a.pt", 0)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"")
    with pytest.raises(SystemExit) as exit_info:
        oracle.main(["--checkpoint", ckpt, "--transfer-checkpoint", str(bad), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and str(bad) in err and "Traceback" not in err


def test_cli_unwritable_out_fails_before_any_work(tmp_path, capsys, monkeypatch):
    ckpt = write_checkpoint(tmp_path / "a.pt", 0)
    monkeypatch.setattr(oracle, "results_table", lambda *a, **k: pytest.fail("computed the table"))
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit) as exit_info:
        oracle.main(["--checkpoint", ckpt, "--out", str(tmp_path / "file"), "--no-progress"])
    assert exit_info.value.code == 2 and "--out" in capsys.readouterr().err


def test_cli_data_error_exits_cleanly(tmp_path, capsys):
    """The real data.py: a missing folder dataset raises DataError -> message, exit 2."""
    ckpt = write_checkpoint(tmp_path / "a.pt", 0, args={
        "dataset": "folder", "data_dir": str(tmp_path / "nowhere"), "image_size": 16})
    with pytest.raises(SystemExit) as exit_info:
        oracle.main(["--checkpoint", ckpt, "--out", str(tmp_path / "o"), "--no-progress"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and "nowhere" in err and "Traceback" not in err


def test_cli_old_search_flags_are_hidden_aliases(tmp_path, patched_data, capsys):
    """--oracle-steps/--oracle-lr/--oracle-from (the old spellings) still work; --help shows only
    --search-steps/--search-lr/--search-from, and results.json stores the new keys."""
    ckpt = write_checkpoint(tmp_path / "a.pt", 0)
    argv = ["--checkpoint", ckpt, "--tokens", "2", "--priors", "center", "--knn-limit", "0", "--limit", "4",
            "--oracle-steps", "3", "--oracle-lr", "0.05", "--oracle-from", "center", "--saliency-limit", "0",
            "--no-progress", "--out", str(tmp_path / "o")]
    assert oracle.main(argv) == 0
    settings = json.loads((tmp_path / "o" / "results.json").read_text())["settings"]
    assert (settings["search_steps"], settings["search_lr"], settings["search_from"]) == (3, 0.05, "center")
    assert not {"oracle_steps", "oracle_lr", "oracle_from", "placer"} & set(settings)
    assert "SPoT-ON (3 Adam steps, lr 0.05, from center)" in results_md(tmp_path / "o")
    with pytest.raises(SystemExit) as exit_info:
        oracle.main(["--help"])
    text = capsys.readouterr().out
    assert exit_info.value.code == 0
    assert all(f"--search-{name}" in text for name in ("steps", "lr", "from")) and "--oracle" not in text


def test_cli_tokens_all_is_the_models_grid(tmp_path, patched_data):
    ckpt = write_checkpoint(tmp_path / "a.pt", 0)             # 16 px, window 4: a 4 x 4 grid
    assert oracle.main(["--checkpoint", ckpt, "--tokens", "2,all", "--priors", "grid", "--knn-limit", "0",
                        "--search-limit", "0", "--no-progress", "--out", str(tmp_path / "o")]) == 0
    results = json.loads((tmp_path / "o" / "results.json").read_text())
    assert results["settings"]["tokens"] == [2, 16] and [r["tokens"] for r in results["rows"]] == [2, 16]


def test_markdown_of_every_committed_results_file():
    """experiments/tables.py renders every committed results.json, labelled rows included."""
    from experiments.tables import results_markdown
    settings = {"run": "a-run", "dataset": "shapes", "split": "test", "n_test": 8, "n_bank": 0, "knn_k": 20,
                "knn_temperature": 0.07, "draws": 1, "n_searched": 8, "tokens": [4],
                "search_steps": 7, "search_lr": 0.5, "search_from": "center"}
    rows = [utils.table_row("spot-learned", "isotropic", 4, torch.ones(8, dtype=torch.bool))]
    text = results_markdown({"settings": settings, "rows": rows})
    assert "SPoT-ON (7 Adam steps, lr 0.5, from center) on the first 8 images." in text
    assert "| SPoT-learned (glance + place, label-free) | isotropic | 100.0 ±0.0 / – |" in text
    for path in sorted(ROOT.glob("results/*/results.json")):          # the committed ones
        results = json.loads(path.read_text())
        assert results_markdown(results).startswith(f"# SPoT evaluation: {results['settings']['run']}")


def test_results_table_with_an_eval_config_fills_per_image():
    model, dataset = tiny_model(), fake_dataset()
    config = oracle.EvalConfig(tokens=(2, 32), priors=("grid", "uniform"), search_steps=1, search_limit=5,
                               saliency_limit=3, knn_limit=6, draws=2, progress=False)
    per_image = {}
    results = oracle.results_table(model, dataset, config, tiny_model(1), per_image)
    settings = results["settings"]
    assert (settings["n_test"], settings["n_searched"], settings["n_bank"], settings["search_steps"]) == (12, 5, 6, 1)
    assert {(r["method"], r["tokens"]) for r in results["rows"]} == {
        (m, n) for m in ("prior", "spot-on", "spot-on-snapped", "spot-on-transfer") for n in (2, 32)}
    assert per_image["top1", "prior", "uniform", 2].shape == (2, 12)
    assert per_image["knn", "prior", "uniform", 2].shape == (2, 12)
    assert per_image["top1", "spot-on", "isotropic", 32].shape == (5,)
    assert per_image["top1", "spot-on-transfer", "isotropic", 2].shape == (5,)
    assert per_image["top1", "prior", "salient-model", 2].shape == (3,)
    assert per_image["saliency-model", "read", "spot-on", 32].shape == (3,)
    assert len(results["transfer_reverse"]) == 2 and {r["n_images"] for r in results["saliency"]} == {3}
    json.dumps(results)                                                  # the schema main writes


def test_cli_precision_and_rows_on_fewer_images_say_so(tmp_path, patched_data, capsys):
    """--precision bf16 runs the model's forward in bf16 (positions stay fp32) and changes no
    table's shape; the printed summary names a row read on fewer images than its table."""
    ckpt = write_checkpoint(tmp_path / "a.pt", 0)
    argv = ["--checkpoint", ckpt, "--tokens", "4", "--priors", "grid,isotropic", "--limit", "8",
            "--knn-limit", "0", "--search-steps", "2", "--saliency-limit", "3", "--no-progress"]
    assert oracle.main(argv + ["--out", str(tmp_path / "fp32")]) == 0
    summary = capsys.readouterr().out
    assert "top-1 % (8 images)" in summary and "salient-model (3 images)" in summary
    assert oracle.main(argv + ["--precision", "bf16", "--out", str(tmp_path / "bf16")]) == 0
    rows = [json.loads((tmp_path / run / "results.json").read_text())["rows"]
            for run in ("fp32", "bf16")]
    assert [(r["method"], r["prior"], r["n_images"]) for r in rows[0]] == [
        (r["method"], r["prior"], r["n_images"]) for r in rows[1]]
    settings = json.loads((tmp_path / "bf16" / "results.json").read_text())["settings"]
    assert settings["precision"] == "bf16" and settings["bf16"] is True


def test_gradient_study_averages_a_models_own_map(tmp_path):
    """experiments/saliency_pattern.py --gradient: a trained model's gradient map averaged over
    test images, its pattern measure and the strength of its windows' grid, with a figure."""
    from experiments import saliency_pattern
    import train
    from test_train import TINY
    run = tmp_path / "run"
    assert train.main(TINY + ["--epochs", "1", "--out", str(run)]) == 0
    out = tmp_path / "study"
    assert saliency_pattern.main(["--gradient", str(run / "checkpoint.pt"), "--n", "40",
                                  "--out", str(out)]) == 0
    row = json.loads((out / "gradient.json").read_text())["run"]
    assert row["n"] == 40 and row["dataset"] == "shapes" and row["window"] == 4
    assert row["pattern"] > 0 and row["window_grid"] >= 0 and "|" in row["phase"]
    assert (out / "gradient_average_maps.png").stat().st_size > 10_000
