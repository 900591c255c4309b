"""One forward pass, d backward passes to the layer outputs, per-layer rules: no per-sample gradient
is built where a layer rule can avoid it (docs/method.md, "Layer-wise structure").

Planning (on probe samples of the first chunk, again whenever the input signature changes) decides which
module handles which parameter, and proves it before any result is returned:

* a module whose own parameters are selected gets its registered rule, or the generic per-module fallback;
* parameters of a module that is never called (e.g. ``MultiheadAttention.out_proj``, used through its
  parent's functional code) go to the nearest called ancestor (its rule if registered with
  ``children=True``, else its fallback);
* which arguments of each module call carry the batch on axis 0 is found by probing two batch sizes (so a
  mask [T, T] is never mistaken for a batch when T equals B); a module output that is shared by the
  batch (leading size 1, e.g. position embeddings of ids [1, T]) is expanded to B so that its signals are
  per sample;
* every parameter's per-sample gradients are checked against plain autograd on the probe (each sample
  run on its own), through one random weighting of all (sample, output) pairs: a wrong gradient of any
  sample and output disagrees with probability one, at the cost of one factor mix and batch sum. A rule that
  raises or disagrees sends only its own module down to the exact fallback (``torch.func``), then to a
  per-sample autograd loop where ``torch.func`` cannot run the module, with one
  :class:`~nnsim.errors.FallbackWarning` naming the module and the reason. A parameter that even the
  fallback gets wrong (a use the hooks cannot see, such as a weight tied into ``F.linear`` in a parent's
  forward) is computed by ``torch.func`` on the whole model (or a per-sample loop) instead.

A plan is stored only once it is verified, so a failure never leaves a half-made plan behind. The result
is exact in every case; only the speed differs.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_map

from .._model import layer_of
from ..errors import FallbackWarning, ModelError
from ..factors import Dense, Factor, Outer
from . import functorch, loop, plan_cache
from .base import Problem, checked_output, dense_by_layer
from .rules import Call, Found, NoBatchAxis, Rule, find_rule, parametrized, signal_layout
from .rules.fallback import fallback, fallback_loop
from .rules.free import FreeUses, classify, free_params

_PROBE = 3  # samples of the verification probe; batch axes are told apart with a second probe of 2
# First samples of the first batch on which a kept plan is checked again (each run on its own by autograd): two,
# so that a rule that swaps or shares samples' gradients, or a model that mixes the samples, still disagrees.
_REUSE_PROBE = 2
# Up to this many outputs, the check backpropagates each output on its own (one backward pass each); above,
# this many random combinations of them. Each output on its own is rounded as in the pass: a combination
# backpropagated through a model's float32 internals (Llama's RMSNorm upcast) in a float64 model is rounded at
# 1e-7 and can never pass float64's tolerance, so ten classes (d = 10) are checked output by output.
_CHECK_DIRECTIONS = 16
# Relative tolerance of a rule against autograd. The rule and autograd sum the same products in different orders:
# the float64 tolerance is far above that rounding and the float32 one leaves room for it, while a wrong rule is
# off by far more (tests/test_rules.py checks that wrong rules are caught). Other dtypes use the float32 value.
_CHECK_RTOL = {torch.float64: 1e-9, torch.float32: 2e-4}


@dataclass
class Entry:
    """How one hooked module's parameters are computed: a chain of methods, the current one at ``level``."""

    layer: str
    names: dict[str, str]  # local name -> full name
    found: Found | None
    # no rule: try the free-parameter operations first (its own parameters, and those of children it reads
    # without calling them: DeBERTa's ``rel_embeddings.weight``, Mamba's ``conv1d.weight`` in its reference scan)
    free: bool = False
    # the rule found the module's output shared by the batch (NoBatchAxis): its next method is the free-parameter
    # tracking of its parameters to where that output meets the batch, then the fallbacks
    shared: bool = False
    level: int = 0
    reason: str = ""  # why the registered rule was left (empty: it was not, or it never claimed the module)
    suspects: set[str] = field(default_factory=set)  # parameters the rule disagreed on
    restored: bool = False

    @property
    def chain(self) -> list[tuple[str, Rule]]:
        rule = [(getattr(self.found.rule, "__name__", "rule"), self.found.rule)] if self.found else []
        if self.free and not self.found:
            rule = [(_FREE, free_params)]
        elif self.shared:
            rule.append((_FREE, free_params))
        return rule + [("fallback", fallback), ("fallback (per-sample loop)", fallback_loop)]

    @property
    def on_rule(self) -> bool:
        return self.found is not None and self.level == 0

    @property
    def on_fast(self) -> bool:
        """On its rule, or on the free-parameter tracking its rule asked for (a shared output)."""
        return self.on_rule or (self.shared and self.level == 1)

    @property
    def method(self) -> tuple[str, Rule] | None:
        chain = self.chain
        return chain[self.level] if self.level < len(chain) else None


@dataclass
class Plan:
    hooked: dict[nn.Module, Entry] = field(default_factory=dict)
    tied: set[str] = field(default_factory=set)
    residual: list[str] = field(default_factory=list)
    residual_loop: bool = False  # torch.func cannot run the model: per-sample autograd for the residual
    # Batch-shared module outputs (leading size 1) expanded to the batch: 2 all of them, 1 all but those of
    # modules on the free-parameter operations (which a model may broadcast against a folded batch [B*k, ...],
    # as Swin's relative position bias; the operation where they meet the batch gets the signals), 0 none.
    # Lowered one step each time the expanded outputs upset the model's own code.
    expand: int = 2
    tapped: bool = False  # every module output gets a zero-leaf tap (set once an output is seen modified in place)
    # module -> per call: (number of flattened argument leaves, {leaf: its batch axis}, fold k: 1, or k > 1 for
    # a call on a batch folded with another axis, [B*k, ...] with row b*k + j of sample b: the rule then sees
    # B*k samples and its factors are folded back to B, ``_applied``)
    batched: dict[nn.Module, list[tuple[int, dict[int, int], int]] | None] = field(default_factory=dict)
    free_ops: dict[nn.Module, list[tuple[str, str, list[int], int, dict[int, int]]] | None] = field(
        default_factory=dict)
    notes: list[str] = field(default_factory=list)  # the FallbackWarnings of planning (repeated when reused)

    def describe(self) -> dict[str, str]:
        out = {}
        for e in self.hooked.values():
            method = e.method
            if method is not None and any(full not in self.residual for full in e.names.values()):
                out[e.layer] = method[0]
        how = "loop" if self.residual_loop else "functorch"
        out.update({n: f"{how} (exact, outside the layer rules)" for n in self.residual})
        return out

    def batched_for(self, module: nn.Module, k: int, n_leaves: int
                    ) -> tuple[dict[int, int] | None, dict[int, int] | None, int]:
        """{leaf: batch axis} of the argument leaves and of the floating output leaves of call k (None: unknown),
        and its fold (1: none)."""
        calls = self.batched.get(module)
        if calls is None or k >= len(calls) or calls[k][0] != n_leaves:
            return None, None, 1
        sep, axes, fold = calls[k]
        return ({i: a for i, a in axes.items() if i < sep}, {i - sep - 1: a for i, a in axes.items() if i > sep},
                fold)


