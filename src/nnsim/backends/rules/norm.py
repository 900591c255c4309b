"""Affine parameters of normalisation layers: gamma gets sum(delta * x_hat), beta gets sum(delta).

x_hat is recomputed from the captured input with the layer's own statistics (running statistics for
BatchNorm in eval mode, per-sample statistics for LayerNorm and GroupNorm), so samples stay independent.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...factors import Dense, Factor
from . import Call, register


def _normalized(module: nn.Module, x: Tensor) -> tuple[Tensor, int]:
    """x_hat and the number of trailing axes that carry the parameters (0: the channel axis 1)."""
    if isinstance(module, nn.LayerNorm):
        return F.layer_norm(x, module.normalized_shape, None, None, module.eps), len(module.normalized_shape)
    if isinstance(module, nn.GroupNorm):
        return F.group_norm(x, module.num_groups, None, None, module.eps), 0
    return F.batch_norm(x, module.running_mean, module.running_var, None, None, False, 0.0, module.eps), 0


@register(nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
def norm(module: nn.Module, layer: str, calls: list[Call], names: dict[str, str]) -> list[Factor]:
    B, d = calls[0].deltas[0].shape[:2]
    parts: dict[str, Tensor] = {}
    for c in calls:
        x = c.input()
        # The hook already detached x unless the factors must stay in the autograd graph.
        xhat, trailing = _normalized(module, x)
        delta = c.deltas[0]
        if trailing:  # LayerNorm: parameters over the trailing axes, sum over the rest
            n = xhat[0].shape[-trailing:].numel()
            dv, xv = delta.reshape(B, d, -1, n), xhat.reshape(B, 1, -1, n)
            red = 2
        else:  # BatchNorm / GroupNorm: parameters per channel (axis 1)
            C = x.shape[1]
            dv, xv = delta.reshape(B, d, C, -1), xhat.reshape(B, 1, C, -1)
            red = 3
        grads = {"weight": (dv * xv).sum(red), "bias": dv.sum(red)}
        for local in names:
            parts[local] = parts.get(local, 0) + grads[local]
    order = [k for k in ("weight", "bias") if k in names]
    g = torch.cat([parts[k] for k in order], dim=2)
    return [Dense(layer, g, [(names[k], getattr(module, k).shape) for k in order])]
