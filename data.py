"""
data.py -- the image datasets of this project: uint8 tensors in memory, or streamed from folders.

The built-in data follows the problem the paper names, sparse feature selection: choosing where
to look only matters when the evidence for the label is small and can sit anywhere, so a few
grid-aligned tokens can miss it or cut it in half. Three datasets are offered (the paper's
results table uses ImageNet; these are the small stand-ins):

    shapes    built in, no download: 10 small shapes at random *subpixel* positions on a
              cluttered background (make_shapes). Designed to show that point at 32 px.
    cifar10   CIFAR-10, from its authors' python pickles (`DIR/cifar-10-batches-py/`), or from a
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
    batches(split, rows, seed)      an epoch's batches, streamed folders decoded in workers
    load_model_and_data             a checkpoint's model and the data it was trained on

The file machinery -- downloading, safe unpickling, decoding JPEGs, the decode cache -- lives in
utils.py. Nothing there is about SPoT; you can skip it.

Why in memory, as uint8? These datasets are small (CIFAR-10 is 180 MB as uint8), and a ViT on
a few CPU cores is limited by compute, not I/O: decoding every image once and slicing batches
out of one tensor removes the data loader from the picture entirely. Floats are made per batch
(`images.float() / 255`), so memory stays at 1 byte per pixel. Decoding JPEGs is the one slow
step, so the folder layouts are decoded once and cached, one file per split, under
`~/.cache/spot` (or `$SPOT_CACHE`, or the `cache_dir` argument); the cache key covers the
folder, the image size and every file's name, size and modification time, so editing the
folder invalidates it.

Larger folder images are streamed instead. Above 128 px (ImageNet subsets at the pretrained
models' 224 px: 150 kB an image, 190 GB for ImageNet-1k) a split is a `utils.ImageFiles`: the
file names, indexed like the uint8 tensor, decoding only the images asked for. Training reads
it through `batches`: worker processes decode each batch ahead of the model, with
ImageNet's random-resized crops when a `crop_pct` is given; each process of a torchrun reads
only its own part of each batch. Nothing of the dataset's size is kept in memory or on disk.

"The first N images" of any split are a fair mix of classes: the CIFAR-10 pickles come
shuffled, shapes draws its labels in random order, and class folders (listed class by class)
are put in one fixed random order. So --test-limit, --limit, kNN banks and the first validation
images all see every class.

Try it:   python -c "import data; print(data.load_dataset('shapes').train.images.shape)"
"""

import math
import numbers
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import spot
import utils

DATASETS = ("shapes", "cifar10", "folder")

# Bad or missing data. The message is a complete paragraph meant for a user: command-line
# scripts print it and exit, without a traceback. (Defined in utils, which raises it.)
DataError = utils.DataError


@dataclass
class Split:
    images: torch.Tensor   # (N, C, H, W) uint8 in memory, or a utils.ImageFiles read like one
    labels: torch.Tensor   # (N,) int64

    def __len__(self):
        return self.labels.shape[0]

    def take(self, index):
        """The images and labels at `index` (a slice, indices or a mask); streamed images stay
        on disk until a batch is read."""
        images = self.images
        streamed = isinstance(images, utils.ImageFiles)
        return Split(images.subset(index) if streamed else images[index], self.labels[index])


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
# The built-in `shapes` dataset (sparse feature selection): small objects at subpixel positions

SHAPE_CLASSES = ("square", "disc", "ring", "triangle", "plus",
                 "x", "equals", "bar", "diamond", "corner")


