"""Density, neighbours and denoising against their O(N^2) brute-force definitions (docs/method.md, "Density and
neighbour counts", "Self-denoising")."""

from __future__ import annotations

import pytest
import torch
from oracles import jacobian, kernel
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from zoo import dead_relu

import nnsim

torch.set_num_threads(1)


def _setup(d=3, n=23, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, d)).double()
    x = torch.randn(n, 5, dtype=torch.float64)
    return model, x


def _oracle_similarity(model, xa, xb):
    """tr(K~)/d from brute-force gradients, the normalisation written out by eigendecomposition."""
    Ga, Gb = jacobian(model, (xa,)), jacobian(model, (xb,))

    def inv_sqrt(G):
        lam, V = torch.linalg.eigh(G @ G.transpose(1, 2))
        return V @ torch.diag_embed(lam.rsqrt()) @ V.transpose(1, 2)

    Ua, Ub = inv_sqrt(Ga) @ Ga, inv_sqrt(Gb) @ Gb  # rows: kernel-corrected gradients
    return torch.einsum("icp,jcp->ij", Ua, Ub) / Ga.shape[1], kernel(Ga, Gb)


@pytest.mark.parametrize("d", [1, 3])
@pytest.mark.parametrize("chunk", [None, 4])
def test_density_variants_equal_bruteforce(d, chunk):
    model, x = _setup(d)
    S, K = _oracle_similarity(model, x, x)
    sim = nnsim.Similarity(model, chunk_size=chunk, progress=False)
    diag = S.diagonal()
    close = lambda a, b: torch.testing.assert_close(a, b.to(a.dtype), atol=1e-10, rtol=0)  # noqa: E731
    close(sim.density(x), S.sum(1))
    close(sim.density(x, algorithm="tiles"), S.sum(1))
    close(sim.density(x, include_self=False), S.sum(1) - diag)
    close(sim.density(x, normalized=False), K.diagonal(dim1=-2, dim2=-1).sum(-1).sum(1) / d)
    self_trace = K.diagonal(dim1=0, dim2=1).diagonal(dim1=0, dim2=1).sum(-1)
    close(sim.density(x, normalized=False, include_self=False),
          (K.diagonal(dim1=-2, dim2=-1).sum(-1).sum(1) - self_trace) / d)
    for t in [-2.0, 0.0, 0.5, 0.9]:
        close(sim.density(x, method="hard", threshold=t), (S > t).sum(1).double())
        close(sim.density(x, method="hard", threshold=t, include_self=False),
              (S > t).sum(1).double() - (diag > t).double())
    for n in [1, 2, 3.5]:
        close(sim.density(x, method="less_soft", power=n), (S.clamp_min(0) ** n).sum(1))
        close(sim.density(x, method="less_soft", power=n, include_self=False),
              (S.clamp_min(0) ** n).sum(1) - diag.clamp_min(0) ** n)


def test_spec_identities_on_counts():
    model, x = _setup(2)
    sim = nnsim.Similarity(model, progress=False)
    N = len(x)
    # t < -1: every pair counts; include_self toggles exactly one.
    assert torch.equal(sim.density(x, method="hard", threshold=-1.5), torch.full((N,), float(N), dtype=torch.float64))
    assert torch.equal(sim.density(x, method="hard", threshold=-1.5, include_self=False),
                       torch.full((N,), float(N - 1), dtype=torch.float64))
    # n = 1: the soft count restricted to positive similarities.
    S = sim.similarity(x)
    torch.testing.assert_close(sim.density(x, method="less_soft", power=1), S.clamp_min(0).sum(1))
    torch.testing.assert_close(sim.density(x) - sim.density(x, include_self=False), torch.ones(N, dtype=torch.float64))


def test_density_against_separate_reference_and_loader():
    model, x = _setup(2)
    ref = torch.randn(9, 5, dtype=torch.float64)
    S, _ = _oracle_similarity(model, x, ref)
    sim = nnsim.Similarity(model, chunk_size=4, progress=False)
    loader = DataLoader(TensorDataset(ref, torch.zeros(9)), batch_size=2)
    torch.testing.assert_close(sim.density(x, loader), S.sum(1))
    torch.testing.assert_close(sim.density(x, ref, method="hard", threshold=0.3), (S > 0.3).sum(1).double())
    with pytest.raises(nnsim.InputError, match="include_self=False needs reference=None"):
        sim.density(x, ref, include_self=False)


