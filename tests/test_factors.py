"""Gram products of factored per-sample gradients equal those of the explicit gradients (docs/method.md,
"Layer-wise structure")."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nnsim.factors import Dense, Outer, gram, pair_gram, prepare, self_gram

torch.set_num_threads(1)


def _explicit(a, delta, vocab=0):
    """Per-sample gradient blocks written out position by position: [B, d, G, n, m]."""
    B, d, G, T, n = delta.shape
    m = vocab if vocab else a.shape[-1]
    g = torch.zeros(B, d, G, n, m, dtype=delta.dtype)
    for b in range(B):
        for gi in range(G):
            for t in range(T):
                row = torch.zeros(m, dtype=delta.dtype)
                if vocab:
                    row[a[b, gi, t]] = 1.0
                else:
                    row = a[b, gi, t]
                g[b, :, gi] += delta[b, :, gi, t][:, :, None] * row[None, None, :]
    return g


def _outer(seed, B, d, G, T, n, m, indexed, bias):
    gen = torch.Generator().manual_seed(seed)
    delta = torch.randn(B, d, G, T, n, generator=gen, dtype=torch.float64)
    if indexed:
        a = torch.randint(0, m, (B, 1, T), generator=gen)
        delta = delta[:, :, :1]
        return Outer("emb", a, delta, ("w", torch.Size([m, n])), vocab=m, weight_transposed=True), a, delta
    a = torch.randn(B, G, T, m, generator=gen, dtype=torch.float64)
    if bias:
        a = torch.nn.functional.pad(a, (0, 1), value=1.0)
        f = Outer("lin", a, delta, ("w", torch.Size([G * n, m])), ("b", torch.Size([G * n])))
    else:
        f = Outer("lin", a, delta, ("w", torch.Size([G * n, m])))
    return f, a, delta


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10**6), B=st.integers(1, 4), d=st.integers(1, 3), G=st.integers(1, 2),
       T=st.integers(1, 4), n=st.integers(1, 3), m=st.integers(1, 4), indexed=st.booleans(), bias=st.booleans())
def test_outer_gram_equals_explicit_gradient_gram(seed, B, d, G, T, n, m, indexed, bias):
    f, a, delta = _outer(seed, B, d, G, T, n, m, indexed, bias)
    g = _explicit(a, f.delta, vocab=m if indexed else 0).reshape(B, d, -1)
    K = torch.einsum("icp,jep->ijce", g, g)
    assert torch.allclose(gram([f], [f], "full"), K, atol=1e-10)
    assert torch.allclose(gram([f], [f], "trace"), K.diagonal(dim1=-2, dim2=-1).sum(-1), atol=1e-10)
    assert torch.allclose(f.self_gram(), K.diagonal(dim1=0, dim2=1).permute(2, 0, 1), atol=1e-10)
    dense = f.dense()
    assert torch.allclose(gram([dense], [dense], "full"), K, atol=1e-10)
    # Explicit gradients in parameter layout: batch sums and the weight's shape.
    grads = f.batch_grad()
    assert [tuple(x.shape[1:]) for x in grads] == [tuple(s) for _, s in f.params]
    total = sum(x.reshape(d, -1).pow(2).sum() for x in grads)
    assert torch.allclose(total, g.sum(0).pow(2).sum(), atol=1e-10)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10**6), B=st.integers(1, 4), d=st.integers(1, 3), G=st.integers(1, 2),
       T=st.integers(1, 4), n=st.integers(1, 3), m=st.integers(1, 4), indexed=st.booleans(), bias=st.booleans())
def test_pair_gram_equals_the_explicit_kernel_of_each_index_pair(seed, B, d, G, T, n, m, indexed, bias):
    f, a, _ = _outer(seed, B, d, G, T, n, m, indexed, bias)
    g = _explicit(a, f.delta, vocab=m if indexed else 0).reshape(B, d, -1)
    I, J = torch.randint(0, B, (2, 5), generator=torch.Generator().manual_seed(seed))  # repeats included
    expected = torch.einsum("pcn,pen->pce", g[I], g[J])
    assert torch.allclose(f.pair_gram(I, J), expected, atol=1e-10)
    assert torch.allclose(f.dense().pair_gram(I, J), expected, atol=1e-10)
    # Summed over factors of both representations, as the training criterion uses them.
    assert torch.allclose(pair_gram([f, f.dense()], I, J), 2 * expected, atol=1e-10)
    assert torch.allclose(self_gram([f, f.dense()]), 2 * torch.einsum("bcn,ben->bce", g, g), atol=1e-10)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10**6), d=st.integers(1, 3), T=st.integers(1, 3))
def test_mixing_outputs_commutes_with_gram(seed, d, T):
    f, _, _ = _outer(seed, 3, d, 1, T, 2, 3, False, True)
    M = torch.randn(3, d, d, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    K = gram([f], [f], "full")
    expected = M.transpose(1, 2)[:, None] @ K @ M[None]
    assert torch.allclose(gram([f.mix(M)], [f.mix(M)], "full"), expected, atol=1e-9)
    assert torch.allclose(gram([f.dense().mix(M)], [f.mix(M).dense()], "full"), expected, atol=1e-9)


def test_mixed_representations_and_cost_model():
    f, _, _ = _outer(0, 4, 2, 1, 3, 5, 6, False, True)
    d = Dense("x", torch.randn(4, 2, 7, dtype=torch.float64), [("p", torch.Size([7]))])
    fs = [f, d]
    K = gram(fs, fs, "full")
    assert torch.allclose(K, gram(prepare(fs, "full"), [f.dense(), d], "full"), atol=1e-10)
    assert torch.allclose(self_gram(fs), K.diagonal(dim1=0, dim2=1).permute(2, 0, 1), atol=1e-10)
    # Many positions and a small weight: the explicit gradient is cheaper; no positions: pairwise.
    many, _, _ = _outer(0, 2, 1, 1, 64, 2, 2, False, False)
    one, _, _ = _outer(0, 2, 1, 1, 1, 64, 64, False, False)
    assert many.prefers_dense("full") and not one.prefers_dense("full")


@pytest.mark.parametrize("mode", ["full", "trace"])
def test_large_tiles_are_blocked_without_changing_results(mode, monkeypatch):
    import nnsim.factors as F

    f, _, _ = _outer(1, 6, 2, 2, 4, 3, 3, False, True)
    ref = gram([f.dense()], [f.dense()], mode)
    monkeypatch.setattr(F, "_PAIR_BLOCK_ELEMS", 1)  # one row per block
    assert torch.allclose(gram([f], [f], mode), ref, atol=1e-10)
    assert torch.allclose(f.self_gram(), f.dense().self_gram(), atol=1e-10)
