"""nnsim.estimators.linearized against the formulas written out (mutation testing, docs/testing.md).

Oracles: the smoother as an explicit [M, M] matrix S = U diag(s) U^T, its objective ||S y - f|| evaluated on a
fine grid, the Nystroem approximation as K_nm pinv(K_mm) K_nm^T.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from nnsim.estimators import linearized as lin

torch.set_num_threads(1)
F64 = torch.float64


def _psd(M: int, rank: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(M, rank, dtype=F64, generator=g) * torch.logspace(0, -2, rank, dtype=F64)
    return A @ A.T


def _S(spec: lin.Spectrum, lam: float, smoother: str) -> torch.Tensor:
    ev = spec.ev
    s = ev / (ev + lam) if smoother == "ridge" else 1 - torch.exp(-ev / lam)
    return spec.U @ torch.diag(s) @ spec.U.T


def test_exact_spectrum_reconstructs_the_symmetrised_kernel_in_float64():
    K = _psd(6, 3, 0)
    A = torch.randn(6, 6, dtype=F64, generator=torch.Generator().manual_seed(1))
    asym = (K + 1e-3 * (A - A.T)).float()  # rounding-level asymmetry, float32 in
    spec = lin.exact_spectrum(asym)
    assert spec.ev.dtype == F64 and spec.U.dtype == F64 and spec.ev.shape == (6,) and spec.U.shape == (6, 6)
    assert (spec.ev >= 0).all()  # the (numerically) zero eigenvalues clipped, not negative
    sym = 0.5 * (asym.double() + asym.double().T)
    torch.testing.assert_close(spec.U @ torch.diag(spec.ev) @ spec.U.T, sym, rtol=0, atol=1e-6)
    torch.testing.assert_close(spec.U.T @ spec.U, torch.eye(6, dtype=F64), rtol=0, atol=1e-10)
    # a negative rounding eigenvalue becomes exactly 0
    neg = torch.diag(torch.tensor([2.0, -1e-12], dtype=F64))
    assert lin.exact_spectrum(neg).ev.tolist() == [0.0, 2.0]


@pytest.mark.parametrize("duplicate", [False, True])
def test_nystroem_is_knm_kmm_pinv_kmn(duplicate):
    g = torch.Generator().manual_seed(3)
    X = torch.randn(7, 4, dtype=F64, generator=g)
    K = X @ X.T + 0.1 * torch.tanh(X @ X.T)  # PSD? not needed: only K_nm and K_mm are read
    land = [0, 2, 5, 2] if duplicate else [0, 2, 5]  # a duplicated landmark: K_mm singular
    K_nm, K_mm = K[:, land].float(), K[land][:, land].float()
    spec = lin.nystroem_spectrum(K_nm, K_mm)
    assert spec.ev.dtype == F64 and spec.U.dtype == F64
    want = K_nm.double() @ torch.linalg.pinv(K_mm.double(), hermitian=True, rtol=1e-8) @ K_nm.double().T
    torch.testing.assert_close(spec.U @ torch.diag(spec.ev) @ spec.U.T, want, rtol=1e-6, atol=1e-6)
    assert spec.U.shape == (7, 3)
    torch.testing.assert_close(spec.U.T @ spec.U, torch.eye(3, dtype=F64), rtol=0, atol=1e-10)


def test_nystroem_rtol_drops_small_landmark_directions():
    # K_mm = 100 diag(1, 1e-6): the threshold is relative (rtol * max eigenvalue), with rtol 1e-5 only the first
    # landmark direction is kept
    K_mm = 100 * torch.diag(torch.tensor([1.0, 1e-6], dtype=F64))
    K_nm = torch.tensor([[1.0, 0.0], [0.0, 1e-6], [2.0, 1e-6]], dtype=F64)
    keep_one = lin.nystroem_spectrum(K_nm, K_mm, rtol=1e-5)
    u = K_nm[:, 0]
    torch.testing.assert_close(keep_one.U @ torch.diag(keep_one.ev) @ keep_one.U.T, torch.outer(u, u) / 100,
                               rtol=0, atol=1e-12)
    keep_both = lin.nystroem_spectrum(K_nm, K_mm)  # default rtol 1e-10 keeps 1e-6
    want = K_nm @ torch.linalg.inv(K_mm) @ K_nm.T
    torch.testing.assert_close(keep_both.U @ torch.diag(keep_both.ev) @ keep_both.U.T, want, rtol=0, atol=1e-12)
    # an eigenvalue exactly at rtol * max is dropped ("<= rtol * max")
    at = lin.nystroem_spectrum(K_nm, torch.diag(torch.tensor([1.0, 1e-5], dtype=F64)), rtol=1e-5)
    assert at.U.shape == (3, 1)
    torch.testing.assert_close(at.U @ torch.diag(at.ev) @ at.U.T, torch.outer(u, u), rtol=0, atol=1e-12)


def test_filter_values_are_the_written_out_filters():
    ev = torch.tensor([0.0, 0.5, 2.0, 30.0], dtype=F64)
    torch.testing.assert_close(lin.filter_values(ev, 0.5, "ridge"), torch.tensor([0.0, 0.5, 0.8, 30 / 30.5],
                                                                                 dtype=F64))
    torch.testing.assert_close(lin.filter_values(ev, 0.5, "flow"),
                               torch.tensor([1 - math.exp(-x / 0.5) for x in ev.tolist()], dtype=F64))
    with pytest.raises(ValueError, match=r"unknown smoother 'lasso'; choose one of \('ridge', 'flow'\)"):
        lin.filter_values(ev, 1.0, "lasso")


@pytest.mark.parametrize("smoother", ["ridge", "flow"])
@pytest.mark.parametrize("lam0", [3e-3, 0.7])
def test_fit_lambda_recovers_the_smoother_that_made_the_predictions(smoother, lam0):
    spec = lin.exact_spectrum(_psd(8, 8, 5))
    y = torch.randn(8, dtype=F64, generator=torch.Generator().manual_seed(6))
    f = _S(spec, lam0, smoother) @ y
    lam, err = lin.fit_lambda(spec, y.float(), f.float(), smoother)  # float32 in: computed in float64
    assert lam == pytest.approx(lam0, rel=1e-3)
    assert err < 1e-6
    lam, err = lin.fit_lambda(spec, y, f, smoother)
    assert lam == pytest.approx(lam0, rel=1e-6) and err < 1e-10


@pytest.mark.parametrize("smoother", ["ridge", "flow"])
def test_fit_lambda_minimises_the_full_objective_on_a_low_rank_spectrum(smoother):
    # rank 3 spectrum of 8 rows: the part of f outside span(U) is part of the reported residual
    spec = lin.nystroem_spectrum(*(lambda K: (K[:, :3], K[:3, :3]))(_psd(8, 8, 9)))
    g = torch.Generator().manual_seed(10)
    y, f = torch.randn(8, dtype=F64, generator=g), torch.randn(8, dtype=F64, generator=g)
    lam, err = lin.fit_lambda(spec, y, f, smoother)
    scale = float((f - f.mean()).norm())

    def rel(lam_: float) -> float:
        return float((_S(spec, lam_, smoother) @ y - f).norm()) / scale

    assert err == pytest.approx(rel(lam), rel=1e-9)
    top = float(spec.ev.max())
    grid = torch.logspace(math.log10(top * 1e-9), math.log10(top * 1e3), 4001, dtype=F64).tolist()
    best = min(rel(v) for v in grid)
    assert err <= best * (1 + 1e-9)
    assert err > best * (1 - 1e-4)  # a real minimum, not below the objective


@pytest.mark.parametrize("smoother", ["ridge", "flow"])
@pytest.mark.parametrize("noise_std", [None, 0.25])
def test_linearized_fit_is_the_explicit_smoother(smoother, noise_std):
    N, d = 5, 2
    spec = lin.exact_spectrum(_psd(N * d, N * d, 12))
    g = torch.Generator().manual_seed(13)
    y = torch.randn(N, d, dtype=F64, generator=g)
    f = (_S(spec, 0.05, smoother) @ y.reshape(-1)).reshape(N, d) + 0.01 * torch.randn(N, d, dtype=F64, generator=g)
    fit = lin.linearized_fit(spec, y, f, smoother, noise_std=noise_std)
    lam, err = lin.fit_lambda(spec, y.reshape(-1), f.reshape(-1), smoother)
    assert fit.lam == lam and fit.fit_error == err
    S = _S(spec, fit.lam, smoother)
    assert fit.trace == pytest.approx(float(torch.trace(S)), rel=1e-10)
    dof = N * d - 2 * float(torch.trace(S)) + float(torch.trace(S @ S.T))
    assert fit.residual_dof == pytest.approx(dof, rel=1e-10)
    sigma = math.sqrt(float((y - f).square().sum()) / dof)
    assert fit.noise_std_estimated == pytest.approx(sigma, rel=1e-10)
    assert fit.noise_std == pytest.approx(sigma if noise_std is None else noise_std, rel=1e-10)
    SS = S @ S.T
    D = torch.stack([SS[i * d:(i + 1) * d, i * d:(i + 1) * d] for i in range(N)])
    torch.testing.assert_close(fit.factor_matrix, D, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(fit.smoothed, (S @ y.reshape(-1)).reshape(N, d), rtol=1e-9, atol=1e-12)


def test_linearized_fit_defaults_to_the_ridge_smoother():
    N, d = 4, 1
    spec = lin.exact_spectrum(_psd(N, N, 14))
    g = torch.Generator().manual_seed(15)
    y = torch.randn(N, d, dtype=F64, generator=g)
    f = (_S(spec, 0.01, "ridge") @ y.reshape(-1)).reshape(N, d)
    fit = lin.linearized_fit(spec, y, f)
    assert fit.lam == pytest.approx(0.01, rel=1e-6)  # the flow filter cannot reproduce a ridge fit
    S = _S(spec, fit.lam, "ridge")
    assert fit.trace == pytest.approx(float(torch.trace(S)), rel=1e-10)


def test_noise_estimate_with_few_or_no_residual_degrees_of_freedom():
    # dof = sum_k (1 - s_k)^2 over all N d directions.  An interpolating flow smoother (s = 1 exactly in
    # float64) leaves none: sigma cannot be estimated and is NaN, not a division error.
    spec = lin.Spectrum(torch.tensor([0.5, 1.0, 2.0], dtype=F64), torch.eye(3, dtype=F64))
    y = torch.tensor([[1.0], [-2.0], [0.5]], dtype=F64)
    fit = lin.linearized_fit(spec, y, y.clone(), "flow")
    assert fit.residual_dof == 0.0
    assert math.isnan(fit.noise_std_estimated) and math.isnan(fit.noise_std)
    # a ridge fit with 0 < dof < 1 still gives the estimate ||y - f||^2 / dof
    spec2 = lin.Spectrum(torch.tensor([1.0, 1.0], dtype=F64), torch.eye(2, dtype=F64))
    y2 = torch.tensor([[1.0], [2.0]], dtype=F64)
    f2 = y2 / 1.1 + torch.tensor([[1e-3], [-1e-3]], dtype=F64)  # s = 1 / 1.1 (lam = 0.1) plus a little noise
    fit2 = lin.linearized_fit(spec2, y2, f2, "ridge")
    s = 1.0 / (1.0 + fit2.lam)
    dof = 2 * (1 - s) ** 2
    assert 0 < fit2.residual_dof < 1 and fit2.residual_dof == pytest.approx(dof, rel=1e-9)
    assert fit2.noise_std_estimated == pytest.approx(math.sqrt(float((y2 - f2).square().sum()) / dof), rel=1e-9)


@pytest.mark.parametrize("smoother", ["ridge", "flow"])
def test_fit_lambda_search_range_is_1e_minus_9_to_1e3_times_the_top_eigenvalue(smoother):
    # The objective is monotone when the network interpolates (f = y: best at the smallest lam) or predicts
    # almost nothing (f = 1e-12 y: best at the largest): the fit returns the ends of the documented range.
    spec = lin.exact_spectrum(_psd(6, 6, 16))
    top = float(spec.ev.max())
    y = torch.randn(6, dtype=F64, generator=torch.Generator().manual_seed(17))
    lam_hi, _ = lin.fit_lambda(spec, y, 1e-12 * y, smoother)
    assert lam_hi == pytest.approx(1e3 * top, rel=1e-9)
    if smoother == "ridge":  # (flow: s = 1 exactly below some lam, the minimum is a flat interval)
        lam_lo, err = lin.fit_lambda(spec, y, y, smoother)
        assert lam_lo == pytest.approx(1e-9 * top, rel=1e-9)
        assert err == pytest.approx(float((_S(spec, lam_lo, smoother) @ y - y).norm() / (y - y.mean()).norm()),
                                    rel=1e-6)


# ------------------------------------------------------------------ realized_fit (noise_model="realized")

def _realized_oracle(U, ev, y, lam, noise_std=None, iterations=100):
    """The realized energies written out in Python floats: sigma^2 iterated down from the total energy over the
    directions u_r^2 <= 2 ln(N d) sigma^2 (plus the energy outside span(U)), e_r = sigma^2 inside the signal
    directions and u_r^2 outside, D_i = sum_r s_r^2 e_r U_(i,.),r U_(i,.),r^T with s_r = ev_r / (ev_r + lam)."""
    N, d = y.shape
    n, r = U.shape
    y1 = y.reshape(-1).tolist()
    u = [sum(U[i, k].item() * y1[i] for i in range(n)) for k in range(r)]
    total = sum(v * v for v in y1)
    perp = max(total - sum(v * v for v in u), 0.0)
    sig2 = total / n if noise_std is None else noise_std**2
    signal = [False] * r
    for _ in range(iterations):
        new = [v * v > 2 * math.log(n) * sig2 for v in u]
        if noise_std is None:
            rest = n - sum(new)
            sig2 = (sum(v * v for v, s in zip(u, new) if not s) + perp) / rest if rest else float("nan")
        if new == signal:
            break
        signal = new
    s = [float(e) / (float(e) + lam) for e in ev]
    energy = [sig2 if signal[k] else u[k] ** 2 for k in range(r)]
    D = torch.zeros(N, d, d, dtype=F64)
    for i in range(N):
        for c in range(d):
            for e in range(d):
                D[i, c, e] = sum(s[k] ** 2 * energy[k] * U[i * d + c, k] * U[i * d + e, k] for k in range(r))
    return math.sqrt(sig2), sum(signal), D


def _orthonormal(n: int, r: int, seed: int) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(n, r, dtype=F64, generator=torch.Generator().manual_seed(seed)))[0]


@pytest.mark.parametrize("noise_std", [None, 0.4])
def test_realized_fit_with_two_outputs_and_energy_outside_the_spectrum(noise_std):
    N, d, r = 9, 2, 12  # r < N d: part of y lies outside span(U)
    U = _orthonormal(N * d, r, 1)
    ev = torch.logspace(1, -3, r, dtype=F64)
    g = torch.Generator().manual_seed(2)
    y = 0.3 * torch.randn(N, d, dtype=F64, generator=g)
    y = y + (U[:, :2] @ torch.tensor([4.0, -3.0], dtype=F64)).reshape(N, d)  # two directions carry signal
    sigma, n_signal, D = lin.realized_fit(lin.Spectrum(ev, U), y, SimpleNamespace(lam=0.05), noise_std=noise_std)
    want_sigma, want_n, want_D = _realized_oracle(U, ev, y, 0.05, noise_std)
    assert n_signal == want_n == 2
    assert sigma == pytest.approx(want_sigma, rel=1e-12)
    torch.testing.assert_close(D, want_D, rtol=1e-10, atol=1e-14)


def test_realized_fit_of_pure_noise_has_no_signal_direction():
    N, d = 4, 2
    U = torch.eye(N * d, dtype=F64)
    y = torch.tensor([1.0, -1.0, 1.0, 1.0, -1.0, 1.0, -1.0, -1.0], dtype=F64).reshape(N, d)  # equal energies
    sigma, n_signal, D = lin.realized_fit(lin.Spectrum(torch.ones(N * d, dtype=F64), U), y, SimpleNamespace(lam=1.0))
    assert n_signal == 0 and sigma == pytest.approx(1.0, rel=1e-14)
    torch.testing.assert_close(D, 0.25 * torch.eye(d, dtype=F64).expand(N, d, d), rtol=1e-14, atol=0)  # s^2 u^2 = 1/4


def test_realized_fit_counts_a_direction_exactly_at_the_threshold_as_noise():
    # noise_std = 1: the threshold is 2 ln(N d) exactly; a u_r whose square is that float is not signal (strict >)
    N, d = next((N, 2) for N in range(2, 200) if math.sqrt(2 * math.log(2 * N)) ** 2 == 2 * math.log(2 * N))
    at = math.sqrt(2 * math.log(N * d))
    y = torch.full((N * d,), 0.5, dtype=F64)
    y[1] = at
    y[2] = at * 1.0000001  # just above: signal
    sigma, n_signal, _ = lin.realized_fit(lin.Spectrum(torch.ones(N * d, dtype=F64), torch.eye(N * d, dtype=F64)),
                                          y.reshape(N, d), SimpleNamespace(lam=1.0), noise_std=1.0)
    assert (sigma, n_signal) == (1.0, 1)


def test_realized_fit_with_a_single_noise_direction_left():
    # N d = 2: u = (10, 1) -> direction 0 is signal (10^2 > 2 ln 2 (101 / 2)), sigma^2 = 1^2 / 1
    y = torch.tensor([[10.0, 1.0]], dtype=F64)
    sigma, n_signal, D = lin.realized_fit(lin.Spectrum(torch.ones(2, dtype=F64), torch.eye(2, dtype=F64)), y,
                                          SimpleNamespace(lam=1.0))
    assert (sigma, n_signal) == (1.0, 1)
    torch.testing.assert_close(D[0], torch.diag(torch.tensor([0.25, 0.25], dtype=F64)), rtol=1e-14, atol=0)


def test_realized_fit_stops_after_100_iterations_by_default():
    """A chain of energies that admits exactly one signal direction per iteration (sigma^2 falling along a set
    sequence s_j): after the default 100 iterations 100 directions are signal, and sigma^2 is s_100."""
    N, d, L = 75, 2, 110
    n, t = N * d, 2 * math.log(N * d)
    s_seq = [1.0]
    a = []
    for j in range(L):  # a_(j+1) = (n - j) s_j - (n - j - 1) s_(j+1) = 1.05 t s_j: above the threshold, just
        m = n - j
        a.append(1.05 * t * s_seq[-1])
        s_seq.append((m * s_seq[-1] - a[-1]) / (m - 1))
    energies = torch.tensor(a + [s_seq[-1]] * (n - L), dtype=F64)  # the rest: noise at the final sigma^2
    y = energies.sqrt().reshape(N, d)
    spec = lin.Spectrum(torch.ones(n, dtype=F64), torch.eye(n, dtype=F64))
    sigma, n_signal, _ = lin.realized_fit(spec, y, SimpleNamespace(lam=1.0))
    assert n_signal == 100 and sigma == pytest.approx(math.sqrt(s_seq[100]), rel=1e-9)
    sigma, n_signal, _ = lin.realized_fit(spec, y, SimpleNamespace(lam=1.0), iterations=200)
    assert n_signal == L and sigma == pytest.approx(math.sqrt(s_seq[L]), rel=1e-9)


def test_realized_fit_of_a_single_entry_has_no_division_by_zero():
    """N d = 1: the threshold 2 ln 1 is 0, so the one direction is signal and no noise direction is left (sigma
    NaN), then with sigma NaN it is not; the iteration alternates and stops at its cap, never dividing by 0."""
    y = torch.tensor([[2.0]], dtype=F64)
    U = torch.ones(1, 1, dtype=F64)
    sigma, n_signal, D = lin.realized_fit(lin.Spectrum(torch.ones(1, dtype=F64), U), y, SimpleNamespace(lam=1.0))
    want_sigma, want_n, want_D = _realized_oracle(U, torch.ones(1), y, 1.0)
    assert (sigma, n_signal) == (want_sigma, want_n) == (2.0, 0)
    torch.testing.assert_close(D, want_D, rtol=1e-14, atol=0)
