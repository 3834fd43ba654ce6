"""
experiments/bench.py -- what does subpixel tokenization cost? A benchmark: it prints numbers,
asserts none.

Subpixel tokens (arXiv 2507.01654) replace the patch grid by bilinear windows at continuous
positions, and SPoT-ON (the oracle search) moves those positions by gradient descent. That is
only attractive if it costs little next to a standard ViT, so every number below is measured
side by side with the standard-ViT equivalent:

  1. tokenizer    spot.extract_patches (F.grid_sample) and spot.extract_patches_reference (the
                  same bilinear reading written out by hand), each + a linear embedding
                  C*k*k -> 192,  vs  reshape patchify + the same linear; forward + backward, at
                  every grid cell shifted by +0.3 px (genuinely subpixel), with and without
                  gradients to the positions (images never need one).
                                                goals: <= 1.25x without, <= 2x with position grads
  2. train step   SPoTViT at N subpixel tokens vs GridViT reading N grid patches (below: the same
                  SPoTConfig and weights, only the tokenizer differs); forward, backward, grad
                  clip and AdamW as in train.py.                               goal: <= 1.1x
  3. oracle step  one step of oracle.oracle_search (forward, backward to the positions, Adam)
                  vs one training step on the same batch.                      goal: <= 1.2x
  4. memory       peak memory of one training step (and one oracle step): CUDA max_memory_allocated;
                  CPU peak resident set size (VmHWM), every configuration in a fresh subprocess
  5. attention    a whole training step at the full grid of SPoTViT (spot.attention: on the CPU
                  the formula written out) vs FusedAttentionViT (below: the same model calling
                  torch's fused F.scaled_dot_product_attention), in fp32 and in bf16 autocast.
                  Not a goal: it is why spot.attention exists.

One more section reads a model trained by train.py (--checkpoint) and runs only on request:

  oracle-sweep    SPoT-ON's top-1 over a (steps, lr) grid on the first --limit VALIDATION images
                  (train.py's --val-size; training images if the run held none out; the test
                  split never chooses a default): how oracle.DEFAULT_STEPS and DEFAULT_LR
                  were chosen. Writes OUT/sweep.json and OUT/sweep.md.
(A whole search's cost next to one forward pass is measured where it is used: the label-free
evaluation's cost column, experiments/label_free.py.)

And one mode of its own, instead of the sections (Linux: it reads /proc):

  data-scale      the data path at scale: for each --sizes N, a synthetic ImageNet-style folder
                  (N training + 500 val JPEGs of 300-460 x 250-420 px, 10 classes; made once
                  under --data-root and reused), then `train.py --dataset folder --preset
                  imagenet-retrofit --init-from tests/fixtures/vit_224.pt --epochs 1` and
                  `oracle.py --limit 50` on its checkpoint, run as subprocesses in --repo, each
                  with a fresh SPOT_CACHE. Per command: the peak PSS (proportional set size,
                  so that forked decode workers sharing pages are not counted twice) summed
                  over the process and all its descendants every 0.1 s, wall time, bytes
                  written to the cache and to --out, and their growth from the smallest N to
                  the largest.

Run it from the repository root (RESULTS.md and experiments/NOTES.md hold the measured numbers):
    python -m experiments.bench                           # sections 1-5
    python -m experiments.bench --quick                   # tiny sizes: a smoke run of it all
    python -m experiments.bench --json runs/bench.json    # + every number, settings, machine
    python -m experiments.bench --device cuda --json runs/bench-cuda.json
    python -m experiments.bench --only oracle-sweep --checkpoint runs/shapes/checkpoint.pt \\
        --limit 300 --tokens 8,16 --out runs/shapes-sweep
    python -m experiments.bench --data-scale --sizes 2000,8000 --json runs/data-scale.json
    python -m experiments.bench --data-scale --repo /tmp/head   # another checkout: a worktree

How the numbers are made (read this before trusting one):
  * Each comparison is timed in ONE interleaved loop: round r calls A, B, C, round r+1 calls
    B, C, A, ... so a slow drift of the machine (clock boost, another process) hits every
    contender alike. A ratio is the median of the per-round ratios B_r / A_r, not a ratio of
    two medians, so it cancels whatever changed between rounds.
  * Times are medians over --repeats rounds after --warmup untimed rounds (first calls pay for
    memory allocation, kernel selection and AdamW's state).
  * On CUDA the kernels run asynchronously: we torch.cuda.synchronize() before reading a timer,
    otherwise we would time the kernel *launches*, not the work.
  * --precision auto decides bf16 autocast vs fp32 by measuring (precision_for): on the CPU it
    times a training step of the --model preset in both and keeps the faster, because a CPU's
    feature flags do not say which one is faster. (train.py's auto takes fp32 on the CPU, so
    that a command gives one result; pass train.py --precision bf16 where this measures it
    faster.)
  * torch.set_flush_denormal(True), as in train.py: Adam's tiny second moments become denormal
    floats, which x86 CPUs process in slow microcode.
  * Images are random: bilinear sampling and matrix products cost the same whatever the pixels.
  * Other programs steal CPU time from a benchmark. The report gives the machine's 1-minute load
    average after each section (this process included): well above --threads means "rerun".
  * CPU memory: glibc's malloc keeps freed memory and moves its mmap threshold as the program
    runs, so the peak RSS of one and the same step varies from run to run. The memory probes
    run with MALLOC_MMAP_THRESHOLD_=65536: every block >= 64 kB is its own mapping, returned
    when freed, so RSS follows the live tensors and the peak repeats (no effect off glibc).
"""

import argparse
import json
import math
import multiprocessing
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import types
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import data
import oracle
import spot
import train
import utils

# (image size, window k, batch): CIFAR-like and ImageNet-like (ViT-B/16-like windows)
TOKENIZER_CONFIGS = [(32, 4, 256), (224, 16, 32)]
QUICK_TOKENIZER_CONFIGS = [(32, 4, 16), (224, 16, 2)]
EMBED_DIM = 192                 # the tokenizer's linear embedding: C*k*k -> 192
SUBPIXEL_SHIFT = 0.3            # pixels added to every grid centre in the tokenizer benchmark
TOKEN_COUNTS = (16, 64)         # default --tokens
# the tokenizers timed against patchify; SPoTViT uses the first
SAMPLERS = {"extract_patches": spot.extract_patches,
            "extract_patches_reference": spot.extract_patches_reference}
GOALS = {"tokenizer": 1.25, "tokenizer_pos_grad": 2.0, "train": 1.1, "oracle": 1.2}
SWEEP_STEPS = (5, 10, 20, 40)
SWEEP_LRS = (3e-3, 1e-2, 3e-2)


