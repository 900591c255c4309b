"""Any other module with parameters: exact per-sample gradients of that module alone, in the same pass.

The module is re-run functionally on each captured sample and pulled back with the captured output
signals (vmap over samples and outputs of a VJP), so only this module's parameters are differentiated.
Tensor arguments whose leading size is the batch size are taken as batched along axis 0.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..._model import layer_of
from ...factors import Dense, Factor
from . import Call


def _float_leaves(out: object) -> list[Tensor]:
    return [t for t in tree_flatten(out)[0] if isinstance(t, Tensor) and t.is_floating_point()]


def fallback(module: nn.Module, layer: str, calls: list[Call], names: dict[str, str]) -> list[Factor]:
    B, d = calls[0].deltas[0].shape[:2]
    graph = calls[0].graph
    params = {local: module.get_parameter(local) if graph else module.get_parameter(local).detach() for local in names}
    total: dict[str, Tensor] = {}
    for call in calls:
        flat, spec = tree_flatten((call.args, call.kwargs))
        batched = [i for i, t in enumerate(flat) if isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == B]

        def per_sample(xs: tuple[Tensor, ...], deltas: tuple[Tensor, ...], flat=flat, spec=spec, batched=batched):
            leaves = list(flat)
            for i, x in zip(batched, xs, strict=False):
                leaves[i] = x.unsqueeze(0)
            args, kwargs = tree_unflatten(leaves, spec)
            _, pull = vjp(lambda p: _float_leaves(functional_call(module, p, args, kwargs)), params)
            return vmap(lambda *ds: pull([dd.unsqueeze(0) for dd in ds])[0])(*deltas)

        # torch.func ignores an outer no_grad for its own transforms; here it only stops the results from
        # recording a graph through the module's other (not differentiated) parameters.
        # (In graph mode the results must stay differentiable: no no_grad.)
        with torch.enable_grad() if graph else torch.no_grad():
            grads = vmap(per_sample)(tuple(flat[i] for i in batched), tuple(call.deltas))
        for local, g in grads.items():
            total[local] = total.get(local, 0) + g
    # One factor per owning module, so that per-layer results name the same layers on every backend.
    by_owner: dict[str, list[str]] = {}
    for local, full in names.items():
        by_owner.setdefault(layer_of(full), []).append(local)
    return [
        Dense(owner, torch.cat([total[k].reshape(B, d, -1) for k in locals_], dim=2),
              [(names[k], module.get_parameter(k).shape) for k in locals_])
        for owner, locals_ in by_owner.items()
    ]
