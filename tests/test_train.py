"""Tests of train.py on tiny runs of the built-in shapes data (CPU, seconds each)."""
import errno
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

import utils
import spot
import train
from conftest import ROOT

TINY = ["--dataset", "shapes", "--image-size", "16", "--window", "4", "--dim", "32", "--depth", "1",
        "--heads", "2", "--mlp-ratio", "2", "--batch-size", "32", "--train-limit", "192",
        "--test-limit", "64", "--tokens", "4-16", "--eval-tokens", "4", "--lr", "3e-3",
        "--warmup-epochs", "0.5", "--no-progress", "--threads", "1", "--precision", "fp32"]
TIMING = {"img_per_s", "elapsed_s", "data_wait"}


def read_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def comparable(metrics):
    """Epoch-end metrics without wall-clock fields (partial lines come from capped runs)."""
    return [{k: v for k, v in m.items() if k not in TIMING} for m in metrics if not m.get("partial")]


def test_parse_tokens():
    assert utils.parse_tokens("16", 64) == [16]
    assert utils.parse_tokens("8-12", 64) == [8, 9, 10, 11, 12]
    assert utils.parse_tokens("4,16,8", 64) == [4, 8, 16]
    assert utils.parse_tokens("all", 64) == [64]
    for bad in ("0", "a-b", "", "5-2"):
        with pytest.raises(ValueError, match="--tokens"):
            utils.parse_tokens(bad, 64)


def test_lr_schedule_warms_up_then_decays():
    values = [train.lr_lambda(s, 10, 100, 0.01) for s in range(100)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(values[10:], values[11:]))
    assert values[-1] == pytest.approx(0.01, abs=1e-3)


