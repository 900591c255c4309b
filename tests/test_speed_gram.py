"""The Gram tiles accumulated in one output (issue 14, part 7: ``factors.gram``, ``_gemm.gram_sum``,
``_gemm.self_gram_sum``): every explicit gradient's product added in place, a chunk's tile with itself by the
upper row strips of all factors mirrored once, pairwise factors added to it. Checked against brute-force
per-sample autograd in float64 (the Gram written out), d = 1 and d = 3, trace and full, symmetric and between two
inputs, one chunk and several, with the strips forced onto small tiles; zero-gradient samples; float32 within
its tolerance; a transformer against the loop backend; and the two products written out (hypothesis)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from oracles import db_sqrt, jacobian, kernel, rel_err
from torch import Tensor, nn

import nnsim
from nnsim import _gemm
from nnsim import factors as F

torch.set_num_threads(1)


class _Net(nn.Module):
    """A Linear over 12 positions, a LayerNorm (an explicit-gradient factor), a head on vectors (a pairwise factor
    of one position): the Gram mixes both kinds of factor."""

    def __init__(self, d: int, bias: bool = True) -> None:
        super().__init__()
        self.body, self.norm, self.head = nn.Linear(6, 16, bias=bias), nn.LayerNorm(16), nn.Linear(16, d, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.norm(torch.tanh(self.body(x))).mean(1))


def _model(d: int, dtype: torch.dtype = torch.float64, bias: bool = True) -> nn.Module:
    torch.manual_seed(0)
    return _Net(d, bias).to(dtype)


def _similarity_oracle(Ga: Tensor, Gb: Tensor) -> Tensor:
    """K~ [N, M, d, d] = K_a^-1/2 K_ab K_b^-1/2 written out (Denman-Beavers inverse square roots)."""
    _, inv_a = db_sqrt(kernel(Ga, Ga).diagonal(dim1=0, dim2=1).permute(2, 0, 1))
    _, inv_b = db_sqrt(kernel(Gb, Gb).diagonal(dim1=0, dim2=1).permute(2, 0, 1))
    return inv_a[:, None] @ kernel(Ga, Gb) @ inv_b[None]


@pytest.fixture
def products(monkeypatch) -> dict[str, int]:
    """Counts the engine's accumulated products: symmetric strips and plain sums."""
    seen = {"symmetric": 0, "plain": 0}
    real_sym, real_sum = F.self_gram_sum, F.gram_sum

    def sym(As):
        seen["symmetric"] += 1
        return real_sym(As)

    def plain(As, Bs):
        seen["plain"] += 1
        return real_sum(As, Bs)

    monkeypatch.setattr(F, "self_gram_sum", sym)
    monkeypatch.setattr(F, "gram_sum", plain)
    return seen


@pytest.mark.parametrize("d", [1, 3])
@pytest.mark.parametrize("reduce", ["trace", None])
@pytest.mark.parametrize("chunk_size", [None, 4])
def test_accumulated_tiles_give_the_per_sample_kernel_and_similarity(d, reduce, chunk_size, products, monkeypatch):
    monkeypatch.setattr(_gemm, "BLOCK_ROWS", 2)  # the strips run on these small tiles too
    model = _model(d)
    g = torch.Generator().manual_seed(1)
    xa = torch.randn(11, 12, 6, generator=g, dtype=torch.float64)
    xb = torch.randn(6, 12, 6, generator=g, dtype=torch.float64)
    Ga, Gb = jacobian(model, (xa,)), jacobian(model, (xb,))
    sim = nnsim.Similarity(model, chunk_size=chunk_size, progress=False)
    assert rel_err(sim.kernel(xa), kernel(Ga, Ga)) < 1e-12
    assert rel_err(sim.kernel(xa, xb), kernel(Ga, Gb)) < 1e-12
    want_aa, want_ab = _similarity_oracle(Ga, Ga), _similarity_oracle(Ga, Gb)
    if reduce == "trace":
        want_aa, want_ab = (w.diagonal(dim1=-2, dim2=-1).sum(-1) / d for w in (want_aa, want_ab))
    assert rel_err(sim.similarity(xa, reduce=reduce), want_aa) < 1e-10
    assert rel_err(sim.similarity(xa, xb, reduce=reduce), want_ab) < 1e-10
    # the chunks' tiles with themselves are symmetric products, the others plain sums (several chunks only)
    assert products["symmetric"] > 0 and products["plain"] > 0


def test_zero_gradient_samples_read_nan_across_chunks(monkeypatch):
    monkeypatch.setattr(_gemm, "BLOCK_ROWS", 2)
    model = _model(3)
    x = torch.randn(9, 12, 6, dtype=torch.float64)
    x[[2, 7], 0, 0] = 0.0

    def output(out: Tensor, inputs: tuple[Tensor, ...]) -> Tensor:  # zero, with zero gradients, where x[:, 0, 0] = 0
        return out * (inputs[0][:, :1, 0] != 0)

    G = jacobian(model, (x,), output)
    assert float(G[[2, 7]].abs().max()) == 0.0 and float(G[0].abs().max()) > 0
    with pytest.warns(nnsim.RankDeficiencyWarning, match=r"\[2, 7\]"):
        got = nnsim.Similarity(model, output=output, chunk_size=4, progress=False).similarity(x, reduce=None)
    keep = torch.tensor([0, 1, 3, 4, 5, 6, 8])
    for i in (2, 7):
        assert torch.isnan(got[i]).all() and torch.isnan(got[:, i]).all()
    assert rel_err(got[keep][:, keep], _similarity_oracle(G[keep], G[keep])) < 1e-10


