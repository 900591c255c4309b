"""The reference oracle: one sample and one output at a time, plain ``torch.autograd.grad``."""

from __future__ import annotations

import torch
from torch import Tensor

from ..factors import Factor
from .base import Problem, checked_output, dense_by_layer


def factors(problem: Problem, batch: tuple[Tensor, ...], start: int = 0) -> tuple[list[Factor], Tensor]:
    names = list(problem.params)
    tensors = list(problem.params.values())
    per_param: dict[str, list[Tensor]] = {n: [] for n in names}
    ys = []
    for b in range(batch[0].shape[0]):
        xb = tuple(t[b : b + 1] for t in batch)
        y = checked_output(problem, problem.model(*xb), xb, start + b)
        ys.append(y.detach())
        cols: list[list[Tensor]] = [[] for _ in names]
        for c in range(y.shape[1]):
            grads = torch.autograd.grad(y[0, c], tensors, retain_graph=True, allow_unused=True)
            for k, (g, p) in enumerate(zip(grads, tensors, strict=False)):
                cols[k].append(torch.zeros_like(p) if g is None else g)
        for k, n in enumerate(names):
            per_param[n].append(torch.stack(cols[k]))
    grads = {n: torch.stack(v) for n, v in per_param.items()}
    return dense_by_layer(problem, grads), torch.cat(ys)
