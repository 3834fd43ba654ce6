"""
bench.py -- what does subpixel tokenization cost? A benchmark: it prints numbers, asserts none.

PAPER §2 replaces the patch grid by bilinear windows at continuous positions and §4 moves those
positions by gradient descent. That is only attractive if it costs little next to a standard
ViT, so every number below is measured side by side with the standard-ViT equivalent:

  1. tokenizer    extract_patches (each method) + a linear embedding C*k*k -> 192  vs  reshape
                  patchify + the same linear, forward + backward, at every grid cell shifted by
                  +0.3 px (genuinely subpixel), with and without gradients to the positions
                  (images never need one).      goals: <= 1.25x without, <= 2x with position grads
  2. train step   SPoTViT at N subpixel tokens vs the same ViT reading N grid patches (GridViT,
                  below: same parameters, only the tokenizer differs); forward, backward, grad
                  clip and AdamW exactly as in train.py, N in {16, 64}.        goal: <= 1.1x
  3. oracle step  one step of oracle.oracle_search (forward, backward to the positions, Adam)
                  vs one training step on the same batch.                      goal: <= 1.2x
  4. memory       peak memory of one training step (and one oracle step): CUDA max_memory_allocated;
                  CPU peak resident set size (VmHWM), every configuration in a fresh subprocess
  5. attention    a whole SPoTViT training step at the full grid with spot.attention (on the CPU
                  the formula written out) vs torch's fused F.scaled_dot_product_attention, in
                  fp32 and in bf16 autocast. Not a goal: it is why spot.attention exists.

Run it:
    python bench.py                           # the full benchmark (about 5 minutes on 2 CPU cores)
    python bench.py --quick                   # tiny sizes, a smoke run of the whole script
    python bench.py --json runs/bench.json    # + every number, the settings and the machine
    python bench.py --device cuda --json runs/bench-cuda.json
    python bench.py --only tokenizer --profile   # + torch.profiler tables of the SPoT pieces
    python bench.py --only attention             # spot.attention vs the fused kernel (~1 minute)

How the numbers are made (read this before trusting one):
  * Each comparison is timed in ONE interleaved loop: round r calls A, B, C, round r+1 calls
    B, C, A, ... so a slow drift of the machine (clock boost, another process) hits every
    contender alike. A ratio is the median of the per-round ratios B_r / A_r, not a ratio of
    two medians, so it cancels whatever changed between rounds.
  * Times are medians over --repeats rounds after --warmup untimed rounds (first calls pay for
    memory allocation, kernel selection and AdamW's state).
  * On CUDA the kernels run asynchronously: we torch.cuda.synchronize() before reading a timer,
    otherwise we would time the kernel *launches*, not the work.
  * torch.set_flush_denormal(True), as in train.py: Adam's tiny second moments become denormal
    floats, which x86 CPUs process ~100x slower (it made CPU steps 8x slower here).
  * Images are random: bilinear sampling and matrix products cost the same whatever the pixels.
  * Other programs steal CPU time from a benchmark. The report says how many cores OTHER
    processes used during each section (from /proc/stat); anything above ~0.1 means "rerun".
  * CPU memory: glibc's malloc normally keeps freed memory and moves its mmap threshold as the
    program runs, so the peak RSS of one and the same step varied by +-300 MB. The memory probes
    run with MALLOC_MMAP_THRESHOLD_=65536 (every large tensor is its own mapping, returned when
    freed), which makes RSS follow the live tensors: the peak then repeats to within 1 MB.
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F

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
TOKEN_COUNTS = (16, 64)         # N of the training-step and oracle benchmarks
SECTIONS = ("tokenizer", "train", "oracle", "memory", "attention")
GOALS = {"tokenizer": 1.25, "tokenizer_pos_grad": 2.0, "train": 1.1, "oracle": 1.2}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Benchmark SPoT's tokenizer, training step, "
                                     "oracle step and memory against a standard grid ViT.")
    add = parser.add_argument
    add("--device", default="cpu", choices=("cpu", "cuda"))
    add("--threads", type=int, default=None, help="CPU threads for torch (default: all cores)")
    add("--repeats", type=int, default=None, help="timed rounds per comparison (default 15, quick 3)")
    add("--warmup", type=int, default=None, help="untimed rounds first (default 3, quick 1)")
    add("--model", default="cifar10", choices=tuple(train.PRESETS),
        help="train.py preset of the ViT for the step benchmarks (default: cifar10)")
    add("--batch-size", type=int, default=None,
        help="batch of the step benchmarks (default: the preset's, quick 8)")
    add("--precision", default="auto", choices=("auto", "fp32", "bf16"),
        help="as train.py: auto = bf16 autocast where the hardware has it natively, else fp32")
    add("--only", default=",".join(SECTIONS),
        help=f"comma-separated sections to run, from {','.join(SECTIONS)} (default: all)")
    add("--quick", action="store_true", help="tiny sizes and few repeats: a smoke run")
    add("--profile", action="store_true", help="print torch.profiler tables of the SPoT pieces")
    add("--json", default=None, help="write every number, settings and machine info here")
    add("--memory-child", default=None, help=argparse.SUPPRESS)   # internal: one memory probe
    args = parser.parse_args(argv)
    args.repeats = args.repeats or (3 if args.quick else 15)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    args.batch_size = args.batch_size or (8 if args.quick else train.PRESETS[args.model]["batch_size"])
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(args.only) - set(SECTIONS)
    if unknown:
        parser.error(f"--only: unknown section(s) {sorted(unknown)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no CUDA device")
    return args


def setup_torch(args):
    """Threads, denormals, and the (sync, autocast) pair every timed function uses."""
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    device = torch.device(args.device)
    autocast = ((lambda: torch.autocast(device.type, dtype=torch.bfloat16))
                if train.use_bf16(args.precision, device) else nullcontext)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    return device, autocast, sync


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
# The standard ViT side of every comparison

def patchify(images, window):
    """(B, C, H, W) -> (B, G, C*k*k): the non-overlapping k x k patches, row-major, by reshape.

    Feature order (C, ky, kx) is the order of extract_patches(...).flatten(2), so one linear
    embedding serves both. Like a strided convolution, a remainder of H or W is cropped."""
    B, C, H, W = images.shape
    k = window
    h, w = H // k, W // k
    x = images[:, :, :h * k, :w * k].reshape(B, C, h, k, w, k)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(B, h * w, C * k * k)


class GridViT(nn.Module):
    """A standard ViT: reshape patchify, fixed sin-cos table, and spot.Block blocks.

    Same parameter names and shapes as spot.SPoTViT (one state_dict fits both), so the ONLY
    difference between the two models is how tokens are made:
        SPoTViT: bilinear windows at any positions + sin-cos computed from those positions
        GridViT: the G grid patches cut by a reshape + the matching rows of a precomputed table;
                 with N < G tokens each image keeps N of its patches (patch dropout, the
                 paper's "patch grid" baseline), picked by `cells` (B, N) indices into the grid.
    """

    def __init__(self, config):
        super().__init__()
        c = config
        self.image_hw = spot._pair(c.image_size, "image_size")
        self.window = c.window
        self.register_buffer("image_mean", torch.tensor(c.image_mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(c.image_std).view(1, -1, 1, 1), persistent=False)
        centres = spot.grid_positions(self.image_hw, c.window)                 # (G, 2)
        table = spot.sincos_pos_embed(centres[None], c.dim, self.image_hw, c.window)[0]
        self.register_buffer("pos_table", table, persistent=False)            # (G, dim)
        self.patch_embed = nn.Linear(c.in_chans * c.window ** 2, c.dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.dim))
        self.blocks = nn.ModuleList([spot.Block(c.dim, c.heads, c.mlp_ratio) for _ in range(c.depth)])
        self.norm = nn.LayerNorm(c.dim)
        self.head = nn.Linear(c.dim, c.num_classes)

    def forward(self, images, cells=None):
        images = (images - self.image_mean) / self.image_std
        patches = patchify(images, self.window)                               # (B, G, C*k*k)
        pos = self.pos_table.expand(len(images), -1, -1)                      # (B, G, dim)
        if cells is not None:      # patch dropout: gather BEFORE embedding (cheaper)
            patches = patches.gather(1, cells[..., None].expand(-1, -1, patches.shape[-1]))
            pos = self.pos_table[cells]                                        # (B, N, dim)
        tokens = self.patch_embed(patches)
        tokens = tokens + pos.to(tokens.dtype)
        x = torch.cat([self.cls_token.expand(len(tokens), -1, -1), tokens], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)[:, 0])


def build_models(args, device, grid_too=True):
    """SPoTViT of the --model preset (+ an identical GridViT) with an AdamW each, as train.py."""
    p = train.PRESETS[args.model]
    torch.manual_seed(0)
    spot_model = spot.SPoTViT(image_size=p["image_size"], window=p["window"], num_classes=10,
                              dim=p["dim"], depth=p["depth"], heads=p["heads"],
                              mlp_ratio=p["mlp_ratio"]).to(device)
    models = {"spot": spot_model}
    if grid_too:
        grid_model = GridViT(spot_model.config).to(device)
        grid_model.load_state_dict(spot_model.state_dict())      # strict: same parameters
        models["grid"] = grid_model
    optimizers = {name: torch.optim.AdamW(train.param_groups(m, 0.05), lr=p["lr"], betas=(0.9, 0.999),
                                          fused=device.type == "cuda" or None)
                  for name, m in models.items()}
    return models, optimizers


def make_batch(args, model, n_tokens, device, seed=0):
    """Random images and labels, N uniform subpixel positions (SPoT) and N random grid cells
    per image (GridViT, like sample_positions' "grid" prior). Drawn outside the timed region."""
    g = torch.Generator().manual_seed(seed)
    c = model.config
    H, W = model.image_hw
    B = args.batch_size
    images = torch.rand(B, c.in_chans, H, W, generator=g).to(device)
    labels = torch.randint(0, c.num_classes, (B,), generator=g).to(device)
    positions = spot.sample_positions("uniform", B, n_tokens, c.image_size, c.window, generator=g).to(device)
    n_grid = (H // c.window) * (W // c.window)
    cells = None if n_tokens == n_grid else torch.rand(B, n_grid, generator=g).argsort(1)[:, :n_tokens].to(device)
    return images, labels, positions, cells


def train_step(model, optimizer, images, labels, where, autocast):
    """One optimizer step exactly as train.py's loop (minus the lr scheduler and .item() logging)."""
    with autocast():
        logits = model(images, where)
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=0.1)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()


def check_like_for_like(device):
    """Not a timing check: the comparisons are only fair if both sides compute the same thing.
    At EXACT grid centres, extract_patches must equal patchify and SPoTViT must equal GridViT."""
    torch.manual_seed(0)
    images = torch.rand(2, 3, 32, 32, device=device)
    centres = spot.grid_positions(32, 4).to(device).expand(2, -1, -1)
    for method in ("manual", "grid_sample"):
        if not torch.allclose(spot.extract_patches(images, centres, 4, method=method).flatten(2),
                              patchify(images, 4), atol=1e-5):
            sys.exit(f"error: extract_patches(method={method!r}) differs from patchify at grid centres")
    model = spot.SPoTViT(image_size=32, window=4, dim=64, depth=2, heads=2).to(device).eval()
    grid = GridViT(model.config).to(device).eval()
    grid.load_state_dict(model.state_dict())
    cells = torch.tensor([[5, 0, 63], [1, 2, 3]], device=device)
    with torch.no_grad():
        same_full = torch.allclose(model(images, centres), grid(images), atol=1e-4)
        same_drop = torch.allclose(model(images, spot.grid_positions(32, 4).to(device)[cells]),
                                   grid(images, cells), atol=1e-4)
    if not (same_full and same_drop):
        sys.exit("error: GridViT and SPoTViT at grid centres disagree; the comparison is unfair")


# -----------------------------------------------------------------------------
# 1. Tokenizer: extract_patches + linear vs patchify + linear

def bench_tokenizer(args, device, autocast, sync):
    rows = []
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
                    with autocast():
                        tokens = embed(read())                                  # (B, G, 192)
                    torch.autograd.grad(tokens, wrt, grad_out.to(tokens.dtype))
                return run

            # The baseline never has a position gradient (there are no positions to move), so in
            # the "with" rows it is the same work as in the "without" rows: the price of moving.
            fns = {"patchify": tokenizer(lambda: patchify(images, window), list(embed.parameters()))}
            for method in ("manual", "grid_sample"):
                fns[method] = tokenizer(lambda m=method, p=positions:
                                        spot.extract_patches(images, p, window, method=m).flatten(2))
            times = measure(fns, args.repeats, args.warmup, sync)
            row = {"image_size": image_size, "window": window, "batch": batch, "tokens": G,
                   "pos_grad": pos_grad, "times_s": times,
                   "ms": {name: med_ms(t) for name, t in times.items()},
                   "ratio": {m: paired_ratio(times[m], times["patchify"]) for m in ("manual", "grid_sample")}}
            rows.append(row)
            print(f"  tokenizer {image_size}px k={window} B={batch} pos_grad={pos_grad}: "
                  + ", ".join(f"{n} {v:.2f} ms" for n, v in row["ms"].items()), file=sys.stderr)
    return rows


# -----------------------------------------------------------------------------
# 2. Training step: SPoTViT vs GridViT.   3. Oracle step vs training step.

def bench_train(args, device, autocast, sync):
    models, optimizers = build_models(args, device)
    rows = []
    for n_tokens in TOKEN_COUNTS:
        images, labels, positions, cells = make_batch(args, models["spot"], n_tokens, device)
        fns = {"grid": lambda: train_step(models["grid"], optimizers["grid"], images, labels, cells, autocast),
               "spot": lambda: train_step(models["spot"], optimizers["spot"], images, labels, positions, autocast)}
        times = measure(fns, args.repeats, args.warmup, sync)
        rows.append({"tokens": n_tokens, "batch": args.batch_size, "times_s": times,
                     "ms": {name: med_ms(t) for name, t in times.items()},
                     "ratio": paired_ratio(times["spot"], times["grid"])})
        print(f"  train N={n_tokens}: grid {rows[-1]['ms']['grid']:.1f} ms, spot "
              f"{rows[-1]['ms']['spot']:.1f} ms", file=sys.stderr)
    return rows


def bench_oracle(args, device, autocast, sync):
    """oracle_search(steps=1) = one search step + one final scoring forward (no grad), so the step
    alone is t(steps=1) - t(steps=0), both timed in the same round as the training step. The search
    runs under the same autocast as training, so both sides use the same precision."""
    models, optimizers = build_models(args, device, grid_too=False)
    model, optimizer = models["spot"], optimizers["spot"]
    rows = []
    for n_tokens in TOKEN_COUNTS:
        images, labels, positions, _ = make_batch(args, model, n_tokens, device)

        def search(steps):
            def run():
                with autocast():
                    oracle.oracle_search(model, images, labels, positions, steps=steps)
            return run

        fns = {"train": lambda: train_step(model, optimizer, images, labels, positions, autocast),
               "search1": search(1), "search0": search(0)}
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

def bench_attention(args, device, sync):
    """One SPoTViT (preset --model) and batch at the full grid; the two attention functions are
    swapped in turn for spot.attention, the name Attention.forward calls. Both precisions are
    measured whatever --precision says: the fused kernel's slow CPU backward shows in bf16."""
    models, optimizers = build_models(args, device, grid_too=False)
    model, optimizer = models["spot"], optimizers["spot"]
    n_grid = len(spot.grid_positions(model.config.image_size, model.window))
    images, labels, positions, _ = make_batch(args, model, n_grid, device)
    ours = spot.attention
    rows = []
    for precision in ("fp32", "bf16"):
        autocast = ((lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if precision == "bf16"
                    else nullcontext)

        def step_with(attention_fn):
            def run():
                spot.attention = attention_fn
                try:
                    train_step(model, optimizer, images, labels, positions, autocast)
                finally:
                    spot.attention = ours
            return run

        times = measure({"fused": step_with(F.scaled_dot_product_attention), "spot": step_with(ours)},
                        args.repeats, args.warmup, sync)
        rows.append({"precision": precision, "tokens": n_grid, "batch": args.batch_size,
                     "times_s": times, "ms": {name: med_ms(t) for name, t in times.items()},
                     "speedup": paired_ratio(times["fused"], times["spot"])})
        print(f"  attention {precision}: fused {rows[-1]['ms']['fused']:.1f} ms, spot.attention "
              f"{rows[-1]['ms']['spot']:.1f} ms", file=sys.stderr)
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


def memory_child(args, kind, n_tokens):
    """Runs in a fresh process: peak memory of 2 steps of `kind` (grid / spot / oracle).

    CPU: the peak RSS of a process never goes down, and freed memory may stay resident in the
    allocator, so one process measures one configuration. The baseline is the RSS once model,
    optimizer and batch exist; writing "5" to /proc/self/clear_refs resets the peak to it (Linux
    >= 4.0), and the delta is what the steps themselves add: activations, gradients, AdamW state.
    CUDA: the same with memory_allocated / reset_peak_memory_stats / max_memory_allocated."""
    device, autocast, sync = setup_torch(args)
    models, optimizers = build_models(args, device, grid_too=kind == "grid")
    name = "grid" if kind == "grid" else "spot"
    model, optimizer = models[name], optimizers[name]
    images, labels, positions, cells = make_batch(args, models["spot"], n_tokens, device)
    if kind == "oracle":
        step = lambda: oracle.oracle_search(model, images, labels, positions, steps=1)
    else:
        step = lambda: train_step(model, optimizer, images, labels, cells if kind == "grid" else positions, autocast)
    sync()
    if device.type == "cuda":
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
        with autocast() if kind == "oracle" else nullcontext():
            step()
    sync()
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else 1024 * rss_kb("VmHWM")
    print(json.dumps({"kind": kind, "tokens": n_tokens, "base_mb": base / 2**20, "peak_mb": peak / 2**20,
                      "delta_mb": (peak - base) / 2**20,
                      "peak_reset": True if device.type == "cuda" else reset}))


def bench_memory(args):
    rows = []
    for kind in ("grid", "spot", "oracle"):
        for n_tokens in TOKEN_COUNTS:
            cmd = [sys.executable, os.path.abspath(__file__), "--memory-child", f"{kind}:{n_tokens}",
                   "--device", args.device, "--model", args.model, "--batch-size", str(args.batch_size),
                   "--precision", args.precision] + (["--threads", str(args.threads)] if args.threads else [])
            # glibc malloc keeps freed memory resident and moves its mmap threshold as the program
            # runs, which made the peak RSS of the same step vary by +-300 MB from run to run. A
            # fixed threshold maps every block >= 64 kB separately and unmaps it when freed, so
            # RSS follows the live tensors and the peak repeats to within 1 MB (no effect off glibc).
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
            out = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if out.returncode != 0:
                sys.exit(f"error: memory probe {kind}:{n_tokens} failed:\n{out.stderr}")
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"  memory {kind} N={n_tokens}: peak {rows[-1]['peak_mb']:.0f} MB, "
                  f"step adds {rows[-1]['delta_mb']:.0f} MB", file=sys.stderr)
    return rows


# -----------------------------------------------------------------------------
# Optional: where does the time go? (torch.profiler, the SPoT side only)

def profile(args, device, autocast):
    from torch.profiler import ProfilerActivity, profile as torch_profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    jobs = {}
    for image_size, window, batch in (QUICK_TOKENIZER_CONFIGS if args.quick else TOKENIZER_CONFIGS):
        images = torch.rand(batch, 3, image_size, image_size, device=device)
        embed = nn.Linear(3 * window * window, EMBED_DIM).to(device)
        positions = spot.grid_positions(image_size, window).to(device) + SUBPIXEL_SHIFT / image_size
        positions = positions.expand(batch, -1, -1).clone().requires_grad_(True)

        def tokenizer(i=images, e=embed, p=positions, k=window):
            with autocast():
                tokens = e(spot.extract_patches(i, p, k).flatten(2))
            torch.autograd.grad(tokens.float().sum(), [p, *e.parameters()])
        jobs[f"tokenizer {image_size} px, k={window}, B={batch} (grid_sample, position grads)"] = tokenizer
    models, optimizers = build_models(args, device, grid_too=False)
    imgs, labels, pos, _ = make_batch(args, models["spot"], max(TOKEN_COUNTS), device)
    jobs[f"SPoT train step (N={max(TOKEN_COUNTS)}, B={args.batch_size})"] = (
        lambda: train_step(models["spot"], optimizers["spot"], imgs, labels, pos, autocast))
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


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def verdict(ratio, goal):
    return f"{'met' if ratio <= goal else 'MISSED'} (<= {goal}x)"


def markdown(results, settings):
    lines = [f"# SPoT benchmark: {settings['device_name']}, {settings['threads']} thread(s), torch "
             f"{settings['torch']}, {settings['date']}", "",
             f"Medians of {settings['repeats']} interleaved rounds after {settings['warmup']} warm-up "
             f"rounds; ratios are medians of per-round ratios. Precision: {settings['precision']}."]
    loads = {k: v for k, v in settings.get("other_load_cores", {}).items() if v is not None}
    if loads and settings["device"] == "cpu":
        lines.append("CPU cores used by OTHER processes meanwhile (0 = quiet machine): "
                     + ", ".join(f"{k} {v:.2f}" for k, v in loads.items()) + ".")
    lines.append("")
    if "tokenizer" in results:
        lines += ["## 1. Tokenizer forward + backward (extract_patches + linear vs patchify + linear)", "",
                  f"All grid cells, shifted by +{SUBPIXEL_SHIFT} px; linear C*k*k -> {EMBED_DIM}; "
                  "backward to the embedding (and to the positions where stated). (x) = time / "
                  "patchify time; the goal is judged on the method SPoTViT uses "
                  f"(spot.DEFAULT_EXTRACT_METHOD = {spot.DEFAULT_EXTRACT_METHOD!r}).", "",
                  "| image, window, batch | tokens | grad to positions | patchify ms | manual ms (x) "
                  "| grid_sample ms (x) | goal |", "|---|---|---|---|---|---|---|"]
        for r in results["tokenizer"]:
            goal = GOALS["tokenizer_pos_grad" if r["pos_grad"] else "tokenizer"]
            default = r["ratio"][spot.DEFAULT_EXTRACT_METHOD]      # what SPoTViT uses
            lines.append(f"| {r['image_size']} px, k={r['window']}, B={r['batch']} | {r['tokens']} | "
                         f"{'yes' if r['pos_grad'] else 'no'} | {r['ms']['patchify']:.2f} | "
                         f"{r['ms']['manual']:.2f} ({r['ratio']['manual']:.2f}x) | "
                         f"{r['ms']['grid_sample']:.2f} ({r['ratio']['grid_sample']:.2f}x) | "
                         f"{spot.DEFAULT_EXTRACT_METHOD} {verdict(default, goal)} |")
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
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    if args.memory_child:
        kind, n_tokens = args.memory_child.split(":")
        memory_child(args, kind, int(n_tokens))
        return 0
    device, autocast, sync = setup_torch(args)
    check_like_for_like(device)
    p = train.PRESETS[args.model]
    settings = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "torch": torch.__version__,
                "python": platform.python_version(), "device": args.device,
                "device_name": torch.cuda.get_device_name() if device.type == "cuda" else cpu_name(),
                "cpu": cpu_name(), "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
                "repeats": args.repeats, "warmup": args.warmup, "quick": args.quick,
                "precision": "bf16 autocast" if autocast is not nullcontext else "fp32",
                "batch_size": args.batch_size, "command": " ".join([sys.executable] + sys.argv),
                "model": {"preset": args.model, **{k: p[k] for k in ("image_size", "window", "dim",
                                                                       "depth", "heads", "mlp_ratio")}},
                "goals": GOALS}
    results = {}
    sections = {"tokenizer": lambda: bench_tokenizer(args, device, autocast, sync),
                "train": lambda: bench_train(args, device, autocast, sync),
                "oracle": lambda: bench_oracle(args, device, autocast, sync),
                "memory": lambda: bench_memory(args),
                "attention": lambda: bench_attention(args, device, sync)}
    if device.type == "cpu":   # one second of listening: is someone else using the CPU?
        before, start = cpu_seconds(), time.perf_counter()
        time.sleep(1)
        idle_load = other_load(before, cpu_seconds(), time.perf_counter() - start)
        if idle_load is not None and idle_load > 0.2:
            print(f"warning: other processes are using {idle_load:.1f} CPU cores; the numbers will "
                  f"be slower and noisier than on a quiet machine", file=sys.stderr)
    settings["other_load_cores"] = {}
    for name in SECTIONS:
        if name in args.only:
            print(f"[{name}]", file=sys.stderr)
            before, start = cpu_seconds(), time.perf_counter()
            results[name] = sections[name]()
            settings["other_load_cores"][name] = other_load(before, cpu_seconds(), time.perf_counter() - start)
    text = markdown(results, settings)
    print(text)
    if args.profile:
        profile(args, device, autocast)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"settings": settings, "results": results, "markdown": text}, f, indent=1)
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
