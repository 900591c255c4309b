"""The conv rule's depthwise path (one input channel per group): per-sample weight gradients by one forward
convolution of the padded input with the signals as kernels. Against brute-force per-sample autograd in
float64 (tests/oracles.py), at d = 1 and d = 3, with the path proven taken."""

from __future__ import annotations

import pytest
import torch
from oracles import jacobian, kernel, rel_err
from torch import nn

import nnsim
from nnsim.backends.rules import conv as conv_rules

torch.set_num_threads(1)


def _exact_by_the_conv_rule(conv, shape, seed: int) -> list:
    """conv -> tanh -> linear(3) on 5 samples of ``shape``: the kernel at d = 3 and d = 1 against per-sample
    autograd, the conv layer by its rule; returns the (Similarity, inputs) of both."""
    torch.manual_seed(seed)
    model = nn.Sequential(conv(), nn.Tanh(), nn.Flatten(), nn.LazyLinear(3)).double()
    x = torch.randn(5, *shape, dtype=torch.float64)
    model(x)
    out = []
    for output in (None, lambda o, i: o[:, :1]):
        G = jacobian(model, (x,), output=output)
        sim = nnsim.Similarity(model, output=output, progress=False)
        assert rel_err(sim.kernel(x), kernel(G, G)) <= 1e-12
        assert sim.describe()["0"] == "conv"
        out.append((sim, x))
    return out


@pytest.mark.parametrize(("conv", "shape"), [
    (lambda: nn.Conv2d(4, 4, 3, padding=1, groups=4), (4, 9, 9)),
    (lambda: nn.Conv2d(3, 6, 3, stride=2, padding=1, groups=3, bias=False), (3, 9, 9)),  # channel multiplier 2
    (lambda: nn.Conv2d(3, 3, (5, 3), padding="same", dilation=(2, 1), groups=3), (3, 10, 8)),
    (lambda: nn.Conv2d(4, 4, 3, padding=2, padding_mode="reflect", groups=4), (4, 7, 7)),
    (lambda: nn.Conv2d(2, 2, 4, stride=4, groups=2), (2, 10, 10)),  # patchify: the last rows are never read
    (lambda: nn.Conv2d(2, 2, 3, stride=2, dilation=2, padding=(1, 3), padding_mode="circular", groups=2), (2, 11, 9)),
    (lambda: nn.Conv1d(4, 8, 3, stride=2, padding=1, groups=4), (4, 11)),
    (lambda: nn.Conv1d(3, 3, 5, padding="same", groups=3, padding_mode="replicate"), (3, 9)),
])
def test_depthwise_gradients_by_a_forward_convolution_agree_with_per_sample_autograd(monkeypatch, conv, shape):
    used: list[int] = []
    real = conv_rules._depthwise
    monkeypatch.setattr(conv_rules, "_depthwise", lambda *a: used.append(1) or real(*a))
    monkeypatch.setattr(conv_rules, "_explicit_preferred", lambda *a: True)
    _exact_by_the_conv_rule(conv, shape, seed=0)
    assert used


def test_a_grouped_conv_with_several_input_channels_per_group_does_not_take_the_depthwise_path(monkeypatch):
    monkeypatch.setattr(conv_rules, "_depthwise", lambda *a: pytest.fail("depthwise path on a grouped conv"))
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, groups=2), nn.Tanh(), nn.Flatten(), nn.LazyLinear(2)).double()
    x = torch.randn(4, 4, 6, 6, dtype=torch.float64)
    model(x)
    G = jacobian(model, (x,))
    assert rel_err(nnsim.Similarity(model, progress=False).kernel(x), kernel(G, G)) <= 1e-12


@pytest.mark.parametrize(("conv", "shape"), [
    (lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2), (4, 6, 6)),
    (lambda: nn.Conv2d(3, 5, 4, stride=4, bias=False), (3, 8, 8)),  # a ViT-style patch embedding
    (lambda: nn.Conv1d(3, 4, 3, stride=2, padding=1), (3, 9)),
])
def test_conv_patches_made_explicit_at_once_agree_with_per_sample_autograd(monkeypatch, conv, shape):
    """Where the cost model materialises the gradient but the grouped backward is not used, the patches' gradient
    is built as Dense factors at once (one batched GEMM, no Outer factor): exact, d = 1 and d = 3."""
    from nnsim.factors import Dense, Outer

    monkeypatch.setattr(conv_rules, "_BACKWARD_MIN_POSITIONS", 10**9)
    monkeypatch.setattr(conv_rules, "_BACKWARD_MAX_PAIRS", 0)
    monkeypatch.setattr(Outer, "prefers_dense", lambda self, mode, partners=256: True)
    for sim, x in _exact_by_the_conv_rule(conv, shape, seed=2):
        factors, _ = sim._factor_fn((x,), 0)
        assert all(isinstance(f, Dense) for f in factors if f.layer == "0")


def test_a_large_kernel_on_few_positions_takes_the_patches_not_the_grouped_backward(monkeypatch):
    monkeypatch.setattr(conv_rules, "_dense", lambda *a: pytest.fail("grouped backward on an 8x8 patch conv"))
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 4, 8, stride=8), nn.Tanh(), nn.Flatten(), nn.Linear(16, 2)).double()
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    G = jacobian(model, (x,))
    sim = nnsim.Similarity(model, progress=False)
    assert rel_err(sim.kernel(x), kernel(G, G)) <= 1e-12
    assert sim.describe()["0"] == "conv"
