"""
train.py -- train a SPoT ViT (PAPER §5) on the built-in shapes data, CIFAR-10 or an ImageNet subset.

One model serves every token budget and every spatial prior, as the paper's retrofitted models do:
each batch draws its number of tokens from --tokens and its positions from one of --train-priors
(PAPER §3). `--tokens all --train-priors grid` trains a plain grid ViT, the paper's baseline, and
`--init-from` fine-tunes such a model into SPoT (PAPER §5's retrofitting).

    python train.py                                   # built-in shapes data, CPU, a few minutes
    python train.py --dataset cifar10 --data-dir data/cifar10 --preset cifar10-cpu   # CPU recipe
    python train.py --dataset folder --data-dir imagenette --device cuda
    torchrun --nproc_per_node=4 train.py --dataset cifar10 --data-dir data/cifar10 --device cuda
    python train.py --resume --out runs/shapes        # continue an interrupted run

A run lives in --out: checkpoint.pt (latest, written atomically) and metrics.jsonl (one JSON object
per epoch, accuracies on the validation split held out of train; the test split is read once, at the
end). Ctrl-C saves a checkpoint at the last finished step; --resume continues from it with the run's
own flags and ends with the same metrics as an uninterrupted run (on the CPU, where kernels are
deterministic).
"""

import argparse
import dataclasses
import json
import math
import os
import random
import signal
import sys
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import utils
import data
import spot

# -----------------------------------------------------------------------------
# Presets: a model (an SPoTConfig) and a schedule. Every flag left unset takes its value from the
# preset, which defaults to the dataset's name. num_classes, in_chans and the normalization come
# from the data.
PRESETS = {
    # The default `python train.py`: a few minutes on a 2-core CPU (README, "Training").
    "shapes": dict(model=spot.SPoTConfig(image_size=32, window=4, dim=128, depth=4, heads=4, mlp_ratio=2.0),
                   epochs=20, batch_size=128, lr=1e-3, warmup_epochs=1, tokens="16-64",
                   augment_padding=4, val_size=1000),
    # The CIFAR-10 CPU recipe of README "Results" (cifar10-spot: about 30 minutes on a 2-core CPU
    # in fp32; scale --epochs to your budget). Budgets 4-64 and all seven priors, so that every
    # cell of the §6 table is a budget and a prior the model was trained on; lr chosen on validation.
    "cifar10-cpu": dict(model=spot.SPoTConfig(image_size=32, window=4, dim=192, depth=6, heads=3, mlp_ratio=2.0),
                        epochs=10, batch_size=128, lr=5e-4, warmup_epochs=1, tokens="4-64",
                        train_priors=",".join(spot.PRIORS), augment_padding=0, val_size=5000),
    # The Imagenette CPU recipe of README "Results" (imagenette-spot, `--dataset folder`): the same
    # model at 128 px with 16 px windows (the same 8x8 grid of 64 cells), about 30 minutes on a
    # 2-core CPU in fp32; lr 1e-3 and no crops chosen on validation probes.
    "imagenette-cpu": dict(model=spot.SPoTConfig(image_size=128, window=16, dim=192, depth=6, heads=3, mlp_ratio=2.0),
                           epochs=40, batch_size=128, lr=1e-3, warmup_epochs=2, tokens="4-64",
                           train_priors=",".join(spot.PRIORS), augment_padding=0, val_size=0.1),
    # NOT YET RUN: a larger single-GPU recipe (9 blocks, 200 epochs), scaled up from cifar10-cpu.
    "cifar10": dict(model=spot.SPoTConfig(image_size=32, window=4, dim=192, depth=9, heads=3, mlp_ratio=2.0),
                    epochs=200, batch_size=256, lr=1e-3, warmup_epochs=10, tokens="16-64",
                    augment_padding=4, val_size=5000),
    # NOT YET RUN: Imagenette-style folders at 128 px, windows of 16 px: an 8x8 grid of 64 cells.
    "folder": dict(model=spot.SPoTConfig(image_size=128, window=16, dim=384, depth=8, heads=6, mlp_ratio=4.0),
                   epochs=100, batch_size=128, lr=1e-3, warmup_epochs=5, tokens="16-64",
                   augment_padding=16, val_size=0.1),
}
DEFAULT_TRAIN_PRIORS = "uniform,gaussian,sobol,isotropic,center,grid"
MODEL_FLAGS = ("image_size", "window", "dim", "depth", "heads", "mlp_ratio")


