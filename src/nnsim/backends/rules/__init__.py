"""Per-layer rules of the structured backend: one small module per layer family.

A rule turns the captured calls of one module (its inputs and the back-propagated signals of its
outputs) into gradient factors for the module's selected parameters. The contract (see docs/method.md):

* ``rule(module, layer, calls, names) -> list[Factor]``: ``calls`` are the module's forward calls of one
  chunk of B samples (:class:`Call`: ``args``, ``kwargs``, and ``deltas[k]`` = d y_c / d output_k,
  [B, d, *output_k.shape[1:]] for each floating output tensor, pytree order); ``names`` maps the local
  parameter names the rule must handle to their full names. It returns factors whose ``params`` are
  exactly those full names.
* Every rule is verified numerically against autograd on probe samples before it is used; a rule that
  raises or disagrees sends only its own module to the exact per-module fallback, with one
  :class:`nnsim.errors.FallbackWarning`. A rule should therefore check its assumptions and raise a
  clear error rather than guess.

Rules are found by class (the most derived registered class in the MRO). A subclass that overrides the
registered ``forward`` still gets the rule, *tentatively*: it is accepted when the verification agrees,
and silently replaced by the fallback when it does not (it never claimed that forward). Duck-typed rules
(``register_match``) are tentative too. ``children=True`` lets a rule claim the parameters of children
that are never called on their own (e.g. ``MultiheadAttention.out_proj``, used functionally by its
parent): they arrive in ``names`` under dotted local names (``"out_proj.weight"``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from ...factors import Dense, Factor, Outer


class NoBatchAxis(ValueError):  # noqa: N818  (a routing signal as much as an error)
    """Raised by a rule whose module's input or output has no batch axis 0 of size B. Typically the module was
    called on inputs shared by the whole batch (T5's relative-position buckets [T, T]), so that its output
    reaches the samples only through broadcasting later on: its signals are sums over the batch, from which no
    per-sample gradient can be told apart. The structured backend then computes the module's parameters from
    the operations where that output meets the batch (the free-parameter tracking of rules/free.py), exactly
    and without a warning; should that fail too (e.g. a batch folded into axis 0, [B * T, C]), the module gets
    its exact fallback, with a warning giving this error."""


@dataclass
class Call:
    """One forward call of a hooked module.

    ``deltas`` holds, for each floating tensor of the output (pytree order), the signals
    d y_c / d output of every analysed output c: [B, d, *output_shape[1:]]. ``graph``: the arguments and
    signals are part of the autograd graph of the parameters, and the factors built from them must stay so.
    ``batch_size``: B, or B*k for a call on a batch folded with another axis ([B*k, ...], row b*k + j of sample
    b: HF OPT's [B*T, C] feed-forward, Swin's windows), whose rows the rule treats as its samples (the backend
    folds its factors back to B, :meth:`nnsim.factors.Dense.folded`). ``batched``: {position in
    ``tree_flatten((args, kwargs))``: batch axis} of the tensors that carry the batch (found at planning by
    probing two batch sizes; None: unknown); ``out_batched`` the same for the floating output leaves (their
    ``deltas`` always have the batch first).
    """

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    leaves: list[Tensor] = field(default_factory=list)
    deltas: list[Tensor] = field(default_factory=list)
    graph: bool = False
    batch_size: int = 0
    batched: dict[int, int] | None = None
    out_batched: dict[int, int] | None = None  # the same for the floating output leaves (``deltas`` order)
    output: Any = None  # what the module returned (detached unless graph); None: not captured

    def module_output(self, module: nn.Module) -> Any:
        """The module's output of this call, detached: the captured one, else the module run again."""
        if self.output is not None:
            return tree_map(lambda t: t.detach() if isinstance(t, Tensor) else t, self.output)
        with torch.no_grad():
            return module(*self.args, **self.kwargs)

    def input(self, name: str = "input") -> Any:
        return self.args[0] if self.args else self.kwargs[name]

    def batched_signals(self) -> Tensor:
        """The first output's signals [B, d, ...]; raises :class:`NoBatchAxis` where their axis 0 is not the
        batch: a module whose input and output are shared by the batch (DeBERTa's ``pos_key_proj`` of the
        relative position table [1, 2k, C]) has signals summed over the samples."""
        B, delta = self.batch_size or self.deltas[0].shape[0], self.deltas[0]
        if delta.shape[0] != B:
            raise NoBatchAxis(f"output signals {tuple(delta.shape)} have no batch axis 0 of size {B}")
        return delta

    def batched_input(self, name: str = "input") -> Tensor:
        """The first input with its batch on axis 0: a batch-broadcast input (leading size 1, e.g. position
        ids [1, T]) is expanded to B; any other leading size, or one of B that planning saw not follow the
        batch size, raises :class:`NoBatchAxis` (the rule cannot place the batch)."""
        x = self.input(name)
        B = self.batch_size or self.deltas[0].shape[0]
        if not isinstance(x, Tensor) or x.dim() == 0:
            raise ValueError(f"expected a tensor input with a batch axis, got {type(x).__name__}")
        axis = (self.batched or {}).get(0, 0) if self.args else 0
        if axis:  # e.g. a sequence-first [T, B, C] input: batch first, like the signals
            return x.movedim(axis, 0)
        if x.shape[0] == 1:
            return x.expand(B, *x.shape[1:])
        # planning saw that axis 0 does not follow the batch size (buckets [T, T] with T == B are no batch)
        unbatched = self.batched is not None and self.args and 0 not in self.batched
        if x.shape[0] == B and not unbatched:
            return x
        raise NoBatchAxis(f"input of shape {tuple(x.shape)} has no batch axis 0 of size {B}")


def tensor(module: nn.Module, local: str) -> Tensor | None:
    """The tensor a module's forward reads under a local (dotted) name: a parameter, or a tensor computed on access
    from other parameters (``torch.nn.utils.parametrize``; rules/parametrized.py), which ``get_parameter`` and
    ``named_parameters`` do not list. None where the attribute is None (e.g. a layer without bias)."""
    owner, _, name = local.rpartition(".")
    return getattr(module.get_submodule(owner) if owner else module, name)


# rule(module, layer name, calls, {local param name: full name}) -> factors
Rule = Callable[[nn.Module, str, list[Call], dict[str, str]], list[Factor]]

# (module, number of axes of its first output's signals [B, d, *S]) -> the order in which those axes are stored,
# outermost first (a permutation of range(ndim); None: [B, d, *S] itself). The structured backend assembles the d
# outputs' signals once, in the order the rule's products read, so that the rule's reshapes are views instead
# of a second copy of the signals (docs/benchmarks.md, "Issue 14, part 8"). Only a stride change: the signals'
# shape, values and bytes are the same whatever the order, and every rule must accept any strides.
SignalLayout = Callable[[nn.Module, int], tuple[int, ...] | None]
SIGNAL_LAYOUTS: dict[Rule, SignalLayout] = {}


def signal_layout(rule: Rule, module: nn.Module, ndim: int) -> tuple[int, ...] | None:
    """The storage order of ``rule``'s signals [B, d, *S] of ``ndim`` axes (None: contiguous [B, d, *S])."""
    order = SIGNAL_LAYOUTS[rule](module, ndim) if rule in SIGNAL_LAYOUTS else None
    return None if order is None or tuple(order) == tuple(range(ndim)) else tuple(order)


def d_before_last(module: nn.Module, ndim: int) -> tuple[int, ...]:
    """[B, d, *S, n] stored as [B, *S, d, n]: an affine map's product reads the signals as [B, T, d n]."""
    return (0, *range(2, ndim - 1), 1, ndim - 1)


@dataclass(frozen=True)
class Registered:
    rule: Rule
    children: bool = False


RULES: dict[type, Registered] = {}
MATCHERS: list[tuple[Callable[[nn.Module], bool], Registered]] = []


def register(*classes: type, children: bool = False) -> Callable[[Rule], Rule]:
    """Decorator: ``rule`` handles modules of these classes (and, tentatively, subclasses with their own
    forward). ``children=True``: it also receives the parameters of children never called on their own."""

    def deco(fn: Rule) -> Rule:
        for cls in classes:
            RULES[cls] = Registered(fn, children)
        return fn

    return deco


def register_match(predicate: Callable[[nn.Module], bool], children: bool = False) -> Callable[[Rule], Rule]:
    """Decorator for duck-typed rules (classes of libraries nnsim does not import, matched by name and
    attributes): tentative, i.e. kept only when the verification agrees."""

    def deco(fn: Rule) -> Rule:
        MATCHERS.append((predicate, Registered(fn, children)))
        return fn

    return deco


@dataclass(frozen=True)
class Found:
    rule: Rule
    children: bool
    tentative: bool


def find_rule(module: nn.Module) -> Found | None:
    for cls in type(module).__mro__:
        if cls in RULES:
            reg = RULES[cls]
            return Found(reg.rule, reg.children, tentative=type(module).forward is not cls.forward)
    for predicate, reg in MATCHERS:
        try:
            ok = predicate(module)
        except Exception:  # a predicate must never break planning
            ok = False
        if ok:
            return Found(reg.rule, reg.children, tentative=True)
    return None


def outer(layer: str, module: nn.Module, a: Tensor, delta: Tensor, names: dict[str, str],
          weight_transposed: bool = False) -> Outer:
    """An Outer factor for a weight [G*n, m] and optional bias [G*n], from a [B, G, T, m], delta [B, d, G, T, n]."""
    weight = (names["weight"], module.weight.shape) if "weight" in names else None
    bias = (names["bias"], module.bias.shape) if "bias" in names and module.bias is not None else None
    if weight is None:
        a = a[..., :0]
    if bias is not None:
        a = nn.functional.pad(a, (0, 1), value=1.0)
    return Outer(layer, a, delta, weight, bias, weight_transposed=weight_transposed)


def outer_or_dense(layer: str, module: nn.Module, a: Tensor, delta: Tensor, names: dict[str, str],
                   weight_transposed: bool = False, graph: bool = False) -> list[Factor]:
    """``outer(...)``, or, where the cost model would materialise it in both Gram modes anyway, the explicit
    gradients built at once: one batched GEMM per sample for the weight and a sum over positions for the bias,
    as two Dense factors (no concatenation copy; a Dense factor's self-kernel and mix are cheap, an Outer
    factor's self-kernel is a product over position pairs). ``graph``: keep the Outer factor (differentiable)."""
    weight = (names["weight"], module.weight.shape) if "weight" in names else None
    bias = (names["bias"], module.bias.shape) if "bias" in names and module.bias is not None else None
    B, d, G, T, n = delta.shape
    m = a.shape[-1] if weight is not None else 0
    # the cost model reads shapes only: ask it with a stand-in, so that the padded inputs are never built here
    stub = Outer(layer, a.new_zeros(()).expand(B, G, T, m + (bias is not None)), delta, weight, bias)
    if graph or not a.is_floating_point() or not (stub.prefers_dense("trace") and stub.prefers_dense("full")):
        return [outer(layer, module, a, delta, names, weight_transposed)]
    out: list[Factor] = []
    if weight is not None:
        dl = delta.permute(0, 2, 3, 1, 4).reshape(B * G, T, d * n)  # [B G, T, d n]
        xs = a.reshape(B * G, T, m)
        if weight_transposed:  # weight [m, G n]: per output c, a^T delta_c  -> [B, d, m, n]
            if G != 1:
                return [outer(layer, module, a, delta, names, weight_transposed)]
            g = (xs.transpose(1, 2) @ dl).view(B, m, d, n).transpose(1, 2)
        else:  # weight [G n, m]: delta_c^T a -> [B, d, G, n, m]
            g = (dl.transpose(1, 2) @ xs).view(B, G, d, n, m).transpose(1, 2)
        out.append(Dense(layer, g.reshape(B, d, -1), [weight]))
    if bias is not None:
        out.append(Dense(layer, delta.sum(3).reshape(B, d, G * n), [bias]))
    return out


# Registration side effects: each family module registers its rules.
from . import activation, attention, conv, embedding, linear, norm, recurrent  # noqa: E402,F401


def register_rule(module_type: type, rule: Rule, *, children: bool = False) -> Rule:
    """Public extension point: use ``rule`` for every module of ``module_type`` (and subclasses).

    ``rule(module, layer, calls, names) -> list[Factor]`` receives the module, its name, its captured
    :class:`Call` objects of one chunk (``args``, ``kwargs``, ``deltas[k]`` [B, d, *output_k.shape[1:]]) and
    ``{local name: full name}`` of the parameters to handle; it returns :class:`nnsim.factors.Dense` /
    :class:`nnsim.factors.Outer` factors for exactly those parameters. Before use it is verified against
    autograd on probe samples; if it raises or disagrees, the module gets the exact fallback and a
    :class:`nnsim.FallbackWarning`. Returns ``rule`` (usable as a decorator's body).
    """
    if not isinstance(module_type, type) or not issubclass(module_type, nn.Module):
        raise TypeError(f"module_type must be an nn.Module subclass, got {module_type!r}")
    if not callable(rule):
        raise TypeError(f"rule must be callable (module, layer, calls, names) -> factors, got {rule!r}")
    return register(module_type, children=children)(rule)
