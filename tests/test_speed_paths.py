"""Speed paths of the structured backend that must change no number: plans kept per model object across
``Similarity`` instances (re-verified on every new one, replaced when the model changed), the symmetric Gram
of a chunk with itself (blocks above the diagonal, mirrored), the one-output mix (a scale per sample), the
explicit gradients of the sequence rules. Each against an independent oracle in float64: the per-sample loop,
the plain matrix product, the einsum."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from oracles import rel_err
from torch import Tensor, nn

import nnsim
from nnsim import _gemm
from nnsim.backends import plan_cache
from nnsim.backends.rules.linear import linear as linear_rule
from nnsim.factors import Dense, Outer

torch.set_num_threads(1)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def _counting(model: nn.Module) -> list[int]:
    calls: list[int] = []
    model.register_forward_pre_hook(lambda mod, args: calls.append(1))
    return calls


def test_a_new_similarity_on_the_same_model_reuses_the_verified_plan_and_stays_exact():
    model = _mlp()
    calls = _counting(model)
    x = torch.randn(10, 4, dtype=torch.float64)
    ref = nnsim.Similarity(model, backend="loop", progress=False).kernel(x)
    n0 = len(calls)
    K1 = nnsim.Similarity(model, progress=False).kernel(x)
    first = len(calls) - n0
    K2 = nnsim.Similarity(model, progress=False).kernel(x)
    second = len(calls) - n0 - first
    assert rel_err(K1, ref) <= 1e-10 and rel_err(K2, ref) <= 1e-10
    # planning runs the model on probes (batch axes, verification); the reused plan only re-verifies it
    assert second < first, (first, second)


def test_a_new_similarity_checks_the_kept_plan_on_its_first_chunk_without_a_probe_pass():
    """The factor bytes per sample are kept per model with the plan: a new Similarity runs no chunk-size probe;
    the kept plan is checked on the first real chunk (two samples run on their own by autograd)."""

    model = _mlp()
    sizes: list[int] = []
    model.register_forward_pre_hook(lambda mod, args: sizes.append(args[0].shape[0]))  # (a hook is in the key)
    x = torch.randn(10, 4, dtype=torch.float64)
    ref = nnsim.Similarity(model, backend="loop", progress=False).similarity(x)
    first = nnsim.Similarity(model, progress=False)
    assert rel_err(first.similarity(x), ref) <= 1e-10
    sizes.clear()
    sim = nnsim.Similarity(model, progress=False)
    assert rel_err(sim.similarity(x), ref) <= 1e-10
    assert sorted(sizes) == [1, 1, 10], sizes  # the chunk's pass and the check's two single-sample calls
    kept = sim.chunk_size_for(x)
    plan_cache.SIZES.clear()  # measured afresh by a probe pass: the same chunk size
    assert nnsim.Similarity(model, progress=False).chunk_size_for(x) == kept == first.chunk_size_for(x)


def _reuse_checks(monkeypatch) -> list:
    """The results of every check of a kept plan on a new Similarity's first batch (None: the plan was refused)."""
    from nnsim.backends.structured import Structured

    outcomes: list = []
    real = Structured._reused
    monkeypatch.setattr(Structured, "_reused", lambda self, *a: outcomes.append(r := real(self, *a)) or r)
    return outcomes


