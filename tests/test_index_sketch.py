"""The index's projection: a CountSketch of vec(U(x)) (two ways of computing it that must agree), unbiased
with a dense projection's variance, and the exact centring of the stored rows."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import nnsim
from nnsim.index import FeatureIndex
from nnsim.index import features as ft
from nnsim.index import sketch as sk

torch.set_num_threads(1)


def _models() -> dict[str, tuple[nn.Module, torch.Tensor]]:
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 20), nn.Tanh(),
                         nn.Linear(20, 4)).double()
    emb = nn.Sequential(nn.Embedding(30, 5), nn.Flatten(), nn.Linear(15, 3)).double()
    return {"conv": (conv, torch.randn(6, 1, 6, 6, dtype=torch.float64)),
            "embedding": (emb, torch.randint(0, 30, (6, 3)))}


def _explicit_u(sim: nnsim.Similarity, x: torch.Tensor) -> torch.Tensor:
    """Oracle U(x) [B, d P] from per-sample autograd (the loop backend), kernel-corrected in float64."""
    loop = nnsim.Similarity(sim.model, backend="loop", progress=False)
    factors, _ = loop.corrected_factors((x,))
    return torch.cat([f.dense().g for f in factors], -1).flatten(1)


@pytest.mark.parametrize("name", ["conv", "embedding"])
def test_both_ways_of_sketching_an_outer_product_layer_agree(name, monkeypatch):
    model, x = _models()[name]
    factors, _ = nnsim.Similarity(model, progress=False).corrected_factors((x,))
    assert any(isinstance(f, nnsim.factors.Outer) for f in factors)
    by_fft = sk.sketch(factors, 16, 3)
    assert any(sk.fft_sketched(f, 16) for f in factors)
    monkeypatch.setattr(sk, "USE_FFT", False)  # every layer from its explicit gradient
    by_blocks = sk.sketch(factors, 16, 3)
    torch.testing.assert_close(by_fft, by_blocks, atol=1e-12, rtol=0)
    assert by_fft.abs().max() > 0.1
    # A layer materialised as its explicit gradient (``compact`` does so depending on the positions T, so
    # queries and data may differ) is sketched the same: the hash depends on the parameter layout only.
    dense = [f.dense() for f in factors]
    torch.testing.assert_close(sk.sketch(dense, 16, 3), by_fft, atol=1e-12, rtol=0)


@pytest.mark.parametrize("name", ["conv", "embedding"])
def test_sketch_is_unbiased_with_a_dense_projections_variance(name):
    model, x = _models()[name]
    sim = nnsim.Similarity(model, progress=False)
    factors, _ = sim.corrected_factors((x,))
    u = _explicit_u(sim, x)
    exact = u @ u.T
    W, seeds = 128, 300
    est = torch.stack([(s @ s.T) for s in (sk.sketch(factors, W, seed) for seed in range(seeds))])
    norms = exact.diagonal().sqrt()
    scale = norms[:, None] * norms[None, :]
    gaussian_sd = ((exact**2 + scale**2) / W).sqrt()  # a dense Gaussian projection's standard deviation
    # Unbiased: the mean over seeds is within 4 standard errors of the exact inner products ...
    assert ((est.mean(0) - exact).abs() <= 4 * est.std(0) / math.sqrt(seeds) + 1e-12).all()
    # ... and the spread is that of a dense Gaussian projection (CountSketch: at most, up to sampling error).
    ratio = (est.std(0) / gaussian_sd).mean()
    assert 0.6 < ratio < 1.3


def test_centre_scores_are_exact_mean_similarities_to_the_reference_rows(tmp_path, monkeypatch):
    model, x = _models()["conv"]
    x = torch.cat([x, torch.randn(14, 1, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))])
    sim = nnsim.Similarity(model, progress=False)
    monkeypatch.setattr(ft, "CENTRE_ROWS", 5)
    index = FeatureIndex.build(sim, x, tmp_path / "s", dim=16, shard_size=8, dtype="float32")
    assert index.manifest["layout"]["centre_rows"] == 5
    ref = [0, 5, 10, 14, 19]  # evenly spaced over the 20 samples
    rows = np.concatenate([np.load(tmp_path / "s" / e["file"]) for e in index.manifest["shards"]])
    np.testing.assert_allclose(rows[:, -1], sim.similarity(x, x[ref]).mean(1).numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(index.manifest["layout"]["centre"], rows[ref, :-1].mean(0), rtol=1e-5, atol=1e-7)
    # Centring changes no exact score: an exact store (d P <= dim) returns exact similarities.
    exact = FeatureIndex.build(sim, x, tmp_path / "e", dim=10_000, dtype="float32")
    assert exact.manifest["layout"]["exact"]
    v, i = exact.search(x[:4], k=6)
    torch.testing.assert_close(v, sim.similarity(x[:4], x).gather(1, i), atol=1e-6, rtol=0)
    assert torch.equal(i, sim.neighbors(x[:4], x, 6)[1])
