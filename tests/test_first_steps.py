"""The numbers stay the numbers: the first optimizer steps of the default run and of every
committed recipe (results/*/run.json), pinned in tests/fixtures/first_steps.json.

Each run takes two (the default run: three) steps and one small evaluation; the test compares
the train loss, the evaluation loss and every accuracy of metrics.jsonl with the values recorded
before the code was last reorganised. Float kernels differ between CPUs, so the values are equal
bit for bit on the CPU and torch that recorded them (the fixture names both) and within 1e-4
(relative, losses only) elsewhere.

    SPOT_RECORD_FIRST_STEPS=1 python -m pytest -q tests/test_first_steps.py   # re-record
"""
import json
import os

import pytest

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


def check(name, out):
    lines = (out / "metrics.jsonl").read_text().splitlines()
    got = pinned(json.loads(lines[-1]))
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


def test_the_default_run(tmp_path):
    assert train.main(DEFAULT_RUN + ["--out", str(tmp_path / "default")]) == 0
    check("default", tmp_path / "default")


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_a_committed_recipe(name, tmp_path):
    argv = runnable(name, tmp_path / name)
    if value(argv, "--init-from") is not None:
        sources = {value(a, "--out"): source for source, a in COMMANDS.items()}
        source = sources[str(os.path.dirname(value(argv, "--init-from")))]
        assert train.main(runnable(source, tmp_path / source) + QUICK + ["--max-steps", "1"]) == 0
        argv = replaced(argv, "--init-from", str(tmp_path / source / "checkpoint.pt"))
    assert train.main(argv + QUICK + ["--max-steps", "2"]) == 0
    check(name, tmp_path / name)
