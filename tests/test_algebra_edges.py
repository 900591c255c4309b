"""Edge cases of nnsim.algebra found by mutation testing (docs/testing.md): shapes, scales, thresholds."""

from __future__ import annotations

import pytest
import torch

from nnsim import algebra
from nnsim.errors import InputError

torch.set_num_threads(1)
F64 = torch.float64


@pytest.mark.parametrize("shape", [(3, 3), (4, 3, 3), (2, 5, 3, 3)])
def test_trace_summary_over_the_last_two_axes_for_any_batch_shape(shape):
    K = torch.randn(*shape, dtype=F64, generator=torch.Generator().manual_seed(0))
    flat = K.reshape(-1, 3, 3)
    want = torch.stack([sum(m[i, i] for i in range(3)) / 3 for m in flat]).reshape(shape[:-2])
    torch.testing.assert_close(algebra.trace_summary(K), want)
    torch.testing.assert_close(algebra.trace_summary(K, denominator=2), want * 3 / 2)


@pytest.mark.parametrize("scale", [1e-9, 1.0, 1e6])
def test_metric_checks_are_relative_to_the_metric_scale(scale):
    asym = scale * torch.tensor([[1.0, 0.5], [0.0, 1.0]], dtype=F64)
    with pytest.raises(InputError, match="symmetric"):
        algebra.check_metric(asym, 2)
    indefinite = scale * torch.diag(torch.tensor([1.0, -0.01], dtype=F64))
    with pytest.raises(InputError, match="positive semi-definite"):
        algebra.check_metric(indefinite, 2)
    # rounding-level asymmetry and negative eigenvalues (relative 1e-9) are accepted
    ok = scale * torch.tensor([[1.0, 0.5 + 1e-9], [0.5, 0.25]], dtype=F64)
    assert algebra.check_metric(ok, 2) is ok
    assert algebra.check_metric(torch.zeros(2, 2, dtype=F64), 2) is not None


def test_metric_shape_error_names_what_it_got():
    with pytest.raises(InputError, match=r"\(2, 2\) tensor for an output of dimension d = 2, got \(3, 3\)"):
        algebra.check_metric(torch.eye(3, dtype=F64), 2)
    with pytest.raises(InputError, match=r"got list"):
        algebra.check_metric([[1.0]], 2)


def test_sqrt_psd_scale_batch_and_dtype():
    # tiny and huge matrices in one batch: each keeps its own rounding threshold
    scales = torch.tensor([1e-20, 1.0, 1e12], dtype=F64)
    A = torch.tensor([[2.0, 1.0], [1.0, 2.0]], dtype=F64)
    M = scales[:, None, None] * A
    root = algebra.sqrt_psd(M)
    torch.testing.assert_close(root @ root, M, rtol=1e-12, atol=0)
    # unbatched, float32 in -> float32 out
    M32 = A.float()
    r32 = algebra.sqrt_psd(M32)
    assert r32.dtype == torch.float32 and r32.shape == (2, 2)
    torch.testing.assert_close(r32 @ r32, M32, rtol=1e-5, atol=1e-6)
    # a rank-1 PSD matrix keeps its exact null space
    v = torch.tensor([3.0, 4.0], dtype=F64)
    r1 = algebra.sqrt_psd(torch.outer(v, v))
    torch.testing.assert_close(r1, torch.outer(v, v) / 5, rtol=1e-12, atol=1e-14)


def test_softmax_fisher_is_computed_in_float64_for_float32_logits():
    # p = softmax([0, 30]): p_1 rounds to 1 in float32, so p_1 (1 - p_1) would vanish; in float64 it is e^-30
    F = algebra.softmax_fisher(torch.tensor([[0.0, 30.0]]))
    assert F.dtype == torch.float32
    q = torch.sigmoid(torch.tensor(-30.0, dtype=F64))
    torch.testing.assert_close(F[0].double(), q * (1 - q) * torch.tensor([[1.0, -1.0], [-1.0, 1.0]], dtype=F64),
                               rtol=2e-3, atol=0)  # p_1 - p_1^2 cancels to ~1e-3 even in float64


def test_float32_singular_metrics_are_checked_in_float64():
    # v v^T with quarter-integer v is exact in float32 and PSD; its float32 eigenvalues come out below
    # -1e-8 |M| for most of these seeds (rounding), its float64 ones do not
    for s in range(20):
        v = torch.randint(-8, 9, (4,), generator=torch.Generator().manual_seed(s)).float() / 4
        M = torch.outer(v, v)
        assert algebra.check_metric(M, 4) is M


def test_normalize_kernel_on_a_rectangular_tile():
    g = torch.Generator().manual_seed(1)
    K_ab = torch.randn(2, 3, 2, 2, dtype=F64, generator=g)
    A, B = torch.randn(2, 2, 2, dtype=F64, generator=g), torch.randn(3, 2, 2, dtype=F64, generator=g)
    want = torch.stack([torch.stack([A[i] @ K_ab[i, j] @ B[j] for j in range(3)]) for i in range(2)])
    torch.testing.assert_close(algebra.normalize_kernel(K_ab, A, B), want)
