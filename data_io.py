"""
data_io.py -- the file machinery behind data.py: reading CIFAR-10 and class folders from disk.

Students can skip this file: nothing here is about SPoT. data.py says *what* the datasets are;
this module does the plumbing that gets their pixels into uint8 tensors:

    load_cifar10(root, size, ...)     the official python pickles or class folders, downloaded
                                      (bounded in time, MD5-checked) and extracted if absent
    load_folder(root, size, ...)      an ImageNet-style root/train + root/val (or test) layout
    load_split_folder(dir, size, ...) one split of class folders, through the decode cache
    channel_stats(images)             per-channel mean and std of uint8 images
    DataError                         bad or missing data; str(error) is a helpful paragraph

Everything read from disk is treated as untrusted input: the CIFAR-10 pickles go through an
unpickler that can only build the numpy arrays the official files hold (a pickle can otherwise
run any code), their contents are checked (sizes, label range), and a decode-cache file that is
not exactly what this module writes is ignored and rewritten instead of crashing every later run.
Functions return plain tensors (images (N, C, H, W) uint8, labels (N,) int64); data.py wraps
them in its Split and Dataset.
"""

import argparse
import hashlib
import math
import os
import pickle
import tarfile
import tempfile
import time
import urllib.request
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


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
    mean, std = [], []
    for c in range(images.shape[1]):
        hist = torch.bincount(images[:, c].reshape(-1), minlength=256).to(torch.float64)
        p = hist / hist.sum()                                              # (256,) frequencies
        m = (p * values).sum()
        mean.append(round(float(m), 4))
        std.append(round(float(((p * (values - m) ** 2).sum()).sqrt()), 4))
    return tuple(mean), tuple(std)


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
    has_pickles = all((pickles / n).is_file() for n in CIFAR10_BATCHES)
    has_folders = (root / "train").is_dir() and (root / "test").is_dir()
    if not has_pickles and not has_folders:
        _get_cifar10_archive(root, download, progress)
        has_pickles = True
    if has_pickles:
        train, test, classes = _load_cifar_pickles(pickles)
    else:
        train, test, classes = _load_class_folders(root / "train", root / "test", (32, 32),
                                                   cache_dir, progress)
    train = (resize_uint8(train[0], size), train[1])
    test = (resize_uint8(test[0], size), test[1])
    return train, test, classes


def _cifar_help(root, problem):
    """The one paragraph every CIFAR-10 failure shows: what went wrong and every way out."""
    return (f"{problem} CIFAR-10 is expected in {root} either as the official python version, "
            f"i.e. {root / CIFAR10_FOLDER}/ holding data_batch_1..5, test_batch and batches.meta, "
            f"or as class folders {root}/train/<class>/*.jpg and {root}/test/<class>/*.jpg. "
            f"To get it, download {CIFAR10_URL} (MD5 {CIFAR10_MD5}) on a machine with internet "
            f"access and extract it into {root} (tar xzf {CIFAR10_ARCHIVE} -C {root}), or put the "
            f"archive itself in {root} and it is checked and extracted for you. Or train on the "
            f"built-in dataset with `--dataset shapes`, which needs no download.")


def _get_cifar10_archive(root, download, progress):
    """Make root/cifar-10-batches-py/ exist: check and extract a local archive, or download one.

    Nothing unverified is ever extracted: the MD5 is checked first. A download goes to a `.part`
    file that is verified before it gets the archive's name, and is deleted on any failure
    (network error, deadline, wrong MD5, Ctrl-C), so a failed attempt leaves nothing behind.
    """
    archive = root / CIFAR10_ARCHIVE
    if archive.is_file():
        _verify_md5(archive, CIFAR10_MD5, root)
    elif not download:
        raise DataError(_cifar_help(root, f"CIFAR-10 was not found in {root} and downloading "
                                          f"is switched off."))
    else:
        part = archive.with_name(archive.name + ".part")
        try:
            try:
                root.mkdir(parents=True, exist_ok=True)
                if progress:
                    print(f"downloading {CIFAR10_URL} -> {archive} (170 MB)")
                _urlretrieve(CIFAR10_URL, part)
            except Exception as e:
                raise DataError(_cifar_help(root, f"CIFAR-10 was not found in {root} and "
                                                  f"downloading {CIFAR10_URL} failed "
                                                  f"({type(e).__name__}: {e}).")) from None
            _verify_md5(part, CIFAR10_MD5, root, downloaded=True)
            os.replace(part, archive)    # only a complete, verified download gets the real name
        finally:
            part.unlink(missing_ok=True)
    try:
        with tarfile.open(archive, "r:gz") as tar:
            try:   # Python >= 3.11.4/3.12: refuse absolute paths, links out of root, devices...
                tar.extractall(root, filter="data")
            except TypeError:
                tar.extractall(root)
    except (tarfile.TarError, OSError) as e:
        raise DataError(_cifar_help(root, f"Extracting {archive} failed ({e})."))
    if not (root / CIFAR10_FOLDER).is_dir():
        raise DataError(_cifar_help(root, f"{archive} did not contain {CIFAR10_FOLDER}/."))


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


