"""experiments/ranker.py: a bank of candidate 0 alone is the glimpses reading of the lattice with
an untrained placer; the bank grows greedily for coverage; the ranker learns a synthetic ranking
from cached features and losses; a ranked read costs about one N-token pass; the command line
trains, saves what loads back (weights_only) and refuses bad flags; the frontier judges it."""
import json

import pytest
import torch
import torch.nn.functional as F

import data
import spot
from experiments import cost, frontier, glimpses, placement, ranker, stats

pytestmark = pytest.mark.usefixtures("one_thread")      # conftest.py


def tiny(seed=0):
    torch.manual_seed(seed)
    config = spot.SPoTConfig(image_size=16, window=4, num_classes=3, dim=32, depth=2, heads=2)
    return spot.SPoTViT(config).eval()


def test_a_bank_of_candidate_0_alone_is_the_glimpses_reading_of_the_lattice():
    model = tiny()
    config = placement.PlacerConfig((16, 16), 4, 32, width=16, glance_fraction=0.5)
    placer = placement.GlancePlacer(config).eval()
    images = torch.rand(3, 3, 16, 16)
    for n in (5, 8):
        bank = ranker.candidate_pool(model.config, n, placement.glance_size(n, 0.5), 4)
        alone = ranker.GlanceRanker(32, 16, 0.5)
        alone.add(n, bank[:1])
        with torch.no_grad():
            logits, positions = ranker.place(model, alone.eval(), images, n)
            expected, where = glimpses.glimpse(model, placer, images, n)
        assert torch.equal(logits, expected) and torch.equal(positions, where)
        lattice = placement.split_lattice(n, placement.glance_size(n, 0.5))
        assert torch.equal(positions[0], torch.cat(lattice))    # glance, then the lattice's rest
    # a bank of two: each image reads the candidate its score picks, nothing else
    two = ranker.GlanceRanker(32, 16, 0.5)
    two.add(8, bank[:2])
    torch.nn.init.zeros_(two.scorers["8"][-1].weight)
    two.scorers["8"][-1].bias.data = torch.tensor([0.0, 1.0])
    with torch.no_grad():
        positions = ranker.place(model, two.eval(), images, 8)[1]
    assert torch.equal(positions[:, 4:], bank[1].expand(3, -1, -1))


def test_the_bank_grows_greedily_for_coverage():
    right = torch.tensor([[1, 1, 0, 0, 0, 0],      # 0: always first
                          [1, 1, 1, 0, 0, 0],      # 1: adds 1 image, 3 right
                          [0, 0, 0, 1, 1, 0],      # 2: adds 2, 2 right
                          [0, 0, 1, 1, 1, 0],      # 3: adds 3: second
                          [0, 0, 0, 0, 0, 1],      # 4: adds the last image, 1 right
                          [0, 0, 1, 0, 0, 1],      # 5: adds it too, 2 right: third
                          [1, 1, 1, 0, 0, 0]], dtype=torch.bool)   # 6: 1's twin, later in pool
    # then nothing adds coverage: by accuracy (1 before its twin 6 by pool order), then 2, 4
    assert ranker.grow_bank(right, 7) == [0, 3, 5, 1, 6, 2, 4]
    assert ranker.grow_bank(right, 3) == [0, 3, 5]
    assert ranker.coverage(right, [0, 3, 5]) == pytest.approx([100 / 3, 500 / 6, 100])
    g = torch.Generator().manual_seed(0)
    noisy = torch.rand(20, 50, generator=g) < 0.3
    bank = ranker.grow_bank(noisy, 10)
    curve = ranker.coverage(noisy, bank)
    assert bank[0] == 0 and len(set(bank)) == 10
    assert all(a <= b for a, b in zip(curve, curve[1:])) and curve[-1] > curve[0]


def test_the_ranker_learns_which_candidate_suits_which_features():
    g = torch.Generator().manual_seed(0)
    features = torch.randn(1536, 8, generator=g)
    best = features[:, :3].argmax(1)                                 # the candidate to pick
    losses = 2 - 1.5 * F.one_hot(best, 3).float() + 0.1 * torch.rand(1536, 3, generator=g)
    torch.manual_seed(0)
    mlp = ranker.scorer(8, 16, 3)
    history = ranker.fit_scorer(mlp, features[:1024], losses[:1024], epochs=15, lr=3e-3)
    assert history[-1] < 0.9 * history[0]
    with torch.no_grad():
        picked = mlp(features[1024:]).argmax(1)                      # unseen features
    held_out = losses[1024:]
    assert held_out.gather(1, picked[:, None]).mean() < held_out[:, 0].mean() - 0.5


