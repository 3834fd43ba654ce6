"""experiments.frontier: the FLOPs count against torch's FlopCounterMode, the tokens' worth, the
choice of the best prior at equal compute, and the command end to end on a tiny checkpoint."""
import json
import math
import time

import pytest
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

import oracle
import spot
import train
import utils
from experiments import cost, frontier
from test_oracle import fake_dataset, tiny_model, write_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")      # conftest.py


def preset_config(name, **changes):
    preset = train.PRESETS[name]
    return spot.SPoTConfig(**{k: preset[k] for k in train.MODEL_FLAGS}, **changes)


CONFIGS = {"cifar10-cpu": preset_config("cifar10-cpu"),
           "imagenette-cpu": preset_config("imagenette-cpu"),
           "timm-like": spot.SPoTConfig(image_size=32, window=8, dim=64, depth=2, heads=4,
                                        num_classes=7, norm_eps=1e-6, pool="avg",
                                        position_embedding="learned")}


def counted(fn):
    """The FLOPs torch's FlopCounterMode counts (matrix products only) while fn runs."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("name", CONFIGS)
def test_forward_and_backward_flops_match_flop_counter(name):
    """The matrix products of compute() are exactly what FlopCounterMode counts, forward and
    (positions' gradient only, weights frozen: SPoT-ON's backward) backward; the rest
    (norms, softmax, GELU, bilinear reads, biases) adds a few % on top."""
    config = CONFIGS[name]
    torch.manual_seed(0)
    model = spot.SPoTViT(config).eval().requires_grad_(False)
    images = torch.rand(1, 3, *config.image_size)
    for n in (4, 16, 64):
        positions = torch.rand(1, n, 2)
        ops = cost.compute(config, n)
        matmul = sum(ops[op] for op in cost.MATMULS)
        with torch.no_grad():
            assert counted(lambda: model(images, positions)) == matmul, (name, n)
        assert 1.005 < sum(ops.values()) / matmul < 1.06     # 1.2-1.8 % at width 192
        back = cost.backward_compute(config, n)
        grad_of = positions.clone().requires_grad_()
        both = counted(lambda: model(images, grad_of).logsumexp(1).sum().backward())
        assert both == matmul + sum(back[op] for op in cost.MATMULS), (name, n)
        assert grad_of.grad.abs().sum() > 0


def test_saliency_and_mlp_helpers_match_flop_counter():
    """saliency_compute's Gaussian blur is FlopCounterMode's count of spot.saliency_map (its only
    convolution); mlp_compute's products are a torch MLP's."""
    for size in ((32, 32), (128, 128)):
        ops = cost.saliency_compute(size)
        assert counted(lambda: spot.saliency_map(torch.rand(1, 3, *size))) == ops["blur"]
        assert 2e6 < sum(ops.values()) < 4e6          # about 0.8 of a preset model's token
    head = nn.Sequential(nn.Linear(12, 32), nn.GELU(), nn.Linear(32, 5))
    ops = cost.mlp_compute([12, 32, 5], rows=3)
    assert counted(lambda: head(torch.rand(3, 12))) == ops["matmul"] == 3 * 2 * (12 * 32 + 32 * 5)
    assert ops["biases"] == 3 * 37 and ops["activation"] == 3 * cost.GELU * 32


@pytest.mark.parametrize("name", ["cifar10-cpu", "imagenette-cpu"])
def test_tokens_worth_a_pass_at_n_is_about_n(name):
    config = CONFIGS[name]
    a, b = cost.token_fit(config)
    assert 3.5e6 < a < 4.5e6 and abs(b / a) < 0.5          # the offset is a fraction of a token
    for n in range(4, 65):
        worth = cost.compute_tokens(cost.forward_flops(config, n), config)
        assert abs(worth - n) < 0.7, (n, worth)
    two = cost.compute_tokens(2 * cost.forward_flops(config, 8), config)
    assert two == pytest.approx(2 * cost.compute_tokens(cost.forward_flops(config, 8),
                                                            config))      # additive
    search = sum(cost.search_compute(config, 16, steps=20).values())
    assert 40 < search / cost.forward_flops(config, 16) < 44     # 21 forward + 20 backward


def test_best_prior_at_no_more_compute_known_answers():
    """Two priors on a 4-64 curve (chooser top-1 decides; test correctness is what is read):
    the choice stays within the compute rounded up to a whole token, and a salient read pays
    for its saliency map."""
    config = CONFIGS["cifar10-cpu"]
    counts = (4, 8, 9, 16)
    curve = {(p, n): torch.ones(6, dtype=torch.bool) for p in ("sobol", "salient") for n in counts}
    chooser = {("sobol", n): float(n) for n in counts} | {("salient", n): n + 1.5 for n in counts}
    reference = frontier.Reference("x", config, curve, chooser, "val")
    cost = {key: reference.cost(*key) for key in curve}
    assert cost["salient", 8] - cost["sobol", 8] == pytest.approx(0.78, abs=0.01)
    # a pass at 8 tokens is worth 8.3: rounded up 9, which buys sobol at 8 (8.3) but neither
    # sobol at 9 (9.3) nor the salient read at 8 (9.1)
    assert reference.best(cost["sobol", 8]) == ("sobol", 8)
    assert reference.best(cost["sobol", 8] + 1) == ("salient", 8)      # 10 buys both
    assert reference.best_at(16) == ("salient", 16)
    assert reference.best(2.0) is None                  # cheaper than any point of the curve


# -----------------------------------------------------------------------------
# End to end: the command on a tiny checkpoint (16 px, 4 px windows: a 16-cell grid, 3 classes)
# and fake data (12 test and 12 validation images), run once for the tests below

@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("frontier")
    checkpoint = write_checkpoint(folder / "checkpoint.pt", 0)
    argv = ["--checkpoint", checkpoint, "--tokens", "2,4,6,8", "--budgets", "2,4",
            "--k", "2,4,8", "--search-steps", "2", "--no-progress", "--device", "cpu",
            "--out", str(folder / "out")]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(oracle.data, "load_dataset", lambda *args, **kwargs: fake_dataset())
        started = time.perf_counter()
        assert frontier.main(argv) == 0
        seconds = time.perf_counter() - started
    results = json.loads((folder / "out" / "frontier.json").read_text())
    per_image = utils.load_per_image(folder / "out" / "per_image.npz")
    return folder / "out", results, per_image, seconds


def test_command_runs_end_to_end_in_seconds(run):
    out, results, per_image, seconds = run
    assert seconds < 30
    assert (out / "frontier.png").stat().st_size > 20_000
    text = (out / "frontier.md").read_text()
    assert "| best-of-2-softmax | 2 | yes |" in text and "chosen on val (12 images)" in text
    settings = results["settings"]
    assert settings["n_images"] == 12 and settings["curve_tokens"] == [2, 4, 6, 8]
    assert settings["chosen_on"] == "val (12 images)"
    # the curve: every prior at every count ("grid" too: 8 <= its 16 cells), per image kept
    assert len(results["curve"]) == len(spot.PRIORS) * 4
    assert per_image["top1", "prior", "sobol", 6].shape == (12,)


def test_the_curve_is_oracle_pys_prior_rows_on_the_same_images(run):
    """The curve reads each prior as oracle.py's prior rows do (draw 0, the same seed)."""
    _, _, per_image, _ = run
    model = tiny_model(0).eval()             # the checkpoint's model (write_checkpoint)
    test = fake_dataset().test
    split = (test.images, test.labels)
    config = oracle.EvalConfig(checkpoint="-", tokens=(4, 8), priors=("sobol", "salient", "grid"),
                               progress=False)
    theirs = {}
    oracle.prior_rows(model, split, (split[0][:0], split[1][:0]), config, theirs)
    for (_, _, prior, tokens), correct in theirs.items():
        assert (per_image["top1", "prior", prior, tokens] == correct[0].numpy()).all()


