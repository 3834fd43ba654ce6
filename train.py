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

The file reads top to bottom like the run: presets, the objective (train_step), the one
evaluation loop (predict), then main: flags -> data -> model -> optimizer -> epochs. A run lives
in --out, locked while a run writes it: checkpoint.pt (latest, written atomically), metrics.jsonl
(one JSON object per epoch, accuracies on the validation split held out of train, written before
the epoch's checkpoint; the test split is read once, at the end) and run.json (the command).
Ctrl-C saves a checkpoint at the last finished step; --resume continues from it with the run's
own flags and ends with the same metrics as an uninterrupted run (on the CPU, where kernels are
deterministic), also after a crash. A non-finite loss stops the run (exit 1) and keeps the last
checkpoint. The flags, processes under torchrun, the lock, Ctrl-C and the checkpoints' contents
are plumbing, in utils.py.
"""

import math
import sys
import time
import zlib
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import data
import spot
import utils

# -----------------------------------------------------------------------------
# Presets: a model and a schedule. Every flag left unset takes its value from the preset, which
# defaults to the dataset's name; num_classes, in_chans and the normalization come from the data.

# The first recipes draw budgets 16-64 and every prior but "salient" (which reads the image); the
# measured CPU recipes draw budgets 4-64 and all seven priors, without random crops, so that every
# cell of the paper's results table is a budget and a prior the model was trained on.
BUDGETS_16_64 = dict(
    tokens="16-64",
    train_priors=["uniform", "gaussian", "sobol", "isotropic", "center", "grid"],
)
MEASURED_ON_CPU = dict(
    tokens="4-64",
    train_priors=list(spot.PRIORS),
    batch_size=128,
    augment_padding=0,
)
SMALL_VIT = dict(image_size=32, window=4, dim=192, depth=6, heads=3, mlp_ratio=2.0)
PRESETS = {
    # The default `python train.py`: a few minutes on a 2-core CPU (RESULTS.md).
    "shapes": dict(
        SMALL_VIT, dim=128, depth=4, heads=4,
        epochs=20, batch_size=128, lr=1e-3, warmup_epochs=1,
        augment_padding=4, val_size=1000, **BUDGETS_16_64,
    ),
    # The CIFAR-10 CPU recipe of RESULTS.md (cifar10-spot; scale --epochs to your budget); its lr
    # was chosen on validation.
    "cifar10-cpu": dict(
        SMALL_VIT, epochs=10, lr=5e-4, warmup_epochs=1, val_size=5000, **MEASURED_ON_CPU,
    ),
    # The Imagenette CPU recipe of RESULTS.md (imagenette-spot, `--dataset folder`): the same
    # model at 128 px with 16 px windows (the same 8x8 grid of 64 cells); lr 1e-3 and no crops
    # chosen on validation probes.
    "imagenette-cpu": dict(
        SMALL_VIT, image_size=128, window=16,
        epochs=40, lr=1e-3, warmup_epochs=2, val_size=0.1, **MEASURED_ON_CPU,
    ),
    # NOT YET RUN: a larger single-GPU recipe (9 blocks, 200 epochs), scaled up from cifar10-cpu.
    "cifar10": dict(
        SMALL_VIT, depth=9,
        epochs=200, batch_size=256, lr=1e-3, warmup_epochs=10,
        augment_padding=4, val_size=5000, **BUDGETS_16_64,
    ),
    # NOT YET RUN: Imagenette-style folders at 128 px, windows of 16 px: an 8x8 grid of 64 cells.
    "folder": dict(
        image_size=128, window=16, dim=384, depth=8, heads=6, mlp_ratio=4.0,
        epochs=100, batch_size=128, lr=1e-3, warmup_epochs=5,
        augment_padding=16, val_size=0.1, **BUDGETS_16_64,
    ),
    # NOT RUN HERE (no GPU, no pretrained weights reachable): the paper's setting, a pretrained
    # ViT-B/16 retrofitted on an ImageNet subset (`--dataset folder`) at 224 px, the paper's
    # budgets 25-196 (196 = the full 14x14 grid), every prior. Meant with --init-from
    # timm:vit_base_patch16_224.augreg_in21k_ft_in1k --device cuda; the source decides the model
    # (the shape here only names it). lr 1e-4, ten times below the from-scratch recipes: the
    # weights are already good, and a from-scratch peak would wash their features out in the
    # first steps. Images at 224 px stream from the folder (data.batches), with ImageNet's
    # random-resized crops + flips in training and timm's 0.875 centre crop in evaluation
    # (--crop-pct 0.9 for timm's augreg weights).
    "imagenet-retrofit": dict(
        image_size=224, window=16, dim=768, depth=12, heads=12, mlp_ratio=4.0,
        epochs=5, batch_size=128, lr=1e-4, warmup_epochs=0.5,
        augment_padding=0, val_size=0.02, tokens="25-196", train_priors=list(spot.PRIORS),
        crop_pct=0.875,
    ),
}
MODEL_FLAGS = ("image_size", "window", "dim", "depth", "heads", "mlp_ratio")


# -----------------------------------------------------------------------------
# Retrofitting: the training objective

def train_step(run, images, labels):
    """One step of  min_θ E_{S ~ p_φ} L(g_θ(I, S), y)  (retrofitting, arXiv 2507.01654).

    The expectation over token sets is taken one sample per batch: draw a prior p_φ from
    --train-priors and a budget N from --tokens, then S ~ p_φ (N positions) for every image; the
    model g_θ reads the image through S, and one AdamW step lowers the cross-entropy L. Over many
    batches every prior and budget is trained, so one model serves all of them. -> (loss, logits)
    """
    args, streams = run.args, run.generators
    prior = pick(args.train_priors, streams["choice"])           # p_φ
    n_tokens = pick(run.tokens, streams["choice"])               # N
    positions = spot.sample_positions(prior, len(images), n_tokens, args.image_size,
                                      args.window, generator=streams["positions"],
                                      images=images)                   # (B, N, 2)
    with utils.autocast(images.device, run.precision == "bf16"):
        logits = run.train_model(images, positions)                    # (B, classes)
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=args.label_smoothing)
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(run.model.parameters(), 1.0)   # gradient norm at most 1
    run.optimizer.step()
    run.scheduler.step()
    return loss, logits


def pick(options, generator):
    """One of `options`, uniformly, drawn from `generator`."""
    index = torch.randint(len(options), (1,), generator=generator, device=generator.device)
    return options[index.item()]


def param_groups(model, weight_decay):
    """Weight decay on matrices only: not on biases, norms or the class token (standard ViT)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        matrix = param.dim() >= 2 and "cls_token" not in name
        (decay if matrix else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def lr_lambda(step, warmup_steps, total_steps, min_ratio):
    """Linear warm-up to the peak, then cosine decay to min_ratio * peak."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


# -----------------------------------------------------------------------------
# The one evaluation loop (oracle.py and the research folder read splits through it too).
# Splits stay uint8 on the CPU (data.py); each batch becomes float on `device`. Positions are
# drawn for a whole split in fixed chunks, so they do not depend on the batch size.

POSITION_CHUNK = 256
RANDOM_PRIORS = ("uniform", "gaussian", "sobol", "salient", "grid")   # a new draw, new positions


def seed_for(seed, *key):
    """A stable seed per (seed, prior, budget, role, ...). Python's hash() of a str is randomized
    per process, so use CRC32: the same command gives the same positions, run after run."""
    crc = zlib.crc32(":".join(map(str, key)).encode())
    return (seed * 1_000_003 + crc) % (2**63 - 1)


def draw_positions(prior, images_uint8, n_tokens, window, seed, device="cpu"):
    """Positions for a whole split from one prior: (n, N, 2) on the CPU, reproducible from seed.
    "salient" reads the images (uint8; spot.saliency_map), or takes their (n, H, W) maps; the
    image size is the images' (or the maps') last two dimensions."""
    generator = torch.Generator(device=device).manual_seed(seed)
    size = images_uint8.shape[-2:]                                # (H, W)
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

    images_uint8 (n, C, H, W) uint8 on the CPU, positions (n, N, 2). Eval mode, no gradients,
    bf16 autocast when asked. -> (logits (n, classes), class-token features (n, D) or None),
    float32 on the CPU.
    """
    was_training, logits, feats = model.training, [], []
    model.eval()
    for start in range(0, len(images_uint8), batch_size):
        batch = slice(start, start + batch_size)
        images = images_uint8[batch].to(device).float().div_(255)
        with utils.autocast(images.device, bf16):
            tokens = model.forward_features(images, positions[batch].to(device))
            logits.append(model.forward_head(tokens).float().cpu())              # (B, classes)
            if features:
                pooled = model.forward_head(tokens, pre_logits=True)
                feats.append(pooled.float().cpu())                               # (B, D)
    model.train(was_training)
    return torch.cat(logits), (torch.cat(feats) if features else None)


def evaluate(run, split, name):
    """Loss and accuracy at the full grid, and accuracy at each --eval-tokens budget drawn from
    --eval-prior. The positions are drawn for the whole split from a fixed seed, so every epoch,
    and any number of processes, reads the same ones; each process reads its shard
    split[rank::world] and the sums are added up over processes.
    -> {f"{name}_loss", f"{name}_acc", f"{name}_acc@N" for N in budgets} (accuracies in percent)
    """
    args, procs = run.args, run.procs
    grid = spot.grid_positions(args.image_size, args.window)      # (G, 2)
    read_at = {"": grid.expand(len(split), -1, -1)}             # the keys name the accuracies
    for n in run.budgets:
        seed = seed_for(args.seed, "eval", n)
        read_at[f"@{n}"] = draw_positions(args.eval_prior, split.images, n, args.window, seed,
                                        procs.device)            # (n_images, N, 2)
    shard = slice(procs.rank, None, procs.world)
    images, labels = split.take(shard).images, split.labels[shard]
    totals = torch.zeros(len(read_at), 2, dtype=torch.float64, device=procs.device)
    for i, positions in enumerate(read_at.values()):              # per read: loss sum, correct
        logits = predict(run.model, images, positions[shard], procs.device,
                         2 * args.batch_size, bf16=run.precision == "bf16")[0]
        totals[i] = torch.stack([F.cross_entropy(logits, labels, reduction="sum"),
                                 (logits.argmax(1) == labels).sum()])
    totals = (procs.sum(totals) / len(split)).tolist()
    metrics = {f"{name}_loss": totals[0][0]}
    for key, (_, correct) in zip(read_at, totals):
        metrics[f"{name}_acc{key}"] = 100 * correct
    return metrics


# -----------------------------------------------------------------------------
# The run: data, model, optimizer, then epochs

def build_model(args, dataset, device, checkpoint=None):
    """SPoTViT from the flags and the data (from scratch it takes the dataset's input statistics),
    or from --init-from: a pretrained ViT with a fresh head for the dataset's classes, or an SPoT
    checkpoint of this same model; either keeps the statistics its weights learned on. A resumed
    run rebuilds its own model from its checkpoint (main then loads the weights)."""
    torch.manual_seed(args.seed)
    if checkpoint:
        return spot.SPoTViT(spot.SPoTConfig(**checkpoint["model_config"])).to(device)
    source, weights = utils.read_init_from(args.init_from) if args.init_from else [None] * 2
    if weights is not None:
        return load_pretrained(weights, args, len(dataset.classes)).to(device)
    kept = dict(image_mean=dataset.mean, image_std=dataset.std)
    if source is not None:        # what no flag sets: its kind of model and input statistics
        keep = ("norm_eps", "position_embedding", "pool", "image_mean", "image_std")
        kept = {k: source["model_config"][k] for k in keep}
    config = spot.SPoTConfig(**{k: getattr(args, k) for k in MODEL_FLAGS}, **kept,
                             num_classes=len(dataset.classes),
                             in_chans=dataset.train.images.shape[1])
    model = spot.SPoTViT(config)
    if source is not None:
        theirs = asdict(spot.SPoTConfig(**source["model_config"]))
        differ = [f"{k} {v} vs {getattr(config, k)}" for k, v in theirs.items()
                  if v != getattr(config, k)]
        if differ:
            sys.exit(f"error: --init-from {args.init_from} is another model ({', '.join(differ)})")
        model.load_state_dict(source["model"])
    return model.to(device)


def load_pretrained(weights, args, num_classes):
    """spot.load_pretrained with what the flags say of the source first, and a fresh head of
    num_classes (a headless encoder gets one too)."""
    return spot.load_pretrained(weights, image_size=args.image_size, heads=args.heads,
                                mean=args.image_mean, std=args.image_std,
                                num_classes=num_classes)


def make_optimizer(model, args, n_train):
    """AdamW with decay on matrices only, and a warm-up + cosine schedule over all epochs."""
    steps_per_epoch = n_train // args.batch_size
    total = args.epochs * steps_per_epoch
    warmup = max(1, int(args.warmup_epochs * steps_per_epoch))
    # Weight decay 0.05; --lr is the peak, which the schedule multiplies: down to 1 % at the end.
    fused = next(model.parameters()).is_cuda or None
    optimizer = torch.optim.AdamW(param_groups(model, 0.05), lr=args.lr, fused=fused)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_lambda(step, warmup, total, 0.01))
    return optimizer, schedule


