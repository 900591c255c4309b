"""K(x, x)^-1/2 applied to the Gram tiles instead of mixed into every factor (``engine.chunks._scales_tiles``,
``engine.sweep._normalised``): the same normalised similarity, checked against brute-force per-sample autograd in
float64 with the inverse square roots by the Denman-Beavers iteration (no eigendecomposition), on one chunk and
on several, symmetric and between two inputs, d = 1 and d x d blocks, a zero-gradient sample, the Fisher metric;
and the cost and range decision itself."""

from __future__ import annotations

import importlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from oracles import db_sqrt, jacobian, kernel, rel_err
from torch import Tensor, nn

import nnsim
from nnsim.engine import chunks

sweep = importlib.import_module("nnsim.engine.sweep")  # the module (nnsim.engine exports its function `sweep`)

torch.set_num_threads(1)


class _SeqNet(nn.Module):
    """A Linear over 12 positions (its per-sample gradient is explicit: Dense factors), mean-pooled, a head."""

    def __init__(self, d: int, bias: bool = True) -> None:
        super().__init__()
        self.body, self.head = nn.Linear(6, 16, bias=bias), nn.Linear(16, d, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.body(x)).mean(1))


def _model(d: int, bias: bool = True) -> nn.Module:
    torch.manual_seed(0)
    return _SeqNet(d, bias).double()


def _oracle(model: nn.Module, xa: Tensor, xb: Tensor, output=None, metric: Tensor | None = None) -> Tensor:
    """K~ [N, M, d, d] = K_a^-1/2 K_ab K_b^-1/2 from per-sample gradients (M^1/2 mixed in first)."""
    Ga, Gb = jacobian(model, (xa,), output), jacobian(model, (xb,), output)
    if metric is not None:
        half, _ = db_sqrt(metric)
        Ga, Gb = torch.einsum("ce,ncp->nep", half, Ga), torch.einsum("ce,ncp->nep", half, Gb)
    _, inv_a = db_sqrt(kernel(Ga, Ga).diagonal(dim1=0, dim2=1).permute(2, 0, 1))
    _, inv_b = db_sqrt(kernel(Gb, Gb).diagonal(dim1=0, dim2=1).permute(2, 0, 1))
    return inv_a[:, None] @ kernel(Ga, Gb) @ inv_b[None]


@pytest.fixture
def scaled(monkeypatch) -> list[tuple[bool, bool]]:
    """Records, per tile, whether each side's factors were left unmixed (scaled in the tile)."""
    seen: list[tuple[bool, bool]] = []
    real = sweep._normalised

    def spy(t, left, right):
        seen.append((left is not None, right is not None))
        return real(t, left, right)

    monkeypatch.setattr(sweep, "_normalised", spy)
    return seen


@pytest.mark.parametrize("d", [1, 3])
@pytest.mark.parametrize("reduce", ["trace", None])
@pytest.mark.parametrize("chunk_size", [None, 4])
def test_scaled_tiles_give_the_oracle_similarity(d, reduce, chunk_size, scaled):
    model = _model(d)
    g = torch.Generator().manual_seed(1)
    xa, xb = torch.randn(10, 12, 6, generator=g, dtype=torch.float64), torch.randn(7, 12, 6, generator=g,
                                                                                   dtype=torch.float64)
    sim = nnsim.Similarity(model, chunk_size=chunk_size, progress=False)
    want_ab, want_aa = _oracle(model, xa, xb), _oracle(model, xa, xa)
    if reduce == "trace":
        want_ab, want_aa = (w.diagonal(dim1=-2, dim2=-1).sum(-1) / d for w in (want_ab, want_aa))
    assert rel_err(sim.similarity(xa, xb, reduce=reduce), want_ab) < 1e-10
    assert rel_err(sim.similarity(xa, reduce=reduce), want_aa) < 1e-10
    # d = 1, and full d x d blocks, are scaled in the tiles (112 + d factor entries per output, more than 2 d
    # partners);
    # the trace of d x d blocks mixes the factors (it would need the full blocks)
    assert scaled and all(s == ((d == 1 or reduce is None),) * 2 for s in scaled)


def test_a_zero_gradient_sample_still_reads_nan_with_scaled_tiles(scaled):
    model = _model(1, bias=False)
    x = torch.randn(6, 12, 6, dtype=torch.float64)
    x[2] = 0.0  # no biases and tanh(W 0) = 0: every gradient of this sample is zero
    with pytest.warns(nnsim.RankDeficiencyWarning, match=r"\[2\]"):
        got = nnsim.Similarity(model, progress=False).similarity(x)
    keep = torch.tensor([0, 1, 3, 4, 5])
    assert torch.isnan(got[2]).all() and torch.isnan(got[:, 2]).all()
    want = _oracle(model, x[keep], x[keep])[..., 0, 0]
    assert rel_err(got[keep][:, keep], want) < 1e-10
    assert scaled and all(s == (True, True) for s in scaled)


