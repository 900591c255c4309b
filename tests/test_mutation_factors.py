"""nnsim.factors against oracles written out, written against the survivors of a mutmut run (docs/testing.md).

The oracle of every gradient is autograd: a layer's per-sample output signals ``delta`` and inputs ``a`` define
s_bc = sum_{g,t} delta[b, c, g, t] . (W_g a[b, g, t] + bias_g) (or the embedding rows W[a[b, g, t]]), whose
gradient with respect to (W, bias) is the per-sample Jacobian row g[b, c] that the factors describe. Kernels are
then Gram products of those explicit rows, in float64, on shapes with B1 != B2, T1 != T2, two groups, several
outputs, and block sizes that leave ragged blocks.
"""

from __future__ import annotations

import math
import zlib

import pytest
import torch

import nnsim.factors as F
from nnsim.factors import Dense, Outer

torch.set_num_threads(1)
f64 = torch.float64


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _linear(seed, B, d, G, T, n, m, bias=True, transposed=False):
    """An Outer factor of a (grouped) Linear over T positions, and its autograd oracle rows g [B, d, P]."""
    gen = _gen(seed)
    x = torch.randn(B, G, T, m, generator=gen, dtype=f64)
    delta = torch.randn(B, d, G, T, n, generator=gen, dtype=f64)
    a = torch.cat([x, torch.ones(B, G, T, 1, dtype=f64)], -1) if bias else x
    wshape = torch.Size([m, G * n]) if transposed else torch.Size([G * n, m])
    f = Outer("lin", a, delta, ("w", wshape), ("b", torch.Size([G * n])) if bias else None,
              weight_transposed=transposed)
    W = torch.zeros(wshape, dtype=f64, requires_grad=True)
    b = torch.zeros(G * n, dtype=f64, requires_grad=True)
    rows = torch.zeros(B, d, W.numel() + (b.numel() if bias else 0), dtype=f64)
    for i in range(B):
        for c in range(d):
            s = 0
            for g in range(G):
                Wg = (W.T if transposed else W)[g * n:(g + 1) * n]
                out = x[i, g] @ Wg.T + (b[g * n:(g + 1) * n] if bias else 0)  # [T, n]
                s = s + (delta[i, c, g] * out).sum()
            grads = torch.autograd.grad(s, [W, b] if bias else [W], allow_unused=True)
            rows[i, c] = torch.cat([q.reshape(-1) for q in grads])
    return f, rows


def _embedding(seed, B, d, T, n, vocab):
    """An Outer factor of an Embedding (indices, weight [vocab, n]) and its autograd oracle rows [B, d, vocab n]."""
    gen = _gen(seed)
    idx = torch.randint(0, vocab, (B, 1, T), generator=gen)
    delta = torch.randn(B, d, 1, T, n, generator=gen, dtype=f64)
    f = Outer("emb", idx, delta, ("w", torch.Size([vocab, n])), vocab=vocab, weight_transposed=True)
    W = torch.zeros(vocab, n, dtype=f64, requires_grad=True)
    rows = torch.zeros(B, d, vocab * n, dtype=f64)
    for i in range(B):
        for c in range(d):
            (gw,) = torch.autograd.grad((delta[i, c, 0] * W[idx[i, 0]]).sum(), [W])
            rows[i, c] = gw.reshape(-1)
    return f, rows


def _kernel(ga, gb):
    """[B1, B2, d, d] and its trace [B1, B2] from explicit rows, entry by entry."""
    K = torch.zeros(ga.shape[0], gb.shape[0], ga.shape[1], gb.shape[1], dtype=f64)
    for i in range(ga.shape[0]):
        for j in range(gb.shape[0]):
            for c in range(ga.shape[1]):
                for e in range(gb.shape[1]):
                    K[i, j, c, e] = (ga[i, c] * gb[j, e]).sum()
    return K, K.diagonal(dim1=-2, dim2=-1).sum(-1)


def _close(x, y):
    torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------------------------------- seeds, Gaussians

def test_layer_seed_is_the_documented_mix_and_stays_in_the_int64_range():
    # The seed of a projection is stored with an index and redrawn later: its formula is part of the format.
    for seed, layer, role in [(0, "a", "in"), (7, "conv.1", "out"), (2**62, "x" * 40, "dense")]:
        expected = (seed * 1_000_003 + zlib.crc32(f"{layer}/{role}".encode())) % 2**63
        assert F.layer_seed(seed, layer, role) == expected
        assert 0 <= F.layer_seed(seed, layer, role) < 2**63
    torch.Generator().manual_seed(F.layer_seed(2**62, "x", "in"))  # accepted by torch
    assert len({F.layer_seed(1, "l", r) for r in ("in", "out", "dense")}) == 3
    assert F.layer_seed(1, "l", "in") != F.layer_seed(2, "l", "in")


