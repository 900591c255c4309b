"""Every estimator against brute force on models whose kernel blocks K(x, x') are NOT symmetric.

A one-hidden-layer MLP has K(x, x') = K(x', x) exactly, so no transpose bug can show on it. Here: a
two-hidden-layer MLP and a CNN (even-sized output map, read at its centre pixel), d >= 2, chunk sizes smaller
than N (off-diagonal and ragged tiles, the symmetric sweep), rank-deficient samples, thresholds equal to
attained similarities, a singular metric and ``singular="ridge"``.

The oracle (``Brute``) does not import nnsim: per-sample autograd in float64 (tests/oracles.py), the output
reductions written out here, and the normalisation by the SVD of each G(x) (not the library's eigh).
"""

from __future__ import annotations

import pytest
import torch
from oracles import jacobian
from torch import Tensor, nn

import nnsim
import nnsim.inputs
from nnsim import outputs
from nnsim.engine import Form, Quantity, Request
from nnsim.errors import RankDeficiencyWarning

torch.set_num_threads(1)
F64 = torch.float64


# ----------------------------------------------------------------------------------------------- models
def mlp2(d: int = 3, seed: int = 0) -> tuple[nn.Module, Tensor]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, d)).double()
    with torch.no_grad():  # larger weights: the tanh derivatives differ between samples, K(x, x') != K(x', x)^T
        for layer in model[::2]:
            layer.weight.mul_(3.0)
    return model, torch.randn(11, 4, dtype=F64)