def test_a_ranked_read_costs_about_one_pass():
    config = tiny().config
    for n in (8, 16):
        ops = ranker.ranker_compute(config, n, 0.5, 16, 4)
        g = placement.glance_size(n, 0.5)
        assert ops["glance"] == cost.forward_flops(config, g)
        assert ops["second"] == cost.forward_flops(config, n - g)
        placer = placement.PlacerConfig((16, 16), 4, 32, width=16, glance_fraction=0.5)
        cross = cost.glimpse_compute(config, placer, n)["cross_attention"]
        assert ops["cross_attention"] == cross > 0
        mlp = sum(cost.mlp_compute([32, 16, 4]).values())
        assert ops["ranker"] == mlp + cost.LAYERNORM * 32 + cost.LAYERNORM_ROW
        one_pass = cost.forward_flops(config, n) + ops["ranker"]
        assert 1 < sum(ops.values()) / one_pass < (1.12 if n == 8 else 1.05)
        assert n < cost.compute_tokens(sum(ops.values()), config) < n + 2


@pytest.fixture
def checkpoint(head_checkpoint):
    return head_checkpoint                        # conftest.py's tiny model with a val split


def test_the_command_ranks_saves_and_reloads(checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["--checkpoint", str(checkpoint), "--tokens", "4,8", "--bank", "3", "--pool", "6",
            "--train-limit", "64", "--epochs", "2", "--width", "16", "--batch-size", "32",
            "--threads", "1", "--device", "cpu", "--no-progress", "--out", str(out)]
    assert ranker.main(argv) == 0
    assert "oracle of B" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())["budgets"]
    assert set(metrics) == {"4", "8"} and metrics["8"]["bank"][0] == 0
    assert len(metrics["8"]["train_loss"]) == 2 and sum(metrics["8"]["ranker_choices"]) == 64
    assert metrics["8"]["oracle_of_bank"] >= metrics["8"]["best_single"] >= 0
    loaded, state = ranker.load_ranker(out / "ranker.pt")
    assert state["banks"][8].shape == (3, 4, 2) and state["config"]["pool"] == 6
    model, dataset, _ = data.load_model_and_data(state["checkpoint"])
    val = dataset.val
    for n in (4, 8):
        right = ranker.rank_split(model, loaded, (val.images, val.labels), n, "cpu", 64)[0]
        assert stats.top1(right) == pytest.approx(metrics[str(n)]["ranker"])
    with pytest.raises(SystemExit) as used:                  # a folder with a ranker.pt
        ranker.main(argv)
    assert used.value.code == 2
    for bad in (["--bank", "1"], ["--pool", "2"], ["--tokens", "1"]):
        with pytest.raises(SystemExit) as refused:
            ranker.main(argv[:-1] + [str(tmp_path / "other")] + bad)
        assert refused.value.code == 2


def test_the_frontier_judges_a_glance_and_rank_row(tmp_path, monkeypatch):
    import oracle
    from argparse import Namespace
    from test_oracle import fake_dataset, write_checkpoint
    checkpoint = write_checkpoint(tmp_path / "checkpoint.pt", 0)
    model = spot.load_checkpoint(checkpoint)
    monkeypatch.setattr(oracle.data, "load_dataset", lambda *a, **k: fake_dataset())
    dataset = fake_dataset()
    trained = ranker.GlanceRanker(model.config.dim, 16, 0.5)
    for n in (4, 8):
        trained.add(n, ranker.candidate_pool(model.config, n, n // 2, 3))
    args = Namespace(bank=3, pool=3, train_limit=1, epochs=1, lr=1e-3, temperature=0.3, seed=0,
                     checkpoint=checkpoint)
    state = ranker.saved(trained, args)
    config = frontier.FrontierConfig(checkpoint=checkpoint, tokens=(2, 4, 8), budgets=(4, 8),
                                     k=(2,), search_limit=0, progress=False)
    results, per_image = frontier.evaluate(model, dataset, config,
                                           methods=(frontier.rank_rows(ranker.from_saved(state)),))
    rows = [r for r in results["rows"] if r["method"] == "glance-and-rank"]
    assert [r["budget"] for r in rows] == [4, 8]
    for row in rows:
        assert row["label_free"] and row["n_images"] == 12
        assert row["budget"] < row["compute_tokens"] < row["budget"] + 2
    assert ("top1", "glance-and-rank", 8) in per_image