def test_gaussian_is_a_float64_draw_scaled_by_one_over_root_rows():
    # Drawn in float64 whatever the model's dtype: float32 and float64 models get the same sketch (to rounding).
    ref = torch.randn(3, 5, generator=_gen(11), dtype=f64) / math.sqrt(3)
    P = F._gaussian(3, 5, 11, torch.zeros(1, dtype=torch.float32))
    assert P.dtype == torch.float32 and P.shape == (3, 5)
    torch.testing.assert_close(P, ref.float())
    assert torch.equal(F._gaussian(3, 5, 11, torch.zeros(1, dtype=f64)), ref)  # not a float32 draw


# ----------------------------------------------------------------------------------------- Dense

def _dense(seed, B, d, sizes):
    g = torch.randn(B, d, sum(math.prod(s) for s in sizes), generator=_gen(seed), dtype=f64)
    return Dense("dense", g, [(f"p{i}", torch.Size(s)) for i, s in enumerate(sizes)])


def test_dense_products_against_the_rows():
    fa, fb = _dense(0, 3, 2, [(2, 3), (4,)]), _dense(1, 5, 2, [(2, 3), (4,)])
    assert (fa.batch_size, fa.outputs, fa.positions, fa.device, fa.dtype) == (3, 2, 1, torch.device("cpu"), f64)
    K, Kt = _kernel(fa.g, fb.g)
    _close(fa.gram(fb, "full"), K.permute(0, 2, 1, 3))  # the [B1, d, B2, d] layout of the GEMM
    _close(fa.gram(fb, "trace"), Kt)
    _close(F.gram([fa], [fb], "full"), K)
    I, J = torch.tensor([0, 2, 2, 1]), torch.tensor([1, 1, 2, 0])
    KK, _ = _kernel(fa.g, fa.g)
    _close(fa.pair_gram(I, J), KK[I, J])
    _close(fa.self_gram(), KK.diagonal(dim1=0, dim2=1).permute(2, 0, 1))
    _close(fa.gram(fa, "full"), KK.permute(0, 2, 1, 3))  # a chunk against itself (the symmetric product)
    _close(fa.gram(fa, "trace"), KK.diagonal(dim1=-2, dim2=-1).sum(-1))
    for e in (4, 1):  # e = 1: two outputs mixed into one (not the one-output scale)
        M = torch.randn(3, 2, e, generator=_gen(2), dtype=f64)
        mixed = fa.mix(M)
        assert mixed.g.shape == (3, e, 10)
        for i in range(3):
            _close(mixed.g[i], M[i].T @ fa.g[i])
    one = _dense(6, 3, 1, [(4,)])
    scale = torch.rand(3, 1, 1, generator=_gen(3), dtype=f64)
    _close(one.mix(scale).g, one.g * scale)
    assert not fa.prefers_dense("full") and not fa.prefers_dense("trace", partners=10**6)
    assert fa.compact() is fa and fa.dense() is fa
    _close(fa.select(torch.tensor([2, 0])).g, fa.g[[2, 0]])


def test_dense_batch_grad_and_inner_follow_the_parameter_layout():
    f = _dense(3, 4, 2, [(2, 3), (4,), (1, 2)])
    parts = f.batch_grad()
    assert [p.shape for p in parts] == [(2, 2, 3), (2, 4), (2, 1, 2)]
    total = f.g.sum(0)
    _close(parts[0].reshape(2, -1), total[:, :6])
    _close(parts[1], total[:, 6:10])
    _close(parts[2].reshape(2, -1), total[:, 10:])
    S = [torch.randn(3, *s, generator=_gen(4), dtype=f64) for s in [(2, 3), (4,), (1, 2)]]
    flat = torch.cat([s.reshape(3, -1) for s in S], 1)
    _close(f.inner(S), torch.einsum("bcp,ep->bce", f.g, flat))
    _close(f.inner([s.float() for s in S]), torch.einsum("bcp,ep->bce", f.g, flat.float().double()))