@pytest.mark.parametrize("reduce", ["trace", None])
def test_float32_stays_within_its_tolerance(reduce, monkeypatch):
    model64 = _model(3)
    model32 = _model(3, torch.float32)
    x = torch.randn(40, 12, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    G = jacobian(model64, (x,))
    want = _similarity_oracle(G, G)
    if reduce == "trace":
        want = want.diagonal(dim1=-2, dim2=-1).sum(-1) / 3
    for block in (128, 8):  # one product per tile (40 * 3 rows), and strips
        monkeypatch.setattr(_gemm, "BLOCK_ROWS", block)
        got = nnsim.Similarity(model32, chunk_size=16, progress=False).similarity(x.float(), reduce=reduce)
        assert got.dtype == torch.float32
        assert rel_err(got.double(), want) < 1e-5


def test_a_transformer_matches_the_loop_backend_with_strips(monkeypatch):
    monkeypatch.setattr(_gemm, "BLOCK_ROWS", 8)
    torch.manual_seed(3)
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
    model = nn.Sequential(layer, nn.Flatten(), nn.Linear(5 * 8, 4)).double().eval()
    x = torch.randn(10, 5, 8, dtype=torch.float64)
    ref = nnsim.Similarity(model, backend="loop", progress=False)
    for backend in ("structured", "functorch"):
        sim = nnsim.Similarity(model, backend=backend, chunk_size=4, progress=False)
        assert rel_err(sim.kernel(x), ref.kernel(x)) < 1e-11
        assert rel_err(sim.kernel(x[:7], x[7:]), ref.kernel(x[:7], x[7:])) < 1e-11
        assert rel_err(sim.similarity(x, reduce=None), ref.similarity(x, reduce=None)) < 1e-9


@pytest.mark.parametrize("mode", ["full", "trace"])
@pytest.mark.parametrize("same", [True, False])
def test_explicit_and_pairwise_factors_sum_in_one_tile(mode, same, monkeypatch):
    monkeypatch.setattr(_gemm, "BLOCK_ROWS", 3)
    g = torch.Generator().manual_seed(4)
    B1, B2, d, T = 7, 5, 2, 3

    def factors(B: int) -> list:
        a = torch.randn(B, 1, T, 4, generator=g, dtype=torch.float64)
        delta = torch.randn(B, d, 1, T, 5, generator=g, dtype=torch.float64)
        outer = F.Outer("lin", a, delta, ("lin.weight", torch.Size([5, 4])))
        dense = [F.Dense(f"n{k}", torch.randn(B, d, k, generator=g, dtype=torch.float64),
                         [(f"n{k}.w", torch.Size([k]))]) for k in (1, 6)]
        return [dense[0], outer, dense[1]]

    fa = factors(B1)
    fb = fa if same else factors(B2)
    Ga = torch.cat([f.dense().g for f in fa], -1)
    Gb = torch.cat([f.dense().g for f in fb], -1)
    want = kernel(Ga, Gb)
    got = F.gram(fa, fb, mode)
    torch.testing.assert_close(got, want if mode == "full" else want.diagonal(dim1=-2, dim2=-1).sum(-1),
                               rtol=1e-12, atol=1e-12)


_widths = st.lists(st.integers(1, 12), min_size=1, max_size=4)


@settings(max_examples=40, deadline=None)
@given(R=st.integers(1, 50), widths=_widths, block=st.integers(1, 12), seed=st.integers(0, 2**16))
def test_the_accumulated_symmetric_product_is_the_sum_of_products(R, widths, block, seed):
    g = torch.Generator().manual_seed(seed)
    As = [torch.randn(R, k, generator=g, dtype=torch.float64) for k in widths]
    was = _gemm.BLOCK_ROWS
    _gemm.BLOCK_ROWS = block
    try:
        got = _gemm.self_gram_sum(As)
    finally:
        _gemm.BLOCK_ROWS = was
    want = sum(A @ A.T for A in As)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert torch.equal(got, got.T) if R // block >= 2 else True  # strips: mirrored, exactly symmetric
    assert got.stride(0) % 8 == 0  # rows start on 64 bytes (8 float64)


@settings(max_examples=30, deadline=None)
@given(R1=st.integers(1, 30), R2=st.integers(1, 30), widths=_widths, seed=st.integers(0, 2**16))
def test_the_accumulated_product_is_the_sum_of_products(R1, R2, widths, seed):
    g = torch.Generator().manual_seed(seed)
    As = [torch.randn(R1, k, generator=g, dtype=torch.float64) for k in widths]
    Bs = [torch.randn(R2, k, generator=g, dtype=torch.float64) for k in widths]
    got = _gemm.gram_sum(As, Bs)
    torch.testing.assert_close(got, sum(a @ b.T for a, b in zip(As, Bs)), rtol=1e-12, atol=1e-12)
