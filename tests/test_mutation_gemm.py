"""nnsim._gemm.self_gram, the symmetric blocked Gram A A^T (mutation testing, docs/testing.md).

Oracles written out: the product in float64 entry by entry (broadcast products summed, no matmul), the row
blocks R * i // k of its docstring, and the products it runs, counted with a torch function mode (the docstring
promises k (k + 1) / 2 block products on and above the diagonal, or one plain product).
"""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode

from nnsim import _gemm

torch.set_num_threads(1)

_MATMULS = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm, torch.Tensor.mm}


class _Products(TorchFunctionMode):
    """Records the shapes of every matrix product run inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[tuple[int, ...], tuple[int, ...]]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _MATMULS:
            self.shapes.append((tuple(args[0].shape), tuple(args[1].shape)))
        return func(*args, **(kwargs or {}))


def _oracle(A: torch.Tensor) -> torch.Tensor:
    A64 = A.detach().double()
    return (A64[:, None, :] * A64[None, :, :]).sum(-1)  # G[i, j] = sum_c A[i, c] A[j, c]


def _blocks(R: int) -> list[int]:
    """The row counts of the k = R // 128 blocks (bounds R * i // k), written out."""
    k = R // 128
    return [R * (i + 1) // k - R * i // k for i in range(k)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("R", [255, 256, 257, 383, 384, 385, 520])
def test_the_blocked_gram_is_the_product_with_only_the_upper_blocks_computed(R, dtype):
    assert _gemm.BLOCK_ROWS == 128
    K_dim = 3 + R % 5  # K != R: a swapped shape fails
    A = torch.randn(R, K_dim, dtype=torch.float64, generator=torch.Generator().manual_seed(R)).to(dtype)
    with _Products() as mode:
        G = _gemm.self_gram(A)
    assert G.shape == (R, R) and G.dtype == dtype
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(G.double(), _oracle(A), rtol=tol, atol=tol)
    rows = _blocks(R)
    bounds = [sum(rows[:i]) for i in range(len(rows) + 1)]
    for i in range(len(rows)):  # the blocks below the diagonal are the exact transposes of those above
        for j in range(i + 1, len(rows)):
            lo, hi = slice(bounds[i], bounds[i + 1]), slice(bounds[j], bounds[j + 1])
            assert torch.equal(G[hi, lo], G[lo, hi].T)
    expected = [((rows[i], K_dim), (K_dim, rows[j])) for i in range(len(rows)) for j in range(i, len(rows))]
    assert mode.shapes == expected


@pytest.mark.parametrize("R", [1, 2, 127, 128, 200, 255])
def test_below_two_blocks_it_is_one_plain_product(R):
    A = torch.randn(R, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(R))
    with _Products() as mode:
        G = _gemm.self_gram(A)
    torch.testing.assert_close(G, _oracle(A), rtol=1e-12, atol=1e-12)
    assert mode.shapes == [((R, 4), (4, R))]


def test_with_a_graph_to_keep_it_is_one_plain_product_and_its_gradient_is_right():
    A = torch.randn(300, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1), requires_grad=True)
    with _Products() as mode:
        G = _gemm.self_gram(A)
    assert mode.shapes[0] == ((300, 5), (5, 300)) and len(mode.shapes) == 1
    W = torch.randn(300, 300, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    (G * W).sum().backward()
    torch.testing.assert_close(A.grad, (W + W.T) @ A.detach(), rtol=1e-12, atol=1e-12)  # d tr(W^T A A^T) / dA


def test_on_another_device_it_is_one_plain_product():
    A = torch.empty(400, 6, device="meta")
    with _Products() as mode:
        G = _gemm.self_gram(A)
    assert G.shape == (400, 400) and G.device.type == "meta"
    assert mode.shapes == [((400, 6), (6, 400))]


def test_a_smaller_block_size_is_read_at_call_time(monkeypatch):
    monkeypatch.setattr(_gemm, "BLOCK_ROWS", 4)
    A = torch.randn(10, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with _Products() as mode:
        G = _gemm.self_gram(A)
    torch.testing.assert_close(G, _oracle(A), rtol=1e-12, atol=1e-12)
    assert mode.shapes == [((5, 3), (3, 5))] * 3  # k = 2 blocks of rows 0:5, 5:10
