"""Real datasets, read offline: nothing is downloaded and nothing is cached on disk.

* :func:`load_digits`: scikit-learn's bundled 8x8 digits (optional dependency ``scikit-learn``).
* :func:`load_fashion_mnist`: Fashion-MNIST from Debian's ``dataset-fashion-mnist`` package
  (``/usr/share/datasets/fashion-mnist``), or from any folder holding the four IDX files.
* :func:`read_idx` / :func:`load_mnist_idx`: a strict reader for IDX files (the MNIST format), gzipped or not.

Images come back as ``float32`` tensors ``[N, 1, H, W]`` and labels as ``int64`` tensors ``[N]``.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from .errors import InputError

__all__ = [
    "FASHION_MNIST_CLASSES", "FASHION_MNIST_ROOT", "load_digits", "load_fashion_mnist", "load_mnist_idx", "read_idx",
]

#: Label ``i`` of Fashion-MNIST is ``FASHION_MNIST_CLASSES[i]``.
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
#: Where Debian's ``dataset-fashion-mnist`` package installs the files (used when ``root=None``).
FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
_FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

# IDX type codes -> big-endian numpy dtypes (http://yann.lecun.com/exdb/mnist/, "THE IDX FILE FORMAT").
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (gzipped or not: detected by its magic bytes) into a native-endian numpy array.

    Raises ``ValueError`` naming the file when it is not a well-formed IDX file: wrong magic number,
    unknown type code, corrupted gzip stream, or a payload whose size does not match the header's
    dimensions (truncated file or trailing bytes).
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise ValueError(f"{path}: corrupted gzip stream ({e})") from e
    if len(raw) < 4 or raw[:2] != b"\x00\x00":
        raise ValueError(f"{path}: not an IDX file (magic {raw[:4].hex() or 'empty'}; expected 0000<type><ndim>)")
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        raise ValueError(f"{path}: unknown IDX type code 0x{code:02X} (known: 08, 09, 0B, 0C, 0D, 0E)")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(raw)} bytes, {header} needed for {ndim} dimensions)")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_DTYPES[code])
    expected = math.prod(shape) * dtype.itemsize
    if len(raw) - header != expected:
        what = "truncated" if len(raw) - header < expected else "trailing bytes"
        raise ValueError(f"{path}: IDX payload is {len(raw) - header} bytes but header shape {shape} of {dtype.name} "
                         f"needs {expected} ({what})")
    array = np.frombuffer(raw, dtype, count=math.prod(shape), offset=header).reshape(shape)
    return array.astype(dtype.newbyteorder("="))  # a native-endian, writable copy


def load_mnist_idx(images_path: str | os.PathLike, labels_path: str | os.PathLike, normalize: bool = True,
                   limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Read an MNIST-style pair of IDX files: ubyte images ``[N, H, W]`` and ubyte labels ``[N]``.

    Returns ``x: float32 [N, 1, H, W]`` (scaled to [0, 1] when ``normalize``, else 0..255) and ``y: int64 [N]``;
    ``limit`` keeps the first ``limit`` samples. Raises ``ValueError`` naming the file on malformed files,
    unexpected dtypes/ranks, or image/label counts that differ.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise InputError(f"limit must be None or an int >= 0, got {limit!r}")
    images, labels = read_idx(images_path), read_idx(labels_path)
    images_path, labels_path = os.fspath(images_path), os.fspath(labels_path)
    if images.dtype != np.uint8 or images.ndim != 3:
        raise ValueError(f"{images_path}: expected ubyte images [N, H, W], got {images.dtype} {images.shape}")
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise ValueError(f"{labels_path}: expected ubyte labels [N], got {labels.dtype} {labels.shape}")
    if len(images) != len(labels):
        raise ValueError(f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels")
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    x = torch.from_numpy(images).unsqueeze(1).to(torch.float32)
    if normalize:
        x.div_(255.0)
    return x, torch.from_numpy(labels).to(torch.int64)


def load_fashion_mnist(split: str = "train", root: str | os.PathLike | None = None, normalize: bool = True,
                       limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST (Xiao et al., 2017): ``x: float32 [N, 1, 28, 28]``, ``y: int64 [N]`` with labels 0..9.

    ``split`` is ``"train"`` (60000 images) or ``"test"`` (10000). ``root=None`` reads the Debian package's
    folder :data:`FASHION_MNIST_ROOT`; any other ``root`` must hold ``train-images-idx3-ubyte``,
    ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte`` (each optionally ``.gz``).
    Pixels are scaled to [0, 1] when ``normalize`` (else 0..255); ``limit`` keeps the first ``limit`` samples.
    Class names: :data:`FASHION_MNIST_CLASSES`.
    """
    if split not in _FASHION_MNIST_FILES:
        raise InputError(f"split must be 'train' or 'test', got {split!r}")
    folder = Path(FASHION_MNIST_ROOT if root is None else root)
    paths = []
    for name in _FASHION_MNIST_FILES[split]:
        found = [p for p in (folder / name, folder / f"{name}.gz") if p.is_file()]
        if not found:
            raise FileNotFoundError(
                f"Fashion-MNIST file {name}[.gz] not found in {folder}. Install Debian's dataset-fashion-mnist "
                f"package, which puts the files in {FASHION_MNIST_ROOT}: `sudo apt-get install dataset-fashion-mnist`, "
                "or pass root=<folder holding the IDX files> to load_fashion_mnist.")
        paths.append(found[0])
    return load_mnist_idx(*paths, normalize=normalize, limit=limit)


def load_digits(normalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's bundled handwritten digits: ``x: float32 [1797, 1, 8, 8]``, ``y: int64 [1797]`` (0..9).

    Pixels (0..16) are divided by 16 into [0, 1] when ``normalize``. Needs scikit-learn (no download).
    """
    try:
        from sklearn.datasets import load_digits as sklearn_load_digits
    except ImportError as e:
        raise ImportError("nnsim.datasets.load_digits needs scikit-learn: pip install scikit-learn") from e
    digits = sklearn_load_digits()
    x = torch.from_numpy(np.asarray(digits.images, dtype=np.float32)).unsqueeze(1)
    if normalize:
        x.div_(16.0)
    return x, torch.from_numpy(np.asarray(digits.target, dtype=np.int64))