class Structured:
    """``graph=True`` keeps the factors in the autograd graph of the parameters (layer inputs not detached,
    output signals from ``autograd.grad(create_graph=True)``) so that a function of them can be
    back-propagated to the parameters (double backward, used by :class:`nnsim.SimilarityLoss`). The default
    ``graph=False`` detaches everything: results of :class:`nnsim.Similarity` never carry a graph."""

    def __init__(self, problem: Problem, graph: bool = False) -> None:
        self.problem = problem
        self.graph = graph
        self.plan: Plan | None = None  # the plan of the latest input signature (what ``describe`` shows)
        self.plans: dict[tuple, Plan] = {}
        self._ref: tuple | None = None  # (probe, autograd's side of the check)
        self._planning_graph = graph  # the mode the plan being made is for (planning itself runs without graph)

    # ------------------------------------------------------------------ planning
    def _signature(self, batch: tuple[Tensor, ...]) -> tuple:
        return (self.problem.keys, tuple((tuple(t.shape[1:]), t.dtype, t.device) for t in batch))

    def _make_plan(self, batch: tuple[Tensor, ...]) -> Plan:
        probe = _probe(batch, _PROBE)
        plan = self._initial_plan(probe)
        small = _probe(batch, 2)
        failed_pass = self._set_batch_axes(plan, small, probe)
        for _ in range(4 * len(plan.hooked) + 6):
            if failed_pass is not None:
                break
            outcome = self._check(plan, probe)
            if isinstance(outcome, Exception):
                if plan.expand:  # expanded outputs may upset the model's own code: expand fewer
                    plan.expand -= 1
                    failed_pass = self._set_batch_axes(plan, small, probe)
                    continue
                failed_pass = outcome
                break
            errors, bad, residual_failed = outcome
            if residual_failed:
                if plan.residual_loop:
                    raise residual_failed
                plan.residual_loop = True
                continue
            if not errors and not bad:
                if self._restore_rules(plan):
                    continue
                break
            if self._step_down(plan, errors, bad):  # free-parameter tracking to record for a module
                failed_pass = self._set_batch_axes(plan, small, probe)
        else:
            raise ModelError("the structured backend could not verify a plan for this model; use backend='loop'")
        if failed_pass is not None:
            plan.notes.append(f"the hooked pass of the structured backend fails on this model "
                              f"({type(failed_pass).__name__}: {failed_pass}); every parameter is computed by the "
                              "exact whole-model fallback")
            plan.residual = list(self.problem.params)
            plan.residual_loop = not _functorch_runs(self.problem, probe)
        for m, e in plan.hooked.items():
            lost = [n for n in e.names.values() if n in plan.residual]
            if lost and not e.reason and any(fold > 1 for _, _, fold in plan.batched.get(m) or []):
                # its rule and fallback both disagreed: the rows of its folded batch are not batch-major
                plan.notes.append(f"module {e.layer or 'model'!r} ({type(m).__name__}) is called on a batch folded "
                                  "with another axis ([B*k, ...]) whose rows are not sample-major (row b*k + j of "
                                  f"sample b): its layer rule and fallback disagree with autograd on {lost}; "
                                  "computing them with the exact whole-model fallback instead")
        for e in plan.hooked.values():
            if e.reason and not e.on_fast and not e.found.tentative:  # type: ignore[union-attr]
                method = e.method[0] if e.method else "whole-model fallback"
                plan.notes.append(f"layer rule {e.chain[0][0]!r} for module {e.layer or 'model'!r} "
                                  f"({type(_module_of(plan, e)).__name__}) {e.reason}; computing this module with "
                                  f"the exact {method} instead")
        return plan

    def _initial_plan(self, probe: tuple[Tensor, ...]) -> Plan:
        model, params = self.problem.model, self.problem.params
        full_name = {id(p): n for n, p in params.items()}
        modules = dict(model.named_modules(remove_duplicate=True))
        names_of = {m: n for n, m in modules.items()}
        called: set[nn.Module] = set()
        handles = [m.register_forward_hook(lambda mod, i, o: called.add(mod)) for m in modules.values()]
        try:  # with gradients, as in the real pass (fused inference fast paths skip the submodules)
            with torch.enable_grad(), _no_fastpath():
                out = self.problem.call(probe)
        finally:
            for h in handles:
                h.remove()
        # Errors of the model or the output spec themselves are the user's to see (raised, not planned around).
        checked_output(self.problem, out, probe, values=False)
        del out

        owned: dict[nn.Module, dict[str, str]] = {}
        count: dict[str, int] = {}
        # A ParametrizationList is called on every access of the tensor it computes, but sees no batch: its
        # parameters go to the parametrized module (rules/parametrized.py), as if the list were never called.
        lists = parametrized.is_inside(model)
        # A weight tied to an uncalled module (BART's and T5's ``shared`` embedding, whose weight the called
        # ``embed_tokens`` use) is not handed to that module's called ancestor as well: the ancestor's fallback
        # would count the called modules' use a second time. A use the hooks miss still disagrees at the check.
        used = {id(p) for m in called - lists for p in m.parameters(recurse=False)}
        for m in modules.values():
            for local, p in m.named_parameters(recurse=False):
                if id(p) not in full_name or (m not in called and id(p) in used):
                    continue
                holder, rel = m, local
                while (holder not in called or holder in lists) and holder is not model:
                    parent_name = names_of[holder].rpartition(".")[0]
                    rel = names_of[holder].rpartition(".")[2] + "." + rel
                    holder = modules[parent_name]
                owned.setdefault(holder, {})[rel] = full_name[id(p)]
                count[full_name[id(p)]] = count.get(full_name[id(p)], 0) + 1
        plan = Plan(tied={n for n, c in count.items() if c > 1})
        for m, names in owned.items():
            found = find_rule(m)
            plain, chained = parametrized.split_names(m, names)
            if found is not None and not found.children and any("." in k for k in [*plain, *chained]):
                found = None  # the rule does not claim uncalled children's parameters
            if found is not None and chained:  # the rule on the computed tensors, chained to their originals
                found = Found(parametrized.chained(found.rule), found.children, found.tentative)
            plan.hooked[m] = Entry(names_of[m], names, found, free=found is None)
        return plan

    def _set_batch_axes(self, plan: Plan, small: tuple[Tensor, ...], large: tuple[Tensor, ...]) -> Exception | None:
        """``plan.batched`` from the two probes. Where the recording passes fail (the model ran plainly at
        ``_initial_plan``), what they change is given up step by step: fewer expanded outputs (Swin broadcasts
        a batch-shared bias against its B*nW windows), then the free-parameter watcher (those modules start at
        their exact fallback). Returns None, or the exception of a model that fails under the recording hooks
        even so (planned around like a failing hooked pass, never a crash)."""
        while True:
            try:
                plan.batched = self._batch_axes(plan, small, large)
                return None
            except Exception as err:  # noqa: BLE001
                if plan.expand:
                    plan.expand -= 1
                elif any(e.free for e in plan.hooked.values()):
                    for e in plan.hooked.values():
                        if e.shared and e.method is not None and e.method[0] == _FREE:
                            e.level += 1  # a rule's batch-shared output: its fallback, not the tracking
                        e.free = False
                else:
                    return err

    def _batch_axes(self, plan: Plan, small: tuple[Tensor, ...], large: tuple[Tensor, ...]
                    ) -> dict[nn.Module, list[tuple[int, dict[int, int], int]] | None]:
        """Per module call, the argument and output leaves whose axis follows the batch size (2 vs 3 samples),
        and its fold (``_call_axes``)."""
        plan.batched = {}
        rec = [self._record(plan, small), self._record(plan, large)]
        seen = [r[0] for r in rec]
        plan.free_ops = {m: classify(rec[0][1].get(m, []), rec[1][1].get(m, []), small[0].shape[0],
                                     large[0].shape[0]) for m in rec[0][1]}
        self._free_ops_again(plan, large, [r[1] for r in rec])
        out: dict[nn.Module, list[tuple[int, dict[int, int], int]] | None] = {}
        for m in plan.hooked:
            a, b = seen[0].get(m, []), seen[1].get(m, [])
            if len(a) != len(b) or any(len(x) != len(y) for x, y in zip(a, b, strict=True)):
                out[m] = None  # data-dependent calls: decided per call from the shapes
                continue
            n_small, n_large = small[0].shape[0], large[0].shape[0]
            out[m] = [_call_axes(x, y, n_small, n_large) for x, y in zip(a, b, strict=True)]
        return out

    def _free_ops_again(self, plan: Plan, probe: tuple[Tensor, ...], seen: list[dict]) -> None:
        """Free-parameter operations that two recordings could not match (a tensor of the probe's batch size
        that is no batch: T5's buckets [T, T] with T = 3) are recorded again at two batch sizes that no axis of
        their operations has, then planned from those (the pass replays the planned kinds whatever its B)."""
        failed = [m for m, ops in plan.free_ops.items() if ops is None and (seen[0].get(m) or seen[1].get(m))]
        if not failed:
            return
        sizes = {n for r in seen for m in failed for _, args, out, *_ in r.get(m, [])
                 for shape in (*args, out) if isinstance(shape, tuple) for n in shape}
        n1 = next(n for n in itertools.count(4) if n not in sizes)
        n2 = next(n for n in itertools.count(n1 + 1) if n not in sizes)
        again = [self._record(plan, _probe(probe, n))[1] for n in (n1, n2)]
        for m in failed:
            plan.free_ops[m] = classify(again[0].get(m, []), again[1].get(m, []), n1, n2)

    def _record(self, plan: Plan, batch: tuple[Tensor, ...]) -> tuple[dict[nn.Module, list[list]], dict]:
        """Shapes of every hooked call's arguments and outputs, and the free-parameter operations seen."""
        dims: dict[nn.Module, list[list]] = {m: [] for m in plan.hooked}
        B = batch[0].shape[0]
        mode = self._free_mode(plan, plan.hooked, B, record=batch)

        def hook(mod: nn.Module, args: tuple, kwargs: dict, out: object) -> object:
            with _quiet(mode):  # the hook's own look at the tensors is no use of a tracked parameter
                flat = _leaves(args, kwargs)
                expand = (_expands(plan, plan.hooked[mod]) and B > 1
                          and (_lookup(mod) or not _has_batched(flat, None, B)))
            if expand:  # as in the pass (where a tracked parameter's output meets the batch here)
                out = _map(lambda t: _expand(t, B), out)
            with _quiet(mode):  # argument leaves, then a separator, then the floating output leaves (with signals)
                dims[mod].append([_shape(t) for t in flat] + [-1] + [_shape(t) for t in tree_flatten(out)[0]
                                                                    if isinstance(t, Tensor) and t.is_floating_point()])
            return out

        with torch.no_grad(), _hooks(plan, hook), mode or contextlib.nullcontext():
            self.problem.call(batch)
        return dims, ({} if mode is None else mode.seen)

    def _free_mode(self, plan: Plan, entries: dict[nn.Module, Entry], B: int, record: tuple[Tensor, ...] = ()
                   ) -> FreeUses | None:
        """The watcher of the direct parameters of the modules whose method is (or, recording the batch ``record``,
        may be) _FREE."""
        watched = {m: {loc: m.get_parameter(loc) for loc, full in e.names.items() if full not in plan.residual}
                   for m, e in entries.items() if e.free and (record or (e.method or ("",))[0] == _FREE)}
        watched = {m: ps for m, ps in watched.items() if ps}
        if not watched:
            return None
        return FreeUses(watched, B, None if record else plan.free_ops, inputs=record)

    def _check(self, plan: Plan, probe: tuple[Tensor, ...]
               ) -> Exception | tuple[dict[nn.Module, str], dict[str, str], Exception | None]:
        """Run the plan on the probe and compare every parameter's per-sample gradients with autograd, through
        random combinations of them (``_reference``): one mix and one batch sum per factor, no per-sample loop.

        Returns the hooked pass's exception, or (modules whose method raised: why, parameters that
        disagree: why, the residual's exception)."""
        errors: dict[nn.Module, str] = {}
        try:
            factors, y = self._pass(plan, probe, 0, graph=False, errors=errors, residual=False)
        except Exception as err:  # noqa: BLE001  (any failure of the hooked pass: planned around)
            return err
        residual_failed = None
        if plan.residual:
            try:
                factors += self._residual(plan, probe, graph=False)
            except Exception as err:  # noqa: BLE001
                residual_failed = err
                return errors, {}, residual_failed
        return errors, self._disagreements(factors, y.dtype, probe), residual_failed

    def _disagreements(self, factors: list[Factor], dtype: torch.dtype, probe: tuple[Tensor, ...]) -> dict[str, str]:
        """{parameter: why} for every parameter whose per-sample gradients in ``factors`` (of the probe's samples)
        disagree with autograd's, compared through one random weighting of them (``_reference``)."""
        M, reference, scale = self._reference(probe)
        M = M.to(dtype)  # the same combination of the rules' per-sample, per-output gradients
        rule_grads: dict[str, Tensor] = {}
        raised: dict[str, str] = {}  # parameters whose factor failed to evaluate: the rule that made it is wrong
        for f in factors:
            try:
                # in the factor's dtype: a model may return its outputs in another one than its parameters'
                # (Mamba's ``logits.float()`` in a float64 model)
                grads = list(f.mix(M.to(f.dtype)).batch_grad())
                if len(grads) != len(f.params):
                    raise ValueError(f"batch_grad returned {len(grads)} gradients for {len(f.params)} parameters")
                for (name, shape), g in zip(f.params, grads, strict=True):
                    if tuple(g.shape) != (M.shape[2], *shape):
                        raise ValueError(f"batch_grad gave {name} the shape {tuple(g.shape)}, not "
                                         f"{(M.shape[2], *shape)}")
            except Exception as err:  # noqa: BLE001  (attributed to the factor's parameters, hence to their rule)
                why = f"raised {type(err).__name__} when its factor was checked: {str(err).strip()[:300]}"
                raised.update((name, why) for name, _ in f.params)
                continue
            for (name, _), g in zip(f.params, grads, strict=True):
                rule_grads[name] = rule_grads[name] + g if name in rule_grads else g
        tol = _CHECK_RTOL.get(dtype, _CHECK_RTOL[torch.float32])
        names = list(self.problem.params)
        ref = [reference[n] for n in names]
        rule = [rule_grads[n][0].to(g.dtype) if n in rule_grads else torch.zeros_like(g) for n, g in zip(names, ref,
                                                                                                          strict=True)]
        errs = _norms([r - g for r, g in zip(rule, ref, strict=True)])
        bad: dict[str, str] = {}
        for name, err, g_norm, r_norm in zip(names, errs, _norms(ref), _norms(rule), strict=True):
            if name in raised:
                bad[name] = raised[name]
            elif err > tol * (max(g_norm, r_norm) + 1e-3 * scale) + 1e-30:
                bad[name] = f"disagrees with autograd on {name} (error {err:.2g}, gradient norm {g_norm:.2g})"
        return bad

    def _reference(self, probe: tuple[Tensor, ...]) -> tuple[Tensor, dict[str, Tensor], float]:
        """Autograd's side of the check, computed once per plan: with random weights W [B, k] of the probe's
        samples and k output directions V [k, d] (each output when d <= _CHECK_DIRECTIONS, else random ones),
        sum_{b,k} W[b,k] d (y_b . V_k) / d theta, every sample run on its own (so a model that mixes the samples
        of a batch cannot pass), one backward pass per direction. The weights are exact in floating point
        (sample weights: signed powers of two; direction weights applied after the backward): a seed of 0.37
        instead of 1 changes the rounding of ill-conditioned gradients (attention queries of a tiny ViT: 4e-8
        relative in float64) beyond the check's tolerance. A wrong per-sample gradient of any sample and output
        disagrees unless its errors cancel in this weighted sum (samples whose gradients are swapped or shared
        are caught: the sample weights differ). Returns (the weights of the rules' per-sample,
        per-output gradients M [B, d, 1], {name: gradient}, the largest per-sample parameter gradient norm)."""
        if self._ref is not None and self._ref[0] is probe:
            return self._ref[1]
        names, tensors = list(self.problem.params), list(self.problem.params.values())
        ys = []
        for b in range(probe[0].shape[0]):
            xb = tuple(t[b : b + 1] for t in probe)
            ys.append(checked_output(self.problem, self.problem.call(xb), xb))
        Y = torch.cat(ys)
        B, d = Y.shape
        gen = torch.Generator().manual_seed(1234)
        if d <= _CHECK_DIRECTIONS:
            V = torch.eye(d, dtype=Y.dtype, device=Y.device)
        else:
            V = torch.randn(_CHECK_DIRECTIONS, d, generator=gen, dtype=torch.float64).to(Y)
        # Sample weights: distinct powers of two with random signs, applied as the backward seeds: scaling
        # by a power of two is exact, so each sample's gradient is rounded exactly as on its own. Directions:
        # one backward pass each, weighted afterwards.
        perm = torch.randperm(B, generator=gen).to(torch.float64)
        signs = torch.randint(0, 2, (B,), generator=gen).to(torch.float64) * 2 - 1
        w_sample = (signs * 2.0 ** -(perm % 3)).to(Y)
        w_dir = torch.randn(V.shape[0], generator=gen, dtype=torch.float64).to(Y)
        total = {n: torch.zeros_like(p) for n, p in zip(names, tensors, strict=True)}
        scale = 0.0
        for k, v in enumerate(V):
            auto = torch.autograd.grad((Y @ v) @ w_sample, tensors, retain_graph=k < V.shape[0] - 1,
                                       allow_unused=True)
            scale = max([scale] + _norms([g for g in auto if g is not None]))
            for n, g in zip(names, auto, strict=True):
                if g is not None:
                    total[n] += w_dir[k] * g.detach()
        W = w_sample[:, None] * w_dir[None, :]
        out = ((W @ V)[:, :, None], total, scale)
        self._ref = (probe, out)
        return out

    def _step_down(self, plan: Plan, errors: dict[nn.Module, str], bad: dict[str, str]) -> bool:
        """Each failing module one step down its chain; parameters its fallbacks get wrong go to the residual.
        Returns whether a rule found its output shared by the batch (its free-parameter uses are to be recorded)."""
        shared = False
        for m, why in errors.items():
            e = plan.hooked[m]
            # (the tracking keeps no graph: with ``graph`` the whole-model fallback differentiates such a module)
            if (e.on_rule and why.startswith(f"{NoBatchAxis.__name__}:") and all("." not in k for k in e.names)
                    and not self._planning_graph):
                # not a failure: the rule's own routing, without a warning. Should the tracking fail too (an input
                # whose batch is folded into axis 0 looks the same to the rule), the rule's own error is the
                # reason the warning gives.
                e.shared = e.free = shared = True
                e.reason, e.level = f"raised {why}", e.level + 1
                continue
            if e.on_fast and not e.shared:
                e.reason = f"raised {why}"
            e.level += 1
            if e.method is None:
                plan.residual.extend(n for n in e.names.values() if n not in plan.residual)
        moved: set[nn.Module] = set(errors)
        for name, why in bad.items():
            holders = [(m, e) for m, e in plan.hooked.items() if name in e.names.values()]
            on_rule = [(m, e) for m, e in holders if e.on_fast and m not in moved]
            if on_rule:
                for m, e in on_rule:
                    e.reason, e.level = (e.reason if e.shared else why), e.level + 1
                    e.suspects.add(name)
                    moved.add(m)
            elif not any(m in moved for m, _ in holders) and name not in plan.residual:
                plan.residual.append(name)
        order = list(self.problem.params)
        plan.residual.sort(key=order.index)
        return shared

    @staticmethod
    def _restore_rules(plan: Plan) -> bool:
        """A rule that disagreed only on parameters the fallback got wrong too was not at fault (the parameter
        has a use the hooks cannot see): give the module its rule back for the rest, once."""
        restored = False
        for e in plan.hooked.values():
            if (e.found is not None and e.level == 1 and not e.shared and e.suspects and not e.restored
                    and e.suspects <= set(plan.residual) and e.reason.startswith("disagrees")):
                e.level, e.reason, e.restored = 0, "", True
                restored = True
        return restored

    # ------------------------------------------------------------------ the pass
    def _pass(self, plan: Plan, batch: tuple[Tensor, ...], start: int, graph: bool,
              errors: dict[nn.Module, str] | None = None, residual: bool = True) -> tuple[list[Factor], Tensor]:
        """Factors of one batch under ``plan``. With ``errors``, a module whose method raises is recorded there
        (and skipped) instead of failing the pass."""
        residual_set = set(plan.residual)
        active = {m: e for m, e in plan.hooked.items()
                  if e.method is not None and any(n not in residual_set for n in e.names.values())}
        if not active:  # no rule applies: skip the hooked pass
            y = None
            factors: list[Factor] = []
        else:
            factors, y = self._hooked_pass(plan, active, batch, start, graph, errors, residual_set)
        if residual and plan.residual:
            if y is None:
                jac, y = self._residual_jacobians(plan, batch, start, graph)
                factors.extend(dense_by_layer(self.problem, jac))
            else:
                factors.extend(self._residual(plan, batch, graph))
        assert y is not None or not residual
        if y is None:  # verification of an all-residual plan: y from a plain call
            y = checked_output(self.problem, self.problem.call(batch), batch, start)
        return factors, y if graph else y.detach()

    def _residual_jacobians(self, plan: Plan, batch: tuple[Tensor, ...], start: int, graph: bool
                            ) -> tuple[dict[str, Tensor], Tensor]:
        if plan.residual_loop:
            return loop.jacobians(self.problem, batch, plan.residual, start, graph=graph)
        jac, y = functorch.jacobians(self.problem, batch, plan.residual, graph=graph)
        return jac, y

    def _residual(self, plan: Plan, batch: tuple[Tensor, ...], graph: bool) -> list[Factor]:
        jac, _ = self._residual_jacobians(plan, batch, 0, graph)
        return dense_by_layer(self.problem, jac)

    def _hooked_pass(self, plan: Plan, active: dict[nn.Module, Entry], batch: tuple[Tensor, ...], start: int,
                     graph: bool, errors: dict[nn.Module, str] | None, residual_set: set[str]
                     ) -> tuple[list[Factor], Tensor]:
        B = batch[0].shape[0]
        calls: dict[nn.Module, list[Call]] = {m: [] for m in active}
        untapped: list[tuple[Tensor, int]] = []  # outputs that are their own signal's leaf, with their version

        def hook(mod: nn.Module, args: tuple, kwargs: dict, out: object) -> object:
            with _quiet(mode):  # the hook's own operations are no use of a tracked parameter (see _record)
                return _hook(mod, args, kwargs, out)

        def _hook(mod: nn.Module, args: tuple, kwargs: dict, out: object) -> object:
            # Detached unless graph: the rules need values only, and the factors must not keep the graph alive.
            if graph:
                call = Call(args, kwargs, graph=True)
            else:
                call = Call(_map(_detach, args), _map(_detach, kwargs))
            flat = _leaves(args, kwargs)
            call.batched, call.out_batched, fold = plan.batched_for(mod, len(calls[mod]), len(flat))
            call.batch_size = B * fold  # a folded call: its rule sees the B*k rows as its samples
            shared = (_expands(plan, active[mod]) and B > 1
                      and (_lookup(mod) or not _has_batched(flat, call.batched, B)))
            # One output tensor computed here: autograd returns d y / d output for the tensor itself (no tap:
            # a zero leaf added to every output cost 20 % of a small ResNet's forward and backward), unless a
            # later operation modifies it in place, which its version counter tells after the forward.
            alone = not graph and not plan.tapped and type(out) is Tensor

            def tap(t: object) -> object:
                if isinstance(t, Tensor) and t.is_floating_point():
                    if shared:
                        with _loud(mode):  # recorded, as at planning
                            t = _expand(t, B)
                    if alone and t.grad_fn is not None and all(t is not a for a in flat):
                        untapped.append((t, t._version))
                        call.leaves.append(t)
                        return t
                    # Adding a zero leaf lets autograd return d y / d output even if later ops are in place.
                    z = torch.zeros_like(t, requires_grad=True)
                    call.leaves.append(z)
                    if mode is not None and id(t) in mode.watch:  # a tracked parameter's use: still tracked
                        return mode.passthrough(t, z)
                    return t + z
                return t

            call.output = out if graph else _map(_detach, out)
            new = _map(tap, out)
            calls[mod].append(call)
            return new

        mode = None if graph else self._free_mode(plan, active, B)
        with _hooks(plan, hook, active), mode or contextlib.nullcontext():
            raw = self.problem.call(batch)
        y = checked_output(self.problem, raw, batch, start)
        if any(t._version != v for t, v in untapped):  # modified in place after its module: tap every output
            plan.tapped = True
            del raw, y, calls, untapped
            return self._hooked_pass(plan, active, batch, start, graph, errors, residual_set)
        if mode is not None:  # the free-parameter operations' taps get their signals like module outputs
            for m, uses in mode.ops.items():
                calls.setdefault(_OpKey(m), []).extend(u.call for u in uses)
        leaves = [z for cs in calls.values() for c in cs for z in c.leaves]
        d = y.shape[1]
        per_c: list[tuple] = []
        batched = _batched_signals(y, leaves) if leaves and d > 1 and not graph else None
        if leaves and batched is None:
            for c in range(d):
                per_c.append(torch.autograd.grad(y[:, c].sum(), leaves, retain_graph=graph or c < d - 1,
                                                 create_graph=graph, allow_unused=True))
        k = 0
        for m, cs in calls.items():
            e = active.get(m)  # type: ignore[call-overload]
            rule = e.method[1] if e is not None and e.method is not None and not graph and d > 1 else None
            for call in cs:
                for j, z in enumerate(call.leaves):
                    axis = (call.out_batched or {}).get(j, 0)  # the rules get signals [B, d, ...]
                    # the one copy that assembles the d outputs' signals stores them as the rule reads them
                    order = signal_layout(rule, m, z.dim() + 1) if rule is not None and j == 0 else None
                    if batched is not None:  # [d, *z.shape] -> [B, d, ...]
                        delta = _stored(batched[k].movedim(axis + 1, 0), order)
                    else:
                        parts = [(torch.zeros_like(z) if g[k] is None else g[k]).movedim(axis, 0) for g in per_c]
                        if d == 1:  # a view
                            delta = parts[0].unsqueeze(1)
                        elif order is None:
                            delta = torch.stack(parts, dim=1)
                        else:
                            delta = _empty_stored((z.shape[axis], d, *parts[0].shape[1:]), order, z)
                            for c, part in enumerate(parts):
                                delta[:, c].copy_(part)
                    call.deltas.append(delta if graph else delta.detach())
                    k += 1
        factors: list[Factor] = []
        shapes = {n: p.shape for n, p in self.problem.params.items()}
        for m, e in active.items():
            names = {loc: full for loc, full in e.names.items() if full not in residual_set}
            if not calls[m] or not calls[m][0].deltas:
                continue
            rule = e.method[1]  # type: ignore[index]
            if rule is free_params:
                if mode is None:  # graph mode: the fallback keeps the factors differentiable
                    rule = fallback
                else:
                    uses, broken = mode.ops.get(m, []), mode.broken.get(m)

                    def rule(mod, layer, cs, nm, uses=uses, broken=broken):  # noqa: ANN001
                        return free_params(mod, layer, cs, nm, uses, broken, strict=errors is not None, batch=B)

                    rule.of_samples = True  # its factors have the B samples already
            if errors is None:
                factors.extend(self._run_rule(e, m, rule, calls[m], names, shapes, B))
                continue
            try:  # a malformed factor is the rule's error, caught here rather than where the factor is used
                factors.extend(_applied(rule, m, e, calls[m], names, B, shapes, strict=True))
            except Exception as err:  # noqa: BLE001  (a failing rule is planned around, never trusted)
                errors[m] = f"{type(err).__name__}: {err}"
        factors = _merge_tied(factors, plan.tied - residual_set)
        return factors, y

    @staticmethod
    def _run_rule(e: Entry, m: nn.Module, rule: Rule, calls: list[Call], names: dict[str, str],
                  shapes: dict[str, torch.Size], B: int) -> list[Factor]:
        """A planned method on one chunk. Should a verified rule still raise (or return a malformed factor) on
        a later chunk (an assumption the probes did not exercise), the module steps down to its exact fallback
        from then on, with a warning, rather than failing the whole computation."""
        try:
            return _applied(rule, m, e, calls, names, B, shapes, strict=False)
        except Exception as err:
            if e.method is None or e.method[1] is fallback_loop:
                raise
            was = e.method[0]
            e.level = next(i for i, (n, _) in enumerate(e.chain) if n == "fallback")
            if e.method[0] == was:  # the vmap fallback itself failed: the per-sample loop
                e.level += 1
            warnings.warn(f"{was!r} for module {e.layer or 'model'!r} ({type(m).__name__}) raised on a later chunk "
                          f"({type(err).__name__}: {err}); computing this module with the exact {e.method[0]} "
                          "instead", FallbackWarning, stacklevel=6)
            return Structured._run_rule(e, m, e.method[1], calls, names, shapes, B)

    def factors(self, batch: tuple[Tensor, ...], start: int = 0) -> tuple[list[Factor], Tensor]:
        sig = self._signature(batch)
        plan = self.plans.get(sig)
        if plan is None:
            model = self.problem.model
            # per mode: a plan for the graph (SimilarityLoss) computes batch-shared modules differently
            key = plan_cache.key(self.problem, (sig, self.graph))
            plan = plan_cache.load(model, key)
            out = None if plan is None else self._reused(plan, batch, start)
            if out is not None:  # a plan of an earlier Similarity, verified again on this batch
                self.plans[sig] = self.plan = plan
                for note in plan.notes:
                    warnings.warn(note, FallbackWarning, stacklevel=4)
                return out
            plan_cache.drop(model, key)
            graph, self.graph = self.graph, False
            self._planning_graph = graph
            try:
                plan = self._make_plan(batch)
            finally:
                self.graph = graph
                self._ref = None
            for note in plan.notes:
                warnings.warn(note, FallbackWarning, stacklevel=4)
            plan_cache.store(model, key, plan)
            self.plans[sig] = plan
        self.plan = plan
        return self._pass(plan, batch, start, self.graph)

    def _reused(self, plan: Plan, batch: tuple[Tensor, ...], start: int) -> tuple[list[Factor], Tensor] | None:
        """The factors of ``batch`` under a stored plan, if they pass the planning check on its first samples (run
        one by one through autograd); None when any rule raises or disagrees (the caller plans afresh)."""
        errors: dict[nn.Module, str] = {}
        try:
            factors, y = self._pass(plan, batch, start, self.graph, errors=errors)
            if errors:
                return None
            k = min(batch[0].shape[0], _REUSE_PROBE)
            idx = torch.arange(k, device=y.device)
            bad = self._disagreements([f.select(idx) for f in factors], y.dtype, tuple(t[:k] for t in batch))
        except Exception:  # noqa: BLE001  (whatever went wrong, a fresh plan decides as it would without the cache)
            return None
        finally:
            self._ref = None
        return None if bad else (factors, y)


