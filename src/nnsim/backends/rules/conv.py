"""nn.Conv1d / nn.Conv2d (any stride, dilation, padding mode and groups) via unfolded input patches.

The weight is shared over output positions, so the per-sample gradient is sum_p delta_p patch_p^T
(docs/method.md, "Layer-wise structure"); the Outer factor keeps positions and lets the cost model choose per
layer between the pairwise product over positions and the explicit gradient. Where the cost model prefers the
explicit gradient in both Gram modes, it is built directly by one ``aten.convolution_backward`` with the batch
(and the d outputs) folded into the groups when the layer has many output positions or few channels per group
(grouped): no patches, 1.3-8x faster than patches and a batched GEMM there (slower on few positions and
many channels, which keep the patches). A depthwise convolution (one input channel per group) gets its explicit
gradient from one *forward* convolution instead, at any d (``_depthwise``: 6x faster than the grouped backward).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...factors import Dense, Factor, Outer
from . import SIGNAL_LAYOUTS, Call, outer_or_dense, register


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


# Output positions from which the grouped convolution_backward builds the explicit gradient faster than patches
# and a batched GEMM (1 thread, B = 256, d = 1, 3x3 kernels; docs/benchmarks.md): 16 -> 16 channels on 32x32
# 0.05 s vs 0.33 s, 64 -> 64 on 16x16 0.38 vs 0.49; but 64 -> 64 on 8x8 0.31 vs 0.20, 128 -> 128 on 4x4 0.97 vs
# 0.34 (many channels, few positions: its grouped kernel is slow). Few channels per group are fast at any
# size: depthwise 7x7 on 8x8 (32 channels) 0.09 s vs 0.75 s, 16 -> 64 on 8x8 0.017 vs 0.019.
_BACKWARD_MIN_POSITIONS = 128
_BACKWARD_MAX_PAIRS = 2048  # (input, output) channel pairs per group
# ... and at most this many kernel taps on few positions: a ViT's 8x8 / stride 8 patch embedding 3 -> 64 on 32x32
# (16 positions) took 0.025 s by the grouped backward against 0.007 s by patches and a batched GEMM (B = 256);
# 4x4 kernels were even (0.005 s both), 3x3 ones faster by the grouped backward.
_BACKWARD_MAX_TAPS = 16
# With d outputs folded into the groups too it is slower than patches at d = 10 (B = 64: depthwise 7x7 on 8x8
# 0.54 s vs 0.15 s, 16 -> 16 on 32x32 0.67 vs 0.34, 64 -> 64 on 16x16 2.25 vs 0.98): d = 1 only.
_BACKWARD_MAX_D = 1


def _explicit_preferred(module: nn.Conv1d | nn.Conv2d, calls: list[Call], names: dict[str, str]) -> bool:
    """Whether the cost model would materialise this layer's gradient in both Gram modes (asked with a
    shape-only stand-in for the patches, which are then never built)."""
    delta = calls[0].deltas[0]
    B, d = delta.shape[:2]
    G = module.groups
    T = sum(c.deltas[0][0, 0, 0].numel() for c in calls)
    m = (module.in_channels // G) * math.prod(module.kernel_size) + ("bias" in names and module.bias is not None)
    stub = Outer("", delta.new_zeros(()).expand(B, G, T, m), delta.new_zeros(()).expand(B, d, G, T,
                                                                                       module.out_channels // G),
                 None)
    return stub.prefers_dense("trace") and stub.prefers_dense("full")


def _dense(module: nn.Conv1d | nn.Conv2d, layer: str, calls: list[Call], names: dict[str, str]) -> list[Factor]:
    """Per-sample gradients [B, d, n] by one convolution_backward per call, batch and outputs as groups."""
    B, d = calls[0].deltas[0].shape[:2]
    G, C_in, C_out = module.groups, module.in_channels, module.out_channels
    gw = gb = None
    for c in calls:
        x = c.batched_input()
        padding = module.padding
        if module.padding_mode != "zeros" or isinstance(padding, str):
            mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
            x = F.pad(x, module._reversed_padding_repeated_twice, mode=mode)
            padding = (0,) * (x.dim() - 2)
        delta = c.deltas[0]  # [B, d, C_out, *out_spatial]
        if "weight" in names:
            xi = x[:, None].expand(B, d, *x.shape[1:]).reshape(1, B * d * C_in, *x.shape[2:])
            go = delta.reshape(1, B * d * C_out, *delta.shape[3:])
            w = x.new_zeros(()).expand(B * d * C_out, *module.weight.shape[1:])  # shape only
            _, g, _ = torch.ops.aten.convolution_backward(
                go, xi, w, None, module.stride, padding, module.dilation, False, [0] * (x.dim() - 2), B * d * G,
                [False, True, False])
            g = g.reshape(B, d, -1)
            gw = g if gw is None else gw + g
        if "bias" in names and module.bias is not None:
            g = delta.flatten(3).sum(3)
            gb = g if gb is None else gb + g
    return _explicit(module, layer, names, gw, gb)


def _explicit(module: nn.Conv1d | nn.Conv2d, layer: str, names: dict[str, str], gw: Tensor | None,
              gb: Tensor | None) -> list[Factor]:
    """Explicit per-sample weight and bias gradients [B, d, n] (None: not analysed) as Dense factors."""
    out: list[Factor] = []
    if gw is not None:
        out.append(Dense(layer, gw, [(names["weight"], module.weight.shape)]))
    if gb is not None:
        out.append(Dense(layer, gb, [(names["bias"], module.bias.shape)]))
    return out


def _padded(module: nn.Conv1d | nn.Conv2d, x: Tensor) -> Tensor:
    """The input as the convolution sees it: padded (any padding mode, numeric or string padding)."""
    if module.padding_mode != "zeros" or isinstance(module.padding, str):
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        return F.pad(x, module._reversed_padding_repeated_twice, mode=mode)
    pad = [q for p in reversed(module.padding) for q in (p, p)]
    return F.pad(x, pad) if any(pad) else x


def _depthwise(module: nn.Conv1d | nn.Conv2d, layer: str, calls: list[Call], names: dict[str, str]) -> list[Factor]:
    """Per-sample gradients [B, d, n] of a convolution with one input channel per group (depthwise, any channel
    multiplier), as one *forward* convolution per call: the padded input [1, B G, *spatial] correlated with the
    signals [B G d n', 1, *out_spatial] as kernels (B G groups; the layer's stride becomes the dilation and its
    dilation the stride), i.e. dW[b, g n' + r, 0, k] = sum_p delta[b, g n' + r, p] x_pad[b, g, p stride + k dil].
    Depthwise 7x7 on 8x8, 32 channels, B = 256, d = 1: 0.005 s against 0.031 s for the grouped
    convolution_backward (whose grouped kernel is slow with one channel per group) and 0.75 s for patches."""
    B, d = calls[0].deltas[0].shape[:2]
    G, n = module.groups, module.out_channels // module.groups
    conv_nd = F.conv2d if isinstance(module, nn.Conv2d) else F.conv1d
    kernel = tuple(module.kernel_size)
    gw = gb = None
    for c in calls:
        x = _padded(module, c.batched_input())  # [B, G, *padded]
        delta = c.deltas[0]  # [B, d, G n, *out_spatial]
        if "weight" in names:
            spatial = delta.shape[3:]
            kern = delta.reshape(B, d, G, n, *spatial).transpose(1, 2).reshape(B * G * d * n, 1, *spatial)
            g = conv_nd(x.reshape(1, B * G, *x.shape[2:]), kern, None, module.dilation, 0, module.stride, B * G)
            g = g[(0, slice(None), *(slice(0, k) for k in kernel))]  # [B G d n, *kernel]
            g = g.reshape(B, G, d, n, -1).transpose(1, 2).reshape(B, d, -1)
            gw = g if gw is None else gw + g
        if "bias" in names and module.bias is not None:
            g = delta.flatten(3).sum(3)
            gb = g if gb is None else gb + g
    return _explicit(module, layer, names, gw, gb)


@register(nn.Conv1d, nn.Conv2d)
def conv(module: nn.Conv1d | nn.Conv2d, layer: str, calls: list[Call], names: dict[str, str]) -> list[Factor]:
    G = module.groups
    B, d = calls[0].deltas[0].shape[:2]
    n = module.out_channels // G
    if module.in_channels == G and not calls[0].graph and _explicit_preferred(module, calls, names):
        return _depthwise(module, layer, calls, names)  # at every d (convnext-like d = 10, N = 64: 0.70 -> 0.66 s)
    positions = calls[0].deltas[0][0, 0, 0].numel()
    pairs = (module.in_channels // G) * n  # (input, output) channel pairs per group
    taps = math.prod(module.kernel_size)
    fast = d <= _BACKWARD_MAX_D and (positions >= _BACKWARD_MIN_POSITIONS
                                     or (pairs <= _BACKWARD_MAX_PAIRS and taps <= _BACKWARD_MAX_TAPS))
    if not calls[0].graph and fast and _explicit_preferred(module, calls, names):
        return _dense(module, layer, calls, names)
    a_parts, d_parts = [], []
    for c in calls:
        p = _patches(module, c.batched_input())  # [B, G*m, T]
        a_parts.append(p.reshape(B, G, -1, p.shape[-1]).transpose(2, 3))
        d_parts.append(c.deltas[0].reshape(B, d, G, n, -1).transpose(3, 4))
    a = a_parts[0] if len(a_parts) == 1 else torch.cat(a_parts, dim=2)
    delta = d_parts[0] if len(d_parts) == 1 else torch.cat(d_parts, dim=3)
    return outer_or_dense(layer, module, a, delta, names, graph=calls[0].graph)


def _signal_layout(module: nn.Conv1d | nn.Conv2d, ndim: int) -> tuple[int, ...] | None:
    """How the signals [B, d, C_out, *out_spatial] are stored for the products that read them: ungrouped, as
    [B, *out_spatial, d, C_out] (the patches' product reads [B, T, d C_out]: a view); depthwise, as
    [B, C_out, d, *out_spatial] (``_depthwise``'s kernels [B G d n', 1, *out_spatial]: a view for n' = 1)."""
    if module.groups == 1:
        return (0, *range(3, ndim), 1, 2)
    if module.in_channels == module.groups:
        return (0, 2, 1, *range(3, ndim))
    return None


SIGNAL_LAYOUTS[conv] = _signal_layout
