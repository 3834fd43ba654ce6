"""
train.py -- train a SPoT ViT (arXiv 2507.01654): one model for every token budget and spatial prior.

The idea is the paper's "retrofitting": each batch draws its number of tokens from --tokens and
its positions from one of the --train-priors ("spatial priors"), so one model learns to read an
image through any sparse set of subpixel tokens. `--tokens all --train-priors grid` trains a
plain grid ViT (the baseline), and `--init-from` fine-tunes such a model into SPoT: one of ours (a
checkpoint of train.py) or a pretrained timm / DeiT / MAE ViT (spot.load_pretrained), the paper's
setting (the imagenet-retrofit preset).

    python train.py                                   # built-in shapes data, CPU, a few minutes
    python train.py --dataset cifar10 --data-dir data/cifar10 --preset cifar10-cpu   # CPU recipe
    python train.py --dataset folder --data-dir imagenette --device cuda
    python train.py --dataset folder --data-dir imagenet-subset --preset imagenet-retrofit \
        --init-from timm:vit_base_patch16_224.augreg_in21k_ft_in1k --device cuda     # needs timm
    torchrun --nproc_per_node=4 train.py --dataset cifar10 --data-dir data/cifar10 --device cuda
    python train.py --resume --out runs/shapes        # continue an interrupted run

A run lives in --out: checkpoint.pt (latest, written atomically), metrics.jsonl (one JSON object
per epoch, accuracies on the validation split held out of train; the test split is read once, at
the end) and run.json (the command). Ctrl-C saves a checkpoint at the last finished step; --resume
continues from it with the run's own flags and ends with the same metrics as an uninterrupted run
(on the CPU, where kernels are deterministic).
"""

import argparse
import dataclasses
import json
import math
import os
import signal
import sys
import time
import zlib
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import data
import spot
import utils

# -----------------------------------------------------------------------------
# Presets: a model (an SPoTConfig) and a schedule. Every flag left unset takes its value from the
# preset, which defaults to the dataset's name. num_classes, in_chans and the normalization come
# from the data.
# Shared by the first recipes: budgets 16-64 and every prior but "salient" (which reads the image);
# by the measured CPU recipes: budgets 4-64, all seven priors, no random crops.
FIRST = dict(tokens="16-64", train_priors=["uniform", "gaussian", "sobol", "isotropic", "center", "grid"])
CPU = dict(tokens="4-64", train_priors=list(spot.PRIORS), batch_size=128, augment_padding=0)
PRESETS = {
    # The default `python train.py`: a few minutes on a 2-core CPU (RESULTS.md).
    "shapes": dict(model=spot.SPoTConfig(image_size=32, window=4, dim=128, depth=4, heads=4, mlp_ratio=2.0),
                   epochs=20, batch_size=128, lr=1e-3, warmup_epochs=1, augment_padding=4, val_size=1000, **FIRST),
    # The CIFAR-10 CPU recipe of RESULTS.md (cifar10-spot; scale --epochs to your budget).
    # Budgets 4-64 and all seven priors, so that every cell of the paper's results table is a
    # budget and a prior the model was trained on; lr chosen on validation.
    "cifar10-cpu": dict(model=spot.SPoTConfig(image_size=32, window=4, dim=192, depth=6, heads=3, mlp_ratio=2.0),
                        epochs=10, lr=5e-4, warmup_epochs=1, val_size=5000, **CPU),
    # The Imagenette CPU recipe of RESULTS.md (imagenette-spot, `--dataset folder`): the same
    # model at 128 px with 16 px windows (the same 8x8 grid of 64 cells); lr 1e-3 and no crops
    # chosen on validation probes.
    "imagenette-cpu": dict(model=spot.SPoTConfig(image_size=128, window=16, dim=192, depth=6, heads=3, mlp_ratio=2.0),
                           epochs=40, lr=1e-3, warmup_epochs=2, val_size=0.1, **CPU),
    # NOT YET RUN: a larger single-GPU recipe (9 blocks, 200 epochs), scaled up from cifar10-cpu.
    "cifar10": dict(model=spot.SPoTConfig(image_size=32, window=4, dim=192, depth=9, heads=3, mlp_ratio=2.0),
                    epochs=200, batch_size=256, lr=1e-3, warmup_epochs=10, augment_padding=4, val_size=5000, **FIRST),
    # NOT YET RUN: Imagenette-style folders at 128 px, windows of 16 px: an 8x8 grid of 64 cells.
    "folder": dict(model=spot.SPoTConfig(image_size=128, window=16, dim=384, depth=8, heads=6, mlp_ratio=4.0),
                   epochs=100, batch_size=128, lr=1e-3, warmup_epochs=5, augment_padding=16, val_size=0.1, **FIRST),
    # NOT RUN HERE (no GPU, no pretrained weights reachable): the paper's setting, a pretrained
    # ViT-B/16 retrofitted on an ImageNet subset (`--dataset folder`) at 224 px, the paper's budgets
    # 25-196 (196 = the full 14x14 grid), every prior. Meant with --init-from
    # timm:vit_base_patch16_224.augreg_in21k_ft_in1k --device cuda; the source decides the model
    # (the SPoTConfig here only names its shape). lr 1e-4, ten times below the from-scratch recipes:
    # the weights are already good, and a from-scratch peak would wash their features out in the
    # first steps. Known limits: every image is decoded into memory at 224 px (about 150 kB each),
    # and the only augmentation is flips (no random-resized crop, which ImageNet recipes use).
    "imagenet-retrofit": dict(model=spot.SPoTConfig(image_size=224, window=16, dim=768, depth=12, heads=12),
                              epochs=5, batch_size=128, lr=1e-4, warmup_epochs=0.5, augment_padding=0,
                              val_size=0.02, tokens="25-196", train_priors=list(spot.PRIORS)),
}
MODEL_FLAGS = ("image_size", "window", "dim", "depth", "heads", "mlp_ratio")