_FREE = "free parameters"


@dataclass(frozen=True)
class _OpKey:
    """Key of the free-parameter operations of a module among the captured calls."""

    module: nn.Module


def _validated(factors: object, names: dict[str, str], shapes: dict[str, torch.Size], B: int, d: int,
               strict: bool) -> list[Factor]:
    """The factors a rule returned for one module, if they are well-formed; else a ValueError naming what is
    wrong, so that a malformed factor is the rule's error (its module steps down) rather than a failure of
    whoever uses it later. Checked: each names only the module's own parameters (each at most once) with their
    shapes, has the batch size B and d outputs, and (Dense, Outer) tensors of consistent shapes; ``strict``
    (planning) also checks that an Embedding factor's indices lie in its vocabulary (a device sync)."""
    if not isinstance(factors, (list, tuple)):
        raise TypeError(f"the rule returned {type(factors).__name__}, not a list of factors")
    own, seen, out = set(names.values()), set(), []
    for f in factors:
        params = getattr(f, "params", None)
        if not isinstance(params, list):
            raise TypeError(f"the rule returned {type(f).__name__}, not a factor")
        for name, shape in params:
            if name not in own or name in seen:
                raise ValueError(f"a factor names {name!r}, " + ("twice" if name in seen else
                                 f"not one of the parameters handed to the rule {sorted(own)}"))
            if tuple(shape) != tuple(shapes[name]):
                raise ValueError(f"a factor gives {name!r} the shape {tuple(shape)}, not {tuple(shapes[name])}")
            seen.add(name)
        if isinstance(f, Dense):
            size = sum(math.prod(shape) for _, shape in params)
            if f.g.dim() != 3 or tuple(f.g.shape) != (B, d, size):
                raise ValueError(f"a Dense factor of {tuple(f.g.shape)}, expected [B, d, n] = {(B, d, size)}")
        elif isinstance(f, Outer):
            _check_outer(f, B, d, strict)
        elif f.batch_size != B or f.outputs != d:
            raise ValueError(f"a factor of batch size {f.batch_size} and {f.outputs} outputs, expected {B} and {d}")
        if params:
            out.append(f)
        elif isinstance(f, (Dense, Outer)):  # names no parameter: contributes nothing (checked to be empty)
            continue
        else:
            raise ValueError(f"a {type(f).__name__} factor names no parameter")
    return out


