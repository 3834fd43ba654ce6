"""experiments/glimpses.py: two passes whose second attends to the first's cached keys and values
is exactly one pass with attention masked causally between the two groups (an independent,
written-out reference); one pass without memory is the model's own forward; an untrained head
places its tokens on the lattice; --freeze leaves the model's weights as they were; the command
line trains, validates and saves what loads back."""
import json

import pytest
import torch

import spot
from experiments import glimpses, placement

pytestmark = pytest.mark.usefixtures("one_thread")      # conftest.py


def tiny(seed=0):
    torch.manual_seed(seed)
    config = spot.SPoTConfig(image_size=16, window=4, num_classes=3, dim=32, depth=2, heads=2)
    return spot.SPoTViT(config).double().eval()


def masked_reference(model, x, n_first):
    """x (B, T, dim) through every block with attention written out: the first n_first tokens
    attend to themselves only, the rest to every token."""
    allowed = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool)
    allowed[:n_first, n_first:] = False
    for block in model.blocks:
        heads, (B, T, D) = block.attn.heads, x.shape
        q, k, v = block.attn.qkv(block.norm1(x)).reshape(B, T, 3, heads, D // heads).unbind(2)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / (D // heads) ** 0.5
        weights = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        read = torch.einsum("bhqk,bkhd->bqhd", weights, v).reshape(B, T, D)
        x = x + block.attn.proj(read)
        x = x + block.mlp(block.norm2(x))
    return x


def test_one_pass_without_memory_is_the_models_forward():
    model = tiny()
    images = torch.rand(2, 3, 16, 16, dtype=torch.float64)
    positions = torch.rand(2, 5, 2, dtype=torch.float64)
    x, cache = glimpses.run_blocks(model, glimpses.embed(model, images, positions))
    ours = model.forward_head(model.norm(x))
    assert torch.allclose(ours, model(images, positions), atol=1e-12)
    assert len(cache) == 2 and cache[0][0].shape == (2, 2, 6, 16)        # (B, heads, 1 + N, d)


def test_the_second_pass_reads_the_first_as_a_block_causal_pass():
    model = tiny(1)
    images = torch.rand(2, 3, 16, 16, dtype=torch.float64)
    first = glimpses.embed(model, images, torch.rand(2, 3, 2, dtype=torch.float64))   # 1 + 3
    second = glimpses.embed(model, images, torch.rand(2, 4, 2, dtype=torch.float64))  # 1 + 4
    out1, memory = glimpses.run_blocks(model, first)
    out2, _ = glimpses.run_blocks(model, second, memory)
    reference = masked_reference(model, torch.cat([first, second], 1), first.shape[1])
    assert torch.allclose(out1, reference[:, :4], atol=1e-12)
    assert torch.allclose(out2, reference[:, 4:], atol=1e-12)
    # and it is not the full pass: the first group would have seen the second
    full, _ = glimpses.run_blocks(model, torch.cat([first, second], 1))
    assert not torch.allclose(full[:, 4:], out2, atol=1e-6)


def test_an_untrained_head_places_on_the_lattice_and_gradients_reach_it():
    model = tiny().float()
    config = placement.PlacerConfig((16, 16), 4, 32, width=16, glance_fraction=0.5)
    placer = placement.GlancePlacer(config)
    images = torch.rand(3, 3, 16, 16)
    logits, positions = glimpses.glimpse(model, placer, images, 8)
    glance, base = placement.split_lattice(8, 4)
    assert logits.shape == (3, 3) and positions.shape == (3, 8, 2)
    assert torch.equal(positions[0], torch.cat([glance, base]))
    logits.sum().backward()                   # through the sampler and the queries to the head
    assert placer.mlp[-1].weight.grad.abs().sum() > 0


@pytest.fixture
def checkpoint(head_checkpoint):
    return head_checkpoint                        # conftest.py's tiny model with a val split


@pytest.mark.parametrize("freeze", [True, False])
def test_the_command_trains_validates_and_saves(checkpoint, tmp_path, freeze):
    out = tmp_path / "out"
    argv = ["--checkpoint", str(checkpoint), "--tokens", "4,8", "--epochs", "1", "--width", "16",
            "--batch-size", "64", "--no-progress", "--out", str(out)]
    assert glimpses.main(argv + (["--freeze"] if freeze else [])) == 0
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"val_glimpses@4", "val_isotropic@8", "train_loss"} <= set(metrics[-1])
    model, placer = glimpses.load_glimpses(out / "glimpses.pt")
    original = spot.load_checkpoint(checkpoint)
    same = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                  original.state_dict().values()))
    assert same == freeze                       # --freeze: the model's weights untouched
    assert placer.mlp[-1].weight.abs().sum() > 0                     # the head learned
    with pytest.raises(SystemExit):                                  # a used folder is refused
        glimpses.main(argv)


