"""
experiments/gpu_smoke.py -- a few-minute check of the CUDA paths, for a person with a GPU.

The test suite runs on the CPU, so the code that only runs on a GPU is checked here, on the
machine that has one:

    attention  spot.attention's fused CUDA kernel against softmax(q k^T / sqrt(d)) v written out
               in float64, values and gradients, in float32 and bf16
    fixture    a timm ViT fixture (tests/fixtures/vit_token.pt) loaded on CUDA
               (spot.load_pretrained) gives timm's logits at the patch grid
    train      a short `train.py --device cuda` run on the built-in shapes data (retrofitting:
               one model for every budget and prior), into a temporary folder
    oracle     SPoT-ON, the oracle search (oracle.oracle_search), on a few images on CUDA: the
               label loss at the searched positions must not exceed the loss at the start
    vitb       a ViT-B/16 at 224 px (learned position table) under bf16 autocast: forward +
               backward finite for every prior at 196 and at 49 tokens; the images/s of a
               training step (batch 64, 196 tokens, AdamW) and the peak GPU memory
    folder     `train.py --dataset folder --preset imagenet-retrofit` (streamed 224 px JPEGs,
               DataLoader workers, random-resized crops) from the tiny ViT fixture
               tests/fixtures/vit_224.pt on a synthetic ImageNet-style folder, 4 steps: exit 0,
               and metrics.jsonl has img_per_s and data_wait
    resume     the same run stopped after 2 steps and resumed to 4 ends with the same
               train_loss and val_loss as the straight run (1e-6 relative; CUDA kernels may be
               nondeterministic, so a difference up to 1e-3 is reported but passes)
    oracle_cli `oracle.py --precision bf16` on the folder run's checkpoint exits 0 and writes
               results.json and per_image.npz
    nccl       a 2-process `torchrun train.py --device cuda` folder run (NCCL); skipped with
               fewer than 2 GPUs

    python -m experiments.gpu_smoke                          # every check, on CUDA
    python -m experiments.gpu_smoke --only vitb,folder       # some of them
    python -m experiments.gpu_smoke --cpu                    # the script's own logic, on a CPU

One line per check ("ok", "FAIL" or "skip", with the numbers), then the GPU, the torch version
and the total time; the exit code is 1 if any check failed. Without CUDA (and without --cpu) it
says so and exits 0. --cpu runs what makes sense on a CPU, with tiny sizes (vitb at dim 192,
depth 2 and 64 px, the shapes run at dim 32, the folder runs with --device cpu), and skips
attention (the fused kernel) and nccl. tests/test_gpu_smoke.py runs
`--cpu --only folder,resume,oracle_cli`.
"""
import argparse
import json
import os
import subprocess
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
import utils

ROOT = Path(__file__).resolve().parents[1]
CHECKS = ("attention", "fixture", "train", "oracle", "vitb", "folder", "resume", "oracle_cli",
          "nccl")
CUDA_ONLY = ("attention", "nccl")
# The folder runs: the imagenet-retrofit preset (224 px, windows of 16, every prior, budgets
# 25-196, 0.875 crops) from the tiny 224 px fixture (dim 24, 3 heads: too narrow to guess them).
FOLDER_RUN = ["--dataset", "folder", "--preset", "imagenet-retrofit",
              "--init-from", str(ROOT / "tests" / "fixtures" / "vit_224.pt"), "--heads", "3",
              "--batch-size", "8", "--val-size", "4", "--no-progress"]


class Context:
    """What the checks share: the device, the sizes, a temporary folder, and the runs that more
    than one check reads (made once, by whichever check asks first)."""

    def __init__(self, folder, device):
        self.folder, self.device, self.cpu = Path(folder), torch.device(device), device == "cpu"
        self.made = {}

    def once(self, key, make):
        """make(), the first time a key is asked for; its result (or its error) after that."""
        if key not in self.made:
            try:
                self.made[key] = make()
            except (Exception, SystemExit) as error:
                self.made[key] = error
        if isinstance(self.made[key], BaseException):
            raise self.made[key]
        return self.made[key]

    def cli(self, script, *flags, launcher=()):
        """`python script flags` (or a launcher's) in the repository root -> (exit code, the
        last line of its output: the error, if it failed)."""
        env = dict(os.environ, SPOT_CACHE=str(self.folder / "cache"), PYTHONUNBUFFERED="1")
        command = [sys.executable, *launcher, script, *map(str, flags)]
        if self.cpu:
            command += ["--threads", "1"]
        try:
            done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                                  timeout=600)
        except subprocess.TimeoutExpired:
            return -1, f"timed out after 600 s: {' '.join(command)}"
        lines = (done.stdout + done.stderr).strip().splitlines() or [""]
        return done.returncode, lines[-1][-300:]

    def train_run(self, out, *flags, launcher=()):
        """A train.py folder run into self.folder / out -> (exit code, message, its metrics)."""
        code, message = self.cli("train.py", *FOLDER_RUN, "--data-dir", self.images(),
                                 "--device", self.device.type, "--out", self.folder / out,
                                 *flags, launcher=launcher)
        path = self.folder / out / "metrics.jsonl"
        metrics = [json.loads(line) for line in path.read_text().splitlines()] \
            if path.exists() else []
        return code, message, metrics

    def images(self):
        return self.once("images", lambda: make_image_folder(self.folder / "images"))

    def straight(self):
        """The folder run, 4 steps in one go (the folder, resume and oracle_cli checks')."""
        return self.once("straight", lambda: self.train_run("straight", "--max-steps", "4"))


