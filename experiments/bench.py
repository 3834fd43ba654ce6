"""
bench.py -- what does subpixel tokenization cost? A benchmark: it prints numbers, asserts none.

PAPER §2 replaces the patch grid by bilinear windows at continuous positions and §4 moves those
positions by gradient descent. That is only attractive if it costs little next to a standard
ViT, so every number below is measured side by side with the standard-ViT equivalent:

  1. tokenizer    spot.extract_patches (F.grid_sample) and spot.extract_patches_reference (the
                  same bilinear reading written out by hand), each + a linear embedding
                  C*k*k -> 192,  vs  reshape patchify + the same linear; forward + backward, at
                  every grid cell shifted by +0.3 px (genuinely subpixel), with and without
                  gradients to the positions (images never need one).
                                                goals: <= 1.25x without, <= 2x with position grads
  2. train step   SPoTViT at N subpixel tokens vs GridViT reading N grid patches (below: the same
                  SPoTConfig and weights, only the tokenizer differs); forward, backward, grad
                  clip and AdamW exactly as in train.py.                       goal: <= 1.1x
  3. oracle step  one step of oracle.oracle_search (forward, backward to the positions, Adam)
                  vs one training step on the same batch.                      goal: <= 1.2x
  4. memory       peak memory of one training step (and one oracle step): CUDA max_memory_allocated;
                  CPU peak resident set size (VmHWM), every configuration in a fresh subprocess
  5. attention    a whole training step at the full grid of SPoTViT (spot.attention: on the CPU
                  the formula written out) vs FusedAttentionViT (below: the same model calling
                  torch's fused F.scaled_dot_product_attention), in fp32 and in bf16 autocast.
                  Not a goal: it is why spot.attention exists.

Two more sections read a model trained by train.py (--checkpoint) and are run only on request:

  oracle-sweep    SPoT-ON's top-1 over a (steps, lr) grid on the first --limit VALIDATION images
                  (train.py's --val-size; training images if the run held none out; the test
                  split never chooses a default): how oracle.DEFAULT_STEPS and DEFAULT_LR
                  were chosen. Writes OUT/sweep.json and OUT/sweep.md.
  oracle-time     one search's cost per image next to a forward and a forward + backward, in
                  fp32 as oracle.py runs it. Writes OUT/timing.json.

Run it (the README holds the measured numbers and how long each run took):
    python bench.py                           # sections 1-5
    python bench.py --quick                   # tiny sizes, a smoke run of the whole script
    python bench.py --json runs/bench.json    # + every number, the settings and the machine
    python bench.py --device cuda --json runs/bench-cuda.json
    python bench.py --only tokenizer --profile   # + torch.profiler tables of the SPoT pieces
    python bench.py --only attention             # spot.attention vs the fused kernel
    python bench.py --only oracle-sweep --checkpoint runs/shapes/checkpoint.pt --limit 300 \\
                    --tokens 8,16 --out runs/shapes-sweep
    python bench.py --only oracle-time --checkpoint runs/shapes/checkpoint.pt --out runs/timing

How the numbers are made (read this before trusting one):
  * Each comparison is timed in ONE interleaved loop: round r calls A, B, C, round r+1 calls
    B, C, A, ... so a slow drift of the machine (clock boost, another process) hits every
    contender alike. A ratio is the median of the per-round ratios B_r / A_r, not a ratio of
    two medians, so it cancels whatever changed between rounds.
  * Times are medians over --repeats rounds after --warmup untimed rounds (first calls pay for
    memory allocation, kernel selection and AdamW's state).
  * On CUDA the kernels run asynchronously: we torch.cuda.synchronize() before reading a timer,
    otherwise we would time the kernel *launches*, not the work.
  * --precision auto decides bf16 autocast vs fp32 exactly as train.py does
    (utils.choose_precision): on the CPU it times a training step of the --model preset in both
    and keeps the faster, because a CPU's feature flags do not say which one is faster. The
    report names the CPU, the precision and the probe's times.
  * torch.set_flush_denormal(True), as in train.py: Adam's tiny second moments become denormal
    floats, which x86 CPUs process in slow microcode.
  * Images are random: bilinear sampling and matrix products cost the same whatever the pixels.
  * Other programs steal CPU time from a benchmark. The report says how many cores OTHER
    processes used during each section (from /proc/stat); anything above ~0.1 means "rerun".
  * CPU memory: glibc's malloc normally keeps freed memory and moves its mmap threshold as the
    program runs, so the peak RSS of one and the same step varied from run to run. The memory
    probes run with MALLOC_MMAP_THRESHOLD_=65536: every block >= 64 kB is its own mapping,
    returned when freed, so RSS follows the live tensors and the peak repeats (no effect off
    glibc).
"""

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import utils
import data
import oracle
import spot
import train

# -----------------------------------------------------------------------------
# Settings

# (image size, window k, batch): CIFAR-like and ImageNet-like (ViT-B/16-like windows)
TOKENIZER_CONFIGS = [(32, 4, 256), (224, 16, 32)]
QUICK_TOKENIZER_CONFIGS = [(32, 4, 16), (224, 16, 2)]
EMBED_DIM = 192                 # the tokenizer's linear embedding: C*k*k -> 192
SUBPIXEL_SHIFT = 0.3            # pixels added to every grid centre in the tokenizer benchmark
TOKEN_COUNTS = (16, 64)         # default --tokens
SAMPLERS = {"extract_patches": spot.extract_patches,                  # what SPoTViT uses
            "extract_patches_reference": spot.extract_patches_reference}
SECTIONS = ("tokenizer", "train", "oracle", "memory", "attention", "oracle-sweep", "oracle-time")
DEFAULT_SECTIONS = SECTIONS[:5]
CHECKPOINT_SECTIONS = ("oracle-sweep", "oracle-time")
PRECISION_SECTIONS = ("tokenizer", "train", "oracle", "memory")   # the ones --precision applies to
GOALS = {"tokenizer": 1.25, "tokenizer_pos_grad": 2.0, "train": 1.1, "oracle": 1.2}
SWEEP_STEPS = (5, 10, 20, 40)
SWEEP_LRS = (3e-3, 1e-2, 3e-2)