def test_a_metric_and_blocks_with_scaled_tiles(scaled):
    model = _model(3)
    x = torch.randn(8, 12, 6, dtype=torch.float64)
    A = torch.randn(3, 3, dtype=torch.float64)
    M = A @ A.T + 0.5 * torch.eye(3, dtype=torch.float64)
    got = nnsim.Similarity(model, metric=M, progress=False).similarity(x, reduce=None)
    assert rel_err(got, _oracle(model, x, x, metric=M)) < 1e-10
    assert scaled and all(s == (True, True) for s in scaled)


@settings(max_examples=25, deadline=None)
@given(B1=st.integers(1, 5), B2=st.integers(1, 5), d=st.integers(1, 4), left=st.booleans(), right=st.booleans(),
       full=st.booleans(), seed=st.integers(0, 2**16))
def test_normalised_tile_is_the_product_written_out(B1, B2, d, left, right, full, seed):
    g = torch.Generator().manual_seed(seed)
    full = full or d > 1  # trace tiles are scaled only at d = 1
    K = torch.randn(B1, B2, d, d, generator=g, dtype=torch.float64)
    L, R = torch.randn(B1, d, d, generator=g, dtype=torch.float64), torch.randn(B2, d, d, generator=g,
                                                                                 dtype=torch.float64)
    want = torch.empty_like(K)
    for i in range(B1):
        for j in range(B2):
            eye = torch.eye(d, dtype=torch.float64)
            want[i, j] = (L[i].T if left else eye) @ K[i, j] @ (R[j] if right else eye)
    got = sweep._normalised(K if full else K[..., 0, 0], L if left else None, R if right else None)
    torch.testing.assert_close(got, want if full else want[..., 0, 0], rtol=1e-12, atol=1e-12)


def _decisions(monkeypatch) -> dict[int, list[bool]]:
    """{chunk size: the decisions of ``_scales_tiles`` for chunks of that size}."""
    decided: dict[int, list[bool]] = {}
    real = chunks._scales_tiles

    def spy(request, factors, K, partners):
        decided.setdefault(K.shape[0], []).append(real(request, factors, K, partners))
        return decided[K.shape[0]][-1]

    monkeypatch.setattr(chunks, "_scales_tiles", spy)
    return decided


@pytest.mark.parametrize("scale, scales_tiles", [(1.0, True), (1e-17, False), (1e17, False)])
def test_the_unmixed_gram_is_used_only_far_from_float32_under_and_overflow(scale, scales_tiles, monkeypatch):
    model = _model(1).float()
    x = torch.randn(12, 12, 6)
    decided = _decisions(monkeypatch)
    got = nnsim.Similarity(model, output=lambda out, inp: out * scale, progress=False).similarity(x)
    want = _oracle(model.double(), x.double(), x.double())[..., 0, 0]
    assert decided[12] == [scales_tiles]  # the one chunk of 12 samples (not the sizing probe's 2)
    assert rel_err(got.double(), want) < 1e-5


def test_small_factors_are_mixed_when_that_is_cheaper(monkeypatch):
    # an MLP on vectors: each Linear's factor mixes only its n output signals per sample (16 + 1 entries),
    # fewer than 2 d partners: the factors are mixed, the tiles not scaled
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1)).double()
    x = torch.randn(20, 6, dtype=torch.float64)
    decided = _decisions(monkeypatch)
    got = nnsim.Similarity(model, progress=False).similarity(x)
    assert decided[20] == [False]
    assert rel_err(got, _oracle(model, x, x)[..., 0, 0]) < 1e-10


def test_tiles_are_not_scaled_where_the_pairwise_products_would_underflow():
    # an Outer factor with large inputs and tiny signals (float32): its K(x, x) is an ordinary number, but the
    # signal products delta_i . delta_j of its pairwise Gram underflow to zero; mixed first (unit norm) they would
    # not. The range guard must keep the mix.
    from nnsim.engine.request import Form, Quantity, Request
    from nnsim.factors import Outer, gram
    g = torch.Generator().manual_seed(0)
    a = torch.randn(6, 1, 1, 32, generator=g, dtype=torch.float64) * 1e10
    delta = torch.randn(6, 1, 1, 1, 40, generator=g, dtype=torch.float64) * 1e-24
    f64 = Outer("l", a, delta, ("w", torch.Size([40, 32])))
    f32 = Outer("l", a.float(), delta.float(), ("w", torch.Size([40, 32])))
    truth = gram([f64], [f64], "trace")
    assert bool((gram([f32], [f32], "trace") == 0).all()) and bool((truth != 0).all())  # the hazard is real
    request = Request(Quantity.SIMILARITY, Form.TRACE)
    assert not chunks._scales_tiles(request, [f32], truth.diagonal().float()[:, None, None], 1)
    ok = Outer("l", (a / 1e10).float(), (delta / 1e-24).float(), ("w", torch.Size([40, 32])))
    assert chunks._scales_tiles(request, [ok], (truth.diagonal() / 1e-28).float()[:, None, None], 1)


