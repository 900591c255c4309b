"""Every built-in layer rule against the per-sample loop oracle on random shapes, and proof from
``describe()`` that the rule itself was used (not the fallback). Also the planning guarantees: a failing
rule sends only its own module to the fallback with one FallbackWarning, and a plan that failed is never
kept.

To add a rule to the harness, append a :class:`RuleCase` to ``CASES``: a factory drawing a module (from
hypothesis' ``data``) and a factory of N inputs, and the rule name ``describe()`` must report.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from oracles import rel_err
from torch import Tensor, nn

import nnsim
from nnsim.backends.rules.linear import linear as linear_rule
from nnsim.factors import Dense

torch.set_num_threads(1)


class Readout(nn.Module):
    """The module under test followed by a fixed non-linear readout to d outputs (no parameters)."""

    def __init__(self, inner: nn.Module, d: int) -> None:
        super().__init__()
        self.inner, self.d = inner, d

    def forward(self, *x: Tensor) -> Tensor:
        h = torch.tanh(self.inner(*x)).flatten(1)
        w = torch.cos(torch.arange(h.shape[1] * self.d, dtype=h.dtype)).reshape(h.shape[1], self.d)
        return (h + 0.3 * h**2) @ w


class PosTok(nn.Module):
    """Token + position embeddings with ids [1, T] broadcast over the batch (HF BERT / GPT-2 style)."""

    def __init__(self, vocab: int, T: int, C: int) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, C), nn.Embedding(T, C)

    def forward(self, ids: Tensor) -> Tensor:
        return self.tok(ids) + self.pos(torch.arange(ids.shape[1])[None])


class Conv1D(nn.Module):
    """The shape of Hugging Face GPT-2's Conv1D: y = x @ W + b with W [in, out]."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) / nx**0.5)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x: Tensor) -> Tensor:
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).reshape(*x.shape[:-1], self.nf)


