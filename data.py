"""
data.py -- the image datasets of this project, held in memory as uint8 tensors.

PAPER §1 motivates everything here: sparse feature selection only matters when the evidence
for the label is small and can sit anywhere, so a few grid-aligned tokens can miss it or cut it
in half. Three datasets are offered (PAPER §5/§6 use ImageNet; these are the small stand-ins):

    shapes    built in, no download: 10 small shapes at random *subpixel* positions on a
              cluttered background (make_shapes). Designed to show PAPER §1's point at 32 px.
    cifar10   CIFAR-10, from the official python pickles (`DIR/cifar-10-batches-py/`), or from a
              class-folder layout (`DIR/train/<class>/*.jpg`, `DIR/test/<class>/*.jpg`); downloaded
              into DIR (with an MD5 check) when neither is there.
    folder    any ImageNet-style subset, e.g. Imagenette: `DIR/train/<class>/*` and
              `DIR/val/<class>/*` (or `DIR/test/...`), images of any size, resized and
              center-cropped to `image_size`.

The public API (train.py, oracle.py, visualize.py import these):

    load_dataset(name, data_dir, image_size, ...)  -> Dataset: train/test Split (uint8 images,
                                                      int64 labels), classes, mean, std, image_size
    augment(images, generator)      random crop (zero padding) + horizontal flip, batched
    make_shapes(n, image_size, seed)  the built-in dataset's generator
    DataError                       bad or missing data; str(error) is a helpful paragraph

Why in memory, as uint8? These datasets are small (CIFAR-10 is 180 MB as uint8), and a ViT on
2 CPU cores is limited by compute, not I/O: decoding every image once and slicing batches out of
one tensor removes the data loader from the picture entirely. Floats are made per batch
(`images.float() / 255`), so memory stays at 1 byte per pixel.

Decoding JPEGs is the only slow part (60,000 CIFAR JPEGs: ~6 s in 2 processes), so the decoded
tensors of the folder layouts are cached in one file per split under `~/.cache/spot` (or
`$SPOT_CACHE`, or the `cache_dir` argument). The cache key covers the folder's absolute path, the
split, the image size and the list of files (names, sizes, modification times), so editing the
folder invalidates it. The second load then takes about a second.

Try it:   python data.py                                   (generates `shapes`, prints a summary)
          python data.py cifar10 --data-dir DIR            (loads CIFAR-10 from DIR)
          python data.py folder --data-dir DIR --image-size 64 --preview preview.png
"""

import argparse
import hashlib
import math
import os
import pickle
import shutil
import tarfile
import tempfile
import time
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["DATASETS", "DataError", "Split", "Dataset", "load_dataset", "augment",
           "make_shapes", "SHAPE_CLASSES"]

DATASETS = ("shapes", "cifar10", "folder")


class DataError(Exception):
    """The data is missing or unreadable. The message is a complete paragraph meant for a user:
    command-line scripts print it and exit, without a traceback."""


@dataclass
class Split:
    images: torch.Tensor   # (N, C, H, W) uint8, decoded once, held in memory
    labels: torch.Tensor   # (N,) int64

    def __len__(self):
        return self.labels.shape[0]


@dataclass
class Dataset:
    name: str
    train: Split
    test: Split
    classes: list          # class names, index = label
    mean: tuple            # per-channel mean of the train images, in [0, 1]
    std: tuple             # per-channel standard deviation, in [0, 1]
    image_size: tuple      # (H, W)

    @property
    def num_classes(self):
        return len(self.classes)


# -----------------------------------------------------------------------------
# Small helpers shared by the loaders

def _size_pair(image_size, name="image_size"):
    """An int or an (H, W) pair -> (H, W) of positive ints (the error names the argument)."""
    if isinstance(image_size, int) and not isinstance(image_size, bool):
        image_size = (image_size, image_size)
    if (not isinstance(image_size, (tuple, list)) or len(image_size) != 2
            or not all(isinstance(s, int) and s >= 1 for s in image_size)):
        raise ValueError(f"{name} must be a positive int or a (height, width) pair of positive "
                         f"ints, got {image_size!r}")
    return tuple(image_size)


