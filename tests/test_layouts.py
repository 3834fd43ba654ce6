"""experiments/layouts.py: a bank starts at the isotropic lattice and learns its layouts through
the frozen model; multiple choice learning trains each layout on the images it reads best and
the selector toward that layout; the choice costs a fraction of a token (against torch's FLOP
counter); the command saves what loads back; the frontier puts learned layouts on its curve and
judges a bank with its shuffled control."""
import json
from argparse import Namespace

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import data
import spot
import utils
from experiments import cost, frontier, layouts, stats
from test_sketch import tiny

pytestmark = pytest.mark.usefixtures("one_thread")      # conftest.py


def test_a_bank_starts_at_the_lattice_and_picks_per_image():
    single = layouts.LayoutBank(layouts.BankConfig(tokens=(4, 7)))
    images = torch.rand(3, 3, 16, 16)
    for n in (4, 7):                             # one layout: the lattice, for every image
        assert torch.equal(single(images, n), spot.isotropic_positions(n).expand(3, n, 2))
    with pytest.raises(ValueError, match="n_tokens: this bank holds layouts for"):
        single(images, 5)
    bank = layouts.LayoutBank(layouts.BankConfig(tokens=(4, 7), choices=3, size=8, channels=8))
    layout = bank.bank(7)                                                     # (M, N, 2)
    assert torch.equal(layout[0], spot.isotropic_positions(7))               # layout 0: lattice
    jitter = (layout[1:] - spot.isotropic_positions(7)).abs()
    assert 0 < jitter.max() <= 0.25 / 7 ** 0.5 + 1e-6                       # half a cell x 0.5
    torch.nn.init.zeros_(bank.select.weight)
    bank.select.bias.data = torch.tensor([0.0, 0, 1, 0, 1, 0])  # count 4 -> layout 2, 7 -> 1
    assert torch.equal(bank(images, 4), bank.bank(4)[2].expand(3, 4, 2))
    assert torch.equal(bank(images, 7), bank.bank(7)[1].expand(3, 7, 2))