# -----------------------------------------------------------------------------
# PAPER §5: the training objective

def train_step(model, optimizer, scheduler, images, labels, prior, n_tokens, args, generators, bf16):
    """One step of  min_θ E_{S ~ p_φ} L(g_θ(I, S), y)  (PAPER §5).

    The expectation over token sets is taken one sample per batch: the caller drew the prior
    p_φ and the budget N, here S ~ p_φ is drawn for every image, the model g_θ reads the image
    through S, and one AdamW step lowers the cross-entropy L. Over many batches every prior
    and budget is trained, so one model serves all of them. -> (loss, logits)
    """
    config = getattr(model, "module", model).config          # through a DDP wrapper
    positions = spot.sample_positions(prior, len(images), n_tokens, config.image_size, config.window,
                                      generator=generators.positions, images=images)   # (B, N, 2)
    with utils.autocast(images.device, bf16):
        logits = model(images, positions)                                            # (B, classes)
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=args.label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if args.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
    optimizer.step()
    scheduler.step()
    return loss, logits


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


class Generators:
    """The three random streams of training, each its own generator so that a checkpoint can
    capture them exactly (and so evaluation, which uses fresh seeded ones, never shifts them)."""

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


def to_device(batch, device):
    """Host batch -> device. On CUDA the batch is first copied into page-locked (pinned) memory,
    which lets the host-to-device copy run asynchronously (non_blocking) beside GPU work."""
    if device.type == "cuda":
        batch = batch.pin_memory()
    return batch.to(device, non_blocking=True)


@torch.no_grad()
def evaluate(model, split, name, device, batch_size, budgets, prior, bf16, rank=0, world=1, seed=0):
    """Loss and accuracy at the full grid, and accuracy at each extra (prior, budget), on a split.
    Each process evaluates a shard; the sums are all-reduced.
    -> {f"{name}_loss", f"{name}_acc", f"{name}_acc@N" for N in budgets} (accuracies in percent)"""
    config = model.config
    was_training = model.training
    model.eval()
    grid = spot.grid_positions(config.image_size, config.window).to(device)
    indices = torch.arange(rank, len(split), world)
    totals = torch.zeros(2 + len(budgets), dtype=torch.float64, device=device)  # loss, grid, budgets
    generator = torch.Generator(device=device).manual_seed(seed + 12345)
    for start in range(0, len(indices), batch_size):
        batch = indices[start:start + batch_size]
        images = to_device(split.images[batch], device).float().div_(255)
        labels = to_device(split.labels[batch], device)
        reads = [grid.expand(len(batch), -1, -1)] + [spot.sample_positions(
            prior, len(batch), n, config.image_size, config.window, generator=generator,
            images=images) for n in budgets]
        for i, positions in enumerate(reads):
            with utils.autocast(device, bf16):
                logits = model(images, positions)
            if i == 0:
                totals[0] += F.cross_entropy(logits.float(), labels, reduction="sum")
            totals[1 + i] += (logits.argmax(1) == labels).sum()
    if world > 1:
        dist.all_reduce(totals)
    model.train(was_training)
    n = len(split)
    result = {f"{name}_loss": totals[0].item() / n, f"{name}_acc": 100 * totals[1].item() / n}
    result.update({f"{name}_acc@{b}": 100 * totals[2 + i].item() / n for i, b in enumerate(budgets)})
    return result


# -----------------------------------------------------------------------------
# The run: data, model, optimizer, then epochs

def load_data(args, world, progress):
    """The dataset, with --val-size images held out of train, and the --*-limit subsets."""
    if args.batch_size % world:
        sys.exit(f"error: --batch-size {args.batch_size} must be divisible by the {world} processes")
    try:
        dataset = data.load_dataset(args.dataset, args.data_dir, image_size=args.image_size,
                                    seed=args.seed, cache_dir=args.cache_dir, val_size=args.val_size,
                                    progress=progress)
    except data.DataError as error:
        sys.exit(f"error: {error}")
    except ValueError as error:
        sys.exit(f"error: --dataset/--image-size/--val-size: {error}")
    if args.train_limit is not None:   # a random but fixed subset keeps every class represented
        keep = torch.randperm(len(dataset.train), generator=torch.Generator().manual_seed(args.seed))
        keep = keep[: args.train_limit].sort().values
        dataset.train = data.Split(dataset.train.images[keep], dataset.train.labels[keep])
    if args.test_limit is not None:
        for name in ("val", "test"):
            split = getattr(dataset, name)
            if split is not None:
                setattr(dataset, name, data.Split(split.images[: args.test_limit], split.labels[: args.test_limit]))
    if len(dataset.train) < args.batch_size:
        sys.exit(f"error: --batch-size {args.batch_size} exceeds the {len(dataset.train)} training images")
    return dataset


