"""One forward pass, d backward passes to the layer outputs, per-layer rules: no per-sample gradient
is built where a layer rule can avoid it (method spec §7.3).

Planning (once, on the first two samples seen) decides which module handles which parameter:
* a module whose own parameters are selected gets its registered rule, or the generic fallback;
* parameters of a module that is never called (e.g. ``MultiheadAttention.out_proj``, used through its
  parent's functional code) are handed to the nearest called ancestor's fallback;
* every parameter's per-sample gradient implied by the rules is then checked against plain autograd on
  those samples; any parameter whose check fails (a use the hooks cannot see, such as a weight tied into
  ``F.linear`` in a parent's forward, or a module whose batch axis is not the first) is computed exactly
  by ``torch.func`` instead. The result is exact in every case; only the speed differs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from .._model import layer_of
from ..factors import Dense, Factor
from . import functorch
from .base import Problem, checked_output, dense_by_layer
from .rules import CLAIMS_CHILDREN, Call, Rule, find_rule
from .rules.fallback import fallback


@dataclass
class Plan:
    # module -> (layer name, rule, {local name: full name})
    hooked: dict[nn.Module, tuple[str, Rule, dict[str, str]]] = field(default_factory=dict)
    tied: set[str] = field(default_factory=set)
    residual: list[str] = field(default_factory=list)

    def describe(self) -> dict[str, str]:
        out = {layer: getattr(rule, "__name__", "rule") for layer, rule, _ in self.hooked.values()}
        out.update({n: "functorch (exact, outside the layer rules)" for n in self.residual})
        return out


class Structured:
    """``graph=True`` keeps the factors in the autograd graph of the parameters (layer inputs not detached,
    output signals from ``autograd.grad(create_graph=True)``) so that a function of them can be
    back-propagated to the parameters (double backward, used by :class:`nnsim.SimilarityLoss`). The default
    ``graph=False`` detaches everything: results of :class:`nnsim.Similarity` never carry a graph."""

    def __init__(self, problem: Problem, graph: bool = False) -> None:
        self.problem = problem
        self.graph = graph
        self.plan: Plan | None = None

    # ------------------------------------------------------------------ planning
    def _make_plan(self, probe: tuple[Tensor, ...]) -> Plan:
        model, params = self.problem.model, self.problem.params
        full_name = {id(p): n for n, p in params.items()}
        modules = dict(model.named_modules(remove_duplicate=True))
        names_of = {m: n for n, m in modules.items()}
        called: set[nn.Module] = set()
        handles = [m.register_forward_hook(lambda mod, i, o: called.add(mod)) for m in modules.values()]
        try:
            with torch.no_grad():
                model(*probe)
        finally:
            for h in handles:
                h.remove()

        owned: dict[nn.Module, dict[str, str]] = {}
        count: dict[str, int] = {}
        for m in modules.values():
            for local, p in m.named_parameters(recurse=False):
                if id(p) not in full_name:
                    continue
                holder, rel = m, local
                while holder not in called and holder is not model:
                    parent_name = names_of[holder].rpartition(".")[0]
                    rel = names_of[holder].rpartition(".")[2] + "." + rel
                    holder = modules[parent_name]
                owned.setdefault(holder, {})[rel] = full_name[id(p)]
                count[full_name[id(p)]] = count.get(full_name[id(p)], 0) + 1
        plan = Plan(tied={n for n, c in count.items() if c > 1})
        for m, names in owned.items():
            rule = find_rule(m) if all("." not in k for k in names) or isinstance(m, tuple(CLAIMS_CHILDREN)) else None
            plan.hooked[m] = (names_of[m], rule or fallback, names)
        self.plan = plan
        plan.residual = self._verify(probe)
        return plan

    def _verify(self, probe: tuple[Tensor, ...]) -> list[str]:
        """Parameters whose rule-based per-sample gradients disagree with autograd on the probe samples."""
        params = self.problem.params
        bad: set[str] = set()
        graph, self.graph = self.graph, False  # values only: no double-backward graph for the check
        try:
            factors, _ = self._run(probe, 0)
        except Exception:  # a rule or the fallback cannot handle this model: everything goes to torch.func
            return list(params)
        finally:
            self.graph = graph
        tensors = list(params.values())
        tol = 1e-9 if next(iter(params.values())).dtype == torch.float64 else 2e-4
        for b in range(probe[0].shape[0]):
            rule_grads: dict[str, Tensor] = {}
            for f in factors:
                for (name, _), g in zip(f.params, f.select(torch.tensor([b])).batch_grad(), strict=False):
                    rule_grads[name] = rule_grads.get(name, 0) + g
            xb = tuple(t[b : b + 1] for t in probe)
            y = checked_output(self.problem, self.problem.model(*xb), xb)
            for c in range(y.shape[1]):
                auto = [g if g is None else g.detach()
                        for g in torch.autograd.grad(y[0, c], tensors, retain_graph=True, allow_unused=True)]
                scale = max((float(g.norm()) for g in auto if g is not None), default=0.0)
                for (name, p), g in zip(params.items(), auto, strict=False):
                    g = torch.zeros_like(p) if g is None else g
                    r = rule_grads.get(name)
                    r = torch.zeros_like(p) if r is None else r[c]
                    if float((r - g).norm()) > tol * (max(float(g.norm()), float(r.norm())) + 1e-3 * scale) + 1e-30:
                        bad.add(name)
        return [n for n in params if n in bad]

    # ------------------------------------------------------------------ the pass
    def _run(self, batch: tuple[Tensor, ...], start: int) -> tuple[list[Factor], Tensor]:
        assert self.plan is not None
        plan, model = self.plan, self.problem.model
        if len(plan.residual) == len(self.problem.params):  # no rule applies: skip the hooked pass
            return functorch.factors(self.problem, batch, start, graph=self.graph)
        calls: dict[nn.Module, list[Call]] = {m: [] for m in plan.hooked}
        graph = self.graph

        def hook(mod: nn.Module, args: tuple, kwargs: dict, out: object) -> object:
            # Detached unless graph: the rules need values only, and the factors must not keep the graph alive.
            if graph:
                call = Call(args, kwargs, graph=True)
            else:
                call = Call(tree_map(_detach, args), tree_map(_detach, kwargs))

            def tap(t: object) -> object:
                # Adding a zero leaf lets autograd return d y / d output even if later ops are in place.
                if isinstance(t, Tensor) and t.is_floating_point():
                    z = torch.zeros_like(t, requires_grad=True)
                    call.leaves.append(z)
                    return t + z
                return t

            new = tree_map(tap, out)
            calls[mod].append(call)
            return new

        handles = [m.register_forward_hook(hook, with_kwargs=True) for m in plan.hooked]
        try:
            raw = model(*batch)
        finally:
            for h in handles:
                h.remove()
        y = checked_output(self.problem, raw, batch, start)
        leaves = [z for cs in calls.values() for c in cs for z in c.leaves]
        d = y.shape[1]
        per_c: list[tuple] = []
        if leaves:
            for c in range(d):
                per_c.append(torch.autograd.grad(y[:, c].sum(), leaves, retain_graph=graph or c < d - 1,
                                                 create_graph=graph, allow_unused=True))
        k = 0
        for cs in calls.values():
            for call in cs:
                for z in call.leaves:
                    delta = torch.stack([torch.zeros_like(z) if g[k] is None else g[k] for g in per_c], dim=1)
                    call.deltas.append(delta if graph else delta.detach())
                    k += 1
        factors: list[Factor] = []
        for m, (layer, rule, names) in plan.hooked.items():
            names = {loc: full for loc, full in names.items() if full not in plan.residual}
            if names and calls[m]:
                factors.extend(rule(m, layer, calls[m], names))
        factors = _merge_tied(factors, plan.tied - set(plan.residual))
        if plan.residual:
            jac, _ = functorch.jacobians(self.problem, batch, plan.residual, graph=graph)
            factors.extend(dense_by_layer(self.problem, jac))
        return factors, y if graph else y.detach()

    def factors(self, batch: tuple[Tensor, ...], start: int = 0) -> tuple[list[Factor], Tensor]:
        if self.plan is None:
            self._make_plan(tuple(t[:2] for t in batch))
        return self._run(batch, start)


def _detach(t: object) -> object:
    return t.detach() if isinstance(t, Tensor) else t


def _merge_tied(factors: list[Factor], tied: set[str]) -> list[Factor]:
    """A parameter used by several modules gets one Dense factor holding the sum of their gradients."""
    if not tied:
        return factors
    out: list[Factor] = []
    sums: dict[str, Tensor] = {}
    for f in factors:
        if not any(n in tied for n, _ in f.params):
            out.append(f)
            continue
        dense = f.dense()
        start, keep, keep_specs = 0, [], []
        for name, shape in dense.params:
            size = shape.numel()
            piece = dense.g[:, :, start : start + size]
            start += size
            if name in tied:
                sums[name] = sums[name] + piece if name in sums else piece
            else:
                keep.append(piece)
                keep_specs.append((name, shape))
        if keep:
            out.append(Dense(f.layer, torch.cat(keep, dim=2), keep_specs))
    shapes = {n: s for f in factors for n, s in f.params}
    out.extend(Dense(layer_of(n), g, [(n, shapes[n])]) for n, g in sums.items())
    return out