# -----------------------------------------------------------------------------
# Retrofitting: the training objective

def train_step(model, optimizer, scheduler, images, labels, args, generators, bf16):
    """One step of  min_θ E_{S ~ p_φ} L(g_θ(I, S), y)  (retrofitting, arXiv 2507.01654).

    The expectation over token sets is taken one sample per batch: draw a prior p_φ from
    --train-priors and a budget N from --tokens, then S ~ p_φ (N positions) for every image; the
    model g_θ reads the image through S, and one AdamW step lowers the cross-entropy L. Over many
    batches every prior and budget is trained, so one model serves all of them. -> (loss, logits)
    """
    choice = generators["choice"]
    pick = lambda options: options[torch.randint(len(options), (1,), generator=choice, device=choice.device).item()]
    prior, n_tokens = pick(args.train_priors), pick(args.token_choices)
    positions = spot.sample_positions(prior, len(images), n_tokens, args.image_size, args.window,
                                      generator=generators["positions"], images=images)   # (B, N, 2)
    with utils.autocast(images.device, bf16):
        logits = model(images, positions)                                            # (B, classes)
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=args.label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)    # the gradient's norm at most 1
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


# -----------------------------------------------------------------------------
# The one evaluation loop: positions for a whole split, then logits in batches
# Splits stay uint8 on the CPU (data.py); each batch becomes float on `device`. Positions are
# drawn in fixed chunks, so they do not depend on --batch-size.

POSITION_CHUNK = 256
RANDOM_PRIORS = ("uniform", "gaussian", "sobol", "salient", "grid")   # a new draw, new positions


def seed_for(seed, *key):
    """A stable seed per (seed, prior, budget, role, ...). Python's hash() of a str is randomized
    per process, so use CRC32: the same command gives the same positions, run after run."""
    return (seed * 1_000_003 + zlib.crc32(":".join(map(str, key)).encode())) % (2**63 - 1)


def draw_positions(prior, images_uint8, n_tokens, window, seed, device="cpu"):
    """Positions for a whole split from one prior: (n, N, 2) on the CPU, reproducible from seed.
    "salient" reads the images (uint8; spot.saliency_map), or takes their (n, H, W) maps; the
    image size is the images' (or the maps') last two dimensions."""
    generator = torch.Generator(device=device).manual_seed(seed)
    size = tuple(images_uint8.shape[-2:])
    chunks = []
    for chunk in images_uint8.split(POSITION_CHUNK):
        pixels = None
        if prior == "salient":       # uint8 images in [0, 255], or a float saliency map
            pixels = chunk.to(device).float() / (255 if chunk.dtype == torch.uint8 else 1)
        positions = spot.sample_positions(prior, len(chunk), n_tokens, size, window, generator,
                                          pixels)
        chunks.append(positions.cpu())
    return torch.cat(chunks)


