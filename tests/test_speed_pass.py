"""Issue 14 part 8: the d outputs' signals are assembled once, stored in the order the Linear / HF Conv1D / Conv
rules' products read them (``rules.SIGNAL_LAYOUTS``), so that the rules' reshapes are views, not a second copy.

Against brute-force per-sample autograd in float64 (tests/oracles.py) at d = 1 and d = 3, with the rule (not
the fallback) proven used by ``describe()``, on both signal paths (one vmapped backward pass, d sequential
ones), with the explicit-gradient product forced and as the cost model chooses (an Outer factor then keeps the
permuted signals); and the no-copy claim itself: the product's [B G, T, d n] operand shares the signals' storage.
"""

from __future__ import annotations

import importlib

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings
from oracles import jacobian, kernel, rel_err
from torch import nn

import nnsim
from nnsim.backends import rules
from nnsim.backends.rules import conv as conv_rules
from nnsim.backends.rules import linear as linear_rules
from nnsim.factors import Outer

structured = importlib.import_module("nnsim.backends.structured")

torch.set_num_threads(1)


class Conv1D(nn.Module):
    """Hugging Face GPT-2's Conv1D (y = x W + b, weight [in, out]), written out: matched by name and shapes."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) / nx**0.5)
        self.bias = nn.Parameter(torch.randn(nf))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight + self.bias


class Affine(nn.Module):
    """[B, T, 4] -> Linear over positions -> tanh -> Conv1D over positions -> mean over positions -> [B, 3]."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 6)
        self.hf = Conv1D(3, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.hf(torch.tanh(self.lin(x))).mean(1)


def _spy(monkeypatch, module) -> list[bool]:  # noqa: ANN001
    """Record, for every ``outer_or_dense`` call of a rule module at d > 1, whether the signals' [B G, T, d n]
    view is a view (the layout did its work) rather than a copy."""
    views: list[bool] = []
    real = module.outer_or_dense

    def spy(layer, mod, a, delta, names, **kw):  # noqa: ANN001, ANN003, ANN202
        B, d, G, T, n = delta.shape
        if d > 1 and G == 1:
            dl = delta.permute(0, 2, 3, 1, 4).reshape(B * G, T, d * n)
            views.append(dl.untyped_storage().data_ptr() == delta.untyped_storage().data_ptr())
        return real(layer, mod, a, delta, names, **kw)

    monkeypatch.setattr(module, "outer_or_dense", spy)
    return views


def _exact(model: nn.Module, x: torch.Tensor, expect: dict[str, str]) -> None:
    model(x)
    for output in (None, lambda o, i: o[:, :1]):  # d = 3, d = 1
        G = jacobian(model, (x,), output=output)
        sim = nnsim.Similarity(model, output=output, progress=False)
        for _ in range(2):  # planned, then the kept plan
            assert rel_err(sim.kernel(x), kernel(G, G)) <= 1e-12
        assert {k: sim.describe()[k] for k in expect} == expect


@pytest.mark.parametrize("dense", [True, False], ids=["explicit", "cost-model"])
@pytest.mark.parametrize("vmapped", [True, False], ids=["vmap-signals", "sequential-signals"])
def test_affine_maps_over_positions_read_their_stored_signals_exactly(monkeypatch, dense, vmapped):
    if dense:
        monkeypatch.setattr(Outer, "prefers_dense", lambda self, mode: True)
    if not vmapped:
        monkeypatch.setattr(structured, "_batched_signals", lambda y, leaves: None)
    views = _spy(monkeypatch, linear_rules)
    torch.manual_seed(0)
    _exact(Affine().double(), torch.randn(5, 7, 4, dtype=torch.float64), {"lin": "linear", "hf": "conv1d_transposed"})
    assert views and all(views)


CONVS = [
    (lambda: nn.Conv2d(3, 5, 3, stride=2, padding=1), (3, 9, 9)),
    (lambda: nn.Conv2d(2, 4, (3, 2), padding="same", dilation=(1, 2), padding_mode="reflect", bias=False), (2, 7, 8)),
    (lambda: nn.Conv2d(4, 4, 3, padding=1, groups=4), (4, 8, 8)),  # depthwise
    (lambda: nn.Conv2d(3, 6, 3, stride=2, padding=1, groups=3), (3, 9, 9)),  # depthwise, channel multiplier 2
    (lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2), (4, 6, 6)),  # grouped: the contiguous signals
    (lambda: nn.Conv1d(3, 4, 3, stride=2, padding=2), (3, 11)),
    (lambda: nn.Conv1d(3, 3, 5, padding="same", groups=3, padding_mode="replicate"), (3, 9)),
]


@pytest.mark.parametrize("dense", [True, False], ids=["explicit", "cost-model"])
@pytest.mark.parametrize(("conv", "shape"), CONVS)
def test_convolutions_read_their_stored_signals_exactly(monkeypatch, conv, shape, dense):
    if dense:
        monkeypatch.setattr(Outer, "prefers_dense", lambda self, mode: True)
    views = _spy(monkeypatch, conv_rules)
    torch.manual_seed(1)
    model = nn.Sequential(conv(), nn.Tanh(), nn.Flatten(), nn.LazyLinear(3)).double()
    _exact(model, torch.randn(5, *shape, dtype=torch.float64), {"0": "conv", "3": "linear"})
    if conv().groups == 1:  # ungrouped convolutions' products read the stored signals without a copy
        assert views and all(views)


def test_the_layouts_are_the_ones_the_products_read():
    lin, dw, grouped = nn.Linear(2, 2), nn.Conv2d(4, 4, 3, groups=4), nn.Conv2d(4, 4, 3, groups=2)
    assert rules.signal_layout(linear_rules.linear, lin, 5) == (0, 2, 3, 1, 4)  # [B, d, T1, T2, n] as [B, T1, T2, d, n]
    assert rules.signal_layout(linear_rules.linear, lin, 3) is None  # [B, d, n]: nothing to reorder
    assert rules.signal_layout(conv_rules.conv, nn.Conv2d(4, 4, 3), 5) == (0, 3, 4, 1, 2)  # [B, H, W, d, C]
    assert rules.signal_layout(conv_rules.conv, dw, 5) == (0, 2, 1, 3, 4)  # [B, C, d, H, W]
    assert rules.signal_layout(conv_rules.conv, grouped, 5) is None
    assert rules.signal_layout(rules.find_rule(nn.LayerNorm(3)).rule, nn.LayerNorm(3), 4) is None


@settings(max_examples=40, deadline=None)
@given(shape=st.lists(st.integers(1, 4), min_size=1, max_size=5), data=st.data())
def test_stored_signals_keep_shape_values_and_bytes_in_the_requested_order(shape, data):
    order = tuple(data.draw(st.permutations(range(len(shape)))))
    t = torch.randn(*shape, dtype=torch.float64).transpose(0, -1).contiguous().transpose(0, -1)  # any strides
    s = structured._stored(t, order)
    assert s.shape == t.shape and torch.equal(s, t)
    assert s.permute(order).is_contiguous()  # stored outermost-first in ``order``
    assert s.untyped_storage().nbytes() == t.numel() * t.element_size()  # nothing hidden from the byte count
    assert s.untyped_storage().data_ptr() != t.untyped_storage().data_ptr()  # a copy, not an alias of t