def test_dense_projection_draws_the_matrix_block_by_block(monkeypatch):
    f = _dense(5, 3, 2, [(7,)])
    assert f.project(7, 0) is f.g and f.project(9, 0) is f.g  # n <= k: nothing projected
    monkeypatch.setattr(F, "_PROJ_BLOCK", 3)  # blocks of 3, 3, 1 columns
    gen = _gen(F.layer_seed(4, "dense", "dense"))
    R = torch.cat([torch.randn(5, w, generator=gen, dtype=f64) for w in (3, 3, 1)], 1)  # [k, n]
    _close(f.project(5, 4), torch.einsum("bcn,kn->bck", f.g, R) / math.sqrt(5))
    f32 = Dense("dense", f.g.float(), f.params)  # the float64 draw is cast to the gradient's dtype
    p32 = f32.project(5, 4)
    assert p32.dtype == torch.float32
    torch.testing.assert_close(p32, (torch.einsum("bcn,kn->bck", f.g, R) / math.sqrt(5)).float(), rtol=1e-5,
                               atol=1e-5)


# ----------------------------------------------------------------------------------------- Outer: explicit rows

@pytest.mark.parametrize("bias,transposed", [(True, False), (False, False), (True, True), (False, True)])
def test_outer_dense_batch_grad_and_inner_equal_the_autograd_rows(bias, transposed):
    # A transposed weight [m, n] (GPT-2's Conv1D, Embedding) comes with one group only.
    B, d, G, T, n, m = 3, 2, 1 if transposed else 2, 3, 2, 3
    f, rows = _linear(6, B, d, G, T, n, m, bias, transposed)
    assert (f.batch_size, f.outputs, f.positions, f.m, f.indexed) == (B, d, T, m + bias, False)
    assert [p for p, _ in f.params] == (["w", "b"] if bias else ["w"])
    _close(f.dense().g, rows)
    assert f.dense().layer == "lin" and f.dense().params == f.params  # named alike: seeds, per-layer results
    shapes = [s for _, s in f.params]
    parts = f.batch_grad()
    assert [p.shape[1:] for p in parts] == shapes
    _close(torch.cat([p.reshape(d, -1) for p in parts], 1), rows.sum(0))
    for x, y in zip(f.dense().batch_grad(), parts, strict=True):
        _close(x, y)
    S = [torch.randn(4, *s, generator=_gen(7), dtype=f64) for s in shapes]
    flat = torch.cat([s.reshape(4, -1) for s in S], 1)
    _close(f.inner(S), torch.einsum("bcp,ep->bce", rows, flat))
    # parameter sums of another dtype are cast to the factor's
    got = f.inner([s.float() for s in S])
    assert got.dtype == f64
    _close(got, torch.einsum("bcp,ep->bce", rows, flat.float().double()))
    _close(F.inner([f], {name: s for (name, _), s in zip(f.params, S)}), torch.einsum("bcp,ep->bce", rows, flat))
    _close(f.select(torch.tensor([2, 0])).dense().g, rows[[2, 0]])


def test_outer_embedding_rows_sums_and_inner():
    f, rows = _embedding(8, 4, 2, 5, 3, 6)
    assert f.indexed and f.m == 6 and f.positions == 5
    _close(f.dense().g, rows)
    (part,) = f.batch_grad()
    assert part.shape == (2, 6, 3)
    _close(part.reshape(2, -1), rows.sum(0))
    S = torch.randn(3, 6, 3, generator=_gen(9), dtype=f64)
    _close(f.inner([S]), torch.einsum("bcp,ep->bce", rows, S.reshape(3, -1)))


def test_outer_mix_mixes_the_outputs_of_each_sample():
    f, rows = _linear(10, 3, 2, 1, 2, 2, 2)
    for e in (3, 1):  # e = 1: two outputs mixed into one (not the one-output scale)
        M = torch.randn(3, 2, e, generator=_gen(11), dtype=f64)
        mixed = f.mix(M)
        assert mixed.outputs == e
        _close(mixed.dense().g, torch.einsum("bcp,bce->bep", rows, M))
    g, grows = _linear(41, 3, 1, 1, 2, 2, 2)
    scale = torch.rand(3, 1, 1, generator=_gen(12), dtype=f64)
    _close(g.mix(scale).dense().g, grows * scale)


# ----------------------------------------------------------------------------------------- Outer: Gram products