def build_model(args, dataset, device):
    """SPoTViT from the flags and the data; --init-from copies a trained model's weights."""
    flags = {k: getattr(args, k) for k in MODEL_FLAGS if k != "image_size"}
    config = dataclasses.replace(PRESETS["shapes"]["model"], **flags,
                                 image_size=dataset.image_size, num_classes=len(dataset.classes),
                                 in_chans=dataset.train.images.shape[1], image_mean=dataset.mean,
                                 image_std=dataset.std)
    torch.manual_seed(args.seed)
    model = spot.SPoTViT(config)
    source = getattr(args, "init_model", None)
    if source is not None and args.checkpoint is None:      # (a resume has its own weights)
        mine, theirs = dataclasses.asdict(config), dataclasses.asdict(source.config)
        differ = [f"{k} {theirs[k]} vs {mine[k]}" for k in mine
                  if k not in ("image_mean", "image_std") and mine[k] != theirs[k]]
        if differ:
            sys.exit(f"error: --init-from {args.init_from}: its model differs from this run's: "
                     f"{', '.join(differ)}; pass the same model flags it was trained with")
        model.load_state_dict(source.state_dict())
    return model.to(device)


def make_optimizer(model, args, n_train, device):
    """AdamW with decay on matrices only, and a warm-up + cosine schedule over all epochs."""
    steps_per_epoch = n_train // args.batch_size
    total_steps, warmup_steps = args.epochs * steps_per_epoch, max(1, int(args.warmup_epochs * steps_per_epoch))
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr,
                                  betas=(0.9, 0.999), fused=device.type == "cuda" or None)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_lambda(step, warmup_steps, total_steps, args.min_lr_ratio))
    return optimizer, scheduler