def cnn(seed: int = 0) -> tuple[nn.Module, Tensor]:
    """Output [B, 2, 4, 6]: even sizes, so that an off-by-one centre (or swapped axes) reads another pixel."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.Tanh(), nn.Conv2d(3, 2, 3)).double()
    return model, torch.randn(9, 1, 6, 8, dtype=F64)


def centre_oracle(out: Tensor, inputs) -> Tensor:
    """The centre pixel written out: floor(4 / 2) = 2, floor(6 / 2) = 3 (not nnsim.outputs.center_pixel)."""
    assert out.shape[2:] == (4, 6)
    return out[:, :, 2, 3]


def gated(out: Tensor, inputs) -> Tensor:
    """Outputs whose second column is switched off (zero gradient) where x_0 < 0: rank-deficient K(x, x)."""
    keep = (inputs[0][:, 0] >= 0).to(out.dtype)
    return torch.stack([out[:, 0], out[:, 1] * keep, out[:, 2]], dim=1)


# ----------------------------------------------------------------------------------------------- oracle
class Brute:
    """Brute-force kernels of one model, one sample and one output at a time (no nnsim inside)."""

    def __init__(self, model: nn.Module, x: Tensor, output=None, metric_half: Tensor | None = None,
                 ridge: float | None = None) -> None:
        self.G = jacobian(model, (x,), output)  # [N, d, P]
        if metric_half is not None:
            self.G = metric_half @ self.G
        self.N, self.d = self.G.shape[:2]
        self.K = torch.einsum("icp,jep->ijce", self.G, self.G)  # K[i, j] = G_i G_j^T
        self.ridge = ridge
        with torch.no_grad():
            out = model(x)
        self.y = (out.reshape(len(x), -1) if output is None else output(out, (x,))).detach()

    def corrected(self, G: Tensor) -> Tensor:
        """U = K(x,x)^-1/2 G(x) from the SVD G = A S B^T: A S^-1 A^T G (range only), or the ridge form."""
        A, S, _ = torch.linalg.svd(G, full_matrices=False)  # A [N, d, d], S [N, d]
        if self.ridge is None:
            inv = torch.where(S > 1e-9 * S.amax(-1, keepdim=True), 1 / S.clamp_min(1e-300), torch.zeros_like(S))
        else:
            inv = (S**2 + self.ridge).rsqrt()
        return (A * inv[:, None, :]) @ A.transpose(1, 2) @ G

    def ktilde(self, other: Brute | None = None) -> Tensor:
        Ub = self.corrected((other or self).G)
        return torch.einsum("icp,jep->ijce", self.corrected(self.G), Ub)

    def sim(self, other: Brute | None = None) -> Tensor:
        return self.ktilde(other).diagonal(dim1=-2, dim2=-1).sum(-1) / self.d


def close(a: Tensor, b: Tensor, tol: float = 1e-9) -> None:
    torch.testing.assert_close(a, b.to(a.dtype), atol=tol, rtol=tol)


CASES = {
    "mlp2_d3": lambda: (*mlp2(3), None, None),
    "cnn_centre": lambda: (*cnn(), outputs.center_pixel, centre_oracle),
}


@pytest.fixture(params=list(CASES), scope="module")
def case(request):
    model, x, out_lib, out_oracle = CASES[request.param]()
    return model, x, out_lib, Brute(model, x, out_oracle)


def test_the_kernel_blocks_are_really_asymmetric(case):
    _, _, _, bf = case
    asym = (bf.K - bf.K.transpose(-1, -2)).abs().amax() / bf.K.abs().amax()
    assert asym > 5e-2  # otherwise a transpose bug could not show


@pytest.mark.parametrize("chunk", [3, 4])
def test_pairwise_kernel_similarity_influence(case, chunk):
    model, x, out, bf = case
    sim = nnsim.Similarity(model, out, chunk_size=chunk, progress=False)
    close(sim.kernel(x), bf.K)
    close(sim.similarity(x, reduce=None), bf.ktilde())
    close(sim.similarity(x), bf.sim())
    xa, xb = x[:5], x[3:]
    ba = Brute(model, xa, centre_oracle if out is not None else None)
    bb = Brute(model, xb, centre_oracle if out is not None else None)
    close(sim.similarity(xa, xb, reduce=None), ba.ktilde(bb))
    # influence[i, j] = K(xb_j, xa_i) K(xa_i, xa_i)^+ (the transpose of K(xa_i, xb_j))
    K_ab = torch.einsum("icp,jep->ijce", ba.G, bb.G)
    pinv_a = torch.linalg.pinv(ba.K.diagonal(dim1=0, dim2=1).permute(2, 0, 1))
    close(sim.influence(xa, xb), K_ab.transpose(-1, -2) @ pinv_a[:, None])
    close(sim.influence(x), bf.K.transpose(-1, -2) @ torch.linalg.pinv(bf.K.diagonal(dim1=0, dim2=1)
                                                                        .permute(2, 0, 1))[:, None])
    close(sim.self_kernel(x), bf.K.diagonal(dim1=0, dim2=1).permute(2, 0, 1))


@pytest.mark.parametrize("chunk", [3, 4])
def test_density_neighbors_against_bruteforce(case, chunk):
    model, x, out, bf = case
    sim = nnsim.Similarity(model, out, chunk_size=chunk, progress=False)
    S = bf.sim()
    off = S - torch.diag(S.diagonal())
    close(sim.density(x), S.sum(1))
    close(sim.density(x, algorithm="tiles"), S.sum(1))
    close(sim.density(x, include_self=False), off.sum(1))
    close(sim.density(x, include_self=False, algorithm="tiles"), off.sum(1))
    trK = bf.K.diagonal(dim1=-2, dim2=-1).sum(-1) / bf.d
    close(sim.density(x, normalized=False), trK.sum(1))
    close(sim.density(x, normalized=False, include_self=False), trK.sum(1) - trK.diagonal())
    close(sim.density(x, normalized=False, algorithm="tiles"), trK.sum(1))
    for n in (1, 2.5):
        close(sim.density(x, method="less_soft", power=n), (S.clamp_min(0) ** n).sum(1))
        close(sim.density(x, method="less_soft", power=n, include_self=False), (off.clamp_min(0) ** n).sum(1))
    t = float(S.flatten().sort().values[len(S.flatten()) // 3]) + 1e-7  # between attained values
    close(sim.density(x, method="hard", threshold=t), (S > t).sum(1).double())
    close(sim.density(x, method="hard", threshold=t, include_self=False), (off > t).sum(1).double())
    vals, idx = sim.neighbors(x, k=4)
    top = S.topk(4, dim=1)
    close(vals, top.values)
    assert torch.equal(idx, top.indices)
    vals, idx = sim.neighbors(x, k=3, exclude_self=True)
    top = S.masked_fill(torch.eye(len(x), dtype=torch.bool), -9).topk(3, dim=1)
    close(vals, top.values)
    assert torch.equal(idx, top.indices)
    vals, idx = sim.neighbors(x[:4], x[2:], k=3)
    top = S[:4, 2:].topk(3, dim=1)
    close(vals, top.values)
    assert torch.equal(idx, top.indices)


def test_hard_count_is_strict_at_attained_similarities():
    """A threshold equal to a similarity the data attain: that pair is not counted (strict >)."""
    model, x = mlp2(2)
    sim = nnsim.Similarity(model, chunk_size=4, progress=False)
    S = sim.similarity(x)  # the same tiles as the count's, bit for bit
    for i, j in [(0, 5), (2, 9), (7, 7)]:
        t = float(S[i, j])
        assert (S == t).sum() >= 1
        got = sim.density(x, method="hard", threshold=t)
        assert torch.equal(got, (S > t).sum(1).to(got.dtype))
        assert not torch.equal(got, (S >= t).sum(1).to(got.dtype))


def test_rank_deficient_samples_include_self_subtracts_the_rank_fraction():
    """tr K~(x, x)/d = rank/d: include_self=False must subtract 2/3 (not 1) for the rank-2 samples."""
    model, x = mlp2(3)
    x[:, 0] = torch.tensor([1.0, -1, 1, -1, 1, 1, -1, 1, 1, -1, 1], dtype=F64)  # 4 rank-2 samples
    bf = Brute(model, x, gated)
    S = bf.sim()
    low = x[:, 0] < 0
    close(S.diagonal()[low], torch.full((int(low.sum()),), 2 / 3, dtype=F64), 1e-12)
    off = S - torch.diag(S.diagonal())
    for chunk in (3, None):
        sim = nnsim.Similarity(model, gated, chunk_size=chunk, progress=False)
        with pytest.warns(RankDeficiencyWarning, match="rank-deficient"):
            close(sim.density(x, include_self=False), off.sum(1))
        with pytest.warns(RankDeficiencyWarning, match="rank-deficient"):
            close(sim.density(x, include_self=False, algorithm="tiles"), off.sum(1))
        with pytest.warns(RankDeficiencyWarning, match="rank-deficient"):
            close(sim.density(x), S.sum(1))
        with pytest.warns(RankDeficiencyWarning, match="rank-deficient"):
            close(sim.similarity(x, reduce=None), bf.ktilde())
        with pytest.warns(RankDeficiencyWarning, match="rank-deficient"):
            close(sim.density(x, method="less_soft", power=2, include_self=False), (off.clamp_min(0) ** 2).sum(1))
        assert torch.equal(sim.rank(x), torch.where(low, 2, 3))
        # influence through the pseudo-inverse of the singular K(x, x)
        pinv = torch.linalg.pinv(bf.K.diagonal(dim1=0, dim2=1).permute(2, 0, 1), hermitian=True, rtol=1e-9)
        with pytest.warns(RankDeficiencyWarning, match="rank-deficient"):
            close(sim.influence(x), bf.K.transpose(-1, -2) @ pinv[:, None])


def test_singular_ridge_is_the_regularised_inverse_root():
    """singular='ridge': K~ = (K + r I)^-1/2 K (K' + r I)^-1/2 with r = 1e-6, visible on tiny gradients."""
    model, x = mlp2(3)
    x[:, 0] = torch.linspace(-1, 1, len(x), dtype=F64)

    def small(out, inputs):  # gradients ~ 1e-3: K ~ 1e-6, comparable with the ridge
        return 1e-3 * gated(out, inputs)

    bf = Brute(model, x, small, ridge=1e-6)
    sim = nnsim.Similarity(model, small, chunk_size=4, singular="ridge", progress=False)
    got = sim.similarity(x, reduce=None)
    close(got, bf.ktilde(), 1e-10)
    # not the pseudo-inverse (the ridge changed the values a lot) ...
    plain = Brute(model, x, small).ktilde()
    assert (got - plain).abs().max() > 1e-2
    # ... and ridge samples have full nominal rank: no warning, density consistent with the similarity
    close(sim.density(x), bf.sim().sum(1), 1e-10)


def test_singular_metric_tensor():
    """A rank-1 PSD metric M: K_M = M^1/2 K M^1/2; every sample is normalised on the one-dimensional range."""
    model, x = mlp2(2)
    v = torch.tensor([1.0, 2.0], dtype=F64)
    M = torch.outer(v, v)
    half = M / v.norm()  # (v v^T)^1/2 = v v^T / |v|
    bf = Brute(model, x, metric_half=half)
    sim = nnsim.Similarity(model, metric=M, chunk_size=4, progress=False)
    close(sim.kernel(x), bf.K)
    with pytest.warns(RankDeficiencyWarning, match="rank-deficient"):
        close(sim.similarity(x), bf.sim())
    S = bf.sim()
    close(S.diagonal(), torch.full((len(x),), 0.5, dtype=F64), 1e-12)  # rank 1 of d = 2
    with pytest.warns(RankDeficiencyWarning, match="rank-deficient"):
        close(sim.density(x, include_self=False), S.sum(1) - 0.5)


# ----------------------------------------------------------------------------------------------- denoising
def denoising_oracle(K: Tensor, yhat: Tensor) -> tuple[Tensor, Tensor]:
    """(D [N, d, d], consistency [N]) from the definition, with solves instead of pseudo-inverses."""
    R = K.sum(1)  # R_i = sum_j K_ij, not symmetric here
    Q = torch.einsum("ijce,ijfe->icf", K, K)  # sum_j K_ij K_ij^T
    A = torch.linalg.solve(R, Q)  # R^-1 Q
    D = torch.linalg.solve(R, A.transpose(1, 2)).transpose(1, 2)  # R^-1 Q R^-T
    e = torch.linalg.solve(R, torch.einsum("ijce,je->ic", K, yhat)[..., None])[..., 0]
    return D, (yhat - e).norm(dim=1)


@pytest.mark.parametrize("chunk", [3, 4])
def test_denoising_exact_against_definition(case, chunk):
    model, x, out, bf = case
    R = bf.K.sum(1)
    assert (R - R.transpose(1, 2)).abs().max() > 1e-3 * R.abs().max()  # a transpose would show
    D, cons = denoising_oracle(bf.K, bf.y)
    sim = nnsim.Similarity(model, out, chunk_size=chunk, progress=False)
    rep = sim.denoising(x, noise_std=0.2)
    close(rep.factor_matrix, D)
    factor = D.diagonal(dim1=-2, dim2=-1).sum(-1) / bf.d
    close(rep.factor, factor)
    close(rep.effective_neighbors, 1 / factor)
    close(rep.consistency, cons)
    close(rep.predicted_error, 0.2 * factor.sqrt())
    preds = torch.randn(len(x), bf.d, dtype=F64, generator=torch.Generator().manual_seed(1))
    close(sim.denoising(x, predictions=preds).consistency, denoising_oracle(bf.K, preds)[1])
    close(sim.denoising(x, approximate=True, dim=10_000).factor_matrix, D)  # nothing projected: exact


def cnn44(seed: int = 0) -> tuple[nn.Module, Tensor]:
    """Conv layers of 40 and 148 parameters, both projected at dim = 24 (dense factors)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 4, 3)).double()
    return model, torch.randn(8, 1, 6, 8, dtype=F64)


def mlp16(seed: int = 0) -> tuple[nn.Module, Tensor]:
    """Linear layers of 80, 272 and 34 parameters, all projected at dim = 30 (Kronecker sketches)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 2)).double()
    return model, torch.randn(6, 4, dtype=F64)


