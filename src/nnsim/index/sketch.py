"""The index's projection: one CountSketch of the whole kernel-corrected gradient vec(U(x)) into ``width`` buckets.

Every parameter p of every layer and every output column c goes to bucket (h0(c) + h(p)) mod width with sign
s0(c) s(p) (seeded hashes, per layer and role), so E[<S u, S u'>] = <u, u'> and the variance is that of a
dense Gaussian projection of the same width (CountSketch, Charikar et al. 2002; it is a sparse JL map).
Unlike a per-layer Kronecker projection (whose estimate of a rank-one layer gradient is the product of two
sqrt(dim)-dimensional estimates), nothing is lost to structure. A layer is sketched

* a layer given as a sum over positions of outer products delta_t (x) a_t (``Outer``): weight entry (g, i, j)
  goes to bucket h1(g, i) + h2(j), so the sketch is the circular convolution of the sketches of delta_t and
  a_t, computed by FFT (TensorSketch, Pham & Pagh 2013), O(d T width log width) per sample, or, the same
  numbers when n m is small, by a scatter-add of the explicit blocks sum_t delta_t a_t^T (O(d T n m));
* any other layer (explicit gradient ``Dense``): a scatter-add with a flat hash over its parameters.

Both ways of sketching an outer-product layer give the same sketch, so the cheaper one is chosen freely.
"""

from __future__ import annotations

import functools
import math
import zlib

import torch
from torch import Tensor

from ..factors import Factor, Outer

EXPLICIT_FACTOR = 1.0  # outer-product layers with n m <= width log2(width) go through their explicit blocks
_BLOCK_ELEMS = 2**23  # elements of one intermediate block (explicit gradients, per-position sketches)


def _seed(seed: int, layer: str, role: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(f"nnsim-sketch/{layer}/{role}".encode())) % 2**63


@functools.lru_cache(maxsize=64)
def _hash_cpu(n: int, width: int, seed: int, layer: str, role: str) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(_seed(seed, layer, role))
    bucket = torch.randint(width, (n,), generator=gen)
    sign = torch.randint(0, 2, (n,), generator=gen, dtype=torch.int8) * 2 - 1
    return bucket, sign


def _hash(n: int, width: int, seed: int, layer: str, role: str, like: Tensor) -> tuple[Tensor, Tensor]:
    """Seeded buckets [n] (long) and signs [n] (``like``'s dtype), on ``like``'s device."""
    bucket, sign = _hash_cpu(n, width, seed, layer, role)
    return bucket.to(like.device), sign.to(device=like.device, dtype=like.dtype)