def start_or_resume(args, model, optimizer, scheduler, generators, device, rank, world, log):
    """A new run decides its precision (once: the decision is stored with the run); --resume
    restores every state exactly: weights, optimizer, schedule, position in the epoch, RNGs.
    -> the training state {"epoch", "step_in_epoch", "step", "running"}"""
    state = {"epoch": 0, "step_in_epoch": 0, "step": 0,
             "running": {"loss_sum": 0.0, "correct": 0, "seen": 0}}
    if args.checkpoint is not None:
        model.load_state_dict(args.checkpoint["model"])
        optimizer.load_state_dict(args.checkpoint["optimizer"])
        scheduler.load_state_dict(args.checkpoint["scheduler"])
        rng = args.checkpoint["rng"]
        generators.load(rng[rank] if rank < len(rng) else rng[0])
        torch.set_rng_state(args.checkpoint["torch_rng"])
        log(f"resumed {Path(args.out) / 'checkpoint.pt'} at step {args.checkpoint['step']}")
        return {k: args.checkpoint[k] for k in state}
    n_probe = args.token_choices[len(args.token_choices) // 2]      # the median budget
    bf16 = utils.precision_for(model, args.precision, args.batch_size // world, n_probe, device, log)
    if world > 1:   # every process must train in the same precision: rank 0 decides
        flag = torch.tensor([float(bf16)], device=device)
        dist.broadcast(flag, 0)
        bf16 = bool(flag.item())
    args.precision_used = "bf16" if bf16 else "fp32"
    if rank == 0:   # what made this run, beside its metrics (small enough to commit with them)
        utils.write_atomic(Path(args.out) / "run.json", json.dumps(
            {"command": " ".join(sys.argv), "cpu": utils.cpu_name(), "torch": torch.__version__,
             "args": saved_args(args)}, indent=1, default=str))
    return state


def run(args):
    rank, world, device = setup_distributed(utils.resolve_device(args.device))
    is_main = rank == 0
    log = print if is_main else (lambda *a, **k: None)
    if args.threads:
        torch.set_num_threads(args.threads)
    # Adam's second-moment estimates of tiny gradients underflow into denormal floats, which x86
    # CPUs process many times slower; flushing them to zero changes nothing measurable here.
    torch.set_flush_denormal(True)
    dataset = load_data(args, world, args.progress and is_main)
    eval_name, eval_split = ("val", dataset.val) if dataset.val is not None else ("test", dataset.test)
    model = build_model(args, dataset, device)
    optimizer, scheduler = make_optimizer(model, args, len(dataset.train), device)
    generators = Generators(args.seed + 1000 * rank, device)
    state = start_or_resume(args, model, optimizer, scheduler, generators, device, rank, world, log)
    bf16 = args.precision_used == "bf16"
    log(f"{args.dataset}: {len(dataset.train)} train / {len(eval_split)} {eval_name} images of "
        f"{dataset.image_size[0]}x{dataset.image_size[1]}, {len(dataset.classes)} classes | model "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params | tokens {args.tokens}, "
        f"priors {args.train_priors} | {device}, {args.precision_used}, {world} process(es)")
    train_model = torch.compile(model) if args.compile else model
    if world > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(
            train_model, device_ids=[device.index] if device.type == "cuda" else None)
    evaluate_on = lambda split, name: evaluate(model, split, name, device, 2 * args.batch_size // world,
                                               args.budgets, args.eval_prior, bf16, rank, world, args.seed)
    save = lambda: save_run(args, model, optimizer, scheduler, state, generators, dataset.classes, world, is_main)

    stop = utils.install_ctrl_c(log)
    start_time = time.time()
    while state["epoch"] < args.epochs:
        metrics = train_epoch(train_model, optimizer, scheduler, dataset.train, state, args,
                              generators, bf16, device, rank, world, stop)
        if stop["requested"]:   # save and leave at once; no evaluation
            save()
            log(f"saved {Path(args.out) / 'checkpoint.pt'} at step {state['step']}; continue with: "
                f"python train.py --resume --out {args.out}")
            return 130
        metrics.update(evaluate_on(eval_split, eval_name), precision=args.precision_used,
                       elapsed_s=time.time() - start_time)
        save()
        log_metrics(metrics, args, eval_name, log, is_main)
        if args.max_steps is not None and state["step"] >= args.max_steps:
            break
    if state["epoch"] == args.epochs and eval_name == "val" and args.final_test:   # test, read once
        log_metrics({"epoch": args.epochs, "final": True, **evaluate_on(dataset.test, "test")},
                    args, "test", log, is_main)
    log(f"done: {state['epoch']} epochs, {state['step']} steps in {time.time() - start_time:.0f} s | "
        f"checkpoint {Path(args.out) / 'checkpoint.pt'}")
    if world > 1:   # all ranks leave together, after DDP's reducer (which holds gloo work) is gone
        del train_model
        dist.barrier()
        dist.destroy_process_group()
    return 0


def train_epoch(model, optimizer, scheduler, train_split, state, args, generators, bf16, device,
                rank, world, stop):
    """The rest of the current epoch (from state["step_in_epoch"], so a resume continues mid-epoch)
    -> the epoch's training metrics. Updates `state` in place; returns early on Ctrl-C/--max-steps."""
    steps_per_epoch = len(train_split) // args.batch_size
    per_rank = args.batch_size // world
    sampler = torch.utils.data.DistributedSampler(range(len(train_split)), num_replicas=world,
                                                  rank=rank, shuffle=True, seed=args.seed, drop_last=True)
    sampler.set_epoch(state["epoch"])      # the permutation of epoch e depends only on (seed, e)
    order = torch.tensor(list(sampler))[: steps_per_epoch * per_rank].view(steps_per_epoch, -1)
    if state["step_in_epoch"] == 0:        # running statistics of this epoch (kept across a resume)
        state["running"] = {"loss_sum": 0.0, "correct": 0, "seen": 0}
    running, seen_before, epoch_start = state["running"], state["running"]["seen"], time.time()
    bar = tqdm(range(state["step_in_epoch"], steps_per_epoch), leave=False, dynamic_ncols=True,
               desc=f"epoch {state['epoch'] + 1}/{args.epochs}", disable=not (rank == 0 and args.progress))
    for step_in_epoch in bar:
        images = to_device(train_split.images[order[step_in_epoch]], device).float().div_(255)
        labels = to_device(train_split.labels[order[step_in_epoch]], device)
        images = data.augment(images, generators.augment, padding=args.augment_padding, flip=not args.no_flip)
        prior = generators.choice.choice(args.train_priors.split(","))
        n_tokens = generators.choice.choice(args.token_choices)
        loss, logits = train_step(model, optimizer, scheduler, images, labels, prior, n_tokens,
                                  args, generators, bf16)
        state["step"] += 1
        state["step_in_epoch"] = step_in_epoch + 1
        running["loss_sum"] += loss.item() * len(labels)
        running["correct"] += (logits.argmax(1) == labels).sum().item()
        running["seen"] += len(labels)
        bar.set_postfix(loss=f"{running['loss_sum'] / running['seen']:.3f}",
                        acc=f"{100 * running['correct'] / running['seen']:.1f}")
        stop_now = stop["requested"] or (args.max_steps is not None and state["step"] >= args.max_steps)
        if world > 1:   # every process must agree to stop at the same step
            flag = torch.tensor([float(stop_now)], device=device)
            dist.all_reduce(flag)
            stop_now = flag.item() > 0
        if stop_now:
            break
    bar.close()
    finished = state["step_in_epoch"] == steps_per_epoch
    metrics = {"epoch": state["epoch"] + 1, "step": state["step"], "partial": not finished,
               "train_loss": running["loss_sum"] / max(running["seen"], 1),
               "train_acc": 100 * running["correct"] / max(running["seen"], 1),
               "lr": scheduler.get_last_lr()[0],
               "img_per_s": (running["seen"] - seen_before) * world / max(time.time() - epoch_start, 1e-9)}
    if finished:
        state["epoch"], state["step_in_epoch"] = state["epoch"] + 1, 0
    return metrics


# -----------------------------------------------------------------------------
# Distributed set-up (torchrun sets RANK / WORLD_SIZE / LOCAL_RANK)

def setup_distributed(device):
    """-> (rank, world_size, device). A plain `python train.py` is world_size 1."""
    if "RANK" not in os.environ:
        return 0, 1, device
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


# -----------------------------------------------------------------------------
# The command line: flags, their checks, and --resume (out of the way of the method)

# Flags that may differ when a run is resumed: they change how it runs, not what it computes.
RESUME_MAY_CHANGE = {"resume", "out", "threads", "device", "progress", "max_steps", "compile",
                     "cache_dir"}


def build_parser():
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Flags shown as (preset) default to the preset's value: " + "; ".join(
            f"{name}: " + ", ".join(f"{k}={v}" for k, v in _flat(preset).items())
            for name, preset in PRESETS.items()) + ". shapes, cifar10-cpu and imagenette-cpu are measured in the README; "
            "cifar10 and folder are GPU recipes that have NOT YET been run to the end.")
    add = parser.add_argument
    add("--dataset", default="shapes", choices=data.DATASETS,
        help="shapes: built in; cifar10: pickle batches or class folders (downloaded if absent); "
             "folder: DIR/train/<class>/*, DIR/val/<class>/* (default: shapes)")
    add("--preset", default=None, choices=tuple(PRESETS), help="defaults for every (preset) flag "
        "(default: the dataset's name)")
    add("--data-dir", default=None, help="dataset folder (cifar10 and folder datasets)")
    add("--image-size", type=utils.int_at_least(1), default=None, help="image side in pixels (preset)")
    add("--cache-dir", default=None, help="where decoded images are cached (default ~/.cache/spot)")
    add("--val-size", type=utils.count_or_fraction, default=None, help="training images held out for validation: "
        "a count, or a fraction < 1, per class in proportion; 0 = none (preset)")
    add("--train-limit", type=utils.int_at_least(1), default=None, help="use only N training images (a fixed random subset)")
    add("--test-limit", type=utils.int_at_least(1), default=None, help="evaluate on only the first N val/test images")
    for name, kind in (("window", int), ("dim", int), ("depth", int), ("heads", int), ("mlp-ratio", float)):
        add(f"--{name}", type=kind, default=None, help="model (preset)")   # SPoTConfig checks them
    add("--tokens", default=None, help="tokens per training batch: N, a range A-B drawn per batch, "
        "a list A,B,C, or 'all' for the full grid (preset)")
    add("--train-priors", default=None, help=f"comma-separated priors, one drawn per batch, from "
        f"{spot.PRIORS} (preset, else {DEFAULT_TRAIN_PRIORS})")
    add("--eval-tokens", default="16", help="extra budgets evaluated each epoch with --eval-prior, "
        "besides the full grid (comma-separated; default: 16)")
    add("--eval-prior", default="isotropic", choices=spot.PRIORS, help="(default: isotropic)")
    add("--final-test", action=argparse.BooleanOptionalAction, default=True, help="read the test "
        "split once, after the last epoch (default: on); --no-final-test for runs that only choose "
        "settings on validation, so they never see test")
    add("--init-from", default=None, help="start from this checkpoint's model weights (PAPER §5 "
        "retrofitting: a grid-trained ViT fine-tuned into SPoT); the optimizer starts fresh")
    add("--epochs", type=utils.int_at_least(1), default=None, help="training epochs (preset)")
    add("--batch-size", type=utils.int_at_least(1), default=None, help="global batch size, split over processes (preset)")
    add("--lr", type=utils.float_in(0, low_open=True), default=None, help="peak AdamW learning rate (preset)")
    add("--min-lr-ratio", type=utils.float_in(0, 1), default=0.01, help="final lr / --lr (default 0.01)")
    add("--warmup-epochs", type=utils.float_in(0), default=None, help="linear warm-up length (preset)")
    add("--weight-decay", type=utils.float_in(0), default=0.05, help="AdamW weight decay on weights (default 0.05)")
    add("--label-smoothing", type=utils.float_in(0, 1, high_open=True), default=0.1, help="(default 0.1)")
    add("--grad-clip", type=utils.float_in(0), default=1.0, help="max gradient norm, 0 = off (default 1.0)")
    add("--augment-padding", type=utils.int_at_least(0), default=None, help="random-crop padding in pixels (preset)")
    add("--no-flip", action="store_true", help="disable random horizontal flips")
    add("--max-steps", type=utils.int_at_least(1), default=None, help="stop after this many optimizer steps in total; "
        "the schedule still follows --epochs, so a capped run can be --resume'd to the end")
    add("--device", default="auto", choices=("auto", "cuda", "cpu"), help="(default: auto = CUDA if available)")
    add("--precision", default="auto", choices=("auto", "fp32", "bf16"), help="bf16 autocast or "
        "fp32; auto = bf16 on CUDA GPUs that support it, and on the CPU whichever a short probe of "
        "this model measures faster (default: auto)")
    add("--compile", action="store_true", help="torch.compile the model")
    add("--threads", type=utils.int_at_least(1), default=None, help="CPU threads for torch (default: all cores)")
    add("--seed", type=int, default=0, help="seed for data order, augmentation, positions, init")
    add("--out", default=None, help="run folder (default: runs/<dataset>)")
    add("--resume", action="store_true", help="continue the run in --out with its own flags")
    add("--progress", action=argparse.BooleanOptionalAction, default=True, help="tqdm bars (default: on)")
    return parser