def test_precision_auto_is_one_rule_and_stays_with_the_run(tmp_path, monkeypatch):
    """auto: fp32 on the CPU, whatever its speed (no timed race: one command, one result), bf16
    on a CUDA GPU that supports it; a flag forces either. The decision is stored with the run,
    in run.json and the checkpoint, and a resumed run keeps it."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert [utils.choose_precision(p, cpu) for p in ("auto", "fp32", "bf16")] == \
        ["fp32", "fp32", "bf16"]
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert utils.choose_precision("auto", cuda) == "bf16"
    assert utils.choose_precision("fp32", cuda) == "fp32"
    monkeypatch.undo()
    for precision in ("auto", "bf16"):
        out = tmp_path / precision
        argv = [a for a in TINY if a not in ("--precision", "fp32")] + [
            "--precision", precision, "--epochs", "3", "--out", str(out)]
        train.main(argv + ["--max-steps", "8"])              # stops in epoch 2 of 3
        train.main(["--out", str(out), "--resume"])
        expected = "fp32" if precision == "auto" else "bf16"
        metrics = read_metrics(out)
        assert {m.get("precision") for m in metrics if not m.get("final")} == {expected}
        assert json.loads((out / "run.json").read_text())["precision"] == expected
        assert torch.load(out / "checkpoint.pt", weights_only=True)["precision"] == expected


def test_run_writes_metrics_and_a_loadable_checkpoint(tmp_path):
    out = tmp_path / "run"
    before = signal.getsignal(signal.SIGINT)
    assert train.main(TINY + ["--epochs", "2", "--out", str(out)]) == 0
    assert signal.getsignal(signal.SIGINT) is before      # the caller's Ctrl-C handler is back
    metrics = read_metrics(out)
    assert [m["epoch"] for m in metrics] == [1, 2, 2] and metrics[-1]["final"]
    for key in ("epoch", "train_loss", "val_loss", "val_acc", "val_acc@4"):
        assert key in metrics[1]              # every epoch is judged on the validation split ...
    assert {"test_loss", "test_acc", "test_acc@4"} <= set(metrics[2])   # ... test only at the end
    assert not any(k.startswith("test") for m in metrics[:2] for k in m)
    model, checkpoint = spot.load_checkpoint(out / "checkpoint.pt", return_checkpoint=True)
    assert checkpoint["epoch"] == 2 and checkpoint["step"] == 12    # 192 images / 32 per step x 2
    # The reloaded model reproduces the logged test accuracy at the full grid.
    import data
    test = data.load_dataset("shapes", image_size=16, progress=False).test
    images, labels = test.images[:64].float() / 255, test.labels[:64]
    grid = spot.grid_positions(16, 4).expand(64, -1, -1)
    with torch.no_grad():
        acc = 100 * (model(images, grid).argmax(1) == labels).float().mean().item()
    assert acc == pytest.approx(metrics[-1]["test_acc"], abs=1e-6)
    # A second run into the same folder refuses to overwrite it.
    with pytest.raises(SystemExit):
        train.main(TINY + ["--epochs", "2", "--out", str(out)])


def test_interrupted_and_resumed_run_matches_uninterrupted(tmp_path):
    """--max-steps stops mid-epoch (like a crash after a checkpoint); --resume finishes the run."""
    full, split = tmp_path / "full", tmp_path / "split"
    train.main(TINY + ["--epochs", "3", "--out", str(full)])
    train.main(TINY + ["--epochs", "3", "--out", str(split), "--max-steps", "8"])   # 6 steps/epoch
    assert read_metrics(split)[-1]["partial"]
    train.main(["--out", str(split), "--resume"])          # the run's own flags, from its checkpoint
    assert comparable(read_metrics(split)) == comparable(read_metrics(full))
    a = torch.load(full / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(split / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_ctrl_c_saves_and_resume_completes_identically(tmp_path):
    """A real SIGINT during training: exit code 130, a checkpoint, and an identical finish."""
    full, interrupted = tmp_path / "full", tmp_path / "interrupted"
    args = TINY + ["--epochs", "4", "--train-limit", "640"]
    train.main(args + ["--out", str(full)])
    command = [sys.executable, str(ROOT / "train.py")] + args + ["--out", str(interrupted),
                                                                  "--max-steps", "1000"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while not (interrupted / "metrics.jsonl").exists() and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    output = process.communicate(timeout=120)[0].decode()
    assert process.returncode == 130, output
    assert "--resume" in output
    assert "--max-steps 1000" in output.splitlines()[-1]          # the full command to go on
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


@pytest.mark.parametrize("extra, words", [
    (["--train-priors", "uniform,nope"], "nope"),
    (["--tokens", "4-20", "--train-priors", "grid"], "grid"),
    (["--lr", "-1"], "--lr"), (["--lr", "nan"], "--lr"), (["--lr", "0"], "--lr"),
    (["--label-smoothing", "2"], "--label-smoothing"),
    (["--augment-padding", "-1"], "--augment-padding"),
    (["--test-limit", "0"], "--test-limit"), (["--train-limit", "-5"], "--train-limit"),
    (["--max-steps", "0"], "--max-steps"), (["--threads", "0"], "--threads"),
    (["--eval-tokens", "0"], "--eval-tokens"), (["--tokens", "100000"], "--tokens"),
    (["--val-size", "1.5"], "--val-size"), (["--dim", "30"], "dim"),
    (["--init-from", "nowhere.pt"], "--init-from"),
])
def test_bad_flags_are_refused_before_any_work(tmp_path, capsys, monkeypatch, extra, words):
    monkeypatch.setattr(train.data, "load_dataset", lambda *a, **k: pytest.fail("loaded data"))
    with pytest.raises(SystemExit) as exit_info:
        train.main(TINY + ["--out", str(tmp_path / "x")] + extra)
    assert exit_info.value.code == 2 and words in capsys.readouterr().err


def test_no_final_test_never_reads_the_test_split(tmp_path):
    train.main(TINY + ["--epochs", "1", "--no-final-test", "--out", str(tmp_path / "probe")])
    metrics = read_metrics(tmp_path / "probe")
    assert len(metrics) == 1 and not any(k.startswith("test") for k in metrics[0])


def test_out_must_be_a_writable_folder_without_an_old_run(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(train.data, "load_dataset", lambda *a, **k: pytest.fail("loaded data"))
    (tmp_path / "file").write_text("")
    old = tmp_path / "old"
    old.mkdir()
    (old / "metrics.jsonl").write_text('{"epoch": 1}\n')      # a new run must not append to it
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    cases = [(tmp_path / "file", "is a file"), (old, "--resume"), (tmp_path / "none", "does not exist"),
             (tmp_path / "file" / "run", "not writable")]            # a folder inside a file
    if os.geteuid() != 0:                                      # root may write anywhere
        cases.append((locked / "run", "not writable"))
    for out, words in cases:
        with pytest.raises(SystemExit):
            train.main(TINY + ["--out", str(out)] + (["--resume"] if out.name == "none" else []))
        assert words in capsys.readouterr().err, out


def test_resume_refuses_changed_flags_naming_each(tmp_path, capsys):
    out = tmp_path / "run"
    train.main(TINY + ["--epochs", "2", "--out", str(out), "--max-steps", "2"])
    before = (out / "checkpoint.pt").read_bytes()
    with pytest.raises(SystemExit):
        train.main(TINY + ["--epochs", "3", "--lr", "1e-3", "--out", str(out), "--resume"])
    err = capsys.readouterr().err.splitlines()[-1]             # the message, not the usage
    assert "--epochs 3 (the run has 2)" in err and "--lr" in err and "--batch-size" not in err
    with pytest.raises(SystemExit):
        train.main(["--dataset", "cifar10", "--data-dir", str(tmp_path), "--out", str(out), "--resume"])
    assert "--dataset" in capsys.readouterr().err
    assert (out / "checkpoint.pt").read_bytes() == before      # nothing was overwritten
    # flags that only change how it runs are fine
    assert train.main(["--out", str(out), "--resume", "--threads", "1", "--no-progress"]) == 0


def test_unreadable_checkpoints_are_messages_naming_the_file(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(train.data, "load_dataset", lambda *a, **k: pytest.fail("loaded data"))
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(b"\x80\x02 not a checkpoint")
    for argv, flag in [(["--out", str(run), "--resume"], "--resume"),
                       (TINY + ["--out", str(tmp_path / "new"), "--init-from", str(run / "checkpoint.pt")],
                        "--init-from")]:
        with pytest.raises(SystemExit) as exit_info:
            train.main(argv)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and flag in err and "could not be read" in err
        assert str(run / "checkpoint.pt") in err and "Traceback" not in err


def test_data_dir_is_stored_absolute(tmp_path, monkeypatch):
    """A relative --data-dir would resolve against wherever oracle.py later runs from."""
    monkeypatch.chdir(tmp_path)
    args = train.parse_args(TINY + ["--data-dir", "some/data", "--out", str(tmp_path / "o")])
    assert args.data_dir == str(tmp_path / "some" / "data")


def test_init_from_retrofits_a_grid_vit(tmp_path, capsys):
    """Retrofitting (arXiv 2507.01654): start SPoT training from a grid-trained ViT's weights."""
    grid = tmp_path / "grid"
    train.main(TINY + ["--epochs", "1", "--tokens", "all", "--train-priors", "grid", "--out", str(grid)])
    source = spot.load_checkpoint(grid / "checkpoint.pt").state_dict()
    retro = tmp_path / "retro"
    train.main(TINY + ["--epochs", "1", "--max-steps", "1", "--lr", "1e-4", "--out", str(retro),
                       "--init-from", str(grid / "checkpoint.pt")])
    tuned = spot.load_checkpoint(retro / "checkpoint.pt").state_dict()
    # one step of lr 1e-4 moves every weight by about 1e-4; a fresh init would differ by ~0.02
    assert max((tuned[k] - source[k]).abs().max().item() for k in source) < 1e-3
    with pytest.raises(SystemExit, match="dim"):
        train.main(TINY + ["--dim", "64", "--out", str(tmp_path / "bad"), "--init-from",
                           str(grid / "checkpoint.pt")])


