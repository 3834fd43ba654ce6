"""
cli.py -- the plumbing shared by the command-line tools (train.py, oracle.py, visualize.py,
bench.py): devices, the bf16-or-fp32 decision, output folders, flag lists, atomic writes,
loading a checkpoint and the dataset it was trained on, Ctrl-C.

Nothing here is in the paper; a reader of the method can skip this file. It exists so that each
tool checks its flags the same way, once, before any data is loaded or any work is done.
"""

import argparse
import math
import os
import platform
import signal
import threading
import time
from contextlib import nullcontext
from pathlib import Path

import torch

import data
import spot


# -----------------------------------------------------------------------------
# Flags: argparse types that check a value where the flag is declared (argparse then names the
# flag in its error, before any work is done)

def int_at_least(low):
    """An argparse type: an int >= low."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low:
            raise argparse.ArgumentTypeError(f"must be an int >= {low}, got {text!r}")
        return value
    return parse


def float_in(low, high=math.inf, low_open=False, high_open=False):
    """An argparse type: a finite float in [low, high], or (low, ...) / (..., high) when open
    (float() alone would accept 'nan' and 'inf')."""
    interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open or high == math.inf else ']'}"

    def parse(text):
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        inside = (low < value if low_open else low <= value) and (value < high if high_open else value <= high)
        if not (math.isfinite(value) and inside):
            raise argparse.ArgumentTypeError(f"must be a finite number in {interval}, got {text!r}")
        return value
    return parse


def count_or_fraction(text):
    """An argparse type: an int >= 0 (a count) or a float in (0, 1) (a fraction)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if value >= 0 and value == int(value):
        return int(value)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be a count (an int >= 0) or a fraction in (0, 1), "
                                         f"got {text!r}")
    return value


def prior_list(text):
    """An argparse type: comma-separated prior names -> a list."""
    priors = [p.strip() for p in text.split(",") if p.strip()]
    if not priors or any(p not in spot.PRIORS for p in priors):
        raise argparse.ArgumentTypeError(f"must be comma-separated names from {','.join(spot.PRIORS)}, "
                                         f"got {text!r}")
    return priors


def parse_tokens(text, n_grid, flag="--tokens"):
    """'64' | '16-64' | '8,16,32' | 'all' -> sorted list of allowed token counts, at most 4x the
    grid (more is no longer a sparse budget, and may not fit in memory)."""
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
    if not counts or min(counts) < 1 or max(counts) > 4 * n_grid:
        raise ValueError(f"{flag} must be N, A-B or A,B,C (each from 1 to {4 * n_grid}, 4x the "
                         f"{n_grid} grid cells) or 'all', got {text!r}")
    return sorted(set(counts))


def parse_int_list(text, flag, parser):
    """'4,8,16' -> [4, 8, 16], each >= 1 (oracle.py's --tokens)."""
    try:
        values = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        parser.error(f"{flag} must be a comma-separated list of ints >= 1, got {text!r}")
    return values


def check_out_dir(out, flag):
    """Create the output folder and prove it writable now, not after an hour of work."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{flag} {out} is a file; pass a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise ValueError(f"{flag} {out} is not writable ({error.strerror}); choose another folder")


# -----------------------------------------------------------------------------
# Device and precision

def cpu_name():
    """The CPU's model name, to print beside every timing (speed differs a lot between CPUs)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def resolve_device(choice):
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but torch sees no CUDA device (torch.cuda.is_available() "
                         "is False); install a CUDA build of torch or use --device cpu")
    return torch.device(choice)


