"""Shared test set-up: import the project from the repository root, single-threaded torch."""
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# Real data lives beside the repository on the developers' machines and in CI; tests that
# need it skip cleanly when it is absent.
SHARED_DATA = ROOT.parent / "shared" / "data"
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def shared_data():
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one thread is fastest, and it does not stall when other jobs share the CPU
    (two spinning OpenMP threads on a busy 2-core machine can be 10x slower). A module opts in
    with `pytestmark = pytest.mark.usefixtures("one_thread")`; the count is restored after it,
    also when a CLI under test (bench.main's --threads) changed it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def head_checkpoint(tmp_path_factory):
    """A tiny SPoT model trained for one epoch with a validation split: the frozen model that the
    label-free heads' commands (experiments.glimpses, .ranker, .move) start from."""
    import train
    from test_train import TINY
    run = tmp_path_factory.mktemp("head") / "run"
    argv = [a for a in TINY if a not in ("--train-limit", "192")]
    assert train.main(argv + ["--train-limit", "384", "--epochs", "1", "--val-size", "64",
                              "--out", str(run)]) == 0
    return run / "checkpoint.pt"
