"""Tests of data.py: CIFAR-10 (pickles, folders, download checks), folder datasets, the cache,
the built-in shapes dataset and batched augmentation. Real data under ../shared/data is used
when present (and skipped otherwise); everything else is built in tmp_path."""
import hashlib
import pickle
import shutil
import tarfile
import time
import urllib.error

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import data
from data import DataError, load_dataset


# -----------------------------------------------------------------------------
# Fake data builders

def write_fake_cifar_pickles(root, n=4, seed=0):
    """DIR/cifar-10-batches-py/ with 5 data batches + test_batch + batches.meta of n images each.
    Returns the raw rows and labels: {"train": (rows (5n, 3072), labels), "test": (...)}."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rows, labels = [], []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        x = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        y = [int(v) for v in rng.integers(0, 10, size=n)]
        with open(folder / name, "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"data": x, b"labels": y,
                         b"filenames": [b"x.png"] * n}, f)
        rows.append(x)
        labels.append(y)
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse",
             b"ship", b"truck"]
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": names, b"num_vis": 3072}, f)
    return {"train": (np.concatenate(rows[:5]), np.concatenate(labels[:5])),
            "test": (rows[5], np.array(labels[5]))}


def make_fake_archive(tmp_path):
    """A cifar-10-python.tar.gz holding fake pickles (not the official MD5). Returns (path, raw)."""
    src = tmp_path / "src"
    raw = write_fake_cifar_pickles(src)
    archive = tmp_path / "fake.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    return archive, raw


def save_image(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def write_class_folders(root, splits, classes, sizes, seed=0, ext=".png"):
    """root/<split>/<class>/<i><ext> random RGB images of the given (h, w) sizes."""
    rng = np.random.default_rng(seed)
    out = {}
    for split in splits:
        for cls in classes:
            for i, (h, w) in enumerate(sizes):
                arr = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
                save_image(root / split / cls / f"{i:03d}{ext}", arr)
                out[(split, cls, i)] = arr
    return out


# -----------------------------------------------------------------------------
# Arguments

def test_bad_arguments_raise_value_error_naming_them(tmp_path):
    with pytest.raises(ValueError, match="name.*shapes.*cifar10.*folder"):
        load_dataset("imagenet")
    with pytest.raises(ValueError, match="data_dir"):
        load_dataset("cifar10")
    with pytest.raises(ValueError, match="data_dir"):
        load_dataset("folder", image_size=32)
    with pytest.raises(ValueError, match="image_size"):
        load_dataset("folder", tmp_path)
    with pytest.raises(ValueError, match="image_size"):
        load_dataset("shapes", image_size=0)


# -----------------------------------------------------------------------------
# CIFAR-10

def test_cifar_pickles_exact_pixels_and_labels(tmp_path):
    raw = write_fake_cifar_pickles(tmp_path, n=4)
    d = load_dataset("cifar10", tmp_path, download=False, cache_dir=tmp_path / "cache",
                     progress=False)
    assert d.classes[0] == "airplane" and d.classes[9] == "truck" and len(d.classes) == 10
    assert d.train.images.shape == (20, 3, 32, 32) and d.test.images.shape == (4, 3, 32, 32)
    assert d.train.images.dtype == torch.uint8 and d.train.labels.dtype == torch.int64
    assert d.image_size == (32, 32)
    for split in ("train", "test"):
        rows, labels = raw[split]
        got = getattr(d, split)
        assert torch.equal(got.labels, torch.from_numpy(labels.astype(np.int64)))
        assert torch.equal(got.images, torch.from_numpy(rows).view(-1, 3, 32, 32))
    # Rows are channel-first: 1024 red (row-major 32 x 32), then 1024 green, then 1024 blue.
    rows = raw["train"][0]
    assert d.train.images[7, 0, 0, 0] == rows[7, 0]
    assert d.train.images[7, 1, 0, 0] == rows[7, 1024]
    assert d.train.images[7, 2, 1, 3] == rows[7, 2048 + 32 + 3]
    # mean/std from the train images, in [0, 1]
    f = d.train.images.double() / 255
    assert np.allclose(d.mean, f.mean((0, 2, 3)).numpy(), atol=1e-4)
    assert np.allclose(d.std, f.std((0, 2, 3), unbiased=False).numpy(), atol=1e-4)


def test_cifar_resize_option(tmp_path):
    write_fake_cifar_pickles(tmp_path, n=2)
    d = load_dataset("cifar10", tmp_path, image_size=16, download=False, progress=False)
    assert d.train.images.shape == (10, 3, 16, 16) and d.image_size == (16, 16)


def listed_at(index, n):
    """Where the index-th listed file of a class-folder split ends up after the fixed shuffle."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    return (order == index).nonzero().item()


