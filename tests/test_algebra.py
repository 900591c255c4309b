"""Kernel algebra (docs/method.md: "Normalisation", "Kernel-corrected gradients", "Influence", "Output metrics",
"Classification outputs") checked on random matrices.

Every reference is computed here by a route independent of ``nnsim.algebra`` (which uses ``eigh``):
Denman-Beavers iteration for principal square roots, QR-built bases for projectors, ``torch.linalg.inv`` /
``torch.linalg.pinv`` (LU / SVD) for inverses, Cholesky for positive definiteness, explicit loops for the
batched products and the closed form diag(p) - p p^T for the softmax Fisher metric.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from oracles import db_sqrt

from nnsim import algebra

torch.set_num_threads(1)

F64 = torch.float64
SETTINGS = settings(max_examples=25, deadline=None)
seeds = st.integers(0, 2**32 - 1)
dims = st.integers(1, 6)
batch_shapes = st.sampled_from([(), (3,), (2, 2)])
log_scales = st.integers(-4, 4)


# ---------------------------------------------------------------------------------------------- references
def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rand_orthogonal(d: int, g: torch.Generator, batch: tuple[int, ...] = ()) -> torch.Tensor:
    Q, R = torch.linalg.qr(torch.randn(*batch, d, d, dtype=F64, generator=g))
    return Q * torch.sign(torch.diagonal(R, dim1=-2, dim2=-1)).unsqueeze(-2)


def well_conditioned_spd(d: int, g: torch.Generator, batch: tuple[int, ...], scale: float) -> torch.Tensor:
    A = torch.randn(*batch, d, d, dtype=F64, generator=g)
    return scale * (A @ A.transpose(-1, -2) / d + 0.5 * torch.eye(d, dtype=F64))


def low_rank_psd(d: int, r: int, g: torch.Generator, batch: tuple[int, ...], scale: float):
    """K = B B^T with B = Q_r diag(s) W (s in [0.5, 2], W orthogonal): rank exactly r; also its range basis Q_r."""
    Q = rand_orthogonal(d, g, batch)[..., :r]
    s = 0.5 + 1.5 * torch.rand(*batch, r, dtype=F64, generator=g)
    W = rand_orthogonal(r, g, batch) if r > 0 else torch.zeros(*batch, 0, 0, dtype=F64)
    B = (Q * s.unsqueeze(-2)) @ W
    return scale * (B @ B.transpose(-1, -2)), Q


def sym(A: torch.Tensor) -> torch.Tensor:
    return A.transpose(-1, -2)


def close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-10, ref: torch.Tensor | float | None = None) -> None:
    """max |a - b| <= rtol * max |ref| (ref defaults to b; a floor of 1 for references that are all zero)."""
    assert a.shape == b.shape, (a.shape, b.shape)
    assert torch.isfinite(a).all()
    scale = b.abs().max() if ref is None else torch.as_tensor(ref).abs().max()
    scale = max(float(scale), 1e-300) if b.numel() else 1.0
    err = float((a - b).abs().max()) if a.numel() else 0.0
    assert err <= rtol * scale, f"max abs error {err:.3e} > {rtol:.0e} * {scale:.3e}"


# ---------------------------------------------------------------------------------------------- inv_sqrt_psd
@SETTINGS
@given(seed=seeds, d=dims, batch=batch_shapes, e=log_scales)
def test_inv_sqrt_of_spd_is_inverse_principal_root(seed, d, batch, e):
    K = well_conditioned_spd(d, gen(seed), batch, 10.0**e)
    X, rank = algebra.inv_sqrt_psd(K)
    assert X.shape == K.shape and X.dtype == K.dtype
    assert rank.shape == batch and rank.dtype == torch.int64 and bool((rank == d).all())
    S, Z = db_sqrt(K)
    close(S @ S, K)  # the reference is a square root...
    close(X, Z, 1e-9)  # ...and X is the inverse of that principal root
    eye = torch.eye(d, dtype=F64).expand_as(K)
    close(X @ K @ X, eye, 1e-10, ref=1.0)
    close(X, sym(X), 1e-12)
    torch.linalg.cholesky(0.5 * (X + sym(X)))  # positive definite (raises otherwise)


@SETTINGS
@given(seed=seeds, d=st.integers(2, 6), data=st.data(), batch=batch_shapes, e=log_scales)
def test_inv_sqrt_of_singular_is_finite_with_rank_and_projector(seed, d, data, batch, e):
    r = data.draw(st.integers(1, d - 1), label="rank")
    K, Q = low_rank_psd(d, r, gen(seed), batch, 10.0**e)
    X, rank = algebra.inv_sqrt_psd(K)
    assert torch.isfinite(X).all()
    assert bool((rank == r).all()), rank
    P = Q @ sym(Q)  # projector onto range(K), from the QR basis that built K
    ktilde = X @ K @ X  # K~(x, x) with the pseudo-inverse square root
    close(ktilde, P, 1e-9, ref=1.0)
    # the same through normalize_kernel on a 1 x 1 tile
    Kb, Xb = K.reshape(-1, d, d), X.reshape(-1, d, d)
    for b in range(Kb.shape[0]):
        t = algebra.normalize_kernel(Kb[b][None, None], Xb[b][None], Xb[b][None])[0, 0]
        close(t, P.reshape(-1, d, d)[b], 1e-9, ref=1.0)
    # X vanishes on the null space and is the inverse root on the range
    close(X @ (torch.eye(d, dtype=F64) - P), torch.zeros_like(X), 1e-9, ref=X)
    # singular="raise" refuses it (unbatched [d, d] input: see test_raise_on_unbatched_singular_matrix)
    Kflat = K.reshape(-1, d, d)
    with pytest.raises(ValueError):
        algebra.inv_sqrt_psd(Kflat, singular="raise")
    with pytest.raises(ValueError):
        algebra.pinv_psd(Kflat, singular="raise")


@pytest.mark.parametrize("batch", [(), (2, 3)], ids=["unbatched", "two_batch_axes"])
@pytest.mark.parametrize("fn", [algebra.inv_sqrt_psd, algebra.pinv_psd])
def test_raise_on_singular_matrix_any_batch_shape(fn, batch):
    K = torch.eye(2, dtype=F64).repeat(*batch, 1, 1)
    K[(*(b - 1 for b in batch), 0, 0)] = 0.0  # the last batch entry has rank 1
    with pytest.raises(ValueError):
        fn(K, singular="raise")


@SETTINGS
@given(seed=seeds, d=dims, e=log_scales)
def test_raise_accepts_full_rank(seed, d, e):
    K = well_conditioned_spd(d, gen(seed), (2,), 10.0**e)
    X, rank = algebra.inv_sqrt_psd(K, singular="raise")
    assert bool((rank == d).all())
    close(X @ K @ X, torch.eye(d, dtype=F64).expand_as(K), 1e-10, ref=1.0)


@pytest.mark.parametrize("d", [1, 2, 5])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_zero_matrix_has_rank_zero_and_zero_result(d, dtype):
    K = torch.zeros(3, d, d, dtype=dtype)
    for fn in (algebra.inv_sqrt_psd, algebra.pinv_psd):
        X, rank = fn(K)
        assert X.dtype == dtype
        assert torch.equal(X, torch.zeros_like(K))
        assert torch.equal(rank, torch.zeros(3, dtype=torch.int64))
        with pytest.raises(ValueError):
            fn(K, singular="raise")


@SETTINGS
@given(seed=seeds, d=st.integers(2, 6), data=st.data(), e=log_scales)
def test_ridge_is_finite_and_regularised(seed, d, data, e):
    r = data.draw(st.integers(0, d), label="rank")
    K, _ = low_rank_psd(d, r, gen(seed), (2,), 10.0**e)
    ridge = 1e-3 * 10.0**e
    eye = torch.eye(d, dtype=F64).expand_as(K)
    X, _ = algebra.inv_sqrt_psd(K, singular="ridge", ridge=ridge)
    P, _ = algebra.pinv_psd(K, singular="ridge", ridge=ridge)
    assert torch.isfinite(X).all() and torch.isfinite(P).all()
    # (lambda + ridge)^-1/2 and (lambda + ridge)^-1 on every eigenvalue: the inverse (root) of K + ridge I
    close(X @ (K + ridge * eye) @ X, eye, 1e-8, ref=1.0)
    close(X, sym(X), 1e-12)
    close(P @ (K + ridge * eye), eye, 1e-8, ref=1.0)
    # a zero matrix gives ridge^-1/2 I (default ridge too)
    Z = torch.zeros(d, d, dtype=F64)
    close(algebra.inv_sqrt_psd(Z, singular="ridge")[0], torch.eye(d, dtype=F64) / 1e-6**0.5, 1e-12)


def test_rank_guard_thresholds():
    g = gen(0)
    Q = rand_orthogonal(3, g)
    for s in (1e-6, 1.0, 1e6):
        K = (Q * (s * torch.tensor([1.0, 1e-8, 1e-12], dtype=F64))) @ Q.T
        assert int(algebra.inv_sqrt_psd(K)[1]) == 2  # default float64 rtol = 1e-10, relative to lambda_max
        assert int(algebra.inv_sqrt_psd(K, rtol=1e-6)[1]) == 1
        assert int(algebra.inv_sqrt_psd(K, rtol=0.0)[1]) == 3
        assert int(algebra.inv_sqrt_psd(K, atol=2e-8 * s)[1]) == 1  # atol wins when larger than rtol*lambda_max
        assert int(algebra.pinv_psd(K)[1]) == 2
    # float32: default rtol = 1e-5, result stays float32
    K32 = ((Q * torch.tensor([1.0, 1e-7, 0.5], dtype=F64)) @ Q.T).float()
    X32, r32 = algebra.inv_sqrt_psd(K32)
    assert X32.dtype == torch.float32 and int(r32) == 2


# ---------------------------------------------------------------------------------------------- pinv / sqrt
@SETTINGS
@given(seed=seeds, d=dims, data=st.data(), batch=batch_shapes, e=log_scales)
def test_pinv_psd_moore_penrose(seed, d, data, batch, e):
    r = data.draw(st.integers(1, d), label="rank")
    K, _ = low_rank_psd(d, r, gen(seed), batch, 10.0**e)
    P, rank = algebra.pinv_psd(K)
    assert bool((rank == r).all())
    nK, nP = K.abs().max(), P.abs().max()
    close(K @ P @ K, K, 1e-9)
    close(P @ K @ P, P, 1e-9)
    close(sym(K @ P), K @ P, 1e-9, ref=nK * nP)
    close(sym(P @ K), P @ K, 1e-9, ref=nK * nP)
    close(P, torch.linalg.pinv(K, rtol=1e-8), 1e-8)  # SVD-based reference
    if r == d:
        close(P, torch.linalg.inv(K), 1e-9)


@SETTINGS
@given(seed=seeds, d=dims, data=st.data(), e=log_scales)
def test_sqrt_psd(seed, d, data, e):
    r = data.draw(st.integers(0, d), label="rank")
    M, _ = low_rank_psd(d, r, gen(seed), (2,), 10.0**e)
    S = algebra.sqrt_psd(M)
    assert S.dtype == M.dtype and torch.isfinite(S).all()
    close(S @ S, M, 1e-9, ref=M.abs().max() if r else 1.0)
    close(S, sym(S), 1e-12, ref=S.abs().max() if r else 1.0)
    assert float(torch.linalg.eigvalsh(S).min()) >= -1e-7 * max(float(S.abs().max()), 1e-300)
    if r == d:
        close(S, db_sqrt(M)[0], 1e-9)


# ---------------------------------------------------------------------------------------------- tile algebra
@SETTINGS
@given(seed=seeds, d=st.integers(1, 4), n=st.integers(1, 4), m=st.integers(1, 4))
def test_normalize_trace_influence_formulas(seed, d, n, m):
    g = gen(seed)
    K_ab = torch.randn(n, m, d, d, dtype=F64, generator=g)
    A = torch.randn(n, d, d, dtype=F64, generator=g)
    B = torch.randn(m, d, d, dtype=F64, generator=g)
    norm = algebra.normalize_kernel(K_ab, A, B)
    infl = algebra.influence_from_kernel(K_ab, A)
    tr = algebra.trace_summary(K_ab)
    tr7 = algebra.trace_summary(K_ab, denominator=7)
    assert norm.shape == infl.shape == (n, m, d, d) and tr.shape == (n, m)
    for i in range(n):
        for j in range(m):
            close(norm[i, j], A[i] @ K_ab[i, j] @ B[j], 1e-12)
            close(infl[i, j], K_ab[i, j].T @ A[i], 1e-12)
            t = sum(float(K_ab[i, j, c, c]) for c in range(d))
            assert abs(float(tr[i, j]) - t / d) <= 1e-12 * (1 + abs(t))
            assert abs(float(tr7[i, j]) - t / 7) <= 1e-12 * (1 + abs(t))


# ---------------------------------------------------------------------------------------------- softmax Fisher
@SETTINGS
@given(seed=seeds, C=st.integers(2, 7), b=st.integers(1, 5), scale=st.sampled_from([0.1, 1.0, 3.0]))
def test_softmax_fisher(seed, C, b, scale):
    g = gen(seed)
    z = scale * torch.randn(b, C, dtype=F64, generator=g)
    F = algebra.softmax_fisher(z)
    assert F.shape == (b, C, C) and F.dtype == F64
    p = torch.exp(z - torch.logsumexp(z, dim=1, keepdim=True))
    ref = torch.stack([torch.diag(p[i]) - torch.outer(p[i], p[i]) for i in range(b)])
    close(F, ref, 1e-13, ref=1.0)  # entries are differences of probabilities: absolute scale 1
    close(F.sum(-1), torch.zeros(b, C, dtype=F64), 1e-13, ref=1.0)
    close(F.sum(-2), torch.zeros(b, C, dtype=F64), 1e-13, ref=1.0)
    close(F, sym(F), 0.0, ref=1.0)
    # quadratic form = variance of a random variable under p (PSD, null vector = ones)
    u = torch.randn(b, C, dtype=F64, generator=g)
    var = (p * u**2).sum(1) - (p * u).sum(1) ** 2
    close(torch.einsum("bi,bij,bj->b", u, F, u), var, 1e-12, ref=1.0)
    # invariant to per-sample logit shifts
    shift = 5.0 * torch.randn(b, 1, dtype=F64, generator=g)
    close(algebra.softmax_fisher(z + shift), F, 1e-12, ref=1.0)
    # float32 in, float32 out
    F32 = algebra.softmax_fisher(z.float())
    assert F32.dtype == torch.float32
    close(F32.double(), ref, 1e-6, ref=1.0)


# ---------------------------------------------------------------------------------------------- check_metric
@SETTINGS
@given(seed=seeds, d=dims)
def test_check_metric(seed, d):
    g = gen(seed)
    Q = rand_orthogonal(d, g)
    lam = torch.rand(d, dtype=F64, generator=g) + 0.1
    M = (Q * lam) @ Q.T
    M = 0.5 * (M + M.T)
    assert algebra.check_metric(M, d) is M
    lam0 = lam.clone()
    lam0[0] = 0.0
    M0 = (Q * lam0) @ Q.T
    algebra.check_metric(0.5 * (M0 + M0.T), d)  # PSD singular is accepted
    with pytest.raises(ValueError):
        algebra.check_metric(M, d + 1)  # wrong shape
    with pytest.raises(ValueError):
        algebra.check_metric(torch.ones(d, dtype=F64), d)
    with pytest.raises(ValueError):
        algebra.check_metric(M.tolist(), d)  # not a tensor
    bad = M.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError):
        algebra.check_metric(bad, d)
    if d >= 2:
        skew = torch.zeros(d, d, dtype=F64)
        skew[0, 1], skew[1, 0] = 0.3, -0.3
        with pytest.raises(ValueError, match="symmetric"):
            algebra.check_metric(M + skew, d)
        lam_neg = lam.clone()
        lam_neg[-1] = -0.05
        Mneg = (Q * lam_neg) @ Q.T
        with pytest.raises(ValueError, match="positive semi-definite"):
            algebra.check_metric(0.5 * (Mneg + Mneg.T), d)
    else:
        with pytest.raises(ValueError, match="positive semi-definite"):
            algebra.check_metric(-M, d)


@pytest.mark.parametrize("case", ["softmax_fisher", "low_rank"])
def test_sqrt_psd_keeps_null_space(case):
    for seed in range(5):
        g = gen(seed)
        if case == "softmax_fisher":
            M = algebra.softmax_fisher(torch.randn(4, 5, dtype=F64, generator=g))
            null = torch.ones(4, 5, 1, dtype=F64)  # F 1 = 0 exactly
        else:
            M, Q = low_rank_psd(5, 3, g, (4,), 1.0)
            null = rand_orthogonal(5, g, (4,))  # any vector orthogonal to range(M)
            null = null - Q @ (sym(Q) @ null)
        S = algebra.sqrt_psd(M)
        close(S @ null, torch.zeros_like(null), 1e-12, ref=S.abs().max() * null.abs().max())
