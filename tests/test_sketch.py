"""experiments/sketch.py: an untrained placer is the isotropic lattice; its moves are bounded and
learn through the frozen model; the sketch costs a fraction of a token, counted against torch's
FLOP counter; the command line trains, saves what loads back (weights_only) and refuses bad
flags."""
import json

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import data
import spot
from experiments import cost, frontier, sketch, stats

pytestmark = pytest.mark.usefixtures("one_thread")      # conftest.py


def tiny(seed=0):
    torch.manual_seed(seed)
    config = spot.SPoTConfig(image_size=16, window=4, num_classes=3, dim=32, depth=2, heads=2)
    return spot.SPoTViT(config).eval()


def test_an_untrained_placer_is_the_lattice():
    head = sketch.SketchPlacer(sketch.SketchConfig(size=8, channels=8, width=16))
    images = torch.rand(3, 3, 16, 16)
    for n in (4, 7):
        assert torch.equal(head(images, n), spot.isotropic_positions(n).expand(3, n, 2))
    head.mlp[-1].bias.data = torch.tensor([0.3, -0.2])           # every token moves the same way
    shift = 0.25 * torch.tanh(torch.tensor([0.3, -0.2]))             # max_shift 0.25
    lattice = spot.isotropic_positions(4)
    assert torch.allclose(head(images, 4)[1], (lattice + shift).clamp(0, 1))


def test_each_point_reads_the_map_where_it_lies():
    # a 2 x 2 map (pixel centres at 0.25 and 0.75 of the image) holding each pixel's own index:
    # the 4-point lattice sits on those centres, so point (y, x) reads pixel (row y, column x)
    head = sketch.SketchPlacer(sketch.SketchConfig(size=8, channels=2, width=4))
    maps = torch.arange(8.0).reshape(1, 2, 2, 2)                          # (1, c, 2, 2)
    seen = []

    class Fixed(torch.nn.Module):                   # the map, whatever the sketch
        def forward(self, sketch_images):
            return maps

    class Seen(torch.nn.Module):                    # what the MLP reads; it moves nothing
        def forward(self, x):
            seen.append(x)
            return torch.zeros(*x.shape[:2], 2)

    head.features, head.mlp = Fixed(), Seen()
    placed = head(torch.rand(1, 3, 16, 16), 4)
    lattice = spot.isotropic_positions(4)                   # (0.25, 0.25), (0.25, 0.75), ...
    assert torch.equal(placed[0], lattice)
    local, pooled, where = seen[0][0].split([2, 2, 2], dim=-1)            # (N, 2) each
    rows, cols = (lattice * 2).long().unbind(-1)                          # 0 or 1
    assert torch.allclose(local, maps[0][:, rows, cols].T)              # channel values there
    assert torch.allclose(pooled, maps[0].mean((1, 2)).expand(4, 2))
    assert torch.equal(where, lattice)


