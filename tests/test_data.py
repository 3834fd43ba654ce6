"""Tests of data.py and utils.py: CIFAR-10 (pickles, folders, download checks, files that
must not be trusted), folder datasets, image modes, the cache, the validation split, the
built-in shapes dataset and batched augmentation. Real data under ../shared/data is used when
present (and skipped otherwise); everything else is built in tmp_path."""
import hashlib
import http.server
import io
import os
import pickle
import shutil
import struct
import tarfile
import threading
import time
import types
import urllib.error

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import data
import utils
from data import DataError, load_dataset


# -----------------------------------------------------------------------------
# Fake data builders

class Py2Pickler(pickle._Pickler):
    """Writes pickles the way Python 2 wrote the official CIFAR-10 files: protocol 2, every
    bytes and ASCII str as a py2 `str` (SHORT_BINSTRING / BINSTRING opcodes)."""
    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_str(self, obj):
        if isinstance(obj, str):
            obj = obj.encode("ascii")
        n = len(obj)
        if n < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([n]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", n) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str
    dispatch[str] = save_py2_str


def py2_pickle(obj):
    """obj as the official files hold it: numpy arrays refer to numpy.core.multiarray (numpy 1)."""
    f = io.BytesIO()
    Py2Pickler(f, protocol=2).dump(obj)
    return f.getvalue().replace(b"numpy._core.multiarray", b"numpy.core.multiarray")


def write_fake_cifar_pickles(root, n=4, seed=0, py2=True):
    """DIR/cifar-10-batches-py/ with 5 data batches + test_batch + batches.meta of n images each,
    written like the official Python 2 files (py2=True) or by this Python's pickle (py2=False).
    Returns the raw rows and labels: {"train": (rows (5n, 3072), labels), "test": (...)}."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    dumps = py2_pickle if py2 else pickle.dumps
    rows, labels = [], []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        x = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        y = [int(v) for v in rng.integers(0, 10, size=n)]
        (folder / name).write_bytes(dumps({b"batch_label": name.encode(), b"data": x,
                                           b"labels": y, b"filenames": [b"x.png"] * n}))
        rows.append(x)
        labels.append(y)
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse",
             b"ship", b"truck"]
    (folder / "batches.meta").write_bytes(dumps({b"label_names": names, b"num_vis": 3072,
                                                 b"num_cases_per_batch": n}))
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
    # Files are listed class by class, then put in one fixed random order (load_split_folder).
    assert sorted(d.train.labels.tolist()) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    want = torch.from_numpy(arrays[("train", "bird", 2)]).permute(2, 0, 1)
    assert torch.equal(d.train.images[listed_at(5, 9)], want)   # PNG: lossless, exact
    assert len(list(cache.glob("*.pt"))) == 2             # one cache file per split

    # Second load: served from the cache, no decoding at all.
    def no_decode(*a, **k):
        raise AssertionError("decoded although cached")
    monkeypatch.setattr(utils, "_decode_image", no_decode)
    d2 = load_dataset("cifar10", tmp_path / "c10", download=False, cache_dir=cache, progress=False)
    assert torch.equal(d2.train.images, d.train.images)
    assert torch.equal(d2.test.labels, d.test.labels)


def test_cifar_class_folders_jpeg_loosely(tmp_path):
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
    monkeypatch.setattr(utils, "_urlretrieve", fake_download)
    root = tmp_path / "cifar"
    with pytest.raises(DataError) as e:                  # the fake is not the official file
        load_dataset("cifar10", root, cache_dir=tmp_path / "cache", progress=False)
    msg = str(e.value)
    assert "MD5" in msg and utils.CIFAR10_MD5 in msg and utils.CIFAR10_URL in msg
    assert calls == [utils.CIFAR10_URL]
    assert not (root / "cifar-10-batches-py").exists()   # nothing was extracted
    assert list(root.iterdir()) == []                    # and the bad download was deleted

    # With the fake's own checksum the same archive is accepted, extracted and loaded.
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    monkeypatch.setattr(utils, "CIFAR10_MD5", md5)
    d = load_dataset("cifar10", root, cache_dir=tmp_path / "cache", progress=False)
    assert torch.equal(d.train.images, torch.from_numpy(raw["train"][0]).view(-1, 3, 32, 32))


def test_verify_md5_directly(tmp_path):
    p = tmp_path / "x.bin"
    p.write_bytes(b"hello")
    utils._verify_md5(p, hashlib.md5(b"hello").hexdigest(), tmp_path)   # no error
    with pytest.raises(DataError, match="MD5"):
        utils._verify_md5(p, "0" * 32, tmp_path)


def test_cifar_offline_or_no_download_gives_helpful_data_error(tmp_path, monkeypatch):
    def offline(url, dest):
        dest.write_bytes(b"the first bytes")             # a failure half-way through
        raise urllib.error.URLError("Name or service not known")
    monkeypatch.setattr(utils, "_urlretrieve", offline)
    with pytest.raises(DataError) as e:
        load_dataset("cifar10", tmp_path / "c", progress=False)
    msg = str(e.value)
    assert utils.CIFAR10_URL in msg and "cifar-10-batches-py" in msg and "train/<class>" in msg
    assert "--dataset shapes" in msg and "Name or service not known" in msg
    assert list((tmp_path / "c").iterdir()) == []        # no .part file left behind

    def never(url, dest):
        raise AssertionError("download attempted with download=False")
    monkeypatch.setattr(utils, "_urlretrieve", never)
    with pytest.raises(DataError) as e:
        load_dataset("cifar10", tmp_path / "d", download=False, progress=False)
    assert utils.CIFAR10_URL in str(e.value) and "--dataset shapes" in str(e.value)


def test_real_cifar10_test_split(shared_data, tmp_path):
    root = shared_data / "cifar10"
    if not (root / "test").is_dir():
        pytest.skip("no ../shared/data/cifar10")
    t = time.time()
    images, labels, classes = utils.load_split_folder(root / "test", (32, 32), tmp_path, False)
    assert time.time() - t < 30
    assert images.shape == (10000, 3, 32, 32) and images.dtype == torch.uint8
    assert torch.bincount(labels).tolist() == [1000] * 10
    assert classes == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                       "ship", "truck"]
    mean, std = utils.channel_stats(images)
    assert np.allclose(mean, (0.4914, 0.4822, 0.4465), atol=0.01)   # the well-known statistics


def test_cifar_pickles_written_by_python3_also_load(tmp_path):
    raw = write_fake_cifar_pickles(tmp_path, n=3, py2=False)    # numpy._core names, bytes opcodes
    d = load_dataset("cifar10", tmp_path, download=False, progress=False)
    assert torch.equal(d.test.images, torch.from_numpy(raw["test"][0]).view(-1, 3, 32, 32))
    assert d.classes[1] == "automobile"


class RunsCode:
    """Unpickling this runs code: it creates `marker` (with open() or a shell command)."""
    def __init__(self, marker, how):
        self.marker, self.how = marker, how

    def __reduce__(self):
        if self.how == "open":
            return (open, (str(self.marker), "w"))
        return (os.system, (f"touch '{self.marker}'",))


@pytest.mark.parametrize("how", ["open", "system"])
@pytest.mark.parametrize("name", ["data_batch_3", "test_batch", "batches.meta"])
def test_cifar_pickle_that_would_run_code_is_refused(tmp_path, name, how):
    write_fake_cifar_pickles(tmp_path / "c", n=2)
    marker = tmp_path / "pwned"
    evil = RunsCode(marker, how)
    content = ({b"label_names": evil} if name == "batches.meta" else
               {b"data": evil, b"labels": [0, 1]})
    (tmp_path / "c" / "cifar-10-batches-py" / name).write_bytes(pickle.dumps(content, protocol=2))
    with pytest.raises(DataError) as e:
        load_dataset("cifar10", tmp_path / "c", download=False, progress=False)
    msg = str(e.value)
    assert name in msg and "could run code" in msg and utils.CIFAR10_URL in msg
    assert not marker.exists()


@pytest.mark.parametrize("name", ["data_batch_1", "test_batch", "batches.meta"])
def test_cifar_truncated_file_gives_data_error_naming_it(tmp_path, name):
    write_fake_cifar_pickles(tmp_path, n=8)
    path = tmp_path / "cifar-10-batches-py" / name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DataError, match="truncated") as e:
        load_dataset("cifar10", tmp_path, download=False, progress=False)
    assert str(path) in str(e.value)


@pytest.mark.parametrize("problem, content, match", [
    ("label 57", {b"data": np.zeros((2, 3072), np.uint8), b"labels": [3, 57]}, "out of range"),
    ("label -1", {b"data": np.zeros((2, 3072), np.uint8), b"labels": [-1, 3]}, "out of range"),
    ("short rows", {b"data": np.zeros((2, 3000), np.uint8), b"labels": [0, 1]}, "3072"),
    ("wrong dtype", {b"data": np.zeros((2, 3072), np.int64), b"labels": [0, 1]}, "uint8"),
    ("not an array", {b"data": [[0] * 3072] * 2, b"labels": [0, 1]}, "uint8"),
    ("label count", {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, "labels"),
    ("float labels", {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0.0, 1.0]}, "labels"),
    ("no labels", {b"data": np.zeros((2, 3072), np.uint8)}, "labels"),
    ("not a dict", [1, 2, 3], "dict"),
])
def test_cifar_batch_with_wrong_contents_gives_data_error(tmp_path, problem, content, match):
    write_fake_cifar_pickles(tmp_path, n=2)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    path.write_bytes(py2_pickle(content))
    with pytest.raises(DataError, match=match) as e:
        load_dataset("cifar10", tmp_path, download=False, progress=False)
    assert str(path) in str(e.value) and "official" in str(e.value)


def test_cifar_meta_with_wrong_class_names_gives_data_error(tmp_path):
    write_fake_cifar_pickles(tmp_path, n=2)
    path = tmp_path / "cifar-10-batches-py" / "batches.meta"
    path.write_bytes(py2_pickle({b"label_names": [b"cat", b"dog"]}))
    with pytest.raises(DataError, match="label_names") as e:
        load_dataset("cifar10", tmp_path, download=False, progress=False)
    assert str(path) in str(e.value)
    path.unlink()                                   # no meta at all: generic names, still loads
    assert load_dataset("cifar10", tmp_path, download=False).classes[3] == "class_3"


@pytest.fixture
def http_server(monkeypatch):
    """A real HTTP server on 127.0.0.1: /slow trickles a byte every 0.2 s (forever), any other
    path serves server.payload. Yields the server; its base URL is server.url."""
    stop = threading.Event()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            slow = self.path.startswith("/slow")
            body = b"" if slow else self.server.payload
            self.send_response(200)
            self.send_header("Content-Length", str(10 ** 8 if slow else len(body)))
            self.end_headers()
            try:
                if not slow:
                    self.wfile.write(body)
                while slow and not stop.is_set():
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    stop.wait(0.2)
            except OSError:                      # the client hung up
                pass

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    server.payload = b""
    server.url = f"http://127.0.0.1:{server.server_port}"
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy",
                "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    try:
        yield server
    finally:
        stop.set()
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_download_that_never_ends_stops_at_the_deadline(tmp_path, monkeypatch, http_server):
    monkeypatch.setattr(utils, "CIFAR10_URL", http_server.url + "/slow/cifar-10-python.tar.gz")
    monkeypatch.setattr(utils, "DOWNLOAD_DEADLINE_S", 1.5)
    root = tmp_path / "cifar"
    start = time.monotonic()
    with pytest.raises(DataError, match="deadline") as e:
        load_dataset("cifar10", root, cache_dir=tmp_path / "cache", progress=False)
    assert time.monotonic() - start < 6
    assert http_server.url in str(e.value) and "--dataset shapes" in str(e.value)
    assert list(root.iterdir()) == []                    # no .part, no archive


def test_download_over_http_is_verified_then_loaded(tmp_path, monkeypatch, http_server):
    archive, raw = make_fake_archive(tmp_path)
    http_server.payload = archive.read_bytes()
    monkeypatch.setattr(utils, "CIFAR10_URL", http_server.url + "/cifar-10-python.tar.gz")
    root = tmp_path / "cifar"
    with pytest.raises(DataError, match="MD5"):          # not the official checksum
        load_dataset("cifar10", root, progress=False)
    assert list(root.iterdir()) == []
    monkeypatch.setattr(utils, "CIFAR10_MD5", hashlib.md5(http_server.payload).hexdigest())
    d = load_dataset("cifar10", root, progress=False)
    assert torch.equal(d.test.labels, torch.from_numpy(raw["test"][1].astype(np.int64)))
    assert sorted(p.name for p in root.iterdir()) == ["cifar-10-batches-py",
                                                      "cifar-10-python.tar.gz"]


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
    real_decode = utils._decode_image

    def no_decode(*a, **k):
        raise AssertionError("decoded although cached")
    monkeypatch.setattr(utils, "_decode_image", no_decode)
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
    monkeypatch.setattr(utils, "_decode_image", real_decode)
    d3 = load_dataset("folder", root, image_size=16, cache_dir=cache, progress=False)
    assert d3.train.images.shape[0] == d1.train.images.shape[0] + 1
    assert not list(cache.glob("*.tmp"))                 # atomic writes leave no temp files


def gradient16(h=32, w=32):
    """A 16-bit grey ramp covering 0..65535 (not multiples of 257), and its 8-bit values."""
    v = np.linspace(0, 65535, h * w).round().astype(np.uint16).reshape(h, w)
    return v, np.round(v / 257).astype(np.uint8)


def test_16bit_png_is_decoded_by_value_not_clipped(tmp_path):
    v16, want = gradient16()
    root = tmp_path / "ds"
    for split in ("train", "val"):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            Image.fromarray(v16).save(root / split / cls / "0.png")     # a 16-bit grey PNG
    with Image.open(root / "train" / "a" / "0.png") as im:
        assert im.mode.startswith("I")                              # what PIL opens it as
    d = load_dataset("folder", root, image_size=32, cache_dir=tmp_path / "cache", progress=False)
    got = d.train.images[0].numpy()                                 # (3, 32, 32), all channels
    assert np.abs(got.astype(int) - want[None].astype(int)).max() <= 1
    assert got.mean() < 160                                         # not ~255 (clipped)


def test_image_modes_decode_sensibly(tmp_path):
    v16, want16 = gradient16(8, 8)
    grey = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    alpha = np.tile(np.array([0, 128, 255, 255, 64, 0, 255, 200], np.uint8), (8, 1))
    rgb = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    over_white = lambda c, a: (c.astype(float) * a + 255 * (255 - a.astype(float))) / 255

    def decode(im):
        path = tmp_path / f"{len(list(tmp_path.iterdir()))}.png"
        im.save(path)
        return utils._decode_image(path, (8, 8)).astype(float)    # (8, 8, 3)

    assert np.abs(decode(Image.fromarray(grey, "L")) - grey[..., None]).max() == 0
    assert np.abs(decode(Image.fromarray(v16)) - want16[..., None]).max() <= 1
    la = Image.fromarray(np.stack([grey, alpha], -1), "LA")
    assert np.abs(decode(la) - over_white(grey, alpha)[..., None]).max() <= 1
    rgba = Image.fromarray(np.concatenate([rgb, alpha[..., None]], -1), "RGBA")
    assert np.abs(decode(rgba) - over_white(rgb, alpha[..., None])).max() <= 1
    p = Image.fromarray(grey // 64, "L").convert("P")               # palette indices 0..3
    p.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255, 9, 9, 9])
    p.info["transparency"] = 3                                      # index 3 is transparent
    got = decode(p)
    assert (got[grey // 64 == 3] == 255).all() and (got[grey // 64 == 0] == [255, 0, 0]).all()
    assert set(np.unique(decode(Image.fromarray(grey > 100)))) == {0, 255}     # mode "1"
    # In-memory modes PNG cannot store: 32-bit int (read as 16-bit) and float (0..255).
    assert np.abs(np.asarray(utils._to_rgb(Image.fromarray(v16.astype(np.int32), "I")))
                  - want16[..., None]).max() <= 1
    f = np.linspace(-10, 300, 64, dtype=np.float32).reshape(8, 8)
    assert np.array_equal(np.asarray(utils._to_rgb(Image.fromarray(f, "F")))[..., 0],
                          np.clip(np.rint(f), 0, 255).astype(np.uint8))


class WritesMarker:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("bad", ["list", "no labels", "float images", "short images",
                                 "wrong labels", "wrong classes", "not torch", "runs code"])
def test_bad_cache_file_is_a_miss_and_is_rewritten(tmp_path, bad):
    root, cache = tmp_path / "ds", tmp_path / "cache"
    write_class_folders(root, ["train", "val"], ["a", "b"], [(12, 12), (10, 14)])
    first = load_dataset("folder", root, image_size=8, cache_dir=cache, progress=False)
    files = sorted(cache.glob("*.pt"))
    assert len(files) == 2
    for path in files:
        good = torch.load(path, weights_only=True)
        x, y, c = good["images"], good["labels"], good["classes"]
        if bad == "not torch":
            path.write_bytes(b"not a torch file")
            continue
        obj = {"list": [x, y, c],
               "no labels": {"images": x, "classes": c},
               "float images": {"images": x.float(), "labels": y, "classes": c},
               "short images": {"images": x[1:], "labels": y, "classes": c},
               "wrong labels": {"images": x, "labels": 1 - y, "classes": c},
               "wrong classes": {"images": x, "labels": y, "classes": ["b", "a"]},
               "runs code": {"images": x, "labels": y, "classes": c,
                             "x": WritesMarker(tmp_path / "pwned")}}[bad]
        torch.save(obj, path)
    with pytest.warns(UserWarning, match="ignoring the decode cache file"):
        again = load_dataset("folder", root, image_size=8, cache_dir=cache, progress=False)
    assert not (tmp_path / "pwned").exists()
    assert torch.equal(again.train.images, first.train.images)
    assert torch.equal(again.test.labels, first.test.labels)
    for path in files:                                   # rewritten: a good entry again
        fixed = torch.load(path, weights_only=True)
        assert fixed["images"].dtype == torch.uint8 and fixed["classes"] == ["a", "b"]


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
    images, labels, classes = utils.load_split_folder(root, (64, 64), tmp_path, False)
    assert images.shape == (3925, 3, 64, 64) and images.dtype == torch.uint8
    assert classes[0] == "n01440764" and len(classes) == 10
    assert torch.bincount(labels).min() > 300
    assert 60 < images.float().mean() < 190


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
# The validation split

def numbered_split(labels):
    """A Split whose image i is unique and spells i (3 bytes in 3 channels of a 1 x 1 image)."""
    i = torch.arange(len(labels))
    images = torch.stack([i % 256, i // 256 % 256, i // 65536], 1).to(torch.uint8)
    return data.Split(images.view(-1, 3, 1, 1), torch.as_tensor(labels, dtype=torch.int64))


def image_ids(split):
    x = split.images.view(-1, 3).long()
    return x[:, 0] + 256 * x[:, 1] + 65536 * x[:, 2]


def check_partition(split, train, val):
    """Disjoint by content, together exactly `split`, each part in the original order."""
    t, v = image_ids(train), image_ids(val)
    assert not set(t.tolist()) & set(v.tolist())
    assert sorted(t.tolist() + v.tolist()) == list(range(len(split)))
    assert (t.diff() > 0).all() and (v.diff() > 0).all()
    assert torch.equal(train.labels, split.labels[t]) and torch.equal(val.labels, split.labels[v])


def test_split_validation_cifar_sized_is_exact_stratified_and_fixed():
    order = torch.randperm(50_000, generator=torch.Generator().manual_seed(1))
    split = numbered_split((torch.arange(50_000) % 10)[order])        # balanced, mixed order
    train, val = data.split_validation(split, 5000)
    assert len(train) == 45_000 and len(val) == 5000
    assert torch.bincount(val.labels).tolist() == [500] * 10
    check_partition(split, train, val)
    assert len(torch.unique(val.labels[:50])) >= 8                    # the first ones: a mix
    again, val2 = data.split_validation(split, 5000)
    assert torch.equal(val2.images, val.images) and torch.equal(again.labels, train.labels)
    _, other = data.split_validation(split, 5000, seed=1)
    assert not torch.equal(other.images, val.images)


def test_split_validation_unbalanced_fraction_and_int():
    counts = [1000, 300, 55, 7, 1, 640]
    labels = torch.cat([torch.full((c,), k) for k, c in enumerate(counts)])   # class-sorted
    split = numbered_split(labels)
    train, val = data.split_validation(split, 0.1)
    assert torch.bincount(val.labels, minlength=6).tolist() == [100, 30, 6, 1, 0, 64]
    check_partition(split, train, val)
    train, val = data.split_validation(split, 200)                    # an int: exact total
    got = torch.bincount(val.labels, minlength=6)
    share = torch.tensor(counts) * 200 / sum(counts)
    assert got.sum() == 200 and ((got - share).abs() < 1).all()
    check_partition(split, train, val)


@pytest.mark.parametrize("size, match", [
    (-5, "at least 1"), (0, "at least 1"), (20, "less than"), (25, "less than"),
    (0.0, r"\(0, 1\)"), (1.0, r"\(0, 1\)"), (1.5, r"\(0, 1\)"), (-0.1, r"\(0, 1\)"),
    (0.01, "rounds to 0"), (True, "int"), ("10", "int"), (None, "int"),
])
def test_split_validation_bad_sizes(size, match):
    split = numbered_split(torch.arange(20) % 2)
    with pytest.raises(ValueError, match=match):
        data.split_validation(split, size)


def test_load_dataset_val_size_holds_out_of_train_only(tmp_path):
    raw = write_fake_cifar_pickles(tmp_path, n=40)                    # 200 train, 40 test
    full = load_dataset("cifar10", tmp_path, download=False, progress=False)
    assert full.val is None
    d = load_dataset("cifar10", tmp_path, download=False, progress=False, val_size=50)
    assert len(d.train) == 150 and len(d.val) == 50
    assert torch.equal(d.test.images, full.test.images)               # test untouched
    # train + val are exactly the original train images, disjoint, in the original order
    rows = torch.from_numpy(raw["train"][0]).view(-1, 3, 32, 32)
    where = lambda part: [next(i for i in range(200) if torch.equal(rows[i], img))
                          for img in part.images]
    t, v = where(d.train), where(d.val)
    assert sorted(t + v) == list(range(200)) and t == sorted(t) and v == sorted(v)
    assert torch.equal(d.val.labels, full.train.labels[v])
    # the normalization comes from the remaining train images only
    assert d.mean == utils.channel_stats(d.train.images)[0] != full.mean
    # the same images for every run, whatever `seed` says; a fraction works too
    again = load_dataset("cifar10", tmp_path, download=False, progress=False, val_size=50, seed=3)
    assert torch.equal(again.val.images, d.val.images)
    assert torch.equal(data.split_validation(full.train, 50)[1].images, d.val.images)
    _, other = data.split_validation(full.train, 50, seed=1)        # another seed, other images
    assert not torch.equal(other.images, d.val.images)
    assert len(load_dataset("cifar10", tmp_path, download=False, val_size=0.25).val) in range(
        40, 61)
    # bad sizes fail before any data is read
    for bad in (-1, 1.5, True, "5"):
        with pytest.raises(ValueError, match="validation size"):
            load_dataset("cifar10", tmp_path / "nowhere", download=False, val_size=bad)
    with pytest.raises(ValueError, match="less than the 200 images"):
        load_dataset("cifar10", tmp_path, download=False, val_size=200)
    # Dataset still builds without a val field (old constructions)
    ds = data.Dataset("x", full.train, full.test, full.classes, full.mean, full.std, (32, 32))
    assert ds.val is None


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
    train, val = data.split_validation(first.train, 5000)      # what load_dataset(val_size=)
    assert torch.bincount(val.labels).tolist() == [500] * 10 and len(train) == 45_000
    assert len(torch.unique(val.labels[:100])) == 10           # still a mix of every class


# -----------------------------------------------------------------------------
# Streamed folders: above utils.STREAMED_ABOVE pixels the images stay on disk (utils.ImageFiles)

def streamed_and_in_memory(tmp_path, monkeypatch, crop_pct=None):
    """One folder dataset loaded twice at 16 px: streamed (the threshold lowered to 8 px) and
    decoded into memory (the usual path at this size)."""
    root = tmp_path / "ds"
    write_class_folders(root, ["train", "val"], ["a", "b", "c"], [(20, 30), (30, 20), (24, 24)])
    kept = load_dataset("folder", root, 16, crop_pct=crop_pct, cache_dir=tmp_path / "c",
                        progress=False)
    monkeypatch.setattr(utils, "STREAMED_ABOVE", 8)
    streamed = load_dataset("folder", root, 16, crop_pct=crop_pct, cache_dir=tmp_path / "c2",
                            progress=False)
    return streamed, kept


def test_streamed_folders_read_the_same_images_and_write_nothing(tmp_path, monkeypatch):
    streamed, kept = streamed_and_in_memory(tmp_path, monkeypatch)
    assert isinstance(streamed.train.images, utils.ImageFiles)
    assert torch.is_tensor(kept.train.images)
    assert streamed.train.images.shape == kept.train.images.shape == (9, 3, 16, 16)
    assert torch.equal(streamed.train.images[:], kept.train.images)     # same order, same pixels
    assert torch.equal(streamed.train.images[4], kept.train.images[4])   # an int: one image
    assert torch.equal(streamed.test.labels, kept.test.labels)
    assert (streamed.mean, streamed.std) == (kept.mean, kept.std)
    assert not (tmp_path / "c2").exists()                  # streamed: no decode cache written
    # subset keeps the files on disk; a mask, indices and a slice pick the same images
    part = streamed.train.take(torch.tensor([True, False] * 4 + [True]))
    assert isinstance(part.images, utils.ImageFiles) and len(part) == 5
    assert torch.equal(part.images[:], kept.train.images[::2])
    chunks = streamed.train.images.split(4)                # like tensor.split: 4, 4, 1 images
    assert [len(c) for c in chunks] == [4, 4, 1]
    assert torch.equal(chunks[2].to("cpu"), kept.train.images[8:])


def test_crop_pct_scales_before_the_centre_crop(tmp_path, monkeypatch):
    """timm's evaluation crop: the shorter side scaled to size / crop_pct, then the centre cut."""
    streamed, kept = streamed_and_in_memory(tmp_path, monkeypatch, crop_pct=0.5)
    path = streamed.train.images.paths[0]
    want = torch.from_numpy(utils._decode_image(path, (32, 32))[8:24, 8:24].copy())
    # decoding at 32 px and cutting the centre 16 px is the same as crop_pct 0.5 at 16 px (both
    # scale the shorter side to 32 px), up to rounding of the resized size
    got = streamed.train.images[0].permute(1, 2, 0)
    assert (got.int() - want.int()).abs().max() <= 1
    assert torch.equal(kept.train.images[0], streamed.train.images[0])    # both paths crop alike


def test_random_resized_crops_are_reproducible_and_inside(tmp_path):
    for seed in range(200):
        draw = torch.rand(4, generator=torch.Generator().manual_seed(seed)).tolist()
        left, top, right, bottom = utils._random_box(40, 30, draw)
        assert 0 <= left < right <= 40 and 0 <= top < bottom <= 30
        assert (right - left) * (bottom - top) >= 0.08 * 40 * 30 * 0.9   # rounding
    root = tmp_path / "ds"
    write_class_folders(root, ["train", "val"], ["a", "b"], [(40, 30), (30, 50)])
    files = utils.ImageFiles(sorted((root / "train").rglob("*.png")), (16, 16), 0.875)
    one = files.decode(torch.Generator().manual_seed(5))
    assert one.shape == (4, 3, 16, 16)
    assert torch.equal(one, files.decode(torch.Generator().manual_seed(5)))
    assert not torch.equal(one, files.decode(torch.Generator().manual_seed(6)))
    assert not torch.equal(one, files.decode())            # no generator: the centre crop


def test_batches_decode_in_workers_and_resume_mid_epoch(tmp_path, monkeypatch):
    """data.batches: streamed images decoded in worker processes give the in-memory batches;
    with random-resized crops, an epoch resumed at step 2 decodes the crops of the whole epoch."""
    streamed, kept = streamed_and_in_memory(tmp_path, monkeypatch)
    procs = types.SimpleNamespace(device=torch.device("cpu"), workers=2)
    rows = torch.randperm(9, generator=torch.Generator().manual_seed(1))[:8].view(4, 2)
    got = list(data.batches(streamed.train, rows, 0, procs))
    want = list(data.batches(kept.train, rows, 0, procs))
    for (images, labels, wait), (images2, labels2, _) in zip(got, want, strict=True):
        assert torch.equal(images, images2) and torch.equal(labels, labels2) and wait >= 0
    streamed.train.images.crop_pct = 0.875                 # random-resized crops from here on
    whole = [b[0] for b in data.batches(streamed.train, rows, 7, procs)]
    resumed = [b[0] for b in data.batches(streamed.train, rows[2:], 7 + 2, procs)]
    assert all(torch.equal(a, b) for a, b in zip(whole[2:], resumed, strict=True))
    assert not torch.equal(whole[0], want[0][0])


def test_a_flat_val_folder_is_refused_with_the_layout(tmp_path):
    root = tmp_path / "imagenet"
    write_class_folders(root, ["train"], ["n01", "n02"], [(20, 20)])
    save_image(root / "val" / "ILSVRC2012_val_00000001.JPEG", np.zeros((20, 20, 3), np.uint8))
    with pytest.raises(DataError, match="holds images directly.*one folder per class"):
        load_dataset("folder", root, 16, progress=False)
