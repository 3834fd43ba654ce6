"""
utils.py -- the plumbing under the method files. Nothing here is in the paper, and a reader of
the method can skip it. It imports no file of this project, so every file may import it.

    flags       argparse types that check a value where the flag is declared (int_at_least,
                float_in, count_or_fraction) and the one grammar of --tokens (parse_tokens)
    devices     resolve_device, autocast, choose_precision (bf16 or fp32, measured on the CPU),
                cpu_name (printed beside every timing)
    files       write_atomic, the one writer of checkpoints, results and figures; check_out_dir
    data files  DataError, channel_stats, resize_uint8, load_cifar10 (official pickles through a
                safe unpickler, or class folders; downloaded with an MD5 check), load_folder and
                load_split_folder (ImageNet-style class folders, decoded once and cached)
    Ctrl-C      install_ctrl_c: finish the step, save, exit

Everything read from disk is untrusted input: the CIFAR-10 pickles go through an unpickler that
can only build the numpy arrays the official files hold (a pickle can otherwise run any code),
their contents are checked, and a decode-cache file that is not exactly what this module writes
is ignored and rewritten. Functions return plain tensors (images (N, C, H, W) uint8, labels (N,)
int64); data.py wraps them in its Split and Dataset.
"""

import argparse
import dataclasses
import hashlib
import math
import os
import pickle
import platform
import signal
import tarfile
import tempfile
import threading
import time
import urllib.request
import warnings
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
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


def parse_tokens(text, n_grid, flag="--tokens"):
    """The one grammar of --tokens in every command: a count '16', a list '4,8,16', a range
    '4-64', 'all' (the full patch grid, n_grid tokens), or a mix '4,8,16-32' -> the sorted
    budgets. At most 4x the grid: more is no longer a sparse budget, and may not fit in memory."""
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
    return sorted(set(counts))


def add_alias(parser, dest, *old, **kwargs):
    """Old spellings of a flag keep working but stay out of --help: a hidden flag writing to the
    same dest (argparse's own aliases would be listed). kwargs: the new flag's type, action."""
    for flag in old:
        parser.add_argument(flag, dest=dest, default=argparse.SUPPRESS, help=argparse.SUPPRESS,
                            **kwargs)


def option(default, help, **argparse_kwargs):
    """A dataclass field that is also a command-line flag (add_fields: search_steps ->
    --search-steps); old="--oracle-steps": an old spelling that keeps working, hidden from --help."""
    return dataclasses.field(default=default, metadata={"help": help, **argparse_kwargs})


def add_fields(parser, config_class):
    """A flag for every field of config_class made by option(); a tuple default is shown as 'a,b'."""
    for f in (f for f in dataclasses.fields(config_class) if f.metadata):
        kwargs = {key: value for key, value in f.metadata.items() if key != "old"}
        default = ",".join(map(str, f.default)) if isinstance(f.default, tuple) else f.default
        parser.add_argument("--" + f.name.replace("_", "-"), default=default, **kwargs)
        if "old" in f.metadata:
            add_alias(parser, f.name, f.metadata["old"], **{k: v for k, v in kwargs.items() if k != "help"})


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
    fp32, eighth = time_step(False, 1.0), time_step(True, 1 / 8)
    bf16 = time_step(True, 1.0) if eighth <= fp32 else math.inf
    probe = (f"{1e3 * bf16:.0f} ms/step" if bf16 < math.inf   # else not run: cannot win
             else f"{1e3 * eighth:.0f} ms for 1/8 of the batch")
    log(f"precision: {'bf16' if bf16 < fp32 else 'fp32'} (probe: fp32 {1e3 * fp32:.0f} ms/step, "
        f"bf16 {probe})")
    return bf16 < fp32