def main(argv=None):
    """Train as the command line says -> exit code: 0 done, 130 interrupted by Ctrl-C and saved;
    an error (a diverging run, a full disk) exits 1 with a message."""
    args = parse_args(argv)
    with utils.Processes(args) as procs:      # and --out locked while the run writes it
        dataset = data.load_for_training(args, procs)
        checkpoint = args.resume and utils.read_checkpoint(Path(args.out) / "checkpoint.pt")
        model = build_model(args, dataset, procs.device, checkpoint)
        optimizer, scheduler = make_optimizer(model, args, len(dataset.train))
        run = utils.Run(args, procs, model, optimizer, scheduler, *budgets(args))
        run.generators = utils.random_streams(args.seed, procs)
        if checkpoint:
            utils.restore(run, checkpoint)
        else:   # a new run's precision is stored with it: a resumed run keeps it
            run.precision = utils.choose_precision(args.precision, procs.device)
            utils.write_run_info(run)
        n_params = sum(p.numel() for p in model.parameters()) / 1e6
        procs.log(f"{args.dataset}: {len(dataset.train)} train images | {n_params:.2f}M "
                  f"parameters | {procs.world} process(es), {procs.device}, {run.precision} | "
                  f"from step {run.step}")
        run.train_model = procs.wrap(model)
        with utils.ctrl_c(procs.log) as stop:
            code = train(run, dataset, stop)
        procs.close(run)
    return code