@torch.no_grad()
def predict(model, images_uint8, positions, device, batch_size, features=False, bf16=False):
    """The one evaluation loop of this project: read a whole split through given positions.

    images_uint8 (n, C, H, W) uint8 on the CPU (data.py keeps splits that way; each batch becomes
    float in [0, 1] on `device`), positions (n, N, 2). Eval mode, no gradients, bf16 autocast
    when asked. -> (logits (n, classes), class-token features (n, D) or None), float32 on the CPU.
    """
    was_training, logits, feats = model.training, [], []
    model.eval()
    for start in range(0, len(images_uint8), batch_size):
        images = images_uint8[start:start + batch_size].to(device).float().div_(255)
        with utils.autocast(images.device, bf16):
            tokens = model.forward_features(images, positions[start:start + batch_size].to(device))
            logits.append(model.forward_head(tokens).float().cpu())                      # (B, classes)
            if features:
                feats.append(model.forward_head(tokens, pre_logits=True).float().cpu())  # (B, D)
    model.train(was_training)
    return torch.cat(logits), (torch.cat(feats) if features else None)


def evaluate(model, split, name, args, device, bf16, rank=0, world=1):
    """Loss and accuracy at the full grid, and accuracy at each --eval-tokens budget drawn from
    --eval-prior, read by predict (the one evaluation loop). The positions are drawn for
    the whole split from a fixed seed, so every epoch, and any number of processes, reads the
    same ones; each process reads its shard split[rank::world] and the sums are all-reduced.
    -> {f"{name}_loss", f"{name}_acc", f"{name}_acc@N" for N in budgets} (accuracies in percent)"""
    draw = lambda n: draw_positions(args.eval_prior, split.images, n, args.window,
                                           seed_for(args.seed, "eval", n), device)              # (n, N, 2)
    grid = spot.grid_positions(args.image_size, args.window).expand(len(split), -1, -1)             # (n, G, 2)
    reads = {"": grid} | {f"@{n}": draw(n) for n in args.budgets}               # the keys name the accuracies
    images, labels = split.images[rank::world], split.labels[rank::world]
    totals = torch.zeros(len(reads), 2, dtype=torch.float64, device=device)   # per read: loss sum, correct
    for i, positions in enumerate(reads.values()):
        logits = predict(model, images, positions[rank::world], device, 2 * args.batch_size, bf16=bf16)[0]
        totals[i] = torch.stack([F.cross_entropy(logits, labels, reduction="sum"), (logits.argmax(1) == labels).sum()])
    if world > 1:
        dist.all_reduce(totals)
    totals = (totals / len(split)).tolist()
    return {f"{name}_loss": totals[0][0]} | {f"{name}_acc{key}": 100 * total[1] for key, total in zip(reads, totals)}


# -----------------------------------------------------------------------------
# The run: data, model, optimizer, then epochs

def load_data(args, world, progress):
    """The dataset, with --val-size images held out of train, and the --*-limit subsets."""
    try:
        dataset = data.load_dataset(args.dataset, args.data_dir, image_size=args.image_size, seed=args.seed,
                                    cache_dir=args.cache_dir, val_size=args.val_size, progress=progress)
    except (data.DataError, ValueError) as error:
        sys.exit(f"error: --dataset/--data-dir/--image-size/--val-size: {error}")
    subset = lambda split, keep: split and data.Split(split.images[keep], split.labels[keep])   # None stays None
    if args.train_limit is not None:   # a random but fixed subset keeps every class represented
        keep = torch.randperm(len(dataset.train), generator=torch.Generator().manual_seed(args.seed))
        dataset.train = subset(dataset.train, keep[: args.train_limit].sort().values)
    if args.test_limit is not None:
        dataset.val, dataset.test = (subset(s, slice(args.test_limit)) for s in (dataset.val, dataset.test))
    if args.batch_size % world or args.batch_size > len(dataset.train):
        sys.exit(f"error: --batch-size {args.batch_size} must split over {world} process(es) and fit in the train split")
    return dataset