def _check_outer(f: Outer, B: int, d: int, strict: bool) -> None:
    """An Outer factor's a [B, G, T, m] (or int indices [B, G, T]) and delta [B, d, G, T, n] fit each other and
    its weight [G n, m_w] (m_w = m without the ones column of the bias) and bias [G n]."""
    if f.delta.dim() != 5 or tuple(f.delta.shape[:2]) != (B, d):
        raise ValueError(f"an Outer factor's signals are {tuple(f.delta.shape)}, expected [B, d, G, T, n] with "
                         f"B = {B}, d = {d}")
    _, _, G, T, n = f.delta.shape
    if f.indexed:
        if tuple(f.a.shape) != (B, G, T) or f.a.dtype != torch.int64 or f.vocab <= 0 or f.bias is not None:
            raise ValueError(f"an Outer factor's indices are {tuple(f.a.shape)} {f.a.dtype} (vocabulary {f.vocab}), "
                             f"expected int64 [B, G, T] = {(B, G, T)} without a bias")
        if strict and f.a.numel() and (int(f.a.min()) < 0 or int(f.a.max()) >= f.vocab):
            raise ValueError(f"an Outer factor's indices leave its vocabulary of {f.vocab}")
        m_w = f.vocab
    else:
        if f.a.dim() != 4 or tuple(f.a.shape[:3]) != (B, G, T):
            raise ValueError(f"an Outer factor's inputs are {tuple(f.a.shape)}, expected [B, G, T, m] with "
                             f"[B, G, T] = {[B, G, T]}")
        m_w = f.a.shape[3] - (f.bias is not None)
    weight_fits = m_w == 0 if f.weight is None else math.prod(f.weight[1]) == G * n * m_w
    if not weight_fits or (f.bias is not None and math.prod(f.bias[1]) != G * n):
        raise ValueError(f"an Outer factor of {G} groups, {n} outputs and {m_w} inputs does not fit its parameters "
                         f"{[(name, tuple(shape)) for name, shape in f.params]}")


