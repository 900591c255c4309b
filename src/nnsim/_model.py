"""Resolving parameter selections and running a user's model without leaving a trace on it."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .errors import InputError, ModelError

ParamSelection = None | str | nn.Module | Iterable[str | nn.Module]


def select_params(model: nn.Module, params: ParamSelection) -> dict[str, nn.Parameter]:
    """Selected parameters by name, in registration order (the fixed order of spec §8.2).

    ``None`` selects every parameter with ``requires_grad``; otherwise names, glob patterns (``"fc*.weight"``)
    or submodules, alone or in a list. Tied parameters appear once, under their first name.
    """
    named = dict(model.named_parameters())
    if params is None:
        chosen = {n for n, p in named.items() if p.requires_grad}
        if not chosen:
            raise InputError("no parameter requires grad: pass params=... to choose which ones to analyse")
    else:
        items = [params] if isinstance(params, (str, nn.Module)) else list(params)
        by_id = {id(p): n for n, p in named.items()}
        chosen = set()
        for item in items:
            if isinstance(item, nn.Module):
                found = {by_id[id(p)] for p in item.parameters() if id(p) in by_id}
                if not found:
                    raise InputError(f"the module {type(item).__name__} passed in params has no parameter of the model")
            elif isinstance(item, str):
                found = set(fnmatch.filter(named, item)) if any(ch in item for ch in "*?[") else (
                    {item} if item in named else set())
                if not found:
                    hint = ", ".join(list(named)[:12]) + (", ..." if len(named) > 12 else "")
                    raise InputError(f"unknown parameter name or pattern {item!r}; the model has: {hint}")
            else:
                raise InputError(f"params entries must be names, glob patterns or modules, got {type(item).__name__}")
            chosen |= found
    if not chosen:
        raise InputError("no parameter selected")
    return {n: p for n, p in named.items() if n in chosen}


def layer_of(param_name: str) -> str:
    """The owning module's name of a parameter ('' for the root module's own parameters)."""
    return param_name.rpartition(".")[0]


def check_model(model: nn.Module) -> None:
    if not isinstance(model, nn.Module):
        raise ModelError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not m.track_running_stats:
            raise ModelError(
                f"{name or 'model'} is a BatchNorm without running statistics: it normalises with batch "
                "statistics even in eval mode, which couples the samples of a batch, so per-sample "
                "similarity is undefined. Use track_running_stats=True (and train it) or another norm."
            )
        if isinstance(m, nn.Embedding) and m.max_norm is not None:
            raise ModelError(f"{name or 'model'} is an Embedding with max_norm: its forward rewrites the weights "
                             "in place, which would change your model. Renormalise once and set max_norm=None.")


@contextmanager
def analysis_mode(model: nn.Module, params: dict[str, nn.Parameter]) -> Iterator[None]:
    """Eval-mode semantics and gradients enabled on the selected parameters, all restored on exit.

    The model's modes, ``requires_grad`` flags and ``.grad`` fields come back as they were: nnsim only
    ever uses ``torch.autograd.grad`` / ``torch.func`` and never accumulates into ``.grad``.
    """
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in params.values()]
    try:
        model.eval()
        for p in params.values():
            p.requires_grad_(True)
        with torch.enable_grad():
            yield
    finally:
        for m, training in modes:
            m.training = training
        for p, flag in flags:
            p.requires_grad_(flag)