def _flat(preset):
    """A preset as flag values: its SPoTConfig's model flags, then the rest."""
    model = {k: v[0] if k == "image_size" else v for k, v in dataclasses.asdict(preset["model"]).items()
             if k in MODEL_FLAGS}
    return {**model, **{k: v for k, v in preset.items() if k != "model"}}


def parse_args(argv=None):
    """Command line -> checked args. Every flag is checked here, before any data is loaded; a
    --resume takes the run's stored flags and refuses ones that would change what it computes."""
    parser = build_parser()
    args = parser.parse_args(argv)
    explicit = {k for k, v in vars(parser.parse_args(argv, argparse.Namespace(**{
        a.dest: None for a in parser._actions}))).items() if v is not None and v is not False}
    for key, value in _flat(PRESETS[args.preset or args.dataset]).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.train_priors = args.train_priors or DEFAULT_TRAIN_PRIORS
    args.out = args.out or os.path.join("runs", args.dataset)
    args.data_dir = str(Path(args.data_dir).expanduser().resolve()) if args.data_dir else None
    try:
        check_args(args)
        utils.check_out_dir(args.out, "--out")
    except ValueError as error:
        parser.error(str(error))
    args.checkpoint = None
    if args.resume:
        args = resumed_args(args, explicit, parser)
    elif any((Path(args.out) / name).exists() for name in ("checkpoint.pt", "metrics.jsonl")):
        parser.error(f"--out {args.out} already holds a run; pass --resume to continue it, or "
                     f"choose another --out")
    return args