def test_multiple_choice_learning_trains_the_best_layout_and_the_selector():
    model = tiny().requires_grad_(False)
    images, labels = torch.rand(8, 3, 16, 16), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    bank = layouts.LayoutBank(layouts.BankConfig(tokens=(4,), choices=2, size=8, channels=8))
    args = Namespace(tokens=[4])
    loss = layouts.step_loss(model, bank, images, labels, args, torch.Generator(), 0)
    loss.backward()
    # by hand: each image's cross-entropy at each layout, the winner weighted 1 - RELAX
    each = torch.stack([torch.nn.functional.cross_entropy(
        model(images, layout.expand(8, 4, 2)), labels, reduction="none")
        for layout in bank.bank(4).detach()], 1)                              # (B, M)
    best = each.argmin(1)
    weights = torch.nn.functional.one_hot(best, 2) * (1 - layouts.RELAX) + layouts.RELAX / 2
    select = torch.nn.functional.cross_entropy(bank.scores(images, 4), best)
    assert loss.item() == pytest.approx(((weights * each).sum(1).mean() + select).item())
    assert bank.offsets["4"].grad.abs().sum() > 0 and bank.select.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())
    torch.manual_seed(0)                       # a single layout fits a fixed batch by moving
    single = layouts.LayoutBank(layouts.BankConfig(tokens=(4,)))
    optimizer = torch.optim.Adam(single.parameters(), lr=3e-2)
    losses = []
    for _ in range(40):
        loss = layouts.step_loss(model, single, images, labels, args, torch.Generator(), 0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.02


def test_the_choice_costs_a_fraction_of_a_token():
    config = layouts.BankConfig(tokens=(7, 15), choices=4)
    bank = layouts.LayoutBank(config)
    with FlopCounterMode(display=False) as counter:         # convolutions and matrix products
        bank.scores(torch.rand(1, 3, 32, 32), 7)
    ops = layouts.bank_compute(config, 32)
    elementwise = sum(side * side * c * (1 + cost.GELU) for side, c in ((16, 16), (8, 32),
                                                                           (4, 32)))
    # torch counts the whole linear layer (both counts' logits); ours, one count's M
    assert counter.get_total_flops() == (ops["convolutions"] - elementwise
                                         + 2 * 32 * 4 * len(config.tokens))
    assert ops["select"] == 4 * (2 * 32 + 1)
    assert layouts.bank_compute(layouts.BankConfig(), 32) == {}   # one layout: nothing to choose
    cpu = spot.SPoTConfig(image_size=32, window=4, num_classes=10, dim=192, depth=6, heads=3)
    whole = layouts.bank_read_compute(cpu, config, 7)
    assert whole["read"] == cost.forward_flops(cpu, 7)
    assert 0.1 < cost.compute_tokens(sum(whole.values()) - whole["read"], cpu) < 0.5


def test_the_command_trains_saves_and_reloads(head_checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["--checkpoint", str(head_checkpoint), "--tokens", "4,7", "--choices", "2",
            "--train-limit", "64", "--epochs", "2", "--size", "8", "--channels", "8",
            "--batch-size", "32", "--threads", "1", "--device", "cpu", "--no-progress",
            "--out", str(out)]
    assert layouts.main(argv) == 0
    assert "wrote" in capsys.readouterr().out
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2]
    assert {"val_bank@4", "val_shuffled@7", "val_oracle@7", "val_layout1@4",
            "val_isotropic@7", "compute_tokens@7"} <= set(history[-1])
    bank, tuned = layouts.load_bank(out / "bank.pt")
    state = torch.load(out / "bank.pt", weights_only=True)
    assert state["epoch"] == 2 and bank.config.tokens == (4, 7) and tuned is None
    model, dataset, _ = data.load_model_and_data(state["checkpoint"])
    split = (dataset.val.images, dataset.val.labels)
    for n in (4, 7):
        right, chosen = layouts.bank_split(model, bank, split, n, "cpu", 64)
        rows = torch.arange(len(chosen))
        assert stats.top1(right[rows, chosen]) == pytest.approx(history[-1][f"val_bank@{n}"])
        assert stats.top1(right.any(1)) == pytest.approx(history[-1][f"val_oracle@{n}"])
        images = dataset.val.images[:5].float() / 255
        assert torch.equal(layouts.place(model, bank, images, n), bank.bank(n)[chosen[:5]])
    with pytest.raises(SystemExit) as used:                  # a folder with a bank.pt
        layouts.main(argv)
    assert used.value.code == 2
    for bad in (["--tokens", "1"], ["--size", "6"], ["--channels", "3"], ["--choices", "0"],
                ["--tune"]):
        with pytest.raises(SystemExit) as refused:
            layouts.main(argv[:-1] + [str(tmp_path / "other")] + bad)
        assert refused.value.code == 2
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt is not a layout bank"):
        layouts.load_bank(tmp_path / "junk.pt")


def test_the_frontier_puts_learned_layouts_on_its_curve_and_judges_a_bank(tmp_path, monkeypatch,
                                                                          capsys):
    """--learned: a prior "learned" at its counts (a layout moved off the lattice reads what the
    model reads there); --bank: "layout-bank" rows at the counts it holds and their shuffled
    control, at the choice's compute; each file refused under the other flag."""
    import oracle
    from test_oracle import fake_dataset, write_checkpoint
    checkpoint = write_checkpoint(tmp_path / "checkpoint.pt", 0)
    model = spot.load_checkpoint(checkpoint)
    monkeypatch.setattr(oracle.data, "load_dataset", lambda *a, **k: fake_dataset())
    args = Namespace(checkpoint=checkpoint, tune=False)
    learned = layouts.LayoutBank(layouts.BankConfig(tokens=(3,)))
    torch.nn.init.uniform_(learned.offsets["3"], -0.2, 0.2)
    torch.save(layouts.saved(learned, args, 1), tmp_path / "learned.pt")
    bank = layouts.LayoutBank(layouts.BankConfig(tokens=(4,), choices=2, size=8, channels=8))
    torch.save(layouts.saved(bank, args, 1), tmp_path / "bank.pt")
    argv = ["--checkpoint", checkpoint, "--tokens", "2,3,4,8", "--budgets", "3,4", "--k", "2",
            "--search-limit", "0", "--no-progress", "--device", "cpu",
            "--learned", str(tmp_path / "learned.pt"), "--bank", str(tmp_path / "bank.pt")]
    assert frontier.main(argv + ["--out", str(tmp_path / "out")]) == 0
    results = json.loads((tmp_path / "out" / "frontier.json").read_text())
    point = next(p for p in results["curve"] if p["prior"] == "learned")
    dataset = fake_dataset()
    split = (dataset.test.images, dataset.test.labels)
    config = Namespace(device="cpu", batch_size=64, bf16=False)
    positions = learned.bank(3)[0].detach().expand(len(split[1]), 3, 2)
    assert point["top1"] == pytest.approx(stats.top1(oracle.hits(model, split, positions,
                                                                 config)))
    assert point["tokens"] == 3 and [p["tokens"] for p in results["curve"]
                                     if p["prior"] == "learned"] == [3]
    row = next(r for r in results["rows"] if r["method"] == "learned-layout")
    assert (row["budget"], row["top1"]) == (3, point["top1"])   # judged against the others
    assert row["prior"] != "learned" and row["prior_tokens"] <= 3
    bits = utils.load_per_image(tmp_path / "out" / "per_image.npz")
    assert torch.equal(torch.as_tensor(bits["top1", "learned-layout", 3]),
                       torch.as_tensor(bits["top1", "prior", "learned", 3]))
    rows = [r for r in results["rows"] if r["method"] in ("layout-bank", "bank-shuffled")]
    assert [(r["method"], r["budget"]) for r in rows] == [("layout-bank", 4),
                                                          ("bank-shuffled", 4)]
    right, chosen = layouts.bank_split(model, bank, split, 4, "cpu", 64)
    assert rows[0]["top1"] == pytest.approx(stats.top1(right[torch.arange(len(chosen)), chosen]))
    extra = cost.compute_tokens(sum(layouts.bank_compute(bank.config, 16).values()),
                                model.config)
    curve_4 = next(p for p in results["curve"] if p["prior"] == "isotropic" and p["tokens"] == 4)
    assert rows[0]["compute_tokens"] == pytest.approx(curve_4["compute_tokens"] + extra)
    for flag, path, named in (("--learned", "bank.pt", "--bank"),
                              ("--bank", "learned.pt", "--learned")):
        with pytest.raises(SystemExit) as refused:
            frontier.main(argv[:-4] + [flag, str(tmp_path / path), "--out",
                                       str(tmp_path / f"bad{flag}")])
        assert refused.value.code == 2
        assert f"pass it as {named}" in capsys.readouterr().err