def parse_args(argv=None):
    """Command line -> checked args, every flag checked here: a bad one stops the run before a
    model is built or a checkpoint read, not after minutes of timing."""
    parser = argparse.ArgumentParser(description="Benchmark SPoT's tokenizer, training step, "
                                     "oracle step and memory against a standard grid ViT.")
    add = parser.add_argument
    add("--device", default="cpu", choices=("auto", "cpu", "cuda"),
        help="(default: cpu; auto = CUDA if available)")
    add("--threads", type=int, default=None, help="CPU threads for torch (default: all cores)")
    add("--repeats", type=int, default=None, help="timed rounds per comparison (default 15, quick 3)")
    add("--warmup", type=int, default=None, help="untimed rounds first (default 3, quick 1)")
    add("--model", default="cifar10", choices=tuple(train.PRESETS),
        help="train.py preset whose SPoTConfig the step benchmarks build (default: cifar10)")
    add("--batch-size", type=int, default=None,
        help="images per batch of every section (default: the preset's, quick 8)")
    add("--tokens", default=",".join(map(str, TOKEN_COUNTS)),
        help="token counts N of the train, oracle and memory sections and the budgets of the "
             "oracle-sweep and oracle-time sections, comma-separated (default: %(default)s)")
    add("--precision", default="auto", choices=("auto", "fp32", "bf16"),
        help="bf16 autocast or fp32; auto = what train.py would pick (default: auto)")
    add("--only", default=",".join(DEFAULT_SECTIONS),
        help=f"comma-separated sections, from {','.join(SECTIONS)} (default: %(default)s)")
    add("--quick", action="store_true", help="tiny sizes and few repeats: a smoke run")
    add("--profile", action="store_true", help="print torch.profiler tables of the SPoT pieces")
    add("--json", default=None, help="write every number, settings and machine info here")
    group = parser.add_argument_group("oracle-sweep and oracle-time, on a trained model")
    add = group.add_argument
    add("--checkpoint", default=None, help="checkpoint.pt written by train.py")
    add("--data-dir", default=None, help="its dataset folder (default: the one it stores)")
    add("--out", default=None, help="folder for sweep.json, sweep.md and timing.json")
    add("--limit", type=int, default=500, help="oracle-sweep: the first N validation (else train) images (default 500)")
    add("--oracle-from", default="isotropic", choices=spot.PRIORS,
        help="prior the searches start from (default: isotropic)")
    add("--oracle-steps", type=int, default=oracle.DEFAULT_STEPS,
        help="oracle-time: steps of the timed search (default: oracle.DEFAULT_STEPS)")
    add("--oracle-lr", type=float, default=oracle.DEFAULT_LR,
        help="oracle-time: its lr (default: oracle.DEFAULT_LR)")
    add("--seed", type=int, default=0, help="seed of the start positions (default 0)")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)   # one memory probe
    args = parser.parse_args(argv)

    preset = train.PRESETS[args.model]
    for name, quick, full in (("repeats", 3, 15), ("warmup", 1, 3), ("batch_size", 8, preset["batch_size"])):
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    try:
        args.tokens = utils.parse_tokens(args.tokens, 4096, "--tokens")
    except ValueError as error:
        parser.error(str(error))
    for name, low in (("threads", 1), ("repeats", 1), ("warmup", 0), ("batch_size", 1),
                      ("limit", 1), ("oracle_steps", 0)):
        value = getattr(args, name)
        if value is not None and value < low:
            parser.error(f"--{name.replace('_', '-')} must be >= {low}, got {value}")
    if not (math.isfinite(args.oracle_lr) and args.oracle_lr > 0):
        parser.error(f"--oracle-lr must be a finite number > 0, got {args.oracle_lr}")
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(args.only) - set(SECTIONS)
    if unknown or not args.only:
        parser.error(f"--only: unknown section(s) {sorted(unknown)}; choose from {','.join(SECTIONS)}")
    n_grid = len(spot.grid_positions(preset["model"].image_size, preset["model"].window))
    if {"train", "memory"} & set(args.only) and max(args.tokens) > n_grid:
        parser.error(f"--tokens: the grid ViT keeps at most the {n_grid} patches of the "
                     f"'{args.model}' preset, got {max(args.tokens)}")
    on_checkpoint = [s for s in args.only if s in CHECKPOINT_SECTIONS]
    if on_checkpoint and (args.checkpoint is None or args.out is None):
        parser.error(f"--only {','.join(on_checkpoint)} needs --checkpoint (written by train.py) "
                     f"and --out (a folder)")
    if args.checkpoint is not None and not on_checkpoint:
        parser.error(f"--checkpoint is read only by the sections {' and '.join(CHECKPOINT_SECTIONS)}; "
                     f"add them to --only")
    if args.json is not None and Path(args.json).is_dir():
        parser.error(f"--json {args.json} is a folder; name a file such as {args.json}/bench.json")
    try:
        args.device = utils.resolve_device(args.device)
        if on_checkpoint:
            utils.check_out_dir(args.out, "--out")
        if args.json is not None:
            utils.check_out_dir(Path(args.json).absolute().parent, "--json")
    except ValueError as error:
        parser.error(str(error))
    return args


def setup_torch(args):
    """Threads and denormals, as train.py -> sync(), which every timer calls before reading."""
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    return torch.cuda.synchronize if args.device.type == "cuda" else (lambda: None)