def parse_args(argv=None):
    """Command line -> checked args: a bad flag stops the run before a model is built or a
    checkpoint read, not after minutes of timing."""
    parser = argparse.ArgumentParser("python -m experiments.bench",
                                     description=__doc__.split("\n\n")[0])
    add, count = parser.add_argument, utils.int_at_least
    add("--device", default="cpu", choices=("auto", "cpu", "cuda"), help="(default: cpu)")
    add("--threads", type=count(1), help="CPU threads for torch (default: all cores)")
    add("--repeats", type=count(1), help="timed rounds per comparison (default 15, quick 3)")
    add("--warmup", type=count(0), help="untimed rounds first (default 3, quick 1)")
    add("--model", default="cifar10", choices=tuple(train.PRESETS),
        help="train.py preset (default: cifar10)")
    add("--batch-size", type=count(1), help="images per batch (default: the preset's, quick 8)")
    add("--tokens", default="16,64",
        help="N of sections 2-4, the budgets of oracle-sweep/-time (default: 16,64)")
    add("--precision", default="auto", choices=("auto", "fp32", "bf16"),
        help="auto = what train.py would pick")
    add("--only", type=utils.name_list(SECTIONS), default=",".join(list(SECTIONS)[:5]),
        help="comma-separated sections")
    add("--quick", action="store_true", help="tiny sizes and few repeats: a smoke run")
    add("--json", help="write every number, settings and machine info here")
    add("--checkpoint", help="oracle-sweep: checkpoint.pt written by train.py")
    add("--data-dir", help="its dataset folder (default: the one it stores)")
    add("--out", help="folder for sweep.json and sweep.md")
    add("--limit", type=count(1), default=500,
        help="oracle-sweep: the first N validation (else train) images (500)")
    add("--search-from", default="isotropic", choices=spot.PRIORS,
        help="prior the searches start from (isotropic)")
    utils.add_alias(parser, "search_from", "--oracle-from", choices=spot.PRIORS)
    add("--data-scale", action="store_true",
        help="instead of the sections: train.py + oracle.py of --repo as subprocesses on "
             "synthetic folder datasets of --sizes training images (peak PSS, wall, cache bytes)")
    add("--repo", default=str(Path(__file__).resolve().parents[1]),
        help="data-scale: the checkout whose scripts run (default: this one)")
    add("--sizes", type=size_list, default=DATA_SCALE_SIZES,
        help=f"data-scale: training-set sizes (default: {DATA_SCALE_SIZES})")
    add("--data-root", default=str(DATA_SCALE_ROOT),
        help="data-scale: the synthetic datasets are made here once and reused "
             "(default: %(default)s)")
    add("--oracle-cache", default="fresh", choices=("fresh", "shared"),
        help="data-scale: oracle.py's SPOT_CACHE: a fresh folder (default) or train.py's")
    add("--keep", action="store_true", help="data-scale: keep the run folders and logs")
    args = parser.parse_args(argv)
    preset = train.PRESETS[args.model]
    defaults = (("repeats", 3, 15), ("warmup", 1, 3), ("batch_size", 8, preset["batch_size"]))
    for name, quick, full in defaults:             # unset flags: the --quick or the full default
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    config = preset_config(args.model)
    args.n_grid = n_grid = len(spot.grid_positions(config.image_size, config.window))
    try:
        check_args(args, n_grid)
    except ValueError as error:
        parser.error(str(error))
    return args


def size_list(text):
    """--sizes: 'A,B,...' -> sorted distinct ints >= DATA_SCALE_CLASSES (an image per class)."""
    try:
        sizes = sorted({int(word) for word in text.split(",")})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected sizes like 2000,8000, got {text!r}") from None
    if sizes[0] < DATA_SCALE_CLASSES:
        raise argparse.ArgumentTypeError(f"each size must be >= {DATA_SCALE_CLASSES} (one "
                                         f"image per class), got {sizes[0]}")
    return sizes


def check_args(args, n_grid):
    """The flags that depend on each other; sets args.tokens (a list) and args.device. Raises
    ValueError naming the flag."""
    if isinstance(args.sizes, str):                   # the default, unparsed by argparse
        args.sizes = size_list(args.sizes)
    if args.data_scale:
        missing = [name for name in ("train.py", "oracle.py", "tests/fixtures/vit_224.pt")
                   if not (Path(args.repo) / name).is_file()]
        if missing:
            raise ValueError(f"--repo {args.repo}: no {', '.join(missing)} there")
    on_checkpoint = set(args.only) & {"oracle-sweep"}
    args.tokens = utils.parse_tokens(args.tokens, n_grid)
    if {"train", "memory"} & set(args.only) and max(args.tokens) > n_grid:
        raise ValueError(f"--tokens: the grid ViT of '{args.model}' has {n_grid} patches, "
                         f"got {max(args.tokens)}")
    if bool(on_checkpoint) != (args.checkpoint is not None) or (on_checkpoint and args.out is None):
        raise ValueError("--checkpoint and --out go with --only oracle-sweep, and only there")
    if args.json is not None and Path(args.json).is_dir():
        raise ValueError(f"--json {args.json} is a folder; name a file inside it")
    args.device = utils.resolve_device(args.device)
    folders = (("--out", on_checkpoint and args.out),
               ("--json", args.json and Path(args.json).parent))
    for flag, folder in folders:
        if folder:
            utils.check_out_dir(folder, flag)


def preset_config(name):
    """The spot.SPoTConfig of train.py's preset `name` (its model flags; the rest default)."""
    preset = train.PRESETS[name]
    return spot.SPoTConfig(**{flag: preset[flag] for flag in train.MODEL_FLAGS})