def _probe(batch: tuple[Tensor, ...], n: int) -> tuple[Tensor, ...]:
    """n samples of the batch (repeated cyclically when it has fewer)."""
    B = batch[0].shape[0]
    if B >= n:
        return tuple(t[:n] for t in batch)
    idx = torch.arange(n, device=batch[0].device) % B
    return tuple(t[idx] for t in batch)


def _batched_signals(y: Tensor, leaves: list[Tensor]) -> list[Tensor] | None:
    """d y[:, c].sum() / d leaf for all d outputs in one vmapped backward pass ([d, *leaf.shape] per leaf), or
    None where autograd cannot batch it (an operation without a batching rule: the caller runs d passes)."""
    d = y.shape[1]
    basis = torch.eye(d, dtype=y.dtype, device=y.device)[:, None, :].expand(d, *y.shape)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a slow per-sample fallback of vmap: d plain passes instead
            grads = torch.autograd.grad(y, leaves, basis, retain_graph=True, allow_unused=True,
                                        is_grads_batched=True)
    except Exception:  # noqa: BLE001  (vmap could not run this backward: the sequential passes are exact)
        return None
    return [torch.zeros(d, *z.shape, dtype=z.dtype, device=z.device) if g is None else g
            for g, z in zip(grads, leaves, strict=True)]


