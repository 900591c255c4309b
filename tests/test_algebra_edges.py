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
