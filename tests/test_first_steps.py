"""The numbers stay the numbers: the first optimizer steps of the default run and of every
committed recipe (results/*/run.json), pinned in tests/fixtures/first_steps.json.

Each run takes two (the default run: three) steps and one small evaluation; the test compares
the train loss, the evaluation loss and every accuracy of metrics.jsonl, and CRC32s of the first
training batch (its images after augmentation, its labels and the positions drawn for it), with
the values recorded before the code was last reorganised (the batches: before images above 128
px were streamed; the recipes that draw the salient prior were recorded again when the
spectral-residual map was fixed, and only they changed). Float kernels differ between CPUs, so the values are equal bit for bit on the
CPU and torch that recorded them (the fixture names both) and within 1e-4 (relative, losses
only) elsewhere.

    SPOT_RECORD_FIRST_STEPS=1 python -m pytest -q tests/test_first_steps.py   # re-record
"""
import json
import os
import zlib

import pytest

import spot
import train
import utils
from conftest import ROOT
from test_run_commands import COMMANDS, QUICK, replaced, runnable, value

FIXTURE = ROOT / "tests" / "fixtures" / "first_steps.json"
RECORD = os.environ.get("SPOT_RECORD_FIRST_STEPS") == "1"
DEFAULT_RUN = ["--max-steps", "3", "--precision", "fp32", "--threads", "1", "--no-progress"]
pytestmark = pytest.mark.usefixtures("one_thread")


def pinned(metrics):
    """The numbers of a run's last metrics line that the code must reproduce."""
    return {k: v for k, v in metrics.items() if k.endswith(("_loss", "_acc")) or "_acc@" in k}


def crc(tensor):
    return zlib.crc32(tensor.detach().cpu().contiguous().numpy().tobytes())


@pytest.fixture(autouse=True)
def first_batch(monkeypatch):
    """{"batch_images", "batch_labels", "batch_positions"}: CRC32s of the first training batch,
    as train_step gets it, and of the first positions drawn (train_step draws them first)."""
    seen = {}
    step, sample = train.train_step, spot.sample_positions

    def recorded_step(run, images, labels):
        seen.setdefault("batch_images", crc(images))
        seen.setdefault("batch_labels", crc(labels))
        return step(run, images, labels)

    def recorded_sample(*args, **kwargs):
        positions = sample(*args, **kwargs)
        seen.setdefault("batch_positions", crc(positions))
        return positions
    monkeypatch.setattr(train, "train_step", recorded_step)
    monkeypatch.setattr(spot, "sample_positions", recorded_sample)
    return seen


def check(name, out, batch):
    lines = (out / "metrics.jsonl").read_text().splitlines()
    got = pinned(json.loads(lines[-1])) | batch
    saved = json.loads(FIXTURE.read_text()) if FIXTURE.exists() else {}
    machine = {"cpu": utils.cpu_name(), "torch": train.torch.__version__}
    if RECORD:
        if saved.get("machine", machine) != machine:
            saved = {}                       # values of another CPU: record all anew
        saved.update(machine=machine, **{name: got})
        FIXTURE.write_text(json.dumps(saved, indent=1, sort_keys=True) + "\n")
        return
    assert name in saved, f"{name}: no pinned values; record them (see the module docstring)"
    if saved["machine"] == machine:
        assert got == saved[name]            # bit for bit
    else:
        losses = {k: v for k, v in saved[name].items() if k.endswith("_loss")}
        assert {k: got[k] for k in losses} == pytest.approx(losses, rel=1e-4)


def test_the_default_run(tmp_path, first_batch):
    assert train.main(DEFAULT_RUN + ["--out", str(tmp_path / "default")]) == 0
    check("default", tmp_path / "default", first_batch)


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_a_committed_recipe(name, tmp_path, first_batch):
    argv = runnable(name, tmp_path / name)
    if value(argv, "--init-from") is not None:
        sources = {value(a, "--out"): source for source, a in COMMANDS.items()}
        source = sources[str(os.path.dirname(value(argv, "--init-from")))]
        assert train.main(runnable(source, tmp_path / source) + QUICK + ["--max-steps", "1"]) == 0
        argv = replaced(argv, "--init-from", str(tmp_path / source / "checkpoint.pt"))
        first_batch.clear()                  # the recipe's own first batch, not its source's
    assert train.main(argv + QUICK + ["--max-steps", "2"]) == 0
    check(name, tmp_path / name, first_batch)
