"""Label-free denoising of a trained network modelled as a linear smoother in its own eNTK: pure tensor algebra.

With K the unnormalised kernel of the training set as an [N d, N d] matrix (row (i, c) = sample i, output c)
and its eigendecomposition K = U diag(ev) U^T, a spectral smoother is S = U diag(s(ev)) U^T with

* ``"ridge"``: s = ev / (ev + lam)    (S = K (K + lam I)^-1, kernel ridge regression), or
* ``"flow"``:  s = 1 - exp(-ev / lam) (S = I - exp(-K / lam), finite-time gradient flow on the squared loss).

``lam`` is chosen so that S applied to the noisy targets y reproduces the network's training predictions f
(least squares over log lam). The label noise sigma is estimated from the training residuals with the
smoother's residual degrees of freedom (unbiased when the smoother has no bias, Buja, Hastie & Tibshirani 1989):

    sigma^2 = ||y - f||^2 / (N d - 2 tr S + tr S S^T),

and the noise-induced error of sample i is sigma sqrt(tr D_i / d) with D_i = sum_j S_ij S_ij^T (the d x d
blocks of S S^T on the diagonal), the same variance factor as the paper's with W_ij replaced by S_ij.

Both formulas assume the noise is isotropic in the kernel's eigenbasis, E (U^T eps)_r^2 = sigma^2. A trained
network's kernel is not independent of its noise: it aligns with the targets it was fitted to, noise
included, so the noise puts more energy into the smoother's directions than sigma^2 each and less into the
residual (measured in docs/experiments/denoising.md). ``noise_model="realized"`` (:func:`realized_fit`)
therefore uses the energies of the projected targets themselves: sigma^2 from every direction except the few
that carry the signal (u_r^2 > 2 ln(N d) sigma^2, the universal threshold, iterated down from the total
energy), and the noise energy of
direction r as u_r^2 outside the signal directions, sigma^2 inside.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

SMOOTHERS = ("ridge", "flow")
NOISE_MODELS = ("isotropic", "realized")


@dataclass
class Spectrum:
    """K ~ U diag(ev) U^T on [N d] rows: ev [r] >= 0, U [N d, r] orthonormal columns."""

    ev: Tensor
    U: Tensor


def exact_spectrum(K: Tensor) -> Spectrum:
    """Eigendecomposition of the symmetric PSD kernel matrix K [M, M] in float64 (negative rounding clipped)."""
    ev, U = torch.linalg.eigh(0.5 * (K.double() + K.double().T))
    return Spectrum(ev.clamp_min(0), U)


def nystroem_spectrum(K_nm: Tensor, K_mm: Tensor, rtol: float = 1e-10) -> Spectrum:
    """Spectrum of the Nystroem approximation K ~ K_nm K_mm^+ K_nm^T (K_nm [M, m], K_mm [m, m]), float64.

    Landmark directions with eigenvalue <= rtol * max are dropped (the pseudo-inverse's range).
    """
    w, V = torch.linalg.eigh(0.5 * (K_mm.double() + K_mm.double().T))
    keep = w > rtol * w.max().clamp_min(torch.finfo(torch.float64).tiny)
    B = K_nm.double() @ (V[:, keep] / w[keep].sqrt())  # K ~ B B^T
    U, sv, _ = torch.linalg.svd(B, full_matrices=False)
    return Spectrum(sv**2, U)


def filter_values(ev: Tensor, lam: float, smoother: str) -> Tensor:
    """The smoother's eigenvalues s(ev) in [0, 1]."""
    if smoother == "ridge":
        return ev / (ev + lam)
    if smoother == "flow":
        return -torch.expm1(-ev / lam)
    raise ValueError(f"unknown smoother {smoother!r}; choose one of {SMOOTHERS}")


def fit_lambda(spec: Spectrum, y: Tensor, f: Tensor, smoother: str, grid: int = 241) -> tuple[float, float]:
    """The lam minimising ||S_lam y - f||^2 (y, f [M]); returns (lam, relative residual ||S y - f|| / ||f - mean f||).

    A log-spaced grid over [1e-9, 1e3] x max(ev) brackets the minimum, then golden-section refinement in log lam.
    The part of f outside span(U) (low-rank spectra) is a constant of the objective.
    """
    yt, ft = spec.U.T @ y.double(), spec.U.T @ f.double()
    f_perp2 = (f.double().square().sum() - ft.square().sum()).clamp_min(0)
    top = float(spec.ev.max().clamp_min(torch.finfo(torch.float64).tiny))

    def loss(log_lam: float) -> float:
        s = filter_values(spec.ev, math.exp(log_lam), smoother)
        return float((s * yt - ft).square().sum() + f_perp2)

    logs = torch.linspace(math.log(top * 1e-9), math.log(top * 1e3), grid, dtype=torch.float64).tolist()
    vals = [loss(v) for v in logs]
    k = min(range(grid), key=vals.__getitem__)
    a, b = logs[max(k - 1, 0)], logs[min(k + 1, grid - 1)]
    g = (math.sqrt(5) - 1) / 2
    c, e = b - g * (b - a), a + g * (b - a)
    fc, fe = loss(c), loss(e)
    for _ in range(60):
        if fc < fe:
            b, e, fe = e, c, fc
            c = b - g * (b - a)
            fc = loss(c)
        else:
            a, c, fc = c, e, fe
            e = a + g * (b - a)
            fe = loss(e)
    best = min((vals[k], logs[k]), (fc, c), (fe, e))
    scale = float((f.double() - f.double().mean()).norm().clamp_min(torch.finfo(torch.float64).tiny))
    return math.exp(best[1]), math.sqrt(max(best[0], 0.0)) / scale


@dataclass
class LinearizedFit:
    """Everything the linearized estimator derives from a spectrum, the targets and the predictions."""

    lam: float
    fit_error: float  # ||S y - f|| / ||f - mean f||
    trace: float  # tr S (the smoother's degrees of freedom)
    residual_dof: float  # N d - 2 tr S + tr S S^T
    noise_std: float  # estimated or given
    noise_std_estimated: float  # always the estimate
    factor_matrix: Tensor  # [N, d, d] D_i = sum_j S_ij S_ij^T
    smoothed: Tensor  # [N, d] (S y)_i


def linearized_fit(spec: Spectrum, y: Tensor, f: Tensor, smoother: str = "ridge",
                   noise_std: float | None = None) -> LinearizedFit:
    """Fit the smoother to (targets y [N, d], predictions f [N, d]) and derive sigma and D_i (float64)."""
    N, d = y.shape
    y1, f1 = y.double().reshape(-1), f.double().reshape(-1)
    lam, fit_error = fit_lambda(spec, y1, f1, smoother)
    s = filter_values(spec.ev, lam, smoother)
    trace, trace2 = float(s.sum()), float(s.square().sum())
    dof = N * d - 2 * trace + trace2
    resid2 = float((y1 - f1).square().sum())
    sigma_hat = math.sqrt(resid2 / dof) if dof > 0 else float("nan")
    Us = (spec.U * s).reshape(N, d, -1)  # rows of U diag(s)
    D = torch.einsum("ncr,ner->nce", Us, Us)
    smoothed = (spec.U @ (s * (spec.U.T @ y1))).reshape(N, d)
    return LinearizedFit(lam, fit_error, trace, dof, sigma_hat if noise_std is None else float(noise_std),
                         sigma_hat, D, smoothed)


def realized_fit(spec: Spectrum, y: Tensor, fit: LinearizedFit, smoother: str = "ridge", noise_std: float | None = None,
                 iterations: int = 100) -> tuple[float, int, Tensor]:
    """The ``noise_model="realized"`` variant of a :func:`linearized_fit` (same spectrum, targets and lam).

    Returns (sigma, number of signal directions, D_i [N, d, d] = sum_r s_r^2 e_r U_(i,.),r U_(i,.),r^T) with the
    noise energies e_r of the module docstring (D_i holds the energies: the predicted noise-induced error is
    sqrt(tr D_i / d), not sigma times it); sigma is ``noise_std`` when given (the energies inside the
    signal directions then use it), else estimated from the non-signal directions and the part of y outside
    span(U).
    """
    N, d = y.shape
    y1 = y.double().reshape(-1)
    u = spec.U.T @ y1
    perp = float((y1.square().sum() - u.square().sum()).clamp_min(0))
    s = filter_values(spec.ev, fit.lam, smoother)
    # Start from the total energy (every direction noise) and iterate down to the largest fixed point: started
    # from the residual estimate, which the alignment biases low, the threshold can admit noise directions
    # as signal and collapse sigma towards 0.
    sig2 = float(y1.square().sum()) / (N * d) if noise_std is None else float(noise_std) ** 2
    threshold = 2 * math.log(N * d)
    signal = torch.zeros_like(u, dtype=torch.bool)
    for _ in range(iterations):
        new = u.square() > threshold * sig2
        if noise_std is None:
            rest = N * d - int(new.sum())
            sig2 = (float(u[~new].square().sum()) + perp) / rest if rest > 0 else float("nan")
        if torch.equal(new, signal):
            break
        signal = new
    energy = torch.where(signal, torch.full_like(u, sig2), u.square())
    Us = (spec.U * (s * energy.sqrt())).reshape(N, d, -1)
    return math.sqrt(sig2), int(signal.sum()), torch.einsum("ncr,ner->nce", Us, Us)