def test_rows_have_the_schema_and_sane_values(run):
    _, results, per_image, _ = run
    a = results["settings"]["tokens_worth"]["flops_per_token"]
    methods = {r["method"] for r in results["rows"]}
    assert methods == {"best-prior-2n", "mean-logits-2", "spot-on", "spot-on-shuffled", "spot-on-self",
                       *(f"best-of-{k}-{s}" for k in (2, 4, 8) for s in ("softmax", "normlogit")),
                       *(f"oracle-of-{k}" for k in (2, 4, 8))}
    for r in results["rows"]:
        assert {"dataset", "method", "label_free", "compute_tokens", "flops", "top1", "prior",
                "prior_top1", "diff", "ci", "verdict"} <= set(r)
        assert r["dataset"] == "shapes" and 0 <= r["top1"] <= 100
        ceiling = r["method"].startswith("oracle-of") or r["method"] == "spot-on"
        assert r["label_free"] == (not ceiling)
        assert r["compute_tokens"] == pytest.approx(r["flops"] / a)
        assert r["prior_compute_tokens"] <= math.ceil(r["compute_tokens"] + 1e-6)
        assert r["diff"] == pytest.approx(r["top1"] - r["prior_top1"])
        assert r["ci"][0] <= r["diff"] <= r["ci"][1] and r["verdict"] in ("holds", "tie",
                                                                           "reversed")
        assert r["test"] == "McNemar exact"
        assert per_image["top1", r["method"], r["budget"]].shape == (r["n_images"],)
    by = {(r["method"], r["budget"]): r for r in results["rows"]}
    assert by["best-of-4-softmax", 2]["flops"] == 2 * by["best-of-2-softmax", 2]["flops"]
    # SPoT-ON with 2 steps: 3 forward passes and 2 backward ones, each about a forward's FLOPs
    passes = by["spot-on", 2]["compute_tokens"] / by["spot-on-shuffled", 2]["compute_tokens"]
    assert 5 < passes < 6
    # the search toward its own first answer: the same search and one more forward pass
    extra = by["spot-on-self", 2]["compute_tokens"] - by["spot-on", 2]["compute_tokens"]
    assert extra == pytest.approx(by["spot-on-shuffled", 2]["compute_tokens"])


