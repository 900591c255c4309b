"""Affine maps, including inputs with extra (sequence) axes: per-sample gradient sum_t delta_t a_t^T.

* ``nn.Linear``: weight [out, in];
* Hugging Face GPT-2's ``Conv1D`` (``transformers.pytorch_utils.Conv1D``; matched by name and shapes, never
  imported): ``y = x @ W + b`` with the weight transposed, [in, out].
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ...factors import Factor
from . import SIGNAL_LAYOUTS, Call, d_before_last, outer_or_dense, register, register_match


def _cat(parts: list, dim: int) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


def _affine(module: nn.Module, layer: str, calls: list[Call], names: dict[str, str], n_in: int, n_out: int,
            transposed: bool) -> list[Factor]:
    B, d = calls[0].deltas[0].shape[:2]
    a_parts, d_parts = [], []
    for c in calls:
        x, delta = c.batched_input(), c.batched_signals()
        if x.shape[-1] != n_in or delta.shape[-1] != n_out:
            raise ValueError(f"expected inputs [..., {n_in}] and outputs [..., {n_out}], got {tuple(x.shape)}")
        a_parts.append(x.reshape(B, -1, n_in))
        d_parts.append(delta.reshape(B, d, -1, n_out))
    a, delta = _cat(a_parts, 1), _cat(d_parts, 2)
    return outer_or_dense(layer, module, a[:, None], delta[:, :, None], names, weight_transposed=transposed,
                          graph=calls[0].graph)


@register(nn.Linear)
def linear(module: nn.Linear, layer: str, calls: list[Call], names: dict[str, str]) -> list[Factor]:
    return _affine(module, layer, calls, names, module.in_features, module.out_features, transposed=False)


def _is_hf_conv1d(module: nn.Module) -> bool:
    w = getattr(module, "weight", None)
    b = getattr(module, "bias", None)
    return (type(module).__name__ == "Conv1D" and isinstance(w, Tensor) and w.dim() == 2
            and getattr(module, "nf", None) == w.shape[1] and (b is None or tuple(b.shape) == (w.shape[1],)))


@register_match(_is_hf_conv1d)
def conv1d_transposed(module: nn.Module, layer: str, calls: list[Call], names: dict[str, str]) -> list[Factor]:
    n_in, n_out = module.weight.shape
    return _affine(module, layer, calls, names, n_in, n_out, transposed=True)


SIGNAL_LAYOUTS[linear] = SIGNAL_LAYOUTS[conv1d_transposed] = d_before_last