@pytest.mark.parametrize("block", [None, 1, 2, 3], ids=["unblocked", "block1", "block2", "block3"])
@pytest.mark.parametrize("mode", ["full", "trace"])
def test_outer_gram_between_two_batches(mode, block, monkeypatch):
    # Two batches of different sizes and positions, two groups; row blocks of 1..3 samples leave ragged ends.
    fa, ra = _linear(12, 5, 2, 2, 3, 2, 3)
    xb = torch.randn(4, 2, 2, 3, generator=_gen(13), dtype=f64)
    fb = Outer("lin", torch.cat([xb, torch.ones(4, 2, 2, 1, dtype=f64)], -1),
               torch.randn(4, 2, 2, 2, 2, generator=_gen(14), dtype=f64), fa.weight, fa.bias)
    K, Kt = _kernel(ra, fb.dense().g)
    if block is not None:  # rows per block = block: elements per row are T1 B2 T2 (d^2 in full mode)
        monkeypatch.setattr(F, "_PAIR_BLOCK_ELEMS", block * 3 * 4 * 2 * (4 if mode == "full" else 1))
    expected = K.permute(0, 2, 1, 3) if mode == "full" else Kt
    _close(fa.gram(fb, mode), expected)
    _close(F.gram([fa, fa], [fb, fb], mode), 2 * (K if mode == "full" else Kt))
    _close(fa.gram(fb.dense(), mode), expected)  # against another representation


@pytest.mark.parametrize("mode", ["full", "trace"])
def test_outer_gram_with_one_position_each(mode):
    fa, ra = _linear(15, 3, 3, 2, 1, 2, 4)
    fb, rb = _linear(16, 5, 3, 2, 1, 2, 4)
    K, Kt = _kernel(ra, rb)
    _close(fa.gram(fb, mode), K.permute(0, 2, 1, 3) if mode == "full" else Kt)


def test_outer_gram_embedding_counts_equal_indices():
    fa, ra = _embedding(17, 3, 2, 4, 3, 5)
    fb, rb = _embedding(18, 4, 2, 2, 3, 5)
    K, Kt = _kernel(ra, rb)
    _close(fa.gram(fb, "full"), K.permute(0, 2, 1, 3))
    _close(fa.gram(fb, "trace"), Kt)


@pytest.mark.parametrize("mode,elems,blocks", [
    ("full", 2 * 4 * 3 * 3 * 4, [2, 2, 1]), ("trace", 2 * 4 * 3 * 3, [2, 2, 1]), ("trace", 4 * 3 * 3 + 1, [1] * 5),
    ("trace", 2, [2, 2, 1]),
])
def test_outer_gram_row_blocks_stay_within_the_element_budget(mode, elems, blocks, monkeypatch):
    # Elements per row of the [rows, T1, B2, T2] intermediates (times d^2 in full mode): 4 * 3 * 3 (* 4) here,
    # or 1 with one position and one partner; a budget of 2 rows gives blocks of 2, 2, 1 for 5 rows.
    fa, ra = _linear(33, 5, 2, 1, 3, 2, 2) if elems > 2 else _linear(33, 5, 2, 1, 1, 2, 2)
    fb, rb = _linear(34, 4, 2, 1, 3, 2, 2) if elems > 2 else _linear(34, 1, 2, 1, 1, 2, 2)
    monkeypatch.setattr(F, "_PAIR_BLOCK_ELEMS", elems)
    sizes = []
    products = Outer._position_products

    def counted(self, other, g, rows):
        sizes.append(rows.stop - rows.start)
        return products(self, other, g, rows)

    monkeypatch.setattr(Outer, "_position_products", counted)
    K, Kt = _kernel(ra, rb)
    _close(fa.gram(fb, mode), K.permute(0, 2, 1, 3) if mode == "full" else Kt)
    assert sizes == blocks


@pytest.mark.parametrize("mode", ["full", "trace"])
def test_outer_gram_with_one_position_against_two(mode):
    fa, ra = _linear(35, 3, 2, 1, 1, 2, 3)  # T1 = 1
    fb, rb = _linear(36, 4, 2, 1, 2, 2, 3)  # T2 = 2 (a sequence of another length)
    K, Kt = _kernel(ra, rb)
    _close(fa.gram(fb, mode), K.permute(0, 2, 1, 3) if mode == "full" else Kt)
    Kba, Ktba = _kernel(rb, ra)
    _close(fb.gram(fa, mode), Kba.permute(0, 2, 1, 3) if mode == "full" else Ktba)


