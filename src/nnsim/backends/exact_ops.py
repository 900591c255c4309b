"""Operations whose fused kernels torch.func differentiates wrongly a second time, replaced by their
decompositions where a vmapped per-sample gradient must stay differentiable (the training criterion's graph).

torch 2.13: the gradient, with respect to parameters before the norm, of per-sample parameter gradients taken
by ``vmap(jacrev(...))`` through ``F.layer_norm`` is 37 % off (finite differences and per-sample autograd agree
with each other; group_norm, batch_norm, rms_norm, softmax, SDPA, GELU are right; upstream: the batching rule of
layer_norm's backward, pytorch/functorch#534, and its nested forward-mode derivative, pytorch/pytorch#196700).
The decomposition below is the same function to rounding and its second derivatives are right. Used only while
such a graph is built: the first-order paths (every similarity) keep the fused kernel."""

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


_DECOMPOSED = {F.layer_norm: _layer_norm, torch.layer_norm: _layer_norm}


class _Decomposed(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        return _DECOMPOSED.get(func, func)(*args, **(kwargs or {}))


@contextlib.contextmanager
def exact_double_backward(graph: bool) -> Iterator[None]:
    """With ``graph``: the operations above run decomposed inside the block; without: nothing changes."""
    if not graph:
        yield
        return
    with _Decomposed():
        yield
