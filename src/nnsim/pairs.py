"""Pair builders for :class:`nnsim.SimilarityLoss`: which inputs are known to be similar (docs/method.md,
"Training with the similarity criterion"). Each returns ``pairs``, a LongTensor [n_pairs, 2] of row indices
(into the batch, or into the dataset for :func:`sample_same_class`); :func:`check` validates explicit pairs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .errors import InputError

__all__ = ["same_label", "augmented", "sample_same_class", "check"]


def _labels(labels: Tensor, name: str = "labels") -> Tensor:
    if not isinstance(labels, Tensor) or labels.is_floating_point() or labels.dtype == torch.bool:
        raise InputError(f"{name} must be an integer tensor [N], got {getattr(labels, 'dtype', type(labels).__name__)}")
    if labels.dim() != 1:
        raise InputError(f"{name} must be one-dimensional [N], got shape {tuple(labels.shape)}")
    if labels.numel() == 0:
        raise InputError(f"{name} is empty")
    return labels


def _count(n_pairs: int | None) -> None:
    if n_pairs is not None and (isinstance(n_pairs, bool) or not isinstance(n_pairs, int) or n_pairs < 1):
        raise InputError(f"n_pairs must be None or a positive int, got {n_pairs!r}")


def same_label(
    labels: Tensor, n_pairs: int | None = None, *, generator: torch.Generator | None = None,
    replacement: bool = False,
) -> Tensor:
    """Pairs (i, j), i != j, of rows with equal labels: [n_pairs, 2].

    ``n_pairs=None`` returns every unordered same-label pair once (i < j, sorted). Otherwise ``n_pairs`` are
    drawn uniformly among them with ``generator``: without replacement (an error if fewer exist) or with
    ``replacement=True``. Raises ``InputError`` if no label occurs twice.
    """
    labels = _labels(labels)
    _count(n_pairs)
    i, j = torch.triu_indices(labels.numel(), labels.numel(), offset=1, device=labels.device)
    keep = labels[i] == labels[j]
    allp = torch.stack([i[keep], j[keep]], dim=1)
    if allp.shape[0] == 0:
        raise InputError("no two rows share a label: same-label pairs need at least one label that occurs twice "
                         "(sample the batch per class, e.g. with nnsim.pairs.sample_same_class)")
    if n_pairs is None:
        return allp
    if replacement:
        pick = torch.randint(allp.shape[0], (n_pairs,), generator=generator)
    else:
        if n_pairs > allp.shape[0]:
            raise InputError(f"only {allp.shape[0]} same-label pairs exist, {n_pairs} requested without replacement; "
                             "pass replacement=True or ask for fewer")
        pick = torch.randperm(allp.shape[0], generator=generator)[:n_pairs]
    return allp[pick.to(allp.device)]


def augmented(
    x: Tensor | tuple[Tensor, ...], transform: Callable[..., Tensor | tuple[Tensor, ...]]
) -> tuple[Tensor | tuple[Tensor, ...], Tensor]:
    """A batch and its augmented copy: ``(inputs [2B, ...], pairs [B, 2])`` with pairs[i] = (i, B + i).

    ``transform(x)`` receives the whole batch (a tensor, or the tuple of tensors of a multi-input model, as
    separate arguments) and must return a batch of the same shapes (draw per-sample randomness inside it).
    """
    batch = (x,) if isinstance(x, Tensor) else x
    if not isinstance(batch, tuple) or not batch or not all(isinstance(t, Tensor) for t in batch):
        raise InputError(f"x must be a tensor [B, ...] or a tuple of tensors, got {type(x).__name__}")
    B = batch[0].shape[0] if batch[0].dim() else 0
    if B == 0:
        raise InputError("x is empty (batch size 0)")
    out = transform(*batch)
    outb = (out,) if isinstance(out, Tensor) else out
    if not isinstance(outb, tuple) or len(outb) != len(batch) or any(
            not isinstance(o, Tensor) or o.shape != t.shape for o, t in zip(outb, batch)):
        got = [tuple(o.shape) if isinstance(o, Tensor) else type(o).__name__ for o in
               (outb if isinstance(outb, tuple) else (outb,))]
        raise InputError(f"transform must return tensors of the input shapes {[tuple(t.shape) for t in batch]}, "
                         f"got {got}")
    both = tuple(torch.cat([t, o.to(t.dtype)]) for t, o in zip(batch, outb))
    idx = torch.arange(B, device=batch[0].device)
    return (both[0] if isinstance(x, Tensor) else both), torch.stack([idx, idx + B], dim=1)


def sample_same_class(
    labels: Tensor, n_pairs: int = 1, *, num_classes: int | None = None, generator: torch.Generator | None = None
) -> Tensor:
    """The authors' pair sampler (docs/method.md, "Training with the similarity criterion"): per pair, a class c
    uniform over the classes present, then two dataset indices of class c drawn uniformly *with replacement* (so,
    rarely, the same index twice).

    Returns dataset indices [n_pairs, 2]; the training batch is ``x[idx.flatten()]`` and its pairs
    ``torch.arange(2 * n_pairs).view(-1, 2)``. ``num_classes`` (optional) checks that every class occurs.
    """
    labels = _labels(labels)
    _count(n_pairs)
    classes, counts = torch.unique(labels, return_counts=True)
    if num_classes is not None and classes.numel() != num_classes:
        missing = sorted(set(range(num_classes)) - set(classes.tolist()))
        raise InputError(f"labels lack classes {missing} of {num_classes}")
    order = torch.argsort(labels.cpu(), stable=True)
    starts = torch.cumsum(counts.cpu(), 0) - counts.cpu()
    c = torch.randint(classes.numel(), (n_pairs,), generator=generator)
    u = torch.rand(n_pairs, 2, generator=generator)
    pos = starts[c][:, None] + (u * counts.cpu()[c][:, None]).long().clamp_max(counts.cpu()[c][:, None] - 1)
    return order[pos].to(labels.device)


def check(pairs: Tensor, n: int) -> Tensor:
    """Validate explicit index pairs into n rows; returns them as int64 [n_pairs, 2]."""
    if not isinstance(pairs, Tensor):
        raise InputError(f"pairs must be a LongTensor [n_pairs, 2] of row indices, got {type(pairs).__name__}; "
                         "build it with nnsim.pairs or torch.tensor([[i, j], ...])")
    if pairs.dtype == torch.bool or pairs.is_floating_point() or pairs.is_complex():
        raise InputError(f"pairs must hold integer row indices (torch.long), got dtype {pairs.dtype}")
    if pairs.dim() != 2 or pairs.shape[1] != 2:
        raise InputError(f"pairs must have shape [n_pairs, 2], got {tuple(pairs.shape)}")
    if pairs.shape[0] == 0:
        raise InputError("pairs is empty: at least one pair is needed (skip the criterion for batches without pairs)")
    if bool((pairs < 0).any()) or bool((pairs >= n).any()):
        raise InputError(f"pairs index rows {int(pairs.min())}..{int(pairs.max())}, valid: 0..{n - 1}")
    return pairs.long()
