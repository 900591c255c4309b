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
while such a graph is built: the first-order paths (every similarity) keep the fused kernels."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

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


_DECOMPOSED = {F.layer_norm: _layer_norm, torch.layer_norm: _layer_norm, torch._weight_norm: _weight_norm}


class _Decomposed(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        return _DECOMPOSED.get(func, func)(*args, **(kwargs or {}))


@contextlib.contextmanager
def exact_double_backward() -> Iterator[None]:
    """The operations above run decomposed inside the block."""
    with _Decomposed():
        yield