@pytest.mark.parametrize("d, form, partners", [(1, "TRACE", 5), (3, "FULL", 2)])
def test_the_tile_scale_rule_at_its_boundary(d, form, partners):
    # The rule written out: scale the tiles iff 2 d partners < the factor entries per sample and output, summed
    # over the factors; at equality the mix is kept.
    from nnsim.engine.request import Form, Quantity, Request
    from nnsim.factors import Dense
    request = Request(Quantity.SIMILARITY, Form[form])
    K = torch.eye(d).expand(4, d, d).clone()

    def dense(n: int) -> Dense:
        return Dense("l", torch.ones(4, d, n) / n, [("w", torch.Size([n]))])

    bound = 2 * d * partners
    assert not chunks._scales_tiles(request, [dense(bound)], K, partners)
    assert chunks._scales_tiles(request, [dense(bound + 1)], K, partners)
    assert chunks._scales_tiles(request, [dense(bound // 2), dense(bound - bound // 2 + 1)], K, partners)
    assert not chunks._scales_tiles(request, [dense(bound // 2), dense(bound - bound // 2)], K, partners)


def test_the_range_guard_reads_every_sample_and_a_lone_nonzero_diagonal():
    # float32 K(x, x) beyond max * eps in one sample only (the second), or as the only nonzero entry: the mix is
    # kept either way; a K with no nonzero entry at all has nothing to guard.
    from nnsim.engine.request import Form, Quantity, Request
    from nnsim.factors import Dense
    request = Request(Quantity.SIMILARITY, Form.TRACE)
    f = Dense("l", torch.ones(3, 1, 64), [("w", torch.Size([64]))])
    big = torch.finfo(torch.float32).max * torch.finfo(torch.float32).eps * 4
    assert chunks._scales_tiles(request, [f], torch.ones(3, 1, 1), 1)
    assert not chunks._scales_tiles(request, [f], torch.tensor([1.0, big, 1.0]).reshape(3, 1, 1), 1)
    assert not chunks._scales_tiles(request, [f], torch.tensor([0.0, big, 0.0]).reshape(3, 1, 1), 1)
    assert chunks._scales_tiles(request, [f], torch.zeros(3, 1, 1), 1)
    edge = torch.tensor(big / 4, dtype=torch.float32)  # max * eps itself is a float32: the bound is inclusive
    assert float(edge) == torch.finfo(torch.float32).max * torch.finfo(torch.float32).eps
    assert chunks._scales_tiles(request, [f], edge.expand(3, 1, 1), 1)


def test_gram_range_is_the_bound_written_out():
    # (largest squared operand norm, L): a Dense Gram multiplies the gradients themselves (their norms are
    # bounded by K(x, x): 0) over d n products per entry; a pairwise Gram multiplies inputs and signals apart:
    # A, D the largest per-sample squared norms of a (a one-hot row: 1 per position) and delta,
    # L = G T^2 (d n A + m D).
    from nnsim.factors import Dense, Outer
    g = torch.Generator().manual_seed(3)
    dense = Dense("l", torch.randn(4, 3, 7, generator=g), [("w", torch.Size([7]))])
    assert dense.gram_range() == (0.0, 21.0)
    B, d, G, T, n, m = 5, 2, 3, 4, 6, 9
    a = torch.randn(B, G, T, m, generator=g) * torch.arange(1, B + 1).reshape(B, 1, 1, 1)
    delta = torch.randn(B, d, G, T, n, generator=g) * torch.arange(B, 0, -1).reshape(B, 1, 1, 1, 1)
    outer = Outer("l", a, delta, ("w", torch.Size([n, m])))
    A = max(float((a[b].double() ** 2).sum()) for b in range(B))
    D = max(float((delta[b].double() ** 2).sum()) for b in range(B))
    big, lost = outer.gram_range()
    assert big == pytest.approx(max(A, D), rel=1e-12) and D > A
    assert lost == pytest.approx(G * T * T * (d * n * A + m * D), rel=1e-12)
    vocab = 11
    idx = torch.randint(0, vocab, (B, G, T), generator=g)
    indexed = Outer("l", idx, delta, ("w", torch.Size([n, vocab])), vocab=vocab)
    big, lost = indexed.gram_range()
    assert big == pytest.approx(D, rel=1e-12)
    assert lost == pytest.approx(G * T * T * (d * n * G * T + vocab * D), rel=1e-12)
    small = Outer("l", a / 1e3, delta / 1e6, ("w", torch.Size([n, m])))
    assert small.gram_range()[0] == pytest.approx(A / 1e6, rel=1e-12)  # A is the larger one now
    empty = Outer("l", a[:0], delta[:0], ("w", torch.Size([n, m])))
    assert empty.gram_range() == (0.0, 0.0)
