"""Tests of train.py on tiny runs of the built-in shapes data (CPU, seconds each)."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import spot
import train
from conftest import ROOT

TINY = ["--dataset", "shapes", "--image-size", "16", "--window", "4", "--dim", "32", "--depth", "1",
        "--heads", "2", "--mlp-ratio", "2", "--batch-size", "32", "--train-limit", "192",
        "--test-limit", "64", "--tokens", "4-16", "--eval-tokens", "4", "--lr", "3e-3",
        "--warmup-epochs", "0.5", "--no-progress", "--threads", "1"]
TIMING = {"img_per_s", "elapsed_s"}


def read_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def comparable(metrics):
    """Epoch-end metrics without wall-clock fields (partial lines come from capped runs)."""
    return [{k: v for k, v in m.items() if k not in TIMING} for m in metrics if not m["partial"]]


def test_parse_tokens():
    assert train.parse_tokens("16", 64) == [16]
    assert train.parse_tokens("8-12", 64) == [8, 9, 10, 11, 12]
    assert train.parse_tokens("4,16,8", 64) == [4, 8, 16]
    assert train.parse_tokens("all", 64) == [64]
    for bad in ("0", "a-b", "", "5-2"):
        with pytest.raises(ValueError, match="--tokens"):
            train.parse_tokens(bad, 64)


def test_lr_schedule_warms_up_then_decays():
    values = [train.lr_lambda(s, 10, 100, 0.01) for s in range(100)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(values[10:], values[11:]))
    assert values[-1] == pytest.approx(0.01, abs=1e-3)


def test_precision_auto_means_bf16_only_where_native(tmp_path):
    cpu = torch.device("cpu")
    assert train.use_bf16("bf16", cpu) and not train.use_bf16("fp32", cpu)
    x86 = tmp_path / "x86"
    x86.write_text("flags\t\t: fpu avx2 avx512f avx512_bf16 avx512_vnni\n")
    old = tmp_path / "old"
    old.write_text("flags\t\t: fpu avx2 avx512f avx512bw\n")
    arm = tmp_path / "arm"
    arm.write_text("Features\t: fp asimd sve i8mm bf16\n")
    assert train.native_bf16_cpu(x86) and train.native_bf16_cpu(arm)
    assert not train.native_bf16_cpu(old) and not train.native_bf16_cpu(tmp_path / "missing")
    assert train.use_bf16("auto", cpu) == train.native_bf16_cpu()


def test_run_writes_metrics_and_a_loadable_checkpoint(tmp_path):
    out = tmp_path / "run"
    before = signal.getsignal(signal.SIGINT)
    assert train.main(TINY + ["--epochs", "2", "--out", str(out)]) == 0
    assert signal.getsignal(signal.SIGINT) is before      # the caller's Ctrl-C handler is back
    metrics = read_metrics(out)
    assert [m["epoch"] for m in metrics] == [1, 2]
    for key in ("epoch", "train_loss", "test_loss", "test_acc", "test_acc@4"):
        assert key in metrics[-1]
    model = spot.load_checkpoint(out / "checkpoint.pt")
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=False)
    assert checkpoint["epoch"] == 2 and checkpoint["step"] == 12
    # The reloaded model reproduces the logged test accuracy at the full grid.
    import data
    test = data.load_dataset("shapes", image_size=16, progress=False).test
    images, labels = test.images[:64].float() / 255, test.labels[:64]
    grid = spot.grid_positions(16, 4).expand(64, -1, -1)
    bf16 = train.use_bf16("auto", torch.device("cpu"))     # the run's --precision auto
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        acc = 100 * (model(images, grid).argmax(1) == labels).float().mean().item()
    assert acc == pytest.approx(metrics[-1]["test_acc"], abs=1e-6)
    # A second run into the same folder refuses to overwrite it.
    with pytest.raises(SystemExit, match="--resume"):
        train.main(TINY + ["--epochs", "2", "--out", str(out)])


def test_interrupted_and_resumed_run_matches_uninterrupted(tmp_path):
    """--max-steps stops mid-epoch (like a crash after a checkpoint); --resume finishes the run."""
    full, split = tmp_path / "full", tmp_path / "split"
    train.main(TINY + ["--epochs", "3", "--out", str(full)])
    train.main(TINY + ["--epochs", "3", "--out", str(split), "--max-steps", "8"])   # 6 steps/epoch
    assert read_metrics(split)[-1]["partial"]
    train.main(TINY + ["--epochs", "3", "--out", str(split), "--resume"])
    assert comparable(read_metrics(split)) == comparable(read_metrics(full))
    a = torch.load(full / "checkpoint.pt", weights_only=False)["model"]
    b = torch.load(split / "checkpoint.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_ctrl_c_saves_and_resume_completes_identically(tmp_path):
    """A real SIGINT during training: exit code 130, a checkpoint, and an identical finish."""
    full, interrupted = tmp_path / "full", tmp_path / "interrupted"
    args = TINY + ["--epochs", "4", "--train-limit", "640"]
    train.main(args + ["--out", str(full)])
    command = [sys.executable, str(ROOT / "train.py")] + args + ["--out", str(interrupted)]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while not (interrupted / "metrics.jsonl").exists() and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    output = process.communicate(timeout=120)[0].decode()
    assert process.returncode == 130, output
    assert "--resume" in output
    assert (interrupted / "checkpoint.pt").exists()
    subprocess.run(command + ["--resume"], cwd=ROOT, check=True, capture_output=True, timeout=300)
    assert comparable(read_metrics(interrupted)) == comparable(read_metrics(full))


def test_grid_all_tokens_trains_a_plain_grid_vit(tmp_path, monkeypatch):
    seen = []
    original = spot.sample_positions

    def recording(prior, batch_size, n_tokens, *args, **kwargs):
        positions = original(prior, batch_size, n_tokens, *args, **kwargs)
        seen.append((prior, positions))
        return positions
    monkeypatch.setattr(spot, "sample_positions", recording)
    argv = TINY + ["--epochs", "1", "--out", str(tmp_path / "grid"), "--tokens", "all",
                   "--train-priors", "grid", "--eval-tokens", "16", "--eval-prior", "grid"]
    train.main(argv)
    grid = spot.grid_positions(16, 4)
    for prior, positions in seen:
        assert prior == "grid" and positions.shape[1] == 16
        for image in positions:   # every batch image reads all 16 cells: a standard ViT
            assert torch.equal(image[torch.argsort(image[:, 0] * 10 + image[:, 1])], grid)


def test_bad_arguments_give_clear_errors(tmp_path, capsys):
    with pytest.raises(SystemExit, match="does not exist"):
        train.main(TINY + ["--out", str(tmp_path / "none"), "--resume"])
    with pytest.raises(SystemExit):
        train.main(TINY + ["--out", str(tmp_path / "x"), "--train-priors", "uniform,nope"])
    assert "nope" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="grid"):
        train.main(TINY + ["--out", str(tmp_path / "y"), "--tokens", "4-20", "--train-priors", "grid"])
    with pytest.raises(SystemExit, match="data"):
        train.main(["--dataset", "cifar10", "--data-dir", str(tmp_path / "missing"), "--out",
                    str(tmp_path / "z"), "--no-progress"] + ["--cache-dir", str(tmp_path / "cache")])


def test_torchrun_two_processes_gloo(tmp_path):
    """DistributedDataParallel on the CPU: two gloo processes train, rank 0 logs and saves."""
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port",
               "29533", str(ROOT / "train.py")] + TINY + ["--epochs", "2", "--out", str(out)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    metrics = read_metrics(out)
    assert [m["epoch"] for m in metrics] == [1, 2]
    assert result.stdout.count("done:") == 1           # only rank 0 logs
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=False)
    assert len(checkpoint["rng"]) == 2                  # both processes' random streams
    assert checkpoint["step"] == 12                     # global batch 32 = 2 x 16 per process
    spot.load_checkpoint(out / "checkpoint.pt")