def make_image_folder(folder, per_class=(18, 4)):
    """A tiny ImageNet-style folder: folder/{train,val}/<class>/*.jpg, 2 classes, JPEGs of
    300-460 x 250-420 px (noise tinted per class), 18 train and 4 val images a class. -> folder"""
    from PIL import Image
    generator = torch.Generator().manual_seed(0)
    for split, count in zip(("train", "val"), per_class):
        for label, name in enumerate(("n01", "n02")):
            (folder / split / name).mkdir(parents=True)
            for i in range(count):
                width, height = (torch.randint(lo, hi + 1, (1,), generator=generator).item()
                                 for lo, hi in ((300, 460), (250, 420)))
                pixels = torch.randint(0, 160, (height, width, 3), generator=generator,
                                       dtype=torch.uint8)
                pixels[..., label] += 95                     # red class, green class
                Image.fromarray(pixels.numpy()).save(folder / split / name / f"{i}.jpg",
                                                     quality=90)
    return folder


def check_train(ctx):
    code, steps = ctx.once("train", lambda: train_shapes(ctx))[:2]
    return code == 0 and steps == 48, f"exit code {code}, {steps} steps"


def train_shapes(ctx):
    """3 epochs of 16 steps (2048 images, batches of 128; on the CPU a dim-32 model, 512 images,
    batches of 32) -> (exit code, steps, model)."""
    out = ctx.folder / "shapes"
    tiny = ["--dim", "32", "--depth", "1", "--heads", "2", "--batch-size", "32",
            "--train-limit", "512", "--test-limit", "128", "--threads", "1"] if ctx.cpu else \
        ["--train-limit", "2048", "--test-limit", "512"]
    code = train.main(["--dataset", "shapes", "--device", ctx.device.type, "--epochs", "3",
                       "--no-progress", "--out", str(out), *tiny])
    model, checkpoint = spot.load_checkpoint(out / "checkpoint.pt", return_checkpoint=True)
    return code, checkpoint["step"], model


def check_oracle(ctx):
    model = ctx.once("train", lambda: train_shapes(ctx))[2].to(ctx.device)
    test = data.load_dataset("shapes", progress=False).test
    images = test.images[:16].to(ctx.device).float() / 255
    labels = test.labels[:16].to(ctx.device)
    start = spot.sample_positions("isotropic", 16, 16, 32, 4).to(ctx.device)   # (16, 16, 2)
    result = oracle.oracle_search(model, images, labels, start, steps=20)
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


def check_fixture(ctx):
    fixture = torch.load(ROOT / "tests" / "fixtures" / "vit_token.pt", weights_only=True)
    model = spot.load_pretrained(fixture["state_dict"], heads=fixture["kwargs"]["num_heads"],
                                 mean=fixture["mean"], std=fixture["std"]).to(ctx.device)
    images = fixture["images"].to(ctx.device)
    positions = spot.grid_positions(32, 4).to(ctx.device).expand(len(images), -1, -1)
    with torch.no_grad():
        logits = model(images, positions).cpu()
    error = (logits - fixture["logits"]).abs().max().item()
    return error <= 1e-4, f"max |logits - timm's| {error:.2e} (tolerance 1e-04)"


