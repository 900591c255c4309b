"""Parametrized modules (``torch.nn.utils.parametrize``: ``weight_norm``, ``spectral_norm``, ``orthogonal``, a
user's own): the module's rule on the computed tensor, chained through the parametrization.

A parametrized tensor (``conv.weight``) is computed on access from the parameters of its ``ParametrizationList``
(``conv.parametrizations.weight.original0``, ``original1``, and any parameters of the parametrizations
themselves): W = f(originals), the same function for every sample. So the per-sample gradient of the originals
is the parametrization's VJP of the per-sample gradient of W: g_orig[b, c] = vjp_f(dW[b, c]). The module's own
rule (conv, linear, ...) computes dW [B, d, *W.shape] as if W were a plain parameter; one ``torch.func.vjp`` of f
is then vmapped over the B d rows. Planning gives the ParametrizationList's parameters to the parametrized
module (the list itself is called on every access of W, but it sees no batch), under local names
``parametrizations.<tensor>.<name in the list>`` (those of a never-called child, e.g. MultiheadAttention's
``out_proj``, under ``out_proj.parametrizations...``, for a rule registered with ``children=True``; rules read
computed tensors by attribute, ``rules.tensor``). As every rule, the result is verified against autograd;
a parametrization that torch.func cannot differentiate makes the rule raise, and the module gets its exact
fallback (which differentiates the originals through the module's forward directly); one that vmap cannot batch
is pulled back row by row. The deprecated hook-based ``torch.nn.utils.weight_norm`` (parameters ``weight_g``,
``weight_v`` of the module itself, ``weight`` set by a forward pre-hook) is chained the same way.
"""

from __future__ import annotations

import functools
import warnings
import weakref
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap
from torch.nn.utils import parametrize

from ..._model import layer_of
from ...factors import Dense, Factor
from . import SIGNAL_LAYOUTS, Call, Rule

PREFIX = "parametrizations."
# Parametrization lists whose VJP vmap cannot batch (an operation without a batching rule): their rows are pulled
# back one by one, without trying vmap again on every chunk.
_UNBATCHED: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def is_inside(module: nn.Module) -> set[nn.Module]:
    """Every ParametrizationList in ``module``'s tree and the modules inside them (their parameters belong to the
    parametrized module, which planning hooks instead)."""
    return {sub for m in module.modules() if isinstance(m, parametrize.ParametrizationList) for sub in m.modules()}


def _hook_weight_norms(module: nn.Module) -> dict[str, int]:
    """{tensor: dim} of the deprecated hook-based ``torch.nn.utils.weight_norm`` (parameters ``<tensor>_g`` and
    ``<tensor>_v``; the tensor is set as a plain attribute by a forward pre-hook before every call)."""
    from torch.nn.utils.weight_norm import WeightNorm  # noqa: PLC0415  (deprecated module, imported when used)

    return {h.name: h.dim for h in module._forward_pre_hooks.values() if isinstance(h, WeightNorm)}


def split_names(module: nn.Module, names: dict[str, str]) -> tuple[dict[str, str], dict[str, dict[str, str]]]:
    """{local: full} -> (the module's plain parameters, {computed tensor: {name of a source parameter: full}}):
    a ParametrizationList's parameters by their names in the list, a hook weight norm's as they are."""
    plain: dict[str, str] = {}
    chained: dict[str, dict[str, str]] = {}
    hooked = _hook_weight_norms(module) if module._forward_pre_hooks else {}
    for local, full in names.items():
        head, sep, tail = ("." + local).partition("." + PREFIX)  # a child's too: "out_proj.parametrizations.weight.x"
        if sep:
            tensor, _, rest = tail.partition(".")
            chained.setdefault(f"{head[1:]}.{tensor}".lstrip("."), {})[rest] = full
        elif local[-2:] in ("_g", "_v") and local[:-2] in hooked:
            chained.setdefault(local[:-2], {})[local] = full
        else:
            plain[local] = full
    return plain, chained


def _decomposed_weight_norm(g: Tensor, v: Tensor, dim: int) -> Tensor:
    """torch._weight_norm's formula, decomposed: its fused kernel has no batching rule (vmap would loop)."""
    return v * (g / torch.norm_except_dim(v, 2, dim))