def _empty_stored(shape: tuple[int, ...], order: tuple[int, ...], like: Tensor) -> Tensor:
    """An uninitialised tensor of ``shape`` whose axes are stored in ``order`` (outermost first)."""
    inverse = sorted(range(len(order)), key=order.__getitem__)
    return like.new_empty([shape[i] for i in order]).permute(inverse)


def _stored(t: Tensor, order: tuple[int, ...] | None) -> Tensor:
    """A copy of ``t`` (same shape) with its axes stored in ``order``; None: contiguous."""
    if order is None:
        return t.contiguous()
    return _empty_stored(tuple(t.shape), order, t).copy_(t)


def _norms(tensors: list[Tensor]) -> list[float]:
    """The 2-norm of each tensor (accumulated in float64), in a few vectorised operations instead of one per
    tensor: one ``_foreach_norm(..., dtype=float64)`` (float32 accumulation would underflow: norms of 1e-25-sized
    gradients read 0) where the tensors share a dtype and device and torch has it, else a concatenation."""
    if not tensors:
        return []
    foreach = getattr(torch, "_foreach_norm", None)
    if foreach is not None and all(t.dtype == tensors[0].dtype and t.device == tensors[0].device for t in tensors):
        try:
            with torch.no_grad():
                return torch.stack(foreach(tensors, 2, dtype=torch.float64)).tolist()
        except (TypeError, RuntimeError):  # older torch (no dtype argument) or an unsupported dtype
            pass
    flat = torch.cat([t.detach().reshape(-1).to(torch.float64) for t in tensors])
    sizes = torch.tensor([t.numel() for t in tensors], device=flat.device)
    seg = torch.repeat_interleave(torch.arange(len(tensors), device=flat.device), sizes)
    return flat.new_zeros(len(tensors)).index_add_(0, seg, flat * flat).sqrt().tolist()