def _md5(path):
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _verify_md5(path, expected, root, downloaded=False):
    """Raise DataError unless the file's MD5 is `expected`."""
    got = _md5(path)
    if got != expected:
        what = (f"The download of {CIFAR10_URL} has MD5 {got}, expected {expected}: it is "
                f"incomplete or not the official file, and was deleted." if downloaded else
                f"The archive {path} has MD5 {got}, expected {expected}: it is incomplete or not "
                f"the official file. Delete it and try again.")
        raise DataError(_cifar_help(root, what))


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
        try:
            return _PICKLE_GLOBALS[(module, name)]
        except KeyError:
            raise _ForbiddenGlobal(f"{module}.{name}") from None


def _read_pickle(path):
    """Unpickle one CIFAR-10 file with _CifarUnpickler; any failure is a DataError naming it."""
    again = (f"Delete the folder {path.parent} and extract the official archive {CIFAR10_URL} "
             f"(MD5 {CIFAR10_MD5}) again.")
    try:
        with open(path, "rb") as f:
            return _CifarUnpickler(f, encoding="bytes").load()   # py2 str -> bytes
    except _ForbiddenGlobal as e:
        raise DataError(f"The CIFAR-10 file {path} was not loaded: it refers to {e}, which the "
                        f"official files never contain, and unpickling it could run code. It "
                        f"is damaged or was tampered with. {again}") from None
    except Exception as e:
        raise DataError(f"Could not read the CIFAR-10 file {path} ({type(e).__name__}: {e}): it "
                        f"is truncated or not a CIFAR-10 python pickle. {again}") from None


def _read_cifar_batch(path):
    """One official batch file -> (images (n, 3, 32, 32) uint8, labels (n,) int64).

    Each row of b"data" is one image flattened channel-first: 1024 red values (32 rows of 32),
    then 1024 green, then 1024 blue -- so a plain reshape to (n, 3, 32, 32) is exact.
    """
    batch = _read_pickle(path)
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        problem = "it is not a dict holding b'data' and b'labels'"
    else:
        x, y = batch[b"data"], batch[b"labels"]          # a numpy array, a list of ints
        if (not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 2
                or x.shape[0] < 1 or x.shape[1] != 3 * 32 * 32):
            got = (f"{x.dtype} array of shape {x.shape}" if isinstance(x, np.ndarray)
                   else type(x).__name__)
            problem = f"its data is a {got}, not a uint8 array of shape (n, 3072)"
        elif (not isinstance(y, list) or len(y) != len(x)
              or not all(type(v) is int for v in y)):
            problem = f"it has {len(x)} images but its labels are not a list of {len(x)} ints"
        elif not all(0 <= v < CIFAR10_CLASSES for v in y):
            problem = (f"it has labels out of range (min {min(y)}, max {max(y)}; CIFAR-10 "
                       f"labels are 0..{CIFAR10_CLASSES - 1})")
        else:
            return (torch.from_numpy(x.reshape(-1, 3, 32, 32).copy()),
                    torch.tensor(y, dtype=torch.int64))
    raise DataError(f"The CIFAR-10 batch file {path} is not in the official format: {problem}. "
                    f"Delete the folder {path.parent} and extract the official archive "
                    f"{CIFAR10_URL} (MD5 {CIFAR10_MD5}) again.")


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
            raise DataError(f"The CIFAR-10 file {meta} is not in the official format: it should "
                            f"hold b'label_names', a list of {CIFAR10_CLASSES} class names. "
                            f"Delete the folder {folder} and extract the official archive "
                            f"{CIFAR10_URL} (MD5 {CIFAR10_MD5}) again.")
        classes = [n.decode("utf-8", "replace") if isinstance(n, bytes) else n for n in names]
    return train, parts[5], classes


