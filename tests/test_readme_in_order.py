"""README.md as a newcomer follows it: its commands, in the order printed, on a fresh copy.

tests/test_docs_commands.py proves that every printed command *parses*; this test *runs* them,
one after another, the way someone reading README.md top to bottom would: the training run that
the search, the plot and the placer read from must be made first, by the command README prints
before them, and land where they look for it.

The fresh copy: the files `git ls-files` lists, as they are in the working tree now (uncommitted
edits count, untracked files do not), copied into pytest's tmp_path and committed to a new git
repository there. After the last command, `git status` in the copy must show no tracked file
changed, and nothing new outside `runs/` (which .gitignore ignores) other than Python's caches.
A README command that writes into figures/, results/, data/ or anywhere else fails here.

The commands: README.md's code lines (indented by four spaces or fenced, as
test_docs_commands.printed_commands reads them; a trailing `# comment` dropped) that start with
`python` or `bash`. Run with `sys.executable` for `python`, the current environment, the copy as
the working directory, and README's own flags kept (--out included). Skipped, each with its
reason printed:

    python -m pip ...                   the set-up line (installs packages; runs this test suite)
    any command with --device cuda      needs a CUDA GPU
    bash experiments/rerun.sh ...       hours of training
    --data-dir DIR that a fresh clone does not hold (data/...): skipped, except the CIFAR-10
        command, which runs with --data-dir pointed at conftest's SHARED_DATA/cifar10
        (../shared/data/cifar10 beside the repository) when that folder exists
    a command that names a path inside the --out folder of a skipped command (it would read
        what was never made)

The budgets appended, per script (a flag the README command already gives is not appended, so
README's own value wins, e.g. the retrofit example's `--max-steps 20`):

    train.py                --max-steps 3 --test-limit 64
    oracle.py               --limit 16 --knn-limit 64
    visualize.py            (none: 4 images, 20 search steps, a few seconds)
    experiments.tables      (none)
    experiments.bench       (none: --quick as printed)
    experiments.placement   (none: it has no step or image limit; README's --epochs 1 is
                            one pass over the 9,000 shapes training images)
    experiments.figures     (none)

A README command of a script not in that table fails the test until a budget is written down
for it here (BUDGETS), so a slow new command cannot slip into the test suite unbudgeted.

Measured on a 2-core Intel Xeon: 128 s in all (with the CIFAR-10 command), of which
experiments.bench --quick ~25 s on an idle machine (60-95 s while other jobs ran) and
experiments.placement ~30 s. `-s` prints each command as run, its time, and each skip.
"""
import os
import re
import shlex
import shutil
import subprocess
import sys
import time

import pytest

from conftest import ROOT, SHARED_DATA

# Script -> flags appended (each flag only if the command does not already give it).
BUDGETS = {
    "train.py": ["--max-steps", "3", "--test-limit", "64"],
    "oracle.py": ["--limit", "16", "--knn-limit", "64"],
    "visualize.py": [],
    "experiments.tables": [],
    "experiments.bench": [],
    "experiments.placement": [],
    "experiments.figures": [],
}
CIFAR10 = SHARED_DATA / "cifar10"
TIMEOUT = 600                     # seconds per command: a hang fails, it does not stall CI
# Untracked paths allowed in the copy after the commands ran: git-ignored run folders and caches.
ALLOWED = re.compile(r"^runs/|(^|/)__pycache__/|\.pyc$|(^|/)\.pytest_cache/")


def readme_commands():
    """README.md's `python ...` and `bash ...` code lines, in order (continuation lines joined,
    trailing comments dropped), read as test_docs_commands.printed_commands reads them."""
    found, fenced = [], False
    for line in (ROOT / "README.md").read_text().replace("\\\n", " ").splitlines():
        fenced ^= line.startswith("```")
        if fenced or line.startswith("    "):
            command = re.sub(r"\s+#.*$", "", line.strip())
            if command.startswith(("python ", "bash ")):
                found.append(command)
    return found


def script_of(words):
    """['python', '-m', 'experiments.bench', ...] -> 'experiments.bench'; train.py -> train.py."""
    return words[2] if words[1] == "-m" else words[1]


def value(words, flag):
    return words[words.index(flag) + 1] if flag in words else None