def test_cifar_class_folders_exact_for_png_and_cached(tmp_path, monkeypatch):
    classes = ["airplane", "bird", "cat"]
    arrays = write_class_folders(tmp_path / "c10", ["train", "test"], classes, [(32, 32)] * 3)
    cache = tmp_path / "cache"
    d = load_dataset("cifar10", tmp_path / "c10", download=False, cache_dir=cache, progress=False)
    assert d.classes == classes
    assert d.train.images.shape == (9, 3, 32, 32) and d.test.images.shape == (9, 3, 32, 32)
    # Files are listed class by class, then put in one fixed random order (data._fixed_shuffle).
    assert sorted(d.train.labels.tolist()) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    want = torch.from_numpy(arrays[("train", "bird", 2)]).permute(2, 0, 1)
    assert torch.equal(d.train.images[listed_at(5, 9)], want)   # PNG: lossless, exact
    assert len(list(cache.glob("*.pt"))) == 2             # one cache file per split

    # Second load: served from the cache, no decoding at all.
    def no_decode(*a, **k):
        raise AssertionError("decoded although cached")
    monkeypatch.setattr(data, "_decode_image", no_decode)
    d2 = load_dataset("cifar10", tmp_path / "c10", download=False, cache_dir=cache, progress=False)
    assert torch.equal(d2.train.images, d.train.images)
    assert torch.equal(d2.test.labels, d.test.labels)


def test_cifar_class_folders_jpeg_loosely(tmp_path):
    rng = np.random.default_rng(1)
    # A smooth image survives JPEG at quality 95 almost unchanged.
    yy, xx = np.mgrid[0:32, 0:32]
    arr = np.stack([yy * 8, xx * 8, (yy + xx) * 4], -1).astype(np.uint8)
    for split in ("train", "test"):
        for cls in ("a", "b"):
            p = tmp_path / split / cls / "0000.jpg"
            p.parent.mkdir(parents=True)
            Image.fromarray(arr).save(p, quality=95)
    d = load_dataset("cifar10", tmp_path, download=False, cache_dir=tmp_path / "cache",
                     progress=False)
    err = (d.test.images[1].float() - torch.from_numpy(arr).permute(2, 0, 1).float()).abs()
    assert err.mean() < 3 and d.classes == ["a", "b"]


def test_cifar_download_verifies_md5_before_extracting(tmp_path, monkeypatch):
    archive, raw = make_fake_archive(tmp_path)
    calls = []

    def fake_download(url, dest):
        calls.append(url)
        shutil.copy(archive, dest)
    monkeypatch.setattr(data, "_urlretrieve", fake_download)
    root = tmp_path / "cifar"
    with pytest.raises(DataError) as e:                  # the fake is not the official file
        load_dataset("cifar10", root, cache_dir=tmp_path / "cache", progress=False)
    msg = str(e.value)
    assert "MD5" in msg and data.CIFAR10_MD5 in msg and data.CIFAR10_URL in msg
    assert calls == [data.CIFAR10_URL]
    assert not (root / "cifar-10-batches-py").exists()   # nothing was extracted

    # With the fake's own checksum the same archive is accepted, extracted and loaded.
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    monkeypatch.setattr(data, "CIFAR10_MD5", md5)
    d = load_dataset("cifar10", root, cache_dir=tmp_path / "cache", progress=False)
    assert torch.equal(d.train.images, torch.from_numpy(raw["train"][0]).view(-1, 3, 32, 32))


def test_verify_md5_directly(tmp_path):
    p = tmp_path / "x.bin"
    p.write_bytes(b"hello")
    data._verify_md5(p, hashlib.md5(b"hello").hexdigest(), tmp_path)   # no error
    with pytest.raises(DataError, match="MD5"):
        data._verify_md5(p, "0" * 32, tmp_path)


