"""experiments.placement: glance-then-place is differentiable end to end, uses no label, reads exactly
the budget, starts as the isotropic prior, learns, and its CLI trains and reloads a head."""

import dataclasses
import inspect
import json
import os
import sys
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import data  # noqa: E402
from experiments import placement  # noqa: E402
import spot  # noqa: E402
import utils  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")      # conftest.py


def tiny(seed=0, size=16):
    torch.manual_seed(seed)
    model = spot.SPoTViT(spot.SPoTConfig(image_size=size, window=4, num_classes=3, dim=32, depth=1, heads=2))
    placer = placement.GlancePlacer(placement.PlacerConfig(image_size=size, window=4, dim=32, width=16, heads=2))
    return model.eval().requires_grad_(False), placer


def test_glance_size_bounds():
    assert [placement.glance_size(n, 0.25) for n in (2, 4, 8, 16, 64)] == [1, 1, 2, 4, 16]
    assert placement.glance_size(4, 0.9) == 3                     # at least one token is placed
    with pytest.raises(ValueError, match="n_tokens"):
        placement.glance_size(1, 0.25)


def as_set(points):
    """(N, 2) points -> a sorted list of rounded tuples, to compare point sets in any order."""
    return sorted(tuple(round(v, 6) for v in point) for point in points.tolist())


def test_split_lattice_is_the_isotropic_lattice_with_a_spread_out_glance():
    for n_tokens, n_glance in ((8, 2), (16, 4), (64, 16)):
        glance, base = placement.split_lattice(n_tokens, n_glance)
        assert glance.shape == (n_glance, 2) and base.shape == (n_tokens - n_glance, 2)
        assert as_set(torch.cat([glance, base])) == as_set(spot.isotropic_positions(n_tokens))
    glance, _ = placement.split_lattice(16, 4)       # 4 of the 4x4 lattice: one near each corner
    assert as_set(glance) == as_set(torch.tensor([[.375, .375], [.875, .875], [.125, .875], [.875, .125]]))


def test_untrained_head_places_the_isotropic_lattice_and_reads_exactly_the_budget():
    model, placer = tiny()
    images = torch.rand(3, 3, 16, 16)
    seen = []
    model.patch_embed.register_forward_hook(lambda module, args, out: seen.append(out.shape[1]))
    positions = placement.place(model, placer, images, 8)
    assert positions.shape == (3, 8, 2) and positions.min() >= 0 and positions.max() <= 1
    glance, _ = placement.split_lattice(8, 2)
    assert torch.equal(positions[:, :2], glance.expand(3, 2, 2))                      # the glance
    for image_positions in positions:                                  # zero init: the prior itself
        assert as_set(image_positions) == as_set(spot.isotropic_positions(8))
    model(images, positions)
    assert seen == [2, 8]            # the glance read 2 tokens, the final pass the budget of 8


def test_gradient_reaches_the_head_through_the_sampler_and_not_the_backbone():
    model, placer = tiny()
    with torch.no_grad():
        placer.mlp[-1].weight.normal_(0, 0.1)                     # off the zero init
    images, labels = torch.rand(4, 3, 16, 16), torch.tensor([0, 1, 2, 0])
    loss = F.cross_entropy(model(images, placement.place(model, placer, images, 8)), labels)
    loss.backward()
    assert placer.mlp[-1].weight.grad.abs().sum() > 0 and placer.query.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())


def test_no_label_goes_in():
    assert list(inspect.signature(placement.place).parameters) == ["model", "placer", "images", "n_tokens"]
    model, placer = tiny()
    images = torch.rand(5, 3, 16, 16)
    # positions depend on each image alone: a batch of one gives the same as inside a batch
    together = placement.place(model, placer, images, 8)
    alone = torch.cat([placement.place(model, placer, images[i:i + 1], 8) for i in range(5)])
    assert torch.allclose(together, alone, atol=1e-6)


