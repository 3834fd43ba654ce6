"""experiments.bench: smoke runs of its sections at tiny sizes (timing tests they are not), the
like-for-like models it compares, its --precision rule, and the two sections that read a
trained checkpoint (oracle-sweep, oracle-time) on a tiny untrained one."""
import dataclasses
import json
import types

import pytest
import torch
import torch.nn.functional as F

from experiments import bench
import utils
import data
import oracle
import spot
import train


pytestmark = pytest.mark.usefixtures("one_thread")      # conftest.py


def test_quick_bench_writes_every_requested_section(tmp_path, monkeypatch):
    """Sections 1, 2 and 5. The fused-attention contender calls torch's kernel from its own
    modules: spot.attention stays what it is all along (nothing is swapped while timing)."""
    original, fused_kernel, fused_calls = spot.attention, F.scaled_dot_product_attention, []

    def fused(*args, **kwargs):
        fused_calls.append(spot.attention is original)
        return fused_kernel(*args, **kwargs)
    monkeypatch.setattr(F, "scaled_dot_product_attention", fused)
    monkeypatch.setattr(bench, "QUICK_TOKENIZER_CONFIGS", [(16, 4, 2)])
    path = tmp_path / "bench.json"
    assert bench.main(["--quick", "--model", "shapes", "--only", "tokenizer,train,attention", "--precision", "fp32",
                       "--repeats", "1", "--warmup", "0", "--json", str(path)]) == 0
    assert fused_calls and all(fused_calls)
    report = json.loads(path.read_text())
    results = report["results"]
    assert set(results) == {"tokenizer", "train", "attention"}
    for row in results["tokenizer"]:          # both samplers, each against patchify
        assert set(row["ms"]) == {"patchify", *bench.SAMPLERS} and set(row["ratio"]) == set(bench.SAMPLERS)
    assert [row["tokens"] for row in results["train"]] == list(bench.TOKEN_COUNTS)
    assert [row["precision"] for row in results["attention"]] == ["fp32", "bf16"]
    for row in results["train"] + results["attention"]:
        assert all(t > 0 for times in row["times_s"].values() for t in times)
    assert "## 5. Training step with spot.attention" in report["markdown"]
    assert report["settings"]["cpu"] in report["markdown"]


@pytest.mark.parametrize("fp32_ms, bf16_ms, expect", [(40, 60, False), (60, 40, True)])
def test_precision_auto_is_measured(monkeypatch, fp32_ms, bf16_ms, expect):
    """--precision auto = bench.measured_precision timing the --model preset's step in both
    precisions (bench.probe_step_seconds, stood in for here); fp32/bf16 force it, unmeasured."""
    probes = []

    def probe(model, batch_size, n_tokens, device, bf16, steps=3):
        probes.append((model.config, batch_size, bf16))
        return (bf16_ms if bf16 else fp32_ms) / 1e3
    monkeypatch.setattr(bench, "probe_step_seconds", probe)
    bf16, said = bench.choose_bf16(bench.parse_args(["--quick", "--model", "shapes"]))
    assert bf16 is expect and said.startswith(f"precision: {'bf16' if expect else 'fp32'} (probe")
    shapes = spot.SPoTConfig(**{k: train.PRESETS["shapes"][k] for k in train.MODEL_FLAGS})
    expected = [(shapes, 8, False), (shapes, 1, True)]          # bf16 first on 1/8 of the batch
    if bf16_ms <= fp32_ms:                                       # (this stand-in ignores the batch)
        expected.append((shapes, 8, True))
    assert probes == expected
    for forced in ("fp32", "bf16"):
        assert bench.choose_bf16(bench.parse_args(["--precision", forced]))[0] is (forced == "bf16")
    assert len(probes) == len(expected)


def test_variants_share_one_config_and_agree_at_grid_centres():
    """GridViT and FusedAttentionViT are SPoTViTs of the same SPoTConfig with the same weights.
    Like for like (was bench.check_like_for_like, run before every benchmark): at EXACT grid
    centres both samplers equal patchify, and all VARIANTS give the same logits, so the
    comparisons time the same computation."""
    torch.manual_seed(0)
    images, grid = torch.rand(2, 3, 32, 32), spot.grid_positions(32, 4)
    for sample in bench.SAMPLERS.values():
        read = sample(images, grid.expand(2, -1, -1), 4).flatten(2)
        assert torch.allclose(read, bench.patchify(images, 4), atol=1e-5)
    models, _ = bench.build_models(spot.SPoTConfig(image_size=32, window=4, dim=64, depth=2, heads=2),
                                   torch.device("cpu"), bench.VARIANTS)
    cells = torch.tensor([[5, 0, 63], [1, 2, 3]])
    with torch.no_grad():
        assert torch.allclose(models["spot"](images, grid.expand(2, -1, -1)), models["grid"](images), atol=1e-4)
        assert torch.allclose(models["spot"](images, grid[cells]), models["grid"](images, cells), atol=1e-4)
        assert torch.allclose(models["spot"](images, grid[cells]), models["fused"](images, grid[cells]), atol=1e-4)
    config = spot.SPoTConfig(image_size=16, window=4, dim=32, depth=1, heads=2)
    models, _ = bench.build_models(config, torch.device("cpu"), bench.VARIANTS)
    assert all(isinstance(m, spot.SPoTViT) and m.config is config for m in models.values())
    assert isinstance(models["fused"].blocks[0].attn, bench.FusedAttention)
    images = torch.rand(2, 3, 16, 16)
    assert torch.equal(bench.patchify(images, 4)[:, 0], images[:, :, :4, :4].flatten(1))