def test_cifar_offline_or_no_download_gives_helpful_data_error(tmp_path, monkeypatch):
    def offline(url, dest):
        raise urllib.error.URLError("Name or service not known")
    monkeypatch.setattr(data, "_urlretrieve", offline)
    with pytest.raises(DataError) as e:
        load_dataset("cifar10", tmp_path / "c", progress=False)
    msg = str(e.value)
    assert data.CIFAR10_URL in msg and "cifar-10-batches-py" in msg and "train/<class>" in msg
    assert "--dataset shapes" in msg and "Name or service not known" in msg

    def never(url, dest):
        raise AssertionError("download attempted with download=False")
    monkeypatch.setattr(data, "_urlretrieve", never)
    with pytest.raises(DataError) as e:
        load_dataset("cifar10", tmp_path / "d", download=False, progress=False)
    assert data.CIFAR10_URL in str(e.value) and "--dataset shapes" in str(e.value)


def test_real_cifar10_test_split(shared_data, tmp_path):
    root = shared_data / "cifar10"
    if not (root / "test").is_dir():
        pytest.skip("no ../shared/data/cifar10")
    t = time.time()
    split, classes = data._load_split_folder(root / "test", "test", (32, 32), tmp_path, False)
    assert time.time() - t < 30
    assert split.images.shape == (10000, 3, 32, 32) and split.images.dtype == torch.uint8
    assert torch.bincount(split.labels).tolist() == [1000] * 10
    assert classes == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                       "ship", "truck"]
    mean, std = data._channel_stats(split.images)
    assert np.allclose(mean, (0.4914, 0.4822, 0.4465), atol=0.01)   # the well-known statistics


# -----------------------------------------------------------------------------
# Folder datasets (ImageNet-style subsets)

def test_folder_resizes_center_crops_and_sorts(tmp_path):
    root = tmp_path / "ds"
    sizes = [(30, 40), (50, 25), (48, 64), (20, 20)]          # (h, w), not square, not equal
    write_class_folders(root, ["train", "val"], ["zebra", "ant", "moth"], sizes)
    # A recognisable wide image: left / middle / right thirds red / green / blue.
    wide = np.zeros((24, 48, 3), np.uint8)
    wide[:, :16, 0] = 255
    wide[:, 16:32, 1] = 255
    wide[:, 32:, 2] = 255
    save_image(root / "train" / "ant" / "zz.JPEG", wide)      # upper-case extension counts
    (root / "train" / "ant" / "notes.txt").write_text("not an image")   # ignored
    d = load_dataset("folder", root, image_size=12, cache_dir=tmp_path / "cache", progress=False)
    assert d.classes == ["ant", "moth", "zebra"]
    assert d.image_size == (12, 12)
    assert d.train.images.shape == (13, 3, 12, 12) and d.test.images.shape == (12, 3, 12, 12)
    assert sorted(d.train.labels.tolist()) == [0] * 5 + [1] * 4 + [2] * 4
    assert sorted(d.test.labels.tolist()) == [0] * 4 + [1] * 4 + [2] * 4
    # zz.JPEG is the last "ant" file: shorter side 24 -> 12 (width 24), central 12 columns kept,
    # i.e. the green middle third (and a little red / blue at the edges).
    img = d.train.images[listed_at(4, 13)].float()
    assert img[1, :, 4:8].mean() > 200 and img[0, :, 4:8].mean() < 60 and img[2, :, 4:8].mean() < 60
    assert len(d.mean) == 3 and all(0 < s < 1 for s in d.std)


def test_folder_accepts_test_instead_of_val_and_rectangular_size(tmp_path):
    write_class_folders(tmp_path, ["train", "test"], ["a", "b"], [(20, 30)])
    d = load_dataset("folder", tmp_path, image_size=(8, 16), cache_dir=tmp_path / "c",
                     progress=False)
    assert d.train.images.shape == (2, 3, 8, 16) and d.image_size == (8, 16)


def test_folder_cache_is_reused_and_invalidated(tmp_path, monkeypatch):
    root = tmp_path / "ds"
    write_class_folders(root, ["train", "val"], ["a", "b"], [(20, 30), (30, 20)])
    cache = tmp_path / "cache"
    d1 = load_dataset("folder", root, image_size=16, cache_dir=cache, progress=False)
    real_decode = data._decode_image

    def no_decode(*a, **k):
        raise AssertionError("decoded although cached")
    monkeypatch.setattr(data, "_decode_image", no_decode)
    d2 = load_dataset("folder", root, image_size=16, cache_dir=cache, progress=False)
    assert torch.equal(d1.train.images, d2.train.images)
    assert torch.equal(d1.test.labels, d2.test.labels)
    # SPOT_CACHE is the default location when cache_dir is not given.
    monkeypatch.setenv("SPOT_CACHE", str(cache))
    load_dataset("folder", root, image_size=16, progress=False)
    # A different image size, or a new file, is a different cache entry.
    with pytest.raises(AssertionError, match="decoded although cached"):
        load_dataset("folder", root, image_size=8, cache_dir=cache, progress=False)
    save_image(root / "train" / "a" / "new.png", np.zeros((10, 10, 3), np.uint8))
    with pytest.raises(AssertionError, match="decoded although cached"):
        load_dataset("folder", root, image_size=16, cache_dir=cache, progress=False)
    monkeypatch.setattr(data, "_decode_image", real_decode)
    d3 = load_dataset("folder", root, image_size=16, cache_dir=cache, progress=False)
    assert d3.train.images.shape[0] == d1.train.images.shape[0] + 1
    assert not list(cache.glob("*.tmp"))                 # atomic writes leave no temp files


