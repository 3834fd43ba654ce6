"""experiments/move.py: an untrained head moves nothing (the move is then the N-token prior read
twice); the head learns through the frozen model and the bilinear sampler; a move costs two
passes and the head, counted against torch's FLOP counter; the command line trains, saves what
loads back (weights_only) and refuses bad flags; the frontier judges its row."""
import json

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import data
import spot
from experiments import cost, frontier, move, placement, ranker, stats

pytestmark = pytest.mark.usefixtures("one_thread")      # conftest.py


def tiny(seed=0):
    torch.manual_seed(seed)
    config = spot.SPoTConfig(image_size=16, window=4, num_classes=3, dim=32, depth=2, heads=2)
    return spot.SPoTViT(config).eval()


@pytest.mark.parametrize("reuse", [False, True])
def test_an_untrained_head_moves_nothing(reuse):
    # fresh: pass 2 reads the lattice again. reuse: pass 2's tokens and class token duplicate
    # pass 1's, and each key with its value appears exactly twice, which weighs as once -- so
    # pass 2 is pass 1, block by block, and the answer is the N-token prior's
    model, head = tiny(), move.MoveHead(move.MoveConfig(dim=32, width=16, reuse=reuse))
    images = torch.rand(3, 3, 16, 16)
    for n in (4, 9):
        logits, moved = move.move(model, head, images, n)
        lattice = spot.isotropic_positions(n).expand(3, n, 2)
        assert torch.equal(moved, lattice)
        assert torch.allclose(logits, model(images, lattice), atol=1e-5)
    head.mlp[-1].bias.data = torch.tensor([0.3, -0.2])           # every token moves the same way
    logits, moved = move.move(model, head, images, 4)
    shift = 0.25 * torch.tanh(torch.tensor([0.3, -0.2]))             # max_shift 0.25
    assert torch.allclose(moved[0], (spot.isotropic_positions(4) + shift).clamp(0, 1))
    fresh = model(images, moved)
    assert torch.allclose(logits, fresh, atol=1e-5) != reuse     # reuse also sees pass 1


def test_a_move_is_bounded_and_learns_through_the_frozen_model():
    model = tiny().requires_grad_(False)
    head = move.MoveHead(move.MoveConfig(dim=32, width=16, max_shift=0.2))
    torch.nn.init.normal_(head.mlp[-1].weight, std=10.0)            # large moves: tanh saturates
    images, labels = torch.rand(8, 3, 16, 16), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    moved = move.move(model, head, images, 4)[1]
    lattice = spot.isotropic_positions(4).expand(8, 4, 2)
    assert (moved - lattice).abs().max() <= 0.2 + 1e-6 and 0 <= moved.min() <= moved.max() <= 1
    assert (moved - lattice).abs().max() > 0.1
    for reuse in (False, True):
        torch.manual_seed(0)
        head = move.MoveHead(move.MoveConfig(dim=32, width=16, max_shift=0.3, reuse=reuse))
        optimizer = torch.optim.Adam(head.parameters(), lr=1e-2)
        losses = []
        for _ in range(60):                  # one fixed batch: the moves alone must fit it
            loss = F.cross_entropy(move.move(model, head, images, 4)[0], labels)
            optimizer.zero_grad()
            loss.backward()
            assert all(p.grad is not None for p in head.parameters())
            optimizer.step()
            losses.append(loss.item())
        assert losses[-1] < losses[0] - 0.02         # (0.07 fresh, 0.04 with reuse)
        assert all(p.grad is None for p in model.parameters())


def test_a_move_costs_two_passes_and_the_head():
    model = tiny()
    config = move.MoveConfig(dim=32, width=16)
    head = move.MoveHead(config)
    tokens = torch.randn(2, 1 + 6, 32)
    with FlopCounterMode(display=False) as counter:         # matrix products only
        head(tokens, torch.rand(2, 6, 2))
    ops = move.move_compute(model.config, config, 6)
    assert ops["first"] == ops["second"] == cost.forward_flops(model.config, 6)
    assert ops["cross_attention"] == 0
    reuse = move.move_compute(model.config, move.MoveConfig(dim=32, width=16, reuse=True), 6)
    placer = placement.PlacerConfig((16, 16), 4, 32, glance_fraction=0.5)
    assert reuse["cross_attention"] == cost.glimpse_compute(model.config, placer,
                                                                12)["cross_attention"] > 0
    matmul = cost.mlp_compute([64, 16, 16, 2], rows=6)["matmul"]
    assert counter.get_total_flops() == 2 * matmul                  # two images
    assert matmul < ops["head"] < 2 * matmul
    cpu = spot.SPoTConfig(image_size=32, window=4, num_classes=10, dim=192, depth=6, heads=3)
    for n in (4, 8, 16):
        ops = move.move_compute(cpu, move.MoveConfig(dim=192), n)
        assert 2 * n < cost.compute_tokens(sum(ops.values()), cpu) < 2 * n + 2
        assert cost.compute_tokens(ops["head"], cpu) < n / 32         # the head is cheap


