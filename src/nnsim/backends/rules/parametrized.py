"""Parametrized modules (``torch.nn.utils.parametrize``: ``weight_norm``, ``spectral_norm``, ``orthogonal``, a
user's own): the module's rule on the computed tensor, chained through the parametrization.

A parametrized tensor (``conv.weight``) is computed on access from the parameters of its ``ParametrizationList``
(``conv.parametrizations.weight.original0``, ``original1``, and any parameters of the parametrizations
themselves): W = f(originals), the same function for every sample. So the per-sample gradient of the originals
is the parametrization's VJP of the per-sample gradient of W: g_orig[b, c] = vjp_f(dW[b, c]). The module's own
rule (conv, linear, ...) computes dW [B, d, *W.shape] as if W were a plain parameter; one ``torch.func.vjp`` of f
is then vmapped over the B d rows. Planning gives the ParametrizationList's parameters to the parametrized
module (the list itself is called on every access of W, but it sees no batch), under local names
``parametrizations.<tensor>.<name in the list>``. As every rule, the result is verified against autograd;
a parametrization that torch.func cannot differentiate or vmap makes the rule raise, and the module gets its
exact fallback (which differentiates the originals through the module's forward directly).
"""

from __future__ import annotations

import functools
import warnings
import weakref

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


def split_names(names: dict[str, str]) -> tuple[dict[str, str], dict[str, dict[str, str]]]:
    """{local: full} -> (the module's plain parameters, {parametrized tensor: {name in its list: full}})."""
    plain: dict[str, str] = {}
    chained: dict[str, dict[str, str]] = {}
    for local, full in names.items():
        if local.startswith(PREFIX):
            tensor, _, rest = local[len(PREFIX):].partition(".")
            chained.setdefault(tensor, {})[rest] = full
        else:
            plain[local] = full
    return plain, chained


def _weight_norm(plist: nn.Module) -> bool:
    """One ``parametrizations.weight_norm`` (g = original0, v = original1) and nothing else."""
    return (len(plist) == 1 and type(plist[0]).__name__ == "_WeightNorm" and isinstance(getattr(plist[0], "dim",
            None), int) and set(dict(plist.named_parameters())) == {"original0", "original1"})


def _pulled(plist: nn.Module, wanted: dict[str, str], dW: Tensor, graph: bool) -> dict[str, Tensor]:
    """{name in the list: per-row gradient [R, *shape]} of the list's parameters from dW [R, *W.shape]."""
    params = dict(plist.named_parameters())
    names = list(params)
    primals = tuple(params[n] if graph else params[n].detach() for n in names)

    def computed(*tensors: Tensor) -> Tensor:
        given = dict(zip(names, tensors, strict=True))
        if _weight_norm(plist):  # torch._weight_norm's formula, decomposed: its fused kernel has no batching rule
            g, v = given["original0"], given["original1"]
            return v * (g / torch.norm_except_dim(v, 2, plist[0].dim))
        return functional_call(plist, given, ())

    with torch.enable_grad() if graph else torch.no_grad():
        W, pull = vjp(computed, *primals)
        if tuple(W.shape) != tuple(dW.shape[1:]):
            raise ValueError(f"the parametrization computes {tuple(W.shape)}, the rule's gradient is "
                             f"{tuple(dW.shape[1:])}")
        dW = dW.to(W.dtype)
        grads = None
        if plist not in _UNBATCHED:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("error")  # vmap's slow per-row fallback: the plain loop below instead
                    grads = vmap(pull)(dW)
            except Exception:  # noqa: BLE001  (no batching rule, e.g. weight_norm's fused backward)
                _UNBATCHED.add(plist)
        if grads is None:  # one VJP per row (exact; 0.1 ms a row for a small conv)
            grads = tuple(torch.stack(z) for z in zip(*(pull(row) for row in dW), strict=True))
    return {n: g for n, g in zip(names, grads, strict=True) if n in wanted}


@functools.cache
def chained(rule: Rule) -> Rule:
    """``rule`` for a parametrized module: the computed tensors' gradients chained to the originals (one wrapper
    per rule, so that it keys the signal layouts and the plan cache like the rule itself)."""

    def parametrized(module: nn.Module, layer: str, calls: list[Call], names: dict[str, str]) -> list[Factor]:
        plain, wanted = split_names(names)
        inner = dict(plain)
        stand_in: dict[str, str] = {}  # the computed tensor's label in the rule's factors -> tensor name
        for tensor in wanted:
            if tensor in plain or not parametrize.is_parametrized(module, tensor):
                raise ValueError(f"{tensor!r} is not a parametrized tensor of this module")
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
            plist = module.parametrizations[tensor]
            grads = _pulled(plist, full_of, dW.reshape(B * d, *dW.shape[2:]), graph)
            by_layer: dict[str, list[str]] = {}  # one factor per owning module, as the fallback and loop name them
            for rest, full in full_of.items():
                by_layer.setdefault(layer_of(full), []).append(rest)
            for owner, rests in by_layer.items():
                g = torch.cat([grads[r].reshape(B, d, -1) for r in rests], dim=2)
                out.append(Dense(owner, g, [(full_of[r], plist.get_parameter(r).shape) for r in rests]))
        return out

    parametrized.__name__ = f"{getattr(rule, '__name__', 'rule')} (parametrized)"
    if rule in SIGNAL_LAYOUTS:  # the signals are the inner rule's: stored as it reads them
        SIGNAL_LAYOUTS[parametrized] = SIGNAL_LAYOUTS[rule]
    return parametrized
