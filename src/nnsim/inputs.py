"""Turning what users pass (tensors, tuples of tensors, mappings of tensors, Datasets, DataLoaders) into
bounded chunks.

Internally a batch is always a tuple of tensors with the samples on axis 0. Keyword inputs (a ``dict`` or a
Hugging Face ``BatchEncoding`` such as ``{"input_ids": ..., "attention_mask": ...}``) are the same tuple plus
the source's ``keys``; the model is then called with them as keyword arguments.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
    Subset,
)
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
        if isinstance(first, (Tensor, Mapping)):
            return _keyed_input(first, where)
        if isinstance(first, (tuple, list)) and first and all(isinstance(t, Tensor) for t in first):
            return tuple(first), None
    raise InputError(
        f"{where}: expected a tensor, a mapping of tensors or a sequence whose first element is the input (a "
        f"tensor, a tuple of tensors or a mapping), got {type(item).__name__}"
    )


class Source:
    """A sized, re-iterable, ordered collection of N samples, yielded in chunks of tuples of tensors.

    One subclass per kind of input: :class:`TensorSource`, :class:`DatasetSource`, :class:`LoaderSource`."""

    kind: ClassVar[str]  # a label of the input kind ("tensors", "dataset", "loader")
    sliceable: ClassVar[bool] = True  # rows(a, b) reads only those samples
    random_access: bool = True  # take(idx) reads only those samples

    def __init__(self, data: Any, n: int, names: tuple[str, ...] | None = None) -> None:
        self.data, self.n, self.names = data, n, names

    @property
    def keys(self) -> tuple[str, ...] | None:
        """The inputs' keyword names (a mapping was given), or None for positional inputs."""
        return self.names

    def __len__(self) -> int:
        return self.n

    def chunks(self, size: int) -> Iterator[tuple[int, Batch]]:
        """Yield (start index, chunk) with chunks of at most ``size`` samples, in dataset order."""
        raise NotImplementedError

    def first(self) -> Batch:
        """The first sample (batch of one), used to plan the computation."""
        return next(self.chunks(1))[1]

    def rows(self, a: int, b: int) -> Source:
        """The samples [a, b) as a source (indexed from 0)."""
        raise NotImplementedError

    def take(self, idx: list[int], chunk: int = 1024) -> Any:
        """The samples ``idx`` (sorted, unique) as something :func:`as_source` accepts (``chunk``: samples per
        read when the source must be streamed)."""
        raise NotImplementedError


class TensorSource(Source):
    kind = "tensors"

    def chunks(self, size: int) -> Iterator[tuple[int, Batch]]:
        for s in range(0, self.n, size):
            yield s, tuple(t[s : s + size] for t in self.data)

    def rows(self, a: int, b: int) -> Source:
        return TensorSource(tuple(t[a:b] for t in self.data), b - a, self.names)

    def take(self, idx: list[int], chunk: int = 1024) -> Any:
        where = torch.tensor(idx, dtype=torch.long)
        rows = tuple(t[where.to(t.device)] for t in self.data)
        return rows if self.names is None else dict(zip(self.names, rows, strict=True))  # keyword inputs stay so


class _Streamed(Source):
    """Sources read by a DataLoader (subclasses give ``_first_item()`` and ``_batches(size)``): their keyword
    names come from their first item."""

    _probed = False
    _where = "dataset item"

    @property
    def keys(self) -> tuple[str, ...] | None:
        if not self._probed:
            self.names, self._probed = _keyed_input(self._first_item(), self._where)[1], True  # type: ignore
        return self.names

    def chunks(self, size: int) -> Iterator[tuple[int, Batch]]:
        # Re-chunk loader batches of any size into chunks of ``size``.
        start, pending, count = 0, [], 0
        for b in self._batches(size):
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


class DatasetSource(_Streamed):
    kind = "dataset"

    def _first_item(self) -> Any:
        return self.data[0]

    def _batches(self, size: int) -> Iterator[Batch]:
        loader = DataLoader(self.data, batch_size=size, shuffle=False, collate_fn=default_collate)
        return (_keyed_input(b, self._where)[0] for b in loader)

    def rows(self, a: int, b: int) -> Source:
        return self if (a, b) == (0, self.n) else DatasetSource(Subset(self.data, range(a, b)), b - a)

    def take(self, idx: list[int], chunk: int = 1024) -> Any:
        return Subset(self.data, idx)


class LoaderSource(_Streamed):
    """A DataLoader (any sampler but a shuffling one): random access only through a sequential batch sampler
    over a map-style dataset, else samples are picked in one streaming pass."""

    kind = "loader"
    sliceable = False
    _where = "DataLoader batch"

    def __init__(self, data: Any, n: int, names: tuple[str, ...] | None = None) -> None:
        super().__init__(data, n, names)
        bs = data.batch_sampler
        self.random_access = (not isinstance(data.dataset, IterableDataset) and type(bs) is BatchSampler
                              and isinstance(bs.sampler, SequentialSampler))

    def _first_item(self) -> Any:
        return next(iter(self.data))

    def _batches(self, size: int) -> Iterator[Batch]:
        return (_keyed_input(b, self._where)[0] for b in self.data)

    def rows(self, a: int, b: int) -> Source:
        return self if (a, b) == (0, self.n) else _Window(self, a, b)

    def take(self, idx: list[int], chunk: int = 1024) -> Any:
        if self.random_access:
            return DataLoader(Subset(self.data.dataset, idx), batch_size=self.data.batch_size, shuffle=False,
                              collate_fn=self.data.collate_fn)
        want = torch.tensor(idx, dtype=torch.long)  # one streaming pass picks the rows
        parts: list[Batch] = []
        for s, batch in self.chunks(chunk):
            lo, hi = torch.searchsorted(want, torch.tensor([s, s + batch[0].shape[0]])).tolist()
            if hi > lo:
                local = want[lo:hi] - s
                parts.append(tuple(t[local.to(t.device)] for t in batch))
        return tuple(torch.cat([p[k] for p in parts]) for k in range(len(parts[0])))


class _Window(Source):
    """Samples [a, b) of a streamed loader: read from its start (its order may come from any sampler), other
    samples skipped without computing anything on them. Chunks of ``size`` need ``a`` a multiple of it."""

    kind = "loader"
    sliceable = random_access = False

    def __init__(self, parent: Source, a: int, b: int) -> None:
        super().__init__(parent.data, b - a)
        self.parent, self.a, self.b = parent, a, b

    @property
    def keys(self) -> tuple[str, ...] | None:
        return self.parent.keys

    def chunks(self, size: int) -> Iterator[tuple[int, Batch]]:
        for s, batch in self.parent.chunks(size):
            if s >= self.b:
                return
            if s >= self.a:
                yield s - self.a, tuple(t[: self.b - s] for t in batch)


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
        src = TensorSource(tuple(x), n, names)
    elif isinstance(x, (DataLoader, Dataset)):
        loader = isinstance(x, DataLoader)
        if loader and isinstance(x.sampler, RandomSampler):
            raise InputError(f"{name}: DataLoader(shuffle=True) yields a new order on every pass, so results "
                             "could not be matched to samples; pass shuffle=False")
        try:
            n = len(x.dataset if loader else x)  # type: ignore[arg-type]
        except TypeError as err:
            what = "the DataLoader's dataset has no length" if loader else "the Dataset has no __len__"
            raise InputError(f"{name}: {what}; nnsim needs a sized dataset") from err
        src = LoaderSource(x, n) if loader else DatasetSource(x, n)
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