def train(run, dataset, stop):
    """Epochs until --epochs (or --max-steps, or Ctrl-C), each judged on the validation split,
    logged, then saved; the test split is read once, at the end. -> exit code (0, or 130)"""
    args = run.args
    name = "val" if dataset.val is not None else "test"      # choose on val; test is read once
    path = Path(args.out) / "checkpoint.pt"
    start_time = time.time()
    while run.epoch < args.epochs and run.step < (args.max_steps or math.inf):
        metrics = train_epoch(run, dataset.train, stop)
        if not stop["requested"]:   # the epoch's line first: a crash after it loses no line
            metrics.update(evaluate(run, getattr(dataset, name), name), precision=run.precision,
                           elapsed_s=time.time() - start_time)
            run.procs.log_metrics(args.out, metrics)
        utils.save_checkpoint(path, run, dataset.classes)
        if stop["requested"]:   # saved; leave at once, without evaluating
            hint = utils.resume_command(args)
            run.procs.log(f"saved {path} at step {run.step}; continue with: {hint}")
            return 130
    if run.epoch == args.epochs and name == "val" and args.final_test:   # test, read once
        test = evaluate(run, dataset.test, "test")
        run.procs.log_metrics(args.out, {"epoch": args.epochs, "final": True, **test})
    run.procs.log(f"done: {run.epoch} epochs, {run.step} steps in "
                  f"{time.time() - start_time:.0f} s | {path}")
    return 0