def test_zero_gradient_samples_are_nan_and_do_not_count():
    model, x = dead_relu(8, 5)
    sim = nnsim.Similarity(model, params="0.*", progress=False)
    with pytest.warns(nnsim.RankDeficiencyWarning, match=r"Samples: \[5\]"):
        S = sim.similarity(x)
    keep = [i for i in range(8) if i != 5]
    for kwargs in [dict(), dict(algorithm="tiles"), dict(method="hard", threshold=0.5),
                   dict(method="less_soft", power=2)]:
        with pytest.warns(nnsim.RankDeficiencyWarning):
            dens = sim.density(x, **kwargs)
        assert torch.isnan(dens[5])
        Sk = S[keep][:, keep]
        method = kwargs.get("method", "soft")
        expected = {"soft": Sk.sum(1), "hard": (Sk > 0.5).sum(1).double(),
                    "less_soft": (Sk.clamp_min(0) ** 2).sum(1)}[method]
        torch.testing.assert_close(dens[keep], expected)
    with pytest.warns(nnsim.RankDeficiencyWarning):
        vals, idx = sim.neighbors(x, k=3)
    assert torch.isnan(vals[5]).all() and (idx[5] == -1).all() and not (idx[keep] == 5).any()


@pytest.mark.parametrize("chunk", [None, 3])
def test_neighbors_exact_topk(chunk):
    model, x = _setup(3)
    data = torch.randn(17, 5, dtype=torch.float64)
    S, _ = _oracle_similarity(model, x, data)
    sim = nnsim.Similarity(model, chunk_size=chunk, progress=False)
    vals, idx = sim.neighbors(x, data, k=5)
    ref = S.topk(5, dim=1)
    torch.testing.assert_close(vals, ref.values)
    assert torch.equal(idx, ref.indices)
    S2, _ = _oracle_similarity(model, x, x)
    v2, i2 = sim.neighbors(x, k=4)
    assert (i2[:, 0] == torch.arange(len(x))).all()  # the authors' convention: the source comes first
    S2.fill_diagonal_(float("-inf"))
    v3, i3 = sim.neighbors(x, k=4, exclude_self=True)
    assert torch.equal(i3, S2.topk(4, dim=1).indices)
    with pytest.raises(nnsim.InputError, match="k must be"):
        sim.neighbors(x, k=len(x), exclude_self=True)


@pytest.mark.parametrize("d", [1, 2])
def test_denoising_equals_definition(d, tmp_path):
    model, x = _setup(d, n=15)
    G = jacobian(model, (x,))
    K = kernel(G, G)  # [N, N, d, d]
    R = K.sum(1)
    W = torch.linalg.inv(R)[:, None] @ K
    D = (W @ W.transpose(-1, -2)).sum(1)
    D_authors = (W.transpose(-1, -2) @ W).sum(1)
    with torch.no_grad():
        yhat = model(x)
    e = (torch.linalg.inv(R) @ torch.einsum("ijce,je->ic", K, yhat)[..., None])[..., 0]
    sim = nnsim.Similarity(model, chunk_size=4, progress=False)
    rep = sim.denoising(x, noise_std=0.3)
    torch.testing.assert_close(rep.factor_matrix, D)
    factor = D.diagonal(dim1=-2, dim2=-1).sum(-1) / d
    torch.testing.assert_close(rep.factor, factor)
    torch.testing.assert_close(D_authors.diagonal(dim1=-2, dim2=-1).sum(-1) / d, factor)  # same trace
    torch.testing.assert_close(rep.effective_neighbors, 1 / factor)
    torch.testing.assert_close(rep.consistency, (yhat - e).norm(dim=1))
    torch.testing.assert_close(rep.predicted_error, 0.3 * factor.sqrt())
    preds = torch.randn(15, d, dtype=torch.float64)
    e2 = (torch.linalg.inv(R) @ torch.einsum("ijce,je->ic", K, preds)[..., None])[..., 0]
    torch.testing.assert_close(sim.denoising(x, predictions=preds).consistency, (preds - e2).norm(dim=1))
    # the linear-time approximation is exact when every layer fits in the projection ...
    torch.testing.assert_close(sim.denoising(x, approximate=True, dim=10_000).factor_matrix, D)
    # ... and an unbiased sketch otherwise: its error shrinks as the dimension grows.
    def err(k):
        return torch.tensor([float(((sim.denoising(x, approximate=True, dim=k, seed=s).factor - factor).abs()
                                    / factor).median()) for s in range(5)]).median()

    assert err(36) < 0.5 * err(4)
    rep.to_csv(tmp_path / "d.csv")
    lines = (tmp_path / "d.csv").read_text().splitlines()
    assert len(lines) == 16 and lines[0].startswith("index,factor,effective_neighbors,consistency,predicted_error")
    assert float(lines[3].split(",")[1]) == pytest.approx(float(factor[2]))
    assert set(rep.to_dict()) >= {"factor_matrix", "factor", "effective_neighbors", "consistency"}