def check_args(args):
    """Raise ValueError naming the flag for any value that cannot work."""
    model = dataclasses.replace(PRESETS["shapes"]["model"], **{
        k: getattr(args, k) for k in MODEL_FLAGS})                    # raises for a bad model
    n_grid = len(spot.grid_positions(model.image_size, model.window))
    args.token_choices = utils.parse_tokens(args.tokens, n_grid, "--tokens")
    args.budgets = utils.parse_tokens(args.eval_tokens, n_grid, "--eval-tokens")
    priors = [p.strip() for p in args.train_priors.split(",") if p.strip()]
    if not priors or any(p not in spot.PRIORS for p in priors):
        raise ValueError(f"--train-priors: unknown prior(s) in {args.train_priors!r}; choose from {spot.PRIORS}")
    args.train_priors = ",".join(priors)
    if "grid" in priors and max(args.token_choices) > n_grid:
        raise ValueError(f"--tokens up to {max(args.token_choices)} but prior 'grid' has only {n_grid} "
                         f"cells ({args.image_size}/{args.window} squared); lower --tokens or drop 'grid'")
    if args.eval_prior == "grid" and max(args.budgets) > n_grid:
        raise ValueError(f"--eval-tokens up to {max(args.budgets)} exceeds the {n_grid} grid cells")
    utils.resolve_device(args.device)
    try:
        args.init_model = spot.load_checkpoint(args.init_from) if args.init_from else None
    except ValueError as error:
        raise ValueError(f"--init-from: {error}") from None


