"""Matrix products that exploit structure the general GEMM does not see."""

from __future__ import annotations

from torch import Tensor

# Row blocks of a symmetric product are at least this tall: smaller block GEMMs lose more speed than the
# skipped blocks save (measured on the reference CPU, docs/benchmarks.md, "The symmetric Gram").
BLOCK_ROWS = 128


def self_gram(A: Tensor) -> Tensor:
    """A A^T [R, R] for A [R, K], exact to rounding: with k = R // BLOCK_ROWS >= 2 row blocks (the last one
    ragged), only the k (k + 1) / 2 block products on and above the diagonal are computed, the others mirrored
    (about (k + 1) / 2k of the FLOPs). On other devices than the CPU, with a
    graph to keep, or below two blocks, the plain product."""
    R = A.shape[0]
    k = R // BLOCK_ROWS
    if k < 2 or A.requires_grad or A.device.type != "cpu" or A.dim() != 2:
        return A @ A.T
    bounds = [R * i // k for i in range(k + 1)]
    out = A.new_empty(R, R)
    for i in range(k):
        rows = slice(bounds[i], bounds[i + 1])
        for j in range(i, k):
            cols = slice(bounds[j], bounds[j + 1])
            block = A[rows] @ A[cols].T
            out[rows, cols] = block
            if j != i:
                out[cols, rows] = block.T
    return out