def test_gram_of_factor_lists_of_different_lengths_is_refused():
    f, _ = _linear(37, 2, 1, 1, 1, 2, 2)
    with pytest.raises(ValueError):
        F.gram([f], [f, f], "trace")


@pytest.mark.parametrize("grad", ["inputs", "signals", "both"])
def test_outer_gram_is_differentiable_in_its_inputs_and_signals(grad):
    # The training criterion differentiates the kernel through both a (the layer inputs) and delta.
    fa, _ = _linear(38, 3, 2, 1, 3, 2, 2)
    leaves = {}
    for path in ("pairwise", "explicit"):
        a = fa.a.clone().requires_grad_(grad != "signals")
        delta = fa.delta.clone().requires_grad_(grad != "inputs")
        f = Outer("lin", a, delta, fa.weight, fa.bias)
        K = f.gram(f, "full") if path == "pairwise" else F._dense_gram(f.dense().g, f.dense().g, "full")
        wrt = [t for t in (a, delta) if t.requires_grad]
        leaves[path] = torch.autograd.grad(K.square().sum(), wrt)
    for x, y in zip(leaves["pairwise"], leaves["explicit"], strict=True):
        _close(x, y)


def test_outer_gram_is_differentiable_and_leaves_its_inputs_alone():
    fa, _ = _linear(19, 3, 2, 1, 3, 2, 2)
    delta = fa.delta.clone().requires_grad_(True)
    f = Outer("lin", fa.a, delta, fa.weight, fa.bias)
    before = f.delta.detach().clone()
    (gd,) = torch.autograd.grad(f.gram(f, "full").square().sum(), [delta])
    g = Outer("lin", fa.a, fa.delta.clone().requires_grad_(True), fa.weight, fa.bias)
    (ge,) = torch.autograd.grad(F._dense_gram(g.dense().g, g.dense().g, "full").square().sum(), [g.delta])
    _close(gd, ge)
    _close(f.delta.detach(), before)


def test_pair_gram_for_each_kind_of_layer():
    I, J = torch.tensor([0, 3, 1, 1, 2]), torch.tensor([2, 3, 0, 1, 3])
    cases = [_linear(20, 4, 2, 2, 3, 2, 3), _linear(21, 4, 3, 2, 1, 2, 3), _linear(31, 4, 2, 1, 2, 2, 3),
             _embedding(22, 4, 2, 3, 2, 4)]  # T = 3, 1 (the one-position shortcut), 2
    for f, rows in cases:
        K, _ = _kernel(rows, rows)
        _close(f.pair_gram(I, J), K[I, J])
        _close(F.pair_gram([f, f.dense()], I, J), 2 * K[I, J])


@pytest.mark.parametrize("path", ["pairwise", "explicit"])
def test_self_gram_for_each_kind_of_layer(path, monkeypatch):
    monkeypatch.setattr(Outer, "prefers_dense", lambda self, mode, partners=256: path == "explicit")
    monkeypatch.setattr(F, "_PAIR_BLOCK_ELEMS", 2 * (3 * 3 + 2 * 3 * 2))  # two samples per block: 2, 2, 1
    cases = [_linear(23, 5, 2, 2, 3, 2, 3), _linear(24, 5, 2, 2, 1, 2, 3), _embedding(25, 5, 2, 3, 2, 4),
             _linear(32, 5, 2, 1, 2, 2, 3)]
    for f, rows in cases:
        K, _ = _kernel(rows, rows)
        _close(f.self_gram(), K.diagonal(dim1=0, dim2=1).permute(2, 0, 1))
    fs = [c[0] for c in cases[:2]]
    K0, _ = _kernel(cases[0][1], cases[0][1])
    K1, _ = _kernel(cases[1][1], cases[1][1])
    _close(F.self_gram(fs), (K0 + K1).diagonal(dim1=0, dim2=1).permute(2, 0, 1))