def blob_dataset(n, seed):
    """Class = which quadrant holds a small bright blob, on a noisy background: a 2-token
    isotropic read sees the blob only by chance, a placed token can go and look."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, 16, 16, generator=g) * 0.2
    labels = torch.randint(0, 3, (n,), generator=g)
    corners = torch.tensor([[2, 2], [2, 10], [10, 6]])
    jitter = torch.randint(0, 3, (n, 2), generator=g)
    for i in range(n):
        y, x = (corners[labels[i]] + jitter[i]).tolist()
        images[i, :, y:y + 3, x:x + 3] = 1.0
    return data.Split((images * 255).to(torch.uint8), labels)


def test_cli_trains_a_head_that_beats_its_start_and_reloads(tmp_path, monkeypatch):
    model, _ = tiny(seed=1)
    train, val = blob_dataset(384, 0), blob_dataset(96, 1)
    # a backbone that sees blobs: train it briefly on random positions, as train.py would
    model.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for step in range(150):
        batch = torch.randint(0, len(train), (64,), generator=g)
        images = train.images[batch].float() / 255
        positions = spot.sample_positions("uniform", 64, 16, 16, 4, generator=g)
        loss = F.cross_entropy(model(images, positions), train.labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    checkpoint = tmp_path / "checkpoint.pt"
    torch.save({"model_config": asdict(model.config), "model": model.state_dict(), "classes": ["0", "1", "2"],
                "args": {"dataset": "shapes", "data_dir": None, "seed": 0, "val_size": 96}}, checkpoint)
    dataset = data.Dataset(name="shapes", train=train, test=val, classes=["0", "1", "2"], mean=(0.5,) * 3,
                           std=(0.5,) * 3, image_size=(16, 16), val=val)
    monkeypatch.setattr(data, "load_dataset", lambda *args, **kwargs: dataset)
    out = tmp_path / "placer"
    argv = ["--checkpoint", str(checkpoint), "--budgets", "2", "--glance-fraction", "0.5", "--width", "16",
            "--epochs", "6", "--batch-size", "32", "--lr", "3e-3", "--no-progress", "--out", str(out)]
    assert placement.main(argv) == 0
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(history) == 6
    # 1 glance + 1 placed token: the learned token finds the blob far more often than the lattice's
    assert history[-1]["val_placed@2"] >= history[-1]["val_isotropic@2"] + 15
    placer, _ = placement.load_placer(out / "placer.pt")
    again = placement.placed_accuracy(spot.load_checkpoint(checkpoint), placer, val, [2], "cpu", 32)
    assert again["val_placed@2"] == history[-1]["val_placed@2"]
    run = json.loads((out / "run.json").read_text())          # --budgets: the old spelling of --tokens
    assert run["args"]["tokens"] == [2] and run["argv"][:3] == ["python", "-m", "experiments.placement"]
    with pytest.raises(SystemExit):                              # never overwrite a trained head
        placement.main(argv)


def test_load_placer_refuses_other_files(tmp_path):
    bad = tmp_path / "placer.pt"
    bad.write_bytes(b"not a placer")
    with pytest.raises(ValueError, match="placer.pt"):
        placement.load_placer(bad)


def test_label_free_table_gets_learned_rows_with_their_cost(tmp_path, monkeypatch):
    """experiments.label_free evaluate: the learned rows with their cost, the control, the entropy
    search, choices made on validation, and the comparisons with oracle.py's evaluation (--against)."""
    import oracle
    from experiments import label_free

    model, placer = tiny()
    with torch.no_grad():
        placer.mlp[-1].weight.normal_(0, 0.1)
    checkpoint, placer_file = tmp_path / "checkpoint.pt", tmp_path / "placer.pt"
    torch.save({"model_config": asdict(model.config), "model": model.state_dict(), "classes": ["0", "1", "2"],
                "args": {"dataset": "shapes", "data_dir": None, "seed": 0}}, checkpoint)
    torch.save({"placer_config": asdict(placer.config), "placer": placer.state_dict()}, placer_file)
    test = blob_dataset(20, 2)
    dataset = data.Dataset(name="shapes", train=blob_dataset(30, 3), test=test, classes=["0", "1", "2"],
                           mean=(0.5,) * 3, std=(0.5,) * 3, image_size=(16, 16), val=blob_dataset(16, 4))
    monkeypatch.setattr(data, "load_dataset", lambda *args, **kwargs: dataset)
    common = ["--checkpoint", str(checkpoint), "--tokens", "1,4,8", "--priors", "isotropic,center",
              "--knn-limit", "10", "--search-limit", "10", "--search-steps", "2", "--no-progress"]
    assert oracle.main(common + ["--saliency-limit", "0", "--out", str(tmp_path / "ref")]) == 0
    argv = ["evaluate", "--placer", str(placer_file), "--against", str(tmp_path / "ref")] + common
    assert label_free.main(argv + ["--out", str(tmp_path / "a")]) == 0
    results = json.loads((tmp_path / "a" / "results.json").read_text())
    rows = results["rows"]
    learned = {r["tokens"]: r for r in rows if r["method"] == "spot-learned"}
    assert learned[1]["top1"] is None                         # 1 token: nothing to place
    for n in (4, 8):
        row = learned[n]
        assert row["knn"] is not None and row["n_images"] == 20 and row["glance"] == placement.glance_size(n, 0.25)
        assert row["ms_per_image"] > 0 and row["cost_vs_prior"] > 0   # measured (wall time: no bound in a test)
        positions = placement.place_split(model, placer, test.images, n, "cpu")
        expected = (model(test.images.float() / 255, positions).argmax(1) == test.labels).float().mean().item()
        assert row["top1"] == pytest.approx(100 * expected)
    # the control: K candidates, the most confident kept; K=1 is the isotropic prior itself
    control = {(r["prior"], r["tokens"]): r for r in rows if r["method"] == "best-of-k"}
    assert set(control) == {(f"K={k}", n) for k in label_free.CONTROL_K for n in (1, 4, 8)}
    reference = json.loads((tmp_path / "ref" / "results.json").read_text())["rows"]
    isotropic = {r["tokens"]: r["top1"] for r in reference if r["prior"] == "isotropic" and r["method"] == "prior"}
    assert all(control["K=1", n]["top1"] == isotropic[n] and control["K=4", n]["cost_vs_prior"] == 4 for n in (4, 8))
    # its ceiling, the oracle of K: any of the K candidates right (at least the control, growing with K)
    ceiling = {(r["prior"], r["tokens"]): r["top1"] for r in rows if r["method"] == "oracle-of-k"}
    assert set(ceiling) == {(f"K={k}", n) for k in label_free.CONTROL_K[1:] for n in (1, 4, 8)}
    for n in (1, 4, 8):
        tops = [ceiling[f"K={k}", n] for k in label_free.CONTROL_K[1:]]
        assert tops == sorted(tops) and all(ceiling[f"K={k}", n] >= control[f"K={k}", n]["top1"]
                                            for k in label_free.CONTROL_K[1:])
    # the choices were made on the validation split (16 images) and recorded
    choices = results["choices"]
    assert choices["split"] == "val" and choices["n_images"] == 16
    assert {c["prior"] for c in choices["best_prior"].values()} <= {"isotropic", "center"}
    assert {r["n_images"] for r in results["validation_rows"] if r["top1"] is not None} == {16}
    # comparisons: learned and control on all 20 test images, the entropy search on the searched 10
    by = {(c["method"], c["tokens"]): c for c in results["comparisons"]}
    assert by["spot-learned", 8]["n_images"] == 20 and by["spot-on-entropy", 8]["n_images"] == 10
    assert by["best-of-k", 8]["prior"] == f"K={choices['control_k']['8']['k']}"
    assert all(c["gain_low"] <= c["gain"] <= c["gain_high"] and "gap_closed" in c for c in by.values()
               if c["method"] != "spot-learned")
    entropy = [r for r in rows if r["method"] == "spot-on-entropy" and r["tokens"] == 8][0]
    assert entropy["cost_vs_prior"] > 1 and entropy["ms_per_image"] > 0 and entropy["n_images"] == 10
    assert "gap closed" in (tmp_path / "a" / "results.md").read_text()
    bits = utils.load_per_image(tmp_path / "a" / "per_image.npz")
    assert bits["top1", "spot-learned", "isotropic", 8].shape == (20,) and ("val-top1", "prior", "center", 4) in bits
    # no label is read: the same images with other labels give the same positions, hence predictions
    shuffled = data.Split(test.images, test.labels.roll(1))
    monkeypatch.setattr(data, "load_dataset", lambda *args, **kwargs: dataclasses.replace(dataset, test=shuffled))
    assert oracle.main(common + ["--saliency-limit", "0", "--out", str(tmp_path / "ref2")]) == 0
    argv[4] = str(tmp_path / "ref2")
    assert label_free.main(argv + ["--out", str(tmp_path / "b")]) == 0
    again = {r["tokens"]: r for r in json.loads((tmp_path / "b" / "results.json").read_text())["rows"]
             if r["method"] == "spot-learned"}
    positions = placement.place_split(model, placer, test.images, 8, "cpu")
    predicted = model(test.images.float() / 255, positions).argmax(1)
    assert again[8]["top1"] == pytest.approx(100 * (predicted == shuffled.labels).float().mean().item())
    # an --against made from other images (or another model) is refused by name
    with pytest.raises(SystemExit):
        label_free.main(argv[:4] + [str(tmp_path / "ref")] + argv[5:] + ["--out", str(tmp_path / "c")])