def precision_for(model, precision, batch_size, n_tokens, device, log=print):
    """choose_precision, probing `model` at this batch size and token count (train.py, bench.py)."""
    return choose_precision(precision, device, lambda bf16, fraction: probe_step_seconds(
        model, max(1, round(fraction * batch_size)), n_tokens, device, bf16), log)


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
        with autocast(device, bf16):
            loss = model(images, positions).float().logsumexp(-1).mean()
        torch.autograd.grad(loss, params)
        times.append(time.perf_counter() - start)
    return sorted(times[1:])[len(times[1:]) // 2]


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
        return {tuple(int(part) if part.isdigit() else part for part in name.split("/")): saved[name]
                for name in saved.files}


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
    values = torch.arange(256, dtype=torch.float64) / 255                 # (256,)
    hist = torch.stack([torch.bincount(images[:, c].reshape(-1), minlength=256)
                        for c in range(images.shape[1])]).to(torch.float64)  # (C, 256)
    p = hist / hist.sum(1, keepdim=True)                                   # (C, 256) frequencies
    mean = (p * values).sum(1)                                             # (C,)
    std = (p * (values - mean[:, None]) ** 2).sum(1).sqrt()                # (C,)
    return tuple(tuple(round(v, 4) for v in s.tolist()) for s in (mean, std))


def resize_uint8(images, size, chunk=2048):
    """Resize uint8 images (N, C, h, w) -> (N, C, H, W) uint8, bilinear with antialiasing.
    Works in chunks so the float copy stays small."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    out = torch.empty(images.shape[0], images.shape[1], *size, dtype=torch.uint8)
    for start in range(0, images.shape[0], chunk):
        x = images[start:start + chunk].float()
        x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
        out[start:start + chunk] = x.round().clamp(0, 255).to(torch.uint8)
    return out


# -----------------------------------------------------------------------------
# CIFAR-10: official pickles, or class folders; download when neither is there

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR10_CLASSES = 10
CIFAR10_BATCHES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]

# A socket timeout only bounds each read, so a server that trickles one byte every few seconds
# would keep a download alive forever. The whole download therefore also has a deadline: far
# longer than a healthy download of the 170 MB archive needs, short enough that a stalled one
# ends with an error instead of a silent hang. (Tests lower it.)
DOWNLOAD_DEADLINE_S = 30 * 60
READ_TIMEOUT_S = 30


def load_cifar10(root, size, download, cache_dir, progress):
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
    return (resize_uint8(train[0], size), train[1]), (resize_uint8(test[0], size), test[1]), classes


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

    Nothing unverified is ever extracted: the MD5 is checked first. A download goes to a `.part`
    file that is verified before it gets the archive's name, and is deleted on any failure
    (network error, deadline, wrong MD5, Ctrl-C), so a failed attempt leaves nothing behind.
    """
    archive, absent = root / CIFAR10_ARCHIVE, f"CIFAR-10 was not found in {root} and"
    if archive.is_file():
        _verify_md5(archive, CIFAR10_MD5, root)
    elif not download:
        raise _cifar_help(root, f"{absent} downloading is switched off.")
    else:
        part = archive.with_name(archive.name + ".part")
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
            os.replace(part, archive)    # only a complete, verified download gets the real name
        finally:
            part.unlink(missing_ok=True)
    try:   # Python >= 3.11.4/3.12: filter refuses absolute paths, links out of root, devices...
        with tarfile.open(archive, "r:gz") as tar:
            tar.extractall(root, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    except (tarfile.TarError, OSError) as e:
        raise _cifar_help(root, f"Extracting {archive} failed ({e}).")
    if not (root / CIFAR10_FOLDER).is_dir():
        raise _cifar_help(root, f"{archive} did not contain {CIFAR10_FOLDER}/.")


def _urlretrieve(url, dest):
    """Download url -> dest within DOWNLOAD_DEADLINE_S (a separate function so tests can replace
    the network). read1 returns whatever has arrived, so the deadline is checked even while a
    server sends only a byte at a time."""
    deadline = time.monotonic() + DOWNLOAD_DEADLINE_S
    with urllib.request.urlopen(url, timeout=min(READ_TIMEOUT_S, DOWNLOAD_DEADLINE_S)) as r, \
            open(dest, "wb") as f:
        while block := r.read1(1 << 20):
            f.write(block)
            if time.monotonic() > deadline:
                raise TimeoutError(f"the download did not finish within the deadline of "
                                   f"{DOWNLOAD_DEADLINE_S:g} s ({f.tell() / 1e6:.1f} MB received); "
                                   f"the server or the connection is too slow")


def _verify_md5(path, expected, root, downloaded=False):
    """Raise DataError unless the file's MD5 is `expected`."""
    md5 = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            md5.update(block)
    if md5.hexdigest() != expected:
        what = f"The download of {CIFAR10_URL}" if downloaded else f"The archive {path}"
        raise _cifar_help(root, f"{what} has MD5 {md5.hexdigest()}, expected {expected}: it is "
                                f"incomplete or not the official file. "
                                + ("It was deleted." if downloaded else "Delete it and try again."))


# The official files are Python 2 pickles of dicts holding bytes, ints, lists and numpy arrays;
# rebuilding an array needs exactly these three callables (numpy >= 2 names its core `_core`,
# files re-pickled by it say so). Loading any other global -- os.system, builtins.open, ... --
# is how a pickle runs code, so the unpickler refuses everything else.
try:
    from numpy._core.multiarray import _reconstruct as _np_reconstruct
except ImportError:   # numpy < 1.26 has no numpy._core
    from numpy.core.multiarray import _reconstruct as _np_reconstruct

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
        return _PICKLE_GLOBALS[(module, name)]


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
    x, y = (batch.get(b"data"), batch.get(b"labels")) if isinstance(batch, dict) else (None, None)
    if x is None or y is None:    # official: a numpy array, a list of ints
        problem = "it is not a dict holding b'data' and b'labels'"
    elif (not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 2
            or x.shape[0] < 1 or x.shape[1] != 3 * 32 * 32):
        got = (f"{x.dtype} array of shape {x.shape}" if isinstance(x, np.ndarray)
               else type(x).__name__)
        problem = f"its data is a {got}, not a uint8 array of shape (n, 3072)"
    elif not isinstance(y, list) or len(y) != len(x) or not all(type(v) is int for v in y):
        problem = f"it has {len(x)} images but its labels are not a list of {len(x)} ints"
    elif not all(0 <= v < CIFAR10_CLASSES for v in y):
        problem = f"it has labels out of range (CIFAR-10 labels are 0..{CIFAR10_CLASSES - 1})"
    else:
        return torch.from_numpy(x.reshape(-1, 3, 32, 32).copy()), torch.tensor(y, dtype=torch.int64)
    raise _cifar_damaged(path, f"is not in the official format: {problem}")


def _load_cifar_pickles(folder):
    parts = [_read_cifar_batch(folder / name) for name in CIFAR10_BATCHES]
    train = (torch.cat([p[0] for p in parts[:5]]), torch.cat([p[1] for p in parts[:5]]))
    classes = [f"class_{i}" for i in range(CIFAR10_CLASSES)]
    meta = folder / "batches.meta"
    if meta.is_file():   # only the class names; without it the labels are still right
        names = _read_pickle(meta)
        names = names.get(b"label_names") if isinstance(names, dict) else None
        if (not isinstance(names, list) or len(names) != CIFAR10_CLASSES
                or not all(isinstance(n, (bytes, str)) for n in names)):
            raise _cifar_damaged(meta, f"is not in the official format: it should hold "
                                       f"b'label_names', a list of {CIFAR10_CLASSES} class names")
        classes = [n.decode("utf-8", "replace") if isinstance(n, bytes) else n for n in names]
    return train, parts[5], classes


# -----------------------------------------------------------------------------
# Class folders (ImageNet-style): listing, decoding, the decode cache

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


def load_folder(root, size, cache_dir, progress):
    """An ImageNet-style dataset root/train/<class>/* + root/val/<class>/* (or test/)
    -> ((train_images, train_labels), (test_images, test_labels), classes)."""
    root = Path(root).expanduser()
    test_name = next((s for s in ("val", "test") if (root / s).is_dir()), "val")
    missing = " and ".join(str(root / s) for s in ("train", test_name) if not (root / s).is_dir())
    if missing:
        raise DataError(f"The dataset folder {root} "
                        f"{'is missing ' + missing if root.is_dir() else 'does not exist'}. The "
                        f"folder dataset expects {root}/train/<class>/<image> and "
                        f"{root}/val/<class>/<image> (or test/ instead of val/), one subfolder per "
                        f"class, as in Imagenette.")
    return _load_class_folders(root / "train", root / test_name, size, cache_dir, progress)


def _load_class_folders(train_dir, test_dir, size, cache_dir, progress):
    *train, classes = load_split_folder(train_dir, size, cache_dir, progress)
    *test, test_classes = load_split_folder(test_dir, size, cache_dir, progress)
    if classes != test_classes:
        raise DataError(f"The class folders of {train_dir} and {test_dir} differ, so labels would "
                        f"not match between the splits. Only in {train_dir.name}: "
                        f"{sorted(set(classes) - set(test_classes)) or 'none'}; only in "
                        f"{test_dir.name}: {sorted(set(test_classes) - set(classes)) or 'none'}.")
    return tuple(train), tuple(test), classes


def load_split_folder(split_dir, size, cache_dir, progress):
    """One split of class folders -> (images (N, 3, H, W) uint8, labels (N,) int64, classes).

    Decoded once and cached (see _cache_file). Class folders list their images class by class;
    the result is put in one fixed random order (seed 0) so that "the first N images"
    (--test-limit, oracle.py --limit, kNN banks) is a fair sample of every class, as it is for
    the official, pre-shuffled CIFAR-10 pickles.
    """
    split_dir = Path(split_dir)
    classes, files = _list_split(split_dir)
    labels = torch.tensor([label for _, label in files], dtype=torch.int64)
    cache = _cache_file(cache_dir, split_dir, size, files)
    images = _cache_load(cache, classes, labels, size)
    if images is None:
        images = _decode_many([str(split_dir / rel) for rel, _ in files], size, progress,
                              desc=f"decoding {split_dir} (once; cached)")
        _cache_save(cache, {"images": images, "labels": labels, "classes": classes})
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    return images[order], labels[order], classes


def _list_split(split_dir):
    """Class folders and image files of one split: (classes, [(relpath, label)]), sorted.

    Every class folder must hold at least one image; files directly in the split folder and
    hidden entries (.DS_Store, ...) are ignored.
    """
    classes = sorted(e.name for e in os.scandir(split_dir) if e.is_dir()
                     and not e.name.startswith(".")) if split_dir.is_dir() else []
    if not classes:
        raise DataError(f"The folder {split_dir} "
                        f"{'has no class subfolders' if split_dir.is_dir() else 'does not exist'}. "
                        f"Expected one subfolder per class, e.g. {split_dir}/<class>/<image>.jpg.")
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


def _decode_image(path, size):
    """Read one image file -> (H, W, 3) uint8 numpy array of exactly `size` = (H, W).

    Standard ImageNet-style preprocessing: scale so the image *covers* H x W (for a square
    target: shorter side -> H), then cut the central H x W. Aspect ratio is kept; the longer
    side loses its borders. PIL's bicubic resize is antialiased when shrinking.
    """
    from PIL import Image   # imported here: PIL is only needed by the folder layouts

    H, W = size
    try:
        with Image.open(path) as im:
            w, h = im.size
            scale = max(H / h, W / w)
            if im.format == "JPEG" and scale < 0.5:
                # JPEG can decode at 1/2, 1/4, 1/8 resolution almost for free (DCT scaling).
                # Ask for at least twice the final size so the bicubic step still antialiases.
                im.draft("RGB", (math.ceil(2 * w * scale), math.ceil(2 * h * scale)))
            im = _to_rgb(im)
            w, h = im.size
            scale = max(H / h, W / w)
            nw, nh = max(W, round(w * scale)), max(H, round(h * scale))   # (w, h) when exact
            if (nw, nh) != (w, h):
                im = im.resize((nw, nh), Image.BICUBIC)
            left, top = (nw - W) // 2, (nh - H) // 2
            im = im.crop((left, top, left + W, top + H))
            return np.asarray(im, dtype=np.uint8)                      # (H, W, 3)
    except Exception as e:
        raise DataError(f"Could not read the image file {path} ({type(e).__name__}: {e}). "
                        f"It is probably corrupt or not an image; delete or replace it and "
                        f"load again.") from None


def _to_rgb(im):
    """Any PIL image -> an 8-bit RGB PIL image with the colours a viewer shows.

    PIL's own convert("RGB") clips instead of scaling for 16-bit grey PNGs (mode "I;16..." or
    "I"), so they come out almost white: scale them to 8 bits here (v / 257, rounded; 65535 ->
    255). "F" (float) pixels are taken as 0..255, PIL's convention. Transparent pixels often
    hold colours nobody ever saw (typically black), so images with alpha are composited over
    white, as a viewer shows them, instead of dropping the alpha channel.
    """
    from PIL import Image

    if im.mode.startswith("I") or im.mode == "F":
        a = np.asarray(im)
        a = (np.clip(np.rint(a), 0, 255) if im.mode == "F"
             else (np.clip(a.astype(np.int64), 0, 65535) * 255 + 32767) // 65535)
        return Image.fromarray(a.astype(np.uint8), "L").convert("RGB")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        im = im.convert("RGBA")
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, im).convert("RGB")
    return im if im.mode == "RGB" else im.convert("RGB")    # L, 1, P, CMYK, YCbCr, ...


def _decode_chunk(job):
    """Worker function (module level so multiprocessing can pickle it): decode a list of files."""
    paths, size = job
    return np.stack([_decode_image(p, size) for p in paths])           # (n, H, W, 3)


def _decode_many(paths, size, progress, desc, workers=2, chunk=500):
    """Decode many files -> (N, 3, H, W) uint8 tensor, in a process pool when it pays off.

    Decoding is pure CPU work in PIL, one file at a time, so `workers` processes divide the time
    by about `workers`. Each worker returns a whole chunk as one array, which keeps the
    inter-process traffic to a few large messages. Small folders are decoded in-process:
    starting processes would cost more than it saves.
    """
    import multiprocessing as mp
    from tqdm import tqdm

    out = np.empty((len(paths), size[0], size[1], 3), dtype=np.uint8)  # (N, H, W, 3)
    jobs = [(paths[i:i + chunk], size) for i in range(0, len(paths), chunk)]
    pooled = workers > 1 and len(paths) >= 4 * chunk and (os.cpu_count() or 1) > 1
    # fork (Linux) starts instantly and needs no re-import of torch; elsewhere the default.
    context = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else None)
    with tqdm(total=len(paths), desc=desc, unit="img", disable=not progress, leave=False) as bar, \
            (context.Pool(workers) if pooled else nullcontext()) as pool:
        chunks = pool.imap(_decode_chunk, jobs) if pooled else map(_decode_chunk, jobs)  # in order
        for i, arr in enumerate(chunks):
            out[i * chunk: i * chunk + len(arr)] = arr
            bar.update(len(arr))
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()    # (N, 3, H, W) uint8


# The decode cache: one torch file per (folder, split, image size, file list), under
# cache_dir > $SPOT_CACHE > ~/.cache/spot. Written atomically, loaded with weights_only=True
# (tensors and plain containers only, never code), and checked before use.

def _cache_file(cache_dir, split_dir, size, files):
    """Where the decoded tensors of one split live. `files` is the sorted [(relpath, label)].

    The key hashes everything that changes the decoded result: the decoder's version (v2: 16-bit
    and transparent PNGs are decoded by value), the folder's absolute path, the output size, and
    every file's name, size and modification time (so adding, removing or replacing an image
    makes a new cache entry instead of silently using stale data).
    """
    root = Path(cache_dir or os.environ.get("SPOT_CACHE") or Path.home() / ".cache" / "spot")
    split_dir = split_dir.resolve()
    h = hashlib.sha256(f"v2|{split_dir}|{split_dir.name}|{size[0]}x{size[1]}|".encode())
    for rel, label in files:
        st = os.stat(split_dir / rel)
        h.update(f"{rel}|{label}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    name = f"{split_dir.parent.name or 'data'}-{split_dir.name}-{size[0]}x{size[1]}"
    return root / f"{name}-{h.hexdigest()[:16]}.pt"


def _cache_load(path, classes, labels, size):
    """The cached images (N, 3, H, W) uint8, or None when missing or not exactly what
    _cache_save wrote for this listing (then the caller decodes again and rewrites the file)."""
    if not path.is_file():
        return None
    try:
        hit = torch.load(path, weights_only=True)
    except Exception as e:  # truncated, foreign, or holding more than tensors
        problem = f"it is unreadable ({type(e).__name__}: {e})"
    else:
        if not isinstance(hit, dict) or not {"images", "labels", "classes"} <= hit.keys():
            problem = "it is not a dict holding images, labels and classes"
        elif (not torch.is_tensor(hit["images"]) or hit["images"].dtype != torch.uint8
              or tuple(hit["images"].shape) != (len(labels), 3, *size)):
            problem = f"its images are not a uint8 tensor of shape {(len(labels), 3, *size)}"
        elif not (torch.is_tensor(hit["labels"]) and hit["labels"].dtype == torch.int64
                  and torch.equal(hit["labels"], labels)):
            problem = "its labels do not match the class folders"
        elif not isinstance(hit["classes"], list) or hit["classes"] != classes:
            problem = "its class names do not match the class folders"
        else:
            return hit["images"]
    warnings.warn(f"ignoring the decode cache file {path}: {problem}. Decoding the images again "
                  f"and rewriting it.")
    return None


def _cache_save(path, obj):
    """Write the cache atomically (write_atomic); a cache we cannot write (read-only home, full
    disk) is only a warning: the data is already in memory."""
    try:
        write_atomic(path, obj)
    except OSError as e:
        warnings.warn(f"could not write the decode cache {path} ({e}); the next load will "
                      f"decode the images again. Set SPOT_CACHE or cache_dir to a writable folder.")