# -----------------------------------------------------------------------------
# oracle-sweep (moved here from oracle.py)

def tiny_model(seed=0):
    torch.manual_seed(seed)
    return spot.SPoTViT(spot.SPoTConfig(image_size=16, window=4, num_classes=3, dim=32, depth=1,
                                        heads=2))


def test_sweep():
    model = tiny_model()
    images = (torch.rand(6, 3, 16, 16) * 255).to(torch.uint8)
    labels = torch.randint(0, 3, (6,))
    config = bench.SweepConfig(steps_grid=(1, 3), lr_grid=(1e-2,), batch_size=4, progress=False)
    results = bench.sweep(model, images, labels, [2, 4], config)
    # 2 objectives x 2 budgets x 1 lr x {0, 1, 3} steps
    assert len(results) == 12
    assert {r["steps"] for r in results} == {0, 1, 3}
    assert all(0 <= r["top1"] <= 100 for r in results)
    # steps = 0 is the prior itself: same for both objectives' accuracy
    zero = [r["top1"] for r in results if r["steps"] == 0 and r["tokens"] == 2]
    assert zero[0] == zero[1]
    text, best = bench.sweep_markdown(results, [2, 4], {"checkpoint": "x", "n_images": 6, "split": "val",
                                                        "dataset": "d", "search_from": "isotropic"})
    assert set(best) == set(oracle.OBJECTIVES) and "| lr | steps |" in text


@pytest.fixture
def checkpoint(tmp_path, monkeypatch):
    """A tiny untrained checkpoint as train.py writes one, and a stand-in for its dataset."""
    model = tiny_model()
    path = tmp_path / "checkpoint.pt"
    torch.save({"model_config": dataclasses.asdict(model.config), "model": model.state_dict(),
                "classes": ["0", "1", "2"],
                "args": {"dataset": "shapes", "data_dir": None, "image_size": 16, "seed": 0}}, path)
    g = torch.Generator().manual_seed(0)
    split = lambda n: data.Split((torch.rand(n, 3, 16, 16, generator=g) * 255).to(torch.uint8),  # noqa: E731
                                 torch.randint(0, 3, (n,), generator=g))
    dataset = types.SimpleNamespace(name="shapes", train=split(12), val=None, test=split(6),
                                    classes=["0", "1", "2"], image_size=(16, 16))
    monkeypatch.setattr(data, "load_dataset", lambda *args, **kwargs: dataset)
    return str(path)


def test_cli_oracle_sweep(tmp_path, checkpoint):
    out = tmp_path / "out"
    assert bench.main(["--only", "oracle-sweep", "--checkpoint", checkpoint,
                       "--limit", "4", "--tokens", "2", "--batch-size", "4",
                       "--repeats", "1", "--warmup", "0", "--out", str(out),
                       "--json", str(tmp_path / "bench.json")]) == 0
    sweep = json.loads((out / "sweep.json").read_text())
    assert set(sweep["best"]) == set(oracle.OBJECTIVES) and sweep["settings"]["n_images"] == 4
    assert "*train* images" in (out / "sweep.md").read_text()     # the run held out no validation
    dataset = data.load_dataset()                                   # (the fixture's stand-in)
    dataset.val = data.Split(dataset.train.images[:5], dataset.train.labels[:5])
    assert bench.main(["--only", "oracle-sweep", "--checkpoint", checkpoint, "--limit", "40",
                       "--tokens", "2", "--batch-size", "4", "--out", str(tmp_path / "v")]) == 0
    on_val = json.loads((tmp_path / "v" / "sweep.json").read_text())["settings"]
    assert (on_val["split"], on_val["n_images"]) == ("val", 5)
    assert "*val* images" in (tmp_path / "v" / "sweep.md").read_text()
    settings = json.loads((tmp_path / "bench.json").read_text())["settings"]
    markdown = json.loads((tmp_path / "bench.json").read_text())["markdown"]
    assert "## SPoT-ON (steps, lr) sweep" in markdown and settings["cpu"] == utils.cpu_name()
    # the searched model is the checkpoint's, recorded beside --model's preset
    searched = spot.load_checkpoint(checkpoint).config
    assert settings["checkpoint_model"]["dim"] == searched.dim
    assert settings["model"]["preset"] == "cifar10"