def check_vitb(ctx):
    """ViT-B/16 at 224 px, bf16 autocast: every prior at the full grid (196) and a quarter of it
    (49), then the speed of a training step. On the CPU: dim 192, depth 2, 64 px (16 and 4
    tokens), batch 8, so only the logic is checked."""
    size, dim, depth, batch = (64, 192, 2, 8) if ctx.cpu else (224, 768, 12, 64)
    config = spot.SPoTConfig(image_size=size, window=16, dim=dim, depth=depth, heads=12,
                             num_classes=1000, norm_eps=1e-6, position_embedding="learned")
    torch.manual_seed(0)
    model = spot.SPoTViT(config).to(ctx.device)
    images = torch.rand(batch, 3, size, size, device=ctx.device)
    labels = torch.randint(1000, (batch,), device=ctx.device)
    n_grid = (size // 16) ** 2
    if not ctx.cpu:
        torch.cuda.reset_peak_memory_stats()
    bad = [f"{prior}@{n}" for prior in spot.PRIORS for n in (n_grid, n_grid // 4)
           if not vitb_step_finite(model, images, labels, prior, n)]
    per_s = vitb_speed(model, images, labels, n_grid, steps=2 if ctx.cpu else 10)
    peak = "n/a on the CPU" if ctx.cpu else f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
    finite = f"not finite at {', '.join(bad)}" if bad else "finite"
    return not bad, (f"forward + backward {finite} ({len(spot.PRIORS)} priors x {n_grid} and "
                     f"{n_grid // 4} tokens, {size} px, dim {dim}, depth {depth}); training "
                     f"step {per_s:.0f} images/s (batch {batch}, {n_grid} tokens, bf16); peak "
                     f"memory {peak}")


def vitb_step_finite(model, images, labels, prior, n_tokens):
    """One bf16 forward + backward from `prior` -> whether the loss and every gradient are
    finite."""
    generator = torch.Generator(images.device).manual_seed(0)
    positions = spot.sample_positions(prior, len(images), n_tokens, images.shape[-1], 16,
                                      generator, images)
    model.zero_grad(set_to_none=True)
    with utils.autocast(images.device, True):
        loss = F.cross_entropy(model(images, positions).float(), labels)
    loss.backward()
    return loss.isfinite().item() and all(p.grad.isfinite().all().item()
                                          for p in model.parameters() if p.grad is not None)


def vitb_speed(model, images, labels, n_tokens, steps):
    """Images per second of train.py's step (bf16 forward, fp32 loss, backward, clipping, AdamW)
    at n_tokens uniform positions, after 2 warm-up steps."""
    cuda = images.device.type == "cuda"
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda or None)
    positions = spot.sample_positions("uniform", len(images), n_tokens, images.shape[-1], 16,
                                      torch.Generator(images.device).manual_seed(0))
    for step in range(2 + steps):
        if step == 2:                                  # the warm-up steps done: time on
            synchronize(cuda)
            start = time.perf_counter()
        with utils.autocast(images.device, True):
            loss = F.cross_entropy(model(images, positions).float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    synchronize(cuda)
    return steps * len(images) / (time.perf_counter() - start)


def synchronize(cuda):
    """Wait for the GPU's queued work (a timing on CUDA must), or nothing on the CPU."""
    if cuda:
        torch.cuda.synchronize()


def check_folder(ctx):
    code, message, metrics = ctx.straight()
    if code != 0:
        return False, f"exit code {code}: {message}"
    last = next((m for m in reversed(metrics) if "train_loss" in m), {})
    missing = [k for k in ("img_per_s", "data_wait") if k not in last]
    if missing or last.get("step") != 4:
        return False, f"last metrics line {last} (missing {missing}, step {last.get('step')})"
    return True, (f"exit code 0, 4 steps, {last['img_per_s']:.1f} images/s (batch 8, 224 px "
                  f"streamed), data_wait {last['data_wait']:.2f}, val_acc {last['val_acc']:.0f} %")


def check_resume(ctx):
    """2 steps, then --resume to 4, against the straight 4 steps: the last line's losses."""
    code, message, _ = ctx.train_run("resumed", "--max-steps", "2")
    if code == 0:
        code, message, resumed = ctx.train_run("resumed", "--resume", "--max-steps", "4")
    straight_code, straight_message, straight = ctx.straight()
    if code != 0 or straight_code != 0:
        return False, (f"exit codes {code} (stopped and resumed: {message}), "
                       f"{straight_code} (straight: {straight_message})")
    ours, theirs = (next(m for m in reversed(lines) if "train_loss" in m)
                    for lines in (resumed, straight))
    worst = max(abs(ours[k] - theirs[k]) / max(abs(theirs[k]), 1e-12)
                for k in ("train_loss", "val_loss"))
    numbers = (f"train_loss {ours['train_loss']:.7g} vs {theirs['train_loss']:.7g} straight, "
               f"val_loss {ours['val_loss']:.7g} vs {theirs['val_loss']:.7g} (step "
               f"{ours['step']} vs {theirs['step']})")
    if ours["step"] != theirs["step"] or worst > (1e-6 if ctx.cpu else 1e-3):
        return False, f"{numbers}: relative difference {worst:.1e}"
    if worst > 1e-6:     # (only on CUDA)
        return True, (f"{numbers}: relative difference {worst:.1e}, above 1e-6 but within 1e-3 "
                      f"(CUDA kernels may be nondeterministic)")
    return True, f"{numbers}: the same (relative difference {worst:.1e})"


def check_oracle_cli(ctx):
    code, message = ctx.straight()[:2]
    if code != 0:
        return False, f"needs the folder run, which failed (exit code {code}: {message})"
    out = ctx.folder / "oracle"
    code, message = ctx.cli("oracle.py", "--checkpoint", ctx.folder / "straight" /
                            "checkpoint.pt", "--limit", "8", "--knn-limit", "0", "--tokens", "16",
                            "--search-steps", "2", "--precision", "bf16", "--device",
                            ctx.device.type, "--no-progress", "--out", out)
    written = [name for name in ("results.json", "per_image.npz") if (out / name).exists()]
    if code != 0 or len(written) < 2:
        return False, f"exit code {code}, wrote {written or 'nothing'}: {message}"
    rows = json.loads((out / "results.json").read_text())["rows"]
    return True, (f"exit code 0, results.json ({len(rows)} rows, 8 images, bf16) and "
                  f"per_image.npz")


def check_nccl(ctx):
    if torch.cuda.device_count() < 2:
        return None, "skipped (one GPU)"
    code, message, metrics = ctx.train_run(
        "nccl", "--max-steps", "4",
        launcher=("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"))
    last = next((m for m in reversed(metrics) if "train_loss" in m), {})
    if code != 0 or last.get("step") != 4:
        return False, f"exit code {code}, step {last.get('step')}: {message}"
    return True, f"exit code 0, 2 processes, 4 steps, {last['img_per_s']:.1f} images/s"


def checks(ctx):
    """(name, check key, the function) of every check, in order."""
    return [("attention fp32", "attention", lambda: check_attention(torch.float32, 1e-4)),
            ("attention bf16", "attention", lambda: check_attention(torch.bfloat16, 2e-2)),
            ("fixture", "fixture", lambda: check_fixture(ctx)),
            ("train", "train", lambda: check_train(ctx)),
            ("oracle", "oracle", lambda: check_oracle(ctx)),   # (the train check's model)
            ("vitb", "vitb", lambda: check_vitb(ctx)),
            ("folder", "folder", lambda: check_folder(ctx)),
            ("resume", "resume", lambda: check_resume(ctx)),
            ("oracle_cli", "oracle_cli", lambda: check_oracle_cli(ctx)),
            ("nccl", "nccl", lambda: check_nccl(ctx))]


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true",
                        help="check this script's logic on the CPU, with tiny sizes (attention "
                             "and nccl are skipped)")
    parser.add_argument("--only", metavar="A,B",
                        help=f"run these checks only, of {', '.join(CHECKS)}")
    args = parser.parse_args(argv)
    args.only = args.only.split(",") if args.only else list(CHECKS)
    unknown = [name for name in args.only if name not in CHECKS]
    if unknown:
        parser.error(f"--only: unknown check(s) {', '.join(unknown)}; choose from "
                     f"{', '.join(CHECKS)}")
    return args


def main(argv=None):
    args = parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        print("no CUDA device: this script checks the GPU paths (fused attention, training and "
              "the oracle search on CUDA, a ViT-B/16 in bf16, streamed folders, resuming, "
              "torchrun with NCCL); run it on a machine with a GPU, or pass --cpu to check its "
              "logic here. Nothing to do.")
        return 0
    start, failed, ran = time.time(), 0, 0
    with tempfile.TemporaryDirectory() as folder:
        ctx = Context(folder, "cpu" if args.cpu else "cuda")
        for name, key, check in checks(ctx):
            if key not in args.only:
                continue
            try:
                ok, numbers = (None, "skipped (CUDA only)") if args.cpu and key in CUDA_ONLY \
                    else check()
            except (Exception, SystemExit) as error:   # a failed check: a line, not the end
                ok, numbers = False, f"{type(error).__name__}: {error}"
            print(f"{'skip' if ok is None else 'ok  ' if ok else 'FAIL'} {name}: {numbers}",
                  flush=True)
            failed += ok is False
            ran += ok is not None
    device = utils.cpu_name() if args.cpu else torch.cuda.get_device_name()
    print(f"{device} | torch {torch.__version__} | {time.time() - start:.0f} s in all | "
          f"{failed} of {ran} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
