"""
experiments/gpu_smoke.py -- a one-minute check of the CUDA paths, for a person with a GPU.

The test suite runs on the CPU, so the code that only runs on a GPU is checked here, on the
machine that has one:

    train      a short `train.py --device cuda` run on the built-in shapes data (retrofitting:
               one model for every budget and prior), into a temporary folder
    oracle     SPoT-ON, the oracle search (oracle.oracle_search), on a few images on CUDA: the
               label loss at the searched positions must not exceed the loss at the start
    attention  spot.attention's fused CUDA kernel against softmax(q k^T / sqrt(d)) v written out
               in float64, values and gradients, in float32 and bf16
    fixture    a timm ViT fixture (tests/fixtures/vit_token.pt) loaded on CUDA
               (spot.load_pretrained) gives timm's logits at the patch grid

    python -m experiments.gpu_smoke

One line per check ("ok" or "FAIL", with the numbers), then the GPU, the torch version and the
total time; the exit code is 1 if any check failed. Without CUDA it says so and exits 0.
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import data
import oracle
import spot
import train

ROOT = Path(__file__).resolve().parents[1]


def check_train(folder, trained):
    out = Path(folder) / "run"
    # 3 epochs of 16 steps (2048 images, batches of 128)
    code = train.main(["--dataset", "shapes", "--device", "cuda", "--epochs", "3",
                       "--train-limit", "2048", "--test-limit", "512", "--no-progress",
                       "--out", str(out)])
    model, checkpoint = spot.load_checkpoint(out / "checkpoint.pt", return_checkpoint=True)
    trained["model"] = model
    return code == 0 and checkpoint["step"] == 48, f"exit code {code}, {checkpoint['step']} steps"


def check_oracle(model):
    test = data.load_dataset("shapes", progress=False).test
    images, labels = test.images[:16].cuda().float() / 255, test.labels[:16].cuda()
    start = spot.sample_positions("isotropic", 16, 16, 32, 4).cuda()   # (16 images, 16 tokens, 2)
    result = oracle.oracle_search(model.cuda(), images, labels, start, steps=20)
    before, after = result.losses[0].mean().item(), result.losses[-1].mean().item()
    ok = after <= before and result.positions.isfinite().all().item()
    return ok, f"loss {before:.3f} -> {after:.3f}"


def check_attention(dtype, tolerance):
    """Largest |fused - formula| / max |formula| over the values and the gradients of q, k, v."""
    generator = torch.Generator("cuda").manual_seed(0)

    def draw():                                   # (B, heads, T, head dim) = (2, 3, 65, 64)
        return torch.randn(2, 3, 65, 64, device="cuda", generator=generator, dtype=dtype)
    q, k, v = (draw().requires_grad_() for _ in range(3))
    weights = draw()                                                       # d loss / d output
    fused = spot.attention(q, k, v)
    fused_grads = torch.autograd.grad((fused * weights).sum(), (q, k, v))
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    scores = q64 @ k64.transpose(-2, -1) / 64 ** 0.5                       # (2, 3, 65, 65)
    formula = F.softmax(scores, dim=-1) @ v64                              # (2, 3, 65, 64)
    formula_grads = torch.autograd.grad((formula * weights.double()).sum(), (q64, k64, v64))
    errors = [((a.double() - b).abs().max() / b.abs().max()).item()
              for a, b in zip((fused, *fused_grads), (formula, *formula_grads))]
    worst = max(errors)
    return worst <= tolerance, f"largest relative error {worst:.1e} (tolerance {tolerance:.0e})"


def check_fixture():
    fixture = torch.load(ROOT / "tests" / "fixtures" / "vit_token.pt", weights_only=True)
    model = spot.load_pretrained(fixture["state_dict"], heads=fixture["kwargs"]["num_heads"],
                                 mean=fixture["mean"], std=fixture["std"]).cuda()
    images = fixture["images"].cuda()
    with torch.no_grad():
        logits = model(images, spot.grid_positions(32, 4).cuda().expand(len(images), -1, -1)).cpu()
    error = (logits - fixture["logits"]).abs().max().item()
    return error <= 1e-4, f"max |logits - timm's| {error:.2e} (tolerance 1e-04)"


def main(argv=None):
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args(argv)   # (only --help)
    if not torch.cuda.is_available():
        print("no CUDA device: this script checks the GPU paths (fused attention, training and "
              "the oracle search on CUDA, loading a pretrained ViT there); run it on a machine "
              "with a GPU. Nothing to do.")
        return 0
    start, failed, trained = time.time(), 0, {}
    with tempfile.TemporaryDirectory() as folder:
        checks = [("attention fp32", lambda: check_attention(torch.float32, 1e-4)),
                  ("attention bf16", lambda: check_attention(torch.bfloat16, 2e-2)),
                  ("fixture", check_fixture),
                  ("train", lambda: check_train(folder, trained)),
                  ("oracle", lambda: check_oracle(trained["model"]))]   # the train check's model
        for name, check in checks:
            try:
                ok, numbers = check()
            except Exception as error:     # a failed check is a line of the report, not its end
                ok, numbers = False, f"{type(error).__name__}: {error}"
            print(f"{'ok  ' if ok else 'FAIL'} {name}: {numbers}", flush=True)
            failed += not ok
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | "
          f"{time.time() - start:.0f} s in all | {failed} of {len(checks)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
