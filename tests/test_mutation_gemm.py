"""nnsim._gemm: the symmetric strip Gram A A^T, sums of products in one output (mutation testing, docs/testing.md).

Oracles written out: the product in float64 entry by entry (broadcast products summed, no matmul), the strip
bounds R * i // k of the docstring (rounded down to a 64-byte row start when the strips are tall enough), and
the products it runs, counted with a torch function mode (the docstring promises, per factor, one product per
strip of its rows against the rows from its start on, accumulated in place; or one plain product).
"""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode

from nnsim import _gemm

torch.set_num_threads(1)

_MATMULS = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm, torch.Tensor.mm}


class _Products(TorchFunctionMode):
    """Records the shapes of every matrix product run inside it (and the beta of the in-place ones)."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
        self.betas: list[float] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _MATMULS:
            self.shapes.append((tuple(args[0].shape), tuple(args[1].shape)))
        elif func is torch.Tensor.addmm_:
            self.shapes.append((tuple(args[1].shape), tuple(args[2].shape)))
            self.betas.append(kwargs.get("beta", 1))
        return func(*args, **kwargs)


def _oracle(*As: torch.Tensor) -> torch.Tensor:
    return sum((A.detach().double()[:, None, :] * A.detach().double()[None, :, :]).sum(-1) for A in As)


def _strips(R: int, itemsize: int) -> list[int]:
    """The bounds of the k = R // 128 strips, written out: R * i // k, inner ones rounded down to a multiple of
    64 / itemsize elements when every strip has at least twice that many rows."""
    k = R // 128
    per = 64 // itemsize
    b = [R * i // k for i in range(k + 1)]
    return [b[0]] + [x - x % per if R // k >= 2 * per else x for x in b[1:-1]] + [b[-1]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("R", [255, 256, 257, 383, 384, 385, 520, 830])
def test_the_strip_gram_is_the_product_with_only_the_upper_strips_computed(R, dtype):
    assert _gemm.BLOCK_ROWS == 128
    K_dim = 3 + R % 5  # K != R: a swapped shape fails
    A = torch.randn(R, K_dim, dtype=torch.float64, generator=torch.Generator().manual_seed(R)).to(dtype)
    with _Products() as mode:
        G = _gemm.self_gram(A)
    assert G.shape == (R, R) and G.dtype == dtype
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(G.double(), _oracle(A), rtol=tol, atol=tol)
    assert torch.equal(G, G.T)  # the mirrored part and the diagonal blocks: exactly symmetric
    assert G.stride(0) * G.element_size() % 64 == 0 and G.stride(1) == 1  # rows start on 64 bytes
    b = _strips(R, G.element_size())
    if R >= 256:
        assert b == _gemm.strip_bounds(R, G.element_size())
        assert mode.shapes == [((b[i + 1] - b[i], K_dim), (K_dim, R - b[i])) for i in range(len(b) - 1)]
    else:
        assert mode.shapes == [((R, K_dim), (K_dim, R))]
    assert mode.betas == [0] * len(mode.shapes)  # one factor: every strip written, never read first


@pytest.mark.parametrize("R", [1, 2, 127, 128, 200, 255])
def test_below_two_strips_it_is_one_product(R):
    A = torch.randn(R, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(R))
    with _Products() as mode:
        G = _gemm.self_gram(A)
    torch.testing.assert_close(G, _oracle(A), rtol=1e-12, atol=1e-12)
    assert mode.shapes == [((R, 4), (4, R))]


def test_several_factors_accumulate_strip_by_strip_in_one_output():
    gen = torch.Generator().manual_seed(5)
    As = [torch.randn(300, k, dtype=torch.float64, generator=gen) for k in (3, 7, 2)]
    with _Products() as mode:
        G = _gemm.self_gram_sum(As)
    torch.testing.assert_close(G, _oracle(*As), rtol=1e-12, atol=1e-12)
    assert torch.equal(G, G.T)
    b = _strips(300, 8)  # k = 2: [0, 144, 300]
    assert b == [0, 144, 300]
    assert mode.shapes == [((b[i + 1] - b[i], k), (k, 300 - b[i])) for k in (3, 7, 2) for i in range(2)]
    assert mode.betas == [0, 0, 1, 1, 1, 1]  # the first factor writes, the others add


def test_a_sum_of_products_accumulates_in_one_aligned_output():
    gen = torch.Generator().manual_seed(6)
    As = [torch.randn(13, k, dtype=torch.float32, generator=gen) for k in (5, 1, 9)]
    Bs = [torch.randn(11, k, dtype=torch.float32, generator=gen) for k in (5, 1, 9)]
    with _Products() as mode:
        G = _gemm.gram_sum(As, Bs)
    expected = sum(a.double() @ b.double().T for a, b in zip(As, Bs))
    torch.testing.assert_close(G.double(), expected, rtol=1e-6, atol=1e-6)
    assert G.shape == (13, 11) and G.stride() == (16, 1)  # 11 float32 columns in rows of 64 bytes
    assert mode.shapes == [((13, k), (k, 11)) for k in (5, 1, 9)] and mode.betas == [0, 1, 1]


def test_with_a_graph_to_keep_it_is_one_plain_product_and_its_gradient_is_right():
    A = torch.randn(300, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1), requires_grad=True)
    with _Products() as mode:
        G = _gemm.self_gram(A)
    assert mode.shapes[0] == ((300, 5), (5, 300)) and len(mode.shapes) == 1 and mode.betas == []
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
    assert mode.shapes == [((5, 3), (3, 10)), ((5, 3), (3, 5))]  # k = 2 strips of rows 0:5, 5:10 (too short to align)