def _explicit_dense(g: Tensor, layer: str, width: int, seed: int, h0: Tensor, s0: Tensor, out: Tensor) -> None:
    """Add the CountSketch of explicit gradients g [B, d, n] into ``out`` [B, width] (flat hash over n)."""
    B, d, n = g.shape
    h, s = _hash(n, width, seed, layer, "param", out)
    bucket = ((h0[:, None] + h[None, :]) % width).reshape(1, -1)  # [1, d n]
    sign = (s0[:, None] * s[None, :]).reshape(1, -1)
    rows = max(1, _BLOCK_ELEMS // max(1, d * n))
    for a in range(0, B, rows):
        part = g[a : a + rows].reshape(-1, d * n).to(out.dtype)
        out[a : a + part.shape[0]].scatter_add_(1, bucket.expand(part.shape[0], -1), part * sign)


def _outer_hashes(f: Outer, width: int, seed: int, like: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Buckets and signs of the output side (g, i) [G n] and of the input side j [m] of an outer-product layer."""
    G, n = f.delta.shape[2], f.delta.shape[-1]
    h1, s1 = _hash(G * n, width, seed, f.layer, "out", like)
    h2, s2 = _hash(f.m, width, seed, f.layer, "in", like)
    return h1, s1, h2, s2


def _explicit_outer(f: Outer, width: int, seed: int, h0: Tensor, s0: Tensor, out: Tensor) -> None:
    """The same sketch as :func:`_tensor` (entry (c, g, i, j) to bucket h0(c) + h1(g, i) + h2(j)), from the
    explicit gradient blocks sum_t delta_t a_t^T: cheaper when n m is small next to width log width."""
    B, d, G, T, n = f.delta.shape
    m = f.m
    h1, s1, h2, s2 = _outer_hashes(f, width, seed, out)
    bucket = (h0.view(d, 1, 1, 1) + h1.view(1, G, n, 1) + h2.view(1, 1, 1, m)) % width  # [d, G, n, m]
    sign = s0.view(d, 1, 1, 1) * s1.view(1, G, n, 1) * s2.view(1, 1, 1, m)
    bucket, sign = bucket.reshape(1, -1), sign.reshape(1, -1)
    rows = max(1, _BLOCK_ELEMS // max(1, d * G * n * max(m, T)))
    for a in range(0, B, rows):
        delta, x = f.delta[a : a + rows].to(out.dtype), f.a[a : a + rows].to(out.dtype)
        blocks = torch.einsum("bcgtn,bgtm->bcgnm", delta, x).reshape(delta.shape[0], -1)
        out[a : a + delta.shape[0]].scatter_add_(1, bucket.expand(delta.shape[0], -1), blocks * sign)


def _tensor(f: Outer, width: int, seed: int, phase: Tensor, out_hat: Tensor) -> None:
    """Add the FFT of the TensorSketch of sum_t delta_t (x) a_t into ``out_hat`` [B, width // 2 + 1] (complex)."""
    B, d, G, T, n = f.delta.shape
    m = f.m
    real = out_hat.real
    h1, s1, h2, s2 = _outer_hashes(f, width, seed, real)
    h1, s1 = h1.view(1, 1, G, 1, n), s1.view(1, 1, G, 1, n)
    rows = max(1, _BLOCK_ELEMS // max(1, d * G * T * width))
    for a in range(0, B, rows):
        b = min(B, a + rows)
        delta = f.delta[a:b].to(real.dtype)
        cs_d = delta.new_zeros(b - a, d, G, T, width)
        cs_d.scatter_add_(-1, h1.expand(b - a, d, G, T, n), delta * s1)
        if f.indexed:
            idx = f.a[a:b]  # [b, G, T] one-hot rows
            cs_a = delta.new_zeros(b - a, G, T, width).scatter_(-1, h2[idx][..., None], s2[idx][..., None])
        else:
            x = f.a[a:b].to(real.dtype)
            cs_a = x.new_zeros(b - a, G, T, width)
            cs_a.scatter_add_(-1, h2.view(1, 1, 1, m).expand(b - a, G, T, m), x * s2.view(1, 1, 1, m))
        prod = torch.einsum("bcgtf,bgtf->bcf", torch.fft.rfft(cs_d, dim=-1), torch.fft.rfft(cs_a, dim=-1))
        out_hat[a:b] += torch.einsum("bcf,cf->bf", prod, phase)


def explicit_sketched(f: Factor, width: int) -> bool:
    """Whether an outer-product layer is sketched through its explicit gradient blocks (both ways give the
    same sketch; this one costs d T n m, the FFT one about d T width log2(width) per sample)."""
    if not isinstance(f, Outer):
        return True
    if f.indexed:
        return False
    return f.delta.shape[-1] * f.m <= EXPLICIT_FACTOR * width * math.log2(max(2, width))


def sketch(factors: list[Factor], width: int, seed: int) -> Tensor:
    """CountSketch of the concatenated per-sample gradients (d columns) of ``factors``: [B, width] float32
    or float64 (the factors' precision), with E <sketch(x), sketch(x')> = sum_c <g_c(x), g_c(x')>."""
    first = factors[0]
    like = first.delta if isinstance(first, Outer) else first.g
    B, d = like.shape[0], like.shape[1]
    dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
    out = torch.zeros(B, width, dtype=dtype, device=like.device)
    h0, s0 = _hash(d, width, seed, "", "column", out)
    fft = [f for f in factors if not explicit_sketched(f, width)]
    for f in factors:
        if isinstance(f, Outer) and explicit_sketched(f, width):
            _explicit_outer(f, width, seed, h0, s0, out)
        elif not isinstance(f, Outer):
            _explicit_dense(f.g, f.layer, width, seed, h0, s0, out)
    if fft:
        freq = torch.arange(width // 2 + 1, device=out.device, dtype=dtype)
        angle = -2 * math.pi * (h0.to(dtype)[:, None] * freq[None, :]) / width
        phase = torch.polar(torch.ones_like(angle), angle) * s0.to(dtype)[:, None]  # shift by h0(c), sign s0(c)
        out_hat = torch.zeros(B, width // 2 + 1, dtype=phase.dtype, device=out.device)
        for f in fft:
            _tensor(f, width, seed, phase, out_hat)  # type: ignore[arg-type]
        out += torch.fft.irfft(out_hat, n=width, dim=-1)
    return out


def explicit(factors: list[Factor]) -> Tensor:
    """The concatenated per-sample gradients themselves, [B, d * P] (the store of a model with d P <= width)."""
    return torch.cat([f.dense().g for f in factors], dim=-1).flatten(1)
