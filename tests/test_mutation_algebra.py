"""nnsim.algebra at its boundaries (mutation testing, docs/testing.md): thresholds hit exactly, batch shapes whose
axis 1 is not d, full error messages."""

from __future__ import annotations

import re

import pytest
import torch

from nnsim import algebra
from nnsim.errors import InputError

torch.set_num_threads(1)
F64 = torch.float64
EPS64 = torch.finfo(F64).eps


def test_sqrt_psd_rounding_threshold_scales_with_d_not_the_batch_axes():
    # eigenvalue ratio 5e-15 lies between d eps = 4.4e-16 and 50 eps = 1.1e-14: kept (d = 2), whatever the batch
    M = torch.diag(torch.tensor([1.0, 5e-15], dtype=F64)).expand(1, 50, 2, 2)
    root = algebra.sqrt_psd(M)
    assert root.shape == (1, 50, 2, 2)
    torch.testing.assert_close(root[0, :, 1, 1], torch.full((50,), 5e-15**0.5, dtype=F64), rtol=1e-12, atol=0)
    torch.testing.assert_close(root[0, :, 0, 0], torch.ones(50, dtype=F64))


def test_sqrt_psd_eigenvalue_exactly_at_the_rounding_threshold_counts_as_zero():
    lam = torch.tensor([1.0, 2 * EPS64], dtype=F64)  # tau = d eps lam_max = 2 eps exactly
    root = algebra.sqrt_psd(torch.diag(lam))
    assert root[1, 1].item() == 0.0 and root[0, 0].item() == 1.0


def _full(msg: str) -> str:
    return "^" + re.escape(msg) + "$"


def test_metric_error_messages_in_full():
    with pytest.raises(InputError, match=_full("metric contains NaN or Inf")):
        algebra.check_metric(torch.tensor([[1.0, float("inf")], [float("inf"), 1.0]]), 2)
    with pytest.raises(InputError, match=_full("metric must be symmetric (M == M.T)")):
        algebra.check_metric(torch.tensor([[1.0, 0.5], [0.0, 1.0]], dtype=F64), 2)
    with pytest.raises(InputError, match=_full("metric must be positive semi-definite (it has a negative eigenvalue)")):
        algebra.check_metric(torch.diag(torch.tensor([1.0, -0.5], dtype=F64)), 2)


def test_metric_tolerances_are_inclusive_at_the_boundary():
    # asymmetry exactly 1e-6 * max|M| and a smallest eigenvalue exactly -1e-8 * max|M| are still accepted
    M = torch.tensor([[1.0, 1e-6], [0.0, 1.0]], dtype=F64)
    assert (M - M.T).abs().max().item() == 1e-6
    assert algebra.check_metric(M, 2) is M
    N = torch.diag(torch.tensor([1.0, -1e-8], dtype=F64))
    assert torch.linalg.eigvalsh(N).min().item() == -1e-8  # the boundary is hit exactly
    assert algebra.check_metric(N, 2) is N


