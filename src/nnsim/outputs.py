"""Output specifications: which d values per sample are analysed (docs/method.md, "Classification outputs",
"Analysed outputs and parameters").

An output spec is a callable ``(model_output, inputs) -> Tensor[B, d]``. It must treat samples
independently (it is also called on single samples under ``torch.func.vmap``). ``inputs`` is the tuple of
input tensors, or a dict when the inputs were given as a mapping (keyword inputs). Every helper accepts a
Hugging Face ``ModelOutput`` (its ``.logits``) as well as a tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

OutputFn = Callable[[Any, tuple[Tensor, ...]], Tensor]

__all__ = [
    "OutputFn", "tensor", "flatten", "pixel", "center_pixel", "spatial_sum", "spatial_mean", "logits",
    "log_softmax_mask", "posnegflat_mask",
]


def _tensor(out: Any) -> Tensor:
    """The model's output tensor: the output itself, or the ``logits`` of a Hugging Face ``ModelOutput`` (any
    object with a tensor ``.logits``, or a mapping with a ``"logits"`` entry)."""
    if isinstance(out, Tensor):
        return out
    logits = getattr(out, "logits", None)
    if logits is None and isinstance(out, Mapping):
        logits = out.get("logits")
    if isinstance(logits, Tensor):
        return logits
    raise TypeError(
        f"the model returned {type(out).__name__}, not a tensor nor an output with .logits; pass "
        "output=callable(model_output, inputs) that returns a [B, d] tensor"
    )


def tensor(out: Any) -> Tensor:
    """The tensor a model output stands for (itself, or ``.logits`` / ``["logits"]``), for ``output=`` callables."""
    return _tensor(out)


def flatten(out: Any, inputs: tuple[Tensor, ...]) -> Tensor:
    """The default: the whole model output, flattened per sample to [B, d]."""
    out = _tensor(out)
    return out.reshape(out.shape[0], -1)


def pixel(*index: int) -> OutputFn:
    """Channels of one output position: [B, C, *spatial] -> [B, C] at ``spatial == index``."""

    def select(out: Any, inputs: tuple[Tensor, ...]) -> Tensor:
        out = _tensor(out)
        if out.dim() != 2 + len(index):
            raise ValueError(f"pixel{index} needs an output [B, C, {len(index)} spatial dims], got {tuple(out.shape)}")
        return out[(slice(None), slice(None), *index)]

    select.__name__ = f"pixel{index}"
    return select


def center_pixel(out: Any, inputs: tuple[Tensor, ...]) -> Tensor:
    """Channels at the central output position (floor of size / 2 along each spatial axis)."""
    out = _tensor(out)
    return out[(slice(None), slice(None), *(s // 2 for s in out.shape[2:]))]


def spatial_sum(out: Any, inputs: tuple[Tensor, ...]) -> Tensor:
    """Sum over spatial axes, [B, C, *spatial] -> [B, C]: the authors' map-alignment output (docs/method.md,
    "Analysed outputs and parameters")."""
    out = _tensor(out)
    return out.flatten(2).sum(-1)


def spatial_mean(out: Any, inputs: tuple[Tensor, ...]) -> Tensor:
    """Mean over spatial axes, [B, C, *spatial] -> [B, C]."""
    out = _tensor(out)
    return out.flatten(2).mean(-1)


def _target_index(z: Tensor, target: int | str) -> Tensor:
    if target == "predicted":
        return z.detach().argmax(-1)
    if isinstance(target, int) and 0 <= target < z.shape[-1]:
        return torch.full(z.shape[:1], target, dtype=torch.long, device=z.device)
    raise ValueError(f"target must be a class index in [0, {z.shape[-1]}) or 'predicted', got {target!r}")


def logits(target: int | str | None = None) -> OutputFn:
    """Classifier logits [B, C]; with ``target`` (a class index or "predicted") the single logit z_t [B, 1]."""

    def select(out: Any, inputs: tuple[Tensor, ...]) -> Tensor:
        z = flatten(out, inputs)
        if target is None:
            return z
        return z.gather(1, _target_index(z, target)[:, None])

    return select


def posnegflat_mask(t: Tensor, num_classes: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """The authors' mask: +1 for the target class, -1/(C-1) elsewhere. t [B] -> [B, C].

    Built in the logits' dtype so that it sums to zero to that precision (the log-sum-exp cancels).
    """
    m = torch.full((t.shape[0], num_classes), -1.0 / (num_classes - 1), device=t.device, dtype=dtype)
    return m.scatter(1, t[:, None], 1.0)


def log_softmax_mask(target: int | str = "predicted", mask: str = "posnegflat") -> OutputFn:
    """The authors' scalarisation s = sum_c m_c log_softmax(z)_c (docs/method.md, "Classification outputs"), [B, 1].

    With the ``posnegflat`` mask, s equals the logit margin z_t - mean_{c != t} z_c exactly.
    ``target`` is a class index or "predicted" (the argmax class of each sample, label-free).
    """
    if mask != "posnegflat":
        raise ValueError(f"unknown mask {mask!r}; supported: 'posnegflat'")

    def select(out: Any, inputs: tuple[Tensor, ...]) -> Tensor:
        z = flatten(out, inputs)
        if z.shape[1] < 2:
            raise ValueError("log_softmax_mask needs at least two classes")
        m = posnegflat_mask(_target_index(z, target), z.shape[1], z.dtype)
        return (m * torch.log_softmax(z, dim=-1)).sum(-1, keepdim=True)

    return select