def choose_bf16(args):
    """--precision -> (bf16?, a line saying how it was decided), by precision_for: on the CPU,
    'auto' times a forward + backward of the --model preset at this batch size and the middle
    token count in both precisions."""
    model, said = spot.SPoTViT(preset_config(args.model)).to(args.device), []
    middle = args.tokens[len(args.tokens) // 2]
    bf16 = precision_for(model, args.precision, args.batch_size, middle, args.device,
                         said.append)
    if said:
        return bf16, said[0]
    return bf16, f"precision: {'bf16' if bf16 else 'fp32'} (--precision {args.precision})"


# -----------------------------------------------------------------------------
# bf16 or fp32 on this machine, measured

def measured_precision(precision, device, time_step, log=print):
    """The benchmark's --precision -> bf16 (True) or fp32 (False). 'auto' on CUDA: bf16 where
    supported. 'auto' on the CPU is decided by measuring, because CPU flags do not say which is
    faster for this model (train.py's auto takes fp32 on the CPU, for one result per command):
    the same training step ran bf16 2.6x faster than fp32 on one 2-core CPU and 1.5x
    slower on another, both listing avx512_bf16 (and CPUs without native bf16 emulate it, many
    times slower). time_step(bf16, batch_fraction) -> seconds per training step of the actual
    model on that fraction of the batch. bf16 is first tried on 1/8 of the batch: if that alone
    is slower than a whole fp32 step, bf16 cannot win and the full bf16 probe is skipped."""
    if precision != "auto":
        return precision == "bf16"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    fp32, eighth = time_step(False, 1.0), time_step(True, 1 / 8)
    bf16 = time_step(True, 1.0) if eighth <= fp32 else math.inf
    probe = (f"{1e3 * bf16:.0f} ms/step" if bf16 < math.inf   # else not run: cannot win
             else f"{1e3 * eighth:.0f} ms for 1/8 of the batch")
    log(f"precision: {'bf16' if bf16 < fp32 else 'fp32'} (probe: fp32 {1e3 * fp32:.0f} ms/step, "
        f"bf16 {probe})")
    return bf16 < fp32


def precision_for(model, precision, batch_size, n_tokens, device, log=print):
    """measured_precision, probing `model` at this batch size and token count."""
    def time_step(bf16, fraction):
        batch = max(1, round(fraction * batch_size))
        return probe_step_seconds(model, batch, n_tokens, device, bf16)
    return measured_precision(precision, device, time_step, log)


def probe_step_seconds(model, batch_size, n_tokens, device, bf16, steps=3):
    """Median seconds of a forward + backward of `model` on a random batch, after a warm-up.
    Leaves no trace: its own generator, gradients to a list (never .grad), no optimizer step."""
    generator = torch.Generator(device=device).manual_seed(0)
    images = torch.rand(batch_size, model.config.in_chans, *model.config.image_size,
                        generator=generator, device=device)
    positions = torch.rand(batch_size, n_tokens, 2, generator=generator, device=device)
    params = [p for p in model.parameters() if p.requires_grad]
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        with utils.autocast(device, bf16):
            loss = model(images, positions).float().logsumexp(-1).mean()
        torch.autograd.grad(loss, params)
        times.append(time.perf_counter() - start)
    return sorted(times[1:])[len(times[1:]) // 2]


# -----------------------------------------------------------------------------
# Timing: interleaved rounds, medians, paired ratios

def measure(fns, repeats, warmup, sync=lambda: None):
    """fns: {name: callable} -> {name: [seconds per timed round]}, all contenders interleaved;
    the first `warmup` rounds are not kept."""
    names, times = list(fns), {name: [] for name in fns}
    for r in range(warmup + repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:    # rotate the order
            sync()
            start = time.perf_counter()
            fns[name]()
            sync()                                      # wait for the GPU before reading
            if r >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def timed_row(args, fns, vs=None, goal=None, derived=None, **fields):
    """measure(fns) -> a result row {**fields, "times_s", "ms" (medians)}, told on stderr.
    derived=(C, A, B): adds contender C timed as A - B in each round. vs=A: "ratio" = {name: the
    median over rounds of name_r / A_r} for every other contender (paired: both measured in round
    r). goal=(name, x): "goal" says whether that ratio is <= x."""
    times = measure(fns, args.repeats, args.warmup, args.sync)
    if derived:
        times[derived[0]] = [a - b for a, b in zip(times[derived[1]], times[derived[2]])]
    medians = {name: 1e3 * statistics.median(t) for name, t in times.items()}
    row = {**fields, "times_s": times, "ms": medians}
    told = ", ".join(f"{n} {v:.2f} ms" for n, v in medians.items())
    print(f"  {fields}: {told}", file=sys.stderr)
    if vs:
        row["ratio"] = {n: statistics.median(a / b for a, b in zip(t, times[vs]))
                        for n, t in times.items() if n != vs}
    if goal:
        row["goal"] = f"{'met' if row['ratio'][goal[0]] <= goal[1] else 'MISSED'} (<= {goal[1]}x)"
    return row


# -----------------------------------------------------------------------------
# The other side of each comparison: SPoTViT's SPoTConfig built as a standard ViT (GridViT) or
# with torch's fused attention (FusedAttentionViT). Both are subclasses of spot.SPoTViT with the
# same parameter names, so one state_dict fits all three and only the one piece differs.

def patchify(images, window):
    """(B, C, H, W) -> (B, G, C*k*k): the non-overlapping k x k patches, row-major, by reshape.
    Feature order (C, ky, kx) is that of extract_patches(...).flatten(2), so one linear
    embedding serves both. Like a strided convolution, a remainder of H or W is cropped."""
    B, C, H, W = images.shape
    h, w = H // window, W // window
    x = images[:, :, :h * window, :w * window].reshape(B, C, h, window, w, window)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(B, h * w, C * window * window)


class GridViT(spot.SPoTViT):
    """A standard ViT: SPoTViT's blocks, tokens cut by a reshape.

        SPoTViT: bilinear windows at any positions + sin-cos computed from those positions
        GridViT: the G grid patches cut by patchify + the matching rows of a precomputed table;
                 with N < G tokens each image keeps N of its patches (patch dropout, the
                 paper's "patch grid" baseline), picked by `cells` (B, N) indices into the grid.
    """

    def __init__(self, config):
        super().__init__(config)
        centres = spot.grid_positions(config.image_size, config.window)              # (G, 2)
        self.register_buffer("pos_table", self.pos_embed(centres[None])[0], persistent=False)

    def forward(self, images, cells=None):
        normalized = (images - self.image_mean) / self.image_std
        patches = patchify(normalized, self.config.window)                    # (B, G, C*k*k)
        pos = self.pos_table.expand(len(images), -1, -1)                      # (B, G, dim)
        if cells is not None:      # patch dropout: gather BEFORE embedding (cheaper)
            patches = patches.gather(1, cells[..., None].expand(-1, -1, patches.shape[-1]))
            pos = self.pos_table[cells]                                        # (B, N, dim)
        tokens = self.patch_embed(patches)
        cls = self.cls_token.expand(len(tokens), -1, -1)
        x = torch.cat([cls, tokens + pos.to(tokens.dtype)], 1)
        for block in self.blocks:
            x = block(x)
        return self.forward_head(self.norm(x))


class FusedAttention(spot.Attention):
    """spot.Attention calling torch's fused kernel where spot.Attention calls spot.attention.
    A model of its own, rather than reassigning spot.attention while timing, so that no other
    model in the process changes behind its back."""

    def forward(self, x):                                                    # (B, T, D)
        B, T, D = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.heads, D // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)                                 # (B, h, T, D/h) each
        x = F.scaled_dot_product_attention(q, k, v)                          # (B, h, T, D/h)
        return self.proj(x.transpose(1, 2).reshape(B, T, D))


class FusedAttentionViT(spot.SPoTViT):
    def __init__(self, config):
        super().__init__(config)
        for block in self.blocks:
            block.attn = FusedAttention(config.dim, config.heads)


VARIANTS = {"spot": spot.SPoTViT, "grid": GridViT, "fused": FusedAttentionViT}


def build_models(config, device, kinds, lr=1e-3):
    """One SPoTConfig built as each of `kinds` (names in VARIANTS), all with the same weights,
    each with an AdamW made as train.py makes it -> ({kind: model}, {kind: optimizer})."""
    torch.manual_seed(0)
    weights = spot.SPoTViT(config).state_dict()
    models = {kind: VARIANTS[kind](config) for kind in kinds}
    for model in models.values():
        model.load_state_dict(weights)                          # strict: the same parameters
        model.to(device)
    fused = device.type == "cuda" or None
    optimizers = {kind: torch.optim.AdamW(train.param_groups(model, 0.05), lr=lr, fused=fused)
                  for kind, model in models.items()}
    return models, optimizers


def step_jobs(args, kinds, n_tokens, bf16):
    """The --model preset built as each of `kinds`, and a random batch: images and labels, N uniform
    subpixel positions (SPoT) and N random grid cells per image (GridViT, like the "grid" prior),
    drawn outside the timed region -> {kind: one training step}, {"search": steps -> one search}."""
    config, g, B = preset_config(args.model), torch.Generator().manual_seed(0), args.batch_size
    models, optimizers = build_models(config, args.device, kinds, train.PRESETS[args.model]["lr"])
    images = torch.rand(B, config.in_chans, *config.image_size, generator=g).to(args.device)
    labels = torch.randint(0, config.num_classes, (B,), generator=g).to(args.device)
    positions = spot.sample_positions("uniform", B, n_tokens, config.image_size, config.window, g)
    positions = positions.to(args.device)
    cells = torch.rand(B, args.n_grid, generator=g).argsort(1)[:, :n_tokens]   # N cells per image
    cells = cells.to(args.device)
    where = {"grid": None if n_tokens == args.n_grid else cells,
             "spot": positions, "fused": positions}

    def step(kind):                  # one optimizer step as train.py takes it (no scheduler)
        with utils.autocast(args.device, bf16):
            logits = models[kind](images, where[kind]).float()
            loss = F.cross_entropy(logits, labels, label_smoothing=0.1)
        optimizers[kind].zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(models[kind].parameters(), 1.0)
        optimizers[kind].step()

    def search(steps):               # SPoT-ON in the same precision as training
        with utils.autocast(args.device, bf16):
            oracle.oracle_search(models["spot"], images, labels, where["spot"], steps=steps)
    return {kind: (lambda kind=kind: step(kind)) for kind in kinds}, search


# -----------------------------------------------------------------------------
# The sections (each -> a list of result rows)

def bench_tokenizer(args):
    """1. Tokenizer forward + backward: spot.extract_patches and extract_patches_reference + a
    linear C*k*k -> 192, vs patchify + the same linear; (x) = time / patchify's time.

    Every grid cell, each centre moved by +0.3 px down and right (each sample a real 70/30
    blend), embedded, then the backward pass: autograd.grad (not .backward()) so that nothing
    accumulates into .grad between calls. The baseline never has a position gradient (there
    are no positions to move), so in the "with" rows it does the same work as in the "without"
    rows: the ratio is the price of moving."""
    rows, device = [], args.device
    for size, window, batch in (QUICK_TOKENIZER_CONFIGS if args.quick else TOKENIZER_CONFIGS):
        torch.manual_seed(0)
        images = torch.rand(batch, 3, size, size, device=device)                 # no grad, ever
        embed = torch.nn.Linear(3 * window * window, EMBED_DIM).to(device)
        centres = spot.grid_positions(size, window).to(device)                   # (G, 2)
        for pos_grad, goal in ((False, GOALS["tokenizer"]), (True, GOALS["tokenizer_pos_grad"])):
            shifted = (centres + SUBPIXEL_SHIFT / size).expand(batch, -1, -1)     # (B, G, 2)
            positions = shifted.clone().requires_grad_(pos_grad)
            reads = {"patchify": lambda: patchify(images, window)}    # each -> (B, G, C*k*k)
            for name, sample in SAMPLERS.items():
                reads[name] = lambda s=sample, p=positions: s(images, p, window).flatten(2)

            def run(name, pos_grad=pos_grad, positions=positions):
                with utils.autocast(device, args.bf16):
                    tokens = embed(reads[name]())                                      # (B, G, 192)
                wrt = list(embed.parameters()) + [positions] * (pos_grad and name != "patchify")
                torch.autograd.grad(tokens.sum(), wrt)   # upstream gradient: all ones, for everyone
            fns = {n: (lambda n=n: run(n)) for n in reads}
            rows.append(timed_row(args, fns, "patchify", ("extract_patches", goal),
                                  image_size=size, window=window, batch=batch,
                                  tokens=len(centres), pos_grad=pos_grad))
    return rows


def bench_train(args):
    """2. Training step (forward, backward, clip, AdamW): SPoTViT at N subpixel tokens vs GridViT
    at N grid patches; (x) = time / GridViT's time."""
    rows = []
    for n in args.tokens:
        steps = step_jobs(args, ("grid", "spot"), n, args.bf16)[0]
        rows.append(timed_row(args, steps, "grid", ("spot", GOALS["train"]),
                              tokens=n, batch=args.batch_size))
    return rows


def bench_oracle(args):
    """3. Oracle step (forward, backward to the positions, Adam) vs a training step, same batch;
    (x) = time / the training step's.

    oracle_search(steps=1) = one search step + one final scoring forward (no grad), so the step
    alone is oracle_step = t(steps=1) - t(steps=0), both timed in the same round as the training
    step; its ratio is the one held to the goal."""
    rows = []
    for n in args.tokens:
        steps, search = step_jobs(args, ("spot",), n, args.bf16)
        fns = {"train": steps["spot"], "search1": lambda: search(1), "search0": lambda: search(0)}
        rows.append(timed_row(args, fns, "train", ("oracle_step", GOALS["oracle"]),
                              ("oracle_step", "search1", "search0"),
                              tokens=n, batch=args.batch_size))
    return rows


def bench_attention(args):
    """5. Training step with spot.attention vs torch's fused attention, at the full grid;
    (x) = time / spot.attention's time.

    The same weights and batch, stepped as SPoTViT and as FusedAttentionViT. Both precisions are
    measured whatever --precision says: the fused kernel's slow CPU backward shows in bf16."""
    rows = []
    for bf16 in (False, True):
        steps = step_jobs(args, ("fused", "spot"), args.n_grid, bf16)[0]
        rows.append(timed_row(args, steps, "spot", tokens=args.n_grid, batch=args.batch_size,
                              precision="bf16" if bf16 else "fp32"))
    return rows


# -----------------------------------------------------------------------------
# 4. Peak memory, one fresh process per configuration

def rss_kb(field):
    """VmRSS (resident now) or VmHWM (peak resident, 'high water mark') of this process, in kB."""
    status = Path("/proc/self/status").read_text().splitlines()
    return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def memory_child(kind, n_tokens, settings):
    """Runs in a fresh process: peak memory of 2 steps of `kind` (grid / spot / oracle).

    CPU: the peak RSS of a process never goes down, and freed memory may stay resident in the
    allocator, so one process measures one configuration. The baseline is the RSS once model,
    optimizer and batch exist; writing "5" to /proc/self/clear_refs resets the peak to it (Linux
    >= 4.0), and the delta is what the steps themselves add: activations, gradients, AdamW state.
    CUDA: the same with memory_allocated / reset_peak_memory_stats / max_memory_allocated (the
    caching allocator counts as kernels are queued: no synchronize needed)."""
    args, cuda, reset = argparse.Namespace(**settings), settings["device"].type == "cuda", True
    torch.set_num_threads(args.threads)
    kinds = ("spot",) if kind == "oracle" else (kind,)
    steps, search = step_jobs(args, kinds, n_tokens, args.bf16)
    try:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        else:
            Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        reset = False         # then the peak also covers the set-up (imports, model)
    base = torch.cuda.memory_allocated() if cuda else 1024 * rss_kb("VmRSS")
    for _ in range(2):
        if kind == "oracle":
            search(1)
        else:
            steps[kind]()
    peak = torch.cuda.max_memory_allocated() if cuda else 1024 * rss_kb("VmHWM")
    return {"kind": kind, "tokens": n_tokens, "base_mb": base / 2**20, "peak_mb": peak / 2**20,
            "delta_mb": (peak - base) / 2**20, "peak_reset": reset}


def bench_memory(args):
    """4. Peak memory of 2 steps, MB: torch.cuda.max_memory_allocated on CUDA, else the peak
    resident set size of a fresh process per row.

    memory_child in a fresh ("spawn") process per (kind, N), with the fixed mmap threshold (see
    "CPU memory" in the module docstring): glibc reads it as a process starts, so only the
    probes see it."""
    settings = {k: getattr(args, k) for k in ("model", "device", "batch_size", "bf16", "n_grid")}
    rows = []
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    for kind, n in ((kind, n) for kind in ("grid", "spot", "oracle") for n in args.tokens):
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            child_settings = {**settings, "threads": torch.get_num_threads()}
            rows.append(pool.apply(memory_child, (kind, n, child_settings)))
        print(f"  memory {kind} N={n}: peak {rows[-1]['peak_mb']:.0f} MB", file=sys.stderr)
    del os.environ["MALLOC_MMAP_THRESHOLD_"]
    return rows


# -----------------------------------------------------------------------------
# oracle-sweep: choosing oracle.py's defaults on a trained model

@dataclass(frozen=True)
class SweepConfig:
    """The grid oracle-sweep searches, and how: start prior, batch, seed, device, a tqdm bar."""
    steps_grid: tuple = SWEEP_STEPS
    lr_grid: tuple = SWEEP_LRS
    objectives: tuple = oracle.OBJECTIVES
    prior: str = "isotropic"
    batch_size: int = 128
    seed: int = 0
    device: str = "cpu"
    progress: bool = True


def sweep(model, images_uint8, labels, budgets, config=SweepConfig()):
    """Top-1 accuracy and mean objective for every (objective, budget, lr, steps) of config's
    grid -> list of dicts.

    One search of max(steps_grid) steps per (objective, budget, lr) is enough: the hand-written
    Adam has no schedule, so the first s steps of a long search ARE an s-step search, and
    trajectory[s] gives its positions. steps = 0 (the prior itself) is included as the baseline.
    """
    window, results = model.config.window, []
    checkpoints = sorted({0, *config.steps_grid})
    jobs = [(o, tokens, lr)
            for o in config.objectives for tokens in budgets for lr in config.lr_grid]
    bar = tqdm(jobs, desc="sweep", disable=not config.progress, dynamic_ncols=True)
    device, batch_size, prior = config.device, config.batch_size, config.prior
    for objective, tokens, lr in bar:
        seed = train.seed_for(config.seed, prior, tokens, "sweep")
        start = train.draw_positions(prior, images_uint8, tokens, window, seed, device)
        found = []
        for i in range(0, len(labels), batch_size):
            batch = slice(i, i + batch_size)
            images = images_uint8[batch].to(device).float() / 255
            y = labels[batch].to(device) if objective == "label" else None
            found.append(oracle.oracle_search(model, images, y, start[batch].to(device),
                                              steps=max(config.steps_grid), lr=lr,
                                              objective=objective))
        trajectory = torch.cat([f.trajectory[checkpoints].cpu() for f in found], 1)  # (S, n, N, 2)
        losses = torch.cat([f.losses[checkpoints].cpu() for f in found], 1)          # (S, n)
        for i, s in enumerate(checkpoints):
            logits = train.predict(model, images_uint8, trajectory[i], device, batch_size)[0]
            hits = logits.argmax(1) == labels
            results.append({"objective": objective, "tokens": tokens, "lr": lr, "steps": s,
                            "top1": 100.0 * hits.float().mean().item(),
                            "loss": losses[i].mean().item()})
    return results


def sweep_markdown(results, budgets, settings):
    """-> (markdown tables, {objective: {steps, lr, mean_top1}} of the best searching cell).
    settings: needs checkpoint, n_images, split, dataset, search_from."""
    lines = [f"# SPoT-ON (steps, lr) sweep: {settings['checkpoint']}", "",
             f"First {settings['n_images']} *{settings['split']}* images of "
             f"{settings['dataset']} (the test split is never used to choose the defaults); "
             f"start prior {settings['search_from']}. "
             "Cell = top-1 % (mean objective). steps = 0 is the prior itself.", ""]
    best, cell = {}, {(r["objective"], r["lr"], r["steps"], r["tokens"]): r for r in results}
    lrs = sorted({r["lr"] for r in results})
    steps_grid = sorted({r["steps"] for r in results} - {0})
    columns = " | ".join(f"{b} T" for b in budgets)
    for objective in dict.fromkeys(r["objective"] for r in results):
        lines += [f"## objective = {objective}", "",
                  f"| lr | steps | {columns} | mean top-1 |",
                  "|---|---|" + "---|" * (len(budgets) + 1)]
        # the prior (steps 0) is the same for every lr: shown once, first
        for lr, steps in [(lrs[0], 0)] + [(lr, steps) for lr in lrs for steps in steps_grid]:
            row = [cell[objective, lr, steps, b] for b in budgets]
            mean = sum(c["top1"] for c in row) / len(row)
            if steps and mean > best.get(objective, {"mean_top1": -1})["mean_top1"]:
                best[objective] = {"steps": steps, "lr": lr, "mean_top1": mean}
            cells = " | ".join(f"{c['top1']:.1f} ({c['loss']:.3f})" for c in row)
            lines.append(f"| {lr if steps else '-'} | {steps} | {cells} | {mean:.2f} |")
        lines.append("")
    lines += [f"Best for {o}: steps={b['steps']}, lr={b['lr']} "
              f"(mean top-1 {b['mean_top1']:.2f} %)." for o, b in best.items()]
    return "\n".join(lines) + "\n", best


def bench_oracle_sweep(args):
    """SPoT-ON's top-1 over a (steps, lr) grid on --checkpoint (its own markdown: sweep_markdown).

    The first --limit validation images, or training images if the run held none out."""
    model, dataset, _ = args.loaded
    if dataset.val is not None:                                       # held out if any
        split, images = "val", dataset.val
    else:
        split, images = "train", dataset.train
    settings = {**args.settings, "n_images": min(args.limit, len(images.labels)), "split": split}
    config = SweepConfig(prior=args.search_from, batch_size=args.batch_size, device=args.device)
    results = sweep(model, images.images[:args.limit], images.labels[:args.limit], args.tokens,
                    config)
    text, best = sweep_markdown(results, args.tokens, settings)
    report = {"settings": settings, "results": results, "best": best}
    utils.write_atomic(Path(args.out) / "sweep.json", json.dumps(report, indent=2))
    utils.write_atomic(Path(args.out) / "sweep.md", text)
    return {**report, "markdown": text}


# -----------------------------------------------------------------------------
# data-scale: the data path at scale. train.py and oracle.py run as subprocesses on synthetic
# ImageNet-style folders of N training images; for each command: the peak proportional set size
# of the process and all its descendants, wall time, and the bytes it wrote to the decode cache
# and to its --out. Not a section of --only: it runs another checkout's scripts (--repo).

DATA_SCALE_SIZES = "2000,8000"          # default --sizes: training images
DATA_SCALE_VAL = 500                     # validation images, whatever the size
DATA_SCALE_CLASSES = 10
DATA_SCALE_SEED = 0
DATA_SCALE_ROOT = Path(tempfile.gettempdir()) / "spot-bench-data"   # default --data-root
DATA_SCALE_WIDTHS, DATA_SCALE_HEIGHTS = (300, 460), (250, 420)      # pixels, inclusive
SAMPLE_EVERY_S = 0.1
# Fastest oracle.py flags that still run every stage (a prior, SPoT-ON, the table); each is
# passed only where the --repo's oracle.py has it (its --help says).
ORACLE_FAST_FLAGS = (("--tokens", "4"), ("--priors", "grid"), ("--draws", "1"),
                     ("--search-steps", "1"), ("--saliency-limit", "0"), ("--no-progress",))


def pss_bytes(pid):
    """The proportional set size of one process, bytes (/proc/PID/smaps_rollup, Linux >= 4.14):
    each resident page divided by the number of processes that map it, so a forked decode
    worker's pages shared with its parent count once over the two (summed RSS would count them
    twice). 0 when the process is gone, a zombie or unreadable."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return 1024 * int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def process_tree(pid):
    """[pid, and every living descendant of it: children, grandchildren, ...], from the parent
    ids in /proc/*/stat (a descendant whose parent died is re-parented and no longer found)."""
    children = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/stat") as f:
                    stat = f.read()
                ppid = int(stat[stat.rindex(")") + 2:].split()[1])   # "pid (comm) S ppid ..."
            except (OSError, ValueError, IndexError):
                continue                                             # exited meanwhile
            children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo += children.get(tree[-1], [])
    return tree


def tree_pss_bytes(pid):
    """pss_bytes summed over process_tree(pid): the process and all its descendants."""
    return sum(pss_bytes(p) for p in process_tree(pid))


def run_sampled(command, cwd=None, env=None, log=None, every=SAMPLE_EVERY_S):
    """Runs `command` (a list) to its end, summing tree_pss_bytes every `every` seconds ->
    {"returncode", "wall_s", "peak_pss_bytes", "samples"}. stdout and stderr go to the file
    `log` (else are dropped). A peak between two samples is missed: the peak is a lower bound.
    The command runs in a session of its own, whose processes are killed if this one is
    interrupted."""
    with open(log or os.devnull, "wb") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        peak, samples = 0, 0
        try:
            while True:
                peak, samples = max(peak, tree_pss_bytes(proc.pid)), samples + 1
                try:
                    proc.wait(timeout=every)
                    break
                except subprocess.TimeoutExpired:
                    pass
        except BaseException:
            os.killpg(proc.pid, 9)              # the session started above, and nothing else
            proc.wait()
            raise
    return {"returncode": proc.returncode, "wall_s": time.perf_counter() - start,
            "peak_pss_bytes": peak, "samples": samples}


def disk_bytes(path):
    """Bytes of the files under `path` (their sizes; symbolic links not followed); 0 if absent."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def synthetic_jpeg(path, rng):
    """A JPEG of random size (300-460 wide, 250-420 high) whose content is smooth random colour:
    a random 2x2 to 5x5 RGB grid upsampled bilinearly."""
    from PIL import Image         # imported here: only this mode needs it
    width, height = (int(rng.integers(lo, hi + 1)) for lo, hi in (DATA_SCALE_WIDTHS,
                                                                   DATA_SCALE_HEIGHTS))
    grid = rng.integers(0, 256, (int(rng.integers(2, 6)), int(rng.integers(2, 6)), 3))
    image = Image.fromarray(grid.astype("uint8"), "RGB").resize((width, height), Image.BILINEAR)
    image.save(path, quality=90)


def folder_dataset(n_train, root=DATA_SCALE_ROOT, n_val=DATA_SCALE_VAL,
                   classes=DATA_SCALE_CLASSES, seed=DATA_SCALE_SEED):
    """ROOT/train{n}-val{v}-c{classes}-seed{s}/{train,val}/c00..c09/*.jpg, made once -> (folder,
    made now?). Image i of a split is class i % classes, drawn from its own generator (seed,
    split, i): a smaller dataset is the first images of a larger one. Written into a .partial
    folder and renamed when complete, so an interrupted one is made again, not reused."""
    import numpy as np
    folder = Path(root) / f"train{n_train}-val{n_val}-c{classes}-seed{seed}"
    if folder.is_dir():
        return folder, False
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    for split_index, (split, n) in enumerate((("train", n_train), ("val", n_val))):
        for c in range(classes):
            (partial / split / f"c{c:02d}").mkdir(parents=True)
        for i in range(n):
            rng = np.random.default_rng([seed, split_index, i])
            synthetic_jpeg(partial / split / f"c{i % classes:02d}" / f"{split}{i:06d}.jpg", rng)
    partial.rename(folder)
    return folder, True


def script_flags(repo, script):
    """The --flags that `python SCRIPT --help` lists in `repo` (empty if it fails)."""
    help_text = subprocess.run([sys.executable, script, "--help"], cwd=repo, text=True,
                               capture_output=True).stdout
    return set(re.findall(r"--[a-z][a-z0-9-]*", help_text))


def data_scale_commands(dataset, out, train_flags, oracle_flags):
    """The two commands of one size: [(name, argv)], run in the --repo."""
    train_cmd = [sys.executable, "train.py", "--dataset", "folder", "--data-dir", str(dataset),
                 "--preset", "imagenet-retrofit", "--init-from", "tests/fixtures/vit_224.pt",
                 "--heads", "3", "--epochs", "1", "--out", str(out),
                 *(["--no-progress"] if "--no-progress" in train_flags else []),
                 "--device", "cpu"]
    oracle_cmd = [sys.executable, "oracle.py", "--checkpoint", f"{out}/checkpoint.pt",
                  "--limit", "50", "--knn-limit", "0", "--out", f"{out}/oracle",
                  "--device", "cpu"]
    oracle_cmd += [word for flag in ORACLE_FAST_FLAGS if flag[0] in oracle_flags for word in flag]
    return [("train", train_cmd), ("oracle", oracle_cmd)]


def shown(argv, env):
    """argv as a shell command, `python` for this interpreter, the cache variable in front."""
    words = ["python" if w == sys.executable else w for w in argv]
    return f"SPOT_CACHE={env['SPOT_CACHE']} {shlex.join(words)}"


def git_state(repo):
    """'COMMIT' or 'COMMIT + uncommitted changes' of the checkout `repo` (None: not git)."""
    def git(*words):
        return subprocess.run(["git", "-C", str(repo), *words], text=True,
                              capture_output=True).stdout.strip()
    commit = git("rev-parse", "HEAD")
    return commit and commit + (" + uncommitted changes" if git("status", "--porcelain") else "")


def bench_data_scale(args):
    """The data path at scale: train.py and oracle.py on N training images, as subprocesses;
    peak PSS (process + descendants), wall time, bytes written to the decode cache and --out.

    For each --sizes N: a synthetic folder dataset (folder_dataset, reused), then train.py
    (imagenet-retrofit from tests/fixtures/vit_224.pt, 1 epoch) and oracle.py on its
    checkpoint (50 test images, the fastest flags), each with SPOT_CACHE a fresh empty folder
    (--oracle-cache shared: oracle.py gets train.py's), so "cache" is what that command wrote."""
    repo, rows, commands = Path(args.repo).resolve(), [], []
    train_flags, oracle_flags = script_flags(repo, "train.py"), script_flags(repo, "oracle.py")
    for n in args.sizes:
        dataset, made = folder_dataset(n, args.data_root)
        print(f"  data-scale N={n}: {'made' if made else 'reusing'} {dataset}", file=sys.stderr)
        work = Path(tempfile.mkdtemp(prefix=f"spot-data-scale-{n}-"))
        out = work / "run"
        try:
            for name, argv in data_scale_commands(dataset, out, train_flags, oracle_flags):
                cache = work / ("cache" if args.oracle_cache == "shared" else f"cache-{name}")
                cache.mkdir(exist_ok=True)
                env = {**os.environ, "SPOT_CACHE": str(cache), "PYTHONUNBUFFERED": "1"}
                commands.append(shown(argv, env))
                print(f"  $ (cd {repo} && {commands[-1]})", file=sys.stderr)
                written_out = out / "oracle" if name == "oracle" else out
                cache_before = disk_bytes(cache)
                result = run_sampled(argv, repo, env, work / f"{name}.log")
                row = {"train_images": n, "command": name,
                       "peak_pss_mb": result["peak_pss_bytes"] / 2**20,
                       "wall_s": result["wall_s"],
                       "cache_bytes": disk_bytes(cache) - cache_before,
                       "out_bytes": disk_bytes(written_out), "exit": result["returncode"],
                       "samples": result["samples"], "command_line": commands[-1],
                       "load_average": round(os.getloadavg()[0], 2)}
                rows.append(row)
                print(f"  data-scale N={n} {name}: peak PSS {row['peak_pss_mb']:.0f} MB, "
                      f"{row['wall_s']:.1f} s, cache {row['cache_bytes'] / 2**20:.1f} MB, "
                      f"exit {row['exit']}", file=sys.stderr)
                if result["returncode"]:
                    tail = (work / f"{name}.log").read_text(errors="replace")[-3000:]
                    row["error"] = tail
                    print(f"  {name} failed (exit {result['returncode']}); its output ends:\n"
                          f"{tail}", file=sys.stderr)
                    break                   # the oracle needs the checkpoint
        finally:
            if args.keep:
                print(f"  kept {work}", file=sys.stderr)
            else:
                shutil.rmtree(work, ignore_errors=True)
    return rows


def growth(rows, field, name):
    """{field}'s growth in % of command `name` from the smallest to the largest size (None when
    either did not run or the first is 0)."""
    ran = sorted((r["train_images"], r[field]) for r in rows
                 if r["command"] == name and not r["exit"])
    if len(ran) < 2 or not ran[0][1]:
        return None
    return 100 * (ran[-1][1] / ran[0][1] - 1)


def data_scale_markdown(rows, settings):
    """The report of --data-scale: header (machine, repo, commands), a row per (size, command),
    the growth from the smallest size to the largest."""
    s = settings
    lines = [f"# SPoT data path at scale: {s['cpu']}, {s['threads']} core(s), torch "
             f"{s['torch']}, {s['date']}", "",
             f"`{s['command']}` on `{s['repo']}` ({s['repo_commit']}). Synthetic folders of "
             f"{s['classes']} classes (JPEGs {s['jpeg_size']}, {s['val_images']} val images) in "
             f"{s['data_root']}; peak PSS = the largest sum over the process and all its "
             f"descendants, sampled every {s['sample_every_s']} s; cache = bytes the command "
             f"wrote under SPOT_CACHE ({s['oracle_cache']} for oracle.py); out = its --out; "
             f"load = the machine's 1-minute load average as it ended (well above "
             f"{s['threads']}: other programs shared the CPU, and the wall time is theirs too).",
             "", "| train images | command | peak PSS MB | vs smallest | wall s | cache MB "
             "| out MB | load | exit |", "|---|---|---|---|---|---|---|---|---|"]
    first = {}
    for r in rows:
        base = first.setdefault(r["command"], r["peak_pss_mb"])
        versus = f"{100 * (r['peak_pss_mb'] / base - 1):+.0f} %" if base else "-"
        lines.append(f"| {r['train_images']} | {r['command']} | {r['peak_pss_mb']:.0f} | "
                     f"{versus} | {r['wall_s']:.1f} | {r['cache_bytes'] / 2**20:.1f} | "
                     f"{r['out_bytes'] / 2**20:.2f} | {r.get('load_average', '-')} | "
                     f"{r['exit']} |")
    sizes = sorted({r["train_images"] for r in rows})
    if len(sizes) > 1:
        lines += ["", f"Growth from {sizes[0]} to {sizes[-1]} training images "
                  f"({sizes[-1] / sizes[0]:.1f}x):"]
    for name in dict.fromkeys(r["command"] for r in rows if len(sizes) > 1):
        said = [f"{what} {g:+.0f} %" for field, what in (("peak_pss_mb", "peak PSS"),
                                                         ("wall_s", "wall"),
                                                         ("cache_bytes", "cache bytes"))
                if (g := growth(rows, field, name)) is not None]
        if not any(r["cache_bytes"] for r in rows if r["command"] == name):
            said.append("nothing written to the cache")
        lines.append(f"- {name}: {', '.join(said) or 'n/a (a size failed or wrote nothing)'}")
    failed = [f"{r['command']} at {r['train_images']} (exit {r['exit']})" for r in rows
              if r["exit"]]
    if failed:
        lines += ["", "FAILED: " + "; ".join(failed) + " (the JSON keeps the end of the output)"]
    lines += ["", "Commands, run in the repo:", ""]
    lines += [f"    {r['command_line']}" for r in rows]
    return "\n".join(lines) + "\n"


def bench_loader(dataset, n_images=512, batch_size=64):
    """data.batches' decoding speed at 224 px with random-resized crops (imagenet-retrofit's
    crop_pct), by number of worker processes: images/s and images/s per worker over the first
    n_images of the synthetic folder's train split. This process only waits (as a GPU would)."""
    loaded = data.load_dataset("folder", dataset, 224, crop_pct=0.875, progress=False)
    rows = torch.arange(n_images).view(-1, batch_size)           # (steps, B) image indices
    results = []
    for workers in sorted({1, 2, os.cpu_count() or 1}):
        procs = types.SimpleNamespace(device=torch.device("cpu"), workers=workers)
        start = time.perf_counter()
        waited = sum(wait for _, _, wait in data.batches(loaded.train, rows, 0, procs))
        seconds = time.perf_counter() - start
        results.append(dict(workers=workers, images=n_images, seconds=round(seconds, 2),
                            img_per_s=round(n_images / seconds, 1),
                            img_per_s_per_worker=round(n_images / seconds / workers, 1),
                            waited_s=round(waited, 2)))
    return results


def loader_markdown(rows):
    lines = ["", "The loader alone (data.batches, 224 px, random-resized crops, batches of 64):",
             "", "| workers | images/s | per worker |", "|---|---|---|"]
    lines += [f"| {r['workers']} | {r['img_per_s']} | {r['img_per_s_per_worker']} |"
              for r in rows]
    return lines


def data_scale_main(args):
    """--data-scale: bench_data_scale, its markdown on stdout, and --json."""
    settings = dict(date=time.strftime("%Y-%m-%dT%H:%M:%S"), torch=torch.__version__,
                    cpu=utils.cpu_name(), threads=os.cpu_count(), python=sys.version.split()[0],
                    repo=str(Path(args.repo).resolve()), repo_commit=git_state(args.repo),
                    sizes=args.sizes, val_images=DATA_SCALE_VAL, classes=DATA_SCALE_CLASSES,
                    jpeg_size=f"{DATA_SCALE_WIDTHS[0]}-{DATA_SCALE_WIDTHS[1]} x "
                              f"{DATA_SCALE_HEIGHTS[0]}-{DATA_SCALE_HEIGHTS[1]} px",
                    data_root=str(args.data_root), sample_every_s=SAMPLE_EVERY_S,
                    oracle_cache=args.oracle_cache,
                    command=" ".join(["python -m experiments.bench", *sys.argv[1:]]))
    print("[data-scale]", file=sys.stderr)
    rows = bench_data_scale(args)
    settings["load_average"] = {"data-scale": round(os.getloadavg()[0], 2)}
    print("[loader]", file=sys.stderr)
    loader = bench_loader(folder_dataset(int(args.sizes[0]), args.data_root)[0])
    text = data_scale_markdown(rows, settings) + "\n".join(loader_markdown(loader)) + "\n"
    print(text)
    if args.json:
        report = dict(settings=settings, results={"data-scale": rows, "loader": loader},
                      markdown=text)
        utils.write_atomic(args.json, json.dumps(report, indent=1))
    return 1 if any(r["exit"] for r in rows) else 0


# -----------------------------------------------------------------------------
# Report

def rows_table(rows):
    """Result rows -> markdown lines: a column per plain field, per median ("NAME ms") and per
    ratio ("NAME (x)"); the per-round times stay in the JSON."""
    flat = []
    for r in rows:
        row = {k: v for k, v in r.items() if k not in ("times_s", "ms", "ratio", "goal")}
        row |= {f"{k} ms": v for k, v in r.get("ms", {}).items()}
        row |= {f"{k} (x)": v for k, v in r.get("ratio", {}).items()}
        row |= {"goal": r["goal"]} if "goal" in r else {}
        flat.append(row)

    def text(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)
    return (["| " + " | ".join(flat[0]) + " |", "|" + "---|" * len(flat[0])]
            + ["| " + " | ".join(map(text, row.values())) + " |" for row in flat] + [""])


def markdown(results, settings):
    """The report: a header naming the machine, sizes and command, then a table per section,
    titled by the first paragraph of its function's docstring (oracle-sweep: its own tables)."""
    s = settings
    m = ", ".join(f"{k} {v}" for k, v in s["model"].items() if k not in ("image_mean", "image_std"))
    lines = [f"# SPoT benchmark: {s['device_name']}, {s['threads']} thread(s), "
             f"torch {s['torch']}, {s['date']}", "",
             f"`{s['command']}`: medians of {s['repeats']} interleaved rounds after {s['warmup']} "
             f"warm-up rounds; ratios are medians of per-round ratios. CPU: {s['cpu']}. Model {m}, "
             f"batch {s['batch_size']}, precision of sections 1-4: {s['precision']}. 1-minute load "
             f"average after each section: {s['load_average']}.", ""]
    for name, result in results.items():
        if name == "oracle-sweep":           # its own markdown, one heading level down
            lines.append("#" + result["markdown"].replace("\n#", "\n##"))
        else:
            title = " ".join(SECTIONS[name].__doc__.split("\n\n")[0].split())
            lines += ["## " + title, ""] + rows_table(result)
    return "\n".join(lines)


def run_settings(args, decided):
    """Everything a reader needs to judge the numbers: machine, versions, sizes, the command."""
    config, loaded = preset_config(args.model), args.loaded or (None, None, {})
    # model: what the timing sections build (--model's preset); checkpoint_model: what
    # oracle-sweep searches with (--checkpoint's own model), when there is one.
    checkpoint_model = None if loaded[0] is None else vars(loaded[0].config)
    cuda = args.device.type == "cuda"
    flags = ("repeats", "warmup", "quick", "batch_size", "tokens", "checkpoint", "limit",
             "search_from")
    return dict(date=time.strftime("%Y-%m-%dT%H:%M:%S"), torch=torch.__version__,
                device=args.device.type,
                device_name=torch.cuda.get_device_name() if cuda else utils.cpu_name(),
                cpu=utils.cpu_name(), threads=torch.get_num_threads(),
                precision=decided.split()[1], precision_choice=decided, goals=GOALS,
                load_average={}, model={"preset": args.model, **vars(config)},
                checkpoint_model=checkpoint_model,
                **{k: getattr(args, k) for k in flags},
                command=" ".join(["python -m experiments.bench", *sys.argv[1:]]),
                dataset=getattr(loaded[1], "name", None),
                data_dir=args.data_dir or loaded[2].get("data_dir"))


# The sections, in the order they run; the first four run in the --precision chosen.
SECTIONS = {"tokenizer": bench_tokenizer, "train": bench_train, "oracle": bench_oracle,
            "memory": bench_memory, "attention": bench_attention,
            "oracle-sweep": bench_oracle_sweep}


def main(argv=None):
    """The sections of --only, in order; each reads what it needs from args, which also carries
    the run's sync(), bf16, the loaded checkpoint (model, dataset, train args) and settings."""
    args = parse_args(argv)
    if args.data_scale:                         # subprocesses, not sections of this process
        return data_scale_main(args)
    torch.set_num_threads(args.threads or torch.get_num_threads())     # --threads, else all cores
    torch.set_flush_denormal(True)       # as train.py: denormal Adam moments are slow on x86
    args.sync = torch.cuda.synchronize if args.device.type == "cuda" else (lambda: None)
    try:                         # first: a bad file or missing data stops before any timing
        args.loaded = args.checkpoint and data.load_model_and_data(
            args.checkpoint, args.device, data_dir=args.data_dir, progress=True)
    except (ValueError, data.DataError) as error:
        print(f"experiments.bench: error: {error}", file=sys.stderr)
        return 2
    if set(args.only) & set(list(SECTIONS)[:4]):          # the sections run in --precision
        args.bf16, decided = choose_bf16(args)
    else:
        args.bf16, decided = False, "precision: fp32"
    print(decided, file=sys.stderr)
    settings = args.settings = run_settings(args, decided)
    results = {}
    for name in (name for name in SECTIONS if name in args.only):
        print(f"[{name}]", file=sys.stderr)
        results[name] = SECTIONS[name](args)
        settings["load_average"][name] = round(os.getloadavg()[0], 2)
    text = markdown(results, settings)
    print(text)
    if args.json:
        report = dict(settings=settings, results=results, markdown=text)
        utils.write_atomic(args.json, json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
