"""
data.py -- the image datasets of this project, held in memory as uint8 tensors.

PAPER §1 motivates the built-in data: sparse feature selection only matters when the evidence
for the label is small and can sit anywhere, so a few grid-aligned tokens can miss it or cut it
in half. Three datasets are offered (PAPER §5/§6 use ImageNet; these are the small stand-ins):

    shapes    built in, no download: 10 small shapes at random *subpixel* positions on a
              cluttered background (make_shapes). Designed to show PAPER §1's point at 32 px.
    cifar10   CIFAR-10, from the official python pickles (`DIR/cifar-10-batches-py/`), or from a
              class-folder layout (`DIR/train/<class>/*.jpg`, `DIR/test/<class>/*.jpg`);
              downloaded into DIR (with an MD5 check) when neither is there.
    folder    any ImageNet-style subset, e.g. Imagenette: `DIR/train/<class>/*` and
              `DIR/val/<class>/*` (or `DIR/test/...`), images of any size, resized and
              center-cropped to `image_size`.

In reading order (train.py, oracle.py and visualize.py import these):

    DataError                       bad or missing data; str(error) is a helpful paragraph
    Split, Dataset                  uint8 images (N, C, H, W) + int64 labels (N,); a Dataset is
                                    train / test (/ val) Splits, class names, mean, std, size
    make_shapes(n, image_size, seed)  the built-in dataset's generator
    load_dataset(name, data_dir, image_size, ..., val_size)  -> Dataset
    split_validation(split, size)   a stratified, fixed hold-out for choosing hyper-parameters
    augment(images, generator)      random crop (zero padding) + horizontal flip, batched

The file machinery -- downloading, safe unpickling, decoding JPEGs, the decode cache -- lives in
utils.py. Nothing there is about SPoT; you can skip it.

Why in memory, as uint8? These datasets are small (CIFAR-10 is 180 MB as uint8), and a ViT on
2 CPU cores is limited by compute, not I/O: decoding every image once and slicing batches out of
one tensor removes the data loader from the picture entirely. Floats are made per batch
(`images.float() / 255`), so memory stays at 1 byte per pixel. Decoding JPEGs is the one slow
step, so the folder layouts are decoded once and cached, one file per split, under
`~/.cache/spot` (or `$SPOT_CACHE`, or the `cache_dir` argument); the cache key covers the
folder, the image size and every file's name, size and modification time, so editing the
folder invalidates it.

"The first N images" of any split are a fair mix of classes: the CIFAR-10 pickles come
shuffled, shapes draws its labels in random order, and class folders (listed class by class)
are put in one fixed random order. So --test-limit, kNN banks and the first validation images
all see every class.

Try it:   python data.py                                   (generates `shapes`, prints a summary)
          python data.py cifar10 --data-dir DIR            (loads CIFAR-10 from DIR)
          python data.py folder --data-dir DIR --image-size 64 --preview preview.png
"""

import argparse
import math
import numbers
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import spot
import utils

__all__ = ["DATASETS", "DataError", "Split", "Dataset", "load_dataset", "split_validation",
           "augment", "make_shapes", "SHAPE_CLASSES"]

DATASETS = ("shapes", "cifar10", "folder")

# Bad or missing data. The message is a complete paragraph meant for a user: command-line
# scripts print it and exit, without a traceback. (Defined in data_io, which raises it.)
DataError = utils.DataError


@dataclass
class Split:
    images: torch.Tensor   # (N, C, H, W) uint8, decoded once, held in memory
    labels: torch.Tensor   # (N,) int64

    def __len__(self):
        return self.labels.shape[0]


@dataclass
class Dataset:
    name: str
    train: Split           # what the model learns from (minus `val`, when there is one)
    test: Split            # report it; never choose anything by it
    classes: list          # class names, index = label
    mean: tuple            # per-channel mean of the train images, in [0, 1]
    std: tuple             # per-channel standard deviation, in [0, 1]
    image_size: tuple      # (H, W)
    val: Split = None      # held out of train for choosing hyper-parameters (val_size), or None


# -----------------------------------------------------------------------------
# The built-in `shapes` dataset (PAPER §1): small objects at subpixel positions, with clutter