def test_self_gram_follows_the_cost_model_choice(monkeypatch):
    # Many positions, few weights: the explicit gradient is cheaper (partners=1) and gives the same kernel.
    f, rows = _linear(26, 2, 1, 1, 40, 2, 2)
    assert f.prefers_dense("full", partners=1)
    K, _ = _kernel(rows, rows)
    _close(f.self_gram(), K.diagonal(dim1=0, dim2=1).permute(2, 0, 1))
    # The choice is made for one partner (the sample itself), in full mode.
    calls = []
    dense = Outer.dense
    monkeypatch.setattr(Outer, "dense", lambda self: calls.append(1) or dense(self))
    g, rows = _linear(39, 2, 1, 1, 2, 2, 2, bias=False)  # pairwise for one partner, explicit for two or more
    assert not g.prefers_dense("full", partners=1)
    assert g.prefers_dense("full", partners=2) and g.prefers_dense("full")
    K, _ = _kernel(rows, rows)
    _close(g.self_gram(), K.diagonal(dim1=0, dim2=1).permute(2, 0, 1))
    assert not calls
    _close(f.self_gram(), f.dense().self_gram())
    assert calls


def test_self_gram_row_blocks_stay_within_the_element_budget(monkeypatch):
    f, rows = _linear(40, 5, 2, 1, 3, 2, 2)  # T T + d T n = 9 + 12 = 21 elements per row
    monkeypatch.setattr(Outer, "prefers_dense", lambda self, mode, partners=256: False)
    K, _ = _kernel(rows, rows)
    einsum, seen = torch.einsum, []

    def spy(eq, *ops):
        if eq == "bts,besn->betn":  # the position products of one block of rows
            seen.append(ops[0].shape[0])
        return einsum(eq, *ops)

    for elems, blocks in [(42, [2, 2, 1]), (21, [1] * 5), (20, [1] * 5), (10**6, [5])]:
        monkeypatch.setattr(F, "_PAIR_BLOCK_ELEMS", elems)
        seen.clear()
        monkeypatch.setattr(torch, "einsum", spy)
        got = f.self_gram()
        monkeypatch.setattr(torch, "einsum", einsum)
        _close(got, K.diagonal(dim1=0, dim2=1).permute(2, 0, 1))
        assert seen == blocks, elems


# ----------------------------------------------------------------------------------------- projections

def _kron_oracle(rows_blocks, k1, m, k2, n, seed, layer, like):
    """proj[b, c, g, i, j] = sum P_out[i, n] blocks[b, c, g, n, m] P_in[j, m] (identity on a full-width side)."""
    P_in = torch.eye(m, dtype=f64) if k1 == m else F._gaussian(k1, m, F.layer_seed(seed, layer, "in"), like)
    P_out = torch.eye(n, dtype=f64) if k2 == n else F._gaussian(k2, n, F.layer_seed(seed, layer, "out"), like)
    out = torch.einsum("kn,bcgnm,lm->bcgkl", P_out, rows_blocks, P_in)
    return out.reshape(out.shape[0], out.shape[1], -1)


@pytest.mark.parametrize("n,m,k,k2,k1", [
    (2, 7, 9, 2, 5),    # n <= m: the output side keeps min(n, ceil(sqrt k)) = 2, the input side ceil(9 / 2) = 5
    (3, 7, 5, 3, 2),    # n <= m, k2 = min(3, 3) = 3 (full width), k1 = ceil(5 / 3) = 2
    (6, 3, 5, 2, 3),    # n > m: the input side keeps min(3, 3) = 3 (full width), the output side ceil(5 / 3) = 2
    (7, 4, 10, 3, 4),   # n > m: k1 = min(4, 4) = 4, k2 = ceil(10 / 4) = 3
    (5, 5, 7, 3, 3),    # n == m: the n <= m branch, k2 = min(5, 3) = 3, k1 = ceil(7 / 3) = 3
    (5, 5, 10, 4, 3),   # n == m: the output side keeps ceil(sqrt 10) = 4 (a stored sketch must be redrawn alike)
])
def test_outer_kronecker_projection_dims_and_values(n, m, k, k2, k1):
    B, d, G, T = 3, 2, 2, 3
    gen = _gen(27)
    a = torch.randn(B, G, T, m, generator=gen, dtype=f64)
    delta = torch.randn(B, d, G, T, n, generator=gen, dtype=f64)
    f = Outer("kron", a, delta, ("w", torch.Size([G * n, m])))
    blocks = torch.einsum("bcgtn,bgtm->bcgnm", delta, a)  # the explicit gradient, position sum written out
    p = f.project(k, 5)
    assert p.shape == (B, d, G * k2 * k1)
    _close(p, _kron_oracle(blocks, k1, m, k2, n, 5, "kron", delta))
    _close(F.project([f, f], k, 5), torch.cat([p, p], -1))
    f32 = Outer("kron", a.float(), delta.float(), ("w", torch.Size([G * n, m])))  # float64 draws, cast
    p32 = f32.project(k, 5)
    assert p32.dtype == torch.float32
    torch.testing.assert_close(p32, p.float(), rtol=1e-4, atol=1e-4)


