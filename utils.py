"""
utils.py -- the plumbing under the method files. Nothing here is in the paper, and a reader of
the method can skip it. It imports no file of this project, so every file may import it.
Sections, in order:

    flags        argparse types that check a value where the flag is declared (int_at_least,
                 float_in, count_or_fraction, name_list), the one grammar of --tokens
                 (parse_tokens), dataclass fields that are flags (option, add_fields)
    devices      resolve_device, autocast, choose_precision (--precision), cpu_name
    files        write_atomic, the one writer of checkpoints, results and figures; the per-image
                 results of an evaluation (save_per_image, load_per_image); check_out_dir
    train.py's command line   its flags (train_parser) and the rules of presets and --resume
                 (parse_run)
    reporting    bootstrap_interval, table_row, summary and oracle.py's command line
    training runs  Processes (one, or several under torchrun), the run folder's lock
                 (lock_run_folder), ctrl_c, Run (a run's state; stop: an error's one line),
                 random_streams, save_checkpoint and restore (an exact resume, also after a
                 crash), run.json and metrics.jsonl, read_init_from
    data files   DataError, channel_stats, resize_uint8, load_cifar10 (official pickles through
                 a safe unpickler, or class folders; downloaded with an MD5 check), load_folder
                 and load_split_folder (ImageNet-style class folders, decoded once and cached)
    pretrained ViTs and checkpoints   load_file (the one torch.load of a file), read_checkpoint;
                 read_pretrained (files, timm's HF folders, timm:NAME; checked by timm_shapes),
                 resample_table, to_timm, timm_config and save_pretrained: timm / DeiT / MAE
                 weights in and out (spot.load_pretrained, export)
    argument checks  to_hw, check_window, check_images, ... : the checks of spot.py's inputs

Everything read from disk is untrusted input: checkpoints and state dicts are read with
weights_only=True, the CIFAR-10 pickles go through an unpickler that can only build the numpy
arrays the official files hold (a pickle can otherwise run any code), their contents are
checked, and a decode-cache file that is not exactly what this module writes is ignored and
rewritten. Functions return plain tensors and dicts; data.py and spot.py wrap them.
"""

import argparse
import dataclasses
import hashlib
import importlib
import json
import logging
import math
import os
import pickle
import platform
import re
import shlex
import signal
import statistics
import sys
import tarfile
import tempfile
import time
import urllib.request
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager, nullcontext, suppress
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F


# -----------------------------------------------------------------------------
# Flags: argparse types that check a value where the flag is declared (argparse then names the
# flag in its error, before any work is done)

def _argument_type(kind, ok, expected):
    """An argparse type: kind(text), refused unless ok(value), with a message saying what was
    expected (argparse adds the flag's name)."""
    def parse(text):
        try:
            value = kind(text)
        except (ValueError, OverflowError):
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"must be {expected}, got {text!r}")
        return value
    return parse


def int_at_least(low):
    """An argparse type: an int >= low."""
    return _argument_type(int, lambda value: value >= low, f"an int >= {low}")


def float_in(low, high=math.inf, low_open=False, high_open=False):
    """An argparse type: a finite float in [low, high], or (low, ...) / (..., high) when open
    (float() alone would accept 'nan' and 'inf')."""
    closing = ")" if high_open or high == math.inf else "]"
    interval = f"{'(' if low_open else '['}{low}, {high}{closing}"
    def ok(v):
        return (math.isfinite(v) and (low < v if low_open else low <= v)
                and (v < high if high_open else v <= high))
    return _argument_type(float, ok, f"a finite number in {interval}")


# An argparse type: finite numbers, comma-separated -> a tuple (input statistics: R,G,B).
float_list = _argument_type(lambda text: tuple(float(v) for v in text.split(",")),
                            lambda values: all(map(math.isfinite, values)),
                            "comma-separated finite numbers, e.g. 0.5,0.5,0.5")

# An argparse type: a count (an int >= 0) or a fraction (a float in (0, 1)).
count_or_fraction = _argument_type(
    lambda text: int(float(text)) if float(text).is_integer() else float(text),
    lambda v: v >= 0 if isinstance(v, int) else 0 < v < 1,
    "a count (an int >= 0) or a fraction in (0, 1)")


def name_list(choices):
    """An argparse type: comma-separated names, each one of `choices` -> a list."""
    return _argument_type(lambda text: [n.strip() for n in text.split(",") if n.strip()],
                          lambda names: names and all(n in choices for n in names),
                          f"comma-separated names from {','.join(choices)}")


def parse_tokens(text, n_grid, flag="--tokens", priors=()):
    """The one grammar of --tokens in every command: a count '16', a list '4,8,16', a range
    '4-64', 'all' (the full patch grid, n_grid tokens), or a mix '4,8,16-32' -> the sorted
    budgets. At most 4x the grid: more is no longer a sparse budget, and may not fit in memory;
    at most the grid when the budgets are drawn from `priors` that include "grid"."""
    counts = []
    try:
        for item in str(text).strip().lower().split(","):
            if item.strip() == "all":
                counts.append(n_grid)
            elif "-" in item:
                low, high = (int(v) for v in item.split("-"))
                counts += range(low, high + 1)
            else:
                counts.append(int(item))
    except ValueError:
        counts = []
    if not counts or min(counts) < 1 or max(counts) > 4 * n_grid:
        raise ValueError(f"{flag} must be N, A-B, A,B,C or 'all' (the {n_grid} grid cells), each "
                         f"from 1 to {4 * n_grid}, got {text!r}")
    if "grid" in priors and max(counts) > n_grid:
        raise ValueError(f"{flag} up to {max(counts)} but prior 'grid' has only {n_grid} cells")
    return sorted(set(counts))


def add_alias(parser, dest, *aliases, **kwargs):
    """Other spellings of a flag (aliases that commands in RESULTS.md and the research folder
    use) that stay out of --help: a hidden flag writing to the same dest (argparse's own aliases
    would be listed). kwargs: the flag's type, action."""
    for flag in aliases:
        parser.add_argument(flag, dest=dest, default=argparse.SUPPRESS, help=argparse.SUPPRESS,
                            **kwargs)


def option(default, help, **argparse_kwargs):
    """A dataclass field that is also a command-line flag (add_fields: search_steps ->
    --search-steps); alias="--oracle-steps": a second spelling, hidden from --help (add_alias)."""
    return dataclasses.field(default=default, metadata={"help": help, **argparse_kwargs})


def add_fields(parser, config_class):
    """A flag for every field of config_class made by option(); a tuple default shows as 'a,b'."""
    for f in (f for f in dataclasses.fields(config_class) if f.metadata):
        kwargs = {key: value for key, value in f.metadata.items() if key != "alias"}
        default = ",".join(map(str, f.default)) if isinstance(f.default, tuple) else f.default
        parser.add_argument("--" + f.name.replace("_", "-"), default=default, **kwargs)
        if "alias" in f.metadata:
            kwargs.pop("help")
            add_alias(parser, f.name, f.metadata["alias"], **kwargs)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help in two columns (help text from column 26), the description and epilog as written,
    and N for the value of a flag that names no other (--epochs N)."""

    def __init__(self, prog):
        super().__init__(prog, max_help_position=26)

    def _get_default_metavar_for_optional(self, action):
        return "N"


def check_out_dir(out, flag):
    """Create the output folder and prove it writable now, not after an hour of work."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{flag} {out} is a file; pass a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out).close()      # a file can be made there (and is gone)
    except OSError as error:
        raise ValueError(f"{flag} {out} is not writable ({error.strerror}); choose another folder")


# -----------------------------------------------------------------------------
# Device and precision

