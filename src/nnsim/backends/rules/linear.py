"""nn.Linear, including inputs with extra (sequence) axes: per-sample gradient sum_t delta_t a_t^T."""

from __future__ import annotations

import torch
from torch import nn

from ...factors import Factor
from . import Call, outer, register


def _cat(parts: list, dim: int) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


@register(nn.Linear)
def linear(module: nn.Linear, layer: str, calls: list[Call], names: dict[str, str]) -> list[Factor]:
    B, d = calls[0].deltas[0].shape[:2]
    a = _cat([c.input().reshape(B, -1, module.in_features) for c in calls], dim=1)
    delta = _cat([c.deltas[0].reshape(B, d, -1, module.out_features) for c in calls], dim=2)
    return [outer(layer, module, a[:, None], delta[:, :, None], names)]
