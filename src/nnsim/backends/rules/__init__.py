"""Per-layer rules of the structured backend: one small module per layer family.

A rule turns the captured calls of one module (its inputs and the back-propagated signals of its
outputs) into gradient factors for the module's own selected parameters. Rules are registered by module
class and apply only when the subclass keeps the registered ``forward`` (a subclass that overrides it
gets the generic fallback instead).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from ...factors import Factor, Outer


@dataclass
class Call:
    """One forward call of a hooked module.

    ``deltas`` holds, for each floating tensor of the output (pytree order), the signals
    d y_c / d output of every analysed output c: [B, d, *output_shape[1:]]. ``graph``: the arguments and
    signals are part of the autograd graph of the parameters, and the factors built from them must stay so.
    """

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    leaves: list[Tensor] = field(default_factory=list)
    deltas: list[Tensor] = field(default_factory=list)
    graph: bool = False

    def input(self, name: str = "input") -> Any:
        return self.args[0] if self.args else self.kwargs[name]


# rule(module, layer name, calls, {local param name: full name}) -> factors
Rule = Callable[[nn.Module, str, list[Call], dict[str, str]], list[Factor]]
RULES: dict[type, Rule] = {}
# Classes whose rule also receives the parameters of their never-called children, by dotted local name
# (e.g. "out_proj.weight" of nn.MultiheadAttention, whose out_proj is used through F.linear).
CLAIMS_CHILDREN: set[type] = set()


def register(*classes: type, children: bool = False) -> Callable[[Rule], Rule]:
    def deco(fn: Rule) -> Rule:
        for cls in classes:
            RULES[cls] = fn
            if children:
                CLAIMS_CHILDREN.add(cls)
        return fn

    return deco


def find_rule(module: nn.Module) -> Rule | None:
    for cls in type(module).__mro__:
        if cls in RULES:
            return RULES[cls] if type(module).forward is cls.forward else None
    return None


def outer(layer: str, module: nn.Module, a: Tensor, delta: Tensor, names: dict[str, str]) -> Outer:
    """An Outer factor for a weight [G*n, m] and optional bias [G*n], from a [B, G, T, m], delta [B, d, G, T, n]."""
    weight = (names["weight"], module.weight.shape) if "weight" in names else None
    bias = (names["bias"], module.bias.shape) if "bias" in names and module.bias is not None else None
    if weight is None:
        a = a[..., :0]
    if bias is not None:
        a = nn.functional.pad(a, (0, 1), value=1.0)
    return Outer(layer, a, delta, weight, bias)


from . import activation, attention, conv, embedding, linear, norm, recurrent  # noqa: E402,F401  (registration side effects)