def test_the_command_trains_saves_and_reloads(head_checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["--checkpoint", str(head_checkpoint), "--tokens", "4,8", "--train-limit", "64",
            "--epochs", "2", "--width", "16", "--batch-size", "32", "--threads", "1",
            "--device", "cpu", "--no-progress", "--out", str(out)]
    assert move.main(argv) == 0
    assert "wrote" in capsys.readouterr().out
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2]
    assert {"val_move@4", "val_isotropic@8", "val_isotropic@16"} <= set(history[-1])
    head, tuned = move.load_move(out / "move.pt")
    state = torch.load(out / "move.pt", weights_only=True)
    assert state["epoch"] == 2 and head.config.width == 16 and tuned is None
    model, dataset, _ = data.load_model_and_data(state["checkpoint"])
    split = (dataset.val.images, dataset.val.labels)
    for n in (4, 8):
        right, moved = move.move_split(model, head, split, n, "cpu", 64)
        assert stats.top1(right) == pytest.approx(history[-1][f"val_move@{n}"])
        images = dataset.val.images[:5].float() / 255
        assert torch.equal(move.place(model, head, images, n), moved[:5])
    tuned_out = tmp_path / "tuned"                           # --tune: the model learns too
    assert move.main(argv[:-1] + [str(tuned_out), "--tune", "--reuse", "--epochs", "1"]) == 0
    head, tuned = move.load_move(tuned_out / "move.pt")
    assert head.config.reuse and tuned is not None
    assert not torch.equal(tuned.head.weight, model.head.weight)
    last = json.loads((tuned_out / "metrics.jsonl").read_text().splitlines()[-1])
    right = move.move_split(tuned, head, split, 8, "cpu", 64)[0]
    assert stats.top1(right) == pytest.approx(last["val_move@8"])
    with pytest.raises(SystemExit) as used:                  # a folder with a move.pt
        move.main(argv)
    assert used.value.code == 2
    for bad in (["--tokens", "1"], ["--max-shift", "0"], ["--width", "0"]):
        with pytest.raises(SystemExit) as refused:
            move.main(argv[:-1] + [str(tmp_path / "other")] + bad)
        assert refused.value.code == 2
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt is not a move head"):
        move.load_move(tmp_path / "junk.pt")


def test_the_frontier_judges_a_learned_move_row(tmp_path, monkeypatch):
    """frontier.py --move (and --ranker beside it): a label-free "learned-move" row per budget,
    at two passes' compute; an untrained head is the N-token prior read twice, so its answers
    are the isotropic prior's at N; beside --glimpses it is refused."""
    import oracle
    from argparse import Namespace
    from test_oracle import fake_dataset, write_checkpoint
    checkpoint = write_checkpoint(tmp_path / "checkpoint.pt", 0)
    model = spot.load_checkpoint(checkpoint)
    monkeypatch.setattr(oracle.data, "load_dataset", lambda *a, **k: fake_dataset())
    head = move.MoveHead(move.MoveConfig(dim=model.config.dim, width=16))
    torch.save(move.saved(head, Namespace(checkpoint=checkpoint), 1), tmp_path / "move.pt")
    chooser = ranker.GlanceRanker(model.config.dim, 16, 0.5)
    chooser.add(8, ranker.candidate_pool(model.config, 8, 4, 3))
    args = Namespace(bank=3, pool=3, train_limit=1, epochs=1, lr=1e-3, temperature=0.3, seed=0,
                     checkpoint=checkpoint)
    torch.save(ranker.saved(chooser, args), tmp_path / "ranker.pt")
    argv = ["--checkpoint", checkpoint, "--tokens", "2,4,8,16", "--budgets", "4,8", "--k", "2",
            "--search-limit", "0", "--no-progress", "--device", "cpu",
            "--move", str(tmp_path / "move.pt"), "--ranker", str(tmp_path / "ranker.pt")]
    assert frontier.main(argv + ["--out", str(tmp_path / "out")]) == 0
    results = json.loads((tmp_path / "out" / "frontier.json").read_text())
    rows = [r for r in results["rows"] if r["method"] == "learned-move"]
    assert [r["budget"] for r in rows] == [4, 8]
    for row in rows:
        assert row["label_free"] and row["n_images"] == 12
        assert 2 * row["budget"] < row["compute_tokens"] < 2 * row["budget"] + 2
        point = next(p for p in results["curve"]
                     if p["prior"] == "isotropic" and p["tokens"] == row["budget"])
        assert row["top1"] == pytest.approx(point["top1"])
    ranked = [r["budget"] for r in results["rows"] if r["method"] == "glance-and-rank"]
    assert ranked == [8]                                 # the budgets the ranker was trained for
    tuned = spot.load_checkpoint(checkpoint)                 # a move.pt with a tuned model
    torch.nn.init.zeros_(tuned.head.bias)
    torch.nn.init.ones_(tuned.head.weight)
    torch.save(move.saved(head, Namespace(checkpoint=checkpoint, tune=True), 1, tuned),
               tmp_path / "tuned.pt")
    flags = Namespace(glimpses=None, ranker=None, move=str(tmp_path / "tuned.pt"), sketch=None,
                      learned=None, bank=None, device="cpu", checkpoint=checkpoint)
    evaluated, methods = frontier.load_designs(flags, model)
    assert torch.equal(evaluated.head.weight, tuned.head.weight) and len(methods) == 1
    flags.ranker = str(tmp_path / "ranker.pt")               # it replaces what the ranker reads
    with pytest.raises(ValueError, match="holds a tuned model"):
        frontier.load_designs(flags, model)
    glimpses_pt = tmp_path / "g.pt"
    glimpses_pt.write_bytes(b"")                         # refused before it is read
    with pytest.raises(SystemExit) as refused:
        frontier.main(argv + ["--glimpses", str(glimpses_pt), "--out", str(tmp_path / "x")])
    assert refused.value.code == 2