def _channel_stats(images):
    """Per-channel mean and std of uint8 images (N, C, H, W), as floats in [0, 1].

    Computed from a 256-bin histogram per channel (torch.bincount on the uint8 values): exact,
    and ~15x faster than converting 150 MB of CIFAR-10 pixels to float and summing.
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


def _resize_uint8(images, size, chunk=2048):
    """Resize uint8 images (N, C, h, w) -> (N, C, H, W) uint8, bilinear with antialiasing."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    out = torch.empty(images.shape[0], images.shape[1], *size, dtype=torch.uint8)
    for start in range(0, images.shape[0], chunk):
        x = images[start:start + chunk].float()
        x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
        out[start:start + chunk] = x.round().clamp(0, 255).to(torch.uint8)
    return out


# -----------------------------------------------------------------------------
# The decode cache: one torch file per (folder, split, image size, file list)

def _cache_root(cache_dir):
    """cache_dir argument > $SPOT_CACHE > ~/.cache/spot."""
    if cache_dir is not None:
        return Path(cache_dir)
    if os.environ.get("SPOT_CACHE"):
        return Path(os.environ["SPOT_CACHE"])
    return Path.home() / ".cache" / "spot"


def _cache_file(cache_dir, split_dir, split, size, files):
    """Where the decoded tensors of one split live. `files` is the sorted [(relpath, label)].

    The key hashes everything that changes the decoded result: the folder's absolute path, the
    split, the output size, and every file's name, size and modification time (so adding,
    removing or replacing an image makes a new cache entry instead of silently using stale data).
    """
    h = hashlib.sha256()
    h.update(f"v1|{Path(split_dir).resolve()}|{split}|{size[0]}x{size[1]}|".encode())
    for rel, label in files:
        st = os.stat(Path(split_dir) / rel)
        h.update(f"{rel}|{label}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    name = Path(split_dir).resolve().parent.name or "data"
    return _cache_root(cache_dir) / f"{name}-{split}-{size[0]}x{size[1]}-{h.hexdigest()[:16]}.pt"


def _cache_load(path):
    """The cached dict, or None when missing or unreadable (then we simply decode again)."""
    if not path.is_file():
        return None
    try:
        return torch.load(path, weights_only=True)
    except Exception as e:  # a truncated or foreign file: ignore it, it will be rewritten
        warnings.warn(f"ignoring unreadable cache file {path}: {e}")
        return None


def _cache_save(path, obj):
    """Write atomically: a temporary file in the same folder, then os.replace.

    A reader (or a crash half-way) never sees a half-written cache, and two processes decoding
    the same folder at once just both write a complete file. A cache we cannot write (read-only
    home, full disk) is only a warning: the data is already in memory.
    """
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
        try:
            os.unlink(tmp)
        except (OSError, UnboundLocalError):
            pass


# -----------------------------------------------------------------------------
# Decoding image files (PIL): resize the shorter side, center-crop, RGB

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


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
            im = im.convert("RGB")
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


def _decode_chunk(job):
    """Worker function (module level so multiprocessing can pickle it): decode a list of files."""
    paths, size = job
    out = np.empty((len(paths), size[0], size[1], 3), dtype=np.uint8)  # (n, H, W, 3)
    for i, p in enumerate(paths):
        out[i] = _decode_image(p, size)
    return out


def _decode_many(paths, size, progress, desc, workers=2, chunk=500):
    """Decode many files -> (N, 3, H, W) uint8 tensor, in a 2-process pool when it pays off.

    PIL decodes one small JPEG in ~0.2 ms, so 60,000 files are ~12 s on one core. A pool of
    `workers` processes splits that (each worker returns a whole chunk as one array, which keeps
    the inter-process traffic to a few large messages). Small folders are decoded in-process:
    starting processes costs more than it saves.
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


def _list_split(split_dir):
    """Class folders and image files of one split: (classes, [(relpath, label)]), sorted.

    Every class folder must hold at least one image; files directly in the split folder and
    hidden entries (.DS_Store, ...) are ignored.
    """
    split_dir = Path(split_dir)
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


def _load_split_folder(split_dir, split, size, cache_dir, progress):
    """One split of a class-folder layout -> (Split, classes), through the decode cache."""
    classes, files = _list_split(split_dir)
    cache = _cache_file(cache_dir, split_dir, split, size, files)
    hit = _cache_load(cache)
    if hit is not None and hit.get("classes") == classes and hit["images"].shape[0] == len(files):
        return _fixed_shuffle(Split(hit["images"], hit["labels"])), classes
    images = _decode_many([str(Path(split_dir) / rel) for rel, _ in files], size, progress,
                          desc=f"decoding {split_dir} (once; cached)")
    labels = torch.tensor([label for _, label in files], dtype=torch.int64)
    _cache_save(cache, {"images": images, "labels": labels, "classes": classes})
    return _fixed_shuffle(Split(images, labels)), classes


def _fixed_shuffle(split):
    """Class folders list images class by class; put them in one fixed random order (seed 0) so
    that "the first N images" (--test-limit, oracle.py --limit, kNN banks) is a fair sample of
    every class, as it is for the official, pre-shuffled CIFAR-10 pickles."""
    order = torch.randperm(len(split.labels), generator=torch.Generator().manual_seed(0))
    return Split(split.images[order], split.labels[order])


def _check_same_classes(train_classes, test_classes, train_dir, test_dir):
    if train_classes != test_classes:
        only_train = sorted(set(train_classes) - set(test_classes))
        only_test = sorted(set(test_classes) - set(train_classes))
        raise DataError(f"The class folders of {train_dir} and {test_dir} differ, so labels would "
                        f"not match between the splits. Only in {train_dir.name}: "
                        f"{only_train or 'none'}; only in {test_dir.name}: {only_test or 'none'}. "
                        f"Make both splits hold the same class folders.")


# -----------------------------------------------------------------------------
# CIFAR-10: official pickles, or class folders; download when neither is there

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"


def _cifar_help(root, problem):
    """The one paragraph every CIFAR-10 failure shows: what went wrong and every way out."""
    return (f"{problem} CIFAR-10 is expected in {root} either as the official python version, "
            f"i.e. {root / CIFAR10_FOLDER}/ holding data_batch_1..5, test_batch and batches.meta, "
            f"or as class folders {root}/train/<class>/*.jpg and {root}/test/<class>/*.jpg. "
            f"To get it, download {CIFAR10_URL} (MD5 {CIFAR10_MD5}) on a machine with internet "
            f"access and extract it into {root} (tar xzf {CIFAR10_ARCHIVE} -C {root}), or put the "
            f"archive itself in {root} and it is checked and extracted for you. Or train on the "
            f"built-in dataset with `--dataset shapes`, which needs no download.")


def _urlretrieve(url, dest):
    """Download url -> dest (a separate function so tests can replace the network)."""
    with urllib.request.urlopen(url, timeout=30) as r, open(dest, "wb") as f:
        shutil.copyfileobj(r, f, length=1 << 20)


def _md5(path):
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _verify_md5(path, expected, root):
    """Raise DataError unless the file's MD5 is `expected`. Checked BEFORE extracting, so a
    truncated or tampered archive never writes a single file."""
    got = _md5(path)
    if got != expected:
        raise DataError(_cifar_help(root, f"The archive {path} has MD5 {got}, expected {expected}: "
                                          f"it is incomplete or not the official file. Delete it "
                                          f"and try again."))


def _download_cifar10(root, download, progress):
    """Make sure DIR/cifar-10-batches-py/ exists: extract a local archive or download one."""
    archive = root / CIFAR10_ARCHIVE
    if not archive.is_file():
        if not download:
            raise DataError(_cifar_help(root, f"CIFAR-10 was not found in {root} and downloading "
                                              f"is switched off."))
        try:
            root.mkdir(parents=True, exist_ok=True)
            tmp = archive.with_name(archive.name + ".part")
            if progress:
                print(f"downloading {CIFAR10_URL} -> {archive} (170 MB)")
            _urlretrieve(CIFAR10_URL, tmp)
            os.replace(tmp, archive)    # only a complete download gets the real name
        except Exception as e:
            raise DataError(_cifar_help(root, f"CIFAR-10 was not found in {root} and downloading "
                                              f"{CIFAR10_URL} failed ({type(e).__name__}: {e})."))
    _verify_md5(archive, CIFAR10_MD5, root)
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


def _read_cifar_pickle(path):
    """One official batch file -> (images (n, 3, 32, 32) uint8, labels (n,) int64).

    Each row of b"data" is one image flattened channel-first: 1024 red values (32 rows of 32),
    then 1024 green, then 1024 blue -- so a plain reshape to (n, 3, 32, 32) is exact.
    (pickle can run code: only load files you trust, e.g. the MD5-checked official archive.)
    """
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except Exception as e:
        raise DataError(f"Could not read the CIFAR-10 batch file {path} ({type(e).__name__}: "
                        f"{e}). Delete the folder {Path(path).parent} and extract the official "
                        f"archive {CIFAR10_URL} again.") from None
    if len(labels) != len(data):
        raise DataError(f"The CIFAR-10 batch file {path} has {len(data)} images but "
                        f"{len(labels)} labels; extract the official archive again.")
    return torch.from_numpy(data.copy()), torch.from_numpy(labels)


def _load_cifar_pickles(folder):
    parts = [_read_cifar_pickle(folder / f"data_batch_{i}") for i in range(1, 6)]
    train = Split(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
    test = Split(*_read_cifar_pickle(folder / "test_batch"))
    classes = [f"class_{i}" for i in range(10)]
    meta = folder / "batches.meta"
    if meta.is_file():
        with open(meta, "rb") as f:
            classes = [n.decode() if isinstance(n, bytes) else str(n)
                       for n in pickle.load(f, encoding="bytes")[b"label_names"]]
    return train, test, classes


def _load_cifar10(root, download, cache_dir, progress):
    pickles = root / CIFAR10_FOLDER
    has_pickles = all((pickles / n).is_file() for n in
                      [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"])
    has_folders = (root / "train").is_dir() and (root / "test").is_dir()
    if not has_pickles and not has_folders:
        _download_cifar10(root, download, progress)
        has_pickles = True
    if has_pickles:   # preferred: exact pixels, and 0.5 s to read
        return _load_cifar_pickles(pickles)
    train, classes = _load_split_folder(root / "train", "train", (32, 32), cache_dir, progress)
    test, test_classes = _load_split_folder(root / "test", "test", (32, 32), cache_dir, progress)
    _check_same_classes(classes, test_classes, root / "train", root / "test")
    return train, test, classes


# -----------------------------------------------------------------------------
# The built-in `shapes` dataset (PAPER §1): small objects at subpixel positions, with clutter

SHAPE_CLASSES = ("square", "disc", "ring", "triangle", "plus", "x", "equals", "bar", "diamond",
                 "corner")


def _shape_mask(label, u, v, r):
    """Inside-test of shape `label` at offsets (u, v) pixels from its centre (v points down).

    u, v: (n, S, S) sample coordinates; r: (n, 1, 1) half-size in pixels (~3.2-4.2 at 32 px,
    i.e. objects 7-9 px wide: two windows of 4 px, so a 4 x 4 grid tile sees only a part). Returns a bool tensor (n, S, S). Bars are w = 0.32 r half-wide,
    i.e. ~2 px: thin enough to look different, thick enough to survive antialiasing.
    """
    w = 0.32 * r
    au, av = u.abs(), v.abs()
    name = SHAPE_CLASSES[label]
    if name == "square":
        return torch.maximum(au, av) <= 0.8 * r
    if name == "disc":
        return u * u + v * v <= r * r
    if name == "ring":
        d2 = u * u + v * v
        return (d2 <= r * r) & (d2 >= (0.5 * r) ** 2)
    if name == "triangle":   # apex up at v = -r, base at v = 0.8 r with half-width r
        return (v <= 0.8 * r) & (au <= (v + r) / 1.8)
    if name == "plus":
        return ((au <= w) & (av <= r)) | ((av <= w) & (au <= r))
    if name == "x":          # the plus rotated by 45 degrees, arms slightly longer
        a, b = (u + v).abs() / math.sqrt(2), (u - v).abs() / math.sqrt(2)
        return ((a <= w) & (b <= 1.1 * r)) | ((b <= w) & (a <= 1.1 * r))
    if name == "equals":     # two horizontal bars
        return (au <= r) & ((av - 0.6 * r).abs() <= 0.8 * w)
    if name == "bar":        # one vertical bar
        return (au <= 1.2 * w) & (av <= r)
    if name == "diamond":
        return au + av <= 1.3 * r     # pointed: reaches further than the disc
    if name == "corner":     # an L: left vertical stroke + bottom horizontal stroke
        return (((u >= -r) & (u <= -r + 2 * w) & (av <= r))
                | ((v <= r) & (v >= r - 2 * w) & (au <= r)))
    raise ValueError(label)


def _hsv_to_rgb(h, s, v):
    """Vectorized HSV -> RGB, all in [0, 1]: (n,) each -> (n, 3)."""
    k = (torch.tensor([5.0, 3.0, 1.0]) + h[:, None] * 6) % 6                    # (n, 3)
    return v[:, None] - v[:, None] * s[:, None] * (torch.minimum(k, 4 - k).clamp(0, 1))


def _render_shapes(n, size, seed, chunk=512, supersample=8):
    """Generate the shapes dataset: (images (n,3,S,S) uint8, labels (n,), info dict).

    All randomness is drawn from one torch.Generator seeded with `seed`, up front for the
    per-image parameters (so the same (n, size, seed) gives identical bytes on every run).
    Rendering then works in chunks of images, vectorized over the chunk; the only Python loops
    are over chunks, classes and distractors, never over images.
    """
    g = torch.Generator().manual_seed(seed)
    S = size
    scale = S / 32                                      # object and clutter sizes follow the image
    rand = lambda *shape: torch.rand(*shape, generator=g)

    # -- labels: exactly balanced, shuffled
    labels = (torch.arange(n) % len(SHAPE_CLASSES))[torch.randperm(n, generator=g)]

    # -- the object: half-size r, a continuous centre (anywhere it fits), a bright colour
    r = (3.2 + 1.0 * rand(n)) * scale                   # (n,) pixels
    margin = 1.35 * r + 0.5                             # the shape's reach + half a pixel
    centre = margin[:, None] + rand(n, 2) * (S - 2 * margin[:, None])   # (n, 2) (y, x) pixels
    obj_colour = _hsv_to_rgb(rand(n), 0.5 + 0.5 * rand(n), 0.85 + 0.15 * rand(n))   # (n, 3)

    # -- the background: a dark-to-mid base colour, smooth low-contrast noise, pixel noise
    base = 0.15 + 0.3 * rand(n, 3)                      # (n, 3)
    smooth = torch.randn(n, 3, 5, 5, generator=g) * 0.08
    # -- distractors, fainter than the object: soft blobs and short thin lines
    n_blob, n_line = 3, 3
    blob_c = rand(n, n_blob, 2) * S                     # centres (y, x)
    blob_sigma = (1.5 + 2.0 * rand(n, n_blob)) * scale
    blob_alpha = 0.15 + 0.2 * rand(n, n_blob)
    blob_colour = rand(n, n_blob, 3)
    line_c = rand(n, n_line, 2) * S
    line_angle = rand(n, n_line) * math.pi
    line_half = (2.0 + 3.0 * rand(n, n_line)) * scale   # half-length
    line_alpha = 0.2 + 0.2 * rand(n, n_line)
    line_colour = rand(n, n_line, 3)
    noise_seed = int(torch.randint(0, 2**62, (1,), generator=g))

    # Local window around each object: L x L pixels, large enough for the biggest shape.
    # The window [floor(c) - R, floor(c) + R + 1) contains [c - R, c + R] for any c, and R is
    # at least the largest shape's reach (1.35 * 4.2 px at 32 px).
    R = math.ceil(1.35 * 4.2 * scale)
    L = min(2 * R + 1, S)
    offs = (torch.arange(L * supersample) + 0.5) / supersample      # sample offsets in the window
    pix = torch.arange(S) + 0.5                                     # pixel centres

    images = torch.empty(n, 3, S, S, dtype=torch.uint8)
    masks = torch.zeros(n, S, S)
    gn = torch.Generator().manual_seed(noise_seed)
    for a in range(0, n, chunk):
        b = min(a + chunk, n)
        m = b - a
        # Background (m, 3, S, S) in [0, 1].
        img = base[a:b, :, None, None] + F.interpolate(smooth[a:b], size=(S, S), mode="bicubic",
                                                       align_corners=False)
        img = img + 0.015 * torch.randn(m, 3, S, S, generator=gn)
        yy, xx = pix.view(1, S, 1), pix.view(1, 1, S)
        for k in range(n_blob):     # Gaussian blobs: img <- img + alpha * g * (colour - img)
            dy = yy - blob_c[a:b, k, 0, None, None]
            dx = xx - blob_c[a:b, k, 1, None, None]
            gauss = torch.exp(-(dy * dy + dx * dx) / (2 * blob_sigma[a:b, k, None, None] ** 2))
            wgt = (blob_alpha[a:b, k, None, None] * gauss)[:, None]           # (m, 1, S, S)
            img = img + wgt * (blob_colour[a:b, k, :, None, None] - img)
        for k in range(n_line):     # 1-px lines: coverage from the distance to the segment
            dy = yy - line_c[a:b, k, 0, None, None]
            dx = xx - line_c[a:b, k, 1, None, None]
            cy, cx = torch.sin(line_angle[a:b, k]), torch.cos(line_angle[a:b, k])
            along = (dy * cy[:, None, None] + dx * cx[:, None, None])
            across = (-dy * cx[:, None, None] + dx * cy[:, None, None]).abs()
            beyond = (along.abs() - line_half[a:b, k, None, None]).clamp_min(0)
            dist = torch.sqrt(across ** 2 + beyond ** 2)
            cov = (0.5 * scale + 0.5 - dist).clamp(0, 1)                      # ~1 px wide
            wgt = (line_alpha[a:b, k, None, None] * cov)[:, None]
            img = img + wgt * (line_colour[a:b, k, :, None, None] - img)

        # The object, antialiased: evaluate the inside-test on a supersample x supersample grid
        # of points per pixel inside the local window, and average -> coverage in [0, 1].
        # 8 x 8 samples resolve edges to 1/8 px, so even a 1.4 px bar moves smoothly with the
        # object's continuous centre (only the ~L x L window is rendered, so this stays cheap).
        c = centre[a:b]                                                       # (m, 2)
        origin = (c.floor().long() - R).clamp(0, S - L)                       # (m, 2) window corner
        v = origin[:, 0, None, None] + offs.view(1, -1, 1) - c[:, 0, None, None]  # (m, Ls, 1)
        u = origin[:, 1, None, None] + offs.view(1, 1, -1) - c[:, 1, None, None]  # (m, 1, Ls)
        u, v = torch.broadcast_tensors(u, v)                                  # (m, Ls, Ls)
        inside = torch.zeros(m, L * supersample, L * supersample)
        lab = labels[a:b]
        for cls in range(len(SHAPE_CLASSES)):
            sel = (lab == cls).nonzero().squeeze(1)
            if sel.numel():
                inside[sel] = _shape_mask(cls, u[sel], v[sel], r[a:b][sel, None, None]).float()
        cov = inside.view(m, L, supersample, L, supersample).mean(dim=(2, 4))  # (m, L, L)
        # Paste each L x L coverage window into a full-size map at its own offset (no loop).
        rows = origin[:, 0, None] + torch.arange(L)                           # (m, L)
        cols = origin[:, 1, None] + torch.arange(L)                           # (m, L)
        full = torch.zeros(m, S, S)
        full[torch.arange(m)[:, None, None], rows[:, :, None], cols[:, None, :]] = cov
        img = img * (1 - full[:, None]) + obj_colour[a:b, :, None, None] * full[:, None]
        images[a:b] = (img.clamp(0, 1) * 255).round().to(torch.uint8)
        masks[a:b] = full

    info = {"center": centre / S,        # (n, 2) (y, x) in spot.py's normalized coordinates
            "radius": r,                 # (n,) half-size in pixels
            "mask": masks}               # (n, S, S) object coverage in [0, 1]
    return images, labels.to(torch.int64), info


def make_shapes(n, image_size=32, seed=0, return_info=False):
    """The built-in dataset: n images of one small shape each, on a cluttered background.

    Returns images (n, 3, S, S) uint8 and labels (n,) int64 (label = index in SHAPE_CLASSES);
    with return_info=True also a dict: "center" (n, 2) the object's centre as (y, x) in [0, 1]
    (spot.py's coordinates), "radius" (n,) its half-size in pixels, "mask" (n, S, S) float its
    antialiased coverage -- handy to check whether tokens landed on the object.

    Why it looks like this (PAPER §1): the object is 7-9 px wide on a 32 px image and sits at a
    random *continuous* position, so with 4 x 4 grid patches it usually straddles 2-4 tiles
    ("grids cannot align every salient region"), while free tokens can be centred on it and
    tile it at its own offset, each window reading object and not a sliver of a tile border.
    The clutter (smooth colour noise, faint blobs and lines, all lower-contrast than the object)
    keeps "find the brightest pixels" from being the whole task. Deterministic: the same
    (n, image_size, seed) always gives the same bytes.
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    H, W = _size_pair(image_size)
    if H != W:
        raise ValueError(f"image_size must be square for shapes, got {image_size!r}")
    if H < 12:
        raise ValueError(f"image_size must be >= 12 for shapes (objects are ~6 px), got {H}")
    # One thread, on purpose: rendering is many medium-sized elementwise ops on chunks that fit
    # in the CPU cache, and multi-threaded ops must wait at a barrier for every thread; when the
    # machine is busy (e.g. a training run on the other core) that made generation 5-10x slower.
    # Single-threaded it takes ~1.5 s for 12,000 images, busy or not, and a fixed thread count
    # also keeps the bytes identical whatever torch.get_num_threads() the caller uses.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        images, labels, info = _render_shapes(n, H, seed)
    finally:
        torch.set_num_threads(threads)
    return (images, labels, info) if return_info else (images, labels)


# -----------------------------------------------------------------------------
# load_dataset: the one entry point

SHAPES_TRAIN, SHAPES_TEST = 10_000, 2_000


def load_dataset(name, data_dir=None, image_size=None, seed=0, download=True, cache_dir=None,
                 progress=True):
    """Load a dataset into memory -> Dataset (uint8 images; see the module docstring).

    name:       "shapes" (built in), "cifar10" or "folder"
    data_dir:   the dataset's folder (cifar10, folder); ignored by shapes
    image_size: output size, int or (H, W). shapes: default 32; cifar10: default 32 (other
                sizes are resized from 32); folder: required (e.g. 64 or 128)
    seed:       shapes only: train uses seed 2*seed, test 2*seed + 1 (disjoint streams)
    download:   cifar10 only: download the official archive into data_dir if it is missing
    cache_dir:  where decoded folder layouts are cached (default $SPOT_CACHE or ~/.cache/spot)
    progress:   show tqdm bars while decoding
    Raises ValueError for bad arguments, DataError for missing or unreadable data.
    """
    if name not in DATASETS:
        raise ValueError(f"name must be one of {DATASETS}, got {name!r}")
    if name in ("cifar10", "folder") and data_dir is None:
        raise ValueError(f"data_dir is required for the {name!r} dataset: pass the folder that "
                         f"holds it (the shapes dataset needs none)")
    if image_size is not None:
        image_size = _size_pair(image_size)

    if name == "shapes":
        size = image_size or (32, 32)
        train_x, train_y = make_shapes(SHAPES_TRAIN, size, seed=2 * seed)
        test_x, test_y = make_shapes(SHAPES_TEST, size, seed=2 * seed + 1)
        train, test, classes = Split(train_x, train_y), Split(test_x, test_y), list(SHAPE_CLASSES)

    elif name == "cifar10":
        root = Path(data_dir).expanduser()
        train, test, classes = _load_cifar10(root, download, cache_dir, progress)
        size = image_size or (32, 32)
        train = Split(_resize_uint8(train.images, size), train.labels)
        test = Split(_resize_uint8(test.images, size), test.labels)

    else:  # folder
        if image_size is None:
            raise ValueError("image_size is required for the 'folder' dataset (e.g. 64 or 128): "
                             "every image is resized and center-cropped to it")
        root = Path(data_dir).expanduser()
        if not root.is_dir():
            raise DataError(f"The dataset folder {root} does not exist. The folder dataset "
                            f"expects {root}/train/<class>/<image> and {root}/val/<class>/<image> "
                            f"(or test/ instead of val/), as in Imagenette.")
        size = image_size
        test_name = next((s for s in ("val", "test") if (root / s).is_dir()), None)
        if not (root / "train").is_dir() or test_name is None:
            missing = [str(root / "train")] if not (root / "train").is_dir() else []
            if test_name is None:
                missing.append(f"{root / 'val'} (or {root / 'test'})")
            raise DataError(f"The folder dataset in {root} is missing {' and '.join(missing)}. "
                            f"Expected {root}/train/<class>/<image> and {root}/val/<class>/<image> "
                            f"(or test/ instead of val/), one subfolder per class, as in "
                            f"Imagenette.")
        train, classes = _load_split_folder(root / "train", "train", size, cache_dir, progress)
        test, test_classes = _load_split_folder(root / test_name, test_name, size, cache_dir,
                                                progress)
        _check_same_classes(classes, test_classes, root / "train", root / test_name)

    mean, std = _channel_stats(train.images)
    return Dataset(name=name, train=train, test=test, classes=list(classes), mean=mean, std=std,
                   image_size=tuple(train.images.shape[-2:]))


# -----------------------------------------------------------------------------
# Augmentation: random crop with zero padding + horizontal flip, batched

def augment(images, generator=None, padding=4, flip=True):
    """Random translation by up to `padding` px (zero fill) and horizontal flip, per image.

    images: (B, C, H, W), any dtype (normally float). Returns a new tensor of the same shape.
    Equivalent to torchvision's RandomCrop(H, padding) + RandomHorizontalFlip(), but for the
    whole batch at once: pad by `padding` zeros on each side, then *gather* each image's H x W
    crop with its own offsets (dy, dx in [0, 2 padding]); a flipped image simply reads its
    columns in reverse order. No Python loop over images. Random numbers come from `generator`
    (a seeded torch.Generator makes it reproducible); padding=0, flip=False is the identity.

    Note zero fill is "black" for raw [0, 1] pixels; applied after normalization it is the mean
    colour instead, like the zeros spot.py reads outside the image.
    """
    if not torch.is_tensor(images) or images.dim() != 4:
        raise ValueError(f"images must be a 4-D tensor (B, C, H, W), got "
                         f"{tuple(images.shape) if torch.is_tensor(images) else type(images)}")
    if not isinstance(padding, int) or padding < 0:
        raise ValueError(f"padding must be an int >= 0, got {padding!r}")
    B, C, H, W = images.shape
    dev = generator.device if generator is not None else torch.device("cpu")
    # Random draws (always all three, so the stream does not depend on the flags).
    dy = torch.randint(0, 2 * padding + 1, (B,), generator=generator, device=dev)
    dx = torch.randint(0, 2 * padding + 1, (B,), generator=generator, device=dev)
    flipped = torch.rand(B, generator=generator, device=dev) < 0.5
    dy, dx, flipped = dy.to(images.device), dx.to(images.device), flipped.to(images.device)
    if not flip:
        flipped = torch.zeros_like(flipped)

    padded = F.pad(images, (padding, padding, padding, padding))      # (B, C, H+2p, W+2p), zeros
    ar_h = torch.arange(H, device=images.device)
    ar_w = torch.arange(W, device=images.device)
    rows = dy[:, None] + ar_h                                        # (B, H) rows of each crop
    cols = torch.where(flipped[:, None], W - 1 - ar_w, ar_w) + dx[:, None]   # (B, W) maybe reversed
    b = torch.arange(B, device=images.device)[:, None, None, None]
    c = torch.arange(C, device=images.device)[None, :, None, None]
    return padded[b, c, rows[:, None, :, None], cols[:, None, None, :]]   # (B, C, H, W)


# -----------------------------------------------------------------------------
# python data.py: load a dataset and print a summary (optionally save a preview grid)

def _main():
    p = argparse.ArgumentParser(description="Load a dataset and print a summary.")
    p.add_argument("name", nargs="?", default="shapes", choices=DATASETS)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-download", action="store_true")
    p.add_argument("--preview", default=None, help="save a grid of 8 x 8 train images here (PNG)")
    args = p.parse_args()
    t = time.time()
    try:
        d = load_dataset(args.name, args.data_dir, args.image_size, seed=args.seed,
                         download=not args.no_download)
    except (ValueError, DataError) as e:
        raise SystemExit(f"error: {e}")
    print(f"{d.name}: loaded in {time.time() - t:.1f} s")
    print(f"  train {tuple(d.train.images.shape)} {d.train.images.dtype}, "
          f"test {tuple(d.test.images.shape)}, image_size {d.image_size}")
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


if __name__ == "__main__":
    _main()