def make_shapes(n, image_size=32, seed=0, return_info=False):
    """The built-in dataset: n images of one small shape each, on a cluttered background.

    Returns images (n, 3, S, S) uint8 and labels (n,) int64 (label = index in SHAPE_CLASSES);
    with return_info=True also a dict: "center" (n, 2) the object's centre as (y, x) in [0, 1]
    (spot.py's coordinates), "radius" (n,) its half-size in pixels, "mask" (n, S, S) float its
    antialiased coverage -- handy to check whether tokens landed on the object.

    Why it looks like this (sparse feature selection): the object is 7-9 px wide on a 32 px
    image and sits at a random *continuous* position, so with 4 x 4 grid patches it usually
    straddles 2-4 tiles ("grids cannot align every salient region"), while free tokens can be
    centred on it and tile it at its own offset, each window reading object and not a sliver of
    a tile border. The clutter (smooth colour noise, faint blobs and lines, all lower-contrast
    than the object) keeps "find the brightest pixels" from being the whole task.
    Deterministic: the same (n, image_size, seed) always gives the same bytes.
    """
    S, W = utils.to_hw(image_size)
    if type(n) is not int or n < 1 or S != W or S < 12:
        raise ValueError(f"make_shapes needs an int n >= 1 and a square image_size >= 12 (fewer "
                         f"pixels cannot tell the shapes apart), got {n!r}, {image_size!r}")
    # One thread, on purpose: rendering is many medium-sized elementwise ops, and a
    # multi-threaded op waits for its slowest thread, so when the other core is busy (a training
    # run) every op waits. One thread also keeps the bytes identical whatever the caller's
    # torch.get_num_threads().
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        g = torch.Generator().manual_seed(seed)       # all randomness comes from here, in order
        order = torch.randperm(n, generator=g)
        labels = (torch.arange(n) % len(SHAPE_CLASSES))[order]   # balanced, in random order
        chunk = max(1, (1 << 20) // (S * S))          # images per chunk: ~4 MB per float map
        parts = [_render(labels[a:a + chunk], S, g)
                 for a in range(0, n, chunk)]
    finally:
        torch.set_num_threads(threads)
    images, centre, radius, mask = map(torch.cat, zip(*parts))
    if not return_info:
        return images, labels
    return images, labels, dict(center=centre / S, radius=radius, mask=mask)


def _render(labels, S, g):
    """Draw and paint len(labels) = m images -> (images (m, 3, S, S) uint8, centres (m, 2) (y, x)
    in pixels, half-sizes (m,) in pixels, object coverage (m, S, S) in [0, 1])."""
    m = len(labels)
    scale = S / 32                                    # object and clutter sizes follow the image
    rand = lambda *shape: torch.rand(m, *shape, generator=g)   # (m, *shape) in [0, 1)
    # The object: half-size r, a continuous centre anywhere it fits, a bright colour.
    r = (3.2 + rand()) * scale                        # (m,) pixels
    reach = 1.35 * r[:, None] + 0.5                   # the widest shape's reach + half a pixel
    centre = reach + rand(2) * (S - 2 * reach)        # (m, 2) (y, x) pixels
    colour = F.normalize(rand(3, 1, 1) ** 2, p=math.inf, dim=1)   # (m, 3, 1, 1), top channel 1
    # The background: a dark-to-mid colour, pixel noise, smooth low-contrast noise.
    img = 0.15 + 0.3 * rand(3, 1, 1)
    img = img + 0.015 * torch.randn(m, 3, S, S, generator=g)
    smooth = 0.08 * torch.randn(m, 3, 5, 5, generator=g)
    img = img + F.interpolate(smooth, (S, S), mode="bicubic")           # (m, 3, S, S)
    # Clutter, fainter than the object: 3 soft blobs and 3 thin line segments around random
    # points; (dy, dx) is every pixel centre's offset from each point, (m, 6, S, S) together.
    pix = torch.arange(S) + 0.5                       # pixel centres
    point = rand(6, 2, 1, 1) * S
    dy = pix[:, None] - point[:, :, 0]                # (m, 6, S, 1)
    dx = pix - point[:, :, 1]                         # (m, 6, 1, S)
    sigma = (1.5 + 2 * rand(3, 1, 1)) * scale
    square = dy[:, :3] ** 2 + dx[:, :3] ** 2          # squared distance to a blob's centre
    blob = torch.exp(-square / (2 * sigma ** 2))
    angle = rand(3, 1, 1) * math.pi                   # a segment: direction, then half-length
    half = (2 + 3 * rand(3, 1, 1)) * scale
    sin = angle.sin()
    cos = angle.cos()
    along = (dy[:, 3:] * sin + dx[:, 3:] * cos).abs() - half    # past the segment's end
    across = (dx[:, 3:] * sin - dy[:, 3:] * cos).abs()          # off its line
    gap = torch.hypot(across, along.clamp_min(0))     # distance to the segment
    line = (0.5 * scale + 0.5 - gap).clamp(0, 1)      # ~1 px wide
    strength = 0.15 + 0.2 * rand(6, 1, 1)
    alpha = torch.cat([blob, line], 1) * strength     # (m, 6, S, S)
    for k in range(6):                                # painted over: img + alpha (colour - img)
        img = img + alpha[:, k, None] * (rand(3, 1, 1) - img)
    # The object, antialiased: a pixel's coverage is 0.5 - (signed distance from its centre to
    # the shape's outline), clamped to [0, 1] -- exactly the covered area where the outline runs
    # along pixel rows or columns, so the object moves smoothly with its continuous centre.
    u = pix - centre[:, 1, None, None]                # (m, 1, S) x, right of the centre
    v = pix[:, None] - centre[:, 0, None, None]       # (m, S, 1) y, down from it
    distances = _shape_distances(u, v, r[:, None, None])             # (m, 10, S, S)
    cover = (0.5 - distances[torch.arange(m), labels]).clamp(0, 1)   # (m, S, S)
    img = img + cover[:, None] * (colour - img)
    images = (img.clamp(0, 1) * 255).round().to(torch.uint8)
    return images, centre, r, cover


def _shape_distances(u, v, r):
    """Signed distance (pixels; < 0 inside) from offsets u (m, 1, S) right and v (m, S, 1) down
    to each shape of SHAPE_CLASSES, in class order -> (m, 10, S, S). r: (m, 1, 1) half-size
    (~3.2-4.2 px at 32 px, objects 7-9 px wide: two 4 px windows, so a 4 x 4 grid tile sees only
    a part). Bars are w = 0.32 r half-wide, ~1 px: thin enough to look different, thick enough
    to survive antialiasing."""
    w = 0.32 * r
    au = u.abs()
    av = v.abs()
    d = torch.hypot(u, v)                             # distance from the centre
    box = lambda x, y, hx, hy: torch.maximum(x.abs() - hx, y.abs() - hy)  # a centred rectangle
    root2 = math.sqrt(2)
    a = (u + v) / root2                               # axes turned 45 degrees
    b = (u - v) / root2
    return torch.stack([
        box(u, v, 0.8 * r, 0.8 * r),                                        # square
        d - r,                                                              # disc
        torch.maximum(d - r, 0.5 * r - d),                                  # ring
        torch.maximum(v - 0.8 * r,
                      (1.8 * au - v - r) / math.hypot(1.8, 1)),             # triangle, apex up
        torch.minimum(box(u, v, w, r),
                      box(u, v, r, w)),                                     # plus
        torch.minimum(box(a, b, w, 1.1 * r),
                      box(a, b, 1.1 * r, w)),                               # x
        box(u, av - 0.6 * r, r, 0.8 * w),                                   # equals: two bars
        box(u, v, 1.2 * w, r),                                              # bar, vertical
        (au + av - 1.3 * r) / root2,                                        # diamond
        torch.minimum(box(u + r - w, v, w, r),
                      box(u, v - r + w, r, w)),                             # corner: an L
    ], dim=1)


# -----------------------------------------------------------------------------
# load_dataset: the one entry point

def load_dataset(name, data_dir=None, image_size=None, seed=0, val_size=0, crop_pct=None,
                 **files):
    """Load a dataset -> Dataset (uint8 images; see the module docstring).

    name:       "shapes" (built in), "cifar10" or "folder"
    data_dir:   the dataset's folder (cifar10, folder); ignored by shapes
    image_size: output size, int or (H, W). shapes: default 32; cifar10: default 32 (other
                sizes are resized from 32); folder: required (e.g. 64 or 128)
    seed:       shapes only: train uses seed 2*seed, test 2*seed + 1 (disjoint streams)
    val_size:   0 = no validation split (Dataset.val is None). Else hold out that many train
                images (int) or that fraction of them (float in (0, 1)) as Dataset.val, per
                class (split_validation); mean and std then come from the rest of train only,
                so nothing about the validation images leaks into the model's normalization.
                Which images are held out is fixed (split_validation's seed 0, not `seed`):
                every run that compares recipes must be scored on the same validation images.
    crop_pct:   folder only: ImageNet's crops (timm's 0.875 or 0.9): images scaled so the centre
                crop keeps that share of the shorter side, and random-resized crops in
                training (batches). None: the whole shorter side, no random-resized crops.
    files:      download=True (cifar10: fetch the authors' archive, utils.CIFAR10_URL, into
                data_dir if it is missing), cache_dir (where decoded folders are cached; default
                $SPOT_CACHE or ~/.cache/spot), progress=True (bars while downloading, decoding)
    Raises ValueError for bad arguments, DataError for missing or unreadable data.
    """
    if name not in DATASETS or (name != "shapes" and data_dir is None) or (
            name == "folder" and image_size is None):
        raise ValueError(f"load_dataset needs a name in {DATASETS}, a data_dir (not for shapes) "
                         f"and an image_size (folder); got {name!r}, {data_dir!r}, {image_size!r}")
    size = utils.to_hw(32 if image_size is None else image_size)
    _check_val_size(val_size)   # now, not after a long decode (against n: split_validation)
    if name == "shapes":
        train = make_shapes(10_000, size, seed=2 * seed)
        test = make_shapes(2_000, size, seed=2 * seed + 1)
        classes = SHAPE_CLASSES
    elif name == "cifar10":
        train, test, classes = utils.load_cifar10(data_dir, size, **files)
    else:
        files.pop("download", None)                   # (cifar10's)
        train, test, classes = utils.load_folder(data_dir, size, crop_pct, **files)
    train = Split(*train)
    val = None
    if val_size:
        train, val = split_validation(train, val_size)
    mean, std = utils.channel_stats(train.images)
    return Dataset(name, train, Split(*test), list(classes), mean, std, size, val)


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
    n = len(split)
    labels = split.labels
    _check_val_size(size, n)
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
            raise ValueError(f"size={size!r} of {n} images rounds to {int(take.sum())} validation "
                             f"images; choose a fraction that leaves both parts non-empty")
    g = torch.Generator().manual_seed(int(seed))
    is_val = torch.zeros(n, dtype=torch.bool)
    for c, k in zip(classes.tolist(), take.tolist()):
        members = (labels == c).nonzero().squeeze(1)                 # where class c is, in order
        chosen = torch.randperm(len(members), generator=g)[:k]
        is_val[members[chosen]] = True
    return split.take(~is_val), split.take(is_val)


def _check_val_size(size, n=None):
    """ValueError unless `size` is an int >= 1 or a float in (0, 1), and (given the split's
    length n) an int leaves at least one image on each side. Without n, 0 (none) is allowed."""
    least = 0 if n is None else 1
    if isinstance(size, bool) or not isinstance(size, numbers.Real) or not (
            least <= size < (n or math.inf) if isinstance(size, numbers.Integral)
            else 0 < size < 1):
        raise ValueError(f"the validation size must be an int, at least 1 and less than the "
                         f"{n or 'number of'} images it is taken from, or a float in (0, 1) (a "
                         f"fraction of them), got {size!r}")


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
    if not (torch.is_tensor(images) and images.ndim == 4 and isinstance(padding, int)
            and padding >= 0):
        raise ValueError(f"augment needs images (B, C, H, W) and an int padding >= 0, got "
                         f"{getattr(images, 'shape', images)!r} and {padding!r}")
    B, C, H, W = images.shape
    on = images.device
    dev = generator.device if generator else "cpu"    # where the random numbers are drawn
    # Always draw all three, so the random stream does not depend on the flags.
    shifts = torch.randint(0, 2 * padding + 1, (2, B), generator=generator, device=dev)
    dy, dx = shifts.to(on)                                           # (B,) each, crop offsets
    flipped = torch.rand(B, generator=generator, device=dev) < 0.5
    flipped = flipped.to(on) & flip
    rows = dy[:, None] + torch.arange(H, device=on)                  # (B, H) rows of each crop
    ar_w = torch.arange(W, device=on)
    cols = torch.where(flipped[:, None], W - 1 - ar_w, ar_w)        # (B, W) maybe reversed
    cols = cols + dx[:, None]
    b = torch.arange(B, device=on).view(B, 1, 1, 1)
    c = torch.arange(C, device=on).view(C, 1, 1)
    # Pad with zeros to (B, C, H+2p, W+2p), then gather each crop -> (B, C, H, W).
    padded = F.pad(images, (padding,) * 4)
    return padded[b, c, rows[:, None, :, None], cols[:, None, None, :]]


# -----------------------------------------------------------------------------
# Training batches: sliced from memory, or decoded ahead in worker processes

def batches(split, rows, seed, procs):
    """One epoch's batches on procs.device -> (images (B, C, H, W) uint8, labels (B,), seconds
    waited for them), one per row of `rows` (steps, B) of image indices.

    Images in memory are sliced. Streamed ones (utils.ImageFiles, folders above 128 px) are
    decoded by procs.workers processes (torch's DataLoader), a few batches ahead of the model,
    into pinned memory on CUDA (so the copy to the GPU does not block). With a crop_pct they
    get random-resized crops, batch i's drawn from seed + i: a resumed epoch (rows from where
    it stopped, seed moved on as far) decodes exactly the crops the whole epoch would have.
    """
    cuda = procs.device.type == "cuda"
    if torch.is_tensor(split.images):
        source = ((split.images[row], split.labels[row]) for row in rows)
    else:
        source = torch.utils.data.DataLoader(_Batches(split, rows, seed), batch_size=None,
                                             num_workers=procs.workers, pin_memory=cuda)
    source = iter(source)
    while True:
        start = time.perf_counter()
        batch = next(source, None)
        if batch is None:
            return
        waited = time.perf_counter() - start
        yield *[part.to(procs.device, non_blocking=cuda) for part in batch], waited


class _Batches(torch.utils.data.Dataset):
    """A DataLoader's dataset whose item i is batch i of `batches` (decoded in a worker)."""

    def __init__(self, split, rows, seed):
        self.split, self.rows, self.seed = split, rows, seed

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        row, images = self.rows[i], self.split.images
        crops = torch.Generator().manual_seed(self.seed + i) if images.crop_pct else None
        return images.subset(row).decode(crops), self.split.labels[row]


def load_for_training(args, procs):
    """train.py's data: the dataset its flags name, with --val-size images held out of train,
    and the --*-limit subsets. What cannot work is an error message (exit 1)."""
    try:
        dataset = load_dataset(args.dataset, args.data_dir, args.image_size, args.seed,
                               args.val_size, args.crop_pct, cache_dir=args.cache_dir,
                               progress=args.progress and procs.rank == 0)
    except (DataError, ValueError) as error:
        sys.exit(f"error: --dataset/--data-dir/--image-size/--val-size: {error}")
    utils.limit_splits(dataset, args)
    if args.batch_size % procs.world or args.batch_size > len(dataset.train):
        sys.exit(f"error: --batch-size {args.batch_size} must split over {procs.world} "
                 f"process(es) and fit in the train split")
    if args.crop_pct and torch.is_tensor(dataset.train.images):
        sys.exit("error: --crop-pct: random-resized crops need images decoded per batch, a "
                 "--dataset folder at more than 128 px (--image-size)")
    return dataset


# -----------------------------------------------------------------------------
# A trained model and the data it was trained on (oracle.py, visualize.py)

def load_model_and_data(checkpoint, device="cpu", data_dir=None, progress=False):
    """A checkpoint (read once, safely), then the dataset it was trained on (train.py stores its
    args; data_dir overrides the folder, which moves between machines) -> (model, dataset,
    train_args). The data is loaded at the model's image size, and refused if its classes differ
    from the model's: a table computed on other classes would be silently meaningless. Raises
    ValueError or DataError."""
    model, saved = spot.load_checkpoint(checkpoint, map_location=device, return_checkpoint=True)
    config = saved["model_config"]
    train_args = saved.get("args") or {}
    name = train_args.get("dataset")
    if name is None:
        raise ValueError(f"{checkpoint} stores no dataset name (it was not written by train.py)")
    folder = data_dir or train_args.get("data_dir")
    loaded = load_dataset(name, folder, config["image_size"], train_args.get("seed", 0),
                          val_size=train_args.get("val_size") or 0,
                          crop_pct=train_args.get("crop_pct"),
                          cache_dir=train_args.get("cache_dir"), progress=progress)
    classes = saved.get("classes")
    trained = (config["num_classes"], list(classes or loaded.classes))
    if (len(loaded.classes), loaded.classes) != trained:
        raise ValueError(f"{checkpoint} was trained on the classes "
                         f"{classes or config['num_classes']}, not on the {name} "
                         f"data in {folder}, whose classes are {loaded.classes}")
    return model, loaded, train_args