def test_identical_gradients_give_one_over_n():
    # N samples with identical gradients: D = 1/N (docs/method.md, "Self-denoising").
    model = nn.Sequential(nn.Linear(3, 1)).double()
    x = torch.ones(10, 3, dtype=torch.float64)
    rep = nnsim.Similarity(model, progress=False).denoising(x)
    torch.testing.assert_close(rep.factor, torch.full((10,), 0.1, dtype=torch.float64))


def test_estimator_argument_errors():
    model, x = _setup(2)
    sim = nnsim.Similarity(model, progress=False)
    for kwargs, match in [(dict(method="hard"), "threshold"), (dict(method="less_soft"), "power"),
                          (dict(method="soft", threshold=0.5), "threshold applies"),
                          (dict(method="hard", threshold=0.5, normalized=False), "normalised"),
                          (dict(method="knn"), "method must be"), (dict(method="hard", threshold=0.1,
                                                                        algorithm="linear"), "no linear-time")]:
        with pytest.raises(nnsim.InputError, match=match):
            sim.density(x, **kwargs)
    with pytest.raises(nnsim.InputError, match="predictions"):
        sim.denoising(x, predictions=torch.zeros(3, 2, dtype=torch.float64))
    with pytest.raises(nnsim.InputError, match="euclidean"):
        nnsim.Similarity(model, metric="fisher", progress=False).denoising(x)
    with pytest.raises(nnsim.InputError, match="dim"):
        sim.features(x, dim=0)


def test_features_are_unbiased_projections_and_exact_for_small_layers():
    model, x = _setup(2, n=6)
    sim = nnsim.Similarity(model, progress=False)
    phi = sim.features(x, dim=1000)  # every layer smaller than 1000: exact
    Kt = sim.similarity(x, reduce=None)
    torch.testing.assert_close(torch.einsum("ick,jek->ijce", phi, phi), Kt)
    assert torch.equal(sim.features(x, dim=8, seed=3), sim.features(x, dim=8, seed=3))
    est = torch.stack([torch.einsum("ick,jek->ijce", p, p) for p in
                       (sim.features(x, dim=8, seed=s) for s in range(300))]).mean(0)
    assert float((est - Kt).abs().max()) < 0.15  # Monte-Carlo mean of unbiased sketches


@pytest.mark.parametrize("seed", range(4))
def test_topk_with_index_tensors_in_any_order_keeps_the_lowest_index_ties(seed):
    # TopK.update(rows, tile, cols) with explicit [R, C] indices (the index's candidate blocks): columns fed in a
    # random order, many ties and NaN; the oracle sorts each row by (-score, index).
    from nnsim.estimators import TopK

    g = torch.Generator().manual_seed(seed)
    Q, M, k = 4, 30, 7
    scores = torch.randint(0, 4, (Q, M), generator=g).double() / 2
    scores[torch.rand(Q, M, generator=g) < 0.2] = float("nan")
    perm = torch.randperm(M, generator=g)
    top = TopK(Q, k, torch.float64, torch.device("cpu"))
    for block in perm.split(6):
        top.update(slice(0, Q), scores[:, block], block.expand(Q, -1))
    values, indices = top.result()
    for q in range(Q):
        want = sorted((-float(s), j) for j, s in enumerate(scores[q].tolist()) if s == s)[:k]
        assert indices[q, : len(want)].tolist() == [j for _, j in want]
        assert values[q, : len(want)].tolist() == [-s for s, _ in want]
        assert (indices[q, len(want):] == -1).all()
