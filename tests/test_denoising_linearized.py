"""Label-free denoising (method="linearized") and the untrusted-row flags, against independent oracles.

Oracles: the kernel from brute-force per-sample autograd (tests/oracles.py) with the smoother solved by numpy
in float64; a model that *is* a linear smoother (a linear layer on fixed features set to the kernel-ridge
solution), for which the noise-induced error is exactly S eps, so sigma_hat and the predicted error can be
checked against Monte-Carlo truth; the definitions of the flags written out.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from oracles import jacobian, kernel
from torch import nn

import nnsim
from nnsim.estimators import linearized
from nnsim.estimators.denoising import CANCELLATION_THRESHOLD


def _mlp(d: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(2, 12), nn.Tanh(), nn.Linear(12, d)).double()


def _numpy_smoother(K: np.ndarray, lam: float, smoother: str) -> np.ndarray:
    M = K.shape[0]
    if smoother == "ridge":
        return np.linalg.solve((K + lam * np.eye(M)).T, K.T).T  # K (K + lam I)^-1
    w, V = np.linalg.eigh(K)
    return V @ np.diag(-np.expm1(-np.clip(w, 0, None) / lam)) @ V.T  # I - exp(-K / lam)


@pytest.mark.parametrize("d,smoother", [(1, "ridge"), (2, "ridge"), (1, "flow")])
def test_linearized_equals_formula(d, smoother):
    n = 25
    model = _mlp(d)
    x = torch.randn(n, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # targets = predictions + noise: a network that fits them (fit_error < 0.5)
        y = model(x) + 0.02 * torch.randn(n, d, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    G = jacobian(model, (x,))
    K = kernel(G, G).permute(0, 2, 1, 3).reshape(n * d, n * d).numpy()  # row (i, c), column (j, e)
    with torch.no_grad():
        f = model(x).numpy().reshape(-1)
    sim = nnsim.Similarity(model, chunk_size=7, progress=False)
    rep = sim.denoising(x, targets=y, method="linearized", smoother=smoother)
    lam, yv = rep.lam, y.numpy().reshape(-1)

    def loss(lam_):
        return float(np.sum((_numpy_smoother(K, lam_, smoother) @ yv - f) ** 2))

    # lam minimises ||S y - f||^2 along log lam (the network is no smoother: the minimum is interior).
    assert loss(lam) <= min(loss(lam * 1.05), loss(lam / 1.05)) + 1e-12
    S = _numpy_smoother(K, lam, smoother)
    dof = n * d - 2 * np.trace(S) + np.trace(S @ S.T)
    sigma = math.sqrt(np.sum((yv - f) ** 2) / dof)
    assert rep.noise_std == pytest.approx(sigma, rel=1e-8)
    assert rep.dof == pytest.approx(np.trace(S), rel=1e-8)
    SS = (S @ S.T).reshape(n, d, n, d)
    D = np.stack([SS[i, :, i, :] for i in range(n)])  # [N, d, d] = sum_j S_ij S_ij^T
    np.testing.assert_allclose(rep.factor_matrix.numpy(), D, atol=1e-10)
    pred = sigma * np.sqrt(np.trace(D, axis1=1, axis2=2) / d)
    np.testing.assert_allclose(rep.predicted_error.numpy(), pred, rtol=1e-8)
    np.testing.assert_allclose(rep.consistency.numpy(), np.linalg.norm((f - S @ yv).reshape(n, d), axis=1),
                               atol=1e-10)
    assert rep.fit_error == pytest.approx(np.linalg.norm(S @ yv - f) / np.linalg.norm(f - f.mean()), rel=1e-6)
    # A given sigma is used and returned; the estimate is still reported.
    given_ = sim.denoising(x, targets=y, method="linearized", smoother=smoother, noise_std=0.5)
    assert given_.noise_std == 0.5 and given_.noise_std_estimated == pytest.approx(sigma, rel=1e-8)
    np.testing.assert_allclose(given_.predicted_error.numpy(), pred * 0.5 / sigma, rtol=1e-8)


class _Features(nn.Module):
    """f(x) = theta . phi(x) with fixed random features phi: a model linear in its parameters."""

    def __init__(self, p: int, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("w", torch.randn(1, p, dtype=torch.float64, generator=g) * 3)
        self.register_buffer("b", torch.rand(p, dtype=torch.float64, generator=g) * 2 * math.pi)
        self.head = nn.Linear(p, 1, bias=False).double()

    def phi(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cos(x @ self.w + self.b) * math.sqrt(2 / self.w.shape[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.phi(x))


def _ridge_network(seed: int, n: int = 300, p: int = 200, lam: float = 0.3, sigma: float = 0.4):
    """A model whose training predictions are exactly S_lam y (kernel ridge on its own eNTK Phi Phi^T)."""
    g = torch.Generator().manual_seed(100 + seed)
    x = torch.rand(n, 1, dtype=torch.float64, generator=g) * 2 - 1
    clean = torch.sin(2 * x)
    eps = sigma * torch.randn(n, 1, dtype=torch.float64, generator=g)
    model = _Features(p, seed)
    with torch.no_grad():
        Phi = model.phi(x)
        K = Phi @ Phi.T
        S = K @ torch.linalg.inv(K + lam * torch.eye(n, dtype=torch.float64))
        model.head.weight.copy_((Phi.T @ torch.linalg.solve(K + lam * torch.eye(n, dtype=torch.float64),
                                                            clean + eps)).T)
    return model, x, clean + eps, S


@pytest.mark.parametrize("seed", range(4))
def test_sigma_hat_recovers_sigma_of_a_linear_smoother(seed):
    sigma = 0.4
    model, x, y, S = _ridge_network(seed, sigma=sigma)
    rep = nnsim.Similarity(model, progress=False).denoising(x, targets=y, method="linearized")
    assert rep.lam == pytest.approx(0.3, rel=1e-3)  # the network is this smoother: lam is found
    assert rep.fit_error < 1e-4
    # sd of the estimate ~ sigma / sqrt(2 * dof) ~ 4.5 % at dof ~ 250, plus the smoother's (small) bias:
    # 15 % is > 3 sd, and the estimate must not be the trivial residual RMS (which is biased low by tr S).
    assert abs(rep.noise_std / sigma - 1) < 0.15
    # The predicted noise-induced error is exact for a linear smoother: sigma sqrt(sum_j S_ij^2).
    torch.testing.assert_close(rep.predicted_error, rep.noise_std * S.square().sum(1).sqrt(), rtol=1e-6, atol=1e-9)


def test_predicted_error_matches_monte_carlo_for_a_linear_smoother():
    model, x, y, S = _ridge_network(0)
    eps = 0.4 * torch.randn(len(x), 4000, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    actual = (S @ eps).square().mean(1).sqrt()  # the noise-induced error of the smoother, by simulation
    rep = nnsim.Similarity(model, progress=False).denoising(x, targets=y, method="linearized", noise_std=0.4)
    ratio = rep.predicted_error / actual  # 4000 draws: ~ 1.1 % sd per row (rows share the draws: correlated)
    assert float((ratio - 1).abs().max()) < 0.1 and abs(float(ratio.mean()) - 1) < 0.04


def test_nystroem_against_exact():
    n = 120
    model = _mlp(1)
    x = torch.randn(n, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        y = model(x) + 0.1 * torch.randn(n, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    sim = nnsim.Similarity(model, chunk_size=32, progress=False)
    exact = sim.denoising(x, targets=y, method="linearized")
    full = sim.denoising(x, targets=y, method="linearized", approximate=True, landmarks=n)
    assert full.approximate and not exact.approximate
    torch.testing.assert_close(full.predicted_error, exact.predicted_error, rtol=1e-6, atol=1e-9)
    # The model has 2*12 + 12 + 12 + 1 = 49 parameters: rank(K) <= 49, so 60 landmarks span K up to the
    # pseudo-inverse's cut of near-null directions (measured: 3e-4 relative), 10 landmarks do not (> 1e-2).
    def err(m):
        ny = sim.denoising(x, targets=y, method="linearized", approximate=True, landmarks=m, seed=1)
        return float(((ny.predicted_error - exact.predicted_error).abs() / exact.predicted_error).max())

    spanning, few = err(60), err(10)
    assert spanning < 2e-3 and few > 10 * spanning


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000), st.integers(3, 30), st.integers(1, 12))
def test_nystroem_is_below_the_kernel_and_exact_on_its_landmarks(seed, n, m):
    """K - K_nystroem is PSD, and the approximation reproduces the landmark columns exactly."""
    g = torch.Generator().manual_seed(seed)
    F = torch.randn(n, 5, dtype=torch.float64, generator=g)
    K = F @ F.T
    idx = torch.randperm(n, generator=g)[: min(m, n)]
    spec = linearized.nystroem_spectrum(K[:, idx], K[idx][:, idx])
    Kn = spec.U @ torch.diag(spec.ev) @ spec.U.T
    assert float(torch.linalg.eigvalsh(K - Kn).min()) > -1e-8 * float(K.diagonal().sum())
    torch.testing.assert_close(Kn[:, idx], K[:, idx], atol=1e-8 * float(K.abs().max()), rtol=0)


def test_linearized_argument_errors():
    model, x = _mlp(1), torch.randn(10, 2, dtype=torch.float64)
    sim = nnsim.Similarity(model, progress=False)
    y = torch.zeros(10, 1, dtype=torch.float64)
    for kwargs, match in [(dict(), "needs the noisy training targets"), (dict(targets=y[:5]), "targets must be"),
                          (dict(targets=y, smoother="spline"), "smoother must be"),
                          (dict(targets=y, landmarks=0), "landmarks"),
                          (dict(targets=torch.zeros(10, 2, dtype=torch.float64)), "2 columns"),
                          (dict(targets=y * float("nan")), "NaN")]:
        with pytest.raises(nnsim.InputError, match=match):
            sim.denoising(x, method="linearized", **kwargs)
    with pytest.raises(nnsim.InputError, match="method must be"):
        sim.denoising(x, method="ridge")
    with pytest.raises(nnsim.InputError, match="targets are used by method='linearized'"):
        sim.denoising(x, targets=y)
    big = torch.randn(6001, 2, dtype=torch.float64)
    with pytest.raises(nnsim.InputError, match="approximate=True"):
        sim.denoising(big, targets=torch.zeros(6001, 1, dtype=torch.float64), method="linearized")


def test_paper_flags_cancelling_rows():
    """A linear model k_ij = x_i . x_j: pairs +u, -u cancel in every row sum except where v dominates."""
    u, v = torch.tensor([1.0, 0.0], dtype=torch.float64), torch.tensor([0.3, 1.0], dtype=torch.float64)
    x = torch.stack([u, -u, 1.1 * u, -u, v, 0.5 * u + v])
    model = nn.Linear(2, 1, bias=False).double()
    rep = nnsim.Similarity(model, progress=False).denoising(x, noise_std=1.0)
    k = x @ x.T  # the kernel of a bias-free linear model (gradient = x)
    cancellation = k.sum(1).abs() / k.abs().sum(1)
    torch.testing.assert_close(rep.cancellation, cancellation)
    factor = k.square().sum(1) / k.sum(1).square()
    expected = (cancellation < CANCELLATION_THRESHOLD) | (factor > 1)
    assert torch.equal(rep.ill_conditioned, expected)
    assert expected.any() and not expected.all()  # the construction has both kinds of rows
    assert not rep.singular.any()


def test_linearized_flags_rows_the_smoother_misses():
    model, x, y, _ = _ridge_network(1)
    with torch.no_grad():
        pred = model(x)
    pred[3] += 2.0  # a "prediction" the smoother of the targets cannot reproduce (sigma = 0.4)
    rep = nnsim.Similarity(model, progress=False).denoising(x, predictions=pred, targets=y, method="linearized",
                                                            noise_std=0.4)
    assert torch.equal(rep.ill_conditioned, rep.consistency > 2 * 0.4)
    assert bool(rep.ill_conditioned[3]) and int(rep.ill_conditioned.sum()) < 5