def train_epoch(run, split, stop):
    """The rest of the current epoch (a resume continues mid-epoch) -> its training metrics.
    Returns early on Ctrl-C or at --max-steps."""
    args, procs = run.args, run.procs
    steps = len(split) // args.batch_size
    done = run.step - run.epoch * steps                 # steps already taken in this epoch
    # The order of epoch e depends only on (seed, e); each global batch is cut into one slice
    # per process.
    generator = torch.Generator().manual_seed(1_000_003 * args.seed + run.epoch)
    order = torch.randperm(len(split), generator=generator)[:steps * args.batch_size]
    order = order.view(steps, procs.world, -1)[:, procs.rank]      # (steps, batch / world)
    if done == 0:               # this epoch's sums (loss, correct, images), kept across a resume
        run.running = torch.zeros(3, dtype=torch.float64)
    seen_before, epoch_start, waited = run.running[2].item(), time.time(), 0
    crops = seed_for(args.seed, "crops", run.epoch, procs.rank) + done     # (streamed images)
    batches = data.batches(split, order[done:], crops, procs)
    bar = tqdm(batches, f"epoch {run.epoch + 1}/{args.epochs}", steps - done, leave=False,
               dynamic_ncols=True, disable=not (procs.rank == 0 and args.progress))
    for images, labels, wait in bar:                # (B, C, H, W) uint8 and (B,), on the device
        waited += wait                              # seconds the model waited for this batch
        images = data.augment(images.float().div_(255), run.generators["augment"],
                              padding=args.augment_padding)
        loss, logits = train_step(run, images, labels)
        run.step += 1
        run.check_finite(loss)                  # a NaN or inf loss stops the run (exit 1)
        correct = (logits.argmax(1) == labels).sum().item()
        run.running += torch.tensor([loss.item() * len(labels), correct, len(labels)])
        loss_sum, right, seen = run.running.tolist()
        bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{100 * right / seen:.1f}")
        if procs.any(stop["requested"] or run.step >= (args.max_steps or math.inf)):
            break
    bar.close()
    (loss_sum, correct, seen), finished = run.running.tolist(), run.step == (run.epoch + 1) * steps
    seconds = max(time.time() - epoch_start, 1e-9)
    metrics = {"epoch": run.epoch + 1, "step": run.step, "partial": not finished,
               "train_loss": loss_sum / seen, "train_acc": 100 * correct / seen,
               "lr": run.scheduler.get_last_lr()[0],
               "img_per_s": (seen - seen_before) * procs.world / seconds,
               "data_wait": waited / seconds}     # the share of the epoch spent waiting for data
    run.epoch += finished
    return metrics


