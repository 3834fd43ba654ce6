"""experiments/gpu_smoke.py's own logic, on the CPU (--cpu): the streamed-folder checks -- a
train.py run on a synthetic 224 px JPEG folder with the imagenet-retrofit preset, the same run
stopped and resumed, oracle.py on its checkpoint -- each pass (about a minute)."""
import subprocess
import sys

from conftest import ROOT


def test_cpu_folder_resume_oracle_cli():
    done = subprocess.run([sys.executable, "-m", "experiments.gpu_smoke", "--cpu",
                           "--only", "folder,resume,oracle_cli"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    report = done.stdout + done.stderr
    assert done.returncode == 0, report
    lines = done.stdout.splitlines()
    for name in ("folder", "resume", "oracle_cli"):
        assert any(line.startswith(f"ok   {name}: ") for line in lines), report
    assert not any(line.startswith("FAIL") for line in lines), report
    assert "0 of 3 failed" in lines[-1], report


def test_without_cuda_or_cpu_flag_it_says_so(monkeypatch):
    import torch
    from experiments import gpu_smoke
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_smoke.main([]) == 0
    assert gpu_smoke.main(["--only", "vitb"]) == 0


def test_only_refuses_an_unknown_check():
    done = subprocess.run([sys.executable, "-m", "experiments.gpu_smoke", "--cpu",
                           "--only", "folder,nope"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2 and "unknown check(s) nope" in done.stderr
