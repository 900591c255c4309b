"""Verified plans of the structured backend, kept per model object across :class:`nnsim.Similarity` instances.

Planning a model (which rule handles which module, the batch axes of every call, the free-parameter uses, the
verification against autograd) takes several model calls on probe samples: on small transformers it is a large
share of one computation. A plan is a function of the model's structure, the analysed parameters, the output
spec, the rules registered and the input signature, so it is kept for the model object under a key made of
all of these (module objects, types and instance ``forward`` overrides, hooks, simple attributes; parameter
identities, shapes, dtypes and devices; the output callable's code and captured values; the rules; the input
shapes). A plan found here is never trusted as it is: the backend checks it on the first batch of every new
``Similarity`` with the same verification as planning (per-sample gradients against autograd on the first
samples, run one by one), and plans afresh when it disagrees or fails. Only plans that were verified are kept;
nothing of the model is kept alive (the plan is stored with module names, bound to the modules on load, and
the store holds the model weakly).
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import Any

from torch import nn
from torch.nn.modules import module as _module

from .base import Problem
from .rules import MATCHERS, RULES

_STORE: weakref.WeakKeyDictionary[nn.Module, dict[tuple, Any]] = weakref.WeakKeyDictionary()
# Measured chunk sizing (factor bytes per sample, d) per model, kept by the engine (engine/chunks.py) next to the
# plans whose factors it measured: forgotten with a plan that failed its check, whose successor may differ.
SIZES: weakref.WeakKeyDictionary[nn.Module, dict[tuple, tuple[int, int | None]]] = weakref.WeakKeyDictionary()
_MAX_PER_MODEL = 16  # plans per model (input signatures x output specs); the oldest is dropped beyond it
_SIMPLE = (bool, int, float, str, type(None))


def key(problem: Problem, signature: tuple) -> tuple | None:
    """What a plan of ``problem`` for inputs of ``signature`` depends on; None: not cacheable."""
    try:
        return (_model_key(problem.model), tuple((n, id(p)) for n, p in problem.params.items()),
                _callable_key(problem.output), tuple(RULES.items()), tuple(MATCHERS), signature,
                len(_module._global_forward_hooks), len(_module._global_forward_pre_hooks))
    except Exception:  # noqa: BLE001  (an unusual model or output: plan afresh, as without a cache)
        return None


def load(model: nn.Module, k: tuple | None) -> Any | None:
    """A copy of the plan stored under ``k``, bound to ``model``'s modules (None: nothing stored)."""
    try:
        stored = None if k is None else _STORE.get(model, {}).get(k)
    except TypeError:  # not weakly referenceable: nothing is kept for it
        return None
    if stored is None:
        return None
    modules = dict(model.named_modules())
    return _rebind(stored, lambda name: modules[name])


def store(model: nn.Module, k: tuple | None, plan: Any) -> None:
    """Keep a verified plan (a copy with module names instead of modules)."""
    if k is None:
        return
    try:
        plans = _STORE.setdefault(model, {})
    except TypeError:  # not weakly referenceable
        return
    names = {m: n for n, m in model.named_modules()}
    plans[k] = _rebind(plan, names.__getitem__)
    while len(plans) > _MAX_PER_MODEL:
        plans.pop(next(iter(plans)))


def drop(model: nn.Module, k: tuple | None) -> None:
    """Forget the plan under ``k`` (it failed its check on a new batch), and the chunk sizing measured under it."""
    if k is not None and model in _STORE and _STORE[model].pop(k, None) is not None:
        SIZES.pop(model, None)


def _rebind(plan: Any, to: Any) -> Any:
    """A copy of ``plan`` with every module key ``m`` replaced by ``to(m)`` (entries copied: they are mutable)."""
    return dataclasses.replace(
        plan,
        hooked={to(m): dataclasses.replace(e, suspects=set(e.suspects)) for m, e in plan.hooked.items()},
        batched={to(m): v for m, v in plan.batched.items()},
        free_ops={to(m): v for m, v in plan.free_ops.items()},
        tied=set(plan.tied), residual=list(plan.residual), notes=list(plan.notes))


def _model_key(model: nn.Module) -> tuple:
    out = []
    for name, m in model.named_modules():
        simple = tuple((k, v) for k, v in vars(m).items()
                       if not k.startswith("_") and isinstance(v, _SIMPLE + (tuple,)) and _hashable(v))
        out.append((name, id(m), type(m), vars(m).get("forward"), tuple(m._forward_hooks), tuple(m._forward_pre_hooks),
                    tuple((k, None if p is None else (id(p), p.shape, p.dtype, p.device))
                          for k, p in m._parameters.items()),
                    tuple((k, None if b is None else (b.shape, b.dtype, b.device)) for k, b in m._buffers.items()),
                    simple))
    return tuple(out)


def _hashable(v: object) -> bool:
    try:
        hash(v)
    except TypeError:
        return False
    return not isinstance(v, tuple) or all(isinstance(x, _SIMPLE) for x in v)


def _callable_key(fn: object) -> tuple:
    """A function's code, captured values (by identity), defaults and bound object: equal keys, same function."""
    code = getattr(fn, "__code__", None)
    if code is None:
        raise TypeError("not a plain function")
    cells = tuple(id(c.cell_contents) for c in (getattr(fn, "__closure__", None) or ()))
    return (code, cells, id(getattr(fn, "__defaults__", None)), id(getattr(fn, "__kwdefaults__", None)),
            id(getattr(fn, "__self__", None)), id(getattr(fn, "__globals__", None)))



