"""Both paths of the cost model's choice (pairwise product over positions, explicit per-sample gradient) give
the same numbers, so that the choice can never hide a wrong path (docs/method.md, "How the kernel is computed").

The oracle is the explicit gradient written out position by position (tests/test_factors.py) or the per-sample
autograd loop; each path is forced by monkeypatching ``Outer.prefers_dense`` and checked to have been taken.
"""

from __future__ import annotations

import pytest
import torch
from test_factors import _explicit, _outer
from torch import nn

import nnsim
from nnsim import factors as F
from nnsim.factors import Outer, gram

torch.set_num_threads(1)

# (B, d, G, T, n, m, indexed): a Linear over a sequence (ViT-like, T = 17), a conv over 5x5 positions with
# groups, an Embedding over a sequence, and one position (a Linear on vectors).
SHAPES = [(5, 3, 1, 17, 4, 6, False), (4, 2, 2, 25, 3, 5, False), (4, 3, 1, 9, 4, 11, True), (6, 2, 1, 1, 5, 7, False)]


@pytest.mark.parametrize("shape", SHAPES, ids=["seq-linear", "conv", "embedding", "one-position"])
@pytest.mark.parametrize("mode", ["full", "trace"])
def test_pairwise_and_explicit_paths_agree_with_the_written_out_gradient(shape, mode, monkeypatch):
    B, d, G, T, n, m, indexed = shape
    f, a, _ = _outer(3, B, d, G, T, n, m, indexed, bias=not indexed)
    # A second batch of another size, with fewer positions: tiles of two different chunks.
    f2, a2, _ = _outer(4, B + 2, d, G, max(1, T - 2), n, m, indexed, bias=not indexed)
    width = m if indexed else a.shape[-1]
    g1 = _explicit(a, f.delta, vocab=m if indexed else 0).reshape(B, d, -1)
    g2 = _explicit(a2, f2.delta, vocab=m if indexed else 0).reshape(B + 2, d, -1)
    K = torch.einsum("icp,jep->ijce", g1, g2)
    expected = K if mode == "full" else K.diagonal(dim1=-2, dim2=-1).sum(-1)
    assert g1.shape[-1] == G * n * width
    pairwise = gram([f], [f2], mode)
    explicit = gram([f.dense()], [f2.dense()], mode)
    torch.testing.assert_close(pairwise, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(explicit, expected, rtol=1e-10, atol=1e-10)
    # Blocked rows (one row per block) give the same tile.
    monkeypatch.setattr(F, "_PAIR_BLOCK_ELEMS", 1)
    torch.testing.assert_close(gram([f], [f2], mode), expected, rtol=1e-10, atol=1e-10)
    # Self-kernels both ways.
    K11 = torch.einsum("icp,iep->ice", g1, g1)
    monkeypatch.setattr(Outer, "prefers_dense", lambda self, mode, partners=256: False)
    torch.testing.assert_close(f.self_gram(), K11, rtol=1e-10, atol=1e-10)
    monkeypatch.setattr(Outer, "prefers_dense", lambda self, mode, partners=256: True)
    torch.testing.assert_close(f.self_gram(), K11, rtol=1e-10, atol=1e-10)


class SeqConvNet(nn.Module):
    """A conv over 6x6 positions, then the map read as a sequence of 9 tokens through Linear layers [B, T, C]."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 6, 2, stride=2)
        self.lin = nn.Linear(6, 8)
        self.lin2 = nn.Linear(8, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv2(torch.tanh(self.conv(x)))  # [B, 6, 3, 3]
        h = h.flatten(2).transpose(1, 2)  # [B, 9, 6]
        h = self.lin2(torch.tanh(self.lin(h)))  # [B, 9, 5]
        return self.head(h.mean(1))


@pytest.mark.parametrize("dense", [False, True], ids=["pairwise", "explicit"])
def test_forced_paths_match_the_loop_on_sequence_linear_and_conv(dense, monkeypatch):
    torch.manual_seed(0)
    model = SeqConvNet().double().eval()
    x = torch.randn(7, 2, 6, 6, dtype=torch.float64)
    ref = nnsim.Similarity(model, backend="loop", progress=False)
    K_ref, S_ref = ref.kernel(x), ref.similarity(x)
    C_ref = ref.similarity(x[:3], x[3:], reduce=None)
    taken = {"outer": 0, "dense": 0}
    outer_gram, dense_operand = F.Outer.gram, F.Dense.gram_operand

    def count_outer(self, other, mode):
        taken["outer"] += 1
        return outer_gram(self, other, mode)

    def count_dense(self, mode):  # the engine's Gram takes explicit gradients as GEMM operands
        taken["dense"] += 1
        return dense_operand(self, mode)

    monkeypatch.setattr(F.Outer, "gram", count_outer)
    monkeypatch.setattr(F.Dense, "gram_operand", count_dense)
    monkeypatch.setattr(F.Outer, "prefers_dense", lambda self, mode, partners=256: dense)
    monkeypatch.setattr(F, "compact", lambda fs: fs)  # keep every layer position-factored until the choice
    monkeypatch.setattr(nnsim.engine.chunks, "compact", lambda fs: fs)
    sim = nnsim.Similarity(model, progress=False)
    torch.testing.assert_close(sim.kernel(x), K_ref, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(sim.similarity(x), S_ref, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(sim.similarity(x[:3], x[3:], reduce=None), C_ref, rtol=1e-9, atol=1e-12)
    assert set(sim.describe().values()) == {"linear", "conv"}
    if dense:
        assert taken["outer"] == 0 and taken["dense"] > 0
    else:
        assert taken["outer"] > 0 and taken["dense"] == 0  # every layer is an Outer factor (no norm layers)


def _factor(T, m, n, d, vocab=0):
    a = torch.zeros(2, 1, T, dtype=torch.long) if vocab else torch.zeros(2, 1, T, m)
    return Outer("l", a, torch.zeros(2, d, 1, T, n), ("w", torch.Size([n, vocab or m])), vocab=vocab)


def test_cost_model_picks_each_path_where_it_is_clearly_cheaper():
    # ViT-like Linear over 17 tokens at d = 10: the explicit gradient (the pairwise product was 6x slower).
    assert _factor(17, 65, 128, 10).prefers_dense("trace")
    assert _factor(17, 65, 128, 10).prefers_dense("full")
    # A convolution over 1024 positions with a small kernel: explicit.
    assert _factor(1024, 28, 16, 1).prefers_dense("trace")
    # A wide Linear (BERT-base MLP) over 16 tokens at d = 1: pairwise (explicit: 2.4M weights per sample).
    assert not _factor(16, 769, 3072, 1).prefers_dense("trace")
    # An Embedding with a large vocabulary: pairwise (index equality), never a [d, n, vocab] gradient.
    assert not _factor(16, 0, 64, 10, vocab=30000).prefers_dense("full")
    # Costs are positive and grow with the partners of a tile.
    e1, p1 = _factor(17, 65, 128, 10).costs("trace", 64)
    e2, p2 = _factor(17, 65, 128, 10).costs("trace", 256)
    assert 0 < e1 < e2 and 0 < p1 < p2


def test_explicit_gradients_too_large_for_memory_are_never_chosen():
    f = _factor(1024, 2048, 2048, 10)  # d n m = 42M elements per sample (168 MB): over the per-sample cap
    explicit, pairwise = f.costs("trace")
    assert explicit < pairwise  # cheaper in time, still refused
    assert not f.prefers_dense("trace")