def test_a_kept_plan_that_went_wrong_is_caught_on_the_first_chunk_without_a_probe(monkeypatch):
    """With the chunk size kept (no probe pass), a kept plan whose rule has become wrong is still refused before
    any number is returned, and the result is exact."""
    outcomes = _reuse_checks(monkeypatch)
    torch.manual_seed(4)
    model = nn.Sequential(Switchable(4, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    x = torch.randn(12, 4, dtype=torch.float64)
    nnsim.Similarity(model, progress=False).similarity(x)
    nnsim.Similarity(model, progress=False).similarity(x)  # kept plan and kept chunk size
    assert [o is None for o in outcomes] == [False]
    model[0].mode["squared"] = True
    ref = nnsim.Similarity(model, backend="loop", progress=False).similarity(x)
    sim = nnsim.Similarity(model, progress=False)
    with pytest.warns(nnsim.FallbackWarning, match=r"module '0' \(Switchable\)"):
        K = sim.similarity(x)
    assert rel_err(K, ref) <= 1e-10
    assert [o is None for o in outcomes] == [False, True]
    assert outcomes and sim.describe()["0"] == "fallback"
    # The sizing measured under the failed plan is forgotten with it: the next Similarity measures its own.
    assert model not in plan_cache.SIZES
    with pytest.warns(nnsim.FallbackWarning, match=r"module '0' \(Switchable\)"):  # the kept plan's note
        nnsim.Similarity(model, progress=False).similarity(x)
    assert model in plan_cache.SIZES


def test_a_changed_model_gets_a_new_plan():
    model = _mlp()
    x = torch.randn(8, 4, dtype=torch.float64)
    nnsim.Similarity(model, progress=False).kernel(x)
    model[2] = nn.Linear(6, 5).double()  # another module, another output width
    ref = nnsim.Similarity(model, backend="loop", progress=False).kernel(x)
    sim = nnsim.Similarity(model, progress=False)
    assert rel_err(sim.kernel(x), ref) <= 1e-10
    assert sim.describe() == {"0": "linear", "2": "linear"}
    with torch.no_grad():  # new parameter values, same structure: the plan still applies
        model[0].weight.mul_(-2.0)
    ref = nnsim.Similarity(model, backend="loop", progress=False).kernel(x)
    assert rel_err(nnsim.Similarity(model, progress=False).kernel(x), ref) <= 1e-10


class Switchable(nn.Linear):
    """A Linear whose forward can be switched (through a mutable attribute the cache key cannot see) to one that
    its registered rule, which assumes the plain Linear, gets wrong."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.mode = {"squared": False}

    def forward(self, x: Tensor) -> Tensor:
        y = super().forward(x)
        return y * y if self.mode["squared"] else y


nnsim.register_rule(Switchable, linear_rule)


def test_a_stale_plan_is_caught_by_its_check_and_replaced(monkeypatch):
    outcomes = _reuse_checks(monkeypatch)
    torch.manual_seed(2)
    model = nn.Sequential(Switchable(4, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    x = torch.randn(8, 4, dtype=torch.float64)
    sim = nnsim.Similarity(model, progress=False)
    sim.kernel(x)
    assert sim.describe()["0"] == "linear"
    model[0].mode["squared"] = True  # the stored plan's rule for module 0 is now wrong
    ref = nnsim.Similarity(model, backend="loop", progress=False).kernel(x)
    sim = nnsim.Similarity(model, progress=False)
    with pytest.warns(nnsim.FallbackWarning, match=r"module '0' \(Switchable\)"):
        K = sim.kernel(x)
    assert rel_err(K, ref) <= 1e-10
    assert sim.describe()["0"] == "fallback"
    assert [o is None for o in outcomes] == [True]  # the stored plan was tried and refused by its check


def _zero_rule(module, layer, calls, names):
    B, d = calls[0].deltas[0].shape[:2]
    n = sum(module.get_parameter(k).numel() for k in names)
    return [Dense(layer, calls[0].deltas[0].new_zeros(B, d, n),
                  [(full, module.get_parameter(k).shape) for k, full in names.items()])]


class ZeroLinear(nn.Linear):
    pass


nnsim.register_rule(ZeroLinear, _zero_rule)


def test_a_reused_plan_repeats_the_fallback_warning_of_its_planning():
    torch.manual_seed(3)
    model = nn.Sequential(ZeroLinear(4, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    x = torch.randn(6, 4, dtype=torch.float64)
    ref = nnsim.Similarity(model, backend="loop", progress=False).kernel(x)
    for _ in range(2):
        with pytest.warns(nnsim.FallbackWarning, match=r"module '0' \(ZeroLinear\) disagrees"):
            K = nnsim.Similarity(model, progress=False).kernel(x)
        assert rel_err(K, ref) <= 1e-10
    assert len(plan_cache._STORE[model]) == 1


def test_plans_of_other_outputs_and_rules_are_kept_apart():
    model = _mlp()
    x = torch.randn(8, 4, dtype=torch.float64)
    for output in (None, lambda out, inputs: out[:, :1], lambda out, inputs: out[:, 1:] * 2):
        ref = nnsim.Similarity(model, output=output, backend="loop", progress=False).kernel(x)
        for _ in range(2):
            assert rel_err(nnsim.Similarity(model, output=output, progress=False).kernel(x), ref) <= 1e-10
    assert len(plan_cache._STORE[model]) == 3


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 40), cols=st.integers(1, 30), block=st.integers(1, 9))
def test_the_symmetric_gram_equals_the_plain_product_with_ragged_blocks(rows, cols, block):
    A = torch.randn(rows, cols, dtype=torch.float64, generator=torch.Generator().manual_seed(rows * 31 + cols))
    was = _gemm.BLOCK_ROWS
    _gemm.BLOCK_ROWS = block
    try:
        K = _gemm.self_gram(A)
    finally:
        _gemm.BLOCK_ROWS = was
    torch.testing.assert_close(K, A @ A.T, rtol=1e-12, atol=1e-12)
    if rows // block >= 2:  # blocked: the blocks below the diagonal are the mirrors of those above
        cut = rows // (rows // block)
        assert torch.equal(K[cut:, :cut], K[:cut, cut:].T)


@pytest.mark.parametrize("mode", ["trace", "full"])
def test_a_dense_tile_with_itself_uses_the_symmetric_product_and_agrees(mode, monkeypatch):
    g = torch.randn(300, 3, 17, dtype=torch.float64)
    f = Dense("layer", g, [("layer.weight", torch.Size([17]))])
    used: list[int] = []
    real = _gemm.self_gram
    monkeypatch.setattr("nnsim.factors.self_product", lambda A: used.append(A.shape[0]) or real(A))
    K = f.gram(f, mode)
    assert used == [300 if mode == "trace" else 900]
    expected = g.reshape(300, -1) @ g.reshape(300, -1).T if mode == "trace" else torch.einsum("acn,ben->acbe", g, g)
    torch.testing.assert_close(K, expected, rtol=1e-12, atol=1e-12)


def test_the_one_output_mix_is_the_einsum():
    gen = torch.Generator().manual_seed(4)
    M = torch.randn(5, 1, 1, dtype=torch.float64, generator=gen)
    g = torch.randn(5, 1, 7, dtype=torch.float64, generator=gen)
    assert torch.equal(Dense("l", g, [("l.w", torch.Size([7]))]).mix(M).g, torch.einsum("bcn,bce->ben", g, M))
    a = torch.randn(5, 2, 3, 4, dtype=torch.float64, generator=gen)
    delta = torch.randn(5, 1, 2, 3, 6, dtype=torch.float64, generator=gen)
    f = Outer("l", a, delta, ("l.weight", torch.Size([12, 4])))
    assert torch.equal(f.mix(M).delta, torch.einsum("bcgtn,bce->begtn", delta, M))


class _Sequence(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.seq = nn.MultiheadAttention(8, 2, batch_first=True) if kind == "attention" else \
            getattr(nn, kind)(8, 6, batch_first=True)
        self.head = nn.Linear(8 if kind == "attention" else 6, 3)

    def forward(self, x: Tensor) -> Tensor:
        out = self.seq(x, x, x, need_weights=False)[0] if self.kind == "attention" else self.seq(x)[0]
        return self.head(torch.tanh(out).mean(1))


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "attention"])
@pytest.mark.parametrize("explicit", [True, False])
def test_sequence_rules_on_both_paths_agree_with_the_loop(kind, explicit, monkeypatch):
    """The recurrent and attention rules build explicit weight and bias gradients (separate Dense factors, no
    copy) where the cost model prefers them, position factors otherwise: both exact, the rule itself used."""
    from nnsim._model import analysis_mode

    monkeypatch.setattr(Outer, "prefers_dense", lambda self, mode, partners=256: explicit)
    torch.manual_seed(6)
    model = _Sequence(kind).double()
    x = torch.randn(5, 4, 8, dtype=torch.float64)
    ref = nnsim.Similarity(model, backend="loop", progress=False).kernel(x)
    sim = nnsim.Similarity(model, progress=False)
    assert rel_err(sim.kernel(x), ref) <= 1e-10
    assert sim.describe()["seq"] == ("multihead_attention" if kind == "attention" else "recurrent")
    with analysis_mode(model, sim.params):
        factors, _ = sim._factor_fn((x,), 0)
    seq = [f for f in factors if f.layer.startswith("seq")]
    assert all(isinstance(f, Dense if explicit else Outer) for f in seq), [type(f).__name__ for f in seq]


class _OldStyleTanh(torch.autograd.Function):
    """A custom autograd function whose backward branches on its values (a NaN check): vmap cannot batch it, so
    the d outputs' signals are back-propagated one output at a time."""

    @staticmethod
    def forward(ctx, x):  # noqa: ANN001, ANN205
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g):  # noqa: ANN001, ANN205
        (y,) = ctx.saved_tensors
        if bool(torch.isnan(g).any()):
            raise FloatingPointError("NaN signal")
        return g * (1 - y * y)


class _Custom(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.b(_OldStyleTanh.apply(self.a(x)))


@pytest.mark.parametrize(("model_fn", "batched"), [(_mlp, True), (lambda: _Custom().double(), False)])
def test_the_signals_of_d_outputs_in_one_batched_backward_or_d_passes_agree_with_the_loop(model_fn, batched,
                                                                                         monkeypatch):
    from nnsim.backends import structured

    seen: list[bool] = []
    real = structured._batched_signals
    monkeypatch.setattr(structured, "_batched_signals", lambda y, leaves: seen.append(r := real(y, leaves)) or r)
    torch.manual_seed(7)
    model = model_fn()
    x = torch.randn(6, 4, dtype=torch.float64)
    ref = nnsim.Similarity(model, backend="loop", progress=False).kernel(x)
    sim = nnsim.Similarity(model, progress=False)
    assert rel_err(sim.kernel(x), ref) <= 1e-10
    assert sim.describe() == {"a" if not batched else "0": "linear", "b" if not batched else "2": "linear"}
    assert seen and all((r is not None) == batched for r in seen)


class _InPlaceBlock(nn.Module):
    """Outputs of hooked modules modified in place afterwards (by the parent and by an in-place ReLU)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)
        self.head = nn.Sequential(nn.Linear(27, 5), nn.ReLU(inplace=True), nn.Linear(5, 3))

    def forward(self, x: Tensor) -> Tensor:
        h = self.bn(self.conv(x))
        h.mul_(0.5)
        h += x
        return self.head(torch.tanh(h).flatten(1))


@pytest.mark.parametrize("in_place", [False, True])
def test_module_outputs_are_their_own_signal_leaves_unless_modified_in_place_later(in_place):
    """Without a zero-leaf tap the signal is d y / d output of the tensor itself; an output modified in place
    after its module (seen by its version counter) makes the plan tap every output instead. Exact either way,
    every module on its rule (a wrong signal would have sent them to the whole-model fallback)."""
    from oracles import jacobian, kernel

    torch.manual_seed(5)
    if in_place:
        model = _InPlaceBlock().double().eval()
        x = torch.randn(6, 3, 3, 3, dtype=torch.float64)
    else:
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Tanh(), nn.Flatten(), nn.Linear(4, 3))
        model = model.double().eval()
        x = torch.randn(6, 3, 3, 3, dtype=torch.float64)
    for out in (None, lambda o, i: o[:, :1]):
        G = jacobian(model, (x,), output=out)
        for _ in range(2):  # planned, then the kept plan
            sim = nnsim.Similarity(model, output=out, progress=False)
            assert rel_err(sim.kernel(x), kernel(G, G)) <= 1e-10
            assert all(how in ("conv", "norm", "linear") for how in sim.describe().values()), sim.describe()
            assert sim._factor_fn.__self__.plan.tapped is in_place


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scale", [1e-25, 1.0, 1e25])
def test_the_checks_norms_are_the_float64_norms_at_any_scale(dtype, scale):
    """The verification's norms (one fused call) against the norms written out in float64: tiny gradients must not
    underflow to 0 (that would let a wrong rule pass), huge ones must not overflow."""
    from nnsim.backends.structured import _norms

    torch.manual_seed(7)
    tensors = [torch.randn(*shape, dtype=dtype) * scale for shape in [(3, 4), (5,), (2, 2, 2), (1,)]]
    tensors.append(torch.zeros(3, dtype=dtype))
    expected = [float(torch.sqrt((t.double() ** 2).sum())) for t in tensors]
    got = _norms(tensors)
    assert all(abs(g - e) <= 1e-6 * e for g, e in zip(got, expected, strict=True)), (got, expected)
    assert got[-1] == 0.0 and min(got[:-1]) > 0
