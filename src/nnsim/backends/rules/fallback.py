"""Any other module with parameters: exact per-sample gradients of that module alone, in the same pass.

The module is re-run on each captured sample and pulled back with the captured output signals, so only
this module's parameters are differentiated (its children keep their own rules):

* :func:`fallback`: vmap over samples and outputs of a ``torch.func`` VJP;
* :func:`fallback_loop`: a per-sample ``torch.autograd`` loop, for modules ``torch.func`` cannot run
  (e.g. cuDNN-style fused kernels without batching rules).

The tensors that carry the batch on axis 0 are known from planning (:attr:`Call.batched`); the others
(shared masks, broadcast position ids, recurrent states with the batch elsewhere) are passed whole. Output
tensors without the batch on axis 0 must receive no signal (e.g. an LSTM's unused final state).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..._model import layer_of
from ...factors import Dense, Factor
from ..exact_ops import exact_vmap_graph
from . import Call


def _float_leaves(out: object) -> list[Tensor]:
    return [t for t in tree_flatten(out)[0] if isinstance(t, Tensor) and t.is_floating_point()]


def _batched_axes(call: Call, flat: list, B: int) -> dict[int, int]:
    """{argument leaf: batch axis}: from planning, else the tensors whose axis 0 has the batch size."""
    if call.batched is None:
        return {i: 0 for i, t in enumerate(flat) if isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == B}
    if any(not isinstance(flat[i], Tensor) or flat[i].shape[a] != B for i, a in call.batched.items()):
        raise ValueError("the module's batched arguments differ from those seen at planning")
    return dict(call.batched)


def _signal_split(call: Call, B: int) -> tuple[dict[int, int], list[Tensor]]:
    """{output leaf: batch axis} of those that carry per-sample signals, and their signals [B, d, ...]; the
    other outputs must be unused (zero signal)."""
    if call.out_batched is not None:
        axes = dict(call.out_batched)
    else:
        axes = {k: 0 for k, z in enumerate(call.leaves) if z.dim() > 0 and z.shape[0] == B}
    for k, delta in enumerate(call.deltas):
        if k not in axes and bool((delta != 0).any()):
            raise ValueError(f"output {k} of shape {tuple(call.leaves[k].shape)} has no batch axis but is used")
    return axes, [call.deltas[k] for k in axes]


def _factors(module: nn.Module, names: dict[str, str], total: dict[str, Tensor], B: int, d: int) -> list[Factor]:
    # One factor per owning module, so that per-layer results name the same layers on every backend.
    by_owner: dict[str, list[str]] = {}
    for local, full in names.items():
        by_owner.setdefault(layer_of(full), []).append(local)
    return [
        Dense(owner, torch.cat([total[k].reshape(B, d, -1) for k in locals_], dim=2),
              [(names[k], module.get_parameter(k).shape) for k in locals_])
        for owner, locals_ in by_owner.items()
    ]


def fallback(module: nn.Module, layer: str, calls: list[Call], names: dict[str, str]) -> list[Factor]:
    B, d = calls[0].batch_size or calls[0].deltas[0].shape[0], calls[0].deltas[0].shape[1]
    graph = calls[0].graph
    params = {local: module.get_parameter(local) if graph else module.get_parameter(local).detach() for local in names}
    total: dict[str, Tensor] = {}
    for call in calls:
        flat, spec = tree_flatten((call.args, call.kwargs))
        batched = _batched_axes(call, flat, B)
        keep, deltas = _signal_split(call, B)

        def per_sample(xs: tuple[Tensor, ...], ds: tuple[Tensor, ...], flat=flat, spec=spec, batched=batched,
                       keep=keep):
            leaves = list(flat)
            for (i, axis), x in zip(batched.items(), xs, strict=True):
                leaves[i] = x.unsqueeze(axis)
            args, kwargs = tree_unflatten(leaves, spec)
            outs, pull = vjp(lambda p: _float_leaves(functional_call(module, p, args, kwargs)), params)

            def one_output(*dc: Tensor) -> dict[str, Tensor]:
                cot = [torch.zeros_like(o) for o in outs]
                for (k, axis), dd in zip(keep.items(), dc, strict=True):
                    cot[k] = dd.unsqueeze(axis)
                return pull(cot)[0]

            return vmap(one_output)(*ds)

        # torch.func ignores an outer no_grad for its own transforms; here it only stops the results from
        # recording a graph through the module's other (not differentiated) parameters.
        # (In graph mode the results must stay differentiable: no no_grad.)
        with torch.enable_grad() if graph else torch.no_grad(), exact_vmap_graph(graph):
            grads = vmap(per_sample, in_dims=(tuple(batched.values()), 0))(
                tuple(flat[i] for i in batched), tuple(deltas))
        for local, g in grads.items():
            total[local] = total.get(local, 0) + g
    return _factors(module, names, total, B, d)


def fallback_loop(module: nn.Module, layer: str, calls: list[Call], names: dict[str, str]) -> list[Factor]:
    B, d = calls[0].batch_size or calls[0].deltas[0].shape[0], calls[0].deltas[0].shape[1]
    graph = calls[0].graph
    locals_ = list(names)
    tensors = [module.get_parameter(k) for k in locals_]
    total: dict[str, Tensor] = {}
    for call in calls:
        flat, spec = tree_flatten((call.args, call.kwargs))
        batched = _batched_axes(call, flat, B)
        keep, deltas = _signal_split(call, B)
        rows: list[list[Tensor]] = [[] for _ in locals_]
        for b in range(B):
            leaves = list(flat)
            for i, axis in batched.items():
                leaves[i] = flat[i].narrow(axis, b, 1)
            args, kwargs = tree_unflatten(leaves, spec)
            with torch.enable_grad():
                outs = _float_leaves(module(*args, **kwargs))
                used = [outs[k] for k in keep]
                cols: list[list[Tensor]] = [[] for _ in locals_]
                for c in range(d):
                    cot = [dl[b, c].unsqueeze(axis) for dl, axis in zip(deltas, keep.values(), strict=True)]
                    gs = torch.autograd.grad(used, tensors, cot,
                                             retain_graph=c < d - 1 or graph, create_graph=graph, allow_unused=True)
                    for j, (g, p) in enumerate(zip(gs, tensors, strict=True)):
                        cols[j].append(torch.zeros_like(p) if g is None else (g if graph else g.detach()))
            for j in range(len(locals_)):
                rows[j].append(torch.stack(cols[j]))
        for j, k in enumerate(locals_):
            g = torch.stack(rows[j])
            total[k] = total.get(k, 0) + g
    return _factors(module, names, total, B, d)