def _lookup(module: nn.Module) -> bool:
    """An Embedding's output of leading size 1 is a lookup of ids shared by the batch, whatever its other arguments
    (BART's decoder positions take the batched ids for their shape only): expanded to B like position embeddings,
    so that the Embedding rule gets per-sample signals."""
    return isinstance(module, nn.Embedding)


def _has_batched(flat: list, axes: dict[int, int] | None, B: int) -> bool:
    if axes is not None:
        return bool(axes)
    return any(isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == B for t in flat)


def _shape(t: object) -> tuple[int, ...] | None:
    return tuple(t.shape) if isinstance(t, Tensor) else None


def _call_axes(small: list, large: list, n_small: int, n_large: int) -> tuple[int, dict[int, int], int]:
    """(separator, {leaf: batch axis}, fold) of one module call from its leaves' shapes at the two probe sizes
    (argument leaves, -1, floating output leaves). Leaves with a batch axis of their own decide; a call with
    none, whose leaves' axis 0 is instead k times the batch size for one k > 1 (an output among them), runs on a
    folded batch [B*k, ...] (HF OPT's [B*T, C] feed-forward, Swin's [B*nW, N, C] windows): batch-major
    (``view(B*k, ...)``, row b*k + j of sample b) is assumed, and the plan's check rejects any other order."""
    sep = small.index(-1)
    pairs = list(zip(small, large, strict=True))
    axes = {i: ax for i, (s, t) in enumerate(pairs) if (ax := _batch_axis(s, t, n_small, n_large)) is not None}
    if axes:
        return sep, axes, 1
    folds = {i: k for i, (s, t) in enumerate(pairs) if (k := _fold(s, t, n_small, n_large)) > 1}
    if len(set(folds.values())) == 1 and any(i > sep for i in folds):
        return sep, dict.fromkeys(folds, 0), next(iter(folds.values()))
    return sep, {}, 1