def test_cli_bad_checkpoint_is_a_message(tmp_path, capsys):
    bad = tmp_path / "checkpoint.pt"
    bad.write_bytes(b"not a checkpoint")
    assert bench.main(["--only", "oracle-sweep", "--checkpoint", str(bad),
                       "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"error: {bad} could not be read" in err and "Traceback" not in err


@pytest.mark.parametrize("argv, named", [
    (["--only", "oracle-sweep", "--out", "{tmp}/o"], "--checkpoint"),
    (["--checkpoint", "{tmp}/c.pt"], "--checkpoint"),
    (["--only", "tokenizer,nope"], "--only"),
    (["--tokens", "4,0"], "--tokens"),
    (["--only", "train", "--tokens", "65"], "--tokens"),
    (["--oracle-from", "nowhere"], "--oracle-from"),
    (["--repeats", "0"], "--repeats"),
    (["--json", "{tmp}"], "--json"),
    (["--only", "oracle-sweep", "--checkpoint", "{tmp}/c.pt", "--out", "{tmp}/a_file"], "--out"),
])
def test_cli_checks_flags_first(tmp_path, capsys, argv, named):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(SystemExit) as exit_info:
        bench.parse_args([a.format(tmp=tmp_path) for a in argv])
    assert exit_info.value.code == 2 and named in capsys.readouterr().err


def test_measured_precision_probes_bf16_on_an_eighth_of_the_batch_first():
    """The benchmark's 'auto' on the CPU: time both precisions, keep the faster; a bf16 that is
    slower on 1/8 of the batch than fp32 on all of it cannot win and is not timed in full."""
    cpu, said = torch.device("cpu"), []
    assert bench.measured_precision("bf16", cpu, None)
    assert not bench.measured_precision("fp32", cpu, None)
    bf16_faster = lambda bf16, fraction: fraction * (0.041 if bf16 else 0.063)  # noqa: E731
    fp32_faster = lambda bf16, fraction: fraction * (0.063 if bf16 else 0.041)  # noqa: E731
    emulated = lambda bf16, fraction: fraction * (2.0 if bf16 else 0.041)   # noqa: E731
    assert bench.measured_precision("auto", cpu, bf16_faster, said.append)
    assert not bench.measured_precision("auto", cpu, fp32_faster, said.append)
    calls = []

    def recorded(*a):
        calls.append(a)
        return emulated(*a)
    assert not bench.measured_precision("auto", cpu, recorded, said.append)
    assert calls == [(False, 1.0), (True, 1 / 8)]          # no full-batch step of a hopeless bf16
    assert said == ["precision: bf16 (probe: fp32 63 ms/step, bf16 41 ms/step)",
                    "precision: fp32 (probe: fp32 41 ms/step, bf16 63 ms/step)",
                    "precision: fp32 (probe: fp32 41 ms/step, bf16 250 ms for 1/8 of the batch)"]


# -----------------------------------------------------------------------------
# data-scale: the PSS sampler and the synthetic folders

import os      # noqa: E402  (appended section)
import shlex   # noqa: E402
import sys     # noqa: E402


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps_rollup"),
                    reason="needs Linux's /proc/PID/smaps_rollup")
def test_tree_pss_counts_a_grandchilds_memory():
    """bench.run_sampled sums PSS over the whole process tree: a shell (the child) starts python
    (the grandchild), which holds 100 MB of written bytes for a second. The peak must see them,
    and the sampler's own process (this one) is not part of the sum."""
    assert bench.pss_bytes(os.getpid()) > 0 and bench.pss_bytes(-1) == 0
    holder = "import time; b = b'x' * (100 * 2**20); time.sleep(1)"
    command = ["sh", "-c", f'{shlex.quote(sys.executable)} -c "{holder}"; true']  # sh stays parent
    result = bench.run_sampled(command, every=0.05)
    assert result["returncode"] == 0 and result["samples"] >= 5
    assert 100 * 2**20 < result["peak_pss_bytes"] < 300 * 2**20     # python + 100 MB, sh
    assert os.getpid() in bench.process_tree(os.getppid())


def test_folder_dataset_layout(tmp_path):
    """bench.folder_dataset: DIR/{train,val}/<class>/*.jpg of random sizes, made once, reused,
    and a smaller dataset is the first images of a larger one."""
    Image = pytest.importorskip("PIL.Image")
    folder, made = bench.folder_dataset(30, tmp_path, n_val=10, classes=3)
    assert made and bench.folder_dataset(30, tmp_path, n_val=10, classes=3) == (folder, False)
    train_files = sorted(folder.glob("train/*/*.jpg"))
    assert len(train_files) == 30 and len(list(folder.glob("val/*/*.jpg"))) == 10
    assert sorted(p.name for p in (folder / "train").iterdir()) == ["c00", "c01", "c02"]
    for path in train_files[:5]:
        width, height = Image.open(path).size
        assert 300 <= width <= 460 and 250 <= height <= 420
    small, _ = bench.folder_dataset(12, tmp_path, n_val=10, classes=3)
    same = small / "train/c01/train000004.jpg"
    assert same.read_bytes() == (folder / "train/c01/train000004.jpg").read_bytes()
    assert not list(tmp_path.glob("*.partial"))
