"""Every training command stored in results/*/run.json still parses to the run it made, and starts
and runs: the command as committed, with --out in a temporary folder, capped at two optimizer
steps on a small subset. A command whose data folder is missing skips. A retrofit's --init-from
names a run folder that is not in git (runs/...): its source command makes it first, in one step.

The real data is decoded once into the decode cache train.py uses ($SPOT_CACHE or ~/.cache/spot);
later sessions read it from there."""
import json
import shlex
from pathlib import Path

import pytest

import train
from conftest import ROOT

# On top of each stored command: a subset of two batches of its own size, a small evaluation,
# one thread, and fp32 (tests/test_train.py covers the bf16 probe).
QUICK = ["--train-limit", "256", "--test-limit", "64", "--threads", "1", "--no-progress", "--precision", "fp32"]
# Flags of the run, not of its recipe: they may differ between the stored run and this one.
WHERE = {"out", "data_dir", "init_from"}


def stored_commands():
    """{run name: argv after train.py} for every results/*/run.json that train.py wrote."""
    commands = {}
    for path in sorted(ROOT.glob("results/*/run.json")):
        argv = shlex.split(json.loads(path.read_text()).get("command", ""))
        if argv and argv[0] == "train.py":
            commands[path.parent.name] = argv[1:]
    return commands


COMMANDS = stored_commands()


def value(argv, flag):
    return argv[argv.index(flag) + 1] if flag in argv else None


def replaced(argv, flag, new):
    i = argv.index(flag)
    return argv[:i + 1] + [new] + argv[i + 2:]


def runnable(name, out):
    """A stored command with --out in `out` and its --data-dir resolved from the repository root
    (the runs were started there: ../shared/data is conftest's SHARED_DATA)."""
    argv = replaced(COMMANDS[name], "--out", str(out))
    if value(argv, "--data-dir") is not None:
        folder = (ROOT / value(argv, "--data-dir")).resolve()
        if not folder.is_dir():
            pytest.skip(f"real data not found at {folder}")
        argv = replaced(argv, "--data-dir", str(folder))
    return argv


def test_commands_were_found():
    assert {"cifar10-spot", "cifar10-grid-vit", "cifar10-retrofit"} <= set(COMMANDS)


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_stored_training_command_still_runs(name, tmp_path):
    argv = runnable(name, tmp_path / name)
    if value(argv, "--init-from") is not None:
        sources = {value(a, "--out"): source for source, a in COMMANDS.items()}
        source = sources.get(str(Path(value(argv, "--init-from")).parent))
        assert source is not None, f"{name}: no stored command makes its --init-from"
        assert train.main(runnable(source, tmp_path / source) + QUICK + ["--max-steps", "1"]) == 0
        argv = replaced(argv, "--init-from", str(tmp_path / source / "checkpoint.pt"))
    # The command still means what it meant: every flag of the recipe parses to the stored value.
    stored = json.loads((ROOT / "results" / name / "run.json").read_text())["args"]
    parsed = vars(train.parse_args(argv))
    comma_list = lambda v: ",".join(v) if isinstance(v, list) and v and isinstance(v[0], str) else v
    differ = {k: (stored[k], parsed[k]) for k in set(stored) & set(parsed) - WHERE
              if comma_list(stored[k]) != comma_list(parsed[k])}
    assert not differ, f"{name}: (stored, now) {differ}"
    assert train.main(argv + QUICK + ["--max-steps", "2"]) == 0
    metrics = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    budgets = [int(b) for b in str(stored["eval_tokens"]).split(",")]      # e.g. "4,8,16"
    assert metrics[-1]["step"] == 2 and all(f"val_acc@{b}" in metrics[-1] for b in budgets)