def build_model(args, dataset, device):
    """SPoTViT from the flags and the data, or from a source (--init-from): an SPoT checkpoint of
    the same model, or a pretrained ViT, which gets a fresh head when the dataset has other
    classes. Either keeps its own input statistics (its weights learned on them); a model from
    scratch takes the dataset's. A resumed run rebuilds its own model from its checkpoint's
    config (start_or_resume then loads the weights)."""
    torch.manual_seed(args.seed)
    source, n_classes = getattr(args, "init_model", None), len(dataset.classes)
    if args.checkpoint:
        return spot.SPoTViT(spot.SPoTConfig(**args.checkpoint["model_config"])).to(device)
    if getattr(args, "init_pretrained", False):   # the source, rebuilt for this dataset's classes
        known = source.config
        return spot.load_pretrained(spot.export(source), image_size=args.image_size, num_classes=n_classes,
                                    heads=known.heads, mean=known.image_mean, std=known.image_std).to(device)
    # A source keeps what no flag sets: its kind of model and the input statistics it learned on.
    own = ({k: getattr(source.config, k) for k in ("norm_eps", "pos_embed", "pool", "image_mean", "image_std")}
           if source else dict(image_mean=dataset.mean, image_std=dataset.std))
    config = spot.SPoTConfig(**{k: getattr(args, k) for k in MODEL_FLAGS}, num_classes=n_classes,
                             in_chans=dataset.train.images.shape[1], **own)
    model = spot.SPoTViT(config)
    if source is not None:
        differ = [f"{k} {v} vs {getattr(config, k)}" for k, v in dataclasses.asdict(source.config).items()
                  if v != getattr(config, k)]
        if differ:
            sys.exit(f"error: --init-from {args.init_from} is another model ({', '.join(differ)})")
        model.load_state_dict(source.state_dict())
    return model.to(device)


def make_optimizer(model, args, n_train, device):
    """AdamW with decay on matrices only, and a warm-up + cosine schedule over all epochs."""
    steps_per_epoch = n_train // args.batch_size
    total, warmup = args.epochs * steps_per_epoch, max(1, int(args.warmup_epochs * steps_per_epoch))
    # Weight decay 0.05; --lr is the peak, which the schedule multiplies: down to 1 % at the end.
    optimizer = torch.optim.AdamW(param_groups(model, 0.05), lr=args.lr, fused=device.type == "cuda" or None)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_lambda(step, warmup, total, 0.01))


