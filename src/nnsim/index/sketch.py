"""The index's projection: one CountSketch of the whole kernel-corrected gradient vec(U(x)) into ``width`` buckets.

Every parameter p of every layer and every output column c goes to bucket (h0(c) + h(p)) mod width with sign
s0(c) s(p) (seeded hashes, per layer and role), so E[<S u, S u'>] = <u, u'> and the variance is that of a
dense Gaussian projection of the same width (CountSketch, Charikar et al. 2002; it is a sparse JL map).
Unlike a per-layer Kronecker projection (whose estimate of a rank-one layer gradient is the product of two
sqrt(dim)-dimensional estimates), nothing is lost to structure. A layer is sketched

* from its explicit gradient (``Dense``, or ``Outer.dense()``): a scatter-add, O(d T n m) per sample;
* a large layer given as a sum over positions of outer products delta_t (x) a_t (``Outer``), without
  building it: the hash of weight entry (i, j) is hA(i) + hB(j) (:func:`_param_hash`), so the sketch is the
  circular convolution of the sketches of delta_t and a_t, computed by FFT (TensorSketch, Pham & Pagh 2013),
  O(d T width log width) per sample.

The hash is defined on the parameters' layout only, so both ways give the same sketch (tested), whatever
representation a layer arrives in (``compact`` materialises small layers depending on the positions T).
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from ..factors import Factor, Outer, layer_seed

# Layers with more than width log2(width) parameters get the structured hash (and, as outer-product factors,
# the FFT); smaller ones a flat hash and their explicit gradient.
STRUCTURED_FACTOR = 1.0
USE_FFT = True  # False: every layer from its explicit gradient (the same sketch; tests compare the two)
_BLOCK_ELEMS = 2**23  # elements of one intermediate block (explicit gradients, per-position sketches)


@functools.lru_cache(maxsize=64)
def _hash_cpu(n: int, width: int, seed: int, layer: str, role: str) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(layer_seed(seed, f"nnsim-sketch/{layer}", role))  # not the projections' streams
    bucket = torch.randint(width, (n,), generator=gen)
    sign = torch.randint(0, 2, (n,), generator=gen, dtype=torch.int8) * 2 - 1
    return bucket, sign


def _hash(n: int, width: int, seed: int, layer: str, role: str, like: Tensor) -> tuple[Tensor, Tensor]:
    """Seeded buckets [n] (long) and signs [n] (``like``'s dtype), on ``like``'s device."""
    bucket, sign = _hash_cpu(n, width, seed, layer, role)
    return bucket.to(like.device), sign.to(device=like.device, dtype=like.dtype)


def structured(params: list[tuple[str, torch.Size]], width: int) -> bool:
    """Whether a layer's hash is the structured one (a large weight [R, ...], with its bias of R entries):
    from the parameters' shapes only, so it is the same whatever representation the layer arrives in."""
    if not params or len(params[0][1]) < 2 or len(params) > 2:
        return False
    rows = params[0][1][0]
    if len(params) == 2 and tuple(params[1][1]) != (rows,):
        return False
    return sum(math.prod(shape) for _, shape in params) > STRUCTURED_FACTOR * width * math.log2(max(2, width))


def _param_hash(params: list[tuple[str, torch.Size]], layer: str, width: int, seed: int, like: Tensor
                ) -> tuple[Tensor, Tensor]:
    """Buckets and signs [n] of a layer's flat parameter layout (its params concatenated, each flattened).

    The one definition of the sketch's hash. A :func:`structured` layer (weight [R, ...], optional bias [R]):
    weight entry (r, q) (q the flat index of the rest) goes to hA(r) + hB(q) and bias entry r to
    hA(r) + hB(last), as if the bias were one more column (the ones column of the layer input); any other
    layer: one flat hash over its parameters."""
    n = sum(math.prod(shape) for _, shape in params)
    if not structured(params, width):
        return _hash(n, width, seed, layer, "param", like)
    rows = params[0][1][0]
    cols = n // rows  # the weight's columns, plus one for the bias
    hA, sA = _hash(rows, width, seed, layer, "out", like)
    hB, sB = _hash(cols, width, seed, layer, "in", like)
    w = n - (rows if len(params) == 2 else 0)
    bucket = (hA[:, None] + hB[None, :]) % width  # [R, cols]: the weight, then the bias column
    sign = sA[:, None] * sB[None, :]
    wc = w // rows
    parts_b, parts_s = [bucket[:, :wc].reshape(-1)], [sign[:, :wc].reshape(-1)]
    if len(params) == 2:
        parts_b.append(bucket[:, wc])
        parts_s.append(sign[:, wc])
    return torch.cat(parts_b), torch.cat(parts_s)


def _explicit(f: Factor, width: int, seed: int, h0: Tensor, s0: Tensor, out: Tensor) -> None:
    """Add the CountSketch of the factor's explicit gradient [B, d, n] into ``out`` [B, width]."""
    d = h0.shape[0]
    h, s = _param_hash(list(f.params), f.layer, width, seed, out)
    n = h.shape[0]
    bucket = ((h0[:, None] + h[None, :]) % width).reshape(1, -1)  # [1, d n]
    sign = (s0[:, None] * s[None, :]).reshape(1, -1)
    B = f.batch_size
    rows = max(1, _BLOCK_ELEMS // max(1, d * n * f.positions))
    for a in range(0, B, rows):
        part = f if rows >= B else f.select(torch.arange(a, min(B, a + rows), device=f.device))
        g = part.dense().g.reshape(-1, d * n).to(out.dtype)
        out[a : a + g.shape[0]].scatter_add_(1, bucket.expand(g.shape[0], -1), g * sign)


def _outer_hashes(f: Outer, width: int, seed: int, like: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The hash of :func:`_param_hash` split into its output side (g, i) [G n] and input side j [m] (the
    a-columns, the bias one last), for an outer-product layer that :func:`fft_sketched` accepts."""
    rows = f.params[0][1][0]
    cols = sum(math.prod(shape) for _, shape in f.params) // rows
    hA, sA = _hash(rows, width, seed, f.layer, "out", like)
    hB, sB = _hash(cols, width, seed, f.layer, "in", like)
    if f.weight_transposed:  # [m, n]: the rows are the input side
        return hB, sB, hA, sA
    return hA, sA, hB, sB


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


def fft_sketched(f: Factor, width: int) -> bool:
    """Whether a layer is sketched by FFT (else from its explicit gradient; both give the same sketch): an
    outer-product layer with a :func:`structured` hash whose layout the FFT reproduces, [G n, m] weights
    (with an optional bias) or transposed [m, n] ones without bias (embeddings). The FFT costs about
    d T width log2(width) per sample, the explicit gradient d T n m. (The FFT needs the positions' delta_t
    and a_t themselves: it is an algorithm of the Outer representation, hence the type test.)"""
    if not USE_FFT or not isinstance(f, Outer) or f.weight is None or not structured(list(f.params), width):
        return False
    G, n = f.delta.shape[2], f.delta.shape[-1]
    wshape = f.weight[1]
    if f.weight_transposed:
        return f.bias is None and G == 1 and tuple(wshape) == (f.m, n)
    return wshape[0] == G * n and math.prod(wshape) == G * n * (f.m - (f.bias is not None))


def sketch(factors: list[Factor], width: int, seed: int) -> Tensor:
    """CountSketch of the concatenated per-sample gradients (d columns) of ``factors``: [B, width] float32
    or float64 (the factors' precision), with E <sketch(x), sketch(x')> = sum_c <g_c(x), g_c(x')>."""
    first = factors[0]
    B = first.batch_size
    dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
    out = torch.zeros(B, width, dtype=dtype, device=first.device)
    h0, s0 = _hash(first.outputs, width, seed, "", "column", out)
    fft = [f for f in factors if fft_sketched(f, width)]
    for f in factors:
        if not fft_sketched(f, width):
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
