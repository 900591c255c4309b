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
    """Selected parameters by name, in registration order (the fixed order of docs/method.md, "Analysed outputs
    and parameters").

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
    if isinstance(model, torch.fx.GraphModule):
        _check_exported_eval_mode(model)
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
        _eval(model)
        for p in params.values():
            p.requires_grad_(True)
        with torch.enable_grad():
            yield
    finally:
        for m, training in modes:
            m.training = training
        for p, flag in flags:
            p.requires_grad_(flag)


def _eval(model: nn.Module) -> None:
    """``model.eval()``, also for a ``torch.export`` program's ``module()``, whose ``eval()`` raises
    NotImplementedError because its graph's mode was fixed at export time: there the flags change nothing, so
    they are set directly, after checking that the graph was exported in eval mode (else dropout / batch
    statistics would be active and the similarity would silently differ from the model's inference)."""
    try:
        model.eval()
    except NotImplementedError:
        if getattr(model, "graph", None) is None:
            raise
        _check_exported_eval_mode(model)
        for m in model.modules():
            m.training = False


def _check_exported_eval_mode(model: nn.Module) -> None:
    """Refuse a graph (a ``torch.export`` program's module) exported in training mode: its dropout or batch
    statistics are fixed in the graph, whatever the module's flags say."""
    for node in model.graph.nodes:  # type: ignore[union-attr]
        if node.op != "call_function":
            continue
        op = str(node.target)
        if ("dropout" in op and len(node.args) > 2 and node.args[2] is True) or (
                "batch_norm" in op and "no_training" not in op and len(node.args) > 5 and node.args[5] is True):
            raise ModelError(f"the torch.export program was exported in training mode ({op} with training=True): "
                             "call model.eval() before torch.export.export and export it again")


def input_failure(err: Exception, batch: tuple, name: str, dtype: torch.dtype) -> InputError:
    """The :class:`InputError` for a model that failed on its first inputs: what was passed and the likely fix.

    Integer inputs are not refused up front (they are right for a model that starts with an Embedding); only
    when the model fails on them does the message suggest converting them."""
    shapes = ", ".join(f"{list(t.shape)} ({t.dtype})" for t in batch)
    what = f"{name}: the model failed on inputs of shape {shapes}: {type(err).__name__}: {first_line(err)}"
    hints = []
    if any(not (t.is_floating_point() or t.is_complex()) for t in batch) and dtype.is_floating_point:
        hints.append(f"the inputs are integers but the model's parameters are {dtype}: convert them, e.g. "
                     f"x.to({dtype}) (integer inputs fit only models that start with an Embedding)")
    if any(t.dim() == 1 for t in batch):
        hints.append("a 1-D tensor is read as N samples of one value each (the first axis is always the sample "
                     "axis): pass x[None] for one sample, or x.reshape(N, -1)")
    if len(batch) > 1 and isinstance(err, TypeError):
        hints.append(f"a tuple or list of {len(batch)} tensors is read as the model's {len(batch)} inputs; for a "
                     "list of samples, stack them first: torch.stack(samples)")
    if not hints:
        hints.append("check that each sample has the shape the model expects (the first axis is the sample axis, "
                     "the model gets batches [B, ...]) and the dtype of its parameters")
    return InputError(f"{what}; {'; '.join(hints)}")


def first_line(e: BaseException) -> str:
    """An exception's message in one line of at most 300 characters (its type when the message is empty)."""
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:300]
