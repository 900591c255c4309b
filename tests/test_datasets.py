"""nnsim.datasets: offline datasets and the strict IDX reader, checked against independent facts.

The Fashion-MNIST tests read Debian's ``dataset-fashion-mnist`` package and are never skipped: CI
(``.ci/run``) installs it when missing.
"""

import gzip
import re
import shutil
import struct
import sys

import numpy as np
import pytest
import torch

torch.set_num_threads(1)

from nnsim import datasets  # noqa: E402
from nnsim.datasets import (  # noqa: E402
    FASHION_MNIST_CLASSES,
    load_digits,
    load_fashion_mnist,
    load_mnist_idx,
    read_idx,
)

# ----------------------------------------------------------------------------------------------- IDX files by hand
# Oracle: the IDX layout written out from the format's definition, independently of read_idx.
CODES = {np.uint8: 0x08, np.int8: 0x09, np.int16: 0x0B, np.int32: 0x0C, np.float32: 0x0D, np.float64: 0x0E}


def idx_bytes(arr, code=None):
    arr = np.asarray(arr)
    code = CODES[arr.dtype.type] if code is None else code
    header = struct.pack(">BBBB", 0, 0, code, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()


def write(path, data, gz=False):
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def sample(dtype, shape, seed=0):
    rng = np.random.default_rng(seed)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        a = rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)
        a.flat[:2] = (info.min, info.max)[: a.size]  # the extremes catch sign and byte-order mistakes
        return a
    a = rng.standard_normal(shape).astype(dtype) * 1e3
    a.flat[:3] = (-0.0, np.finfo(dtype).max, np.finfo(dtype).tiny)[: a.size]
    return a


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 3, 4), (2, 1, 3, 2), (0, 4)])
@pytest.mark.parametrize("dtype", list(CODES))
def test_read_idx_round_trips_hand_written_files(tmp_path, dtype, shape, gz):
    a = sample(dtype, shape)
    out = read_idx(write(tmp_path / "a.idx", idx_bytes(a), gz=gz))
    assert out.shape == shape and out.dtype == np.dtype(dtype) and out.dtype.isnative
    assert out.flags.writeable
    np.testing.assert_array_equal(out, a)


def test_read_idx_known_bytes(tmp_path):
    # Spelled out byte by byte: 2x2 big-endian shorts 1, -2, 256, 0x7FFF.
    data = bytes.fromhex("00000B02" "00000002" "00000002" "0001" "FFFE" "0100" "7FFF")
    out = read_idx(write(tmp_path / "s.idx", data))
    np.testing.assert_array_equal(out, [[1, -2], [256, 32767]])
    assert read_idx(str(tmp_path / "s.idx")).dtype == np.int16  # str paths too


def test_read_idx_detects_gzip_by_content_not_name(tmp_path):
    a = sample(np.uint8, (4, 4))
    np.testing.assert_array_equal(read_idx(write(tmp_path / "looks-raw", idx_bytes(a), gz=True)), a)
    np.testing.assert_array_equal(read_idx(write(tmp_path / "looks.gz", idx_bytes(a))), a)


GOOD = idx_bytes(np.arange(12, dtype=np.uint8).reshape(3, 4))
CORRUPT = {
    "truncated payload": GOOD[:-1],
    "truncated header": GOOD[:6],
    "header only": GOOD[:12],
    "trailing bytes": GOOD + b"\x00",
    "bad magic": b"\x01" + GOOD[1:],
    "unknown dtype": GOOD[:2] + b"\x0a" + GOOD[3:],
    "float dims mismatch": idx_bytes(np.zeros(3, np.float32))[:-4] + b"\x00\x00",
    "text file": b"label,pixel0,pixel1\n3,0,255\n",
    "empty file": b"",
}


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
@pytest.mark.parametrize("case", list(CORRUPT))
def test_read_idx_rejects_corrupted_or_foreign_files(tmp_path, case, gz):
    path = write(tmp_path / "bad-file.idx", CORRUPT[case], gz=gz)
    with pytest.raises(ValueError, match=re.escape(str(path))):
        read_idx(path)