def plan(command, copy, skipped_outs):
    """A README command -> (argv to run in `copy`, None) or (None, the reason it is skipped).
    skipped_outs: {--out folder of a skipped command: that command}; a command that names a path
    in one of them reads what was never made, so it is skipped too."""
    words = shlex.split(command)
    for out, source in skipped_outs.items():
        if any(w == out or w.startswith(out.rstrip("/") + "/") for w in words):
            return None, f"reads {out}, the output of a skipped command (`{source[:60]}...`)"
    if command.startswith("python -m pip"):
        return None, "set-up line (installs packages, runs the whole test suite)"
    if value(words, "--device") == "cuda":
        return None, "--device cuda: needs a CUDA GPU"
    if words[0] == "bash" and words[1:2] == ["experiments/rerun.sh"]:
        return None, "experiments/rerun.sh retrains RESULTS.md's models (hours)"
    assert words[0] == "python" and not {"&&", "||", "|", ";", ">"} & set(words), (
        f"README command `{command}`: this test runs plain `python ...` commands only")
    data_dir = value(words, "--data-dir")
    if data_dir is not None and not (copy / data_dir).exists():   # not in a fresh clone
        if value(words, "--dataset") != "cifar10":
            return None, f"--data-dir {data_dir}: data not in a fresh clone"
        if not CIFAR10.is_dir():
            return None, f"--data-dir {data_dir}: data not in a fresh clone, and {CIFAR10} absent"
        i = words.index("--data-dir")
        words[i + 1] = str(CIFAR10)
    script = script_of(words)
    assert script in BUDGETS, (
        f"README prints `{command}`, and this test has no budget for {script}: measure it and "
        f"add an entry to BUDGETS (and the module docstring)")
    extra, budget = [], BUDGETS[script]
    for i in range(0, len(budget), 2):
        if budget[i] not in words:
            extra += budget[i:i + 2]
    return [sys.executable] + words[1:] + extra, None


def git(*args, cwd):
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True)


def fresh_copy(dest):
    """The tracked files, as they are in the working tree now, committed to a new repository."""
    listed = git("ls-files", "-z", cwd=ROOT).stdout.split("\0")
    for name in filter(None, listed):
        source = ROOT / name
        if not os.path.lexists(source):          # deleted in the working tree, not yet committed
            continue
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, dest / name, follow_symlinks=False)
    git("-c", "init.defaultBranch=main", "init", "-q", cwd=dest)
    git("add", "-A", cwd=dest)
    git("-c", "user.name=readme-test", "-c", "user.email=readme-test@localhost",
        "-c", "commit.gpgsign=false", "commit", "-q", "--no-verify", "-m", "fresh copy", cwd=dest)


def test_readme_commands_run_in_order_on_a_fresh_copy(tmp_path):
    if shutil.which("git") is None:
        pytest.skip("git is not available")
    if subprocess.run(["git", "rev-parse", "--is-inside-work-tree"], cwd=ROOT,
                      capture_output=True).returncode != 0:
        pytest.skip(f"{ROOT} is not a git checkout (no `git ls-files` to copy)")
    copy = tmp_path / "repo"
    copy.mkdir()
    fresh_copy(copy)

    commands = readme_commands()
    assert any(c.startswith("python train.py") for c in commands), "README's commands not found"
    report, skipped_outs, start = [], {}, time.perf_counter()
    for command in commands:
        argv, skipped = plan(command, copy, skipped_outs)
        if skipped:
            out = value(shlex.split(command), "--out")
            if out is not None:
                skipped_outs[out] = command
            report.append(f"skipped  {command}\n         ({skipped})")
            continue
        began = time.perf_counter()
        try:
            done = subprocess.run(argv, cwd=copy, env=dict(os.environ), stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, timeout=TIMEOUT)
        except subprocess.TimeoutExpired as error:
            output = error.output or ""
            output = output.decode(errors="replace") if isinstance(output, bytes) else output
            pytest.fail(f"README command timed out after {TIMEOUT} s:\n  {command}\nran as:\n  "
                        f"{shlex.join(argv)}\nlast output:\n{output[-2000:]}")
        shown = shlex.join(["python"] + argv[1:])
        report.append(f"ran      {shown}   [{time.perf_counter() - began:.1f} s]")
        assert done.returncode == 0, (
            f"README command failed (exit {done.returncode}):\n  {command}\nran as:\n  "
            f"{shown}\nafter:\n  " + "\n  ".join(report[:-1]) +
            f"\nlast output:\n{done.stdout[-2000:]}")
    report.append(f"total {time.perf_counter() - start:.0f} s")
    print("\n" + "\n".join(report))

    changed = git("status", "--porcelain", "--untracked-files=no", cwd=copy).stdout
    assert not changed, f"README's commands changed tracked files:\n{changed}"
    status = git("status", "--porcelain", "--ignored", "--untracked-files=all", cwd=copy).stdout
    outside = [line for line in status.splitlines() if not ALLOWED.search(line[3:])]
    assert not outside, ("README's commands wrote outside runs/ (git status --ignored):\n" +
                         "\n".join(outside))
