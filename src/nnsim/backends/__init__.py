"""Backends compute, for a chunk of inputs, the gradient factors of the analysed outputs.

* ``loop``: per-sample autograd, the reference oracle;
* ``functorch``: ``torch.func`` vmap of jacrev, for any vmap-able model;
* ``structured``: layer inputs and output signals from one pass, exact per-layer rules.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from ..factors import Factor
from . import functorch, loop
from .base import Problem
from .structured import Structured

FactorFn = Callable[[tuple[Tensor, ...], int], tuple[list[Factor], Tensor]]
BACKENDS = ("auto", "loop", "functorch", "structured")


def make(name: str, problem: Problem) -> FactorFn:
    if name == "loop":
        return lambda batch, start: loop.factors(problem, batch, start)
    if name == "functorch":
        return lambda batch, start: functorch.factors(problem, batch, start)
    if name in ("structured", "auto"):
        # auto: the structured pass is exact for every module (rules, per-module fallback, verified
        # planning) and the fastest path the benchmarks measured, so it is the default.
        return Structured(problem).factors
    raise ValueError(f"unknown backend {name!r}; choose one of {BACKENDS}")