def test_outer_projection_of_small_layers_is_exact_and_of_embeddings_uses_rows():
    f, rows = _linear(28, 3, 2, 1, 2, 2, 3)  # n m = 2 * 4 = 8 <= k
    _close(f.project(8, 0), rows)
    # Embedding, vocab 6 > k1: the projected input is the row of P_in^T at each index; vocab 3: one-hot rows.
    # n = 4, vocab 6, k = 8: k2 = min(4, 3) = 3, k1 = ceil(8 / 3) = 3; vocab 3, k = 7: k1 = 3 (full), k2 = 3.
    for vocab, k, k1, k2 in [(6, 8, 3, 3), (3, 7, 3, 3)]:
        fe, _ = _embedding(29, 3, 2, 4, 4, vocab)
        blocks = torch.zeros(3, 2, 1, 4, vocab, dtype=f64)
        for b in range(3):
            for t in range(4):
                blocks[b, :, 0, :, fe.a[b, 0, t]] += fe.delta[b, :, 0, t]
        assert fe.project(k, 3).shape == (3, 2, k1 * k2)
        _close(fe.project(k, 3), _kron_oracle(blocks, k1, vocab, k2, 4, 3, "emb", fe.delta))
    # Indices that never reach the last rows of the vocabulary: the one-hot rows are still vocab wide.
    fe, _ = _embedding(29, 3, 2, 4, 4, 3)
    low = Outer("emb", torch.zeros_like(fe.a), fe.delta, fe.weight, vocab=3, weight_transposed=True)
    blocks = torch.zeros(3, 2, 1, 4, 3, dtype=f64)
    blocks[..., 0] = fe.delta[:, :, 0].sum(2)[:, :, None]
    _close(low.project(7, 3), _kron_oracle(blocks, 3, 3, 3, 4, 3, "emb", fe.delta))


# ----------------------------------------------------------------------------------------- cost model

def _zeros_outer(d, G, T, n, m, vocab=0, dtype=torch.float32):
    a = torch.zeros(1, dtype=torch.long).expand(1, G, T) if vocab else torch.zeros(1, dtype=dtype).expand(1, G, T, m)
    delta = torch.zeros(1, dtype=dtype).expand(1, d, G, T, n)
    return Outer("l", a, delta, ("w", torch.Size([G * n, vocab or m])), vocab=vocab)