def _fold(small: object, large: object, n_small: int, n_large: int) -> int:
    """k where axis 0 alone follows the batch as k times its size (n*k at both probe sizes), else 0."""
    if not isinstance(small, tuple) or not isinstance(large, tuple) or len(small) != len(large) or not small:
        return 0
    if small[1:] != large[1:] or small[0] % n_small or large[0] % n_large:
        return 0
    k = small[0] // n_small
    return k if k == large[0] // n_large else 0


def _applied(rule: Rule, m: nn.Module, e: Entry, calls: list[Call], names: dict[str, str], B: int,
             shapes: dict[str, torch.Size], strict: bool) -> list[Factor]:
    """The factors of ``rule`` on a module's calls, for the B samples. A rule sees the B*k rows of folded calls as
    its samples; its factors are folded back (each sample's rows summed, :meth:`Factor.folded`). Calls on
    different folds (B, B*k, B*k') go to the rule in groups, whose gradients of a parameter are then summed
    (one explicit factor per parameter). The free-parameter operations give factors of B samples already. A
    malformed factor, or one of any other size, raises (``_validated``: the module steps down)."""
    d = calls[0].deltas[0].shape[1]
    if getattr(rule, "of_samples", False):
        return _validated(rule(m, e.layer, calls, names), names, shapes, B, d, strict)
    groups: dict[int, list[Call]] = {}
    for c in calls:
        groups.setdefault(c.batch_size or B, []).append(c)
    parts = []
    for n, cs in groups.items():
        found = _validated(rule(m, e.layer, cs, names), names, shapes, n, d, strict)
        parts.extend(found if n == B else [f.folded(B) for f in found])
    return parts if len(groups) == 1 else _merge_tied(parts, set(names.values()))


def _batch_axis(small: tuple[int, ...] | None, large: tuple[int, ...] | None, n_small: int, n_large: int
                ) -> int | None:
    """The axis that holds the batch: the one that alone follows the batch size between the two probes."""
    if not isinstance(small, tuple) or not isinstance(large, tuple) or len(small) != len(large) or small == large:
        return None
    moved = [i for i, (s, t) in enumerate(zip(small, large, strict=True)) if s != t]
    if len(moved) == 1 and small[moved[0]] == n_small and large[moved[0]] == n_large:
        return moved[0]
    return None


def _expands(plan: Plan, entry: Entry) -> bool:
    """Whether the batch-shared outputs of the module of ``entry`` are expanded to the batch (``Plan.expand``)."""
    return plan.expand == 2 or (plan.expand == 1 and (entry.method or ("",))[0] != _FREE)


def _expand(t: object, B: int) -> object:
    if isinstance(t, Tensor) and t.is_floating_point() and t.dim() > 0 and t.shape[0] == 1:
        return t.expand(B, *t.shape[1:])
    return t


def _quiet(mode: FreeUses | None) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext() if mode is None else mode.quiet()


def _loud(mode: FreeUses | None) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext() if mode is None else mode.quiet(False)


def _module_of(plan: Plan, entry: Entry) -> nn.Module:
    return next(m for m, e in plan.hooked.items() if e is entry)


def _functorch_runs(problem: Problem, probe: tuple[Tensor, ...]) -> bool:
    try:
        functorch.jacobians(problem, probe[:1], list(problem.params)[:1])
        return True
    except Exception:  # noqa: BLE001
        return False


@contextlib.contextmanager
def _no_fastpath() -> Iterator[None]:
    """Fused inference fast paths (nn.TransformerEncoderLayer, nn.MultiheadAttention) call no submodule: off."""
    mha = getattr(torch.backends, "mha", None)
    get, set_ = getattr(mha, "get_fastpath_enabled", None), getattr(mha, "set_fastpath_enabled", None)
    if get is None or set_ is None:
        yield
        return
    was = get()
    set_(False)
    try:
        yield
    finally:
        set_(was)


@contextlib.contextmanager
def _hooks(plan: Plan, hook, modules: dict | None = None) -> Iterator[None]:
    handles = [m.register_forward_hook(hook, with_kwargs=True) for m in (plan.hooked if modules is None else modules)]
    try:
        with _no_fastpath():
            yield
    finally:
        for h in handles:
            h.remove()


_LEAF_TYPES = (Tensor, nn.Parameter, int, float, bool, str, type(None))


def _simple(items: object) -> bool:
    """Whether every item is a pytree leaf of a plain type (no container to flatten)."""
    return all(type(x) in _LEAF_TYPES for x in items)


def _leaves(args: tuple, kwargs: dict) -> list:
    """``tree_flatten((args, kwargs))[0]``, without the pytree machinery for the common flat calls."""
    if _simple(args) and _simple(kwargs.values()):
        return [*args, *kwargs.values()]
    return tree_flatten((args, kwargs))[0]


def _map(fn, tree: object) -> object:  # noqa: ANN001
    """``tree_map(fn, tree)``, fast for a tensor and for flat tuples and dicts of plain leaves."""
    if type(tree) in _LEAF_TYPES:
        return fn(tree)
    if type(tree) is tuple and _simple(tree):
        return tuple(fn(t) for t in tree)
    if type(tree) is dict and _simple(tree.values()):
        return {k: fn(v) for k, v in tree.items()}
    return tree_map(fn, tree)


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