def resumed_args(args, explicit, parser):
    """--resume: the run's own flags, from its checkpoint; a flag given again must not differ."""
    path = Path(args.out) / "checkpoint.pt"
    if not path.is_file():
        parser.error(f"--resume but {path} does not exist; start a new run without --resume, or "
                     f"point --out at the folder of the run to continue")
    try:
        _, checkpoint = spot.load_checkpoint(path, return_checkpoint=True)
    except ValueError as error:
        parser.error(f"--resume: {error}")
    stored = checkpoint.get("args") or {}
    changed = [f"--{k.replace('_', '-')} {getattr(args, k)!r} (the run has {stored.get(k)!r})"
               for k in sorted(explicit - RESUME_MAY_CHANGE) if getattr(args, k) != stored.get(k)]
    if changed:
        parser.error(f"--resume: {path} was trained with other flags; these differ: "
                     f"{'; '.join(changed)}. Resume without them, or start a new run in another --out")
    merged = argparse.Namespace(**{**stored, **{k: getattr(args, k) for k in RESUME_MAY_CHANGE}})
    merged.checkpoint = checkpoint
    return merged


# -----------------------------------------------------------------------------
# Checkpoints, metrics and Ctrl-C: small, and out of the way

def save_run(args, model, optimizer, scheduler, state, generators, classes, world, is_main):
    """Everything a resume needs, in one checkpoint. Collective in DDP: every rank takes part."""
    rng = [generators.state()]
    if world > 1:   # every process's random streams, so a resumed DDP run is exact too
        rng = [None] * world
        dist.all_gather_object(rng, generators.state())
    if is_main:
        utils.write_atomic(Path(args.out) / "checkpoint.pt", {
            "model_config": dataclasses.asdict(model.config), "model": model.state_dict(),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), **state,
            "rng": rng, "torch_rng": torch.get_rng_state(), "classes": classes,
            "args": saved_args(args)})


def saved_args(args):
    return {k: v for k, v in vars(args).items() if k not in ("checkpoint", "init_model")}


def log_metrics(metrics, args, split, log, is_main):
    if not is_main:
        return
    with open(Path(args.out) / "metrics.jsonl", "a") as f:
        f.write(json.dumps(metrics) + "\n")
    extra = " ".join(f"acc@{b} {metrics[f'{split}_acc@{b}']:.2f}" for b in args.budgets)
    head = "final" if metrics.get("final") else f"epoch {metrics['epoch']}{' (partial)' if metrics['partial'] else ''}: " \
        f"train loss {metrics['train_loss']:.4f} acc {metrics['train_acc']:.2f} |"
    log(f"{head} {split} loss {metrics[f'{split}_loss']:.4f} acc@grid {metrics[f'{split}_acc']:.2f} "
        f"{extra}" + (f" | {metrics['img_per_s']:.0f} img/s" if "img_per_s" in metrics else ""))


def main(argv=None):
    """Train as the command line says; returns the exit code (0 done, 130 interrupted and saved).
    The caller's Ctrl-C handler is put back afterwards (tests and notebooks call main())."""
    on_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGINT) if on_main_thread else None
    try:
        return run(parse_args(argv))
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


if __name__ == "__main__":
    sys.exit(main())
