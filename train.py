"""
train.py -- train a SPoT ViT (PAPER §5) on the built-in shapes data, CIFAR-10 or an ImageNet subset.

One model serves every token budget and every spatial prior, as the paper's retrofitted models do:
each batch draws its number of tokens from --tokens and its positions from one of --train-priors
(PAPER §3). `--tokens all --train-priors grid` trains a plain grid ViT, the paper's baseline.

    python train.py                                   # built-in shapes data, CPU, a few minutes
    python train.py --dataset cifar10 --data-dir data/cifar10 --device cuda   # single-GPU recipe
    python train.py --dataset folder --data-dir imagenette --image-size 128 --window 16 --device cuda
    torchrun --nproc_per_node=4 train.py --dataset cifar10 --data-dir data/cifar10   # several GPUs
    python train.py --resume --out runs/shapes        # continue an interrupted run

A run lives in --out: checkpoint.pt (latest, written atomically) and metrics.jsonl (one JSON object
per epoch). Ctrl-C saves a checkpoint at the last finished step; --resume continues from it and
ends with the same metrics as an uninterrupted run (on the CPU, where kernels are deterministic).
"""

import argparse
import json
import math
import os
import random
import re
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import data
import spot

# -----------------------------------------------------------------------------
# Defaults per dataset. Every flag left unset on the command line takes its value from here, so
# `python train.py --dataset cifar10 --device cuda` is a good single-GPU recipe as it stands.
PRESETS = {
    # A few minutes on a 2-core CPU (see README for the measured time and accuracy).
    "shapes": dict(image_size=32, window=4, dim=128, depth=4, heads=4, mlp_ratio=2.0,
                   epochs=20, batch_size=128, lr=1e-3, warmup_epochs=1, tokens="16-64"),
    # Single GPU: about 45 minutes on one modern GPU for 200 epochs of 50k images.
    "cifar10": dict(image_size=32, window=4, dim=192, depth=9, heads=3, mlp_ratio=2.0,
                    epochs=200, batch_size=256, lr=1e-3, warmup_epochs=10, tokens="16-64"),
    # Imagenette-style folders at 128 px: windows of 16 px, an 8x8 grid of 64 cells.
    "folder": dict(image_size=128, window=16, dim=384, depth=8, heads=6, mlp_ratio=4.0,
                   epochs=100, batch_size=128, lr=1e-3, warmup_epochs=5, tokens="16-64"),
}
DEFAULT_TRAIN_PRIORS = "uniform,gaussian,sobol,isotropic,center,grid"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Flags shown with default 'preset' take their value from the dataset's preset: "
               + "; ".join(f"{name}: " + ", ".join(f"{k}={v}" for k, v in preset.items())
                           for name, preset in PRESETS.items()))
    add = parser.add_argument
    # data
    add("--dataset", default="shapes", choices=data.DATASETS,
        help="shapes: built-in, generated offline; cifar10: pickle batches or class folders "
             "(downloaded if absent); folder: DIR/train/<class>/*, DIR/val/<class>/* (default: shapes)")
    add("--data-dir", default=None, help="dataset folder (cifar10 and folder datasets)")
    add("--image-size", type=int, default=None, help="image side in pixels (preset)")
    add("--cache-dir", default=None, help="where decoded images are cached (default ~/.cache/spot)")
    add("--train-limit", type=int, default=None, help="use only the first N training images")
    add("--test-limit", type=int, default=None, help="evaluate on only the first N test images")
    # model
    add("--window", type=int, default=None, help="token window k in pixels (preset)")
    add("--dim", type=int, default=None, help="token width (preset)")
    add("--depth", type=int, default=None, help="transformer blocks (preset)")
    add("--heads", type=int, default=None, help="attention heads (preset)")
    add("--mlp-ratio", type=float, default=None, help="MLP hidden width / dim (preset)")
    # tokens and priors (PAPER §3, §5)
    add("--tokens", default=None,
        help="tokens per training batch: N, a range A-B drawn uniformly per batch, a list A,B,C, "
             "or 'all' for the full grid (preset)")
    add("--train-priors", default=DEFAULT_TRAIN_PRIORS,
        help=f"comma-separated priors, one drawn per batch, from {spot.PRIORS} "
             f"(default: {DEFAULT_TRAIN_PRIORS})")
    add("--eval-tokens", default="16",
        help="extra token budgets evaluated each epoch with --eval-prior, besides the full grid "
             "(comma-separated; default: 16)")
    add("--eval-prior", default="isotropic", choices=spot.PRIORS,
        help="prior for the extra evaluation budgets (default: isotropic)")
    # optimization
    add("--epochs", type=int, default=None, help="training epochs (preset)")
    add("--batch-size", type=int, default=None, help="global batch size, split over processes (preset)")
    add("--lr", type=float, default=None, help="peak AdamW learning rate (preset)")
    add("--min-lr-ratio", type=float, default=0.01, help="final lr as a fraction of --lr (default 0.01)")
    add("--warmup-epochs", type=float, default=None, help="linear warm-up length (preset)")
    add("--weight-decay", type=float, default=0.05, help="AdamW weight decay on weights (default 0.05)")
    add("--label-smoothing", type=float, default=0.1, help="(default 0.1)")
    add("--grad-clip", type=float, default=1.0, help="max gradient norm, 0 = off (default 1.0)")
    add("--augment-padding", type=int, default=None,
        help="random-crop padding in pixels (default: image_size // 8)")
    add("--no-flip", action="store_true", help="disable random horizontal flips")
    add("--max-steps", type=int, default=None,
        help="stop after this many optimizer steps in total (smoke tests); the schedule still "
             "follows --epochs, so a capped run can be --resume'd to the end")
    # system
    add("--device", default="auto", choices=("auto", "cuda", "cpu"),
        help="auto picks CUDA when available (default: auto)")
    add("--precision", default="auto", choices=("auto", "fp32", "bf16"),
        help="bf16 autocast or plain fp32; auto = bf16 where it is native (GPUs that support it, "
             "CPUs with avx512_bf16/amx_bf16), else fp32 (default: auto)")
    add("--compile", action="store_true", help="torch.compile the model")
    add("--threads", type=int, default=None, help="CPU threads for torch (default: all cores)")
    add("--seed", type=int, default=0, help="seed for data order, augmentation, positions, init")
    add("--out", default=None, help="run folder (default: runs/<dataset>)")
    add("--resume", action="store_true", help="continue the run in --out from its checkpoint.pt")
    add("--progress", action=argparse.BooleanOptionalAction, default=True,
        help="tqdm progress bars (default: on)")
    args = parser.parse_args(argv)

    for key, value in PRESETS[args.dataset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.out is None:
        args.out = os.path.join("runs", args.dataset)
    if args.augment_padding is None:
        args.augment_padding = args.image_size // 8
    for name in ("epochs", "batch_size", "image_size", "dim", "depth", "heads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    args.train_priors = parse_priors(args.train_priors, parser)
    return args


def parse_priors(text, parser):
    priors = [p.strip() for p in text.split(",") if p.strip()]
    unknown = [p for p in priors if p not in spot.PRIORS]
    if not priors or unknown:
        parser.error(f"--train-priors: unknown prior(s) {unknown or text!r}; choose from {spot.PRIORS}")
    return priors


def parse_tokens(text, n_grid):
    """'64' | '16-64' | '8,16,32' | 'all' -> sorted list of allowed token counts."""
    text = str(text).strip().lower()
    try:
        if text in ("all", "full", "grid"):
            counts = [n_grid]
        elif "-" in text:
            low, high = (int(v) for v in text.split("-"))
            counts = list(range(low, high + 1))
        else:
            counts = [int(v) for v in text.split(",")]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise ValueError(f"--tokens must be N, A-B, A,B,C (all >= 1) or 'all', got {text!r}")
    return sorted(set(counts))


# -----------------------------------------------------------------------------
# Distributed set-up (torchrun sets RANK / WORLD_SIZE / LOCAL_RANK)

def setup_distributed(device_choice):
    """-> (rank, world_size, device). A plain `python train.py` is world_size 1."""
    if device_choice == "auto":
        device_choice = "cuda" if torch.cuda.is_available() else "cpu"
    if device_choice == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda but torch sees no CUDA device (torch.cuda.is_available() is "
                 "False); install a CUDA build of torch or use --device cpu")
    if "RANK" not in os.environ:
        return 0, 1, torch.device(device_choice)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if device_choice == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def native_bf16_cpu(cpuinfo="/proc/cpuinfo"):
    """Does this CPU multiply bf16 natively? Linux lists it in /proc/cpuinfo's flags (x86:
    avx512_bf16 or amx_bf16; ARM: bf16). Without it bf16 is emulated and slower than fp32."""
    try:
        flags = Path(cpuinfo).read_text()
    except OSError:
        return False
    return re.search(r"\b(avx512_bf16|amx_bf16|bf16)\b", flags) is not None


def use_bf16(precision, device):
    """--precision -> whether to train under bf16 autocast. 'auto' picks it where it is native and
    faster: on GPUs that support it, and on CPUs with bf16 instructions (a training step of the
    cifar10-preset ViT: 2.6x fp32 on this project's 2-core test machine, bench.py section 5)."""
    if precision != "auto":
        return precision == "bf16"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and native_bf16_cpu()


# -----------------------------------------------------------------------------
# Checkpoints: written atomically, so a crash mid-write never destroys the previous one

def save_checkpoint(path, state):
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)   # atomic on POSIX and Windows


class Generators:
    """The three random streams of training, each its own torch.Generator so that a checkpoint
    can capture them exactly (and so evaluation, which uses fresh seeded ones, never shifts them).
    """

    def __init__(self, seed, device):
        self.augment = torch.Generator(device=device).manual_seed(seed + 1)
        self.positions = torch.Generator(device=device).manual_seed(seed + 2)
        self.choice = random.Random(seed + 3)   # which prior and how many tokens per batch

    def state(self):
        return {"augment": self.augment.get_state(), "positions": self.positions.get_state(),
                "choice": self.choice.getstate()}

    def load(self, state):
        self.augment.set_state(state["augment"])
        self.positions.set_state(state["positions"])
        self.choice.setstate(state["choice"])


# -----------------------------------------------------------------------------
# Evaluation

def to_device(batch, device):
    """Host batch -> device. On CUDA the batch is first copied into page-locked (pinned) memory,
    which lets the host-to-device copy run asynchronously (non_blocking) beside GPU work."""
    if device.type == "cuda":
        batch = batch.pin_memory()
    return batch.to(device, non_blocking=True)


@torch.no_grad()
def evaluate(model, split, device, batch_size, budgets, prior, autocast, rank=0, world=1, seed=0):
    """Test loss and accuracy at the full grid, and accuracy at each extra (prior, budget).

    Each process evaluates a shard of the test split; the sums are all-reduced.
    -> {"test_loss", "test_acc", "test_acc@N" for N in budgets} (accuracies in percent)
    """
    raw = model.module if hasattr(model, "module") else model
    raw = getattr(raw, "_orig_mod", raw)       # torch.compile wrapper
    config = raw.config
    was_training = model.training
    model.eval()
    grid = spot.grid_positions(config.image_size, config.window).to(device)
    indices = torch.arange(rank, len(split.labels), world)
    totals = torch.zeros(2 + len(budgets), dtype=torch.float64, device=device)  # loss, grid, budgets
    generator = torch.Generator(device=device).manual_seed(seed + 12345)
    for start in range(0, len(indices), batch_size):
        batch = indices[start:start + batch_size]
        images = to_device(split.images[batch], device).float().div_(255)
        labels = to_device(split.labels[batch], device)
        with autocast():
            logits = model(images, grid.expand(len(batch), -1, -1))
        totals[0] += F.cross_entropy(logits.float(), labels, reduction="sum")
        totals[1] += (logits.argmax(1) == labels).sum()
        for i, n_tokens in enumerate(budgets):
            positions = spot.sample_positions(prior, len(batch), n_tokens, config.image_size,
                                              config.window, generator=generator, images=images)
            with autocast():
                totals[2 + i] += (model(images, positions).argmax(1) == labels).sum()
    if world > 1:
        dist.all_reduce(totals)
    model.train(was_training)
    n = len(split.labels)
    result = {"test_loss": totals[0].item() / n, "test_acc": 100 * totals[1].item() / n}
    result.update({f"test_acc@{b}": 100 * totals[2 + i].item() / n for i, b in enumerate(budgets)})
    return result


# -----------------------------------------------------------------------------
# Training

def param_groups(model, weight_decay):
    """Weight decay on matrices only: not on biases, norms or the class token (standard ViT)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (decay if param.dim() >= 2 and "cls_token" not in name else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_lambda(step, warmup_steps, total_steps, min_ratio):
    """Linear warm-up to the peak, then cosine decay to min_ratio * peak."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def main(argv=None):
    """Train as the command line says; returns the exit code (0 done, 130 interrupted and saved).
    Ctrl-C is handled by run() while it trains; the previous handler is put back afterwards, so
    calling main() from Python (tests, a notebook) leaves the caller's Ctrl-C alone."""
    previous = signal.getsignal(signal.SIGINT) if threading_main() else None
    try:
        return run(argv)
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def run(argv=None):
    args = parse_args(argv)
    rank, world, device = setup_distributed(args.device)
    is_main = rank == 0
    log = print if is_main else (lambda *a, **k: None)
    if args.threads:
        torch.set_num_threads(args.threads)
    # Adam's second-moment estimates of tiny gradients underflow into denormal floats, which x86
    # CPUs process ~100x slower; flushing them to zero changes nothing measurable in training.
    torch.set_flush_denormal(True)
    out = Path(args.out)
    checkpoint_path, metrics_path = out / "checkpoint.pt", out / "metrics.jsonl"
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
    if args.resume and not checkpoint_path.exists():
        sys.exit(f"error: --resume but {checkpoint_path} does not exist; start a new run without "
                 f"--resume, or point --out at the folder of the run to continue")
    if not args.resume and checkpoint_path.exists():
        sys.exit(f"error: {checkpoint_path} already exists; pass --resume to continue that run, or "
                 f"choose another --out")
    if args.batch_size % world:
        sys.exit(f"error: --batch-size {args.batch_size} must be divisible by the {world} processes")

    # ---- data: decoded once into uint8 tensors in memory (see data.py)
    try:
        dataset = data.load_dataset(args.dataset, args.data_dir, image_size=args.image_size,
                                    seed=args.seed, cache_dir=args.cache_dir,
                                    progress=args.progress and is_main)
    except data.DataError as error:
        sys.exit(f"error: {error}")
    train_split, test_split = dataset.train, dataset.test
    if args.train_limit is not None:   # a random but fixed subset keeps every class represented
        keep = torch.randperm(len(train_split.labels), generator=torch.Generator().manual_seed(args.seed))
        keep = keep[: args.train_limit].sort().values
        train_split = data.Split(train_split.images[keep], train_split.labels[keep])
    if args.test_limit is not None:
        test_split = data.Split(test_split.images[: args.test_limit], test_split.labels[: args.test_limit])
    image_size = dataset.image_size

    # ---- model
    torch.manual_seed(args.seed)
    try:
        model = spot.SPoTViT(image_size=image_size if image_size[0] != image_size[1] else image_size[0],
                             window=args.window, num_classes=len(dataset.classes), dim=args.dim,
                             depth=args.depth, heads=args.heads, mlp_ratio=args.mlp_ratio,
                             in_chans=train_split.images.shape[1], image_mean=dataset.mean,
                             image_std=dataset.std).to(device)
        n_grid = len(spot.grid_positions(model.config.image_size, args.window))
        token_choices = parse_tokens(args.tokens, n_grid)
        budgets = parse_tokens(args.eval_tokens, n_grid)
    except ValueError as error:
        sys.exit(f"error: {error}")
    if "grid" in args.train_priors and max(token_choices) > n_grid:
        sys.exit(f"error: --tokens up to {max(token_choices)} but prior 'grid' has only {n_grid} "
                 f"cells ({args.image_size}/{args.window} squared); lower --tokens or drop 'grid'")
    if "grid" == args.eval_prior and max(budgets) > n_grid:
        sys.exit(f"error: --eval-tokens up to {max(budgets)} exceeds the {n_grid} grid cells")

    per_rank_batch = args.batch_size // world
    steps_per_epoch = len(train_split.labels) // args.batch_size
    if steps_per_epoch < 1:
        sys.exit(f"error: --batch-size {args.batch_size} exceeds the {len(train_split.labels)} "
                 f"training images")
    total_steps = args.epochs * steps_per_epoch
    warmup_steps = max(1, int(args.warmup_epochs * steps_per_epoch))
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr,
                                  betas=(0.9, 0.999), fused=device.type == "cuda" or None)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_lambda(step, warmup_steps, total_steps, args.min_lr_ratio))
    generators = Generators(args.seed + 1000 * rank, device)
    epoch, step_in_epoch, step = 0, 0, 0
    running = {"loss_sum": 0.0, "correct": 0, "seen": 0}

    if args.resume:
        checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        epoch, step_in_epoch, step = checkpoint["epoch"], checkpoint["step_in_epoch"], checkpoint["step"]
        generators.load(checkpoint["rng"][rank] if rank < len(checkpoint["rng"]) else checkpoint["rng"][0])
        torch.set_rng_state(checkpoint["torch_rng"])
        running = checkpoint["running"]
        log(f"resumed {checkpoint_path} at epoch {epoch}, step {step}")

    n_params = sum(p.numel() for p in model.parameters())
    log(f"{args.dataset}: {len(train_split.labels)} train / {len(test_split.labels)} test images of "
        f"{image_size[0]}x{image_size[1]}, {len(dataset.classes)} classes | model {n_params / 1e6:.2f}M "
        f"params, {n_grid} grid cells | tokens {args.tokens}, priors {','.join(args.train_priors)} | "
        f"device {device}, {world} process(es)")

    train_model = model
    if args.compile:
        train_model = torch.compile(train_model)
    if world > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(
            train_model, device_ids=[device.index] if device.type == "cuda" else None)
    bf16 = use_bf16(args.precision, device)
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()

    def checkpoint_state():
        rng = [generators.state()]
        if world > 1:   # every process's random streams, so a resumed DDP run is exact too
            rng = [None] * world
            dist.all_gather_object(rng, generators.state())
        return {"model_config": spot.model_config_dict(model), "model": model.state_dict(),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "epoch": epoch, "step_in_epoch": step_in_epoch, "step": step, "rng": rng,
                "torch_rng": torch.get_rng_state(), "running": dict(running), "args": vars(args),
                "classes": dataset.classes}

    def save():
        state = checkpoint_state()   # collective in DDP: every rank takes part
        if is_main:
            save_checkpoint(checkpoint_path, state)

    # Ctrl-C: finish the current step, save, exit. A second Ctrl-C stops at once.
    stop = {"requested": False}

    def on_sigint(signum, frame):
        if stop["requested"]:
            raise KeyboardInterrupt
        stop["requested"] = True
        log("\ninterrupt: saving a checkpoint after this step (Ctrl-C again to abort)")
    if threading_main():
        signal.signal(signal.SIGINT, on_sigint)

    sampler = torch.utils.data.DistributedSampler(range(len(train_split.labels)), num_replicas=world,
                                                  rank=rank, shuffle=True, seed=args.seed, drop_last=True)
    start_time = time.time()
    summary = None
    while epoch < args.epochs:
        sampler.set_epoch(epoch)     # the permutation of epoch e depends only on (seed, e)
        order = torch.tensor(list(sampler))[: steps_per_epoch * per_rank_batch].view(steps_per_epoch, -1)
        bar = tqdm(range(step_in_epoch, steps_per_epoch), desc=f"epoch {epoch + 1}/{args.epochs}",
                   disable=not (is_main and args.progress), leave=False, dynamic_ncols=True)
        epoch_start = time.time()
        if step_in_epoch == 0:   # running training statistics of this epoch (kept across a resume)
            running = {"loss_sum": 0.0, "correct": 0, "seen": 0}
        seen_before = running["seen"]
        for step_in_epoch in bar:
            batch = order[step_in_epoch]
            images = to_device(train_split.images[batch], device).float().div_(255)
            labels = to_device(train_split.labels[batch], device)
            images = data.augment(images, generators.augment, padding=args.augment_padding,
                                  flip=not args.no_flip)
            prior = generators.choice.choice(args.train_priors)
            n_tokens = generators.choice.choice(token_choices)
            positions = spot.sample_positions(prior, len(batch), n_tokens, model.config.image_size,
                                              args.window, generator=generators.positions, images=images)
            with autocast():
                logits = train_model(images, positions)
                loss = F.cross_entropy(logits.float(), labels, label_smoothing=args.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if args.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            optimizer.step()
            scheduler.step()
            step += 1
            running["loss_sum"] += loss.item() * len(batch)
            running["correct"] += (logits.argmax(1) == labels).sum().item()
            running["seen"] += len(batch)
            seen = running["seen"] - seen_before
            bar.set_postfix(loss=f"{running['loss_sum'] / running['seen']:.3f}",
                            acc=f"{100 * running['correct'] / running['seen']:.1f}",
                            img_s=f"{seen * world / (time.time() - epoch_start):.0f}")
            stop_now = stop["requested"] or (args.max_steps is not None and step >= args.max_steps)
            if world > 1:   # every process must agree to stop at the same step
                flag = torch.tensor([float(stop_now)], device=device)
                dist.all_reduce(flag)
                stop_now = flag.item() > 0
            if stop_now:
                step_in_epoch += 1
                break
        else:
            step_in_epoch = steps_per_epoch
        bar.close()
        finished_epoch = step_in_epoch == steps_per_epoch
        metrics = {"epoch": epoch + 1, "step": step, "partial": not finished_epoch,
                   "train_loss": running["loss_sum"] / max(running["seen"], 1),
                   "train_acc": 100 * running["correct"] / max(running["seen"], 1),
                   "lr": scheduler.get_last_lr()[0],
                   "img_per_s": (running["seen"] - seen_before) * world / max(time.time() - epoch_start, 1e-9)}
        if finished_epoch:
            epoch, step_in_epoch = epoch + 1, 0
        if stop["requested"]:   # save and leave at once; no evaluation
            save()
            log(f"saved {checkpoint_path} at step {step}; continue with: python train.py --resume "
                f"--out {args.out} (and the same flags)")
            return 130
        metrics.update(evaluate(model, test_split, device, 2 * per_rank_batch, budgets,
                                args.eval_prior, autocast, rank, world, args.seed))
        metrics["elapsed_s"] = time.time() - start_time
        save()
        if is_main:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(metrics) + "\n")
            extra = " ".join(f"acc@{b} {metrics[f'test_acc@{b}']:.2f}" for b in budgets)
            log(f"epoch {metrics['epoch']}{' (partial)' if metrics['partial'] else ''}: train loss "
                f"{metrics['train_loss']:.4f} acc {metrics['train_acc']:.2f} | test loss "
                f"{metrics['test_loss']:.4f} acc@grid({n_grid}) {metrics['test_acc']:.2f} {extra} | "
                f"{metrics['img_per_s']:.0f} img/s")
        summary = metrics
        if args.max_steps is not None and step >= args.max_steps:
            break
    if summary is not None:
        extra = ", ".join(f"{summary[f'test_acc@{b}']:.2f}% at {b} {args.eval_prior} tokens" for b in budgets)
        log(f"done: {summary['epoch']} epochs, {step} steps in {time.time() - start_time:.0f} s | "
            f"test acc {summary['test_acc']:.2f}% at the full {n_grid}-token grid, {extra} | "
            f"checkpoint {checkpoint_path}")
    if world > 1:
        dist.destroy_process_group()
    return 0


def threading_main():
    """Signal handlers can only be installed from the main thread (tests may call main())."""
    import threading
    return threading.current_thread() is threading.main_thread()


if __name__ == "__main__":
    sys.exit(main())