def cpu_name():
    """The CPU's model name, to print beside every timing (speed differs a lot between CPUs)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name"))
    except (OSError, StopIteration):
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


def choose_precision(precision, device):
    """--precision -> "bf16" or "fp32". auto: bf16 on a CUDA GPU that supports it, else fp32. On
    the CPU bf16 is taken only when asked: CPU flags do not say whether it is faster (the same
    training step ran bf16 2.6x faster than fp32 on one 2-core CPU and 1.5x slower on another,
    both listing avx512_bf16), and a timed race would make one command give different results
    from one run to the next. `python -m experiments.bench` measures both on your CPU."""
    if precision != "auto":
        return precision
    return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"


# -----------------------------------------------------------------------------
# Files: the one atomic writer

def write_atomic(path, content):
    """Write a file so that no reader, and no crash half-way, ever sees half of it: write a
    temporary file in the same folder, then os.replace it onto `path` (atomic on POSIX and
    Windows). Two processes writing the same path at once each write a complete file.

    content: a str (text), a callable that writes the file at the path it is given (a figure's
    savefig), or anything torch.save can write (a checkpoint's dict of tensors).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=path.suffix)
    os.close(fd)
    try:
        if isinstance(content, str):
            Path(tmp).write_text(content)
        elif callable(content):
            content(tmp)
        else:
            torch.save(content, tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)    # mkstemp makes it private (0600); use normal permissions
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def save_per_image(path, per_image):
    """An evaluation's per-image results -> one compressed .npz, so that every interval and every
    paired difference can be recomputed without a checkpoint. per_image: {key tuple: tensor}, the
    file's names join each key with "/"; 0/1 correctness stays bool ((draws, n) or (n,): a few
    bits per image once compressed), anything else (saliency reads) is stored as float16."""
    arrays = {"/".join(map(str, key)): values.cpu().numpy() for key, values in per_image.items()}
    arrays = {name: a if a.dtype == bool else a.astype(np.float16) for name, a in arrays.items()}
    write_atomic(path, lambda tmp: np.savez_compressed(tmp, **arrays))


def load_per_image(path):
    """save_per_image's file -> {key tuple (its numbers as int): numpy array}."""
    with np.load(path, allow_pickle=False) as saved:
        keys = {name: tuple(int(p) if p.isdigit() else p for p in name.split("/"))
                for name in saved.files}
        return {key: saved[name] for name, key in keys.items()}


# -----------------------------------------------------------------------------
# train.py's command line: its flags, and the rules of presets and --resume

PRESET_HELP = """presets (the (p) flags' defaults; --preset, else the dataset's name):
  shapes             the default run: built-in data, a few minutes on a CPU
  cifar10-cpu        the CIFAR-10 recipe of RESULTS.md (CPU)
  imagenette-cpu     the Imagenette recipe of RESULTS.md (CPU, --dataset folder)
  cifar10            not yet run: a larger single-GPU recipe
  folder             not yet run: ImageNet-style folders at 128 px
  imagenet-retrofit  not run here: a pretrained ViT-B/16 (--init-from timm:NAME,
                     --device cuda) on an ImageNet subset at 224 px"""
TRAIN_DESCRIPTION = """Train a SPoT ViT (arXiv 2507.01654): each batch draws a budget from --tokens
and positions from one of --train-priors, so one model reads an image through
any sparse set of subpixel tokens (retrofitting)."""
# Flags of one type and a help text each: (flag, type, help); (p) = the preset's by default.
TYPED_FLAGS = (("--image-size", int, "(p) image side, pixels (a multiple of --window)"),
               ("--window", int, "(p) each token reads an N x N window"),
               ("--dim", int, "(p) token width"), ("--depth", int, "(p) blocks"),
               ("--heads", int, "(p) attention heads"),
               ("--mlp-ratio", float, "(p) MLP width / dim"),
               ("--val-size", count_or_fraction, "(p) validation images: count or fraction"),
               ("--train-limit", int_at_least(1), "train on N images (a fixed random subset)"),
               ("--test-limit", int_at_least(1), "evaluate on the first N val/test images"),
               ("--epochs", int_at_least(1), "(p)"),
               ("--batch-size", int_at_least(1), "(p) global, split over processes"),
               ("--lr", float_in(0, low_open=True), "(p) peak AdamW lr"),
               ("--warmup-epochs", float_in(0), "(p) linear warm-up"))
# Flags that may differ when a run is resumed: they change how it runs, not what it computes.
RESUME_MAY_CHANGE = {"resume", "out", "threads", "device", "progress", "max_steps", "cache_dir",
                     "workers"}


def train_parser(presets, datasets, priors):
    """train.py's flags. Those marked (p) default to the preset's value (see parse_run)."""
    parser = argparse.ArgumentParser(usage="train.py [-h] [options]",
                                     description=TRAIN_DESCRIPTION, epilog=PRESET_HELP,
                                     formatter_class=HelpFormatter)
    add = parser.add_argument
    add("--dataset", default="shapes", choices=datasets, metavar="NAME",
        help="shapes (built in, default), cifar10 or folder")
    add("--preset", choices=tuple(presets), metavar="NAME", help="one of the presets below")
    add("--data-dir", type=lambda path: str(Path(path).expanduser().resolve()), metavar="DIR",
        help="dataset folder; folder: DIR/{train,val}/<class>/*")
    add("--cache-dir", metavar="DIR", help="decoded images (default: $SPOT_CACHE, ~/.cache/spot)")
    add("--crop-pct", type=float_in(0, 1, low_open=True), metavar="P",
        help="(p) ImageNet crops: random-resized; eval centre P")
    add("--workers", type=int_at_least(1), metavar="N",
        help="processes decoding streamed images (cores / ranks)")
    for flag, kind, what in TYPED_FLAGS:
        add(flag, type=kind, help=what)
    add("--tokens", metavar="T", help="(p) budgets drawn per batch: N, A-B, A,B,C or all")
    add("--train-priors", type=name_list(priors), metavar="P,Q",
        help="(p) priors drawn per batch, of " + ",".join(priors))
    add("--eval-tokens", default="16", metavar="T", help="budgets evaluated each epoch (16)")
    add("--eval-prior", default="isotropic", choices=priors, metavar="P",
        help="their prior (isotropic)")
    add("--final-test", action=argparse.BooleanOptionalAction, default=True,
        help="read test once, at the end (on)")
    add("--init-from", metavar="SRC", help="a train.py checkpoint or a pretrained ViT (file, "
        "HF folder, timm:NAME): its shape decides")
    for stat in ("mean", "std"):
        add(f"--image-{stat}", type=float_list, metavar="R,G,B",
            help=f"a pretrained source's input {stat} (its config's)")
    add("--label-smoothing", type=float_in(0, 1, high_open=True), default=0.1,
        help="(0.1)")
    add("--augment-padding", type=int_at_least(0),
        help="(p) random-crop padding, pixels")
    add("--max-steps", type=int_at_least(1),
        help="stop after N steps in all (--resume goes on)")
    add("--device", default="auto", choices=("auto", "cuda", "cpu"),
        help="auto: CUDA if available")
    add("--precision", default="auto", choices=("auto", "fp32", "bf16"),
        help="auto: bf16 on CUDA, else fp32")
    add("--threads", type=int_at_least(1), help="CPU threads (all cores)")
    add("--seed", type=int, default=0, help="order, crops, positions, init (0)")
    add("--out", metavar="DIR", help="run folder (runs/<dataset>)")
    add("--resume", action="store_true", help="continue the run in --out, with its own flags")
    add("--progress", action=argparse.BooleanOptionalAction, default=True, help="tqdm bars (on)")
    return parser


def parse_run(parser, argv, new_defaults, check):
    """train.py's command line -> args. The flags are parsed onto defaults (argparse sets no
    default over a value): a new run's are new_defaults(the flags as given); a resumed run's
    are the ones it was started with, so a flag given again with another value is refused (it
    would change what the run computes). check(args) raises ValueError for values that cannot
    work; every ValueError is a usage error, before any data is loaded."""
    first = parser.parse_args(argv)
    out = first.out or os.path.join("runs", first.dataset)
    try:
        check_out_dir(out, "--out")
        resolve_device(first.device)
        if first.resume:
            base = _resumed_flags(out)
        elif any((Path(out) / name).exists() for name in ("checkpoint.pt", "metrics.jsonl")):
            unlock_run_folder(lock_run_folder(out))   # a run that holds it is named (exit 1)
            raise ValueError(f"--out {out} already holds a run; pass --resume to continue it, "
                             f"or choose another --out")
        else:
            base = new_defaults(first)
        args = parser.parse_args(argv, argparse.Namespace(**base, out=out))
        changed = [f"--{k.replace('_', '-')} {getattr(args, k)!r} (the run has {v!r})"
                   for k, v in base.items() if first.resume and getattr(args, k) != v]
        if changed:
            raise ValueError(f"--resume: {out} was trained with other flags; these differ: "
                             f"{'; '.join(changed)}. Resume without them, or start a new run "
                             f"in another --out")
        check(args)
        if args.image_size % args.window:
            raise ValueError(f"--image-size {args.image_size}: not a multiple of --window "
                             f"{args.window}, whose grid would leave pixels unread")
        check_memory(args)
    except ValueError as error:
        parser.error(str(error))
    return args


def source_decides(given, config, flags):
    """The model flags a pretrained --init-from decides -> {flag: the source's value}; a flag
    given (not None) that contradicts it is a ValueError saying what to do."""
    decided = {}
    for flag in flags:
        ours, theirs = getattr(given, flag), getattr(config, flag)
        if flag == "image_size":      # (H, W) of a square grid -> H
            theirs = theirs[0]
        if ours is not None and ours != theirs:
            option = "--" + flag.replace("_", "-")
            raise ValueError(f"{option} {ours} contradicts --init-from {given.init_from}, whose "
                             f"{flag} is {theirs}: leave {option} out (the source decides it) "
                             f"or use another source")
        decided[flag] = theirs
    return decided


def _resumed_flags(out):
    """The flags the run in `out` was started with, but those that may change."""
    try:
        checkpoint = read_checkpoint(Path(out) / "checkpoint.pt")
    except ValueError as error:
        raise ValueError(f"--resume: {error}") from None
    if "args" not in checkpoint:
        raise ValueError(f"--resume: {out}/checkpoint.pt holds a model but no run (no 'args'): "
                         f"start a new run from it with --init-from {out}/checkpoint.pt")
    saved = checkpoint["args"]
    metrics = Path(out) / "metrics.jsonl"
    # The final test's line is the one written after the last checkpoint (when there is a test).
    tested = metrics.exists() and metrics.stat().st_size > (checkpoint.get("metrics_bytes") or 0)
    tested = tested or not (saved["val_size"] and saved["final_test"])
    if checkpoint["epoch"] >= saved["epochs"] and tested:
        raise ValueError(f"--resume: the run in {out} is finished ({saved['epochs']} epochs, "
                         f"{checkpoint['step']} steps; its results are in {metrics}). Evaluate "
                         f"it with: python oracle.py --checkpoint {out}/checkpoint.pt; or train "
                         f"on from it with --init-from {out}/checkpoint.pt --out ANOTHER")
    return {k: v for k, v in saved.items() if k not in RESUME_MAY_CHANGE}


def resume_command(args):
    """The command that continues this run: --resume, --out and the flags given that may change
    on a resume (--max-steps above all: without it the resumed run would go on to --epochs)."""
    words = ["python", "train.py", "--resume", "--out", args.out]
    for flag in ("max_steps", "cache_dir", "threads"):
        if getattr(args, flag):              # (each is >= 1, or a folder)
            words += ["--" + flag.replace("_", "-"), str(getattr(args, flag))]
    return shlex.join(words)


def check_memory(args):
    """Refuse a model whose training state cannot fit in the machine's memory (a GPU's is less):
    its parameters (a lower bound from the flags: the blocks' matrices) x 16 bytes (fp32 weights,
    gradients and AdamW's two moments). Activations come on top."""
    need = 16 * args.depth * (4 + 2 * args.mlp_ratio) * args.dim ** 2
    have = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") if os.name == "posix" else 0
    if need > have > 0:
        raise ValueError(f"the model (--dim {args.dim}, --depth {args.depth}) needs "
                         f"{need / 2**30:,.1f} GiB or more for its weights, gradients and AdamW's "
                         f"moments; the machine has {have / 2**30:,.1f} GiB")


# -----------------------------------------------------------------------------
# Reporting an evaluation: intervals, rows, oracle.py's command line

def bootstrap_interval(correct, resamples=1000, seed=0, level=0.95):
    """(draws, n) or (n,) 0/1 correctness -> (accuracy %, low %, high %).

    The accuracy is the mean over images of each image's accuracy averaged over the position
    draws. The interval is the percentile bootstrap over images: resample the n images with
    replacement `resamples` times and take the central `level` of the resampled accuracies. It
    answers "how much would this number move on another test set of the same size?", so two
    rows whose intervals overlap are a tie. (For n = 10,000 at 50 % it is about +-1 point.)
    """
    per_image = correct.float().reshape(-1, correct.shape[-1]).mean(0)        # (n,)
    n = len(per_image)
    picks = torch.randint(0, n, (resamples, n), generator=torch.Generator().manual_seed(seed))
    means = per_image[picks].mean(1)                                          # (resamples,)
    tail = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    low, high = torch.quantile(means.double(), tail)
    return 100 * per_image.mean().item(), 100 * low.item(), 100 * high.item()


def table_row(method, prior, tokens, correct=None, knn_correct=None, seed=0, **extra):
    """One row of a results table (oracle.py's, experiments/label_free.py's): the accuracies of
    `method` at `prior` and `tokens`, with their 95 % intervals (None = not applicable).
    correct / knn_correct: (draws, n) or (n,) 0/1 per image."""
    row = {"method": method, "prior": prior, "tokens": tokens, **extra}
    for name, values in ("top1", correct), ("knn", knn_correct):
        interval = (None,) * 3 if values is None else bootstrap_interval(values, seed=seed)
        row.update(zip((name, f"{name}_low", f"{name}_high"), interval))
    # "draws": 1 for an (n,) correctness; both None for a row that does not apply
    draws, n = (None, None) if correct is None else correct.reshape(-1, correct.shape[-1]).shape
    return {**row, "n_images": n, "draws": draws}


def summary(results):
    """A plain-text view of results["rows"] for the terminal: top-1 % per (method, prior), then
    per budget. (experiments/tables.py renders results.json as the markdown tables of
    RESULTS.md.)"""
    usual = statistics.mode(r["n_images"] for r in results["rows"])   # the table's image count
    table = {f"top-1 % ({usual} images) at": [f"{b} T" for b in results["settings"]["tokens"]]}
    for r in results["rows"]:
        cell = "n/a" if r["top1"] is None else f"{r['top1']:.1f}"
        fewer = f" ({r['n_images']} images)" if r["n_images"] not in (usual, None) else ""
        table.setdefault(f"{r['method']}: {r['prior']}{fewer}", []).append(cell)
    return "\n".join(f"{name:<28}" + " ".join(f"{c:>7}" for c in cells)
                     for name, cells in table.items())


def run_name(checkpoint):
    """runs/cifar10-spot/checkpoint.pt -> 'cifar10-spot'; any other file -> its stem."""
    path = Path(checkpoint).resolve()
    return path.parent.name if path.name == "checkpoint.pt" else path.stem


@contextmanager
def usage_errors(parser):
    """Inside it, a bad file or flag is a message, never a traceback: a ValueError is a usage
    error (argparse's, exit 2), a DataError a paragraph for the user (exit 2, no usage text)."""
    try:
        yield
    except ValueError as error:
        parser.error(str(error))
    except DataError as error:
        parser.exit(2, f"error: {error}\n")


def parse_eval_args(config_class, argv):
    """oracle.py's command line: a flag for every field of config_class (its EvalConfig), and
    --name, --data-dir, --device, --threads, --out -> (parser, args), with --device resolved,
    --out proven writable and torch's CPU threads set, before any model or image is loaded."""
    parser = argparse.ArgumentParser(
        description="SPoT-ON (the oracle search) and the paper's results table.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_fields(parser, config_class)
    add = parser.add_argument
    add("--name", help="a run name for the table, e.g. cifar10-spot (None: the checkpoint's "
        "folder)")
    add("--data-dir", help="dataset folder (None: the one the checkpoint was trained on)")
    add("--device", default="auto", choices=("auto", "cpu", "cuda"))
    add("--threads", type=int_at_least(1), help="CPU threads for torch (None: all cores)")
    add("--precision", default="auto", choices=("auto", "fp32", "bf16"),
        help="the model's forward (auto: bf16 on CUDA); positions and gradients stay fp32")
    add("--out", required=True, help="output folder")
    args = parser.parse_args(argv)
    with usage_errors(parser):
        args.device = resolve_device(args.device)
        args.bf16 = choose_precision(args.precision, args.device) == "bf16"
        check_out_dir(args.out, "--out")
    torch.set_num_threads(args.threads or torch.get_num_threads())   # else all cores
    return parser, args


def config_from(config_class, args):
    """The config_class (a dataclass) holding the values args (parsed flags) gives its fields."""
    return config_class(**{f.name: getattr(args, f.name) for f in dataclasses.fields(config_class)})


# -----------------------------------------------------------------------------
# Training runs: processes (torchrun), Ctrl-C, checkpoints that resume exactly, metrics

class Processes(AbstractContextManager):
    """The processes of a run: one (`python train.py`) or several under torchrun, which sets
    RANK, WORLD_SIZE and LOCAL_RANK (DistributedDataParallel; NCCL on CUDA, gloo on the CPU).
    Every collective below is a no-op for one process, so train.py never asks how many there are.
    `with Processes(args) as procs:` also locks the run folder --out while rank 0 writes it
    (lock_run_folder), and unlocks it when the block ends, by a return or an error.
    """

    def __init__(self, args):
        torch.set_num_threads(args.threads or torch.get_num_threads())      # default: all cores
        # Adam's second-moment estimates of tiny gradients underflow into denormal floats, which
        # x86 CPUs process many times slower; flushing them to zero changes nothing measurable.
        torch.set_flush_denormal(True)
        self.rank = int(os.environ.get("RANK", 0))
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        self.device = resolve_device(args.device)
        # DataLoader workers decoding streamed images: the cores, shared by this machine's ranks
        self.workers = args.workers or max(
            1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
        # LOG.info lines (what --init-from loaded) printed by rank 0; before this, none is.
        if self.rank == 0:
            logging.basicConfig(level=logging.INFO, format="%(message)s")
        self.lock = self.rank == 0 and lock_run_folder(args.out)   # before the rendezvous
        if self.world > 1:
            if self.device.type == "cuda":
                self.device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
                torch.cuda.set_device(self.device)
            dist.init_process_group(backend="nccl" if self.device.type == "cuda" else "gloo")

    def __exit__(self, *error):
        unlock_run_folder(self.lock)

    def log(self, text):
        """Print on rank 0 only."""
        if self.rank == 0:
            print(text)

    def log_metrics(self, out, metrics):
        """log_metrics by rank 0 only."""
        if self.rank == 0:
            log_metrics(out, metrics)

    def sum(self, tensor):
        """The element-wise sum over processes, in place."""
        if self.world > 1:
            dist.all_reduce(tensor)
        return tensor

    def any(self, flag):
        """True on every process when `flag` is true on any (so that all stop at one step)."""
        return bool(self.sum(torch.tensor(float(flag), device=self.device)))

    def gather(self, value):
        """[each process's value], on every process."""
        values = [value] * self.world
        if self.world > 1:
            dist.all_gather_object(values, value)
        return values

    def wrap(self, model):
        """The model as the training step calls it: DDP averages the gradients over processes."""
        if self.world == 1:
            return model
        ids = [self.device.index] if self.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def close(self, run):
        """All processes leave together, after DDP's reducer (which holds gloo work) is gone."""
        run.train_model = None
        if self.world > 1:
            dist.barrier()
            dist.destroy_process_group()


# The run folder's lock: --out/.lock, flock-ed by the run writing the folder and holding its PID
# (the kernel drops a flock when its process dies, however it dies), so a PID in a lock file that
# nobody holds is stale: left by a killed run, and taken over. Where there is no flock (Windows)
# the folder is not locked. A kill during write_atomic leaves a temporary file of the run's
# files behind (LEFTOVER): the next run in the folder removes it.
LEFTOVER = r"\.(checkpoint-\w{8}\.pt|metrics-\w{8}\.jsonl|run-\w{8}\.json)"   # mkstemp's names


def lock_run_folder(out):
    """Lock the run folder for this process -> the open lock file, for unlock_run_folder (None
    without flock). A folder another process holds is refused, naming its PID (exit 1)."""
    try:
        import fcntl           # POSIX
    except ImportError:
        return None
    lock = open(Path(out) / ".lock", "a+", 1, errors="replace")     # line-buffered
    lock.seek(0)
    holder = lock.read().strip()
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        sys.exit(f"error: --out {out} is in use by the run of process {holder} (its lock file "
                 f"{lock.name}); wait for it to end, or choose another --out")
    if holder:
        print(f"--out {out}: taking over the stale lock of process {holder}, which has ended")
    lock.truncate(0)
    lock.write(f"{os.getpid()}\n")
    for leftover in Path(out).glob(".*"):
        if re.fullmatch(LEFTOVER, leftover.name):
            leftover.unlink()
    return lock


def unlock_run_folder(lock):
    """Empty the lock file (no PID: nobody holds it) and close it, which drops the flock. The
    file stays: removing it would let a run that opened it just before lock a file no other run
    can see."""
    if lock:
        lock.truncate(0)
        lock.close()


@contextmanager
def ctrl_c(log):
    """Ctrl-C finishes the current step, saves and exits (130); a second Ctrl-C stops at once.
    -> {"requested": bool}, read by the training loop. The caller's handler is back afterwards
    (tests and notebooks call train.main()); signals are handled on the main thread only."""
    stop = {"requested": False}

    def on_sigint(signum, frame):
        if stop["requested"]:
            raise KeyboardInterrupt
        stop["requested"] = True
        log("\ninterrupt: saving a checkpoint after this step (Ctrl-C again to abort)")
    previous = signal.getsignal(signal.SIGINT)
    with suppress(ValueError):         # (raised off the main thread)
        signal.signal(signal.SIGINT, on_sigint)
    try:
        yield stop
    finally:
        with suppress(ValueError):
            signal.signal(signal.SIGINT, previous)


@dataclasses.dataclass
class Run:
    """What a training run changes as it goes (train.py's args stay as parsed). save_checkpoint
    and restore write and read all of it, so --resume continues exactly."""
    args: argparse.Namespace
    procs: Processes              # rank, world (torchrun), device, log
    model: torch.nn.Module        # the SPoTViT
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    tokens: list                  # the budgets training draws from (--tokens)
    budgets: list                 # the budgets evaluated each epoch (--eval-tokens)
    generators: dict = None       # the random streams: random_streams
    train_model: torch.nn.Module = None   # the model, wrapped by DDP under torchrun
    precision: str = "fp32"       # or "bf16": decided once per run
    epoch: int = 0
    step: int = 0
    running: torch.Tensor = None  # this epoch's sums: loss, correct, images

    def check_finite(self, loss):
        """Stop the run at once (exit 1, every process) when the training loss is not finite;
        the last checkpoint is kept as it is."""
        if self.procs.any(not torch.isfinite(loss)):
            self.stop(f"training diverged: the loss is {loss.item()} at step {self.step}; start "
                      f"again with a lower --lr or a longer --warmup-epochs")

    def stop(self, problem):
        """Exit 1 with a message: the problem, and the checkpoint the run leaves as it was."""
        path = Path(self.args.out) / "checkpoint.pt"
        sys.exit(f"error: {problem} ({path}, the last checkpoint, is kept)" if path.exists()
                 else f"error: {problem} (no checkpoint was saved)")


def random_streams(seed, procs):
    """Training's three random streams, each its own generator so that a checkpoint captures
    them exactly (evaluation draws from fresh seeded ones; nothing draws from torch's global
    one): "augment" (crops, flips), "positions" (the priors' draws), "choice" (prior, budget)."""
    names = ("augment", "positions", "choice")
    # "choice" is the same on every process, so each step draws one budget and prior for all
    # (no process waits for one with more tokens); crops and positions differ per process.
    return {name: torch.Generator(procs.device).manual_seed(
        seed + i + 1000 * procs.rank * (name != "choice")) for i, name in enumerate(names, 1)}


RESUMED_PARTS = ("model", "optimizer", "scheduler")


def save_checkpoint(path, run, classes):
    """Everything --resume needs, in one file written atomically by rank 0: the model (config and
    weights), optimizer, schedule, position in training, precision, flags, and every process's
    random streams (so a resumed DDP run is exact too). Collective: every process calls it.
    Weights that are not finite, or a file that cannot be written (a full disk), stop the run
    (Run.stop), and the previous checkpoint stays as it was."""
    if not all(torch.isfinite(p).all() for p in run.model.parameters()):   # same on every rank
        run.stop(f"training diverged: the weights are not finite after step {run.step}; start "
                 f"again with a lower --lr or a longer --warmup-epochs")
    streams = {name: generator.get_state() for name, generator in run.generators.items()}
    rng = run.procs.gather(streams)
    if run.procs.rank == 0:
        parts = {part: getattr(run, part).state_dict() for part in RESUMED_PARTS}
        with open(Path(run.args.out) / "metrics.jsonl", "a") as metrics:
            metrics_bytes = metrics.tell()     # its end
        try:
            write_atomic(path, {"model_config": dataclasses.asdict(run.model.config), **parts,
                                "epoch": run.epoch, "step": run.step, "running": run.running,
                                "rng": rng, "classes": classes, "precision": run.precision,
                                "args": vars(run.args), "metrics_bytes": metrics_bytes})
        except OSError as error:
            run.stop(f"writing {path}: {error}; free space, then: {resume_command(run.args)}")


def restore(run, checkpoint):
    """Put a run back where save_checkpoint left it: weights, optimizer, schedule, position in
    the epoch, precision and random streams (more processes than saved reuse the last streams).
    metrics.jsonl goes back to its length at the checkpoint: a run logs an epoch's line before it
    saves the epoch's checkpoint, so a crash in between leaves a line (maybe cut short) that the
    checkpoint does not have, and the resumed run writes it again; so does the final test's."""
    for part in RESUMED_PARTS:
        getattr(run, part).load_state_dict(checkpoint[part])
    streams = checkpoint["rng"][min(run.procs.rank, len(checkpoint["rng"]) - 1)]
    for name, generator in run.generators.items():
        generator.set_state(streams[name])
    run.epoch, run.step = checkpoint["epoch"], checkpoint["step"]
    run.running, run.precision = checkpoint["running"], checkpoint["precision"]
    if run.procs.rank == 0:       # (None: the file as it is)
        with open(Path(run.args.out) / "metrics.jsonl", "a") as f:
            f.truncate(checkpoint.get("metrics_bytes"))


def limit_splits(dataset, args):
    """--train-limit: a random but fixed subset of train (it keeps every class represented);
    --test-limit: the first N validation and test images (the loaders mix the classes)."""
    def subset(split, keep):      # no split stays no split
        return split and split.take(keep)
    if args.train_limit:             # (an int >= 1, or None)
        generator = torch.Generator().manual_seed(args.seed)
        keep = torch.randperm(len(dataset.train), generator=generator)
        dataset.train = subset(dataset.train, keep[:args.train_limit].sort().values)
    if args.test_limit:
        dataset.val = subset(dataset.val, slice(args.test_limit))
        dataset.test = subset(dataset.test, slice(args.test_limit))
    if len(dataset.train.labels.unique()) < 2:      # every accuracy would be 100 %
        sys.exit(f"error: --dataset {args.dataset}: one class, a classifier needs two or more")


def write_run_info(run):
    """run.json beside the metrics: the command, the machine and the flags (small enough to
    commit with the results)."""
    if run.procs.rank == 0:
        info = dict(command=" ".join(sys.argv), cpu=cpu_name(), torch=torch.__version__,
                    precision=run.precision, args=vars(run.args))
        write_atomic(Path(run.args.out) / "run.json", json.dumps(info, indent=1, default=str))


def log_metrics(out, metrics, log=print):
    """One line of out/metrics.jsonl and one printed line: its losses and accuracies. A full disk
    is a message (exit 1)."""
    path = Path(out) / "metrics.jsonl"
    try:
        with open(path, "a") as f:
            f.write(json.dumps(metrics) + "\n")
    except OSError as error:        # (a resumed run drops a line cut short: restore)
        sys.exit(f"error: could not append to {path} ({error})")
    words = [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()]
    log(" ".join(words))


def read_init_from(source):
    """train.py's --init-from -> (an SPoT checkpoint's dict, or None; None, or the pretrained
    ViT to pass to spot.load_pretrained: source itself). timm:NAME, a folder (timm's HF layout)
    and .safetensors are pretrained ViTs; another file is read here to tell the two apart, and
    load_pretrained reads a pretrained one again, so that its errors name the file."""
    path = Path(source)
    if source.startswith("timm:") or path.is_dir() or path.suffix == ".safetensors":
        return None, source
    if not path.is_file():
        raise ValueError(f"--init-from {source} does not exist; pass a checkpoint of train.py, "
                         f"a ViT state dict (.pth, .pt, .bin, .safetensors), timm's HF folder "
                         f"or timm:NAME")
    loaded = load_file(path, f"--init-from {source}", "a checkpoint or a state dict")
    if isinstance(loaded, dict) and {"model_config", "model"} <= loaded.keys():
        LOG.info(f"loaded --init-from {source}: a checkpoint of train.py, every key, "
                 f"{shape_text(loaded['model_config'])}")
        return loaded, None
    return None, source


# -----------------------------------------------------------------------------
# Data files: CIFAR-10 and class folders, read safely into uint8 tensors

class DataError(Exception):
    """The data is missing or unreadable. The message is a complete paragraph meant for a user:
    command-line scripts print it and exit, without a traceback. (data.py re-exports it.)"""


# -----------------------------------------------------------------------------
# Pixels: channel statistics and resizing of uint8 images

def channel_stats(images):
    """Per-channel mean and std of uint8 images (N, C, H, W), as floats in [0, 1].

    Computed from a 256-bin histogram per channel (torch.bincount on the uint8 values): exact,
    and it never makes a float copy of the images (which would be 4x their size in memory).
    """
    if isinstance(images, ImageFiles):      # streamed: measured on its first 256 images, which
        images = images[:256]               # the fixed shuffle made a sample of every class
    values = torch.arange(256).double() / 255                             # (256,)
    hist = torch.stack([torch.bincount(channel.flatten(), minlength=256)
                        for channel in images.unbind(1)]).double()         # (C, 256)
    p = hist / hist.sum(1, keepdim=True)                                   # (C, 256) frequencies
    mean = (p * values).sum(1)                                             # (C,)
    std = (p * (values - mean[:, None]) ** 2).sum(1).sqrt()                # (C,)
    return tuple(tuple(round(v, 4) for v in s.tolist()) for s in (mean, std))


def resize_uint8(images, size):
    """Resize uint8 images (N, C, h, w) -> (N, C, H, W) uint8, bilinear with antialiasing.
    Works in chunks of 2048 images so the float copy stays small."""
    if images.shape[-2:] == size:
        return images
    out = images.new_empty(*images.shape[:2], *size)                    # (N, C, H, W) uint8
    for chunk, resized in zip(images.split(2048), out.split(2048)):
        x = F.interpolate(chunk.float(), size=size, mode="bilinear", antialias=True)
        resized.copy_(x.round().clamp(0, 255))          # whole numbers in 0..255: exact in uint8
    return out


# -----------------------------------------------------------------------------
# CIFAR-10: official pickles, or class folders; download when neither is there

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR10_BATCHES = ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5",
                   "test_batch"]

# A socket timeout only bounds each read, so a server that trickles one byte every few seconds
# would keep a download alive forever. The whole download therefore also has a deadline: far
# longer than a healthy download of the 170 MB archive needs, short enough that a stalled one
# ends with an error instead of a silent hang. (Tests lower it.)
DOWNLOAD_DEADLINE_S = 30 * 60


def load_cifar10(root, size, download=True, cache_dir=None, progress=True):
    """CIFAR-10 from `root` -> ((train_images, train_labels), (test_images, test_labels), classes).

    Prefers the official pickles (exact pixels, and no decoding); else class folders
    root/train/<class>/* and root/test/<class>/*; else downloads the official archive (when
    `download`). Images are 32 x 32 and resized to `size` = (H, W) if that differs.
    """
    root = Path(root).expanduser()
    pickles = root / CIFAR10_FOLDER
    has_pickles = all((pickles / name).is_file() for name in CIFAR10_BATCHES)
    has_folders = (root / "train").is_dir() and (root / "test").is_dir()
    if not has_pickles and not has_folders:
        _get_cifar10_archive(root, download, progress)
    train, test, classes = (_load_cifar_pickles(pickles) if has_pickles or not has_folders else
                            _load_class_folders(root / "train", root / "test", (32, 32),
                                                cache_dir, progress))
    return *[(resize_uint8(x, size), y) for x, y in (train, test)], classes


def _cifar_help(root, problem):
    """The one paragraph every missing-CIFAR-10 failure shows: what went wrong, every way out."""
    return DataError(
        f"{problem} CIFAR-10 is expected in {root} either as the official python version, "
        f"i.e. {root / CIFAR10_FOLDER}/ holding data_batch_1..5, test_batch and batches.meta, "
        f"or as class folders {root}/train/<class>/*.jpg and {root}/test/<class>/*.jpg. "
        f"To get it, download {CIFAR10_URL} (MD5 {CIFAR10_MD5}) on a machine with internet "
        f"access and extract it into {root} (tar xzf {CIFAR10_ARCHIVE} -C {root}), or put the "
        f"archive itself in {root} and it is checked and extracted for you. Or train on the "
        f"built-in dataset with `--dataset shapes`, which needs no download.")


def _cifar_damaged(path, problem):
    """The error for an official CIFAR-10 file that is there but not as the archive holds it."""
    return DataError(f"The CIFAR-10 file {path} {problem}. Delete the folder {path.parent} and "
                     f"extract the official archive {CIFAR10_URL} (MD5 {CIFAR10_MD5}) again.")


def _get_cifar10_archive(root, download, progress):
    """Make root/cifar-10-batches-py/ exist: check and extract a local archive, or download one.

    Nothing unverified is ever extracted: the MD5 is checked first (so the archive is the
    official one, which holds cifar-10-batches-py/). A download goes to a `.part` file that is
    verified before it gets the archive's name, and is deleted on any failure (network error,
    deadline, wrong MD5, Ctrl-C), so a failed attempt leaves nothing behind.
    """
    archive, absent = root / CIFAR10_ARCHIVE, f"CIFAR-10 was not found in {root} and"
    if archive.is_file():
        _verify_md5(archive, CIFAR10_MD5, root)
    elif not download:
        raise _cifar_help(root, f"{absent} downloading is switched off.")
    else:
        part = Path(f"{archive}.part")
        try:
            try:
                root.mkdir(parents=True, exist_ok=True)
                if progress:
                    print(f"downloading {CIFAR10_URL} -> {archive} (170 MB)")
                _urlretrieve(CIFAR10_URL, part)
            except Exception as e:
                raise _cifar_help(root, f"{absent} downloading {CIFAR10_URL} failed "
                                        f"({type(e).__name__}: {e}).") from None
            _verify_md5(part, CIFAR10_MD5, root, downloaded=True)
            part.replace(archive)    # only a complete, verified download gets the real name
        finally:
            part.unlink(missing_ok=True)
    try:
        with tarfile.open(archive, "r:gz") as tar:
            # Python >= 3.11.4/3.12: the "data" filter refuses absolute paths, links out of
            # root, devices... (older versions have no filters and ignore this attribute)
            tar.extraction_filter = getattr(tarfile, "data_filter", None)
            tar.extractall(root)
    except (tarfile.TarError, OSError) as e:
        raise _cifar_help(root, f"Extracting {archive} failed ({e}).")


def _urlretrieve(url, dest):
    """Download url -> dest within DOWNLOAD_DEADLINE_S (a separate function so tests can replace
    the network), each read waiting at most 30 s. read1 returns whatever has arrived, so the
    deadline is checked even while a server sends only a byte at a time."""
    deadline = time.monotonic() + DOWNLOAD_DEADLINE_S
    with urllib.request.urlopen(url, timeout=min(30, DOWNLOAD_DEADLINE_S)) as r, \
            open(dest, "wb") as f:
        while block := r.read1(1 << 20):
            f.write(block)
            if time.monotonic() > deadline:
                raise TimeoutError(f"the download did not finish within the deadline of "
                                   f"{DOWNLOAD_DEADLINE_S:g} s ({f.tell() / 1e6:.1f} MB received); "
                                   f"the server or the connection is too slow")


def _verify_md5(path, expected, root, downloaded=False):
    """Raise DataError unless the file's MD5 is `expected` (the file, 170 MB, is read at once)."""
    md5 = hashlib.md5(path.read_bytes()).hexdigest()
    if md5 != expected:
        what = f"The download of {CIFAR10_URL}" if downloaded else f"The archive {path}"
        raise _cifar_help(root, f"{what} has MD5 {md5}, expected {expected}: it is "
                                f"incomplete or not the official file. "
                                + ("It was deleted." if downloaded else "Delete it and try again."))


# The official files are Python 2 pickles of dicts holding bytes, ints, lists and numpy arrays;
# rebuilding an array needs exactly these three callables (numpy >= 2 names its core `_core`,
# files re-pickled by it say so). Loading any other global -- os.system, builtins.open, ... --
# is how a pickle runs code, so the unpickler refuses everything else.
_np_reconstruct = np.ndarray(0).__reduce__()[0]    # the function numpy's own pickles call

_PICKLE_GLOBALS = {("numpy.core.multiarray", "_reconstruct"): _np_reconstruct,
                   ("numpy._core.multiarray", "_reconstruct"): _np_reconstruct,
                   ("numpy", "ndarray"): np.ndarray,
                   ("numpy", "dtype"): np.dtype}


class _ForbiddenGlobal(pickle.UnpicklingError):
    pass


class _CifarUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in _PICKLE_GLOBALS:
            raise _ForbiddenGlobal(f"was not loaded: it refers to {module}.{name}, which the "
                                   f"official files never contain, and unpickling it could run "
                                   f"code. It is damaged or was tampered with")
        return _PICKLE_GLOBALS[module, name]


def _read_pickle(path):
    """Unpickle one CIFAR-10 file with _CifarUnpickler; any failure is a DataError naming it."""
    try:
        with open(path, "rb") as f:
            return _CifarUnpickler(f, encoding="bytes").load()   # py2 str -> bytes
    except Exception as e:
        raise _cifar_damaged(path, str(e) if isinstance(e, _ForbiddenGlobal) else
                             f"could not be read ({type(e).__name__}: {e}): it is truncated or "
                             f"not a CIFAR-10 python pickle") from None


def _read_cifar_batch(path):
    """One official batch file -> (images (n, 3, 32, 32) uint8, labels (n,) int64).

    Each row of b"data" is one image flattened channel-first: 1024 red values (32 rows of 32),
    then 1024 green, then 1024 blue -- so a plain reshape to (n, 3, 32, 32) is exact.
    """
    batch = _read_pickle(path)
    x, y = map(batch.get, (b"data", b"labels")) if isinstance(batch, dict) else (None, None)
    if x is None or y is None:    # official: a numpy array, a list of ints
        problem = "it is not a dict holding b'data' and b'labels'"
    elif (not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.shape[1:] != (3072,)
            or not len(x)):                                  # (n, 3 * 32 * 32), n >= 1
        got = (f"{x.dtype} array of shape {x.shape}" if isinstance(x, np.ndarray)
               else type(x).__name__)
        problem = f"its data is a {got}, not a uint8 array of shape (n, 3072)"
    elif not isinstance(y, list) or len(y) != len(x) or not all(type(v) is int for v in y):
        problem = f"it has {len(x)} images but its labels are not a list of {len(x)} ints"
    elif not all(0 <= v < 10 for v in y):
        problem = "it has labels out of range (CIFAR-10 labels are 0..9)"
    else:
        return torch.tensor(x.reshape(-1, 3, 32, 32)), torch.tensor(y)   # copies; y: int64
    raise _cifar_damaged(path, f"is not in the official format: {problem}")


def _load_cifar_pickles(folder):
    *batches, test = [_read_cifar_batch(folder / name) for name in CIFAR10_BATCHES]
    train = tuple(map(torch.cat, zip(*batches)))      # 5 x (images, labels) -> (images, labels)
    classes = [f"class_{i}" for i in range(10)]
    meta = folder / "batches.meta"
    if meta.is_file():   # only the class names; without it the labels are still right
        names = _read_pickle(meta)
        names = names.get(b"label_names") if isinstance(names, dict) else None
        if (not isinstance(names, list) or len(names) != 10
                or not all(isinstance(n, (bytes, str)) for n in names)):
            raise _cifar_damaged(meta, "is not in the official format: it should hold "
                                       "b'label_names', a list of 10 class names")
        classes = [n.decode("utf-8", "replace") if isinstance(n, bytes) else n for n in names]
    return train, test, classes


# -----------------------------------------------------------------------------
# Class folders (ImageNet-style): listing, decoding, the decode cache

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


def load_folder(root, size, crop_pct, cache_dir=None, progress=True):
    """An ImageNet-style dataset root/train/<class>/* + root/val/<class>/* (or test/)
    -> ([train_images, train_labels], [test_images, test_labels], classes). Above STREAMED_ABOVE
    pixels the images stay on disk (ImageFiles); crop_pct: see _decode_image."""
    root = Path(root).expanduser()
    test_name = next((s for s in ("val", "test") if (root / s).is_dir()), "val")
    missing = " and ".join(str(root / s) for s in ("train", test_name) if not (root / s).is_dir())
    if missing:
        raise DataError(f"The dataset folder {root} "
                        f"{'is missing ' + missing if root.is_dir() else 'does not exist'}. The "
                        f"folder dataset expects {root}/train/<class>/<image> and "
                        f"{root}/val/<class>/<image> (or test/ instead of val/), one subfolder per "
                        f"class, as in Imagenette.")
    return _load_class_folders(root / "train", root / test_name, size, cache_dir, progress,
                               crop_pct)


def _load_class_folders(train_dir, test_dir, size, cache_dir, progress, crop_pct=None):
    *train, classes = load_split_folder(train_dir, size, cache_dir, progress, crop_pct)
    *test, test_classes = load_split_folder(test_dir, size, cache_dir, progress, crop_pct)
    if classes != test_classes:
        raise DataError(f"The class folders of {train_dir} and {test_dir} differ, so labels would "
                        f"not match between the splits. Only in {train_dir.name}: "
                        f"{sorted(set(classes) - set(test_classes)) or 'none'}; only in "
                        f"{test_dir.name}: {sorted(set(test_classes) - set(classes)) or 'none'}.")
    return train, test, classes              # [images, labels] twice, and the class names


def load_split_folder(split_dir, size, cache_dir, progress, crop_pct=None):
    """One split of class folders -> (images (N, 3, H, W) uint8, labels (N,) int64, classes).

    split_dir is a Path, size (H, W), crop_pct see _decode_image. Up to STREAMED_ABOVE pixels:
    decoded once, held in memory and cached (see _cache_file); above: an ImageFiles, decoded per
    batch, so that nothing of the dataset's size is kept in memory or on disk. Class folders
    list their images class by class; the result is put in one fixed random order (seed 0) so
    that "the first N images" (--test-limit, oracle.py --limit, kNN banks) is a fair sample of
    every class, as it is for the official, pre-shuffled CIFAR-10 pickles.
    """
    classes, files = _list_split(split_dir)
    labels = torch.tensor([label for _, label in files])                 # (N,) int64
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    on_disk = ImageFiles([split_dir / rel for rel, _ in files], size, crop_pct)
    if max(size) > STREAMED_ABOVE:
        return on_disk.subset(order), labels[order], classes
    cache = _cache_file(cache_dir, split_dir, size, files, crop_pct)
    images = _cache_load(cache, classes, labels, size) if cache.is_file() else None
    if images is None:
        images = _decode_many(on_disk, progress, f"decoding {split_dir} (once; cached)")
        try:     # a cache we cannot write (read-only home, full disk) costs only a decode later
            write_atomic(cache, {"images": images, "labels": labels, "classes": classes})
        except OSError as e:
            warnings.warn(
                f"could not write the decode cache {cache} ({e}); the next load will decode the "
                f"images again. Set SPOT_CACHE or cache_dir to a writable folder.")
    return images[order], labels[order], classes


def _list_split(split_dir):
    """Class folders and image files of one split: (classes, [(relpath, label)]), sorted.

    Every class folder must hold at least one image; files directly in the split folder and
    hidden entries (.DS_Store, ...) are ignored.
    """
    classes = sorted(e.name for e in os.scandir(split_dir) if e.is_dir()
                     and not e.name.startswith(".")) if split_dir.is_dir() else []
    if not classes:
        flat = split_dir.is_dir() and any(name.lower().endswith(IMAGE_EXTENSIONS)
                                          for name in os.listdir(split_dir))
        raise DataError(f"The folder {split_dir} "
                        f"{'has no class subfolders' if split_dir.is_dir() else 'does not exist'}. "
                        f"Expected one subfolder per class, e.g. {split_dir}/<class>/<image>.jpg"
                        + (". It holds images directly, as ImageNet's val/ comes: sort them into "
                           "one folder per class, named as in train/ (the usual class-folder "
                           "layout)." if flat else "."))
    files = []
    for label, cls in enumerate(classes):
        names = sorted(e.name for e in os.scandir(split_dir / cls)
                       if e.is_file() and not e.name.startswith(".")
                       and e.name.lower().endswith(IMAGE_EXTENSIONS))
        if not names:
            raise DataError(f"The class folder {split_dir / cls} holds no images (looked for "
                            f"{', '.join(IMAGE_EXTENSIONS)} files, any case). Add images or "
                            f"remove the folder.")
        files += [(f"{cls}/{n}", label) for n in names]
    return classes, files


def _decode_image(path, size, crop_pct=None, draw=None):
    """Read one image file -> (H, W, 3) uint8 numpy array of exactly `size` = (H, W).

    Standard ImageNet-style preprocessing: scale so the image *covers* H x W (for a square
    target: shorter side -> H), then cut the central H x W. Aspect ratio is kept; the longer
    side loses its borders. PIL's bicubic resize is antialiased when shrinking. crop_pct (timm's
    evaluation crop, e.g. 0.875): scale to cover H / crop_pct first, so the centre crop keeps
    that share of the shorter side. draw: four numbers in [0, 1) that place a random-resized
    crop instead (training; _random_box).
    """
    from PIL import Image   # imported here: PIL is only needed by the folder layouts

    H, W = size
    try:
        with Image.open(path) as im:
            if draw is not None:
                im = _to_rgb(im)
                box = _random_box(*im.size, draw)
                return np.asarray(im.resize((W, H), Image.BICUBIC, box=box))    # (H, W, 3)
            w, h = im.size
            scale = max(H / h, W / w) / (crop_pct or 1)
            if im.format == "JPEG" and scale < 0.5:
                # JPEG can decode at 1/2, 1/4, 1/8 resolution almost for free (DCT scaling).
                # Ask for at least twice the final size so the bicubic step still antialiases.
                im.draft("RGB", (math.ceil(2 * w * scale), math.ceil(2 * h * scale)))
            im = _to_rgb(im)
            w, h = im.size
            scale = max(H / h, W / w) / (crop_pct or 1)
            nw, nh = max(W, round(w * scale)), max(H, round(h * scale))   # (w, h) when exact
            im = im.resize((nw, nh), Image.BICUBIC)                    # a plain copy if (w, h)
            top, left = (nh - H) // 2, (nw - W) // 2
            return np.asarray(im)[top:top + H, left:left + W]          # (H, W, 3) uint8
    except Exception as e:
        raise DataError(f"Could not read the image file {path} ({type(e).__name__}: {e}). "
                        f"It is probably corrupt or not an image; delete or replace it and "
                        f"load again.") from None


def _random_box(w, h, draw):
    """A random-resized crop's box (left, top, right, bottom) in a w x h image, from four uniform
    numbers in [0, 1): 8-100 % of its area, aspect ratio log-uniform in [3/4, 4/3] (torchvision's
    ranges; a box too wide or too tall is clipped to the image, where torchvision draws again),
    anywhere inside."""
    area, log_ratio, u, v = draw
    area = w * h * (0.08 + 0.92 * area)
    ratio = (4 / 3) ** (2 * log_ratio - 1)
    cw = min(w, round(math.sqrt(area * ratio)))
    ch = min(h, round(math.sqrt(area / ratio)))
    left = int(u * (w - cw + 1))
    top = int(v * (h - ch + 1))
    return left, top, left + cw, top + ch


def _to_rgb(im):
    """Any PIL image -> an 8-bit RGB PIL image with the colours a viewer shows.

    PIL's own convert("RGB") clips instead of scaling for 16-bit grey PNGs (mode "I;16..." or
    "I"), so they come out almost white: scale them to 8 bits here (v / 257, rounded; 65535 ->
    255). "F" (float) pixels are taken as 0..255, PIL's convention. Transparent pixels often
    hold colours nobody ever saw (typically black), so images with alpha are composited over
    white, as a viewer shows them, instead of dropping the alpha channel.
    """
    from PIL import Image

    if im.mode[0] in "IF":          # I, I;16, I;16B, ... (integers) or F (floats)
        a = np.asarray(im)
        a = (np.rint(a).clip(0, 255) if im.mode == "F"
             else (a.astype(np.int64).clip(0, 65535) * 255 + 32767) // 65535)
        return Image.fromarray(a.astype(np.uint8)).convert("RGB")     # (h, w) uint8: mode L
    if im.mode[-1] in "Aa" or "transparency" in im.info:   # RGBA, LA, PA, RGBa, La: alpha
        im = im.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", im.size, "white"), im).convert("RGB")
    return im.convert("RGB")    # RGB (a copy), L, 1, P, CMYK, YCbCr, ...


STREAMED_ABOVE = 128      # pixels: larger folder images are decoded per batch, never held


class ImageFiles:
    """A split's images left on disk, read like a uint8 tensor (N, 3, H, W): indexing it
    decodes the images asked for (in threads: PIL lets go of the GIL while it decodes), and
    subset() picks images without decoding them. The streamed folders of data.py."""
    dtype = torch.uint8

    def __init__(self, paths, size, crop_pct=None):
        self.paths, self.size, self.crop_pct = paths, size, crop_pct

    def __len__(self):
        return len(self.paths)

    @property
    def shape(self):
        return torch.Size((len(self), 3, *self.size))

    def subset(self, index):
        """The images at `index` (an int, slice, index tensor or mask), still on disk."""
        index = torch.arange(len(self))[index].reshape(-1)
        return ImageFiles([self.paths[i] for i in index.tolist()], self.size, self.crop_pct)

    def split(self, size):
        """Chunks of `size` images, still on disk (as tensor.split gives views)."""
        return [self.subset(slice(i, i + size)) for i in range(0, len(self), size)]

    def to(self, device):
        """Every image decoded, on `device` (like tensor.to)."""
        return self.decode().to(device)

    def __getitem__(self, index):
        images = self.subset(index).decode()
        return images[0] if isinstance(index, int) else images

    def decode(self, generator=None):
        """Every image -> (N, 3, H, W) uint8, in torch.get_num_threads() threads (one in a
        DataLoader worker). With a generator: random-resized crops, each image's placed by
        four numbers, all drawn from the generator first (the same crops whatever the threads)."""
        n = len(self)
        draws = [None] * n if generator is None else torch.rand(n, 4, generator=generator)
        with ThreadPoolExecutor(max(1, min(n, torch.get_num_threads()))) as pool:
            images = list(pool.map(_decode_image, self.paths, [self.size] * n,
                                   [self.crop_pct] * n, draws))
        if not images:
            return torch.empty(self.shape, dtype=torch.uint8)
        return torch.from_numpy(np.stack(images).transpose(0, 3, 1, 2))    # (N, 3, H, W)


def _decode_many(files, progress, desc):
    """Decode an ImageFiles -> (N, 3, H, W) uint8 tensor, in chunks of 500 (threads in each)."""
    from tqdm import tqdm

    return torch.cat([files[start:start + 500] for start in tqdm(  # (N, 3, H, W) uint8
        range(0, len(files), 500), desc, disable=not progress, leave=False)])


# The decode cache: one torch file per (folder, split, image size, file list), under
# cache_dir > $SPOT_CACHE > ~/.cache/spot. Written atomically, loaded with weights_only=True
# (tensors and plain containers only, never code), and checked before use.

def _cache_file(cache_dir, split_dir, size, files, crop_pct=None):
    """Where the decoded tensors of one split live. `files` is the sorted [(relpath, label)].

    The key hashes everything that changes the decoded result: the decoder's version (v2: 16-bit
    and transparent PNGs are decoded by value), the folder's absolute path, the output size (and
    crop_pct when set), and every file's name, size and modification time (so adding, removing
    or replacing an image makes a new cache entry instead of silently using stale data).
    """
    root = Path(cache_dir or os.environ.get("SPOT_CACHE") or Path.home() / ".cache" / "spot")
    split_dir = split_dir.resolve()
    crop = f"crop {crop_pct}|" if crop_pct else ""          # (unset: the key v2 had)
    h = hashlib.sha256(f"v2|{split_dir}|{split_dir.name}|{size[0]}x{size[1]}|{crop}".encode())
    for rel, label in files:
        st = os.stat(split_dir / rel)
        h.update(f"{rel}|{label}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    name = f"{split_dir.parent.name or 'data'}-{split_dir.name}-{size[0]}x{size[1]}"
    return root / f"{name}-{h.hexdigest()[:16]}.pt"


def _cache_load(path, classes, labels, size):
    """The cached images (N, 3, H, W) uint8 of an existing cache file, or None when it is not
    exactly what load_split_folder wrote for this listing (then it decodes again and rewrites
    the file)."""
    try:   # fails if truncated, foreign, holding more than tensors, or not such a dict
        hit = torch.load(path, weights_only=True)
        images = hit["images"]
        wanted = (torch.uint8, (len(labels), 3, *size), classes)
        if (images.dtype, images.shape, hit["classes"]) == wanted and torch.equal(
                hit["labels"], labels):
            return images
        problem = "it holds other images, labels or classes than the folders"
    except Exception as e:
        problem = f"it is unreadable or not what this loader writes ({type(e).__name__}: {e})"
    warnings.warn(f"ignoring the decode cache file {path}: {problem}. Decoding the images again "
                  f"and rewriting it.")


# -----------------------------------------------------------------------------
# Pretrained ViTs (timm / DeiT / MAE) and checkpoint files
#
# spot.load_checkpoint and spot.load_pretrained build the model; these functions read the files
# and return plain data. A timm VisionTransformer's state dict uses SPoTViT's names for blocks.*,
# norm.*, fc_norm.* and head.*, and differs in two (D = width, C = channels, k = patch side,
# G = gh * gw grid cells):
#   patch_embed.proj.weight (D, C, k, k), a stride-k conv  <->  patch_embed.weight (D, C*k*k):
#       the same numbers flattened. spot.extract_patches' windows are (C, k, k) and flatten in
#       that order, so the linear map of a grid window is the conv on its patch.
#   pos_embed (1, 1 + G, D): slot 0 for the class token, then the grid row-major. timm adds it
#       after prepending the class token, so cls_token + pos_embed[:, 0] is what the class token
#       carries: it is folded into cls_token, and pos_embed[:, 1:] becomes pos_table, read by
#       spot.learned_pos_embed in cell-centre coordinates (cell (i, j) at p = (i, j): its row).
# timm's LayerNorms use eps 1e-6 (norm_eps), its GELU is exact (as spot.py's); MAE's fine-tuning
# head has no norm.* but fc_norm.* (pool="avg"). Weights with no place in SPoTViT are refused
# by name; an MAE pre-training checkpoint's decoder is dropped (MAE fine-tunes its encoder).
# What the weights cannot tell (input statistics, pooling, heads) comes from, in order: the
# arguments, timm's config.json beside HF-style weights (its global_pool, model_args and
# pretrained_cfg's mean/std; timm writes it with save_config_for_hf), timm:NAME's model, the
# same names stored beside the weights in a .pt; else a warning says what was assumed. A config
# that asks for what SPoTViT does not compute is refused by name (TIMM_ARGS). Every tensor is
# checked before a model is built: shapes against timm_shapes, no more numbers than the file
# stores (a zero-stride view can claim billions), finite values.

LOG = logging.getLogger("spot")      # what a pretrained source gave (train.py prints it)
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
STANDARD_HEADS = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}   # ViT-Ti, S, B, L, H
HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")   # timm's HF folder, preferred first
UNSUPPORTED = {   # key pattern -> what those weights are
    r"^dist_token$|^head_dist\.": "a distilled DeiT's distillation token and head",
    r"^reg_token$": "register tokens",
    r"\.ls[12]\.gamma$|\.gamma_[12]$": "layer scale",
    r"^norm_pre\.": "a norm before the blocks (norm_pre)",
    r"\.q_bias$|\.v_bias$": "separate q/v biases",
}
MAE_DECODER = r"^decoder_|^mask_token$"
# timm's names (config.json, model_args) -> the values SPoTViT computes as timm does; None: any
# value (the weights show it, or only training reads it). Other keys and values are refused.
TIMM_ARGS = {"global_pool": ("token", "avg"), "class_token": (True,), "reg_tokens": (0,),
             "no_embed_class": (False, True), "init_values": (None,), "qk_norm": (False,),
             "scale_attn_norm": (False,), "scale_mlp_norm": (False,), "qkv_bias": (True,),
             "proj_bias": (True,), "pos_embed": ("learn",), "pre_norm": (False,),
             "final_norm": (True,), "pool_include_prefix": (False,), "norm_layer": (None,),
             "embed_norm_layer": (None,), "act_layer": (None, "gelu"), "norm_eps": (1e-6,),
             "dynamic_img_pad": (False,)}
# ... and the keys whose every value it reads from the weights or honours (None: any value).
TIMM_ARGS |= dict.fromkeys(("img_size", "patch_size", "in_chans", "num_classes", "embed_dim",
                            "depth", "num_heads", "mlp_ratio", "fc_norm", "dynamic_img_size",
                            "drop_rate", "pos_drop_rate", "patch_drop_rate", "proj_drop_rate",
                            "attn_drop_rate", "drop_path_rate", "weight_init", "fix_init",
                            "mean", "std"))
# What a warning names when nothing said it: timm's name, SPoTConfig's field, how to say it.
ASSUMED = (("mean", "image_mean", "pass mean= (train.py --image-mean)"),
           ("std", "image_std", "pass std= (--image-std)"),
           ("num_heads", "heads", "pass heads= (--heads)"),
           ("global_pool", "pool", "keep timm's config.json (global_pool) beside the weights"))


def load_file(path, name, what, read=None):
    """torch.load(path) (or read(path)) -> its contents; a file that cannot be read is a
    ValueError naming it (`name`) and quoting the reader's own reason. weights_only=True, with
    argparse.Namespace allowed (DeiT's and MAE's training files store their flags in one): no
    code from the file runs."""
    try:
        if read:
            return read(path)
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:   # missing, truncated, random bytes, or holding code (refused)
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        if lines and lines[0].startswith("Weights only load failed"):   # why: before the link
            lines = [line for line in lines if not line.startswith("Check the doc")][-1:]
        reason = lines[0] if lines else "empty or cut short" if isinstance(error, EOFError) else \
            repr(error)
        raise ValueError(f"{name} could not be read as {what} ({reason.split('. ')[0]}): a file "
                         f"of tensors and plain data is expected; objects that could run code "
                         f"are refused") from None


def read_checkpoint(path):
    """A checkpoint written by train.py -> its dict: "model_config" (the SPoTConfig as a dict),
    "model" (the state dict) and what train.py adds (args, classes, optimizer and random states).

    Read with weights_only=True: a checkpoint is a file people download and share, and a full
    pickle could run any code. Raises ValueError naming the file when it is missing, unreadable
    or not an SPoT checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path} {'is a directory' if path.is_dir() else 'does not exist'}; pass "
                         f"a checkpoint file (train.py writes <out>/checkpoint.pt)")
    checkpoint = load_file(path, path, "a checkpoint")
    if not isinstance(checkpoint, dict) or not {"model_config", "model"} <= checkpoint.keys():
        raise ValueError(f"{path} is not an SPoT checkpoint (a dict with 'model_config' and "
                         f"'model', as train.py writes)")
    return checkpoint


def read_pretrained(source, image_size=None, num_classes=None, heads=None, mean=None, std=None):
    """What spot.load_pretrained reads: a pretrained ViT -> (SPoTConfig's keyword arguments,
    its state dict in SPoTViT's keys). The state dict keeps the source's
    precision, at least float32 (float64 weights fold the class slot exactly); its pos_table is
    still the source's grid (resample_table resizes it) and it has no head.* when the model
    needs a fresh head (num_classes other than the head's).

    source: a timm-style state dict; a .pth/.pt/.bin file (load_file; a {"model": ...} or
    {"state_dict": ...} wrapper, as DeiT's and MAE's training files are, and DDP's "module."
    prefixes are removed); a .safetensors file (needs the safetensors package); timm's HF folder
    (config.json and model.safetensors or pytorch_model.bin), or such a file with config.json
    beside it; or "timm:NAME" (needs timm: its cache, else a download). The shape comes from the
    weights: dim, in_chans and window from patch_embed.proj.weight, depth from the blocks,
    mlp_ratio from mlp.fc1, the native grid from pos_embed (square, after one class slot or
    none). The rest, from the arguments, else the source's config (see the section's comment):
    heads, else a standard width's (192, 384, 768, 1024, 1280: ViT-Ti to H), else 64-wide heads
    (timm's) for a multiple of 64; pool "avg" with an fc_norm, else "token"; mean/std, else
    ImageNet's, (0.485, 0.456, 0.406) and (0.229, 0.224, 0.225). What no one said is a warning.
    image_size: default the native one. Anything it cannot read or represent raises a
    ValueError naming it (and the keys, e.g. dist_token of a distilled DeiT).
    """
    name = repr(str(source)) if isinstance(source, (str, Path)) else "the state dict"
    state, told = _read_source(source, name)
    for key, value in told.items():
        if (allowed := TIMM_ARGS.get(key, ())) is not None and value not in allowed:
            raise ValueError(f"{name}: its config's {key}={value!r} is not supported (the values "
                             f"SPoTViT computes as timm does: {allowed or 'none known'})")
    given = dict(mean=mean, std=std, num_heads=heads).items()
    said = told | {key: value for key, value in given if value is not None}
    config, slots = _pretrained_config(state, name, image_size, num_classes, said)
    config["image_mean"] = said.get("mean", IMAGENET_STATS[0])
    config["image_std"] = said.get("std", IMAGENET_STATS[1])
    if assumed := [(f"{field} {config[field]}", how) for key, field, how in ASSUMED
                   if key not in said]:
        warnings.warn(f"{name}: assumed {', '.join(a for a, _ in assumed)} (the source does not "
                      f"say); to change: {', '.join(how for _, how in assumed)}")
    table = state.pop("pos_embed")
    table = table.to(torch.promote_types(table.dtype, torch.float32))     # (1, slots + G, D)
    state["cls_token"] = state["cls_token"] + table[:, :slots].sum(1, keepdim=True)  # (or + 0)
    state["pos_table"] = table[:, slots:]                                  # (1, G, D)
    state["patch_embed.weight"] = state.pop("patch_embed.proj.weight").flatten(1)   # (D, C*k*k)
    state["patch_embed.bias"] = state.pop("patch_embed.proj.bias")
    head = state.get("head.weight")
    fresh = head is None or head.shape[0] != config["num_classes"]
    if fresh:      # new classes: a fresh head
        state.pop("head.weight", None)
        state.pop("head.bias", None)
    head = f"a new {config['num_classes']}-class head" if fresh else "its head"
    LOG.info(f"loaded {name}: a pretrained ViT, {shape_text(config)}; {head}")
    return config, state


def shape_text(config):
    """SPoTConfig's fields (a dict) -> one line: the shape and the input statistics."""
    return ", ".join(f"{key} {config[key]}" for key in (
        "dim", "depth", "heads", "image_size", "window", "image_mean", "image_std"))


def _read_source(source, name):
    """read_pretrained's source -> (a flat state dict without MAE's decoder, what its config
    says in timm's names: model_args' keys, global_pool, mean, std)."""
    told = {}
    if isinstance(source, str) and source.startswith("timm:"):
        source, told = _timm_source(source[len("timm:"):], name)
    elif isinstance(source, (str, Path)):
        path = Path(source)
        if path.is_dir():     # timm's HF folder
            path = next((path / file for file in HF_WEIGHTS if (path / file).is_file()), None)
            if path is None:
                raise ValueError(f"{name} is a folder without {' or '.join(HF_WEIGHTS)}: pass "
                                 f"timm's Hugging Face folder (those and config.json) or a file")
        config = path.with_name("config.json")
        told = _told(config, name) if path.name in HF_WEIGHTS and config.is_file() else {}
        safetensors = path.suffix == ".safetensors"
        read = _optional("safetensors.torch", "reading .safetensors").load_file if safetensors \
            else None
        source = load_file(path, name, "a state dict", read)
    for key in ("model", "state_dict"):       # training scripts' wrappers: {"model": state dict}
        if isinstance(source, dict) and isinstance(source.get(key), dict):
            told = _told(source, name) | told         # what a .pt stores beside its weights
            source = source[key]
    if not isinstance(source, dict) or not all(torch.is_tensor(v) for v in source.values()):
        raise ValueError(f"{name} is not a state dict (a dict of tensors)")
    state = {key.removeprefix("module."): value for key, value in source.items()}
    if dropped := [key for key in state if re.search(MAE_DECODER, key)]:
        warnings.warn(f"{name}: MAE's pre-training decoder dropped ({len(dropped)} keys: "
                      f"{', '.join(dropped[:3])}, ...): its encoder loads, to be fine-tuned")
    return {key: value for key, value in state.items() if key not in dropped}, told


def _told(config, name):
    """timm's config -- config.json (a path), or a .pt's dict beside its weights -> what it says,
    in timm's names: model_args' keys, global_pool, and pretrained_cfg's (or its own) mean/std."""
    try:
        config = json.loads(config.read_text()) if isinstance(config, Path) else config
        stats = config.get("pretrained_cfg", config)
        said = dict(global_pool=config.get("global_pool"), mean=stats.get("mean"),
                    std=stats.get("std"))
        return config.get("model_args", {}) | {k: v for k, v in said.items() if v is not None}
    except (ValueError, AttributeError, TypeError) as error:   # not JSON; not timm's layout
        raise ValueError(f"{name}: its config is not timm's ({error})") from None


def _timm_source(model, name):
    """timm:NAME -> (its state dict, what timm's model says of itself, in config.json's names)."""
    model = _timm_model(model, name)
    if type(model).__name__ != "VisionTransformer":
        raise ValueError(f"{name} is timm's {type(model).__name__}, not a VisionTransformer")
    block, cfg = model.blocks[0], model.pretrained_cfg
    act = repr(block.mlp.act)         # torch's exact GELU, or timm's ("gelu")
    return model.state_dict(), dict(
        global_pool=model.global_pool, num_heads=block.attn.num_heads, norm_eps=block.norm1.eps,
        act_layer=None if act in ("GELU(approximate='none')", "GELU()") else act,
        mean=cfg["mean"], std=cfg["std"],
        pool_include_prefix=getattr(model, "pool_include_prefix", False))


def _timm_model(model, name):
    """timm's model `model` with its pretrained weights: from timm's local cache when they are
    there (huggingface_hub offline), else downloaded, after one quick request to the Hub (with
    no network, the hub's client retries for a minute)."""
    timm = _optional("timm", name)
    hub = _optional("huggingface_hub.constants", name)
    if not timm.is_model(model):
        raise ValueError(f"timm has no model {model!r} ({name}): timm.list_models('vit_*') "
                         f"lists its ViTs")
    offline = hub.HF_HUB_OFFLINE
    try:
        hub.HF_HUB_OFFLINE = True
        return timm.create_model(model, pretrained=True)
    except (OSError, RuntimeError) as error:      # not in the cache (or no such weights)
        reason = str(error).strip().split("\n")[0]
    finally:
        hub.HF_HUB_OFFLINE = offline
    try:
        if not offline:
            urllib.request.urlopen(urllib.request.Request(hub.ENDPOINT, method="HEAD"), timeout=5)
            return timm.create_model(model, pretrained=True)
    except (OSError, RuntimeError) as error:      # no network, or the Hub refused
        reason = str(error).strip().split("\n")[0]
    raise ValueError(f"{name}: timm's cache has no weights for it and they could not be "
                     f"downloaded ({reason}); offline, pass a file instead (its model.safetensors "
                     f"or pytorch_model.bin, or timm's HF folder with config.json)")


def _optional(module, purpose):
    """Import timm, safetensors or huggingface_hub only on the path that reads their format."""
    try:
        return importlib.import_module(module)
    except ImportError as error:    # not installed (error.name is the package), or broken
        package = module.split(".")[0]
        why = f": pip install {package}" if (error.name or "").startswith(package) else \
            f", which is installed but fails to import: {error}"
        raise ValueError(f"{purpose} needs the {package} package{why}") from None


def _pretrained_config(state, name, image_size, num_classes, said):
    """Refuse what SPoTViT cannot represent or a file that does not hold what it claims; read
    the shape from the weights and the rest from `said` (timm's names) -> (SPoTConfig's keyword
    arguments, the number of class slots in pos_embed)."""
    weight = state.get("patch_embed.proj.weight")
    shape = () if weight is None else weight.shape
    if len(shape) != 4 or shape[2] != shape[3] or 0 in shape:
        raise ValueError(f"{name} is not a ViT state dict: it has no (D, C, k, k) "
                         f"patch_embed.proj.weight (its keys begin {list(state)[:4]})")
    for pattern, what in UNSUPPORTED.items():
        if keys := [key for key in state if re.search(pattern, key)]:
            raise ValueError(f"{name} holds {what}: {', '.join(keys[:4])}; SPoTViT has no place "
                             f"for them")
    if "cls_token" not in state or "pos_embed" not in state:
        raise ValueError(f"{name} has no {'pos_embed' if 'cls_token' in state else 'cls_token'}: "
                         f"models without a class token or a learned pos_embed are not supported")
    (dim, in_chans, k, _), pos_embed = shape, state["pos_embed"]
    cells = pos_embed.shape[1] if pos_embed.dim() == 3 else 0
    slots = next((n for n in (1, 0) if cells > n and math.isqrt(cells - n) ** 2 == cells - n),
                 None)
    if slots is None:
        raise ValueError(f"{name}: pos_embed {tuple(pos_embed.shape)} is not (1, slots + G, D) "
                         f"with a square grid of G cells")
    head = state.get("head.weight")
    if num_classes is None and head is None:
        raise ValueError(f"{name} has no head.weight: pass num_classes= for a fresh head")
    # spot.Block builds int(dim * mlp_ratio) hidden units: the ratio that gives fc1's back
    # exactly. (No blocks: depth 0, which SPoTConfig refuses.)
    hidden = state.get("blocks.0.mlp.fc1.weight", weight).shape[0]
    ratios = (hidden / dim, math.nextafter(hidden / dim, math.inf))
    ratio = next(r for r in ratios if int(dim * r) == hidden)
    depth = len({key.split(".")[1] for key in state if key.startswith("blocks.")})
    # The weights show an fc_norm, not the pooling: "avg" (MAE's head) and "token" with an
    # fc_norm look alike, as do "token" and "avg" with the final norm (fc_norm=False).
    pool = said.get("global_pool") or ("avg" if "fc_norm.weight" in state else "token")
    if (pool == "avg") != ("fc_norm.weight" in state):
        raise ValueError(f"{name}: global_pool {pool!r} {'without' if pool == 'avg' else 'with'} "
                         f"fc_norm; SPoTViT pools 'token' through the final norm or 'avg' "
                         f"through fc_norm: not supported")
    config = dict(image_size=image_size or math.isqrt(cells - slots) * k, window=k,
                  in_chans=in_chans, dim=dim, depth=depth, mlp_ratio=ratio,
                  num_classes=num_classes or head.shape[0], norm_eps=1e-6,
                  position_embedding="learned", pool=pool)
    _check_state(state, timm_shapes(config, cells, None if head is None else head.shape[0]), name)
    # heads= if said, else a standard width's, else timm's 64-wide heads.
    heads = said.get("num_heads") or STANDARD_HEADS.get(dim)
    config["heads"] = heads or (dim // 64 if dim % 64 == 0 else None)
    if config["heads"] is None:
        raise ValueError(f"{name}: a ViT of width {dim} has no standard number of heads; "
                         f"pass heads= (train.py: --heads N)")
    return config, slots


def timm_shapes(config, cells, classes):
    """SPoTConfig's keyword arguments -> {key: shape} of the timm VisionTransformer state dict
    that loads into SPoTViT(SPoTConfig(**config)): pos_embed with `cells` rows (class slots and
    the native grid), head.* for `classes` classes (None: no head)."""
    D, k, hidden = config["dim"], config["window"], int(config["dim"] * config["mlp_ratio"])
    layers = [("patch_embed.proj", (D, config["in_chans"], k, k)),
              ("fc_norm" if config["pool"] == "avg" else "norm", (D,))]
    layers += [] if classes is None else [("head", (classes, D))]
    for i in range(config["depth"]):
        layers += [(f"blocks.{i}.{key}", shape) for key, shape in (
            ("norm1", (D,)), ("attn.qkv", (3 * D, D)), ("attn.proj", (D, D)), ("norm2", (D,)),
            ("mlp.fc1", (hidden, D)), ("mlp.fc2", (D, hidden)))]
    shapes = {f"{key}.{part}": shape[:1] if part == "bias" else shape
              for key, shape in layers for part in ("weight", "bias")}
    return {"cls_token": (1, 1, D), "pos_embed": (1, cells, D), **shapes}


def _check_state(state, shapes, name):
    """Refuse a state dict whose keys and shapes are not `shapes` (named with both shapes), a
    tensor claiming more numbers than its file stores, or values that are not finite."""
    problems = [f"{key} {tuple(state[key].shape)} where SPoTViT needs {shapes[key]}"
                for key in shapes if key in state and state[key].shape != shapes[key]]
    problems += [f"no {key}" for key in shapes if key not in state]
    problems += [f"{key}, which has no place in SPoTViT" for key in state if key not in shapes]
    if problems:
        raise ValueError(f"{name} does not fit the ViT its patch_embed, pos_embed and blocks "
                         f"describe: {'; '.join(problems[:6])}")
    for key, value in state.items():
        if value.numel() * value.element_size() > value.untyped_storage().nbytes():
            raise ValueError(f"{name}: {key} {tuple(value.shape)} claims more numbers than its "
                             f"file stores (a zero-stride view)")
    if bad := [key for key, value in state.items() if not value.isfinite().all()]:
        raise ValueError(f"{name} holds NaN or Inf values in {', '.join(bad[:4])}: a model "
                         f"trained from them is NaN")


def resample_table(table, config):
    """timm's resample_abs_pos_embed: a (1, side*side, D) position table as a D-channel
    side x side image, resized bicubically (antialiased, align_corners=False) to the grid of
    config (an SPoTConfig: image_size // window) -> (1, gh*gw, D). At the same size every
    output pixel sits on its input pixel: the table comes back unchanged."""
    side = math.isqrt(table.shape[1])
    size = tuple(s // config.window for s in config.image_size)
    image = table.reshape(1, side, side, -1).permute(0, 3, 1, 2)              # (1, D, side, side)
    image = F.interpolate(image, size=size, mode="bicubic", antialias=True, align_corners=False)
    return image.permute(0, 2, 3, 1).reshape(1, size[0] * size[1], -1)


def to_timm(state, table, config):
    """What spot.export writes: an SPoTViT's state dict, the (1, G, D) embedding it adds at the
    grid positions, and its SPoTConfig -> a timm VisionTransformer state dict (a plain dict of
    detached copies, the keys above).

    timm's VisionTransformer(img_size=image_size, patch_size=window, embed_dim=dim, depth=depth,
    num_heads=heads, mlp_ratio=mlp_ratio, num_classes=num_classes, global_pool=pool, fc_norm=
    pool == "avg") loads it with strict=True. pos_embed's class slot is zeros (cls_token carries
    it) and a sin-cos model exports its embedding of the grid as the table. A state dict holds no
    LayerNorm eps: timm's ViTs, and spot.load_pretrained, use 1e-6, so a model trained with the
    default norm_eps=1e-5 computes slightly differently after the trip (set the eps back, e.g.
    timm's norm_layer=partial(nn.LayerNorm, eps=1e-5)). With norm_eps=1e-6 (every model that
    load_pretrained made), spot.load_pretrained(spot.export(model)) gives back the same logits.
    """
    state = {key: value.detach().clone() for key, value in state.items()}
    weight, k = state.pop("patch_embed.weight"), config.window
    state.pop("pos_table", None)
    return {"cls_token": state.pop("cls_token"),
            "pos_embed": torch.cat([torch.zeros_like(table[:, :1]), table], dim=1),   # (1, 1+G, D)
            "patch_embed.proj.weight": weight.view(config.dim, config.in_chans, k, k),
            "patch_embed.proj.bias": state.pop("patch_embed.bias"), **state}


def timm_config(config):
    """An SPoTConfig -> the config.json timm writes beside HF-style weights (its
    save_config_for_hf): an architecture whose sizes model_args all set, the classes, and
    pretrained_cfg's input size (C, H, W), mean and std. read_pretrained reads it back."""
    (H, W), C = config.image_size, config.in_chans
    model_args = dict(img_size=[H, W], patch_size=config.window, embed_dim=config.dim,
                      depth=config.depth, num_heads=config.heads, mlp_ratio=config.mlp_ratio,
                      global_pool=config.pool)
    stats = dict(input_size=[C, H, W], mean=list(config.image_mean), std=list(config.image_std))
    return dict(architecture="vit_base_patch16_224", num_classes=config.num_classes,
                model_args=model_args, pretrained_cfg=stats)


def save_pretrained(folder, state, config):
    """spot.export's state dict and the model's SPoTConfig -> timm's Hugging Face folder:
    pytorch_model.bin and config.json (timm_config). spot.load_pretrained(folder) gives back the
    same statistics, pooling and heads (and logits, with norm_eps 1e-6: see to_timm), and timm
    loads it too: timm.create_model("local-dir:" + folder, pretrained=True)."""
    write_atomic(Path(folder) / "config.json", json.dumps(timm_config(config), indent=2))
    write_atomic(Path(folder) / "pytorch_model.bin", state)


# -----------------------------------------------------------------------------
# Argument checks (spot.py's inputs)
#
# spot.py's public functions and SPoTConfig check what they are given here, so that the method
# reads without them: every error names the argument, and the code after a check trusts it.

def positive_int(value, name):
    """value, refused unless an int >= 1 (bool is an int in Python, but not a count)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


def to_hw(size, name="image_size"):
    """An int or (H, W) pair -> (H, W) of positive ints."""
    pair = (size, size) if isinstance(size, int) else size
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
        raise ValueError(f"{name} must be a positive int or a (height, width) pair, got {size!r}")
    return tuple(positive_int(side, name) for side in pair)


def check_window(window, image_hw, name="window"):
    """Refuse a window that is not a positive int or is larger than the (H, W) image."""
    if positive_int(window, name) > min(image_hw):
        raise ValueError(f"{name}={window} is larger than the image {image_hw[0]}x{image_hw[1]}; "
                         f"use a {name} <= {min(image_hw)}")


def check_images(images, shape=None):
    """Refuse anything but a floating-point (B, C, H, W) tensor (uint8 pixels would read 0..255),
    and, given shape = (C, H, W) (a model's), images of another shape."""
    if not torch.is_tensor(images) or images.dim() != 4 or not images.is_floating_point():
        raise ValueError(f"images must be a floating-point (B, C, H, W) tensor (e.g. uint8 / 255), "
                         f"got {getattr(images, 'shape', type(images).__name__)} "
                         f"{getattr(images, 'dtype', '')}")
    if shape and images.shape[1:] != shape:
        raise ValueError(f"images must be {('B', *shape)} for this model, "
                         f"got {tuple(images.shape)}")


def check_sampler_inputs(images, positions, window):
    """Check spot.extract_patches' three inputs -> positions in at least float32 (in bf16 a
    coordinate near 1 is off by up to 2^-9 of the image, i.e. 0.4 px at 224 px)."""
    check_images(images)
    check_window(window, images.shape[-2:])
    if not torch.is_tensor(positions) or positions.dim() != 3 or positions.shape[-1] != 2:
        raise ValueError(f"positions must be a (B, N, 2) tensor of (y, x) in [0, 1], got "
                         f"{getattr(positions, 'shape', type(positions).__name__)}")
    if positions.shape[0] != images.shape[0] or positions.shape[1] < 1:
        raise ValueError(f"positions {tuple(positions.shape)} must hold N >= 1 positions for each "
                         f"of the {images.shape[0]} images (the batch size)")
    # Reading values of a GPU tensor makes the CPU wait for the GPU on every forward pass, so
    # NaN/inf is caught for CPU tensors only (on CUDA it shows up as NaN logits instead).
    if positions.device.type == "cpu" and not torch.isfinite(positions).all():
        raise ValueError("positions contain NaN or inf; positions are (y, x) in [0, 1]")
    return positions.to(torch.promote_types(positions.dtype, torch.float32))


def check_prior_inputs(prior, priors, batch_size, n_tokens, image_size, window, images):
    """Check spot.sample_positions' inputs (priors: spot.PRIORS) -> (B, N, (H, W)). The "grid"
    prior has at most (H // k) * (W // k) cells to give; "salient" needs images or a map."""
    if prior not in priors:
        raise ValueError(f"prior must be one of {priors}, got {prior!r}")
    B = positive_int(batch_size, "batch_size")
    N = positive_int(n_tokens, "n_tokens")
    height, width = to_hw(image_size)
    check_window(window, (height, width))
    rows, cols = height // window, width // window
    if prior == "grid" and N > rows * cols:
        raise ValueError(f"n_tokens={N} exceeds the {rows * cols} cells of the "
                         f"{rows}x{cols} patch grid (prior 'grid')")
    if prior == "salient" and not _is_saliency_input(images, (B, height, width)):
        raise ValueError(f"prior 'salient' needs images=({B}, C, {height}, {width}) to compute "
                         f"saliency from, or a ({B}, {height}, {width}) map, got "
                         f"{getattr(images, 'shape', images)}")
    return B, N, (height, width)


def _is_saliency_input(images, shape):
    """Whether images are (B, C, H, W) images or a (B, H, W) map for shape = (B, H, W)."""
    return torch.is_tensor(images) and (images.shape[0], *images.shape[-2:]) == shape


def check_config(config):
    """SPoTConfig.__post_init__: image_size becomes an (H, W) pair, image_mean and image_std
    tuples; a config no model can be built from is refused (every error names the field)."""
    config.image_size = to_hw(config.image_size)
    choices = {"position_embedding": ("sincos", "learned"), "pool": ("token", "avg")}
    for name, allowed in choices.items():
        if getattr(config, name) not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {getattr(config, name)!r}")
    if not (isinstance(config.norm_eps, float) and 0 < config.norm_eps < 1):
        raise ValueError(f"norm_eps must be a float in (0, 1), got {config.norm_eps!r}")
    check_window(config.window, config.image_size)
    for name in ("num_classes", "dim", "depth", "heads", "in_chans"):
        positive_int(getattr(config, name), name)
    if config.dim % 4 or config.dim % config.heads:
        raise ValueError(f"dim must be divisible by 4 and by heads={config.heads}, "
                         f"got dim={config.dim}")
    if not config.mlp_ratio > 0:
        raise ValueError(f"mlp_ratio must be > 0, got {config.mlp_ratio!r}")
    config.image_mean = tuple(config.image_mean)
    config.image_std = tuple(config.image_std)
    if len(config.image_mean) != config.in_chans or len(config.image_std) != config.in_chans:
        raise ValueError(f"image_mean and image_std need in_chans={config.in_chans} values each")
