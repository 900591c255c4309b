"""The zoo benchmark's Gram of explicit per-sample Jacobians (benchmarks/_explicit_baselines.py), used for the Opacus
and BackPACK baselines: blocked (Jacobians recomputed per block) and unblocked against the formula written out."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
from _explicit_baselines import explicit_kernel  # noqa: E402


@pytest.mark.parametrize("d", [1, 3])
@pytest.mark.parametrize("budget", [2**31, 300])  # all at once; blocks of a few samples (recomputed per block)
def test_explicit_kernel_is_the_sum_of_per_parameter_grams(d: int, budget: int) -> None:
    gen = torch.Generator().manual_seed(0)
    N, sizes = 7, (5, 3, 8)
    J = [torch.randn(N, d, p, generator=gen) for p in sizes]
    calls = []

    def jacobians(idx: torch.Tensor) -> list[torch.Tensor]:
        calls.append(len(idx))
        return [j[idx] for j in J]

    K = explicit_kernel(jacobians, (torch.arange(N),), d, sum(sizes), budget_bytes=budget)
    full = torch.cat(J, 2)  # [N, d, P]
    expected = torch.einsum("iap,jbp->ijab", full, full)
    assert K.shape == (N, N, d, d)
    torch.testing.assert_close(K, expected)
    assert (len(calls) == 1) == (budget == 2**31)  # the small budget did go through the blocked path