def autocast(device, bf16):
    """bf16 autocast (matmuls in bf16, reductions and softmax in fp32) or nothing."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()


def choose_precision(precision, device, time_step, log=print):
    """--precision -> bf16 (True) or fp32 (False). 'auto' on CUDA: bf16 where supported. 'auto'
    on the CPU is decided by measuring, because CPU flags do not say which is faster for this
    model: the same training step ran bf16 2.6x faster than fp32 on one 2-core CPU and 1.5x
    slower on another, both listing avx512_bf16 (and CPUs without native bf16 emulate it, many
    times slower). time_step(bf16, batch_fraction) -> seconds per training step of the actual
    model on that fraction of the batch. bf16 is first tried on 1/8 of the batch: if that alone
    is slower than a whole fp32 step, bf16 cannot win and the full bf16 probe is skipped."""
    if precision != "auto":
        return precision == "bf16"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    fp32 = time_step(False, 1.0)
    eighth = time_step(True, 1 / 8)
    if eighth > fp32:
        log(f"precision: fp32 (probe: fp32 {1e3 * fp32:.0f} ms/step, bf16 {1e3 * eighth:.0f} ms "
            f"for 1/8 of the batch)")
        return False
    bf16 = time_step(True, 1.0)
    log(f"precision: {'bf16' if bf16 < fp32 else 'fp32'} (probe: fp32 {1e3 * fp32:.0f} ms/step, "
        f"bf16 {1e3 * bf16:.0f} ms/step)")
    return bf16 < fp32


def precision_for(model, precision, batch_size, n_tokens, device, log=print):
    """choose_precision, probing `model` at this batch size and token count (train.py, bench.py)."""
    return choose_precision(precision, device, lambda bf16, fraction: probe_step_seconds(
        model, max(1, round(fraction * batch_size)), n_tokens, device, bf16), log)


def probe_step_seconds(model, batch_size, n_tokens, device, bf16, steps=3):
    """Median seconds of a forward + backward of `model` on a random batch, after a warm-up.
    Leaves no trace: its own generator, gradients to a list (never .grad), no optimizer step."""
    generator = torch.Generator(device=device).manual_seed(0)
    config = model.config
    images = torch.rand(batch_size, config.in_chans, *config.image_size, generator=generator, device=device)
    positions = torch.rand(batch_size, n_tokens, 2, generator=generator, device=device)
    params = [p for p in model.parameters() if p.requires_grad]
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        with autocast(device, bf16):
            loss = model(images, positions).float().logsumexp(-1).mean()
        torch.autograd.grad(loss, params)
        times.append(time.perf_counter() - start)
    return sorted(times[1:])[len(times[1:]) // 2]


# -----------------------------------------------------------------------------
# Files

def save_checkpoint(path, state):
    """Write to a temporary file, then rename: a crash mid-write never destroys the last one."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)   # atomic on POSIX and Windows


def write_atomic(path, text):
    """Write text to a temporary file beside `path`, then rename: readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# -----------------------------------------------------------------------------
# A trained model and its data (oracle.py, visualize.py, bench.py)

def load_data_for(checkpoint, saved, dataset=None, data_dir=None, image_size=None, cache_dir=None,
                  progress=False):
    """The dataset a checkpoint was trained on (train.py stores its args), or the overrides.
    Refuses data whose classes or image size differ from the model's: a table computed on other
    classes would be silently meaningless. Raises ValueError or data.DataError."""
    config, train_args = saved["model_config"], dict(saved.get("args") or {})
    name = dataset or train_args.get("dataset")
    if name is None:
        raise ValueError(f"{checkpoint} stores no dataset name; pass --dataset")
    folder = data_dir if data_dir is not None else train_args.get("data_dir")
    loaded = data.load_dataset(
        name, folder, image_size=image_size or spot.to_hw(config["image_size"]),
        seed=train_args.get("seed", 0), cache_dir=cache_dir if cache_dir is not None else
        train_args.get("cache_dir"), val_size=train_args.get("val_size") or 0, progress=progress)
    if tuple(loaded.image_size) != spot.to_hw(config["image_size"]):
        raise ValueError(f"the {name} images are {loaded.image_size} but the model in {checkpoint} "
                         f"reads {spot.to_hw(config['image_size'])} images; pass --image-size")
    classes = saved.get("classes")
    if len(loaded.classes) != config["num_classes"] or (classes is not None and list(classes) != list(loaded.classes)):
        raise ValueError(f"{checkpoint} was trained on the classes {classes or config['num_classes']} "
                         f"but the {name} data in {folder} hold {loaded.classes}; evaluate it on the "
                         f"dataset it was trained on (--dataset, --data-dir)")
    return loaded


def load_model_and_data(checkpoint, device="cpu", dataset=None, data_dir=None, image_size=None,
                        cache_dir=None, progress=False):
    """A checkpoint (read once, safely), then its data -> (model, dataset, train_args)."""
    model, saved = spot.load_checkpoint(checkpoint, map_location=device, return_checkpoint=True)
    loaded = load_data_for(checkpoint, saved, dataset, data_dir, image_size, cache_dir, progress)
    return model, loaded, dict(saved.get("args") or {})


# -----------------------------------------------------------------------------
# Ctrl-C during a long run

def install_ctrl_c(log):
    """Ctrl-C: finish the current step, save, exit (130). A second Ctrl-C stops at once."""
    stop = {"requested": False}

    def on_sigint(signum, frame):
        if stop["requested"]:
            raise KeyboardInterrupt
        stop["requested"] = True
        log("\ninterrupt: saving a checkpoint after this step (Ctrl-C again to abort)")
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, on_sigint)
    return stop
