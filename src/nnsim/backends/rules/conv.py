"""nn.Conv1d / nn.Conv2d (any stride, dilation, padding mode and groups) via unfolded input patches.

The weight is shared over output positions, so the per-sample gradient is sum_p delta_p patch_p^T
(docs/method.md, "Layer-wise structure"); the Outer factor keeps positions and lets the cost model choose per
layer between the pairwise product over positions and the explicit gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...factors import Factor
from . import Call, outer, register


def _patches(module: nn.Conv1d | nn.Conv2d, x: Tensor) -> Tensor:
    """[B, C_in, *spatial] -> [B, C_in * prod(kernel), T]."""
    two_d = isinstance(module, nn.Conv2d)
    if not two_d:
        x = x.unsqueeze(-2)
    k, s, dil = (tuple(v) if two_d else (1, v[0]) for v in (module.kernel_size, module.stride, module.dilation))
    if module.padding_mode != "zeros" or isinstance(module.padding, str):
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        pad = module._reversed_padding_repeated_twice
        if not two_d:
            pad = list(pad) + [0, 0]
        x = F.pad(x, pad, mode=mode)
        padding = (0, 0)
    else:
        padding = tuple(module.padding) if two_d else (0, module.padding[0])
    # F.unfold is pathologically slow on CPU (seconds for a batch of 13x13 maps): a strided view of the padded
    # input, copied once, gives the same patches in the same (channel, row, column) order, 3-20x faster than
    # a grouped convolution with one-hot kernels (measured, docs/benchmarks.md "Cost model").
    if any(padding):
        x = F.pad(x, (padding[1], padding[1], padding[0], padding[0]))
    B, C, H, W = x.shape
    Ho, Wo = (H - dil[0] * (k[0] - 1) - 1) // s[0] + 1, (W - dil[1] * (k[1] - 1) - 1) // s[1] + 1
    st = x.stride()
    view = x.as_strided((B, C, k[0], k[1], Ho, Wo),
                        (st[0], st[1], st[2] * dil[0], st[3] * dil[1], st[2] * s[0], st[3] * s[1]))
    return view.reshape(B, C * k[0] * k[1], Ho * Wo)


@register(nn.Conv1d, nn.Conv2d)
def conv(module: nn.Conv1d | nn.Conv2d, layer: str, calls: list[Call], names: dict[str, str]) -> list[Factor]:
    G = module.groups
    B, d = calls[0].deltas[0].shape[:2]
    n = module.out_channels // G
    a_parts, d_parts = [], []
    for c in calls:
        p = _patches(module, c.batched_input())  # [B, G*m, T]
        a_parts.append(p.reshape(B, G, -1, p.shape[-1]).transpose(2, 3))
        d_parts.append(c.deltas[0].reshape(B, d, G, n, -1).transpose(3, 4))
    a = a_parts[0] if len(a_parts) == 1 else torch.cat(a_parts, dim=2)
    delta = d_parts[0] if len(d_parts) == 1 else torch.cat(d_parts, dim=3)
    return [outer(layer, module, a, delta, names)]