def choose_bf16(args):
    """--precision -> (bf16?, a line saying how it was decided), by utils.choose_precision, the
    rule train.py follows: on the CPU, 'auto' times a forward + backward (utils.probe_step_seconds)
    of the --model preset at this batch size and the middle token count in both precisions."""
    model = spot.SPoTViT(train.PRESETS[args.model]["model"]).to(args.device)
    n_probe = args.tokens[len(args.tokens) // 2]
    said = []
    bf16 = utils.precision_for(model, args.precision, args.batch_size, n_probe, args.device, said.append)
    return bf16, said[0] if said else (f"precision: {'bf16' if bf16 else 'fp32'} "
                                       f"(--precision {args.precision}, {args.device.type})")


# -----------------------------------------------------------------------------
# Timing: interleaved rounds, medians, paired ratios

def measure(fns, repeats, warmup, sync):
    """fns: {name: callable}. -> {name: [seconds per round]}, all contenders interleaved."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    sync()
    times = {name: [] for name in names}
    for r in range(repeats):
        shift = r % len(names)                          # rotate the order every round
        for name in names[shift:] + names[:shift]:
            sync()
            start = time.perf_counter()
            fns[name]()
            sync()                                      # wait for the GPU before reading
            times[name].append(time.perf_counter() - start)
    return times


def med_ms(times):
    return 1e3 * statistics.median(times)


def paired_ratio(numerator, denominator):
    """Median over rounds of numerator[r] / denominator[r] (both measured in round r)."""
    return statistics.median(a / b for a, b in zip(numerator, denominator))


# -----------------------------------------------------------------------------
# The other side of each comparison: SPoTViT's SPoTConfig built as a standard ViT (GridViT) or
# with torch's fused attention (FusedAttentionViT). Both are subclasses of spot.SPoTViT with the
# same parameter names, so one state_dict fits all three and only the one piece differs.

def patchify(images, window):
    """(B, C, H, W) -> (B, G, C*k*k): the non-overlapping k x k patches, row-major, by reshape.

    Feature order (C, ky, kx) is the order of extract_patches(...).flatten(2), so one linear
    embedding serves both. Like a strided convolution, a remainder of H or W is cropped."""
    B, C, H, W = images.shape
    k = window
    h, w = H // k, W // k
    x = images[:, :, :h * k, :w * k].reshape(B, C, h, k, w, k)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(B, h * w, C * k * k)


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
        images = (images - self.image_mean) / self.image_std
        patches = patchify(images, self.config.window)                        # (B, G, C*k*k)
        pos = self.pos_table.expand(len(images), -1, -1)                      # (B, G, dim)
        if cells is not None:      # patch dropout: gather BEFORE embedding (cheaper)
            patches = patches.gather(1, cells[..., None].expand(-1, -1, patches.shape[-1]))
            pos = self.pos_table[cells]                                        # (B, N, dim)
        tokens = self.patch_embed(patches)
        tokens = tokens + pos.to(tokens.dtype)
        x = torch.cat([self.cls_token.expand(len(tokens), -1, -1), tokens], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.forward_head(self.norm(x))


class FusedAttention(spot.Attention):
    """spot.Attention calling torch's fused kernel where spot.Attention calls spot.attention.
    A model of its own, rather than reassigning spot.attention while timing, so that no other
    model in the process changes behind its back."""

    def forward(self, x):                                                    # (B, T, D)
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
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
    each with an AdamW made as train.py makes it."""
    torch.manual_seed(0)
    weights = spot.SPoTViT(config).state_dict()
    models, optimizers = {}, {}
    for kind in kinds:
        models[kind] = VARIANTS[kind](config)
        models[kind].load_state_dict(weights)                  # strict: the same parameters
        models[kind].to(device)
        optimizers[kind] = torch.optim.AdamW(train.param_groups(models[kind], 0.05), lr=lr,
                                             betas=(0.9, 0.999), fused=device.type == "cuda" or None)
    return models, optimizers


def preset_models(args, kinds):
    return build_models(train.PRESETS[args.model]["model"], args.device, kinds,
                        lr=train.PRESETS[args.model]["lr"])


def make_batch(args, config, n_tokens, seed=0):
    """Random images and labels, N uniform subpixel positions (SPoT) and N random grid cells
    per image (GridViT, like sample_positions' "grid" prior). Drawn outside the timed region."""
    g = torch.Generator().manual_seed(seed)
    (H, W), k, B = config.image_size, config.window, args.batch_size
    images = torch.rand(B, config.in_chans, H, W, generator=g)
    labels = torch.randint(0, config.num_classes, (B,), generator=g)
    positions = spot.sample_positions("uniform", B, n_tokens, (H, W), k, generator=g)
    n_grid = (H // k) * (W // k)
    cells = None if n_tokens == n_grid else torch.rand(B, n_grid, generator=g).argsort(1)[:, :n_tokens]
    return [None if t is None else t.to(args.device) for t in (images, labels, positions, cells)]


def train_step(model, optimizer, images, labels, where, bf16):
    """One optimizer step as train.train_step (minus drawing the positions and the scheduler)."""
    with utils.autocast(images.device, bf16):
        logits = model(images, where)
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=0.1)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()


def search(model, images, labels, positions, steps, bf16):
    with utils.autocast(images.device, bf16):
        oracle.oracle_search(model, images, labels, positions, steps=steps)


def check_like_for_like(device):
    """Not a timing check: the comparisons are only fair if both sides compute the same thing.
    At EXACT grid centres both samplers must equal patchify, and all VARIANTS the same logits."""
    torch.manual_seed(0)
    images = torch.rand(2, 3, 32, 32, device=device)
    grid = spot.grid_positions(32, 4).to(device)
    for name, sample in SAMPLERS.items():
        if not torch.allclose(sample(images, grid.expand(2, -1, -1), 4).flatten(2),
                              patchify(images, 4), atol=1e-5):
            sys.exit(f"error: spot.{name} differs from patchify at grid centres")
    models, _ = build_models(spot.SPoTConfig(image_size=32, window=4, dim=64, depth=2, heads=2),
                             device, VARIANTS)
    cells = torch.tensor([[5, 0, 63], [1, 2, 3]], device=device)
    with torch.no_grad():
        pairs = [(models["spot"](images, grid.expand(2, -1, -1)), models["grid"](images)),
                 (models["spot"](images, grid[cells]), models["grid"](images, cells)),
                 (models["spot"](images, grid[cells]), models["fused"](images, grid[cells]))]
    if not all(torch.allclose(a, b, atol=1e-4) for a, b in pairs):
        sys.exit("error: SPoTViT, GridViT and FusedAttentionViT disagree at grid centres; "
                 "the comparison is unfair")


# -----------------------------------------------------------------------------
# 1. Tokenizer: extract_patches + linear vs patchify + linear

def bench_tokenizer(args, bf16, sync):
    device, rows = args.device, []
    for image_size, window, batch in (QUICK_TOKENIZER_CONFIGS if args.quick else TOKENIZER_CONFIGS):
        torch.manual_seed(0)
        images = torch.rand(batch, 3, image_size, image_size, device=device)   # no grad, ever
        embed = nn.Linear(3 * window * window, EMBED_DIM).to(device)
        centres = spot.grid_positions(image_size, window).to(device)           # (G, 2)
        G = len(centres)
        grad_out = torch.randn(batch, G, EMBED_DIM, device=device)              # upstream gradient
        for pos_grad in (False, True):
            # Every grid centre moved by +0.3 px down and right: each sample is a real 70/30 blend.
            positions = (centres + SUBPIXEL_SHIFT / image_size).expand(batch, -1, -1).clone()
            positions.requires_grad_(pos_grad)
            # autograd.grad (not .backward()) so nothing accumulates into .grad between calls.
            wrt = list(embed.parameters()) + ([positions] if pos_grad else [])

            def tokenizer(read, wrt=wrt):
                def run():
                    with utils.autocast(device, bf16):
                        tokens = embed(read())                                  # (B, G, 192)
                    torch.autograd.grad(tokens, wrt, grad_out.to(tokens.dtype))
                return run

            # The baseline never has a position gradient (there are no positions to move), so in
            # the "with" rows it is the same work as in the "without" rows: the price of moving.
            fns = {"patchify": tokenizer(lambda: patchify(images, window), list(embed.parameters()))}
            for name, sample in SAMPLERS.items():
                fns[name] = tokenizer(lambda s=sample, p=positions: s(images, p, window).flatten(2))
            times = measure(fns, args.repeats, args.warmup, sync)
            row = {"image_size": image_size, "window": window, "batch": batch, "tokens": G,
                   "pos_grad": pos_grad, "times_s": times,
                   "ms": {name: med_ms(t) for name, t in times.items()},
                   "ratio": {name: paired_ratio(times[name], times["patchify"]) for name in SAMPLERS}}
            rows.append(row)
            print(f"  tokenizer {image_size}px k={window} B={batch} pos_grad={pos_grad}: "
                  + ", ".join(f"{n} {v:.2f} ms" for n, v in row["ms"].items()), file=sys.stderr)
    return rows


# -----------------------------------------------------------------------------
# 2. Training step: SPoTViT vs GridViT.   3. Oracle step vs training step.

def bench_train(args, bf16, sync):
    models, optimizers = preset_models(args, ("spot", "grid"))
    rows = []
    for n_tokens in args.tokens:
        images, labels, positions, cells = make_batch(args, models["spot"].config, n_tokens)
        fns = {"grid": lambda: train_step(models["grid"], optimizers["grid"], images, labels, cells, bf16),
               "spot": lambda: train_step(models["spot"], optimizers["spot"], images, labels, positions, bf16)}
        times = measure(fns, args.repeats, args.warmup, sync)
        rows.append({"tokens": n_tokens, "batch": args.batch_size, "times_s": times,
                     "ms": {name: med_ms(t) for name, t in times.items()},
                     "ratio": paired_ratio(times["spot"], times["grid"])})
        print(f"  train N={n_tokens}: grid {rows[-1]['ms']['grid']:.1f} ms, spot "
              f"{rows[-1]['ms']['spot']:.1f} ms", file=sys.stderr)
    return rows


def bench_oracle(args, bf16, sync):
    """oracle_search(steps=1) = one search step + one final scoring forward (no grad), so the step
    alone is t(steps=1) - t(steps=0), both timed in the same round as the training step. The search
    runs in the same precision as training."""
    models, optimizers = preset_models(args, ("spot",))
    model, optimizer = models["spot"], optimizers["spot"]
    rows = []
    for n_tokens in args.tokens:
        images, labels, positions, _ = make_batch(args, model.config, n_tokens)
        fns = {"train": lambda: train_step(model, optimizer, images, labels, positions, bf16),
               "search1": lambda: search(model, images, labels, positions, 1, bf16),
               "search0": lambda: search(model, images, labels, positions, 0, bf16)}
        times = measure(fns, args.repeats, args.warmup, sync)
        step = [a - b for a, b in zip(times["search1"], times["search0"])]
        rows.append({"tokens": n_tokens, "batch": args.batch_size, "times_s": times,
                     "ms": {**{name: med_ms(t) for name, t in times.items()}, "oracle_step": med_ms(step)},
                     "ratio": paired_ratio(step, times["train"])})
        print(f"  oracle N={n_tokens}: train {rows[-1]['ms']['train']:.1f} ms, oracle step "
              f"{rows[-1]['ms']['oracle_step']:.1f} ms", file=sys.stderr)
    return rows


# -----------------------------------------------------------------------------
# 5. spot.attention vs torch's fused kernel, inside a whole training step

def bench_attention(args, sync):
    """The same weights and batch at the full grid, stepped as SPoTViT and as FusedAttentionViT.
    Both precisions are measured whatever --precision says: the fused kernel's slow CPU backward
    shows in bf16."""
    models, optimizers = preset_models(args, ("fused", "spot"))
    config = models["spot"].config
    n_grid = len(spot.grid_positions(config.image_size, config.window))
    images, labels, positions, _ = make_batch(args, config, n_grid)
    rows = []
    for bf16 in (False, True):
        times = measure({kind: (lambda kind=kind: train_step(models[kind], optimizers[kind], images,
                                                             labels, positions, bf16))
                         for kind in models}, args.repeats, args.warmup, sync)
        rows.append({"precision": "bf16" if bf16 else "fp32", "tokens": n_grid, "batch": args.batch_size,
                     "times_s": times, "ms": {name: med_ms(t) for name, t in times.items()},
                     "speedup": paired_ratio(times["fused"], times["spot"])})
        print(f"  attention {rows[-1]['precision']}: fused {rows[-1]['ms']['fused']:.1f} ms, "
              f"spot.attention {rows[-1]['ms']['spot']:.1f} ms", file=sys.stderr)
    return rows


# -----------------------------------------------------------------------------
# 4. Peak memory, one fresh process per configuration

def rss_kb(field):
    """VmRSS (resident now) or VmHWM (peak resident, 'high water mark') of this process, in kB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_child(args, kind, n_tokens, bf16, sync):
    """Runs in a fresh process: peak memory of 2 steps of `kind` (grid / spot / oracle).

    CPU: the peak RSS of a process never goes down, and freed memory may stay resident in the
    allocator, so one process measures one configuration. The baseline is the RSS once model,
    optimizer and batch exist; writing "5" to /proc/self/clear_refs resets the peak to it (Linux
    >= 4.0), and the delta is what the steps themselves add: activations, gradients, AdamW state.
    CUDA: the same with memory_allocated / reset_peak_memory_stats / max_memory_allocated."""
    name = "grid" if kind == "grid" else "spot"
    models, optimizers = preset_models(args, (name,))
    model, optimizer = models[name], optimizers[name]
    images, labels, positions, cells = make_batch(args, model.config, n_tokens)
    if kind == "oracle":
        step = lambda: search(model, images, labels, positions, 1, bf16)
    else:
        step = lambda: train_step(model, optimizer, images, labels, cells if kind == "grid" else positions, bf16)
    sync()
    cuda = args.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = 1024 * rss_kb("VmRSS")
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            reset = True
        except OSError:
            reset = False         # then the peak also covers the set-up (imports, model)
    for _ in range(2):
        step()
    sync()
    peak = torch.cuda.max_memory_allocated() if cuda else 1024 * rss_kb("VmHWM")
    print(json.dumps({"kind": kind, "tokens": n_tokens, "base_mb": base / 2**20, "peak_mb": peak / 2**20,
                      "delta_mb": (peak - base) / 2**20, "peak_reset": True if cuda else reset}))


def bench_memory(args, bf16):
    rows = []
    for kind in ("grid", "spot", "oracle"):
        for n_tokens in args.tokens:
            cmd = [sys.executable, os.path.abspath(__file__), "--memory-child", f"{kind}:{n_tokens}",
                   "--device", args.device.type, "--model", args.model, "--batch-size",
                   str(args.batch_size), "--precision", "bf16" if bf16 else "fp32"]
            cmd += ["--threads", str(args.threads)] if args.threads else []
            # The fixed mmap threshold: see "CPU memory" in the module docstring.
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
            out = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if out.returncode != 0:
                sys.exit(f"error: memory probe {kind}:{n_tokens} failed:\n{out.stderr}")
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"  memory {kind} N={n_tokens}: peak {rows[-1]['peak_mb']:.0f} MB, "
                  f"step adds {rows[-1]['delta_mb']:.0f} MB", file=sys.stderr)
    return rows


# -----------------------------------------------------------------------------
# oracle-sweep: choosing oracle.py's defaults on a trained model

def sweep(model, images_uint8, labels, budgets, prior="isotropic", steps_grid=SWEEP_STEPS,
          lr_grid=SWEEP_LRS, objectives=oracle.OBJECTIVES, batch_size=128, seed=0, device="cpu",
          progress=True):
    """Top-1 accuracy and mean objective for every (objective, budget, lr, steps) -> list of dicts.

    One search of max(steps_grid) steps per (objective, budget, lr) is enough: the hand-written
    Adam has no schedule, so the first s steps of a long search ARE an s-step search, and
    trajectory[s] gives its positions. steps = 0 (the prior itself) is included as the baseline.
    """
    config = model.config
    max_steps = max(steps_grid)
    checkpoints = sorted({0, *steps_grid})
    results = []
    jobs = [(o, n, lr) for o in objectives for n in budgets for lr in lr_grid]
    for objective, tokens, lr in tqdm(jobs, desc="sweep", disable=not progress, dynamic_ncols=True):
        start = oracle.draw_positions(prior, images_uint8, tokens, config.image_size, config.window,
                                      oracle.seed_for(seed, prior, tokens, "sweep"), device)
        correct = {s: 0 for s in checkpoints}
        loss_sum = {s: 0.0 for s in checkpoints}
        for begin in range(0, len(images_uint8), batch_size):
            images = images_uint8[begin:begin + batch_size].to(device).float() / 255
            y = labels[begin:begin + batch_size].to(device)
            result = oracle.oracle_search(model, images, y if objective == "label" else None,
                                          start[begin:begin + batch_size].to(device),
                                          steps=max_steps, lr=lr, objective=objective)
            with torch.no_grad():
                for s in checkpoints:
                    correct[s] += (model(images, result.trajectory[s]).argmax(1) == y).sum().item()
                    loss_sum[s] += result.losses[s].sum().item()
        for s in checkpoints:
            results.append({"objective": objective, "tokens": tokens, "lr": lr, "steps": s,
                            "top1": 100.0 * correct[s] / len(images_uint8),
                            "loss": loss_sum[s] / len(images_uint8)})
    return results


def sweep_markdown(results, budgets, settings):
    """-> (markdown tables, {objective: (steps, lr, mean top-1)} of the best searching cell).
    settings: needs checkpoint, n_images, dataset, oracle_from."""
    lines = [f"# SPoT-ON (steps, lr) sweep: {settings['checkpoint']}", "",
             f"First {settings['n_images']} *{settings['split']}* images of {settings['dataset']} (the test split "
             f"is never used to choose the defaults); start prior {settings['oracle_from']}. "
             "Cell = top-1 % (mean objective). steps = 0 is the prior itself.", ""]
    best = {}
    for objective in dict.fromkeys(r["objective"] for r in results):
        lines += [f"## objective = {objective}", "",
                  "| lr | steps | " + " | ".join(f"{b} T" for b in budgets) + " | mean top-1 |",
                  "|---|---|" + "---|" * (len(budgets) + 1)]
        cells = {}
        for r in results:
            if r["objective"] == objective:
                cells.setdefault((r["lr"], r["steps"]), {})[r["tokens"]] = r
        for (lr, steps), by_tokens in sorted(cells.items(), key=lambda kv: (kv[0][1] > 0, kv[0])):
            if steps == 0 and lr != min(lr_ for lr_, _ in cells):
                continue       # the prior row is the same for every lr; show it once
            mean = sum(by_tokens[b]["top1"] for b in budgets) / len(budgets)
            if steps > 0 and (objective not in best or mean > best[objective][2]):
                best[objective] = (steps, lr, mean)
            lines.append(f"| {'-' if steps == 0 else lr} | {steps} | " + " | ".join(
                f"{by_tokens[b]['top1']:.1f} ({by_tokens[b]['loss']:.3f})" for b in budgets)
                + f" | {mean:.2f} |")
        lines.append("")
    for objective, (steps, lr, mean) in best.items():
        lines.append(f"Best for {objective}: steps={steps}, lr={lr} (mean top-1 {mean:.2f} %).")
    return "\n".join(lines) + "\n", best


def bench_oracle_sweep(args, loaded, settings):
    model, dataset, _ = loaded
    split = "val" if dataset.val is not None else "train"     # held-out images when there are any
    images = getattr(dataset, split)
    n = min(args.limit, len(images))
    settings = {**settings, "n_images": n, "split": split}
    results = sweep(model, images.images[:n], images.labels[:n], args.tokens,
                    prior=args.oracle_from, batch_size=args.batch_size, seed=args.seed,
                    device=args.device)
    text, best = sweep_markdown(results, args.tokens, settings)
    report = {"settings": settings, "results": results,
              "best": {o: {"steps": s, "lr": lr, "mean_top1": m} for o, (s, lr, m) in best.items()}}
    out = Path(args.out)
    (out / "sweep.json").write_text(json.dumps(report, indent=2))
    (out / "sweep.md").write_text(text)
    print(f"wrote {out / 'sweep.json'} and {out / 'sweep.md'}", file=sys.stderr)
    return {**report, "markdown": text}


# -----------------------------------------------------------------------------
# oracle-time: what one search costs on a trained model

def time_oracle(model, images, labels, positions, steps=oracle.DEFAULT_STEPS, lr=oracle.DEFAULT_LR,
                repeats=3, warmup=1, sync=lambda: None):
    """Seconds per image of one forward, one forward + backward (training-style, w.r.t. the
    parameters), one oracle step, and a whole search; and their ratios. Interleaved rounds as
    every other timing here. Leaves no gradients behind (autograd.grad, not .backward()).

    A step is the whole search / steps, so it includes a share of the final forward that scores
    the last positions. Expect a step to cost about one forward + backward: the backward pass
    skips the weight gradients but still runs back through every layer to the positions."""
    params = [p for p in model.parameters() if p.requires_grad]
    was_training = model.training
    model.eval()

    def forward():
        with torch.no_grad():
            model(images, positions)

    def forward_backward():
        torch.autograd.grad(F.cross_entropy(model(images, positions), labels), params)

    try:
        times = measure({"forward": forward, "forward_backward": forward_backward,
                         "search": lambda: oracle.oracle_search(model, images, labels, positions,
                                                                steps=steps, lr=lr)},
                        repeats, warmup, sync)
    finally:
        model.train(was_training)
    t_fwd, t_fb, t_search = (statistics.median(times[k]) for k in ("forward", "forward_backward", "search"))
    B, step = len(images), t_search / max(steps, 1)
    return {"batch_size": B, "tokens": positions.shape[1], "steps": steps,
            "forward_s_per_image": t_fwd / B, "forward_backward_s_per_image": t_fb / B,
            "oracle_step_s_per_image": step / B, "oracle_search_s_per_image": t_search / B,
            "step_vs_forward_backward": step / t_fb, "search_vs_forward": t_search / t_fwd}


def bench_oracle_time(args, loaded, settings, sync):
    """The first --batch-size test images, --oracle-from start positions, fp32."""
    model, dataset, _ = loaded
    n = min(args.batch_size, len(dataset.test))
    images = dataset.test.images[:n].to(args.device).float() / 255
    labels = dataset.test.labels[:n].to(args.device)
    timing = {}
    for tokens in args.tokens:
        generator = torch.Generator(device=args.device).manual_seed(args.seed)
        positions = spot.sample_positions(args.oracle_from, n, tokens, model.config.image_size,
                                          model.config.window, images=images, generator=generator)
        t = timing[str(tokens)] = time_oracle(model, images, labels, positions, args.oracle_steps,
                                              args.oracle_lr, args.repeats, args.warmup, sync)
        print(f"  oracle-time N={tokens}: oracle step {1e3 * t['oracle_step_s_per_image']:.3f} "
              f"ms/img = {t['step_vs_forward_backward']:.2f}x forward+backward", file=sys.stderr)
    path = Path(args.out) / "timing.json"
    path.write_text(json.dumps({"settings": settings, "timing": timing}, indent=2))
    print(f"wrote {path}", file=sys.stderr)
    return timing


# -----------------------------------------------------------------------------
# Optional: where does the time go? (torch.profiler, the SPoT side only)

def profile(args, bf16):
    from torch.profiler import ProfilerActivity, profile as torch_profile
    device = args.device
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    jobs = {}
    for image_size, window, batch in (QUICK_TOKENIZER_CONFIGS if args.quick else TOKENIZER_CONFIGS):
        images = torch.rand(batch, 3, image_size, image_size, device=device)
        embed = nn.Linear(3 * window * window, EMBED_DIM).to(device)
        positions = spot.grid_positions(image_size, window).to(device) + SUBPIXEL_SHIFT / image_size
        positions = positions.expand(batch, -1, -1).clone().requires_grad_(True)

        def tokenizer(i=images, e=embed, p=positions, k=window):
            with utils.autocast(device, bf16):
                tokens = e(spot.extract_patches(i, p, k).flatten(2))
            torch.autograd.grad(tokens.float().sum(), [p, *e.parameters()])
        jobs[f"tokenizer {image_size} px, k={window}, B={batch} (position grads)"] = tokenizer
    models, optimizers = preset_models(args, ("spot",))
    imgs, labels, pos, _ = make_batch(args, models["spot"].config, max(args.tokens))
    jobs[f"SPoT train step (N={max(args.tokens)}, B={args.batch_size})"] = (
        lambda: train_step(models["spot"], optimizers["spot"], imgs, labels, pos, bf16))
    for title, job in jobs.items():
        for _ in range(2):
            job()
        with torch_profile(activities=activities) as prof:
            for _ in range(5):
                job()
        print(f"\n### profile: {title} (5 calls)\n")
        print(prof.key_averages().table(sort_by=sort, row_limit=15))


# -----------------------------------------------------------------------------
# Report

def cpu_seconds():
    """(busy CPU seconds of the whole machine since boot, CPU seconds of this process and its
    finished children). The difference over a section = what OTHER processes used meanwhile: a
    benchmark on a busy machine measures the other processes too, so we say how busy it was."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
    except OSError:
        return None
    t = os.times()
    busy = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")
    return busy, t.user + t.system + t.children_user + t.children_system


def other_load(before, after, wall):
    """Average number of cores busy with other processes between two cpu_seconds() readings."""
    if before is None or after is None:
        return None
    return max(0.0, ((after[0] - before[0]) - (after[1] - before[1])) / wall)


def verdict(ratio, goal):
    return f"{'met' if ratio <= goal else 'MISSED'} (<= {goal}x)"


def markdown(results, settings):
    lines = [f"# SPoT benchmark: {settings['device_name']}, {settings['threads']} thread(s), torch "
             f"{settings['torch']}, {settings['date']}", "",
             f"Medians of {settings['repeats']} interleaved rounds after {settings['warmup']} warm-up "
             f"rounds; ratios are medians of per-round ratios. CPU: {settings['cpu']}. "
             f"Precision of sections 1-4: {settings['precision']}."]
    loads = {k: v for k, v in settings.get("other_load_cores", {}).items() if v is not None}
    if loads and settings["device"] == "cpu":
        lines.append("CPU cores used by OTHER processes meanwhile (0 = quiet machine): "
                     + ", ".join(f"{k} {v:.2f}" for k, v in loads.items()) + ".")
    lines.append("")
    if "tokenizer" in results:
        lines += ["## 1. Tokenizer forward + backward (extract_patches + linear vs patchify + linear)", "",
                  f"All grid cells, shifted by +{SUBPIXEL_SHIFT} px; linear C*k*k -> {EMBED_DIM}; "
                  "backward to the embedding (and to the positions where stated). (x) = time / "
                  "patchify time; the goal is judged on spot.extract_patches, the one SPoTViT uses.", "",
                  "| image, window, batch | tokens | grad to positions | patchify ms | "
                  + " | ".join(f"{name} ms (x)" for name in SAMPLERS) + " | goal |",
                  "|---|---|---|---|" + "---|" * len(SAMPLERS) + "---|"]
        for r in results["tokenizer"]:
            goal = GOALS["tokenizer_pos_grad" if r["pos_grad"] else "tokenizer"]
            lines.append(f"| {r['image_size']} px, k={r['window']}, B={r['batch']} | {r['tokens']} | "
                         f"{'yes' if r['pos_grad'] else 'no'} | {r['ms']['patchify']:.2f} | "
                         + " | ".join(f"{r['ms'][n]:.2f} ({r['ratio'][n]:.2f}x)" for n in SAMPLERS)
                         + f" | {verdict(r['ratio']['extract_patches'], goal)} |")
        lines.append("")
    model = settings["model"]
    if "train" in results:
        lines += [f"## 2. Training step (forward, backward, clip, AdamW), model '{model['preset']}' "
                  f"(dim {model['dim']}, depth {model['depth']}, heads {model['heads']}), "
                  f"{model['image_size']} px, k={model['window']}, B={settings['batch_size']}", "",
                  "| tokens | grid ViT ms | SPoT ms | SPoT / grid | goal |", "|---|---|---|---|---|"]
        for r in results["train"]:
            lines.append(f"| {r['tokens']} | {r['ms']['grid']:.1f} | {r['ms']['spot']:.1f} | "
                         f"{r['ratio']:.3f}x | {verdict(r['ratio'], GOALS['train'])} |")
        lines.append("")
    if "oracle" in results:
        lines += ["## 3. Oracle step (forward, backward to positions, Adam) vs training step, same batch", "",
                  "| tokens | train step ms | oracle_search(steps=1) ms | steps=0 ms | one oracle step ms "
                  "| step / train | goal |", "|---|---|---|---|---|---|---|"]
        for r in results["oracle"]:
            lines.append(f"| {r['tokens']} | {r['ms']['train']:.1f} | {r['ms']['search1']:.1f} | "
                         f"{r['ms']['search0']:.1f} | {r['ms']['oracle_step']:.1f} | {r['ratio']:.3f}x | "
                         f"{verdict(r['ratio'], GOALS['oracle'])} |")
        lines.append("")
    if "memory" in results:
        what = ("torch.cuda.max_memory_allocated" if settings["device"] == "cuda"
                else "peak resident set size (VmHWM), fresh process per row")
        lines += [f"## 4. Peak memory of 2 steps, B={settings['batch_size']} ({what})", "",
                  "| step | tokens | before the step MB | peak MB | added by the step MB |",
                  "|---|---|---|---|---|"]
        names = {"grid": "grid ViT train step", "spot": "SPoT train step", "oracle": "oracle step"}
        for r in results["memory"]:
            lines.append(f"| {names[r['kind']]} | {r['tokens']} | {r['base_mb']:.0f} | {r['peak_mb']:.0f} "
                         f"| {r['delta_mb']:.0f} |")
        lines.append("")
    if "attention" in results:
        lines += [f"## 5. Training step with spot.attention vs torch's fused attention, model "
                  f"'{model['preset']}', full grid, B={settings['batch_size']}", "",
                  "| precision | tokens | fused F.scaled_dot_product_attention ms | spot.attention ms "
                  "| speed-up |", "|---|---|---|---|---|"]
        for r in results["attention"]:
            lines.append(f"| {r['precision']} | {r['tokens']} | {r['ms']['fused']:.1f} | "
                         f"{r['ms']['spot']:.1f} | {r['speedup']:.2f}x |")
        lines.append("")
    if "oracle-sweep" in results:       # its own markdown, one heading level down
        lines += ["#" + line if line.startswith("#") else line
                  for line in results["oracle-sweep"]["markdown"].splitlines()] + [""]
    if "oracle-time" in results:
        lines += [f"## Oracle cost on {settings['checkpoint']} (fp32, {settings['oracle_steps']} "
                  f"steps, lr {settings['oracle_lr']}, start {settings['oracle_from']})", "",
                  "| tokens | images | forward ms/img | forward+backward ms/img | oracle step ms/img "
                  "| step / (forward+backward) | whole search / forward |", "|---|---|---|---|---|---|---|"]
        for tokens, t in results["oracle-time"].items():
            lines.append(f"| {tokens} | {t['batch_size']} | {1e3 * t['forward_s_per_image']:.3f} | "
                         f"{1e3 * t['forward_backward_s_per_image']:.3f} | "
                         f"{1e3 * t['oracle_step_s_per_image']:.3f} | {t['step_vs_forward_backward']:.2f}x | "
                         f"{t['search_vs_forward']:.1f}x |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    sync = setup_torch(args)
    if args.memory_child:
        kind, n_tokens = args.memory_child.split(":")
        memory_child(args, kind, int(n_tokens), args.precision == "bf16", sync)
        return 0
    loaded = None
    if args.checkpoint is not None:      # first: a bad file or missing data stops before any timing
        try:
            loaded = data.load_model_and_data(args.checkpoint, args.device, data_dir=args.data_dir,
                                                progress=True)
        except (ValueError, data.DataError) as error:
            print(f"bench.py: error: {error}", file=sys.stderr)
            return 2
    check_like_for_like(args.device)
    bf16, decided = False, "fp32 (no section uses --precision)"
    if set(args.only) & set(PRECISION_SECTIONS):
        bf16, decided = choose_bf16(args)
        print(decided, file=sys.stderr)
    config = train.PRESETS[args.model]["model"]
    settings = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "torch": torch.__version__,
                "python": platform.python_version(), "device": args.device.type,
                "device_name": torch.cuda.get_device_name() if args.device.type == "cuda" else utils.cpu_name(),
                "cpu": utils.cpu_name(), "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
                "repeats": args.repeats, "warmup": args.warmup, "quick": args.quick,
                "precision": "bf16 autocast" if bf16 else "fp32", "precision_choice": decided,
                "batch_size": args.batch_size, "tokens": args.tokens,
                "command": " ".join([sys.executable] + sys.argv),
                "model": {"preset": args.model, "image_size": config.image_size[0],
                          **{k: getattr(config, k) for k in ("window", "dim", "depth", "heads", "mlp_ratio")}},
                "goals": GOALS}
    if loaded is not None:
        model, dataset, train_args = loaded
        settings.update({"checkpoint": args.checkpoint, "dataset": dataset.name,
                         "data_dir": args.data_dir or train_args.get("data_dir"),
                         "image_size": list(model.config.image_size), "data_seed": train_args.get("seed", 0),
                         "model_config": dataclasses.asdict(model.config), "limit": args.limit,
                         "oracle_from": args.oracle_from, "oracle_steps": args.oracle_steps,
                         "oracle_lr": args.oracle_lr, "seed": args.seed})
    sections = {"tokenizer": lambda: bench_tokenizer(args, bf16, sync),
                "train": lambda: bench_train(args, bf16, sync),
                "oracle": lambda: bench_oracle(args, bf16, sync),
                "memory": lambda: bench_memory(args, bf16),
                "attention": lambda: bench_attention(args, sync),
                "oracle-sweep": lambda: bench_oracle_sweep(args, loaded, settings),
                "oracle-time": lambda: bench_oracle_time(args, loaded, settings, sync)}
    if args.device.type == "cpu":   # one second of listening: is someone else using the CPU?
        before, start = cpu_seconds(), time.perf_counter()
        time.sleep(1)
        idle_load = other_load(before, cpu_seconds(), time.perf_counter() - start)
        if idle_load is not None and idle_load > 0.2:
            print(f"warning: other processes are using {idle_load:.1f} CPU cores; the numbers will "
                  f"be slower and noisier than on a quiet machine", file=sys.stderr)
    settings["other_load_cores"] = {}
    results = {}
    for name in SECTIONS:
        if name in args.only:
            print(f"[{name}]", file=sys.stderr)
            before, start = cpu_seconds(), time.perf_counter()
            results[name] = sections[name]()
            settings["other_load_cores"][name] = other_load(before, cpu_seconds(), time.perf_counter() - start)
    text = markdown(results, settings)
    print(text)
    if args.profile:
        profile(args, bf16)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"settings": settings, "results": results, "markdown": text}, f, indent=1)
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