class LlamaRMSNorm(nn.Module):
    """Hugging Face's RMSNorm, as written there (matched by name, not imported)."""

    def __init__(self, n: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(1 + 0.1 * torch.randn(n))
        self.variance_epsilon = eps

    def forward(self, x: Tensor) -> Tensor:
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


class MyLayerNorm(nn.LayerNorm):
    """A LayerNorm subclass with its own forward (timm / HF style): same maths, written out."""

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


class LayerScale(nn.Module):
    """ConvNeXt / CaiT layer scale: a parameter used directly in the module's own forward."""

    def __init__(self, C: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(0.5 + torch.randn(C))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class ClsPos(nn.Module):
    """ViT class token (expanded to the batch) and a position table sliced to the sequence length."""

    def __init__(self, C: int, T_max: int) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.randn(1, 1, C))
        self.pos = nn.Parameter(torch.randn(1, T_max + 1, C))

    def forward(self, x: Tensor) -> Tensor:
        h = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return h + self.pos[:, : h.shape[1]]


def _affine_init(m: nn.Module) -> nn.Module:
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name in ("weight", "bias") and p.dim() == 1:
                p.copy_((1.0 if name == "weight" else 0.0) + 0.3 * torch.randn_like(p))
    return m


@dataclass
class RuleCase:
    rule: str  # what describe() must say for the module under test
    build: Callable[[st.DataObject], tuple[nn.Module, Callable[[int], tuple[Tensor, ...]]]]


def _w(data: st.DataObject, lo: int = 1, hi: int = 5) -> int:
    return data.draw(st.integers(lo, hi))


def _linear(data):
    i, o, T = _w(data), _w(data), _w(data, 0, 3)
    m = nn.Linear(i, o, bias=data.draw(st.booleans()))
    return m, lambda n: (torch.randn(n, i) if T == 0 else torch.randn(n, T, i),)


def _conv2d(data):
    g = _w(data, 1, 2)
    ci, co, k = g * _w(data, 1, 2), g * _w(data, 1, 2), _w(data, 1, 3)
    m = nn.Conv2d(ci, co, k, padding=data.draw(st.sampled_from([0, 1])), stride=_w(data, 1, 2), groups=g)
    return m, lambda n: (torch.randn(n, ci, 5, 5),)


def _conv1d(data):
    ci, co = _w(data), _w(data)
    m = nn.Conv1d(ci, co, _w(data, 1, 3), dilation=_w(data, 1, 2), padding_mode="zeros")
    return m, lambda n: (torch.randn(n, ci, 7),)


def _embedding(data):
    V, C, T = _w(data, 3, 8), _w(data), _w(data, 1, 4)
    m = nn.Embedding(V, C, padding_idx=data.draw(st.sampled_from([None, 0])))
    return m, lambda n: (torch.randint(0, V, (n, T)),)


def _pos_tok(data):
    V, C, T = _w(data, 3, 8), _w(data), _w(data, 1, 4)
    return PosTok(V, T, C), lambda n: (torch.randint(0, V, (n, T)),)


def _layernorm(data):
    C, T = _w(data, 2, 5), _w(data, 1, 3)
    return _affine_init(nn.LayerNorm(C)), lambda n: (torch.randn(n, T, C),)


def _my_layernorm(data):
    C = _w(data, 2, 5)
    return _affine_init(MyLayerNorm(C)), lambda n: (torch.randn(n, 3, C),)


def _groupnorm(data):
    g = _w(data, 1, 2)
    C = g * _w(data, 1, 3)
    return _affine_init(nn.GroupNorm(g, C)), lambda n: (torch.randn(n, C, 4),)


def _batchnorm(data):
    C = _w(data, 1, 4)
    m = _affine_init(nn.BatchNorm2d(C))
    with torch.no_grad():
        m.running_mean.uniform_(-0.5, 0.5)
        m.running_var.uniform_(0.5, 2.0)
    return m, lambda n: (torch.randn(n, C, 3, 3),)


def _rmsnorm(data):
    C = _w(data, 2, 5)
    return LlamaRMSNorm(C), lambda n: (torch.randn(n, 3, C),)


def _torch_rmsnorm(data):
    C = _w(data, 2, 5)
    return _affine_init(nn.RMSNorm(C, eps=1e-5)), lambda n: (torch.randn(n, 3, C),)


def _hf_conv1d(data):
    i, o, T = _w(data), _w(data), _w(data, 1, 3)
    return Conv1D(o, i), lambda n: (torch.randn(n, T, i),)


def _layer_scale(data):
    C, T = _w(data), _w(data, 1, 3)
    return LayerScale(C), lambda n: (torch.randn(n, T, C),)


def _cls_pos(data):
    C, T = _w(data), _w(data, 1, 3)
    return ClsPos(C, T + _w(data, 0, 2)), lambda n: (torch.randn(n, T, C),)


def _prelu(data):
    C = _w(data, 1, 3)
    return nn.PReLU(data.draw(st.sampled_from([1, C]))), lambda n: (torch.randn(n, C, 4),)


CASES: dict[str, RuleCase] = {
    "linear": RuleCase("linear", _linear),
    "conv2d": RuleCase("conv", _conv2d),
    "conv1d": RuleCase("conv", _conv1d),
    "embedding": RuleCase("embedding", _embedding),
    "embedding_broadcast_positions": RuleCase("embedding", _pos_tok),
    "layernorm": RuleCase("norm", _layernorm),
    "layernorm_subclass_own_forward": RuleCase("norm", _my_layernorm),
    "groupnorm": RuleCase("norm", _groupnorm),
    "batchnorm": RuleCase("norm", _batchnorm),
    "hf_rmsnorm": RuleCase("norm", _rmsnorm),
    "hf_conv1d": RuleCase("conv1d_transposed", _hf_conv1d),
    "prelu": RuleCase("prelu", _prelu),
    "free_layer_scale": RuleCase("free parameters", _layer_scale),
    "free_cls_token_and_position_table": RuleCase("free parameters", _cls_pos),
}
if hasattr(nn, "RMSNorm"):
    CASES["torch_rmsnorm"] = RuleCase("norm", _torch_rmsnorm)


@pytest.mark.parametrize("name", list(CASES))
@settings(max_examples=3, deadline=None)
@given(data=st.data())
def test_rule_matches_loop_oracle_and_is_used(name, data):
    torch.manual_seed(data.draw(st.integers(0, 2**16)))
    module, inputs = CASES[name].build(data)
    d = data.draw(st.sampled_from([1, 3]))
    model = Readout(module, d).double()
    xa = tuple(t.double() if t.is_floating_point() else t for t in inputs(data.draw(st.integers(1, 5))))
    xb = tuple(t.double() if t.is_floating_point() else t for t in inputs(3))
    ref = nnsim.Similarity(model, backend="loop", progress=False).kernel(xa, xb)
    sim = nnsim.Similarity(model, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a built-in rule on its own module must never fall back
        for _ in range(2):  # twice: the stored plan is used the second time
            assert rel_err(sim.kernel(xa, xb), ref) <= 1e-10
    used = sim.describe()
    layers = [n for n, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))]
    assert layers and all(used[layer] == CASES[name].rule for layer in layers), used