def test_moves_are_bounded_and_learn_through_the_frozen_model():
    model = tiny().requires_grad_(False)
    images, labels = torch.rand(8, 3, 16, 16), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    head = sketch.SketchPlacer(sketch.SketchConfig(size=8, channels=8, width=16, max_shift=0.2))
    torch.nn.init.normal_(head.mlp[-1].weight, std=10.0)            # large moves: tanh saturates
    placed, lattice = head(images, 4), spot.isotropic_positions(4).expand(8, 4, 2)
    assert 0.1 < (placed - lattice).abs().max() <= 0.2 + 1e-6
    torch.manual_seed(0)
    head = sketch.SketchPlacer(sketch.SketchConfig(size=8, channels=8, width=16, max_shift=0.3))
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-2)
    losses = []
    for _ in range(60):                      # one fixed batch: the placement alone must fit it
        loss = F.cross_entropy(model(images, head(images, 4)), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.02
    assert all(p.grad is None for p in model.parameters())


def test_the_sketch_costs_a_fraction_of_a_token():
    config = sketch.SketchConfig()
    head = sketch.SketchPlacer(config)
    with FlopCounterMode(display=False) as counter:         # convolutions and matrix products
        head(torch.rand(1, 3, 32, 32), 7)
    ops = sketch.sketch_compute(config, 32, 7)
    elementwise = sum(side * side * c * (1 + cost.GELU) for side, c in ((16, 16), (8, 32),
                                                                           (4, 32)))
    matmul = cost.mlp_compute([66, 64, 2], rows=7)["matmul"]
    assert counter.get_total_flops() == ops["convolutions"] - elementwise + matmul
    cpu = spot.SPoTConfig(image_size=32, window=4, num_classes=10, dim=192, depth=6, heads=3)
    for n in (7, 15):
        whole = sketch.sketch_read_compute(cpu, config, n)
        assert whole["read"] == cost.forward_flops(cpu, n)
        extra = cost.compute_tokens(sum(whole.values()) - whole["read"], cpu)
        assert 0.1 < extra < 0.5                     # cheaper than one more token


def test_the_command_trains_saves_and_reloads(head_checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["--checkpoint", str(head_checkpoint), "--tokens", "4,7", "--train-limit", "64",
            "--epochs", "2", "--size", "8", "--channels", "8", "--width", "16",
            "--batch-size", "32", "--threads", "1", "--device", "cpu", "--no-progress",
            "--out", str(out)]
    assert sketch.main(argv) == 0
    assert "wrote" in capsys.readouterr().out
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2]
    assert {"val_sketch@4", "val_isotropic@5", "val_isotropic@8", "compute_tokens@7"} <= set(
        history[-1])
    head, tuned = sketch.load_sketch(out / "sketch.pt")
    state = torch.load(out / "sketch.pt", weights_only=True)
    assert state["epoch"] == 2 and head.config.channels == 8 and tuned is None
    model, dataset, _ = data.load_model_and_data(state["checkpoint"])
    split = (dataset.val.images, dataset.val.labels)
    for n in (4, 7):
        right, placed = sketch.sketch_split(model, head, split, n, "cpu", 64)
        assert stats.top1(right) == pytest.approx(history[-1][f"val_sketch@{n}"])
        images = dataset.val.images[:5].float() / 255
        assert torch.equal(sketch.place(model, head, images, n), placed[:5])
    tuned_out = tmp_path / "tuned"                           # --tune: the model learns too
    assert sketch.main(argv[:-1] + [str(tuned_out), "--tune", "--epochs", "1"]) == 0
    head, tuned = sketch.load_sketch(tuned_out / "sketch.pt")
    assert tuned is not None and not torch.equal(tuned.head.weight, model.head.weight)
    with pytest.raises(SystemExit) as used:                  # a folder with a sketch.pt
        sketch.main(argv)
    assert used.value.code == 2
    for bad in (["--tokens", "1"], ["--size", "6"], ["--channels", "3"], ["--max-shift", "0"]):
        with pytest.raises(SystemExit) as refused:
            sketch.main(argv[:-1] + [str(tmp_path / "other")] + bad)
        assert refused.value.code == 2
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt is not a sketch placer"):
        sketch.load_sketch(tmp_path / "junk.pt")


def test_the_frontier_judges_a_sketch_row(tmp_path, monkeypatch):
    """frontier.py --sketch (beside --move): a label-free "sketch" row per budget at one pass and
    the sketch's compute; an untrained placer is the lattice, so its answers are the isotropic
    prior's at N; a sketch.pt holding a tuned model is judged alone."""
    import oracle
    from argparse import Namespace
    from test_oracle import fake_dataset, write_checkpoint
    checkpoint = write_checkpoint(tmp_path / "checkpoint.pt", 0)
    model = spot.load_checkpoint(checkpoint)
    monkeypatch.setattr(oracle.data, "load_dataset", lambda *a, **k: fake_dataset())
    head = sketch.SketchPlacer(sketch.SketchConfig(size=8, channels=8, width=16))
    args = Namespace(checkpoint=checkpoint, tune=False)
    torch.save(sketch.saved(head, args, 1, model), tmp_path / "sketch.pt")
    argv = ["--checkpoint", checkpoint, "--tokens", "2,3,4,8", "--budgets", "3,4", "--k", "2",
            "--search-limit", "0", "--no-progress", "--device", "cpu",
            "--sketch", str(tmp_path / "sketch.pt")]
    assert frontier.main(argv + ["--out", str(tmp_path / "out")]) == 0
    results = json.loads((tmp_path / "out" / "frontier.json").read_text())
    rows = [r for r in results["rows"] if r["method"] == "sketch"]
    assert [r["budget"] for r in rows] == [3, 4] and all(r["label_free"] for r in rows)
    # an untrained placer places every image alike: another image's placement reads the same
    control = [r for r in results["rows"] if r["method"] == "sketch-shuffled"]
    assert [(r["top1"], r["compute_tokens"]) for r in control] == [
        (r["top1"], r["compute_tokens"]) for r in rows]
    for row in rows:
        point = next(p for p in results["curve"]
                     if p["prior"] == "isotropic" and p["tokens"] == row["budget"])
        assert row["top1"] == pytest.approx(point["top1"])
        drawn = sum(sketch.sketch_compute(head.config, model.config.image_size,
                                          row["budget"]).values())
        extra = cost.compute_tokens(drawn, model.config)            # the sketch, on top
        assert row["compute_tokens"] == pytest.approx(point["compute_tokens"] + extra)
    tuned = spot.load_checkpoint(checkpoint)
    torch.nn.init.zeros_(tuned.head.bias)
    torch.save(sketch.saved(head, Namespace(checkpoint=checkpoint, tune=True), 1, tuned),
               tmp_path / "tuned.pt")
    flags = Namespace(glimpses=None, ranker=None, move=None, sketch=str(tmp_path / "tuned.pt"),
                      learned=None, bank=None, device="cpu", checkpoint=checkpoint)
    evaluated, methods = frontier.load_designs(flags, model)
    assert torch.equal(evaluated.head.bias, tuned.head.bias) and len(methods) == 1
    flags.move = str(tmp_path / "sketch.pt")               # not a move head: named in the error
    with pytest.raises(ValueError, match="sketch.pt is not a move head"):
        frontier.load_designs(flags, model)


def test_a_placer_can_start_from_learned_layouts(head_checkpoint, tmp_path):
    """--start LEARNED.PT: an untrained placer places every image at the learned layout (its
    config keeps the layout as plain numbers, so sketch.pt alone rebuilds it); validation reads
    the start layout beside the sketch; a bank, or a learned.pt lacking a count, is refused."""
    from argparse import Namespace
    from experiments import layouts
    args = Namespace(checkpoint=str(head_checkpoint), tune=False)
    learned = layouts.LayoutBank(layouts.BankConfig(tokens=(4, 7)))
    torch.nn.init.uniform_(learned.offsets["7"], -0.1, 0.1)
    torch.save(layouts.saved(learned, args, 1), tmp_path / "learned.pt")
    bank = layouts.LayoutBank(layouts.BankConfig(tokens=(4, 7), choices=2))
    torch.save(layouts.saved(bank, args, 1), tmp_path / "bank.pt")
    start = sketch.start_layouts(tmp_path / "learned.pt", [7])
    head = sketch.SketchPlacer(sketch.SketchConfig(size=8, channels=8, width=16, start=start))
    images = torch.rand(3, 3, 16, 16)
    assert torch.equal(head(images, 7), learned.bank(7).detach()[0].expand(3, 7, 2))
    assert not torch.equal(head(images, 7)[0], spot.isotropic_positions(7))
    for path, counts in (("bank.pt", [7]), ("learned.pt", [5])):
        with pytest.raises(ValueError, match="--start: .* one per count of --tokens"):
            sketch.start_layouts(tmp_path / path, counts)
    out = tmp_path / "out"
    argv = ["--checkpoint", str(head_checkpoint), "--tokens", "7", "--train-limit", "64",
            "--epochs", "1", "--size", "8", "--channels", "8", "--width", "16",
            "--batch-size", "32", "--threads", "1", "--device", "cpu", "--no-progress",
            "--start", str(tmp_path / "learned.pt"), "--out", str(out)]
    assert sketch.main(argv) == 0
    history = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    model, dataset, _ = data.load_model_and_data(str(head_checkpoint))
    split = (dataset.val.images, dataset.val.labels)
    right = layouts.learned_split(model, learned, split, 7, "cpu", 32)
    assert history["val_start@7"] == pytest.approx(stats.top1(right))
    loaded = sketch.load_sketch(out / "sketch.pt")[0]
    assert torch.equal(loaded.start_positions(7), learned.bank(7).detach()[0])
    with pytest.raises(SystemExit) as refused:
        sketch.main(argv[:-3] + ["--start", str(tmp_path / "bank.pt"), "--out",
                                 str(tmp_path / "other")])
    assert refused.value.code == 2