# -----------------------------------------------------------------------------
# The command line: `python train.py --help` (the flags are declared in utils.train_parser)

def parse_args(argv=None):
    """Command line -> args, checked before any data is loaded and never changed afterwards: the
    flags parsed onto a new run's defaults (new_flags) or onto a resumed run's own flags."""
    parser = utils.train_parser(PRESETS, data.DATASETS, spot.PRIORS)
    return utils.parse_run(parser, argv, new_flags, budgets)


def new_flags(first):
    """A new run's defaults: the preset's values, and a pretrained --init-from's shape (window,
    dim, depth, heads, mlp_ratio; a model flag given that contradicts it is refused)."""
    base = dict(PRESETS[first.preset or first.dataset])
    _, weights = utils.read_init_from(first.init_from) if first.init_from else [None] * 2
    if weights is None:
        return base
    shape = load_pretrained(weights, first, 1).config       # its shape (any number of classes)
    return base | utils.source_decides(first, shape, MODEL_FLAGS)


def budgets(args):
    """--tokens and --eval-tokens -> (training budgets, evaluated budgets), or ValueError naming
    the flag of a value that cannot work (a bad model raises in SPoTConfig)."""
    spot.SPoTConfig(**{k: getattr(args, k) for k in MODEL_FLAGS})
    n_grid = (args.image_size // args.window) ** 2
    tokens = utils.parse_tokens(args.tokens, n_grid, "--tokens", args.train_priors)
    evaluated = utils.parse_tokens(args.eval_tokens, n_grid, "--eval-tokens", [args.eval_prior])
    return tokens, evaluated


if __name__ == "__main__":
    sys.exit(main())