# ------------------------------------------------------------------ planning guarantees
def _wrong_rule(module, layer, calls, names):
    """A broken rule: zero gradients."""
    B, d = calls[0].deltas[0].shape[:2]
    n = sum(module.get_parameter(k).numel() for k in names)
    return [Dense(layer, calls[0].deltas[0].new_zeros(B, d, n), [(full, module.get_parameter(k).shape)
                                                                 for k, full in names.items()])]


def _raising_rule(module, layer, calls, names):
    raise RuntimeError("this rule cannot handle the module")


class WrongLinear(nn.Linear):
    pass


class RaisingLinear(nn.Linear):
    pass


nnsim.register_rule(WrongLinear, _wrong_rule)
nnsim.register_rule(RaisingLinear, _raising_rule)


@pytest.mark.parametrize(("cls", "reason"), [(WrongLinear, "disagrees with autograd"), (RaisingLinear, "raised")])
def test_failing_rule_falls_back_for_its_module_only_with_one_warning(cls, reason):
    torch.manual_seed(0)
    model = nn.Sequential(cls(4, 5), nn.Tanh(), nn.Linear(5, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    x = torch.randn(6, 4, dtype=torch.float64)
    ref = nnsim.Similarity(model, backend="loop", progress=False).kernel(x)
    sim = nnsim.Similarity(model, progress=False)
    with pytest.warns(nnsim.FallbackWarning, match=rf"module '0' \({cls.__name__}\) {reason}") as seen:
        K = sim.kernel(x)
    assert len([w for w in seen if issubclass(w.category, nnsim.FallbackWarning)]) == 1
    assert rel_err(K, ref) <= 1e-10
    assert rel_err(sim.kernel(x), ref) <= 1e-10  # no second warning, same exact result
    assert sim.describe() == {"0": "fallback", "2": "linear", "4": "linear"}


def _rolled_rule(module, layer, calls, names):
    """A subtly broken rule: every sample gets the exact gradient of the next sample."""
    return [f.select(torch.roll(torch.arange(f.batch_size), 1)) for f in linear_rule(module, layer, calls, names)]


def _one_output_wrong_rule(module, layer, calls, names):
    """A subtly broken rule: the last output's gradient of the first sample is doubled."""
    out = []
    for f in linear_rule(module, layer, calls, names):
        g = f.dense().g.clone()
        g[0, -1] *= 2
        out.append(Dense(layer, g, f.params))
    return out


class RolledLinear(nn.Linear):
    pass


class OneOutputWrongLinear(nn.Linear):
    pass


nnsim.register_rule(RolledLinear, _rolled_rule)
nnsim.register_rule(OneOutputWrongLinear, _one_output_wrong_rule)


@pytest.mark.parametrize("cls", [RolledLinear, OneOutputWrongLinear])
@pytest.mark.parametrize("d", [3, 7])
def test_the_verification_catches_gradients_of_the_wrong_sample_or_output(cls, d):
    """The check combines all (sample, output) gradients of the probe in one weighted sum: a rule that hands a
    sample another sample's gradient, or gets one output of one sample wrong, must still be caught."""
    torch.manual_seed(1)
    model = nn.Sequential(cls(4, 5), nn.Tanh(), nn.Linear(5, d)).double()
    x = torch.randn(6, 4, dtype=torch.float64)
    ref = nnsim.Similarity(model, backend="loop", progress=False).kernel(x)
    sim = nnsim.Similarity(model, progress=False)
    with pytest.warns(nnsim.FallbackWarning, match="disagrees with autograd"):
        K = sim.kernel(x)
    assert rel_err(K, ref) <= 1e-10
    assert sim.describe()["0"] == "fallback"


class BatchMixing(nn.Module):
    """Scales by the batch mean: the samples of a batch are not independent, so no per-sample gradient of a
    batched pass is the gradient of the sample alone."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        h = self.lin(x)
        return h * h.mean(0, keepdim=True)


def test_a_model_that_mixes_the_batch_is_not_verified_on_the_batched_pass():
    torch.manual_seed(0)
    model = BatchMixing().double()
    x = torch.randn(5, 4, dtype=torch.float64)
    ref = nnsim.Similarity(model, backend="loop", progress=False).kernel(x)
    sim = nnsim.Similarity(model, progress=False)
    assert rel_err(sim.kernel(x), ref) <= 1e-10
    # the Linear rule on the batched pass disagrees with each sample run alone: the whole-model fallback
    assert all(how.startswith("functorch") for how in sim.describe().values())


def test_first_call_failure_leaves_no_plan_and_second_call_is_exact():
    """The issue's reproduction: broadcast position ids used to raise on the first call and leave a plan that
    made the second call silently wrong."""
    torch.manual_seed(0)
    model = Readout(PosTok(11, 5, 8), 3).double()
    x = torch.randint(0, 11, (6, 5))
    ref = nnsim.Similarity(model, backend="loop", progress=False).kernel(x)
    sim = nnsim.Similarity(model, progress=False)
    for _ in range(2):
        assert rel_err(sim.kernel(x), ref) <= 1e-10
    assert sim.describe() == {"inner.tok": "embedding", "inner.pos": "embedding"}


def test_plan_is_remade_when_the_input_signature_changes():
    torch.manual_seed(0)
    model = Readout(PosTok(11, 6, 4), 2).double()
    sim = nnsim.Similarity(model, progress=False)
    for T in (5, 3, 5):
        x = torch.randint(0, 11, (4, T))
        ref = nnsim.Similarity(model, backend="loop", progress=False).kernel(x)
        assert rel_err(sim.kernel(x), ref) <= 1e-10


class MaskedMix(nn.Module):
    """A Linear called with a shared [T, T] mask argument whose size equals the batch size."""

    def __init__(self, T: int) -> None:
        super().__init__()
        self.lin = MaskLinear(3, 3)
        self.register_buffer("mask", torch.tril(torch.ones(T, T, dtype=torch.float64)))

    def forward(self, x: Tensor) -> Tensor:
        return self.lin(x, self.mask)


class MaskLinear(nn.Linear):
    def forward(self, x: Tensor, mask: Tensor) -> Tensor:  # no rule applies to this forward: the fallback
        return mask @ super().forward(x)


def test_fallback_batch_axis_is_not_confused_by_an_axis_of_the_batch_size():
    torch.manual_seed(0)
    T = 4
    model = Readout(MaskedMix(T), 2).double()
    x = torch.randn(T, T, 3, dtype=torch.float64)  # N = T: the mask's axis 0 has the batch size
    ref = nnsim.Similarity(model, backend="loop", progress=False).kernel(x)
    sim = nnsim.Similarity(model, progress=False, chunk_size=T)
    assert rel_err(sim.kernel(x), ref) <= 1e-10
    assert sim.describe()["inner.lin"] == "fallback"


@pytest.mark.parametrize("cell", [nn.LSTM, nn.GRU])
def test_recurrent_modules_work_exactly_without_a_rule(cell):
    """torch.func cannot run nn.LSTM / nn.GRU: their module gets an exact fallback that works (whatever the
    rule registry holds, the result is exact and the Embedding and Linear keep their rules)."""
    torch.manual_seed(0)

    class Tagger(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(7, 4)
            self.rnn = cell(4, 3, num_layers=2, batch_first=True, bidirectional=True)
            self.fc = nn.Linear(6, 2)

        def forward(self, x: Tensor) -> Tensor:
            return self.fc(self.rnn(self.emb(x))[0][:, -1])

    model = Tagger().double()
    x = torch.randint(0, 7, (4, 5))
    ref = nnsim.Similarity(model, backend="loop", progress=False).kernel(x)
    sim = nnsim.Similarity(model, progress=False)
    for _ in range(2):
        assert rel_err(sim.kernel(x), ref) <= 1e-10
    plan = sim.describe()
    assert plan["emb"] == "embedding" and plan["fc"] == "linear" and "rnn" in plan


def _rule_failing_on_large_batches(module, layer, calls, names):
    from nnsim.backends.rules.linear import linear

    if calls[0].batch_size > 3:
        raise RuntimeError("only small batches")
    return linear(module, layer, calls, names)


class FragileLinear(nn.Linear):
    pass


nnsim.register_rule(FragileLinear, _rule_failing_on_large_batches)


def test_rule_raising_after_planning_steps_down_with_a_warning_and_stays_exact():
    torch.manual_seed(0)
    model = nn.Sequential(FragileLinear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x = torch.randn(8, 3, dtype=torch.float64)
    ref = nnsim.Similarity(model, backend="loop", progress=False).kernel(x)
    sim = nnsim.Similarity(model, progress=False, chunk_size=8)
    with pytest.warns(nnsim.FallbackWarning, match=r"module '0' \(FragileLinear\) raised on a later chunk"):
        K = sim.kernel(x)
    assert rel_err(K, ref) <= 1e-10
    assert sim.describe() == {"0": "fallback", "2": "linear"}


@pytest.mark.parametrize("explicit", [True, False])
@pytest.mark.parametrize(("conv", "shape"), [
    (lambda: nn.Conv2d(3, 6, 3, stride=2, padding=1, groups=3), (3, 9, 9)),
    (lambda: nn.Conv2d(4, 4, 3, padding="same", padding_mode="reflect", bias=False), (4, 7, 7)),
    (lambda: nn.Conv2d(2, 4, (2, 3), padding=(1, 2), dilation=2, padding_mode="circular"), (2, 8, 8)),
    (lambda: nn.Conv1d(3, 5, 4, stride=2, padding=2), (3, 11)),
    (lambda: nn.Conv1d(4, 4, 3, groups=4, padding="same"), (4, 10)),
])
def test_conv_explicit_gradient_by_convolution_backward_and_patches_agree_with_the_loop(monkeypatch, conv, shape,
                                                                                      explicit):
    """Both ways of the conv rule (the explicit per-sample gradient by one grouped convolution_backward, and
    the patches' Outer factor), forced in turn, against per-sample autograd, d = 1 and d = 3."""
    from nnsim.backends.rules import conv as conv_rules

    calls = []
    monkeypatch.setattr(conv_rules, "_explicit_preferred", lambda *a: calls.append(1) is None and explicit)
    monkeypatch.setattr(conv_rules, "_BACKWARD_MIN_POSITIONS", 1)
    monkeypatch.setattr(conv_rules, "_BACKWARD_MAX_PAIRS", 0)
    monkeypatch.setattr(conv_rules, "_BACKWARD_MAX_D", 10)
    torch.manual_seed(0)
    model = nn.Sequential(conv(), nn.Tanh(), nn.Flatten(), nn.LazyLinear(3)).double()
    x = torch.randn(5, *shape, dtype=torch.float64)
    model(x)
    for out in (None, lambda o, i: o[:, :1]):
        ref = nnsim.Similarity(model, backend="loop", output=out, progress=False).kernel(x)
        sim = nnsim.Similarity(model, output=out, progress=False)
        assert rel_err(sim.kernel(x), ref) <= 1e-12
        assert sim.describe()["0"] == "conv"
    assert calls