def _costs_written_out(d, G, T, n, m, indexed, mode, partners):
    """The cost model of docs/benchmarks.md ("Cost model"), in seconds per sample."""
    F_GEMM, OUT_GEMM, F_BATCHED, OUT_BATCHED, ELEM = 20e9, 1.5e-9, 8e9, 8e-9, 1.5e-9

    def gemm(M, K, N):
        return 2.0 * M * K * N / F_GEMM + M * N * OUT_GEMM

    e = 1 if mode == "trace" else d
    build = (d * G * n * m + d * G * n * T) * ELEM if indexed else d * G * (2.0 * n * T * m / F_BATCHED
                                                                            + n * m * OUT_BATCHED)
    explicit = build + gemm(e, d * G * n * m // e, partners * e)
    pairs = T * partners * T
    pp = pairs * ELEM if indexed else gemm(T, m, partners * T)
    if mode == "trace":
        dd = gemm(T, d * n, partners * T) + 2 * pairs * ELEM
    else:
        dd = gemm(d * T, n, partners * d * T) + 2 * d * d * pairs * ELEM
    return explicit, G * (pp + dd)


@pytest.mark.parametrize("shape", [(3, 2, 5, 4, 6, 0), (2, 1, 17, 128, 65, 0), (3, 1, 7, 4, 0, 11), (2, 3, 5, 4, 0, 9)],
                         ids=["grouped", "vit-mlp", "embedding", "grouped-indices"])
@pytest.mark.parametrize("mode", ["full", "trace"])
def test_costs_are_the_documented_formula(shape, mode):
    d, G, T, n, m, vocab = shape
    f = _zeros_outer(d, G, T, n, m, vocab)
    for partners in (1, 37, 256):
        e, p = _costs_written_out(d, G, T, n, vocab or m, bool(vocab), mode, partners)
        got = f.costs(mode, partners)
        assert got == pytest.approx((e, p), rel=1e-12)
        assert f.prefers_dense(mode, partners) == (e < p)
    assert f.costs(mode) == pytest.approx(_costs_written_out(d, G, T, n, vocab or m, bool(vocab), mode, 256),
                                          rel=1e-12)


def test_explicit_gradient_memory_cap_is_64_mib_per_sample_inclusive():
    # d G n m = 2^24 float32 entries = 64 MiB exactly: allowed (the explicit path is cheaper here); one more: not.
    at_cap = _zeros_outer(1, 1, 1024, 4096, 4096)
    assert at_cap.costs("trace")[0] < at_cap.costs("trace")[1]
    assert at_cap.prefers_dense("trace")
    over = _zeros_outer(1, 1, 1024, 4096, 4097)
    assert over.costs("trace")[0] < over.costs("trace")[1] and not over.prefers_dense("trace")
    # Two groups count twice.
    assert _zeros_outer(1, 2, 1024, 2048, 4096).prefers_dense("trace")
    assert not _zeros_outer(1, 2, 1024, 2048, 4097).prefers_dense("trace")
    # float64 entries count 8 bytes: half as many fit.
    assert not _zeros_outer(1, 1, 1024, 4096, 4096, dtype=f64).prefers_dense("trace")
    assert _zeros_outer(1, 1, 1024, 2048, 4096, dtype=f64).prefers_dense("trace")


@pytest.mark.parametrize("T,dense", [(1, False), (2, False), (3, True)])
def test_compact_picks_the_strictly_smaller_representation(T, dense):
    # explicit d G n m = 16 entries against the factored d G T n + G T m = 8 T: equal at T = 2 (kept factored).
    f = _zeros_outer(1, 1, T, 4, 4)
    assert isinstance(f.compact(), Dense) == dense
    assert isinstance(F.compact([f])[0], Dense) == dense
    # Indexed: d G n vocab = 12 against d G T n + G T = 4 T (+ no input width): equal at T = 3.
    e = _zeros_outer(1, 1, T + 1, 3, 0, vocab=4)
    assert isinstance(e.compact(), Dense) == (T + 1 > 3)
    # Two groups: d G n m = 32 against d G T n + G T m = 16 T: equal at T = 2, explicit from T = 3.
    assert isinstance(_zeros_outer(1, 2, T, 4, 4).compact(), Dense) == dense
    # One index per position costs 1, not 1 / T: n vocab = 3 against T n + T = 4 at T = 2 (explicit).
    assert isinstance(_zeros_outer(1, 1, 2, 1, 0, vocab=3).compact(), Dense)


def test_prepare_converts_exactly_the_factors_the_cost_model_prefers():
    cheap = _zeros_outer(1, 1, 1024, 16, 28)  # a convolution over many positions: explicit
    wide = _zeros_outer(1, 1, 16, 3072, 769)  # a wide Linear at d = 1: pairwise
    d = Dense("x", torch.zeros(1, 1, 3), [("p", torch.Size([3]))])
    out = F.prepare([cheap, wide, d], "trace")
    assert isinstance(out[0], Dense) and out[1] is wide and out[2] is d
    # The choice depends on the mode: d x d blocks make this layer's explicit gradient the cheaper path.
    f = _zeros_outer(2, 1, 2, 32, 8)
    assert not f.prefers_dense("trace") and f.prefers_dense("full")
    assert F.prepare([f], "trace")[0] is f and isinstance(F.prepare([f], "full")[0], Dense)


# ----------------------------------------------------------------------------------------- sums over factors

def test_batch_sum_accumulates_per_parameter_across_factors_and_calls():
    fa, ra = _linear(30, 3, 2, 1, 2, 2, 2)
    fb = Dense("lin", ra.clone(), fa.params)  # the same parameters again
    into = F.batch_sum([fa])
    w0 = into["w"].clone()
    F.batch_sum([fb], into)
    _close(into["w"], 2 * w0)
    _close(torch.cat([into["w"].reshape(2, -1), into["b"].reshape(2, -1)], 1), 2 * ra.sum(0))
    fresh = F.batch_sum([fb])
    _close(fresh["w"], w0)


def test_summed_terms_are_never_updated_in_place():
    t1, t2 = torch.ones(2), torch.full((2,), 2.0)
    assert torch.equal(F._summed([t1, t2, t2]), torch.full((2,), 5.0))
    assert torch.equal(t1, torch.ones(2)) and torch.equal(t2, torch.full((2,), 2.0))