SHAPE_CLASSES = ("square", "disc", "ring", "triangle", "plus", "x", "equals", "bar", "diamond",
                 "corner")


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
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    H, W = spot.to_hw(image_size)
    if H != W:
        raise ValueError(f"image_size must be square for shapes, got {image_size!r}")
    if H < 12:
        raise ValueError(f"image_size must be >= 12 for shapes (objects scale with the image, "
                         f"and below 12 px they are too few pixels to tell apart), got {H}")
    # One thread, on purpose: rendering is many medium-sized elementwise ops on chunks that fit
    # in the CPU cache, and a multi-threaded op waits at a barrier for its slowest thread; when
    # the other core is busy (e.g. a training run) every op waits for it. A fixed thread count
    # also keeps the bytes identical whatever torch.get_num_threads() the caller uses.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        images, labels, info = _render_shapes(n, H, seed)
    finally:
        torch.set_num_threads(threads)
    return (images, labels, info) if return_info else (images, labels)


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


def _shape_mask(label, u, v, r):
    """Inside-test of shape `label` at offsets (u, v) pixels from its centre (v points down).

    u, v: (n, S, S) sample coordinates; r: (n, 1, 1) half-size in pixels (~3.2-4.2 at 32 px,
    i.e. objects 7-9 px wide: two windows of 4 px, so a 4 x 4 grid tile sees only a part).
    Returns a bool tensor (n, S, S). Bars are w = 0.32 r half-wide, i.e. ~2 px: thin enough
    to look different, thick enough to survive antialiasing.
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



# -----------------------------------------------------------------------------
# load_dataset: the one entry point

SHAPES_TRAIN, SHAPES_TEST = 10_000, 2_000


def load_dataset(name, data_dir=None, image_size=None, seed=0, download=True, cache_dir=None,
                 progress=True, val_size=0, val_seed=0):
    """Load a dataset into memory -> Dataset (uint8 images; see the module docstring).

    name:       "shapes" (built in), "cifar10" or "folder"
    data_dir:   the dataset's folder (cifar10, folder); ignored by shapes
    image_size: output size, int or (H, W). shapes: default 32; cifar10: default 32 (other
                sizes are resized from 32); folder: required (e.g. 64 or 128)
    seed:       shapes only: train uses seed 2*seed, test 2*seed + 1 (disjoint streams)
    download:   cifar10 only: download the official archive into data_dir if it is missing
    cache_dir:  where decoded folder layouts are cached (default $SPOT_CACHE or ~/.cache/spot)
    progress:   show progress while downloading and decoding
    val_size:   0 = no validation split (Dataset.val is None). Else hold out that many train
                images (int) or that fraction of them (float in (0, 1)) as Dataset.val, per
                class (split_validation); mean and std then come from the rest of train only,
                so nothing about the validation images leaks into the model's normalization.
    val_seed:   which train images are held out. Separate from `seed` and fixed by default:
                every run that compares recipes must be scored on the same validation images.
    Raises ValueError for bad arguments, DataError for missing or unreadable data.
    """
    if name not in DATASETS:
        raise ValueError(f"name must be one of {DATASETS}, got {name!r}")
    if name in ("cifar10", "folder") and data_dir is None:
        raise ValueError(f"data_dir is required for the {name!r} dataset: pass the folder that "
                         f"holds it (the shapes dataset needs none)")
    if image_size is not None:
        image_size = spot.to_hw(image_size)
    elif name == "folder":
        raise ValueError("image_size is required for the 'folder' dataset (e.g. 64 or 128): "
                         "every image is resized and center-cropped to it")
    holdout = isinstance(val_size, bool) or val_size != 0
    if holdout:
        _check_val_size(val_size)   # now, not after a long decode; the size is checked later

    if name == "shapes":
        size = image_size or (32, 32)
        train = Split(*make_shapes(SHAPES_TRAIN, size, seed=2 * seed))
        test = Split(*make_shapes(SHAPES_TEST, size, seed=2 * seed + 1))
        classes = list(SHAPE_CLASSES)
    else:
        if name == "cifar10":
            train, test, classes = utils.load_cifar10(data_dir, image_size or (32, 32),
                                                        download, cache_dir, progress)
        else:
            train, test, classes = utils.load_folder(data_dir, image_size, cache_dir, progress)
        train, test = Split(*train), Split(*test)

    val = None
    if holdout:
        train, val = split_validation(train, val_size, seed=val_seed)
    mean, std = utils.channel_stats(train.images)
    return Dataset(name=name, train=train, test=test, classes=list(classes), mean=mean, std=std,
                   image_size=tuple(train.images.shape[-2:]), val=val)


# -----------------------------------------------------------------------------
# A validation split: choose hyper-parameters on it, never on test

def split_validation(split, size, seed=0):
    """Hold out `size` images of `split` -> (train_part, val_part), two Splits.

    size: an int = that many images in total, or a float in (0, 1) = that fraction.

    Why: a learning rate, epoch count or recipe picked for its test accuracy is fitted to the
    test set, and the test number stops measuring how well the model generalizes. Pick them on
    images carved out of train; look at test once, at the end.

    Stratified: each class gives the same share of its images, so the validation set has the
    class balance of `split` (an int is shared out by largest remainders, so the total is
    exact; a fraction is rounded per class). Which images of a class go is drawn from a
    generator seeded with `seed`, so the same call always gives the same parts. The parts are
    disjoint, together exactly `split`, and each keeps the images in their original order -- an
    order the loaders already mix -- so the first N validation images are still a class mix.
    """
    if not isinstance(split, Split):
        raise ValueError(f"split must be a data.Split, got {type(split).__name__}")
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool):
        raise ValueError(f"seed must be an int, got {seed!r}")
    n = len(split)
    _check_val_size(size, n)
    labels = split.labels
    classes, counts = torch.unique(labels, return_counts=True)      # (K,) each, sorted
    if isinstance(size, numbers.Integral):
        # Largest remainders: round every class's exact share down, then give one more image
        # each to the classes that lost the most by it, until the total is exactly `size`.
        share = counts.double() * int(size) / n                      # (K,) exact shares
        take = share.floor().long()
        most_lost = torch.argsort(share - take, descending=True, stable=True)
        take[most_lost[:int(size) - int(take.sum())]] += 1
    else:
        take = (counts.double() * size + 0.5).floor().long()         # (K,) rounded per class
        if not 0 < int(take.sum()) < n:
            raise ValueError(f"size={size!r} of a split of {n} images rounds to "
                             f"{int(take.sum())} validation images (per class: {take.tolist()}); "
                             f"choose a fraction that leaves both parts non-empty")

    g = torch.Generator().manual_seed(int(seed))
    is_val = torch.zeros(n, dtype=torch.bool)
    for c, k in zip(classes.tolist(), take.tolist()):
        members = (labels == c).nonzero().squeeze(1)                 # where class c is, in order
        is_val[members[torch.randperm(len(members), generator=g)[:k]]] = True
    keep, held = (~is_val).nonzero().squeeze(1), is_val.nonzero().squeeze(1)   # ascending
    return (Split(split.images[keep], labels[keep]), Split(split.images[held], labels[held]))


def _check_val_size(size, n=None):
    """ValueError unless `size` is an int >= 1 or a float in (0, 1), and (given the split's
    length n) an int leaves at least one image on each side."""
    if isinstance(size, bool) or not isinstance(size, numbers.Real):
        raise ValueError(f"the validation size must be an int (a number of images) or a float "
                         f"in (0, 1) (a fraction of the train images), got {size!r}")
    if isinstance(size, numbers.Integral):
        if size < 1 or (n is not None and size >= n):
            raise ValueError(f"the validation size must be at least 1 and less than the "
                             f"{n if n is not None else 'number of'} images it is taken from, "
                             f"got {size} (load_dataset's val_size=0 means no validation split)")
    elif not 0 < size < 1:
        raise ValueError(f"a fractional validation size must be in (0, 1), got {size!r}; pass "
                         f"an int for a number of images")


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
# A trained model and the data it was trained on (oracle.py, visualize.py)

def load_data_for(checkpoint, saved, dataset=None, data_dir=None, image_size=None, cache_dir=None,
                  progress=False):
    """The dataset a checkpoint was trained on (train.py stores its args), or the overrides.
    Refuses data whose classes or image size differ from the model's: a table computed on other
    classes would be silently meaningless. Raises ValueError or DataError."""
    config, train_args = saved["model_config"], dict(saved.get("args") or {})
    name = dataset or train_args.get("dataset")
    if name is None:
        raise ValueError(f"{checkpoint} stores no dataset name; pass --dataset")
    folder = data_dir if data_dir is not None else train_args.get("data_dir")
    loaded = load_dataset(
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


def main():
    """python py [name] ...: load a dataset, print a summary, optionally save a preview grid."""
    p = argparse.ArgumentParser(description="Load a dataset and print a summary.")
    p.add_argument("name", nargs="?", default="shapes", choices=DATASETS)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-size", type=utils.count_or_fraction, default=0,
                   help="hold out this many train images (or this fraction, e.g. 0.1)")
    p.add_argument("--no-download", action="store_true")
    p.add_argument("--preview", default=None, help="save a grid of 8 x 8 train images here (PNG)")
    args = p.parse_args()
    t = time.time()
    try:
        d = load_dataset(args.name, args.data_dir, args.image_size, seed=args.seed,
                         download=not args.no_download, val_size=args.val_size)
    except (ValueError, DataError) as e:
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


if __name__ == "__main__":
    main()
