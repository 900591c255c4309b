"""Vectorised per-sample Jacobians with ``torch.func`` (vmap over samples of jacrev), chunked."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.func import functional_call, jacrev, vmap

from ..factors import Factor
from .base import Problem, check_finite_output, checked_output, dense_by_layer
from .exact_ops import exact_vmap_graph


def jacobians(
    problem: Problem, batch: tuple[Tensor, ...], names: list[str] | None = None, chunk_size: int | None = None,
    graph: bool = False,
) -> tuple[dict[str, Tensor], Tensor]:
    """Per-sample Jacobians {name: [B, d, *shape]} of the selected (or the given) parameters, and y [B, d].

    ``graph=True``: the Jacobians stay differentiable with respect to the parameters (and the inputs).
    """
    names = list(problem.params) if names is None else names
    if graph:
        with torch.enable_grad(), exact_vmap_graph(graph):
            return _jacobians(problem, batch, {n: problem.params[n] for n in names}, chunk_size)
    # Detached copies: torch.func differentiates with respect to these, the model's own stay untouched.
    p0 = {n: problem.params[n].detach() for n in names}

    # no_grad only keeps the results from recording a graph through the parameters that are not
    # differentiated here (torch.func ignores an outer no_grad for its own transforms).
    with torch.no_grad():
        return _jacobians(problem, batch, p0, chunk_size)


def _jacobians(
    problem: Problem, batch: tuple[Tensor, ...], p0: dict[str, Tensor], chunk_size: int | None
) -> tuple[dict[str, Tensor], Tensor]:
    def f(p: dict[str, Tensor], *xs: Tensor) -> tuple[Tensor, Tensor]:
        xs1 = tuple(x.unsqueeze(0) for x in xs)
        args, kwargs = (xs1, None) if problem.keys is None else ((), problem.inputs(xs1))
        y = checked_output(problem, functional_call(problem.model, p, args, kwargs, strict=False), xs1,
                           values=False)[0]
        return y, y

    return vmap(jacrev(f, has_aux=True), in_dims=(None,) + (0,) * len(batch), chunk_size=chunk_size)(p0, *batch)


def factors(
    problem: Problem, batch: tuple[Tensor, ...], start: int = 0, graph: bool = False
) -> tuple[list[Factor], Tensor]:
    jac, y = jacobians(problem, batch, graph=graph)
    check_finite_output(y, start)
    return dense_by_layer(problem, jac), y if graph else y.detach()