def start_or_resume(args, model, optimizer, scheduler, generators, device, rank, world, log):
    """A new run decides its precision (once: the decision is stored with the run); --resume
    restores every state exactly: weights, optimizer, schedule, position in the epoch, RNGs.
    -> the training state {"epoch", "step", "running"}"""
    if saved := args.checkpoint:
        for key, part in (("model", model), ("optimizer", optimizer), ("scheduler", scheduler)):
            part.load_state_dict(saved[key])
        for name, generator in generators.items():   # (more processes than saved reuse the last streams)
            generator.set_state(saved["rng"][min(rank, len(saved["rng"]) - 1)][name])
        return {k: saved[k] for k in ("epoch", "step", "running")}
    n_probe = args.token_choices[len(args.token_choices) // 2]      # the median budget
    bf16 = [utils.precision_for(model, args.precision, args.batch_size // world, n_probe, device, log)]
    if world > 1:   # every process must train in the same precision: rank 0 decides
        dist.broadcast_object_list(bf16, 0)
    args.precision_used = "bf16" if bf16[0] else "fp32"
    if rank == 0:   # what made this run, beside its metrics (small enough to commit with them)
        info = dict(command=" ".join(sys.argv), cpu=utils.cpu_name(), torch=torch.__version__, args=saved_args(args))
        utils.write_atomic(Path(args.out) / "run.json", json.dumps(info, indent=1, default=str))
    return {"epoch": 0, "step": 0}


def run(args):
    """Train as the flags say -> exit code (0 done, 130 interrupted by Ctrl-C and saved)."""
    rank, world, device = setup_distributed(utils.resolve_device(args.device))
    log = print if rank == 0 else (lambda *a, **k: None)
    torch.set_num_threads(args.threads or torch.get_num_threads())
    # Adam's second-moment estimates of tiny gradients underflow into denormal floats, which x86
    # CPUs process many times slower; flushing them to zero changes nothing measurable here.
    torch.set_flush_denormal(True)
    dataset = load_data(args, world, args.progress and rank == 0)
    eval_name = "val" if dataset.val is not None else "test"   # choose on val; test is read once
    model = build_model(args, dataset, device)
    optimizer, scheduler = make_optimizer(model, args, len(dataset.train), device)
    # The three random streams of training, each its own generator so that a checkpoint captures them
    # exactly (evaluation draws from fresh seeded ones, and nothing draws from torch's global one).
    generators = {name: torch.Generator(device).manual_seed(args.seed + 1000 * rank + i)
                  for i, name in enumerate(("augment", "positions", "choice"), 1)}
    state = start_or_resume(args, model, optimizer, scheduler, generators, device, rank, world, log)
    bf16, checkpoint = args.precision_used == "bf16", Path(args.out) / "checkpoint.pt"
    log(f"{args.dataset}: {len(dataset.train)} train images | {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
        f"parameters | {world} process(es), {device}, {args.precision_used} | from step {state['step']}")
    train_model = model if world == 1 else torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None)
    stop, start_time = utils.install_ctrl_c(log), time.time()
    while state["epoch"] < args.epochs and state["step"] < (args.max_steps or math.inf):
        metrics = train_epoch(train_model, optimizer, scheduler, dataset.train, state, args, generators, bf16, device,
                              rank, world, stop)
        save_run(args, model, optimizer, scheduler, state, generators, dataset.classes, world, rank)
        if stop["requested"]:   # saved; leave at once, without evaluating
            log(f"saved {checkpoint} at step {state['step']}; continue with: python train.py --resume --out {args.out}")
            return 130
        metrics.update(evaluate(model, getattr(dataset, eval_name), eval_name, args, device, bf16, rank, world),
                       precision=args.precision_used, elapsed_s=time.time() - start_time)
        log_metrics(metrics, args.out, log, rank)
    if state["epoch"] == args.epochs and eval_name == "val" and args.final_test:   # test, read once
        test = evaluate(model, dataset.test, "test", args, device, bf16, rank, world)
        log_metrics({"epoch": args.epochs, "final": True, **test}, args.out, log, rank)
    log(f"done: {state['epoch']} epochs, {state['step']} steps in {time.time() - start_time:.0f} s | {checkpoint}")
    if world > 1:   # all ranks leave together, after DDP's reducer (which holds gloo work) is gone
        del train_model
        dist.barrier()
        dist.destroy_process_group()
    return 0


def train_epoch(model, optimizer, scheduler, split, state, args, generators, bf16, device, rank, world, stop):
    """The rest of the current epoch (a resume continues mid-epoch) -> the epoch's training metrics.
    Updates `state` in place; returns early on Ctrl-C or at --max-steps."""
    steps = len(split) // args.batch_size
    start = state["step"] - state["epoch"] * steps                  # steps already taken in this epoch
    # The order of epoch e depends only on (seed, e); each global batch is cut into one slice per process.
    order = torch.randperm(len(split), generator=torch.Generator().manual_seed(1_000_003 * args.seed + state["epoch"]))
    order = order[: steps * args.batch_size].view(steps, world, -1)[:, rank]          # (steps, batch size / world)
    if start == 0:   # running sums of this epoch, kept across a resume: loss, correct, images
        state["running"] = torch.zeros(3, dtype=torch.float64)
    running, seen_before, epoch_start = state["running"], state["running"][2].item(), time.time()
    bar = tqdm(order[start:], leave=False, dynamic_ncols=True, desc=f"epoch {state['epoch'] + 1}/{args.epochs}",
               disable=not (rank == 0 and args.progress))
    for batch in bar:
        images = split.images[batch].to(device).float().div_(255)                     # (B, C, H, W) in [0, 1]
        images = data.augment(images, generators["augment"], padding=args.augment_padding)  # crops and flips
        labels = split.labels[batch].to(device)
        loss, logits = train_step(model, optimizer, scheduler, images, labels, args, generators, bf16)
        state["step"] += 1
        running += torch.tensor([loss.item() * len(labels), (logits.argmax(1) == labels).sum().item(), len(labels)])
        bar.set_postfix(loss=f"{running[0] / running[2]:.3f}", acc=f"{100 * running[1] / running[2]:.1f}")
        stop_now = torch.tensor(float(stop["requested"] or state["step"] >= (args.max_steps or math.inf)), device=device)
        if world > 1:   # every process must agree to stop at the same step
            dist.all_reduce(stop_now, dist.ReduceOp.MAX)
        if stop_now:
            break
    bar.close()
    (loss_sum, correct, seen), finished = running.tolist(), state["step"] == (state["epoch"] + 1) * steps
    metrics = {"epoch": state["epoch"] + 1, "step": state["step"], "partial": not finished,
               "train_loss": loss_sum / seen, "train_acc": 100 * correct / seen, "lr": scheduler.get_last_lr()[0],
               "img_per_s": (seen - seen_before) * world / max(time.time() - epoch_start, 1e-9)}
    state["epoch"] += finished
    return metrics


def setup_distributed(device):
    """torchrun sets RANK / WORLD_SIZE / LOCAL_RANK -> (rank, world_size, device). A plain
    `python train.py` is world_size 1."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


# -----------------------------------------------------------------------------
# Checkpoints and metrics

def save_run(args, model, optimizer, scheduler, state, generators, classes, world, rank):
    """Everything a resume needs, in one checkpoint. Collective in DDP: every rank takes part."""
    rng = [{name: generator.get_state() for name, generator in generators.items()}] * world
    if world > 1:   # every process's random streams, so a resumed DDP run is exact too
        dist.all_gather_object(rng, rng[0])
    if rank == 0:
        utils.write_atomic(Path(args.out) / "checkpoint.pt", {
            "model_config": dataclasses.asdict(model.config), "model": model.state_dict(),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), **state,
            "rng": rng, "classes": classes, "args": saved_args(args)})


def saved_args(args):
    return {k: v for k, v in vars(args).items() if k not in ("checkpoint", "init_model")}


def log_metrics(metrics, out, log, rank):
    """One line of metrics.jsonl (rank 0), and one printed line: its losses and accuracies."""
    if rank == 0:
        with open(Path(out) / "metrics.jsonl", "a") as f:
            f.write(json.dumps(metrics) + "\n")
    log(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()))


# -----------------------------------------------------------------------------
# The command line: flags, their checks, and --resume (out of the way of the method)

# Flags that may differ when a run is resumed: they change how it runs, not what it computes.
RESUME_MAY_CHANGE = {"resume", "out", "threads", "device", "progress", "max_steps", "cache_dir"}


def build_parser():
    """Flags marked (preset) default to the preset's value (listed by --help)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1], epilog="Presets (cifar10, folder: not yet run; imagenet-retrofit: NOT RUN HERE (no GPU, "
        "no pretrained weights reachable), meant with --init-from timm:vit_base_patch16_224.augreg_in21k_ft_in1k --device "
        "cuda; it decodes every image into memory at 224 px and has no random-resized crop): "
        + "; ".join(f"{name}: " + ", ".join(f"{k}={v}" for k, v in _flat(p).items()) for name, p in PRESETS.items()))
    add = parser.add_argument
    add("--dataset", default="shapes", choices=data.DATASETS, help="folder: DIR/{train,val}/<class>/<images>")
    add("--preset", choices=tuple(PRESETS), help="defaults of the (preset) flags (default: the dataset's name)")
    add("--data-dir", type=lambda path: str(Path(path).expanduser().resolve()), help="dataset folder")
    add("--cache-dir", help="where decoded images are cached (default: $SPOT_CACHE or ~/.cache/spot)")
    for flag in MODEL_FLAGS:                                                    # SPoTConfig checks them
        add(f"--{flag.replace('_', '-')}", type=float if flag == "mlp_ratio" else int, help="the model (preset)")
    add("--val-size", type=utils.count_or_fraction, help="validation images: a count or a fraction of train (preset)")
    add("--train-limit", type=utils.int_at_least(1), help="train on N images (a fixed random subset)")
    add("--test-limit", type=utils.int_at_least(1), help="evaluate on the first N val/test images")
    add("--tokens", help="budgets drawn per batch: N, A-B, A,B,C or 'all' (the full grid) (preset)")
    add("--train-priors", type=utils.name_list(spot.PRIORS), help="priors drawn per batch, a comma list (preset)")
    add("--eval-tokens", default="16", help="budgets evaluated each epoch besides the full grid (default: 16)")
    add("--eval-prior", default="isotropic", choices=spot.PRIORS, help="(default: isotropic)")
    add("--final-test", action=argparse.BooleanOptionalAction, default=True, help="read test once, at the end")
    add("--init-from", help="start from a model (retrofitting it into SPoT): a checkpoint of train.py, or a pretrained "
        "ViT: a timm/DeiT/MAE state dict (.pth, .pt, .bin, .safetensors) or timm:NAME, whose shape decides the "
        "model flags but --image-size")
    add("--epochs", type=utils.int_at_least(1), help="(preset)")
    add("--batch-size", type=utils.int_at_least(1), help="global, split over processes (preset)")
    add("--lr", type=utils.float_in(0, low_open=True), help="peak AdamW learning rate (preset)")
    add("--warmup-epochs", type=utils.float_in(0), help="linear warm-up (preset)")
    add("--label-smoothing", type=utils.float_in(0, 1, high_open=True), default=0.1, help="(default 0.1)")
    add("--augment-padding", type=utils.int_at_least(0), help="random-crop padding in pixels (preset)")
    add("--max-steps", type=utils.int_at_least(1), help="stop after N steps in all (--resume continues)")
    add("--device", default="auto", choices=("auto", "cuda", "cpu"), help="(default: auto = CUDA if available)")
    add("--precision", default="auto", choices=("auto", "fp32", "bf16"), help="auto: bf16 if measured faster")
    add("--threads", type=utils.int_at_least(1), help="CPU threads for torch (default: all cores)")
    add("--seed", type=int, default=0, help="data order, augmentation, positions, init (default 0)")
    add("--out", help="run folder (default: runs/<dataset>)")
    add("--resume", action="store_true", help="continue the run in --out with its own flags")
    add("--progress", action=argparse.BooleanOptionalAction, default=True, help="tqdm bars (default: on)")
    return parser


def _flat(preset):
    """A preset as flag values: its SPoTConfig's model flags, then the rest."""
    model = {k: getattr(preset["model"], k) for k in MODEL_FLAGS}
    return {**model, "image_size": model["image_size"][0], **{k: v for k, v in preset.items() if k != "model"}}


def parse_args(argv=None):
    """Command line -> checked args, before any data is loaded. The flags are parsed onto the
    preset's values (a new run) or onto the run's own (--resume): argparse sets no default over a
    value, so on a resume a value that differs from the run's was given again, and is refused."""
    parser = build_parser()
    first = parser.parse_args(argv)
    out = first.out or os.path.join("runs", first.dataset)
    try:
        utils.check_out_dir(out, "--out")
        utils.resolve_device(first.device)
        if not first.resume and any((Path(out) / name).exists() for name in ("checkpoint.pt", "metrics.jsonl")):
            raise ValueError(f"--out {out} already holds a run; pass --resume to continue it, or choose another --out")
        checkpoint = first.resume and spot.load_checkpoint(Path(out) / "checkpoint.pt", return_checkpoint=True)[1]
        base = ({k: v for k, v in checkpoint["args"].items() if k not in RESUME_MAY_CHANGE} if checkpoint
                else _flat(PRESETS[first.preset or first.dataset]))
        args = parser.parse_args(argv, argparse.Namespace(**base, out=out, checkpoint=checkpoint))
        changed = [f"--{k.replace('_', '-')} {getattr(args, k)!r} (the run has {v!r})" for k, v in base.items()
                   if checkpoint and getattr(args, k) != v]
        if changed:
            raise ValueError(f"--resume: {out} was trained with other flags; these differ: {'; '.join(changed)}. "
                             f"Resume without them, or start a new run in another --out")
        return args if checkpoint else check_args(args, {k for k in MODEL_FLAGS if getattr(first, k) is not None})
    except ValueError as error:
        parser.error(str(error))


def check_args(args, explicit):
    """A new run's flags -> args, or ValueError naming the flag of a value that cannot work.
    explicit: the model flags given on the command line (a pretrained source decides the others)."""
    args.init_model, args.init_pretrained = read_source(args, explicit) if args.init_from else (None, False)
    spot.SPoTConfig(**{k: getattr(args, k) for k in MODEL_FLAGS})                    # raises for a bad model
    n_grid = (args.image_size // args.window) ** 2
    args.token_choices = utils.parse_tokens(args.tokens, n_grid, "--tokens")
    args.budgets = utils.parse_tokens(args.eval_tokens, n_grid, "--eval-tokens")
    for flag, budgets, priors in (("--tokens", args.token_choices, args.train_priors),
                                  ("--eval-tokens", args.budgets, [args.eval_prior])):
        if "grid" in priors and max(budgets) > n_grid:
            raise ValueError(f"{flag} up to {max(budgets)} but prior 'grid' has only {n_grid} cells")
    return args


def read_source(args, explicit):
    """--init-from -> (model, pretrained?). The file is read once to tell an SPoT checkpoint
    (a dict with "model_config" and "model": build_model checks that it is this run's model)
    from a pretrained ViT, which spot.load_pretrained reads at this run's image size; the
    source's shape then becomes the run's: model flags left unset take its values, and one
    given that contradicts it is refused. A file that stores "mean" and "std" beside its
    state dict gives them; else load_pretrained's default (timm's config, or ImageNet's)."""
    source, stats, name = args.init_from, {}, args.init_from
    if not source.startswith("timm:") and not source.endswith(".safetensors"):
        if not Path(source).is_file():
            raise ValueError(f"--init-from {name} does not exist; pass a checkpoint of train.py, a ViT state "
                             f"dict (.pth, .pt, .bin, .safetensors) or timm:NAME")
        try:
            source = torch.load(name, map_location="cpu", weights_only=True)
        except Exception as error:   # random bytes, truncated, or holding code (refused)
            raise ValueError(f"--init-from {name} could not be read ({type(error).__name__}): not a checkpoint "
                             f"or a state dict of tensors") from None
        if isinstance(source, dict) and {"model_config", "model"} <= source.keys():
            return spot.load_checkpoint(name), False               # (read again, by its own loader)
        stats = {k: source[k] for k in ("mean", "std") if isinstance(source, dict) and k in source}
    try:
        model = spot.load_pretrained(source, image_size=args.image_size,
                                     heads=args.heads if "heads" in explicit else None, **stats)
    except (ValueError, ImportError) as error:
        hint = " (train.py: --heads N)" if "heads=" in str(error) else ""
        raise ValueError(f"--init-from {name}: {error}{hint}") from None
    for flag in MODEL_FLAGS[1:]:                           # window, dim, depth, heads, mlp_ratio
        ours, theirs = getattr(args, flag), getattr(model.config, flag)
        if flag in explicit and ours != theirs:
            raise ValueError(f"--{flag.replace('_', '-')} {ours} contradicts --init-from {name}, whose {flag} is "
                             f"{theirs}: leave --{flag.replace('_', '-')} out (the source decides it) or use another source")
        setattr(args, flag, theirs)
    return model, True


def main(argv=None):
    """Train as the command line says; returns the exit code (0 done, 130 interrupted and saved).
    The caller's Ctrl-C handler is put back afterwards (tests and notebooks call main())."""
    previous = signal.getsignal(signal.SIGINT)
    try:
        return run(parse_args(argv))
    finally:   # (changed only on the main thread, where signal.signal may be called)
        if signal.getsignal(signal.SIGINT) is not previous:
            signal.signal(signal.SIGINT, previous)


if __name__ == "__main__":
    sys.exit(main())