# -----------------------------------------------------------------------------
# Class folders (ImageNet-style): listing, decoding, the decode cache

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


def load_folder(root, size, cache_dir, progress):
    """An ImageNet-style dataset root/train/<class>/* + root/val/<class>/* (or test/)
    -> ((train_images, train_labels), (test_images, test_labels), classes)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"The dataset folder {root} does not exist. The folder dataset "
                        f"expects {root}/train/<class>/<image> and {root}/val/<class>/<image> "
                        f"(or test/ instead of val/), as in Imagenette.")
    test_name = next((s for s in ("val", "test") if (root / s).is_dir()), None)
    if not (root / "train").is_dir() or test_name is None:
        missing = [str(root / "train")] if not (root / "train").is_dir() else []
        if test_name is None:
            missing.append(f"{root / 'val'} (or {root / 'test'})")
        raise DataError(f"The folder dataset in {root} is missing {' and '.join(missing)}. "
                        f"Expected {root}/train/<class>/<image> and {root}/val/<class>/<image> "
                        f"(or test/ instead of val/), one subfolder per class, as in "
                        f"Imagenette.")
    return _load_class_folders(root / "train", root / test_name, size, cache_dir, progress)


def _load_class_folders(train_dir, test_dir, size, cache_dir, progress):
    *train, classes = load_split_folder(train_dir, size, cache_dir, progress)
    *test, test_classes = load_split_folder(test_dir, size, cache_dir, progress)
    if classes != test_classes:
        only_train = sorted(set(classes) - set(test_classes))
        only_test = sorted(set(test_classes) - set(classes))
        raise DataError(f"The class folders of {train_dir} and {test_dir} differ, so labels would "
                        f"not match between the splits. Only in {train_dir.name}: "
                        f"{only_train or 'none'}; only in {test_dir.name}: {only_test or 'none'}. "
                        f"Make both splits hold the same class folders.")
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
    if not split_dir.is_dir():
        raise DataError(f"The folder {split_dir} does not exist. Expected one subfolder per "
                        f"class inside it, e.g. {split_dir}/<class>/<image>.jpg.")
    classes = sorted(e.name for e in os.scandir(split_dir)
                     if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise DataError(f"The folder {split_dir} has no class subfolders. Expected one "
                        f"subfolder per class, e.g. {split_dir}/<class>/<image>.jpg.")
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
            if (w, h) != (W, H):
                nw, nh = max(W, round(w * scale)), max(H, round(h * scale))
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

    if im.mode == "RGB" and "transparency" not in im.info:
        return im
    if im.mode.startswith("I") or im.mode == "F":
        a = np.asarray(im)
        if im.mode == "F":
            a = np.clip(np.rint(a), 0, 255)
        else:
            a = (np.clip(a.astype(np.int64), 0, 65535) * 255 + 32767) // 65535
        return Image.fromarray(a.astype(np.uint8), "L").convert("RGB")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        im = im.convert("RGBA")
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, im).convert("RGB")
    return im.convert("RGB")    # L, 1, P, CMYK, YCbCr, ...


def _decode_chunk(job):
    """Worker function (module level so multiprocessing can pickle it): decode a list of files."""
    paths, size = job
    out = np.empty((len(paths), size[0], size[1], 3), dtype=np.uint8)  # (n, H, W, 3)
    for i, p in enumerate(paths):
        out[i] = _decode_image(p, size)
    return out


def _decode_many(paths, size, progress, desc, workers=2, chunk=500):
    """Decode many files -> (N, 3, H, W) uint8 tensor, in a process pool when it pays off.

    Decoding is pure CPU work in PIL, one file at a time, so `workers` processes divide the time
    by about `workers`. Each worker returns a whole chunk as one array, which keeps the
    inter-process traffic to a few large messages. Small folders are decoded in-process:
    starting processes would cost more than it saves.
    """
    from tqdm import tqdm

    out = np.empty((len(paths), size[0], size[1], 3), dtype=np.uint8)  # (N, H, W, 3)
    jobs = [(paths[i:i + chunk], size) for i in range(0, len(paths), chunk)]
    bar = tqdm(total=len(paths), desc=desc, unit="img", disable=not progress, leave=False)
    if workers > 1 and len(paths) >= 4 * chunk and (os.cpu_count() or 1) > 1:
        import multiprocessing as mp
        # fork (Linux) starts instantly and needs no re-import of torch; elsewhere the default.
        ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
        with ctx.Pool(workers) as pool:
            for i, arr in enumerate(pool.imap(_decode_chunk, jobs)):   # imap keeps the order
                out[i * chunk: i * chunk + len(arr)] = arr
                bar.update(len(arr))
    else:
        for i, job in enumerate(jobs):
            arr = _decode_chunk(job)
            out[i * chunk: i * chunk + len(arr)] = arr
            bar.update(len(arr))
    bar.close()
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
    if cache_dir is not None:
        root = Path(cache_dir)
    elif os.environ.get("SPOT_CACHE"):
        root = Path(os.environ["SPOT_CACHE"])
    else:
        root = Path.home() / ".cache" / "spot"
    split_dir = split_dir.resolve()
    h = hashlib.sha256()
    h.update(f"v2|{split_dir}|{split_dir.name}|{size[0]}x{size[1]}|".encode())
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
        n = len(labels)
        if not isinstance(hit, dict) or not {"images", "labels", "classes"} <= hit.keys():
            problem = "it is not a dict holding images, labels and classes"
        elif (not torch.is_tensor(hit["images"]) or hit["images"].dtype != torch.uint8
              or tuple(hit["images"].shape) != (n, 3, *size)):
            problem = f"its images are not a uint8 tensor of shape {(n, 3, *size)}"
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
    """Write atomically: a temporary file in the same folder, then os.replace.

    A reader (or a crash half-way) never sees a half-written cache, and two processes decoding
    the same folder at once just both write a complete file. A cache we cannot write (read-only
    home, full disk) is only a warning: the data is already in memory.
    """
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)    # mkstemp makes it private (0600); use normal permissions
        os.replace(tmp, path)
    except OSError as e:
        warnings.warn(f"could not write the decode cache {path} ({e}); the next load will "
                      f"decode the images again. Set SPOT_CACHE or cache_dir to a writable folder.")
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


# -----------------------------------------------------------------------------
# python data.py: load a dataset and print a summary (optionally save a preview grid)

def summary_main():
    """python data.py [name] ...: load a dataset, print a summary, optionally save a preview grid."""
    import cli       # imported here: cli imports data, which imports this module
    import data

    p = argparse.ArgumentParser(description="Load a dataset and print a summary.")
    p.add_argument("name", nargs="?", default="shapes", choices=data.DATASETS)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-size", type=cli.count_or_fraction, default=0,
                   help="hold out this many train images (or this fraction, e.g. 0.1)")
    p.add_argument("--no-download", action="store_true")
    p.add_argument("--preview", default=None, help="save a grid of 8 x 8 train images here (PNG)")
    args = p.parse_args()
    t = time.time()
    try:
        d = data.load_dataset(args.name, args.data_dir, args.image_size, seed=args.seed,
                         download=not args.no_download, val_size=args.val_size)
    except (ValueError, data.DataError) as e:
        raise SystemExit(f"error: {e}")
    print(f"{d.name}: loaded in {time.time() - t:.1f} s")
    print(f"  train {tuple(d.train.images.shape)} {d.train.images.dtype}, "
          f"test {tuple(d.test.images.shape)}, image_size {d.image_size}")
    if d.val is not None:
        print(f"  val {tuple(d.val.images.shape)} (held out of train), per class: "
              f"{torch.bincount(d.val.labels, minlength=len(d.classes)).tolist()}")
    print(f"  {len(d.classes)} classes: {', '.join(d.classes)}")
    print(f"  train images per class: {torch.bincount(d.train.labels).tolist()}")
    print(f"  mean {d.mean}  std {d.std}")
    if args.preview:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, axes = plt.subplots(8, 8, figsize=(10, 10.5))
        for ax, img, lab in zip(axes.flat, d.train.images[:64], d.train.labels[:64]):
            ax.imshow(img.permute(1, 2, 0).numpy(), interpolation="nearest")
            ax.set_title(d.classes[int(lab)], fontsize=7)
            ax.axis("off")
        fig.tight_layout()
        fig.savefig(args.preview, dpi=100)
        print(f"  preview -> {args.preview}")