def freeze_chunks(sim: nnsim.Similarity, x: Tensor) -> None:
    """Compute the chunks' factors once: the Monte-Carlo loops below then cost only the sketches."""
    src = nnsim.inputs.as_source(x, "x")
    pre = {q: list(sim._chunker.chunks(src, "x", Request(q, Form.RAW))) for q in (Quantity.KERNEL,
                                                                                    Quantity.SIMILARITY)}
    sim._chunker.chunks = lambda src, name, request, *args, **kwargs: iter(pre[request.quantity])


def scale_fit(estimates: Tensor, target: Tensor) -> Tensor:
    """Per seed, the least-squares c in estimate ~ c * target: E[c] = 1 for an unbiased estimator."""
    return (estimates * target).flatten(1).sum(1) / (target * target).sum()


# A 3 % bias must fail: |mean c - 1| < 1.5 %, with the seeds' standard error well below that.
BIAS_TOL = 0.015


def check_unbiased(c: Tensor) -> None:
    se = float(c.std() / len(c) ** 0.5)
    assert se < BIAS_TOL / 3, se  # enough seeds for the tolerance to mean something
    print(f"scale fit {float(c.mean()):.4f} +- {se:.4f} over {len(c)} seeds")
    assert abs(float(c.mean()) - 1) < BIAS_TOL, (float(c.mean()), se)
    assert abs(float(1.03 * c.mean()) - 1) > BIAS_TOL  # a 3 % bias would fail


