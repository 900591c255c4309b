"""Turning what users pass (tensors, tuples of tensors, mappings of tensors, Datasets, DataLoaders) into
bounded chunks.

Internally a batch is always a tuple of tensors with the samples on axis 0. Keyword inputs (a ``dict`` or a
Hugging Face ``BatchEncoding`` such as ``{"input_ids": ..., "attention_mask": ...}``) are the same tuple plus
the source's ``keys``; the model is then called with them as keyword arguments.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, RandomSampler
from torch.utils.data.dataloader import default_collate

from .errors import InputError

Batch = tuple[Tensor, ...]


def _mapping(item: Mapping, where: str) -> tuple[Batch, tuple[str, ...]]:
    keys = tuple(item.keys())
    if not keys or not all(isinstance(k, str) for k in keys):
        raise InputError(f"{where}: a mapping of inputs needs string keys (the model's argument names), got {keys!r}")
    bad = [k for k in keys if not isinstance(item[k], Tensor)]
    if bad:
        raise InputError(f"{where}: the inputs {bad} are not tensors; pass tensors only (e.g. a tokenizer's "
                         "return_tensors='pt' output, without the non-tensor fields)")
    return tuple(item[k] for k in keys), keys


def _keyed_input(item: Any, where: str) -> tuple[Batch, tuple[str, ...] | None]:
    """A dataset item or loader batch -> (the model input as a tuple of tensors, its keyword names or None).

    Items are either the input itself (a tensor, or a mapping of tensors passed as keyword arguments) or a
    sequence whose first element is the input (a tensor, a tuple of tensors or a mapping); the remaining
    elements, typically labels, are ignored.
    """
    if isinstance(item, Tensor):
        return (item,), None
    if isinstance(item, Mapping):
        return _mapping(item, where)
    if isinstance(item, (tuple, list)) and item:
        first = item[0]
        if isinstance(first, Tensor):
            return (first,), None
        if isinstance(first, Mapping):
            return _mapping(first, where)
        if isinstance(first, (tuple, list)) and first and all(isinstance(t, Tensor) for t in first):
            return tuple(first), None
    raise InputError(
        f"{where}: expected a tensor, a mapping of tensors or a sequence whose first element is the input (a "
        f"tensor, a tuple of tensors or a mapping), got {type(item).__name__}"
    )


def _as_input(item: Any, where: str) -> Batch:
    return _keyed_input(item, where)[0]


@dataclass
class Source:
    """A sized, re-iterable, ordered collection of N samples, yielded in chunks of tuples of tensors."""

    data: Any
    n: int
    kind: str
    names: tuple[str, ...] | None = None  # keyword names of the inputs (mappings); None: positional
    _probed: bool = False

    @property
    def keys(self) -> tuple[str, ...] | None:
        """The inputs' keyword names (a mapping was given), or None for positional inputs."""
        if self.kind != "tensors" and not self._probed:  # datasets and loaders: from their first item
            first = self.data[0] if self.kind == "dataset" else next(iter(self.data))
            self.names = _keyed_input(first, "dataset item" if self.kind == "dataset" else "DataLoader batch")[1]
            self._probed = True
        return self.names

    def __len__(self) -> int:
        return self.n

    def chunks(self, size: int) -> Iterator[tuple[int, Batch]]:
        """Yield (start index, chunk) with chunks of at most ``size`` samples, in dataset order."""
        if self.kind == "tensors":
            for s in range(0, self.n, size):
                yield s, tuple(t[s : s + size] for t in self.data)
            return
        if self.kind == "dataset":
            loader = DataLoader(self.data, batch_size=size, shuffle=False, collate_fn=default_collate)
            batches = (_as_input(b, "dataset item") for b in loader)
        else:
            batches = (_as_input(b, "DataLoader batch") for b in self.data)
        # Re-chunk loader batches of any size into chunks of ``size``.
        start, pending, count = 0, [], 0
        for b in batches:
            pending.append(b)
            count += b[0].shape[0]
            while count >= size:
                merged = tuple(torch.cat([p[k] for p in pending]) for k in range(len(b)))
                yield start, tuple(t[:size] for t in merged)
                start += size
                rest = tuple(t[size:] for t in merged)
                count = rest[0].shape[0]
                pending = [rest] if count else []
        if count:
            yield start, tuple(torch.cat([p[k] for p in pending]) for k in range(len(pending[0])))

    def first(self) -> Batch:
        """The first sample (batch of one), used to plan the computation."""
        return next(self.chunks(1))[1]


def as_source(x: Any, name: str) -> Source:
    """Validate and wrap user inputs. Raises :class:`InputError` with a fix for bad arguments."""
    names = None
    if isinstance(x, Tensor):
        x = (x,)
    elif isinstance(x, Mapping):  # keyword inputs: a dict, a Hugging Face BatchEncoding (a UserDict)
        x, names = _mapping(x, name)
    if isinstance(x, (tuple, list)):
        if not x or not all(isinstance(t, Tensor) for t in x):
            raise InputError(f"{name}: a tuple of inputs must hold tensors only, got {[type(t).__name__ for t in x]}")
        if any(t.dim() == 0 for t in x):
            raise InputError(f"{name}: inputs need a leading sample axis; got a 0-d tensor")
        n = x[0].shape[0]
        if any(t.shape[0] != n for t in x):
            raise InputError(f"{name}: the tensors of a multi-input tuple have different sample counts "
                             f"{[t.shape[0] for t in x]}")
        src = Source(tuple(x), n, "tensors", names)
    elif isinstance(x, DataLoader):
        if isinstance(x.sampler, RandomSampler):
            raise InputError(f"{name}: DataLoader(shuffle=True) yields a new order on every pass, so results "
                             "could not be matched to samples; pass shuffle=False")
        try:
            n = len(x.dataset)  # type: ignore[arg-type]
        except TypeError as err:
            raise InputError(f"{name}: the DataLoader's dataset has no length; nnsim needs a sized dataset") from err
        src = Source(x, n, "loader")
    elif isinstance(x, Dataset):
        try:
            n = len(x)  # type: ignore[arg-type]
        except TypeError as err:
            raise InputError(f"{name}: the Dataset has no __len__; nnsim needs a sized dataset") from err
        src = Source(x, n, "dataset")
    else:
        hint = "; convert it with torch.from_numpy(x)" if type(x).__module__ == "numpy" else ""
        raise InputError(f"{name}: expected a tensor, a tuple of tensors, a mapping of tensors, a Dataset or a "
                         f"DataLoader, got {type(x).__name__}{hint}")
    if src.n == 0:
        raise InputError(f"{name} is empty: nothing to compare")
    return src


def check_finite(batch: Batch, start: int, name: str) -> None:
    """Raise when a floating input holds NaN or Inf, naming the samples."""
    for k, t in enumerate(batch):
        if t.is_floating_point() or t.is_complex():
            bad = ~torch.isfinite(t.reshape(t.shape[0], -1)).all(dim=1)
            if bad.any():
                idx = (torch.nonzero(bad).flatten() + start).tolist()
                raise InputError(f"{name}: input {k} contains NaN or Inf at samples {idx[:20]}; "
                                 "clean or drop these samples")


def sample_signature(batch: Batch, keys: tuple[str, ...] | None = None) -> list:
    """(shape of one sample, dtype) per input, with its keyword name when the inputs are a mapping."""
    sig = [(tuple(t.shape[1:]), t.dtype) for t in batch]
    return sig if keys is None else list(zip(keys, sig, strict=True))
