"""The reference oracle: one sample and one output at a time, plain ``torch.autograd.grad``."""

from __future__ import annotations

import torch
from torch import Tensor

from ..factors import Factor
from .base import Problem, checked_output, dense_by_layer


def jacobians(problem: Problem, batch: tuple[Tensor, ...], names: list[str] | None = None, start: int = 0,
              graph: bool = False) -> tuple[dict[str, Tensor], Tensor]:
    """Per-sample Jacobians {name: [B, d, *shape]} of the selected (or the given) parameters, and y [B, d]."""
    names = list(problem.params) if names is None else names
    tensors = [problem.params[n] for n in names]
    per_param: dict[str, list[Tensor]] = {n: [] for n in names}
    ys = []
    for b in range(batch[0].shape[0]):
        xb = tuple(t[b : b + 1] for t in batch)
        y = checked_output(problem, problem.call(xb), xb, start + b)
        ys.append(y if graph else y.detach())
        cols: list[list[Tensor]] = [[] for _ in names]
        for c in range(y.shape[1]):
            grads = torch.autograd.grad(y[0, c], tensors, retain_graph=True, allow_unused=True, create_graph=graph)
            for k, (g, p) in enumerate(zip(grads, tensors, strict=True)):
                cols[k].append(torch.zeros_like(p) if g is None else g)
        for k, n in enumerate(names):
            per_param[n].append(torch.stack(cols[k]))
    return {n: torch.stack(v) for n, v in per_param.items()}, torch.cat(ys)


def factors(problem: Problem, batch: tuple[Tensor, ...], start: int = 0) -> tuple[list[Factor], Tensor]:
    grads, y = jacobians(problem, batch, start=start)
    return dense_by_layer(problem, grads), y