def test_approximate_denoising_is_unbiased_where_it_really_projects():
    """Mean of 600 seeds at dim = 24 (every layer projected) against the exact factor matrix D.

    D is linear in the sketched Q_i = sum_j K_ij K_ij^T (R_i is exact), so E[D_approx] = D; one sketch used for
    both factors adds its variance to Q and fails this."""
    model, x = cnn44()
    assert all(p.numel() > 24 for p in model.parameters() if p.dim() > 1)
    sim = nnsim.Similarity(model, outputs.center_pixel, chunk_size=len(x), progress=False)
    D = sim.denoising(x).factor_matrix
    one = sim.denoising(x, approximate=True, dim=24, seed=0).factor_matrix
    freeze_chunks(sim, x)
    assert torch.equal(sim.denoising(x, approximate=True, dim=24, seed=0).factor_matrix, one)
    est = torch.stack([sim.denoising(x, approximate=True, dim=24, seed=s).factor_matrix for s in range(600)])
    assert float((one - D).abs().max() / D.abs().max()) > 0.05  # one seed is far off: this is about the mean
    check_unbiased(scale_fit(est, D))


@pytest.mark.parametrize("make", [cnn44, mlp16], ids=["conv-dense", "linear-kronecker"])
def test_features_are_unbiased_where_they_really_project(make):
    """E <phi(x), phi(x')> = K~ (normalized) or K: the mean over seeds, with a tolerance a 3 % bias fails."""
    model, x = make()
    # Kronecker sketches vary more per seed: more seeds, and the normalised case only (the same projection code)
    dim, seeds, kinds = (24, 800, (True, False)) if make is cnn44 else (30, 4000, (True,))
    assert all(p.numel() > dim for p in model.parameters() if p.dim() > 1)
    out, oracle = (outputs.center_pixel, lambda o, i: o[:, :, 2, 3]) if make is cnn44 else (None, None)
    bf = Brute(model, x, oracle)
    sim = nnsim.Similarity(model, out, chunk_size=len(x), progress=False)
    public = {n: sim.features(x, dim=dim, seed=5, normalized=n) for n in (True, False)}
    freeze_chunks(sim, x)
    for normalized in kinds:
        target = bf.ktilde() if normalized else bf.K
        assert torch.equal(sim.features(x, dim=dim, seed=5, normalized=normalized), public[normalized])
        est = torch.stack([torch.einsum("ick,jek->ijce", p, p) for p in
                           (sim.features(x, dim=dim, seed=s, normalized=normalized) for s in range(seeds))])
        check_unbiased(scale_fit(est, target))


def test_feature_index_on_the_asymmetric_models(case, tmp_path):
    """FeatureIndex: exact rows (d P <= dim) give the brute-force neighbours; with rows that really project, the
    re-ranking with the data gives brute-force similarities. (The sketch's unbiasedness is tested in
    tests/test_index_sketch.py.)"""
    model, x, out, bf = case
    S = bf.sim()
    sim = nnsim.Similarity(model, out, chunk_size=4, progress=False)
    exact = nnsim.FeatureIndex.build(sim, x, tmp_path / "exact", dim=10_000, shard_size=5, dtype="float32")
    vals, idx = exact.search(x[:4], k=3, backend="torch")
    top = S[:4].topk(3, dim=1)
    close(vals, top.values, 1e-6)
    assert torch.equal(idx, top.indices)
    small = nnsim.FeatureIndex.build(sim, x, tmp_path / "small", dim=6, seed=2, shard_size=5)
    est, est_idx = small.search(x[:4], k=3, backend="torch")
    assert torch.isfinite(est).all() and bool(((est_idx >= 0) & (est_idx < len(x))).all())
    rer, rer_idx = small.search(x[:4], k=3, data=x, backend="torch")
    close(rer, S[:4].gather(1, rer_idx), 1e-9)