def test_folder_errors_name_the_problem(tmp_path):
    def load(root):
        return load_dataset("folder", root, image_size=8, cache_dir=tmp_path / "cache",
                            progress=False)

    with pytest.raises(DataError, match="does not exist"):
        load(tmp_path / "nowhere")

    only_train = tmp_path / "only_train"
    write_class_folders(only_train, ["train"], ["a"], [(10, 10)])
    with pytest.raises(DataError, match="val"):
        load(only_train)

    empty = tmp_path / "empty"
    write_class_folders(empty, ["val"], ["a"], [(10, 10)])
    (empty / "train").mkdir()
    with pytest.raises(DataError, match="no class subfolders"):
        load(empty)

    no_images = tmp_path / "no_images"
    write_class_folders(no_images, ["train", "val"], ["a"], [(10, 10)])
    (no_images / "train" / "b").mkdir()
    (no_images / "train" / "b" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match=r"no images") as e:
        load(no_images)
    assert str(no_images / "train" / "b") in str(e.value)

    corrupt = tmp_path / "corrupt"
    write_class_folders(corrupt, ["train", "val"], ["a"], [(10, 10)])
    (corrupt / "train" / "a" / "bad.jpg").write_bytes(b"this is not a jpeg")
    with pytest.raises(DataError) as e:
        load(corrupt)
    assert "bad.jpg" in str(e.value)

    mismatch = tmp_path / "mismatch"
    write_class_folders(mismatch, ["train"], ["a", "b", "c"], [(10, 10)])
    write_class_folders(mismatch, ["val"], ["a", "d"], [(10, 10)])
    with pytest.raises(DataError) as e:
        load(mismatch)
    msg = str(e.value)
    assert "'b'" in msg and "'c'" in msg and "'d'" in msg


def test_real_imagenette_val_split(shared_data, tmp_path):
    root = shared_data / "imagenette-128" / "val"
    if not root.is_dir():
        pytest.skip("no ../shared/data/imagenette-128")
    split, classes = data._load_split_folder(root, "val", (64, 64), tmp_path, False)
    assert split.images.shape == (3925, 3, 64, 64) and split.images.dtype == torch.uint8
    assert classes[0] == "n01440764" and len(classes) == 10
    assert torch.bincount(split.labels).min() > 300
    assert 60 < split.images.float().mean() < 190


# -----------------------------------------------------------------------------
# The built-in shapes dataset

def test_shapes_deterministic_and_typed():
    x1, y1 = data.make_shapes(300, seed=3)
    x2, y2 = data.make_shapes(300, seed=3)
    x3, y3 = data.make_shapes(300, seed=4)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(x1, x3)
    assert x1.shape == (300, 3, 32, 32) and x1.dtype == torch.uint8
    assert y1.shape == (300,) and y1.dtype == torch.int64
    assert y1.min() >= 0 and y1.max() < len(data.SHAPE_CLASSES)
    assert torch.bincount(y1, minlength=10).tolist() == [30] * 10      # exactly balanced


