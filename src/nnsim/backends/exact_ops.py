"""Operations whose fused kernels are differentiated wrongly a second time, replaced by their decompositions
while per-sample gradients must stay differentiable (the training criterion's graph, :class:`nnsim.SimilarityLoss`).

* ``torch._weight_norm`` (``nn.utils.parametrizations.weight_norm`` and the older ``nn.utils.weight_norm``): its
  double backward fails ``gradgradcheck`` on the CPU (torch 2.13), in plain autograd as under ``torch.func``.
* ``F.layer_norm`` under ``torch.func``: the gradient, with respect to parameters before the norm, of per-sample
  parameter gradients taken by ``vmap(jacrev(...))`` is 37 % off on torch 2.13 (finite differences and per-sample
  autograd agree with each other; group_norm, batch_norm, rms_norm, softmax, SDPA and GELU are right; upstream:
  the batching rule of layer_norm's backward, pytorch/functorch#534, and its nested forward-mode derivative,
  pytorch/pytorch#196700).

The decompositions below are the same functions to rounding and their second derivatives are right. Used only
while such a graph is built, and only where the bug is: layer norm inside the graph-mode vmaps
(:func:`exact_vmap_graph`: the functorch backend's and the per-module fallback's), weight norm around the
criterion's factors of a model that uses it (:func:`exact_weight_norm`). The first-order paths (every
similarity) keep the fused kernels, but for one:

* ``F.batch_norm`` with running statistics (eval mode) on a batch of one sample: its backward is wrong (100 %
  off, for the weight, bias and input) when the gradient reaching it is not contiguous, e.g. after
  ``h.view(1, C, H * W).permute(0, 2, 1)`` (HF CvT's convolutional projections, LeViT) -- torch 2.13 CPU, float32
  and float64; two samples or more, and ``torch.func.vmap``, are right. Every per-sample autograd pass (the loop
  backend, the structured backend's check and any chunk of one sample) got such models wrong: the loop oracle
  silently (CvT: 3e-5 relative on the kernel), the structured backend could verify no plan. A model called on
  one sample runs it decomposed (:func:`exact_batch_norm`, from :meth:`Problem.call`)."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode


def _layer_norm(x: Tensor, normalized_shape: tuple[int, ...] | list[int] | int, weight: Tensor | None = None,
                bias: Tensor | None = None, eps: float = 1e-5, *_: object, **__: object) -> Tensor:
    n = 1 if isinstance(normalized_shape, int) else len(normalized_shape)
    dims = tuple(range(-n, 0))
    xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x  # the fused kernel accumulates so too
    centred = xf - xf.mean(dims, keepdim=True)
    y = (centred * torch.rsqrt(centred.square().mean(dims, keepdim=True) + eps)).to(x.dtype)
    if weight is not None:
        y = y * weight
    return y if bias is None else y + bias


def _weight_norm(v: Tensor, g: Tensor, dim: int = 0) -> Tensor:
    """v * g / ||v||, the norm over every axis but ``dim`` (all of them for dim = -1), as the fused kernel."""
    others = [i for i in range(v.dim()) if i != dim % v.dim()] if dim != -1 else list(range(v.dim()))
    return v * (g / v.norm(2, others, keepdim=True))


def _batch_norm(x: Tensor, running_mean: Tensor | None, running_var: Tensor | None, weight: Tensor | None = None,
                bias: Tensor | None = None, training: bool = False, momentum: float = 0.1, eps: float = 1e-5) -> Tensor:
    """Eval-mode batch norm of one sample from its running statistics; anything else to the fused kernel."""
    if training or running_mean is None or running_var is None or x.dim() < 2 or x.shape[0] != 1:
        return F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
    shape = [1, -1] + [1] * (x.dim() - 2)
    y = (x - running_mean.view(shape)) * torch.rsqrt(running_var.view(shape) + eps)
    if weight is not None:
        y = y * weight.view(shape)
    return y if bias is None else y + bias.view(shape)


_UNDER_VMAP = {F.layer_norm: _layer_norm, torch.layer_norm: _layer_norm, F.batch_norm: _batch_norm}
_WEIGHT_NORM = {torch._weight_norm: _weight_norm}
_ONE_SAMPLE = {F.batch_norm: _batch_norm}


class _Decomposed(TorchFunctionMode):
    def __init__(self, table: dict) -> None:
        super().__init__()
        self.table = table

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        return self.table.get(func, func)(*args, **(kwargs or {}))


def exact_vmap_graph(graph: bool) -> contextlib.AbstractContextManager:
    """Around a ``torch.func.vmap`` whose per-sample gradients must stay differentiable (``graph``): layer norm
    (and one-sample batch norm) decomposed; without ``graph``, nothing (first-order vmaps are right)."""
    return _Decomposed(_UNDER_VMAP) if graph else contextlib.nullcontext()


def uses_weight_norm(model: torch.nn.Module) -> bool:
    """Whether a module of ``model`` computes a weight with ``torch._weight_norm``: the parametrization of
    ``nn.utils.parametrizations.weight_norm`` or the forward pre-hook of the older ``nn.utils.weight_norm``."""
    from torch.nn.utils.parametrizations import _WeightNorm
    from torch.nn.utils.weight_norm import WeightNorm

    return any(isinstance(m, _WeightNorm) or any(isinstance(h, WeightNorm) for h in m._forward_pre_hooks.values())
               for m in model.modules())


def exact_weight_norm(model: torch.nn.Module) -> contextlib.AbstractContextManager:
    """While per-sample gradients must stay differentiable: ``torch._weight_norm`` decomposed, for a model that
    uses it (the mode costs every operation a Python call, 8-38 % of a criterion step: only where needed)."""
    return _Decomposed(_WEIGHT_NORM) if uses_weight_norm(model) else contextlib.nullcontext()


def exact_batch_norm() -> contextlib.AbstractContextManager:
    """Eval-mode batch norm of one sample runs decomposed inside the block."""
    return _Decomposed(_ONE_SAMPLE)