def test_data_errors_are_messages(tmp_path, capsys):
    with pytest.raises(SystemExit, match="image-size"):
        train.main(TINY + ["--image-size", "8", "--window", "2", "--out", str(tmp_path / "small")])
    with pytest.raises(SystemExit, match="data"):
        train.main(["--dataset", "cifar10", "--data-dir", str(tmp_path / "missing"), "--out",
                    str(tmp_path / "z"), "--no-progress"] + ["--cache-dir", str(tmp_path / "cache")])


DDP_PROBE = """
import json, os, sys
sys.path.insert(0, {root!r})
import data, spot, train
log = open({log!r} + "-" + os.environ["RANK"] + ".jsonl", "w")
batches, sample = data.batches, spot.sample_positions

def logged_batches(split, rows, seed, procs):
    print(json.dumps({{"rows": rows.tolist()}}), file=log, flush=True)
    return batches(split, rows, seed, procs)

def logged_sample(prior, n, n_tokens, *args, **kwargs):
    print(json.dumps({{"prior": prior, "tokens": n_tokens}}), file=log, flush=True)
    return sample(prior, n, n_tokens, *args, **kwargs)
data.batches, spot.sample_positions = logged_batches, logged_sample
sys.exit(train.main(sys.argv[1:]))
"""


def test_torchrun_two_processes_gloo(tmp_path):
    """DistributedDataParallel on the CPU: two gloo processes train, rank 0 logs and saves."""
    out = tmp_path / "ddp"
    # A port free right now, not a fixed one (which an earlier or a parallel run may still hold).
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    probe = tmp_path / "probe.py"          # train.py, recording what each process draws
    probe.write_text(DDP_PROBE.format(root=str(ROOT), log=str(tmp_path / "drawn")))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr",
               "127.0.0.1", "--master_port", str(port), str(probe)] + TINY + [
               "--epochs", "2", "--out", str(out)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    drawn = [[json.loads(line) for line in open(f"{tmp_path}/drawn-{rank}.jsonl")]
             for rank in (0, 1)]
    # Every step draws one prior and budget for both processes (no process waits for a bigger
    # one), and the budgets vary; each epoch, the two processes read disjoint images.
    steps = [[(d["prior"], d["tokens"]) for d in ranks if "tokens" in d] for ranks in drawn]
    assert steps[0] == steps[1] and len({tokens for _, tokens in steps[0]}) > 1
    rows = [[d["rows"] for d in ranks if "rows" in d] for ranks in drawn]
    for epoch0, epoch1 in zip(*rows, strict=True):
        assert not set(sum(epoch0, [])) & set(sum(epoch1, []))
    metrics = read_metrics(out)
    assert [m["epoch"] for m in metrics] == [1, 2, 2]
    assert result.stdout.count("done:") == 1            # only rank 0 logs
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    assert len(checkpoint["rng"]) == 2                  # both processes' random streams
    assert checkpoint["step"] == 12                     # global batch 32 = 2 x 16 per process
    spot.load_checkpoint(out / "checkpoint.pt")


# Retrofitting a pretrained ViT (timm / DeiT / MAE; the fixtures are small timm models, made
# without timm at test time: tests/fixtures/README.md).
FIXTURES = ROOT / "tests" / "fixtures"
RETRO = ["--dataset", "shapes", "--batch-size", "32", "--train-limit", "320", "--test-limit", "32",
         "--tokens", "4-16", "--eval-tokens", "4", "--lr", "1e-4", "--no-progress", "--threads", "1",
         "--precision", "fp32", "--heads", "3"]       # (a width of 48 has no standard number of heads)


def test_init_from_a_pretrained_vit_takes_its_shape_and_statistics(tmp_path):
    """The source decides the model: dim, depth, window, learned positions, LayerNorm eps and
    its own input statistics (not the dataset's); before training it IS load_pretrained's model."""
    source = FIXTURES / "vit_token.pt"
    fixture = torch.load(source, weights_only=True)
    out = tmp_path / "retro"
    argv = RETRO + ["--init-from", str(source), "--epochs", "3", "--max-steps", "20", "--out", str(out)]
    args = train.parse_args(argv)
    dataset = train.data.load_dataset("shapes", image_size=32, progress=False)
    built = train.build_model(args, dataset, torch.device("cpu"))
    reference = spot.load_pretrained(str(source), image_size=32, num_classes=10, heads=3,
                                     mean=fixture["mean"], std=fixture["std"])
    images = fixture["images"]
    grid = spot.grid_positions(32, 4).expand(len(images), -1, -1)
    with torch.no_grad():
        assert torch.equal(built(images, grid), reference(images, grid))
        assert torch.allclose(built(images, grid), fixture["logits"], atol=1e-4)   # timm's own logits
    assert train.main(argv) == 0                        # 20 steps: stops in epoch 2 of 3
    assert train.main(["--out", str(out), "--resume"]) == 0
    model, checkpoint = spot.load_checkpoint(out / "checkpoint.pt", return_checkpoint=True)
    config = model.config
    assert (config.dim, config.depth, config.window, config.heads) == (48, 2, 4, 3)
    assert (config.position_embedding, config.norm_eps, config.pool) == ("learned", 1e-6, "token")
    assert list(config.image_mean) == fixture["mean"] and list(config.image_std) == fixture["std"]
    assert config.image_mean != tuple(dataset.mean)
    assert checkpoint["step"] == 30 and read_metrics(out)[-1]["final"]


def test_the_documented_retrofit_command_of_a_fixture(tmp_path):
    """`python train.py --init-from tests/fixtures/vit_w128.pt --dataset shapes --max-steps 20`
    (README): no model flag at all, since a width of 128 means two 64-wide heads; it retrofits and
    its checkpoint reloads with the source's shape."""
    out = tmp_path / "w128"
    assert train.main(["--init-from", str(FIXTURES / "vit_w128.pt"), "--dataset", "shapes", "--max-steps", "20",
                       "--train-limit", "640", "--test-limit", "64", "--no-progress", "--threads", "1",
                       "--precision", "fp32", "--out", str(out)]) == 0
    config = spot.load_checkpoint(out / "checkpoint.pt").config
    assert (config.dim, config.heads, config.depth, config.position_embedding) == (128, 2, 1, "learned")


def test_init_from_an_avg_pooled_vit_with_fc_norm(tmp_path):
    out = tmp_path / "mae"
    assert train.main(RETRO + ["--init-from", str(FIXTURES / "vit_avg_fcnorm.pt"), "--epochs", "1",
                               "--max-steps", "3", "--out", str(out)]) == 0
    config = spot.load_checkpoint(out / "checkpoint.pt").config
    assert config.pool == "avg" and config.position_embedding == "learned"


@pytest.mark.parametrize("source, extra, words", [
    ("vit_token.pt", ["--window", "8"], ["--window 8", "window is 4", "leave --window out"]),
    ("vit_token.pt", ["--dim", "64"], ["--dim 64", "dim is 48"]),
    ("vit_token.pt", "drop --heads", ["heads", "--heads N"]),
    ("resnet_like.pt", [], ["resnet_like.pt", "not a ViT"]),
    ("deit_distilled.pt", [], ["deit_distilled.pt", "dist_token"]),
    ("vit_nan.pt", [], ["NaN or Inf"]),
    ("shape_bomb.pt", [], ["blocks.0.mlp.fc1.weight"]),
    ("hf_max", [], ["global_pool='max'"]),
    ("hf_avg_nofcnorm", [], ["without fc_norm"]),
    ("empty_folder", [], ["folder without"]),
])
def test_init_from_refuses_what_contradicts_or_is_not_a_vit(tmp_path, capsys, monkeypatch, source, extra, words):
    monkeypatch.setattr(train.data, "load_dataset", lambda *a, **k: pytest.fail("loaded data"))
    path = FIXTURES / source
    if source == "empty_folder":
        path = tmp_path / source
        path.mkdir()
    argv = (RETRO[:-2] if extra == "drop --heads" else RETRO + extra) + [
        "--init-from", str(path), "--out", str(tmp_path / "x")]
    with pytest.raises(SystemExit) as exit_info:
        train.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert all(word in err.splitlines()[-1] for word in words), err


def test_init_from_a_headless_224_px_encoder_takes_its_image_size(tmp_path, monkeypatch):
    """`python train.py --init-from <headless 224 px ViT> --dataset shapes`: no --image-size (the
    source's 224 px beats the preset's 32), no head in the file (a fresh one for the data's 10
    classes). The shapes data at 224 px is slow to render, so the data is a small stand-in here;
    the command itself ran in full (experiments/NOTES.md, session 6)."""
    argv = ["--init-from", str(FIXTURES / "vit_headless.pt"), "--dataset", "shapes",
            "--max-steps", "1", "--no-progress", "--threads", "1", "--out", str(tmp_path / "h")]
    args = train.parse_args(argv)
    assert (args.image_size, args.window, args.dim, args.heads) == (224, 16, 24, 3)
    shapes = train.data.make_shapes(64, 224)
    small = train.data.Dataset("shapes", train.data.Split(*shapes), train.data.Split(*shapes),
                               list(train.data.SHAPE_CLASSES), (0.5,) * 3, (0.5,) * 3, (224, 224))
    monkeypatch.setattr(train.data, "load_dataset", lambda *a, **k: small)
    assert train.main(argv + ["--batch-size", "32"]) == 0
    config = spot.load_checkpoint(tmp_path / "h" / "checkpoint.pt").config
    assert (config.image_size, config.num_classes, config.dim) == ((224, 224), 10, 24)


def test_init_from_a_timm_folder_reads_its_config(tmp_path):
    """timm's HF folder (config.json + pytorch_model.bin): its config gives the input statistics
    (0.5, not ImageNet's) and the heads (4 at width 64, where the width alone says 1); a flag
    beats the config."""
    out = tmp_path / "hf"
    common = ["--dataset", "shapes", "--max-steps", "1", "--train-limit", "64", "--test-limit",
              "32", "--batch-size", "32", "--no-progress", "--threads", "1"]
    assert train.main(["--init-from", str(FIXTURES / "hf_half"), "--out", str(out)] + common) == 0
    config = spot.load_checkpoint(out / "checkpoint.pt").config
    assert config.image_mean == config.image_std == (0.5,) * 3 and config.heads == 4
    flagged = tmp_path / "flagged"
    assert train.main(["--init-from", str(FIXTURES / "hf_half"), "--out", str(flagged),
                       "--image-mean", "0.4,0.4,0.4"] + common) == 0
    assert spot.load_checkpoint(flagged / "checkpoint.pt").config.image_mean == (0.4,) * 3


# Runs that survive: a locked run folder, metrics that outlive a crash, a diverging run stopped,
# and every bad input a sentence. Each fault is injected: a second process, a killed one, a
# patched writer, a raised OSError.
LOCKER = """import sys, time, utils
lock = utils.lock_run_folder(sys.argv[1])
print("locked", flush=True)
time.sleep(120)
"""


def hold_lock(out):
    """A second process that holds the lock of `out` (as a running train.py does)."""
    process = subprocess.Popen([sys.executable, "-c", LOCKER, str(out)], cwd=ROOT,
                               stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "locked"
    return process


def test_a_run_folder_is_locked_while_a_run_writes_it(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert train.main(TINY + ["--epochs", "2", "--max-steps", "2", "--out", str(out)]) == 0
    locker = hold_lock(out)
    try:
        monkeypatch.setattr(train.data, "load_dataset", lambda *a, **k: pytest.fail("loaded data"))
        for argv in (["--out", str(out), "--resume"], TINY + ["--out", str(out)]):
            with pytest.raises(SystemExit) as exit_info:       # refused at once, naming the PID
                train.main(argv)
            assert exit_info.value.code != 0
            message = str(exit_info.value.code) + capsys.readouterr().err
            assert f"in use by the run of process {locker.pid}" in message
        # A second process really is held off, not only this one: a lock that any process takes.
        code = "import sys, utils; lock = utils.lock_run_folder(sys.argv[1])"
        second = subprocess.run([sys.executable, "-c", code, str(out)], cwd=ROOT,
                                capture_output=True, text=True, timeout=60)
        assert second.returncode == 1 and str(locker.pid) in second.stderr
    finally:
        locker.kill()                                            # dies holding it: a stale lock
        locker.wait()
    monkeypatch.undo()
    assert (out / ".lock").read_text().strip() == str(locker.pid)
    assert train.main(["--out", str(out), "--resume"]) == 0     # taken over, with one line
    assert f"taking over the stale lock of process {locker.pid}" in capsys.readouterr().out
    assert (out / ".lock").read_text() == ""                   # released when main returned
    # ... and when main raises: the next run in the folder goes ahead.
    monkeypatch.setattr(train, "train_epoch", lambda *a: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        train.main(TINY + ["--epochs", "1", "--out", str(tmp_path / "raised")])
    monkeypatch.undo()
    assert train.main(TINY + ["--epochs", "1", "--out", str(tmp_path / "raised")]) == 0


class Killed(BaseException):
    """A kill -9 at a write: nothing after it runs (not even `except Exception`)."""


def test_a_crash_at_a_checkpoint_loses_no_metrics_line_and_doubles_none(tmp_path, monkeypatch):
    """The epoch's metrics line is written before its checkpoint replaces the last one; a kill
    in between (or mid-write) leaves the old checkpoint, a line it does not have, and a partial
    temporary file; --resume drops the line (and a line cut short), redoes the epoch, removes the
    temporary file, and ends with the same metrics as a run never killed."""
    full, crashed = tmp_path / "full", tmp_path / "crashed"
    train.main(TINY + ["--epochs", "3", "--out", str(full)])
    write_atomic = utils.write_atomic

    def killed_at_the_second_checkpoint(path, content):
        if path.name == "checkpoint.pt" and content["epoch"] == 2:
            (path.parent / ".checkpoint-a1b2c3d4.pt").write_bytes(b"half a checkpoint")
            raise Killed
        write_atomic(path, content)
    monkeypatch.setattr(utils, "write_atomic", killed_at_the_second_checkpoint)
    with pytest.raises(Killed):
        train.main(TINY + ["--epochs", "3", "--out", str(crashed)])
    monkeypatch.undo()
    assert [m["epoch"] for m in read_metrics(crashed)] == [1, 2]          # epoch 2's line is kept
    assert torch.load(crashed / "checkpoint.pt", weights_only=True)["epoch"] == 1
    with open(crashed / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 3, "step": 1')                                 # and a line cut short
    assert train.main(["--out", str(crashed), "--resume"]) == 0
    assert comparable(read_metrics(crashed)) == comparable(read_metrics(full))
    assert not (crashed / ".checkpoint-a1b2c3d4.pt").exists()
    with pytest.raises(SystemExit, match="2"):          # a finished run is refused, and its
        train.main(["--out", str(crashed), "--resume"])  # test line stays once
    assert comparable(read_metrics(crashed)) == comparable(read_metrics(full))


def test_a_run_killed_with_sigkill_resumes_to_the_same_metrics(tmp_path):
    """kill -9 wherever it lands (mid-step, mid-evaluation, mid-write): --resume ends with the
    metrics of a run never killed, each epoch's line once, and no temporary file left."""
    full, killed = tmp_path / "full", tmp_path / "killed"
    args = TINY + ["--epochs", "4", "--train-limit", "640"]
    train.main(args + ["--out", str(full)])
    command = [sys.executable, str(ROOT / "train.py")] + args + ["--out", str(killed)]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (killed / "checkpoint.pt").exists() and time.time() < deadline:
        time.sleep(0.01)
    process.kill()
    process.wait()
    subprocess.run(command + ["--resume"], cwd=ROOT, check=True, capture_output=True, timeout=300)
    assert comparable(read_metrics(killed)) == comparable(read_metrics(full))
    assert sorted(p.name for p in killed.iterdir()) == [".lock", "checkpoint.pt", "metrics.jsonl",
                                                         "run.json"]


def test_a_diverging_run_stops_at_once_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "run"
    original, calls = train.train_step, []

    def diverging(run, images, labels):
        loss, logits = original(run, images, labels)
        calls.append(1)
        return (loss * float("nan") if len(calls) == 9 else loss), logits    # at step 9 of 18
    monkeypatch.setattr(train, "train_step", diverging)
    with pytest.raises(SystemExit) as exit_info:
        train.main(TINY + ["--epochs", "3", "--out", str(out)])
    message = str(exit_info.value.code)
    assert "diverged" in message and "at step 9" in message and str(out / "checkpoint.pt") in message
    assert len(calls) == 9                                                # at once
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 6     # epoch 1's
    assert [m["epoch"] for m in read_metrics(out)] == [1]
    # Weights made non-finite by the last step of an epoch (its loss still finite): not saved.
    calls.clear()

    def breaks_the_weights(run, images, labels):
        result = original(run, images, labels)
        calls.append(1)
        if len(calls) == 6:                                  # after the update of step 6
            run.model.cls_token.data.fill_(float("inf"))
        return result
    monkeypatch.setattr(train, "train_step", breaks_the_weights)
    with pytest.raises(SystemExit, match="weights are not finite after step 6"):
        train.main(TINY + ["--epochs", "3", "--out", str(tmp_path / "weights")])
    assert not (tmp_path / "weights" / "checkpoint.pt").exists()


def test_the_diverging_command_of_the_issue_exits_nonzero(tmp_path):
    """`python train.py --lr 1e6 --warmup-epochs 0 --max-steps 10`: a message, exit 1, and no
    NaN checkpoint."""
    out = tmp_path / "nan"
    argv = [a for a in TINY if a not in ("--lr", "3e-3", "--warmup-epochs", "0.5")]
    result = subprocess.run([sys.executable, str(ROOT / "train.py")] + argv + [
        "--lr", "1e6", "--warmup-epochs", "0", "--max-steps", "10", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "diverged" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (out / "checkpoint.pt").exists()


def test_a_dataset_of_one_class_is_refused(tmp_path, monkeypatch):
    shapes = train.data.load_dataset("shapes", image_size=16, progress=False)
    one = train.data.Split(shapes.test.images[:256], torch.zeros(256, dtype=torch.long))
    dataset = train.data.Dataset("shapes", one, one, ["circle"], (0.5,) * 3, (0.5,) * 3, (16, 16))
    monkeypatch.setattr(train.data, "load_dataset", lambda *a, **k: dataset)
    monkeypatch.setattr(train, "build_model", lambda *a: pytest.fail("built a model"))
    with pytest.raises(SystemExit, match="one class"):
        train.main(TINY + ["--out", str(tmp_path / "one")])


def test_sizes_that_do_not_tile_and_models_too_large_are_refused_at_once(tmp_path, capsys,
                                                                         monkeypatch):
    monkeypatch.setattr(train.data, "load_dataset", lambda *a, **k: pytest.fail("loaded data"))
    start = time.time()
    for extra, words in [(["--image-size", "18"], "not a multiple of --window 4"),
                         (["--dim", "100000000"], "GiB")]:
        with pytest.raises(SystemExit) as exit_info:
            train.main(TINY + extra + ["--out", str(tmp_path / "x")])
        assert exit_info.value.code == 2 and words in capsys.readouterr().err
    assert time.time() - start < 1
    help_text = train.utils.train_parser(train.PRESETS, train.data.DATASETS, spot.PRIORS).format_help()
    assert "a multiple of --window" in help_text


def test_the_resume_hint_is_the_full_command(tmp_path):
    args = train.parse_args(TINY + ["--max-steps", "50", "--out", str(tmp_path / "my run")])
    hint = utils.resume_command(args)
    assert hint.startswith("python train.py --resume --out ")
    resumed = shlex.split(hint)[2:]
    assert resumed[resumed.index("--max-steps") + 1] == "50"
    assert resumed[resumed.index("--out") + 1] == str(tmp_path / "my run")
    assert resumed[resumed.index("--threads") + 1] == "1"


def test_a_full_disk_and_a_checkpoint_without_args_are_one_line_messages(tmp_path, capsys,
                                                                        monkeypatch):
    out = tmp_path / "run"
    train.main(TINY + ["--epochs", "2", "--max-steps", "3", "--out", str(out)])
    before = (out / "checkpoint.pt").read_bytes()

    def full_disk(path, content):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
    monkeypatch.setattr(utils, "write_atomic", full_disk)
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--out", str(out), "--resume"])
    message = str(exit_info.value.code)
    assert "No space left on device" in message and "--resume" in message and "\n" not in message
    assert (out / "checkpoint.pt").read_bytes() == before                # the last one survives
    monkeypatch.undo()
    model_only = tmp_path / "model_only"
    model_only.mkdir()
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    torch.save({k: checkpoint[k] for k in ("model_config", "model")}, model_only / "checkpoint.pt")
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--out", str(model_only), "--resume"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "no 'args'" in err.splitlines()[-1]
    assert "Traceback" not in err


def test_resume_of_a_finished_run_says_so(tmp_path, capsys):
    out = tmp_path / "done"
    assert train.main(TINY + ["--epochs", "1", "--val-size", "32", "--out", str(out)]) == 0
    with pytest.raises(SystemExit):
        train.main(["--resume", "--out", str(out)])
    error = capsys.readouterr().err
    assert "is finished" in error and "oracle.py --checkpoint" in error and "--init-from" in error
    # A run stopped by --max-steps is not finished: it goes on.
    part = tmp_path / "part"
    train.main(TINY + ["--epochs", "2", "--max-steps", "2", "--out", str(part)])
    assert train.main(["--resume", "--out", str(part), "--no-progress"]) == 0


def test_init_from_says_what_it_loaded(tmp_path, caplog):
    caplog.set_level("INFO", logger="spot")
    source = ROOT / "tests" / "fixtures" / "vit_token.pt"
    train.main(RETRO + ["--init-from", str(source), "--max-steps", "1", "--out",
                        str(tmp_path / "r")])
    # (the last: the flags' defaults read the source once before, with no logging set up)
    line = [r.getMessage() for r in caplog.records if r.getMessage().startswith("loaded")][-1]
    assert "vit_token.pt" in line and "pretrained ViT" in line and "dim 48" in line
    assert "image_mean" in line and line.endswith("its head")    # 10 classes, as shapes


def test_crop_pct_needs_streamed_images(tmp_path):
    """Random-resized crops are cut from the file as it is decoded: data held in memory (shapes,
    CIFAR-10, folders up to 128 px) is refused with the reason, before any step."""
    with pytest.raises(SystemExit, match="--crop-pct: random-resized crops need"):
        train.main(TINY + ["--crop-pct", "0.875", "--out", str(tmp_path / "r")])
