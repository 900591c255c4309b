"""The index's projection: one CountSketch of the whole kernel-corrected gradient vec(U(x)) into ``width`` buckets.

Every parameter p of every layer and every output column c goes to bucket (h0(c) + h(p)) mod width with sign
s0(c) s(p) (seeded hashes, per layer and role), so E[<S u, S u'>] = <u, u'> and the variance is that of a
dense Gaussian projection of the same width (CountSketch, Charikar et al. 2002; it is a sparse JL map).
Unlike a per-layer Kronecker projection (whose estimate of a rank-one layer gradient is the product of two
sqrt(dim)-dimensional estimates), nothing is lost to structure. A layer is sketched

* from its explicit per-sample gradient (a scatter-add, O(d n m) per sample) when it is small
  (``n m <= EXPLICIT_FACTOR x width``), or
* without building it, for a sum over positions of outer products delta_t (x) a_t (``Outer``): the hash of
  weight entry (i, j) is h1(i) + h2(j), so the sketch is the circular convolution of the sketches of delta_t
  and a_t, computed by FFT (TensorSketch, Pham & Pagh 2013): O(T (n + m + d width log width)) per sample.

The choice depends only on the layer's shape and ``width``, so queries and data always agree.
"""

from __future__ import annotations

import functools
import math
import zlib

import torch
from torch import Tensor

from ..factors import Factor, Outer

EXPLICIT_FACTOR = 2  # layers with n m <= 2 width are sketched from their explicit gradient
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


def _explicit(f: Factor, width: int, seed: int, h0: Tensor, s0: Tensor, out: Tensor) -> None:
    """Add the CountSketch of the factor's explicit gradient into ``out`` [B, width]."""
    B = f.batch_size
    probe = f.select(torch.arange(min(B, 1)))
    n = probe.dense().g.shape[-1]
    d = h0.shape[0]
    h, s = _hash(n, width, seed, f.layer, "param", out)
    bucket = ((h0[:, None] + h[None, :]) % width).reshape(1, -1)  # [1, d n]
    sign = (s0.to(out.dtype)[:, None] * s[None, :]).reshape(1, -1)
    rows = max(1, _BLOCK_ELEMS // max(1, d * n))
    for a in range(0, B, rows):
        part = f if rows >= B else f.select(torch.arange(a, min(B, a + rows)))
        g = part.dense().g.reshape(-1, d * n).to(out.dtype)
        out[a : a + g.shape[0]].scatter_add_(1, bucket.expand(g.shape[0], -1), g * sign)


def _tensor(f: Outer, width: int, seed: int, phase: Tensor, out_hat: Tensor) -> None:
    """Add the FFT of the TensorSketch of sum_t delta_t (x) a_t into ``out_hat`` [B, width // 2 + 1] (complex)."""
    B, d, G, T, n = f.delta.shape
    m = f.m
    dtype = out_hat.real.dtype
    h1, s1 = _hash(G * n, width, seed, f.layer, "out", out_hat.real)
    h2, s2 = _hash(m, width, seed, f.layer, "in", out_hat.real)
    h1, s1 = h1.view(1, 1, G, 1, n), s1.view(1, 1, G, 1, n)
    per_sample = d * G * T * width
    rows = max(1, _BLOCK_ELEMS // max(1, per_sample))
    for a in range(0, B, rows):
        b = min(B, a + rows)
        delta = f.delta[a:b].to(dtype)
        cs_d = delta.new_zeros(b - a, d, G, T, width)
        cs_d.scatter_add_(-1, h1.expand(b - a, d, G, T, n), delta * s1)
        if f.indexed:
            idx = f.a[a:b]  # [b, G, T] one-hot rows
            cs_a = delta.new_zeros(b - a, G, T, width).scatter_(-1, h2[idx][..., None], s2[idx][..., None])
        else:
            x = f.a[a:b].to(dtype)
            cs_a = x.new_zeros(b - a, G, T, width)
            cs_a.scatter_add_(-1, h2.view(1, 1, 1, m).expand(b - a, G, T, m), x * s2.view(1, 1, 1, m))
        prod = torch.einsum("bcgtf,bgtf->bcf", torch.fft.rfft(cs_d, dim=-1), torch.fft.rfft(cs_a, dim=-1))
        out_hat[a:b] += torch.einsum("bcf,cf->bf", prod, phase)


def explicit_sketched(f: Factor, width: int) -> bool:
    """Whether a layer is sketched from its explicit gradient (else by FFT): by shape only."""
    if not isinstance(f, Outer):
        return True
    G, n = f.delta.shape[2], f.delta.shape[-1]
    return G * n * f.m <= EXPLICIT_FACTOR * width


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
        if explicit_sketched(f, width):
            _explicit(f, width, seed, h0, s0, out)
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