def test_shapes_objects_are_small_subpixel_and_visible():
    x, y, info = data.make_shapes(500, seed=0, return_info=True)
    mask = info["mask"]                                           # (n, 32, 32) coverage
    covered = (mask > 0.05).float().mean(dim=(1, 2))              # fraction of pixels touched
    assert covered.mean() < 0.06 and covered.max() < 0.1          # small objects
    assert (mask.sum(dim=(1, 2)) > 6).all()                       # ... but every image has one
    # The centre is continuous, not snapped to the pixel grid or to 4 x 4 patches.
    centre_px = info["center"] * 32
    frac = centre_px - centre_px.floor()
    assert frac.std() > 0.2 and ((centre_px % 4) - 2).abs().mean() > 0.5
    assert (info["center"] > 0).all() and (info["center"] < 1).all()
    # For point-symmetric shapes the coverage centroid is the reported centre (subpixel exact).
    sym = [data.SHAPE_CLASSES.index(c) for c in ("square", "disc", "ring", "plus", "x", "diamond",
                                                  "bar", "equals")]
    keep = torch.isin(y, torch.tensor(sym))
    grid = torch.arange(32) + 0.5
    m = mask[keep]
    cy = (m.sum(2) * grid).sum(1) / m.sum((1, 2))
    cx = (m.sum(1) * grid).sum(1) / m.sum((1, 2))
    # (8 x 8 supersampling resolves edges to 1/8 px; thin bars are the worst case.)
    err = (torch.stack([cy, cx], 1) - centre_px[keep]).abs()
    assert err.max() < 0.15 and err.mean() < 0.03
    # The object has higher contrast than the clutter: covered pixels stand out from the rest.
    img = x.float() / 255
    inside = mask > 0.9
    diff = (img - img.mean(dim=(2, 3), keepdim=True)).abs().sum(1)     # (n, 32, 32)
    assert diff[inside].mean() > 2 * diff[mask == 0].mean()


def test_shapes_load_dataset_and_other_sizes():
    d = load_dataset("shapes", seed=1)
    assert d.train.images.shape == (10000, 3, 32, 32) and d.test.images.shape == (2000, 3, 32, 32)
    assert d.classes == list(data.SHAPE_CLASSES) and d.image_size == (32, 32)
    assert not torch.equal(d.train.images[:2000], d.test.images)
    assert all(0 < m < 1 for m in d.mean) and all(0 < s < 1 for s in d.std)
    x, _ = data.make_shapes(20, image_size=48, seed=0)
    assert x.shape == (20, 3, 48, 48)


# -----------------------------------------------------------------------------
# Augmentation

def test_augment_identity_and_shape():
    x = torch.rand(5, 3, 8, 8)
    assert torch.equal(data.augment(x, torch.Generator().manual_seed(0), padding=0, flip=False), x)
    y = data.augment(x, torch.Generator().manual_seed(0))
    assert y.shape == x.shape and y.dtype == x.dtype
    u = (x * 255).to(torch.uint8)
    assert data.augment(u, torch.Generator().manual_seed(0)).dtype == torch.uint8
    data.augment(x)                                   # without a generator: global RNG


def test_augment_reproducible_and_independent_per_image():
    x = torch.rand(64, 3, 8, 8)
    a = data.augment(x, torch.Generator().manual_seed(1))
    b = data.augment(x, torch.Generator().manual_seed(1))
    c = data.augment(x, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_augment_is_a_shifted_maybe_flipped_copy():
    torch.manual_seed(0)
    B, C, H, W, p = 40, 2, 7, 9, 3
    x = torch.rand(B, C, H, W) + 0.1                  # no zeros, no symmetry
    out = data.augment(x, torch.Generator().manual_seed(5), padding=p)
    padded = F.pad(x, (p, p, p, p))
    found = []
    for i in range(B):
        match = [(dy, dx, fl) for dy in range(2 * p + 1) for dx in range(2 * p + 1)
                 for fl in (False, True)
                 if torch.equal(out[i], (lambda c: c.flip(-1) if fl else c)(
                     padded[i, :, dy:dy + H, dx:dx + W]))]
        assert len(match) == 1, f"image {i} is not a padded crop (+ flip) of its input"
        found.append(match[0])
    flips = [f for _, _, f in found]
    assert any(flips) and not all(flips)              # some flipped (torch.flip of the crop)
    assert len({(dy, dx) for dy, dx, _ in found}) > 5  # offsets differ between images
    # flip=False never flips; still random shifts
    out2 = data.augment(x, torch.Generator().manual_seed(5), padding=p, flip=False)
    for i, (dy, dx, fl) in enumerate(found):
        assert torch.equal(out2[i], padded[i, :, dy:dy + H, dx:dx + W])


def test_class_folders_come_out_in_a_fixed_mixed_order(shared_data):
    """'The first N images' must be a fair sample of every class, not all of the first class."""
    first = data.load_dataset("cifar10", shared_data / "cifar10", progress=False)
    again = data.load_dataset("cifar10", shared_data / "cifar10", progress=False)
    assert torch.equal(first.test.labels, again.test.labels)
    assert len(torch.unique(first.test.labels[:100])) == 10
    assert len(torch.unique(first.train.labels[:100])) == 10