def _source(module: nn.Module, tensor: str) -> tuple[nn.Module, dict[str, Tensor], Callable[..., Tensor]]:
    """(a key for the vmap memo, {name: source parameter}, f(**sources) -> the computed tensor ``tensor``, a local
    name of ``module`` or of a child: ``"weight"``, ``"out_proj.weight"``)."""
    owner, _, tensor = tensor.rpartition(".")
    module = module.get_submodule(owner) if owner else module
    hooked = _hook_weight_norms(module)
    if tensor in hooked:
        dim = hooked[tensor]
        params = {f"{tensor}_g": module.get_parameter(f"{tensor}_g"), f"{tensor}_v": module.get_parameter(
            f"{tensor}_v")}
        return module, params, lambda **t: _decomposed_weight_norm(t[f"{tensor}_g"], t[f"{tensor}_v"], dim)
    if not parametrize.is_parametrized(module, tensor):
        raise ValueError(f"{tensor!r} is not a parametrized tensor of this module")
    plist = module.parametrizations[tensor]
    params = dict(plist.named_parameters())
    first = plist[0]
    if len(plist) == 1 and type(first).__name__ == "_WeightNorm" and set(params) == {"original0", "original1"}:
        return plist, params, lambda **t: _decomposed_weight_norm(t["original0"], t["original1"], first.dim)
    return plist, params, lambda **t: functional_call(plist, t, ())


def _pulled(module: nn.Module, tensor: str, dW: Tensor, graph: bool) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """({source name: per-row gradient [R, *shape]}, the source parameters) of the computed ``tensor`` from its
    per-row gradients dW [R, *shape of the tensor]."""
    key, params, fn = _source(module, tensor)
    names = list(params)
    primals = tuple(params[n] if graph else params[n].detach() for n in names)

    def computed(*tensors: Tensor) -> Tensor:
        return fn(**dict(zip(names, tensors, strict=True)))

    with torch.enable_grad() if graph else torch.no_grad():
        W, pull = vjp(computed, *primals)
        if tuple(W.shape) != tuple(dW.shape[1:]):
            raise ValueError(f"the parametrization computes {tuple(W.shape)}, the rule's gradient is "
                             f"{tuple(dW.shape[1:])}")
        dW = dW.to(W.dtype)
        grads = None
        if key not in _UNBATCHED:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("error")  # vmap's slow per-row fallback: the plain loop below instead
                    grads = vmap(pull)(dW)
            except Exception:  # noqa: BLE001  (an operation without a batching rule)
                _UNBATCHED.add(key)
        if grads is None:  # one VJP per row (exact; 0.1 ms a row for a small conv)
            grads = tuple(torch.stack(z) for z in zip(*(pull(row) for row in dW), strict=True))
    return dict(zip(names, grads, strict=True)), params


@functools.cache
def chained(rule: Rule) -> Rule:
    """``rule`` for a parametrized module: the computed tensors' gradients chained to the originals (one wrapper
    per rule, so that it keys the signal layouts and the plan cache like the rule itself)."""

    def parametrized(module: nn.Module, layer: str, calls: list[Call], names: dict[str, str]) -> list[Factor]:
        plain, wanted = split_names(module, names)
        inner = dict(plain)
        stand_in: dict[str, str] = {}  # the computed tensor's label in the rule's factors -> tensor name
        for tensor in wanted:
            if tensor in plain:
                raise ValueError(f"{tensor!r} is both a parameter and computed")
            label = f"{layer}.{tensor} (parametrized)"
            inner[tensor], stand_in[label] = label, tensor
        factors = rule(module, layer, calls, inner)
        out: list[Factor] = []
        computed: dict[str, Tensor] = {}
        for f in factors:
            if not any(n in stand_in for n, _ in f.params):
                out.append(f)
                continue
            dense = f.dense()
            B, d = dense.g.shape[:2]
            start, keep, specs = 0, [], []
            for name, shape in dense.params:
                piece = dense.g[:, :, start : start + shape.numel()]
                start += shape.numel()
                if name in stand_in:
                    computed[stand_in[name]] = computed.get(stand_in[name], 0) + piece.reshape(B, d, *shape)
                else:
                    keep.append(piece)
                    specs.append((name, shape))
            if keep:
                out.append(Dense(dense.layer, torch.cat(keep, dim=2), specs))
        graph = bool(calls) and calls[0].graph
        for tensor, full_of in wanted.items():
            if tensor not in computed:
                raise ValueError(f"the rule returned no gradient for the parametrized {tensor!r}")
            dW = computed[tensor]
            B, d = dW.shape[:2]
            grads, sources = _pulled(module, tensor, dW.reshape(B * d, *dW.shape[2:]), graph)
            by_layer: dict[str, list[str]] = {}  # one factor per owning module, as the fallback and loop name them
            for rest, full in full_of.items():
                by_layer.setdefault(layer_of(full), []).append(rest)
            for owner, rests in by_layer.items():
                g = torch.cat([grads[r].reshape(B, d, -1) for r in rests], dim=2)
                out.append(Dense(owner, g, [(full_of[r], sources[r].shape) for r in rests]))
        return out

    parametrized.__name__ = f"{getattr(rule, '__name__', 'rule')} (parametrized)"
    if rule in SIGNAL_LAYOUTS:  # the signals are the inner rule's: stored as it reads them
        SIGNAL_LAYOUTS[parametrized] = SIGNAL_LAYOUTS[rule]
    return parametrized
