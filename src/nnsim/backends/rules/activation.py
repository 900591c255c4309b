"""nn.PReLU: y = max(0, x) + w min(0, x), so the per-sample gradient of w is sum(delta * min(0, x)) over the
positions (and over the channels when one weight is shared by all of them).

A dedicated rule because ``torch.func`` cannot vmap a Jacobian through ``prelu`` (torch 2.13 raises a
size mismatch), so the generic fallback does not apply to it.
"""

from __future__ import annotations

from torch import nn

from ...factors import Dense, Factor
from . import Call, register


@register(nn.PReLU)
def prelu(module: nn.PReLU, layer: str, calls: list[Call], names: dict[str, str]) -> list[Factor]:
    if "weight" not in names:
        return []
    B, d = calls[0].deltas[0].shape[:2]
    k = module.num_parameters
    total = None
    for c in calls:
        neg = c.batched_input().clamp(max=0)  # [B, C, ...] or [B]
        prod = c.deltas[0] * neg[:, None]  # [B, d, ...]
        if k == 1:
            g = prod.reshape(B, d, -1).sum(-1, keepdim=True)
        else:  # one weight per channel (axis 1 of the input)
            g = prod.reshape(B, d, k, -1).sum(-1)
        total = g if total is None else total + g
    return [Dense(layer, total, [(names["weight"], module.weight.shape)])]
