"""Affine parameters of normalisation layers: gamma gets sum(delta * x_hat), beta gets sum(delta).

x_hat is recomputed from the captured input with the layer's own statistics (running statistics for
BatchNorm in eval mode, per-sample statistics for LayerNorm, GroupNorm and RMSNorm), so samples stay
independent. Subclasses with their own forward (timm, Hugging Face) and RMSNorm variants matched by name
(``LlamaRMSNorm``, ``T5LayerNorm``, ...: weight * x / rms(x), or (1 + weight) * ...) get the same rule
tentatively: it is kept where the numerical verification agrees.

LayerNorm subclasses that normalise the channel axis 1 of [B, C, *spatial] (Hugging Face ConvNeXt, ConvNeXt V2,
SAM, SegGPT, ...: ``data_format="channels_first"``, which permute to channels-last around ``F.layer_norm``;
SqueezeBERT's NCW LayerNorm, found from the input's shape) get per-channel statistics and parameters. A
subclass whose parameters cover more trailing axes than its statistics (Chameleon's per-head LayerNorm: weight
[heads, head_dim], statistics over head_dim) gets the parameters over ``weight.dim()`` axes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...factors import Dense, Factor
from . import Call, register, register_match


def _rms_eps(module: nn.Module, x: Tensor) -> float:
    eps = getattr(module, "eps", getattr(module, "variance_epsilon", None))
    return torch.finfo(x.dtype).eps if eps is None else float(eps)


def _rms_normalized(module: nn.Module, x: Tensor, trailing: int, out: object = None) -> Tensor:
    """x / rms(x) over the trailing axes. Hugging Face's RMSNorms compute in float32 whatever the model's dtype:
    all of it (Llama, Qwen2, Mistral: ``x.to(float32)``, then back) or the statistics only (T5: float32 variance,
    promoted in the product). In a float64 (or half) model that rounding is part of the model's own gradient, so
    there the candidates are computed and the one that reproduces the module's output ``out`` (weight * x_hat or
    (1 + weight) * x_hat) is kept (the model's own precision where none does better)."""
    dims = tuple(range(-trailing, 0))

    def xhat(z: Tensor, stats: Tensor) -> Tensor:
        return (z * torch.rsqrt(stats.pow(2).mean(dims, keepdim=True) + _rms_eps(module, stats))).to(x.dtype)

    own = xhat(x, x)
    if x.dtype == torch.float32 or not isinstance(out, Tensor) or out.shape != x.shape or out.dtype != x.dtype:
        return own
    x32 = x.to(torch.float32)
    w = module.weight.detach().to(x.dtype)

    def mismatch(h: Tensor) -> float:
        return min(float((out - w * h).abs().max()), float((out - (1 + w) * h).abs().max()))

    candidates = [own, xhat(x32, x32), xhat(x, x32)]
    errors = [mismatch(h) for h in candidates]
    return candidates[min(range(len(candidates)), key=errors.__getitem__)]  # the first of equals: own


def _channels_first(module: nn.LayerNorm, x: Tensor) -> bool:
    """Whether a LayerNorm subclass with its own forward normalises the channel axis 1 of x: it says so
    (``data_format``), or its one normalised axis fits axis 1 of x and not the last one (SqueezeBERT's NCW).
    A guess only where the module does not say it: the verification against autograd decides."""
    if type(module).forward is nn.LayerNorm.forward or len(module.normalized_shape) != 1 or x.dim() < 3:
        return False
    fmt = getattr(module, "data_format", None)
    if isinstance(fmt, str):
        return fmt == "channels_first"
    n = module.normalized_shape[0]
    return x.shape[1] == n and x.shape[-1] != n


def _normalized(module: nn.Module, x: Tensor, out: object = None) -> tuple[Tensor, int]:
    """x_hat and the number of trailing axes that carry the parameters (0: the channel axis 1); ``out``: the
    module's output, if captured (RMSNorm: which precision x_hat was computed in)."""
    if isinstance(module, nn.LayerNorm):
        if _channels_first(module, x):
            return F.layer_norm(x.movedim(1, -1), module.normalized_shape, None, None, module.eps).movedim(-1, 1), 0
        trailing = module.weight.dim() if module.weight is not None else len(module.normalized_shape)
        return F.layer_norm(x, module.normalized_shape, None, None, module.eps), trailing
    if isinstance(module, nn.GroupNorm):
        return F.group_norm(x, module.num_groups, None, None, module.eps), 0
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return F.batch_norm(x, module.running_mean, module.running_var, None, None, False, 0.0, module.eps), 0
    trailing = module.weight.dim()  # RMSNorm: the weight covers the normalised trailing axes
    return _rms_normalized(module, x, trailing, out), trailing


_RMS = getattr(nn, "RMSNorm", None)  # torch >= 2.4


@register(nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, *([_RMS] if _RMS else []))
def norm(module: nn.Module, layer: str, calls: list[Call], names: dict[str, str]) -> list[Factor]:
    B, d = calls[0].deltas[0].shape[:2]
    parts: dict[str, Tensor] = {}
    for c in calls:
        x = c.batched_input()
        # The hook already detached x unless the factors must stay in the autograd graph.
        xhat, trailing = _normalized(module, x, c.output)
        delta = c.deltas[0]
        if tuple(delta.shape[2:]) != tuple(x.shape[1:]):
            raise ValueError(f"output signals {tuple(delta.shape)} do not match the input {tuple(x.shape)}")
        if trailing:  # LayerNorm / RMSNorm: parameters over the trailing axes, sum over the rest
            n = xhat[0].shape[-trailing:].numel()
            dv, xv = delta.reshape(B, d, -1, n), xhat.reshape(B, 1, -1, n).to(delta.dtype)
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


def _is_rms_like(module: nn.Module) -> bool:
    """Hugging Face / timm RMSNorm classes: a name saying so, one weight, no bias, an epsilon."""
    name = type(module).__name__
    params = dict(module.named_parameters(recurse=False))
    return (("RMSNorm" in name or name == "T5LayerNorm") and set(params) == {"weight"}
            and any(hasattr(module, a) for a in ("eps", "variance_epsilon")))


register_match(_is_rms_like)(norm)