def test_a_2n_control_is_compared_with_the_prior_at_up_to_2n(run):
    """The best prior at 2N (and best-of-2 at N, two passes) costs about 2N tokens' worth: the
    prior it meets is the best, on validation, of every prior at up to 2N tokens."""
    _, results, _, _ = run
    val = {(c["prior"], c["tokens"]): c["chooser_top1"] for c in results["curve"]}
    for r in results["rows"]:
        if r["method"] not in ("best-prior-2n", "best-of-2-softmax", "mean-logits-2"):
            continue
        two_n = 2 * r["budget"]
        assert r["prior_tokens"] <= two_n
        rivals = [v for (p, n), v in val.items() if n <= two_n and p != "salient"]
        assert val[r["prior"], r["prior_tokens"]] >= max(rivals)


def test_oracle_of_k_is_at_least_best_of_k(run):
    _, results, per_image, _ = run
    for budget in (2, 4):
        for k in (2, 4, 8):
            ceiling = per_image["top1", f"oracle-of-{k}", budget]
            for score in ("softmax", "normlogit"):
                chosen = per_image["top1", f"best-of-{k}-{score}", budget]
                assert (ceiling >= chosen).all(), (budget, k, score)


def test_normalised_max_logit_known_answer():
    logits = torch.tensor([[3.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    # (3 - 1) / sqrt(((2)^2 + 1 + 1) / 3) = 2 / sqrt(2); a flat row scores 0, not NaN
    assert frontier.normalised_max_logit(logits).tolist() == pytest.approx([2 ** 0.5, 0.0])


@pytest.mark.parametrize("flags, message", [
    (["--k", "1,2"], "--k must be"),
    (["--tokens", "0"], "--tokens must be"),
    (["--budgets", "40"], "2N control"),
    (["--split", "nope"], "invalid choice"),
])
def test_bad_input_is_a_one_line_error(tmp_path, capsys, monkeypatch, flags, message):
    monkeypatch.setattr(oracle.data, "load_dataset", lambda *args, **kwargs: fake_dataset())
    checkpoint = write_checkpoint(tmp_path / "c.pt", 0)
    with pytest.raises(SystemExit) as exit_info:
        frontier.main(["--checkpoint", checkpoint, "--out", str(tmp_path / "o"), *flags])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert err.startswith("python -m experiments.frontier: error:")


def test_help_says_what_it_computes(capsys):
    with pytest.raises(SystemExit) as exit_info:
        frontier.main(["--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and "--budgets" in out and "oracle-of-K" in out


def test_tables_gather_every_frontier_into_one_file(run, tmp_path, monkeypatch):
    """experiments.tables: each committed results/RUN/frontier.json -> label-free-frontier.json
    (one row per run, method and budget, with the fields the goal is judged by) and RESULTS.md's
    block of it; a frontier.json without them is refused, naming the file."""
    from experiments import tables
    out, results, _, _ = run
    tree = tmp_path / "results"
    for name in ("cifar10-frontier", "imagenette-frontier"):
        (tree / name).mkdir(parents=True)
        (tree / name / "frontier.json").write_text((out / "frontier.json").read_text())
    results_md = tmp_path / "RESULTS.md"
    results_md.write_text("# R\n\n<!-- begin: label-free-frontier -->\n<!-- end: "
                          "label-free-frontier -->\n")
    monkeypatch.setattr(tables, "RESULTS", tree)
    monkeypatch.setattr(tables, "RESULTS_MD", results_md)
    monkeypatch.setattr(tables, "COMBINED", {})
    monkeypatch.setattr(tables, "TRAINING", {})
    monkeypatch.setattr(tables, "VERDICTS", {})
    files, blocks = tables.generate()
    combined = json.loads(files[tree / "label-free-frontier.json"])
    assert combined["sources"] == ["results/cifar10-frontier/frontier.json",
                                   "results/imagenette-frontier/frontier.json"]
    assert len(combined["rows"]) == 2 * len(results["rows"])
    assert combined["frontiers"]["imagenette-frontier"] == results["frontier"]
    row = next(r for r in combined["rows"] if r["method"] == "best-of-2-softmax")
    assert row["run"] == "cifar10-frontier" and row["split"] == "test"
    assert set(tables.FRONTIER_FIELDS) <= set(row) and row["label_free"] is True
    table = blocks["label-free-frontier"]
    assert table.count("| best-of-2-softmax |") == 2 * 2            # two runs, two budgets
    assert "oracle-of-2 (ceiling)" in table and row["verdict"] in table
    assert tables.main(["--check"]) == 1                             # not written yet
    assert tables.main([]) == 0 and tables.main(["--check"]) == 0
    # the figure of the goal: a panel per dataset, each with its frontier and the goal above it
    from experiments import figures
    assert figures.main(["frontier", "--results", str(tree / "label-free-frontier.json"),
                         "--out", str(tmp_path / "cli.png")]) == 0
    assert (tmp_path / "cli.png").is_file()
    for r in combined["rows"]:
        r["dataset"] = r["run"]
    fig = figures.plot_frontier(combined, tmp_path / "frontier.png")
    assert (tmp_path / "frontier.png").stat().st_size > 10_000 and len(fig.axes) == 2
    for ax in fig.axes:
        goal = next(line for line in ax.lines if "goal" in line.get_label())
        front = combined["frontiers"][ax.get_title().split(",")[0]]
        assert list(goal.get_ydata()) == [f["top1"] + 3 for f in front]
        shown = [r for r in results["rows"] if r["compute_tokens"] <= 40]    # SPoT-ON's: table
        assert 0 < len(shown) < len(results["rows"])
        assert sum(len(c.get_children()) > 0 for c in ax.containers) == len(shown)
    broken = json.loads((out / "frontier.json").read_text())
    del broken["rows"][0]["verdict"]
    (tree / "cifar10-frontier" / "frontier.json").write_text(json.dumps(broken))
    with pytest.raises(tables.Refused, match="cifar10-frontier/frontier.json"):
        tables.generate()
