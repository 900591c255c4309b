"""The realized-energy variant of the linearized estimator (estimators.linearized.realized_fit): its formula,
and the case it exists for, noise with more energy in the kernel's top directions than sigma^2 each (a kernel
aligned with the noise it was trained on), where the exact noise response S eps is known."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from nnsim.estimators import linearized as L


def _problem(n: int, boost: float, seed: int, sigma: float = 0.3):
    """A smooth RBF kernel K = U diag(ev) U^T, targets y = signal + eps, predictions f = S_lam y of a known
    ridge smoother (so the fitted smoother is exact) and its exact noise response S eps.

    ``boost``: how much more energy the noise has in the kernel's top 80 eigendirections than in the others
    (boost^2 per direction, the total kept at n sigma^2), the alignment a trained network's kernel acquires
    with the noise it was fitted to; 1 is the isotropic noise of the textbook smoother.
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.linspace(-1, 1, n, dtype=torch.float64)
    spec = L.exact_spectrum(torch.exp(-(x[:, None] - x[None]) ** 2 / (2 * 0.05**2)))
    order = spec.ev.argsort(descending=True)
    a = torch.ones(n, dtype=torch.float64)
    a[order[:80]] = boost
    a = a / a.pow(2).mean().sqrt()
    eps = spec.U @ (sigma * a * torch.randn(n, generator=g, dtype=torch.float64))
    y = (torch.sin(3 * x) + eps)[:, None]
    lam = float(spec.ev[order[60]])
    s = L.filter_values(spec.ev, lam, "ridge")
    f = (spec.U @ (s * (spec.U.T @ y[:, 0])))[:, None]
    return spec, y, f, spec.U @ (s * (spec.U.T @ eps)), sigma


def test_realized_fit_equals_the_formula_written_out():
    spec, y, f, _, _ = _problem(120, 1.5, seed=1)
    fit = L.linearized_fit(spec, y, f)
    sigma, n_signal, D = L.realized_fit(spec, y, fit)
    U, ev = spec.U.numpy(), spec.ev.numpy()
    s = ev / (ev + fit.lam)
    u = U.T @ y[:, 0].numpy()
    perp = max(float(y.pow(2).sum()) - float((u**2).sum()), 0.0)
    sig2 = float(y.pow(2).mean())  # iterated down from the total energy
    for _ in range(200):  # fixed point of: signal = {u_r^2 > 2 ln(N) sig2}, sig2 = energy outside it / its count
        signal = u**2 > 2 * math.log(len(u)) * sig2
        sig2 = (float((u[~signal] ** 2).sum()) + perp) / (len(u) - signal.sum())
    assert sigma == pytest.approx(math.sqrt(sig2), rel=1e-10) and n_signal == int(signal.sum()) >= 1
    energy = np.where(signal, sig2, u**2)
    for i in (0, 17, 119):
        want = sum(s[r] ** 2 * energy[r] * U[i, r] ** 2 for r in range(len(u)))
        assert float(D[i, 0, 0]) == pytest.approx(want, rel=1e-9)
    # A given noise_std is used as is, inside the signal directions too.
    sigma_given, _, _ = L.realized_fit(spec, y, fit, noise_std=0.5)
    assert sigma_given == 0.5


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_realized_energies_follow_a_kernel_aligned_with_its_noise(seed):
    """Isotropic noise energies under-predict the exact response S eps when the kernel has learned eps; the
    realized ones do not, and without alignment both agree with it."""
    for boost, iso_range in ((1.0, (0.8, 1.25)), (1.5, (0.0, 0.8))):
        spec, y, f, S_eps, sigma = _problem(400, boost, seed)
        fit = L.linearized_fit(spec, y, f)
        actual = float(S_eps.pow(2).mean().sqrt())
        iso = fit.noise_std * float(fit.factor_matrix[:, 0, 0].mean().sqrt())
        real_sigma, _, D = L.realized_fit(spec, y, fit)
        real = float(D[:, 0, 0].mean().sqrt())
        assert iso_range[0] < iso / actual < iso_range[1], (boost, iso / actual)
        assert 0.8 < real / actual < 1.25, (boost, real / actual)
        assert 0.85 < real_sigma / sigma < 1.15