def test_read_idx_rejects_corrupted_gzip_stream(tmp_path):
    packed = gzip.compress(GOOD * 50)
    for name, data in {"cut": packed[: len(packed) // 2], "flipped": packed[:12] + b"\xff" * 8 + packed[20:]}.items():
        path = write(tmp_path / f"{name}.gz", data)
        with pytest.raises(ValueError, match=re.escape(str(path))):
            read_idx(path)


def test_read_idx_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_idx(tmp_path / "nope.idx")


# ----------------------------------------------------------------------------------------------- load_mnist_idx
def mnist_pair(tmp_path, images, labels):
    return write(tmp_path / "img", idx_bytes(images)), write(tmp_path / "lab", idx_bytes(labels))


def test_load_mnist_idx_small_pair(tmp_path):
    images = sample(np.uint8, (5, 3, 2))
    labels = np.array([0, 9, 3, 3, 1], np.uint8)
    x, y = load_mnist_idx(*mnist_pair(tmp_path, images, labels))
    assert x.dtype == torch.float32 and x.shape == (5, 1, 3, 2) and y.dtype == torch.int64
    np.testing.assert_array_equal(x.numpy()[:, 0] * 255, images)
    np.testing.assert_array_equal(y.numpy(), labels)
    x, y = load_mnist_idx(*mnist_pair(tmp_path, images, labels), normalize=False, limit=2)
    np.testing.assert_array_equal(x.numpy()[:, 0], images[:2])
    assert y.tolist() == [0, 9]


@pytest.mark.parametrize("images, labels, bad", [
    (np.zeros((5, 3, 2), np.uint8), np.zeros(4, np.uint8), "5 images"),  # count mismatch
    (np.zeros((5, 6), np.uint8), np.zeros(5, np.uint8), "img"),  # images not 3-D
    (np.zeros((5, 3, 2), np.float32), np.zeros(5, np.uint8), "img"),  # images not ubyte
    (np.zeros((5, 3, 2), np.uint8), np.zeros((5, 1), np.uint8), "lab"),  # labels not 1-D
    (np.zeros((5, 3, 2), np.uint8), np.zeros(5, np.int32), "lab"),  # labels not ubyte
])
def test_load_mnist_idx_rejects_inconsistent_pairs(tmp_path, images, labels, bad):
    with pytest.raises(ValueError, match=bad):
        load_mnist_idx(*mnist_pair(tmp_path, images, labels))


# ----------------------------------------------------------------------------------------------- digits
def test_digits_matches_sklearn():
    sklearn_datasets = pytest.importorskip("sklearn.datasets")  # a dev dependency: present under `make test`
    ref = sklearn_datasets.load_digits()
    x, y = load_digits()
    assert x.shape == (1797, 1, 8, 8) and x.dtype == torch.float32
    assert y.shape == (1797,) and y.dtype == torch.int64
    assert x.min() == 0 and x.max() == 1
    assert sorted(y.unique().tolist()) == list(range(10))
    np.testing.assert_array_equal(x.numpy()[:, 0] * 16, ref.images)  # /16 is exact in float32
    np.testing.assert_array_equal(y.numpy(), ref.target)
    raw, _ = load_digits(normalize=False)
    np.testing.assert_array_equal(raw.numpy()[:, 0], ref.images)
    assert raw.max() == 16


def test_digits_without_sklearn_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match="pip install scikit-learn"):
        load_digits()


# ----------------------------------------------------------------------------------------------- Fashion-MNIST
# Known facts of the dataset (Xiao et al. 2017): 60000/10000 images of 28x28, 6000/1000 per class, first labels,
# and the widely quoted train-set pixel mean 0.2860 and std 0.3530.
@pytest.fixture(scope="module")
def fm_train():
    return load_fashion_mnist("train")


@pytest.fixture(scope="module")
def fm_test():
    return load_fashion_mnist("test")


def test_fashion_mnist_train(fm_train):
    x, y = fm_train
    assert x.shape == (60000, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (60000,) and y.dtype == torch.int64
    assert x.min() == 0 and x.max() == 1
    assert torch.bincount(y, minlength=10).tolist() == [6000] * 10
    assert y[:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]
    flat = x.view(-1)
    mean = flat.sum().item() / flat.numel()
    std = (torch.dot(flat, flat).item() / flat.numel() - mean**2) ** 0.5
    assert abs(mean - 0.2860) < 5e-4 and abs(std - 0.3530) < 5e-4
    assert torch.equal(torch.round(x[:1000] * 255), x[:1000] * 255)  # 8-bit pixels, divided by 255


def test_fashion_mnist_test(fm_test):
    x, y = fm_test
    assert x.shape == (10000, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (10000,) and y.dtype == torch.int64
    assert x.min() == 0 and x.max() == 1
    assert torch.bincount(y, minlength=10).tolist() == [1000] * 10
    assert y[:10].tolist() == [9, 2, 1, 1, 6, 1, 4, 6, 5, 7]


def test_fashion_mnist_matches_plain_byte_offsets(fm_test):
    # Independent oracle: the reader from the dataset's own README (skip the 16/8-byte headers).
    with gzip.open(datasets.FASHION_MNIST_ROOT / "t10k-images-idx3-ubyte.gz") as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(datasets.FASHION_MNIST_ROOT / "t10k-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    x, y = load_fashion_mnist("test", normalize=False)
    np.testing.assert_array_equal(x.numpy()[:, 0], images)
    np.testing.assert_array_equal(y.numpy(), labels)
    np.testing.assert_allclose(fm_test[0].numpy()[:, 0], images / np.float32(255), rtol=0, atol=0)


def test_fashion_mnist_limit(fm_test):
    x, y = load_fashion_mnist("test", limit=100)
    assert x.shape == (100, 1, 28, 28) and y.shape == (100,)
    assert torch.equal(x, fm_test[0][:100]) and torch.equal(y, fm_test[1][:100])
    assert load_fashion_mnist("test", limit=0)[0].shape == (0, 1, 28, 28)
    assert load_fashion_mnist("test", limit=10**6)[1].shape == (10000,)


@pytest.mark.parametrize("kwargs", [{"limit": -1}, {"limit": 1.5}, {"limit": True}, {"split": "val"}])
def test_fashion_mnist_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        load_fashion_mnist(**{"split": "test", **kwargs})


def test_fashion_mnist_classes():
    assert len(FASHION_MNIST_CLASSES) == 10 and len(set(FASHION_MNIST_CLASSES)) == 10
    assert FASHION_MNIST_CLASSES[0] == "T-shirt/top" and FASHION_MNIST_CLASSES[9] == "Ankle boot"


def test_fashion_mnist_root_with_gz_and_raw_files(tmp_path, fm_test):
    gz_root, raw_root = tmp_path / "gz", tmp_path / "raw"
    gz_root.mkdir()
    raw_root.mkdir()
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        src = datasets.FASHION_MNIST_ROOT / f"{name}.gz"
        shutil.copy(src, gz_root / f"{name}.gz")
        with gzip.open(src) as f:
            (raw_root / name).write_bytes(f.read())
    for root in (gz_root, str(raw_root)):
        x, y = load_fashion_mnist("test", root=root)
        assert torch.equal(x, fm_test[0]) and torch.equal(y, fm_test[1])


def test_fashion_mnist_missing_files_say_how_to_install(tmp_path, monkeypatch):
    def message(**kwargs):
        with pytest.raises(FileNotFoundError) as info:
            load_fashion_mnist("test", **kwargs)
        return str(info.value)

    monkeypatch.setattr(datasets, "FASHION_MNIST_ROOT", tmp_path / "absent")  # the default root, uninstalled
    for text in (message(root=tmp_path), message()):
        assert "dataset-fashion-mnist" in text and "apt-get install" in text and "root=" in text
