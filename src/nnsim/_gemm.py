"""Matrix products that exploit structure the general GEMM does not see: sums of products accumulated in one
output, the symmetric product's upper strips, and outputs laid out the way the CPU GEMM writes fastest."""

from __future__ import annotations

import functools
import operator
from collections.abc import Sequence

from torch import Tensor

# Row strips of a symmetric product are at least this tall: smaller strip GEMMs lose more speed than the
# skipped products save (measured on the reference CPU, docs/benchmarks.md, "The symmetric Gram").
BLOCK_ROWS = 128
# Rows of an output start on this many bytes: MKL's sgemm writing rows whose leading dimension is not a multiple
# of the vector width runs ~30 % slower ([830, 8192] x [8192, 830]: 55 GF/s at ld 830, 81 GF/s at ld 832;
# docs/benchmarks.md, "Issue 14, part 7").
ALIGN_BYTES = 64


def aligned_empty(rows: int, cols: int, like: Tensor) -> Tensor:
    """An uninitialised [rows, cols] matrix (``like``'s dtype and device) whose rows start every ALIGN_BYTES:
    a view of the first ``cols`` columns of a buffer whose row length is rounded up to that."""
    per = max(1, ALIGN_BYTES // like.element_size())
    return like.new_empty(rows, -(-cols // per) * per)[:, :cols]


def _plain(As: Sequence[Tensor], Bs: Sequence[Tensor]) -> Tensor:
    """sum_f A_f B_f^T as new tensors (a graph may be kept, any device)."""
    return functools.reduce(operator.add, (a @ b.T for a, b in zip(As, Bs, strict=True)))


def gram_sum(As: Sequence[Tensor], Bs: Sequence[Tensor]) -> Tensor:
    """sum_f A_f B_f^T [R1, R2] for A_f [R1, K_f], B_f [R2, K_f] (at least one pair), exact to rounding.

    Without a graph to keep, every product is accumulated in place into one row-aligned output
    (:func:`aligned_empty`; a strided view); with one, a plain sum of new products."""
    if any(t.requires_grad for t in (*As, *Bs)):
        return _plain(As, Bs)
    out = aligned_empty(As[0].shape[0], Bs[0].shape[0], As[0])
    for n, (a, b) in enumerate(zip(As, Bs, strict=True)):
        out.addmm_(a, b.T, beta=1 if n else 0)  # beta = 0: the uninitialised entries are not read
    return out


def strip_bounds(R: int, itemsize: int) -> list[int]:
    """Bounds of the k = R // BLOCK_ROWS row strips of a symmetric product: R * i // k, rounded down to a row
    start of :func:`aligned_empty` (ALIGN_BYTES) when the strips are tall enough to stay apart."""
    k = R // BLOCK_ROWS
    per = max(1, ALIGN_BYTES // itemsize)
    bounds = [R * i // k for i in range(k + 1)]
    if R // k >= 2 * per:
        bounds[1:-1] = [b // per * per for b in bounds[1:-1]]
    return bounds


def self_gram_sum(As: Sequence[Tensor]) -> Tensor:
    """sum_f A_f A_f^T [R, R] for A_f [R, K_f] (at least one), exact to rounding and exactly symmetric.

    With k = R // BLOCK_ROWS >= 2 row strips (:func:`strip_bounds`), strip i runs one product per factor, its rows
    against the rows from its own start on (the blocks on and above the diagonal: about (k + 1) / 2k of the
    FLOPs), accumulated in place over all factors into one row-aligned output; the part below the diagonal
    blocks is mirrored once at the end, and each diagonal block made symmetric from its upper triangle. On other
    devices than the CPU, with a graph to keep, for other than 2-D operands or below two strips: the plain sum
    (:func:`gram_sum`)."""
    R = As[0].shape[0]
    k = R // BLOCK_ROWS
    if k < 2 or any(A.requires_grad or A.device.type != "cpu" or A.dim() != 2 for A in As):
        return gram_sum(As, As) if all(A.dim() == 2 for A in As) else _plain(As, As)
    bounds = strip_bounds(R, As[0].element_size())
    out = aligned_empty(R, R, As[0])
    for n, A in enumerate(As):
        for i in range(k):
            lo, hi = bounds[i], bounds[i + 1]
            out[lo:hi, lo:].addmm_(A[lo:hi], A[lo:].T, beta=1 if n else 0)
    for i in range(k):
        lo, hi = bounds[i], bounds[i + 1]
        out[hi:, lo:hi] = out[lo:hi, hi:].T
        block = out[lo:hi, lo:hi]
        block.copy_(block.triu() + block.triu(1).T)
    return out


def self_gram(A: Tensor) -> Tensor:
    """A A^T [R, R] for A [R, K]: :func:`self_gram_sum` of the one factor."""
    return self_gram_sum([A])