def _rotated(lam: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """V diag(lam) V^T with a fixed orthogonal V (from a QR), and V."""
    V, _ = torch.linalg.qr(torch.randn(len(lam), len(lam), dtype=F64, generator=torch.Generator().manual_seed(3)))
    return V @ torch.diag(torch.tensor(lam, dtype=F64)) @ V.T, V


@pytest.mark.parametrize("fn,power", [(algebra.pinv_psd, -1.0), (algebra.inv_sqrt_psd, -0.5)])
def test_spectral_functions_pass_every_argument_through(fn, power):
    K, V = _rotated([4.0, 1e-6, 0.0])

    def spectral(values):
        return V @ torch.diag(torch.tensor(values, dtype=F64)) @ V.T

    # default rtol (float64: 1e-10) keeps 1e-6
    out, rank = fn(K)
    torch.testing.assert_close(out, spectral([4.0**power, 1e-6**power, 0.0]), rtol=1e-6, atol=1e-9)
    assert rank.item() == 2
    # rtol = 1e-5: 1e-6 <= 1e-5 * 4 is dropped
    out, rank = fn(K, rtol=1e-5)
    torch.testing.assert_close(out, spectral([4.0**power, 0.0, 0.0]), rtol=1e-9, atol=1e-9)
    assert rank.item() == 1
    # atol above 1e-6 drops it too, whatever rtol
    out, rank = fn(K, rtol=0.0, atol=1e-5)
    assert rank.item() == 1
    torch.testing.assert_close(out, spectral([4.0**power, 0.0, 0.0]), rtol=1e-9, atol=1e-9)
    # ridge with its default 1e-6: (lam + 1e-6)^power on every eigenvalue, full rank
    out, rank = fn(K, singular="ridge")
    torch.testing.assert_close(out, spectral([(4.0 + 1e-6) ** power, (2e-6) ** power, (1e-6) ** power]),
                               rtol=1e-6, atol=0)
    assert rank.item() == 3
    out, _ = fn(K, singular="ridge", ridge=0.5)
    torch.testing.assert_close(out, spectral([4.5**power, (0.5 + 1e-6) ** power, 0.5**power]), rtol=1e-9, atol=0)
    with pytest.raises(ValueError, match=r"rank-deficient for batch entries \[0\] \(flat indices; ranks \[2\]\)"):
        fn(K[None], singular="raise")


@pytest.mark.parametrize("fn,power", [(algebra.pinv_psd, -1.0), (algebra.inv_sqrt_psd, -0.5)])
def test_rank_guard_is_relative_to_each_matrix_of_a_batch(fn, power):
    # a tiny and a huge matrix in one batch: each keeps its own eigenvalues (threshold rtol * its own lambda_max)
    lam = torch.tensor([[1.0, 1e-6], [1e12, 1e12]], dtype=F64)
    out, rank = fn(torch.diag_embed(lam))
    assert rank.tolist() == [2, 2]
    torch.testing.assert_close(out, torch.diag_embed(lam**power), rtol=1e-12, atol=0)


@pytest.mark.parametrize("fn", [algebra.pinv_psd, algebra.inv_sqrt_psd])
def test_raise_names_only_the_rank_deficient_entries_of_any_batch_shape(fn):
    full = torch.eye(2, dtype=F64)
    rank1 = torch.tensor([[1.0, 1.0], [1.0, 1.0]], dtype=F64)
    # [1, 5, 2, 2], all full rank: no error (the rank is compared with d, not with a batch axis; below, 4 != d)
    out, rank = fn(full.expand(1, 5, 2, 2), singular="raise")
    assert rank.tolist() == [[2] * 5]
    with pytest.raises(ValueError, match=re.escape("rank-deficient for batch entries [1, 3] (flat indices; ranks "
                                                   "[1, 1])")):
        fn(torch.stack([full, rank1, full, rank1]).reshape(1, 4, 2, 2), singular="raise")


def test_raise_message_in_full_lists_at_most_twenty_entries():
    zeros = torch.zeros(25, 2, 2, dtype=F64)  # 25 rank-0 entries: the first 20 are named
    message = (f"K(x, x) is rank-deficient for batch entries {list(range(20))} (flat indices; ranks {[0] * 20}); "
               "use singular='pinv' to normalise on its range or singular='ridge' to regularise")
    with pytest.raises(ValueError, match=_full(message)):
        algebra.inv_sqrt_psd(zeros, singular="raise")


def test_float32_matrices_are_decomposed_in_float64():
    # eigenvalue ratio 3e-6: a float32 eigendecomposition loses ~eps32 / 3e-6 ~ 4e-2 on the small direction
    K, _ = _rotated([1.0, 3e-6, 0.5])
    K32 = K.float()
    want = algebra.inv_sqrt_psd(K32.double(), rtol=1e-8)[0].float()  # the same float32 matrix, in float64
    got, rank = algebra.inv_sqrt_psd(K32, rtol=1e-8)
    assert got.dtype == torch.float32 and rank.item() == 3
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_the_antisymmetric_part_is_ignored():
    K, _ = _rotated([2.0, 0.5, 0.25])
    E = torch.tensor([[0.0, 1e-3, -2e-3], [-1e-3, 0.0, 5e-4], [2e-3, -5e-4, 0.0]], dtype=F64)
    torch.testing.assert_close(algebra.inv_sqrt_psd(K + E)[0], algebra.inv_sqrt_psd(K)[0], rtol=1e-12, atol=1e-12)


def test_ridge_reports_full_rank_d_for_any_batch_shape():
    _, rank = algebra.inv_sqrt_psd(torch.zeros(1, 3, 2, 2, dtype=F64), singular="ridge")
    assert rank.tolist() == [[2, 2, 2]]