def test_glimpse_compute_counts_what_flop_counter_counts():
    """cost.glimpse_compute's matrix products are FlopCounterMode's count of one glimpse
    (pass 1's head, which glimpse skips, taken off); all of it is about one N-token pass."""
    from torch.utils.flop_counter import FlopCounterMode
    from experiments import cost
    model = tiny().float().requires_grad_(False)
    config = placement.PlacerConfig((16, 16), 4, 32, width=16, heads=4, glance_fraction=0.5)
    placer = placement.GlancePlacer(config).eval()
    images = torch.rand(1, 3, 16, 16)
    for n in (4, 8, 13):
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            glimpses.glimpse(model, placer, images, n)
        g = placement.glance_size(n, 0.5)
        ops = cost.glimpse_compute(model.config, config, n)
        passes = [cost.compute(model.config, t) for t in (g, n - g)]
        matmul = sum(p[op] for p in passes for op in cost.MATMULS) - passes[0]["head"]
        heads = model.config.depth * 2 * 2 * (n - g + 1) * (g + 1) * model.config.dim
        w, k, m = 16, n - g, g + 1
        head = 2 * k * w * w + 2 * m * 32 * 2 * w + 2 * k * w * w + 2 * k * (w * 2 * w + 2 * w * 2)
        # (the head's own attention, 2 * 2 * k * m * w, runs in torch's fused CPU kernel, which
        # FlopCounterMode counts as 0 in this torch; glimpse_compute counts it)
        assert counter.get_total_flops() == matmul + heads + head, n
        worth = cost.compute_tokens(sum(ops.values()), model.config)
        assert n < worth < n + 3                       # two class tokens, the head, the cache


def test_the_frontier_evaluates_a_glimpses_model(tmp_path, monkeypatch):
    """frontier.py --glimpses: the glimpses.pt model's own prior curve and a 'glimpses' row per
    budget, label-free, judged against that curve; a glimpses.pt of another model is refused."""
    import oracle
    from argparse import Namespace
    from experiments import frontier
    from test_oracle import fake_dataset, tiny_model, write_checkpoint
    checkpoint = write_checkpoint(tmp_path / "checkpoint.pt", 0)
    model = spot.load_checkpoint(checkpoint)
    config = placement.PlacerConfig((16, 16), 4, model.config.dim, width=16, glance_fraction=0.5)
    args = Namespace(checkpoint=checkpoint, tokens=[4], freeze=True)
    torch.save(glimpses.saved(placement.GlancePlacer(config), args, 1, model), tmp_path / "g.pt")
    monkeypatch.setattr(oracle.data, "load_dataset", lambda *a, **k: fake_dataset())
    argv = ["--checkpoint", checkpoint, "--tokens", "2,4,8", "--budgets", "4", "--k", "2",
            "--search-limit", "0", "--no-progress", "--device", "cpu"]
    assert frontier.main(argv + ["--glimpses", str(tmp_path / "g.pt"), "--out",
                                 str(tmp_path / "out")]) == 0
    rows = json.loads((tmp_path / "out" / "frontier.json").read_text())["rows"]
    row = next(r for r in rows if r["method"] == "glimpses")
    assert row["label_free"] and row["budget"] == 4 and 4 < row["compute_tokens"] < 7
    other = tiny_model(num_classes=5)
    torch.save(glimpses.saved(placement.GlancePlacer(config), args, 1, other), tmp_path / "o.pt")
    with pytest.raises(SystemExit):
        frontier.main(argv + ["--glimpses", str(tmp_path / "o.pt"), "--out", str(tmp_path / "x")])
