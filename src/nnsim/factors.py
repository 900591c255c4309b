"""Per-sample gradient factors and their exact Gram products (docs/method.md, "Layer-wise structure").

A *factor* describes the per-sample Jacobian of the analysed outputs with respect to one group of
parameters, for a batch of B samples and d outputs, without necessarily materialising it:

* :class:`Dense` holds it explicitly, ``g [B, d, n]``.
* :class:`Outer` holds it as a sum over T positions of outer products,
  ``g[b, c] = sum_t delta[b, c, t] (x) a[b, t]`` (Linear layers, convolutions via unfolded patches,
  Embedding with one-hot ``a`` given as indices). Its Gram product uses
  ``<g_i, g_j> = sum_{t,s} (a_it . a_js)(delta_it . delta_js)`` and never builds ``g``.

Both implement the :class:`Factor` protocol: mixing the output axis by per-sample d x d matrices (metrics,
kernel normalisation), exact Gram tiles in "full" ([B1, B2, d, d]) or "trace" ([B1, B2], sum over matched
outputs) mode, the kernel of index pairs and per-sample self-kernels (training's criterion), their size and
cost (which representation is cheaper), and batch-summed gradients (used to verify that every parameter use
was captured). Callers use the protocol and never test which representation a factor is.
"""

from __future__ import annotations

import functools
import math
import operator
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Protocol

import torch
from torch import Tensor

from ._gemm import gram_sum, self_gram_sum
from ._gemm import self_gram as self_product

ParamSpec = tuple[str, torch.Size]


class Factor(Protocol):
    """What every factor type provides (implemented by :class:`Dense` and :class:`Outer`; a new representation
    implements these and every caller works unchanged). B samples, d outputs, n parameters of the layer."""

    layer: str
    params: list[ParamSpec]

    @property
    def batch_size(self) -> int: ...
    @property
    def outputs(self) -> int: ...  # d
    @property
    def positions(self) -> int: ...  # T of a sum over positions; 1 for an explicit gradient
    @property
    def elements(self) -> int: ...  # entries per sample and output that ``mix`` combines (n, or G T n)
    def gram_range(self) -> tuple[float, float]: ...  # (largest squared operand norm, underflow loss / tiny)
    @property
    def device(self) -> torch.device: ...
    @property
    def dtype(self) -> torch.dtype: ...
    def mix(self, M: Tensor) -> Factor: ...  # output columns mixed by per-sample M [B, d, e]
    def gram(self, other: Factor, mode: str) -> Tensor: ...  # [B1, d, B2, d] (full) or [B1, B2] (trace)
    def gram_operand(self, mode: str) -> Tensor | None: ...  # [B e, K] whose products are the Gram, or None
    def pair_gram(self, I: Tensor, J: Tensor) -> Tensor: ...  # K(x_I[p], x_J[p]) for index pairs: [n, d, d]
    def self_gram(self) -> Tensor: ...  # K(x_b, x_b): [B, d, d]
    def prefers_dense(self, mode: str, partners: int = ...) -> bool: ...  # the explicit gradient is cheaper
    def compact(self) -> Factor: ...  # the smaller of the representations
    def dense(self) -> Dense: ...
    def select(self, idx: Tensor) -> Factor: ...
    def folded(self, B: int) -> Factor: ...  # a factor of B*k rows (row b*k + j of sample b) as one of B samples
    def inner(self, S: list[Tensor]) -> Tensor: ...  # <g[b, c], S[e]>: [B, d, e]
    def project(self, k: int, seed: int) -> Tensor: ...  # [B, d, k']
    def batch_grad(self) -> list[Tensor]: ...  # sum over the batch, one [d, *shape] per param

# Speed constants of the cost model, measured on this project's reference CPU (1 thread, float32; see
# docs/benchmarks.md, "Cost model"): only their ratios matter. Large GEMMs reach F_GEMM; each output element
# of a GEMM costs OUT_GEMM more (small inner sizes are far below peak); the per-sample products of the
# explicit gradient are batched small GEMMs (inner size T), slower still; elementwise passes cost ELEM.
_F_GEMM = 20e9  # flop/s
_OUT_GEMM = 1.5e-9  # s per output element
_F_BATCHED = 8e9  # flop/s
_OUT_BATCHED = 8e-9  # s per output element
_ELEM = 1.5e-9  # s per element of an elementwise pass
# The explicit gradient is paid once per sample and amortised over this many partners (a tile's width).
_NOMINAL_PARTNERS = 256
# Never materialise more than this per sample and layer (a chunk of 8 samples is then 512 MiB).
_DENSE_SAMPLE_BYTES = 2**26
# Element budget of the [rows, B2, T, T] intermediates of a pairwise position product.
_PAIR_BLOCK_ELEMS = 2**24
# Columns of a random projection matrix generated at a time.
_PROJ_BLOCK = 2**14


# A projection's generator seed mixes the user seed with a layer and a role: a prime multiplier keeps the streams
# of nearby user seeds apart, and the result stays in the int64 range of torch.Generator.manual_seed.
_SEED_PRIME = 1_000_003
_SEED_RANGE = 2**63


def layer_seed(seed: int, layer: str, role: str) -> int:
    """A projection's generator seed from (user seed, layer, role): reproducible across processes."""
    return (seed * _SEED_PRIME + zlib.crc32(f"{layer}/{role}".encode())) % _SEED_RANGE


def _gaussian(rows: int, cols: int, seed: int, like: Tensor) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, cols, generator=gen, dtype=torch.float64) / math.sqrt(rows)).to(like)


def _operand(g: Tensor, mode: str) -> Tensor:
    """The explicit gradient g [B, d, n] as the operand of its Gram products: [B d, n] (full), [B, d n] (trace)."""
    B, d, n = g.shape
    return g.reshape(B * d, n) if mode != "trace" else g.reshape(B, d * n)


def _dense_gram(ga: Tensor, gb: Tensor, mode: str) -> Tensor:
    """ga [B1, d, n], gb [B2, d, n] -> [B1, d, B2, d] (full; see ``gram`` for the layout) or [B1, B2] (trace)."""
    B1, d, _ = ga.shape
    if ga is gb:  # a tile of a chunk with itself: symmetric, the blocks below the diagonal are mirrored
        t = self_product(_operand(ga, mode))
    else:
        t = gram_sum([_operand(ga, mode)], [_operand(gb, mode)])
    return t if mode == "trace" else _full_layout(t, B1, d)


def _full_layout(t: Tensor, B1: int, d: int) -> Tensor:
    """A product [B1 d, B2 d] of full-mode operands viewed as [B1, d, B2, d] (a view: t may be strided)."""
    return t.unflatten(1, (t.shape[1] // d, d)).unflatten(0, (B1, d))


class _Batched:
    """B, d, device and dtype of a factor, read off its per-sample tensor ``_per_sample`` [B, d, ...]."""

    _per_sample: Tensor

    @property
    def batch_size(self) -> int:
        return self._per_sample.shape[0]

    @property
    def outputs(self) -> int:
        return self._per_sample.shape[1]

    @property
    def elements(self) -> int:
        return math.prod(self._per_sample.shape[2:])

    @property
    def device(self) -> torch.device:
        return self._per_sample.device

    @property
    def dtype(self) -> torch.dtype:
        return self._per_sample.dtype


@dataclass
class Dense(_Batched):
    """Explicit per-sample Jacobian ``g [B, d, n]`` of the parameters ``params`` (concatenated)."""

    layer: str
    g: Tensor
    params: list[ParamSpec]

    positions = 1

    @property
    def _per_sample(self) -> Tensor:
        return self.g

    def mix(self, M: Tensor) -> Dense:
        """Replace output columns by ``G M``: M [B, d, e]."""
        if M.shape[1] == M.shape[2] == 1:  # one output: a scale per sample (the same product, far faster)
            return replace(self, g=self.g * M)
        return replace(self, g=torch.einsum("bcn,bce->ben", self.g, M))

    def gram(self, other: Factor, mode: str) -> Tensor:
        return _dense_gram(self.g, other.dense().g, mode)

    def gram_operand(self, mode: str) -> Tensor:
        return _operand(self.g, mode)

    def pair_gram(self, I: Tensor, J: Tensor) -> Tensor:
        return torch.einsum("pcn,pen->pce", self.g[I], self.g[J])

    def self_gram(self) -> Tensor:
        return self.g @ self.g.transpose(1, 2)

    def prefers_dense(self, mode: str, partners: int = 0) -> bool:
        return False

    def gram_range(self) -> tuple[float, float]:
        """(largest per-sample squared norm of an operand of this factor's Gram products, L): a Gram entry loses
        at most L * tiny to products that underflow. The Gram multiplies the gradients themselves, whose norms
        K(x, x) bounds already (0), through d n products per entry."""
        return 0.0, float(self.g.shape[1] * self.g.shape[2])

    def compact(self) -> Dense:
        return self

    def dense(self) -> Dense:
        return self

    def batch_grad(self) -> list[Tensor]:
        total = self.g.sum(0)
        out, start = [], 0
        for _, shape in self.params:
            size = math.prod(shape)
            out.append(total[:, start : start + size].reshape(total.shape[0], *shape))
            start += size
        return out

    def select(self, idx: Tensor) -> Dense:
        return replace(self, g=self.g[idx])

    def folded(self, B: int) -> Dense:
        """The rows of a module called on a folded batch [B*k, ...] (row b*k + j belongs to sample b) summed into
        their samples: the gradient of a sample is the sum of its rows' gradients."""
        return replace(self, g=self.g.unflatten(0, (B, self.g.shape[0] // B)).sum(1))

    def inner(self, S: list[Tensor]) -> Tensor:
        """<g[b, c], S[e]> for parameter-shaped S (one [e, *shape] tensor per param): [B, d, e]."""
        flat = torch.cat([x.reshape(x.shape[0], -1) for x in S], dim=1)
        return self.g @ flat.T.to(self.g.dtype)

    def project(self, k: int, seed: int) -> Tensor:
        """Seeded Gaussian projection of the explicit gradient to min(k, n) dims: [B, d, k']."""
        B, d, n = self.g.shape
        if n <= k:
            return self.g
        gen = torch.Generator().manual_seed(layer_seed(seed, self.layer, "dense"))
        out = self.g.new_zeros(B, d, k)
        for s0 in range(0, n, _PROJ_BLOCK):  # the [k, n] matrix is generated block by block, never stored
            R = torch.randn(k, min(_PROJ_BLOCK, n - s0), generator=gen, dtype=torch.float64)
            out += self.g[:, :, s0 : s0 + R.shape[1]] @ R.T.to(self.g)
        return out / math.sqrt(k)


@dataclass
class Outer(_Batched):
    """Per-sample Jacobian as a sum of outer products over positions, for G independent groups.

    Attributes:
        a: [B, G, T, m] float layer inputs (a trailing column of ones when the bias is included), or
           [B, G, T] int64 indices standing for one-hot rows of width ``vocab`` (Embedding).
        delta: [B, d, G, T, n] back-propagated output signals.
        weight: (name, shape) of the weight, whose per-sample gradient is laid out [G*n, m_w] (or
           [m, n] when ``weight_transposed``), or None when the weight is not analysed.
        bias: (name, shape) of a bias of shape [G*n], carried by the ones column of ``a``, or None.
    """

    layer: str
    a: Tensor
    delta: Tensor
    weight: ParamSpec | None
    bias: ParamSpec | None = None
    vocab: int = 0
    weight_transposed: bool = False
    params: list[ParamSpec] = field(init=False)

    def __post_init__(self) -> None:
        self.params = [p for p in (self.weight, self.bias) if p is not None]

    @property
    def _per_sample(self) -> Tensor:
        return self.delta

    @property
    def positions(self) -> int:
        return self.delta.shape[3]

    @property
    def indexed(self) -> bool:
        return not self.a.is_floating_point()

    @property
    def m(self) -> int:
        return self.vocab if self.indexed else self.a.shape[-1]

    def mix(self, M: Tensor) -> Outer:
        if M.shape[1] == M.shape[2] == 1:  # one output: a scale per sample
            return replace(self, delta=self.delta * M[:, :, :, None, None])
        return replace(self, delta=torch.einsum("bcgtn,bce->begtn", self.delta, M))

    def costs(self, mode: str, partners: int = _NOMINAL_PARTNERS) -> tuple[float, float]:
        """Estimated seconds per sample of (explicit gradient, pairwise product) for Gram tiles against
        ``partners`` samples, from the FLOPs and output elements of the products each path runs (see
        ``_Speed``). The explicit path pays its materialisation once per sample and a Gram GEMM of inner
        size d*n*m per pair; the pairwise path two GEMMs over the (T1 x T2) position pairs per sample pair."""
        return _explicit_cost(self, mode, partners), _pairwise_cost(self, mode, partners)

    def prefers_dense(self, mode: str, partners: int = _NOMINAL_PARTNERS) -> bool:
        """Whether the explicit gradient makes this layer's Gram tiles cheaper (docs/method.md, "How the kernel is
        computed"). Both paths are exact; the choice only changes speed (and float rounding). Explicit gradients above
        ``_DENSE_SAMPLE_BYTES`` per sample are never chosen: a chunk of them would not fit in memory."""
        _, d, G, _, n = self.delta.shape
        if d * G * n * self.m * self.delta.element_size() > _DENSE_SAMPLE_BYTES:
            return False
        explicit, pairwise = self.costs(mode, partners)
        return explicit < pairwise

    def gram_range(self) -> tuple[float, float]:
        """As :meth:`Dense.gram_range`; the pairwise Gram multiplies inputs and signals apart, so their own
        ranges matter: with A, D the largest per-sample squared norms of a (a one-hot row: 1) and delta, a
        product a_it . a_js (inner size m) or delta_it . delta_js (inner size d n) that underflows loses at most
        tiny times the other one, summed over the G T^2 position pairs: L = G T^2 (d n A + m D)."""
        B, d, G, T, n = self.delta.shape
        if B == 0:
            return 0.0, 0.0
        def sq_norm(x: Tensor) -> float:  # accumulated in float64: no overflow of the squares
            return float(torch.linalg.vector_norm(x.reshape(B, -1), dim=1, dtype=torch.float64).max()) ** 2

        A = float(G * T) if self.indexed else sq_norm(self.a)
        D = sq_norm(self.delta)
        return max(A, D), G * T * T * (d * n * A + self.m * D)

    def compact(self) -> Factor:
        """The explicit gradient when it is the smaller representation (e.g. early convolutions: many
        positions, few weights), so later mixing, sums and Grams are cheaper; else self."""
        _, d, G, T, n = self.delta.shape
        if d * G * n * self.m < d * G * T * n + (G * T if self.indexed else G * T * self.m):
            return self.dense()
        return self

    def _grad_blocks(self, summed: bool = False) -> Tensor:
        """Explicit per-sample gradient [B, d, G, n, m], or its sum over the batch [d, G, n, m]."""
        B, d, G, T, n = self.delta.shape
        if self.indexed:
            delta, a = self.delta, self.a
            if summed:  # positions of all samples together: one sample of B*T positions
                delta = delta.permute(1, 2, 0, 3, 4).reshape(1, d, G, B * T, n)
                a = a.permute(1, 0, 2).reshape(1, G, B * T)
                B, T = 1, B * T
            out = delta.new_zeros(B, d, G, n, self.vocab)
            index = a[:, None, :, None, :].expand(B, d, G, n, T)
            out = out.scatter_add_(-1, index, delta.permute(0, 1, 2, 4, 3))
            return out[0] if summed else out
        return torch.einsum("bcgtn,bgtm->cgnm" if summed else "bcgtn,bgtm->bcgnm", self.delta, self.a)

    def _split(self, blocks: Tensor) -> list[Tensor]:
        """[..., G, n, m] -> flat gradient pieces in ``params`` order (leading axes kept)."""
        lead = blocks.shape[:-3]
        pieces = []
        m_w = blocks.shape[-1] - (1 if self.bias is not None else 0)
        if self.weight is not None:
            w = blocks[..., :m_w]
            if self.weight_transposed:
                w = w.transpose(-1, -2)
            pieces.append(w.reshape(*lead, -1))
        if self.bias is not None:
            pieces.append(blocks[..., m_w].reshape(*lead, -1))
        return pieces

    def dense(self) -> Dense:
        blocks = self._grad_blocks()
        return Dense(self.layer, torch.cat(self._split(blocks), dim=-1), self.params)

    def batch_grad(self) -> list[Tensor]:
        pieces = self._split(self._grad_blocks(summed=True))
        return [p.reshape(p.shape[0], *shape) for p, (_, shape) in zip(pieces, self.params, strict=False)]

    def select(self, idx: Tensor) -> Outer:
        return replace(self, a=self.a[idx], delta=self.delta[idx])

    def folded(self, B: int) -> Outer:
        """As :meth:`Dense.folded`: the k rows of a sample become k times more positions of it (a sum over
        positions already), [B*k, G, T, m] -> [B, G, k*T, m] and the signals likewise."""
        _, d, G, T, n = self.delta.shape
        k = self.delta.shape[0] // B
        a = self.a.unflatten(0, (B, k)).transpose(1, 2)  # [B, G, k, T, ...]
        delta = self.delta.unflatten(0, (B, k)).permute(0, 2, 3, 1, 4, 5)  # [B, d, G, k, T, n]
        return replace(self, a=a.reshape(B, G, k * T, *self.a.shape[3:]), delta=delta.reshape(B, d, G, k * T, n))

    def _join(self, S: list[Tensor]) -> Tensor:
        """Inverse of ``_split``: parameter-shaped [e, *shape] tensors -> blocks [e, G, n, m]."""
        _, _, G, _, n = self.delta.shape
        pieces = []
        it = iter(S)
        if self.weight is not None:
            w = next(it)
            e = w.shape[0]
            w = w.transpose(-1, -2) if self.weight_transposed else w
            pieces.append(w.reshape(e, G, n, -1))
        if self.bias is not None:
            b = next(it)
            pieces.append(b.reshape(b.shape[0], G, n, 1))
        return torch.cat(pieces, dim=-1).to(self.delta.dtype)

    def inner(self, S: list[Tensor]) -> Tensor:
        """<g[b, c], S[e]> without building g: sum_t delta[b,c,t] . (S[e] a[b,t]) -> [B, d, e]."""
        blocks = self._join(S)
        B, d, G, T, n = self.delta.shape
        out = self.delta.new_zeros(B, d, blocks.shape[0])
        for g in range(G):
            if self.indexed:
                sa = blocks[:, g].permute(2, 0, 1)[self.a[:, g]]  # [B, T, e, n]
            else:
                sa = torch.einsum("enm,btm->bten", blocks[:, g], self.a[:, g])
            out += torch.einsum("bctn,bten->bce", self.delta[:, :, g], sa)
        return out

    def project(self, k: int, seed: int) -> Tensor:
        """Kronecker-structured projection (P_out (x) P_in) of the gradient, never built: [B, d, k'].

        The narrower side gets k_small = min(width, ceil(sqrt(k))) dims and the other side the rest of the
        budget, ceil(k / k_small) (capped at its width); a side kept at full width is not projected at all.
        A layer then costs O(T (m k1 + n k2)) per sample instead of O(n m k); layers with n m <= k are exact.
        """
        B, d, G, T, n = self.delta.shape
        m = self.m
        if n * m <= k:
            return self.dense().g
        root = math.ceil(math.sqrt(k))
        if n <= m:
            k2 = min(n, root)
            k1 = min(m, math.ceil(k / k2))
        else:
            k1 = min(m, root)
            k2 = min(n, math.ceil(k / k1))
        if k1 == m:
            pa = torch.nn.functional.one_hot(self.a, m).to(self.delta) if self.indexed else self.a
        else:
            P_in = _gaussian(k1, m, layer_seed(seed, self.layer, "in"), self.delta)
            pa = P_in.T[self.a] if self.indexed else self.a @ P_in.T  # [B, G, T, k1]
        if k2 == n:
            pd = self.delta
        else:
            pd = self.delta @ _gaussian(k2, n, layer_seed(seed, self.layer, "out"), self.delta).T  # [B, d, G, T, k2]
        return torch.einsum("bcgtk,bgtl->bcgkl", pd, pa).reshape(B, d, -1)

    def gram_operand(self, mode: str) -> None:
        return None  # its Gram is the pairwise product over positions, not one matrix product

    def _position_products(self, other: Outer, g: int, rows: slice) -> Tensor:
        """[R*T1, B2*T2] products a_it . a_js of the positions of group g (equality of indices when indexed)."""
        if self.indexed:
            return (self.a[rows, g].reshape(-1, 1) == other.a[:, g].reshape(1, -1)).to(self.delta.dtype)
        return self.a[rows, g].flatten(0, 1) @ other.a[:, g].flatten(0, 1).T

    def gram(self, other: Factor, mode: str) -> Tensor:
        """Exact Gram tile without building g: <g_i, g_j> = sum_{t,s} (a_it . a_js)(delta_it . delta_js).

        Both position products are single GEMMs over all (sample, position) pairs of the tile, multiplied
        elementwise and summed over the positions: trace mode contracts the outputs inside the delta GEMM
        ([B1 T1, d n] x [d n, B2 T2]); full mode keeps them ([B1 d T1, n] x [n, B2 d T2]). Rows are blocked
        so that the [rows, T1, B2, T2] (times d^2 in full mode) intermediates stay under _PAIR_BLOCK_ELEMS.
        Against another representation both sides are made explicit.
        """
        if not isinstance(other, Outer):
            return self.dense().gram(other, mode)
        B1, d, G, T1, n = self.delta.shape
        B2, T2 = other.delta.shape[0], other.delta.shape[3]
        full = mode != "trace"
        shape = (B1, d, B2, d) if full else (B1, B2)
        out = None
        step = max(1, _PAIR_BLOCK_ELEMS // max(1, T1 * B2 * T2 * (d * d if full else 1)))
        for g in range(G):
            db = other.delta[:, :, g]  # [B2, d, T2, n]
            db = db.reshape(B2 * d * T2, n) if full else db.transpose(1, 2).reshape(B2 * T2, d * n)
            parts = []
            for r0 in range(0, B1, step):
                rows = slice(r0, min(B1, r0 + step))
                R = rows.stop - rows.start
                pp = self._position_products(other, g, rows)  # [R T1, B2 T2]
                da = self.delta[rows, :, g]  # [R, d, T1, n]
                if full:
                    dd = (da.reshape(R * d * T1, n) @ db.T).view(R, d, T1, B2, d, T2)
                    pp = pp.view(R, 1, T1, B2, 1, T2)
                else:
                    dd = (da.transpose(1, 2).reshape(R * T1, d * n) @ db.T).view(R, T1, B2, T2)
                    pp = pp.view(R, T1, B2, T2)
                dd = dd * pp if dd.requires_grad or pp.requires_grad else dd.mul_(pp)
                if T1 * T2 == 1:  # one position each (a Linear on vectors): nothing to sum
                    parts.append(dd.view(R, d, B2, d) if full else dd.view(R, B2))
                else:
                    parts.append(dd.sum((2, 5)) if full else dd.sum((1, 3)))
            term = parts[0] if len(parts) == 1 else torch.cat(parts)
            out = term if out is None else out + term
        return out.view(shape)

    def pair_gram(self, I: Tensor, J: Tensor) -> Tensor:
        """K(x_I[p], x_J[p]) = sum_{t,s} (a_It . a_Js)(delta_It . delta_Js) per index pair, [n, d, d]."""
        _, d, G, T, n = self.delta.shape
        out = None
        for g in range(G):
            dI, dJ = self.delta[I, :, g], self.delta[J, :, g]  # [n, d, T, n_out]
            if self.indexed:
                pp = (self.a[I, g][:, :, None] == self.a[J, g][:, None, :]).to(self.delta.dtype)
            elif T == 1:
                aa = (self.a[I, g, 0] * self.a[J, g, 0]).sum(-1)
                t = aa[:, None, None] * torch.einsum("pcn,pen->pce", dI[:, :, 0], dJ[:, :, 0])
                out = t if out is None else out + t
                continue
            else:
                pp = torch.einsum("ptm,psm->pts", self.a[I, g], self.a[J, g])
            y = torch.einsum("pts,pesn->petn", pp, dJ)  # contracted over s first
            t = torch.einsum("pctn,petn->pce", dI, y)
            out = t if out is None else out + t
        return out

    def self_gram(self) -> Tensor:
        B, d, G, T, n = self.delta.shape
        if T == 1 and not self.indexed:
            sq = (self.a[:, :, 0] ** 2).sum(-1)  # [B, G]
            dd = self.delta[:, :, :, 0]  # [B, d, G, n]
            return torch.einsum("bg,bcgn,begn->bce", sq, dd, dd)
        if self.prefers_dense("full", partners=1):
            return self.dense().self_gram()
        out = self.delta.new_zeros(B, d, d)
        step = max(1, _PAIR_BLOCK_ELEMS // max(1, T * T + d * T * n))
        for g in range(G):
            for r0 in range(0, B, step):
                rows = slice(r0, min(B, r0 + step))
                if self.indexed:
                    pp = (self.a[rows, g][:, :, None] == self.a[rows, g][:, None, :]).to(self.delta.dtype)
                else:
                    pp = self.a[rows, g] @ self.a[rows, g].transpose(1, 2)
                y = torch.einsum("bts,besn->betn", pp, self.delta[rows, :, g])
                out[rows] += torch.einsum("bctn,betn->bce", self.delta[rows, :, g], y)
        return out


def _gemm(M: int, K: int, N: int) -> float:
    return 2.0 * M * K * N / _F_GEMM + M * N * _OUT_GEMM


def _explicit_cost(f: Outer, mode: str, partners: int) -> float:
    """Seconds per sample: materialise g [d, G, n, m] once, then a Gram GEMM row against ``partners``."""
    _, d, G, T, n = f.delta.shape
    m = f.m
    e = d if mode != "trace" else 1
    if f.indexed:  # zero fill + scatter-add of T rows per output
        build = (d * G * n * m + d * G * n * T) * _ELEM
    else:
        build = d * G * (2.0 * n * T * m / _F_BATCHED + n * m * _OUT_BATCHED)
    return build + _gemm(e, d * G * n * m // e, partners * e)


def _pairwise_cost(f: Outer, mode: str, partners: int) -> float:
    """Seconds per sample of the pairwise product against ``partners`` samples (``Outer.gram``)."""
    _, d, G, T, n = f.delta.shape
    pairs = T * partners * T  # (position, partner position) pairs of one sample row, per group
    pp = pairs * _ELEM if f.indexed else _gemm(T, f.m, partners * T)
    if mode == "trace":
        dd = _gemm(T, d * n, partners * T) + 2 * pairs * _ELEM
    else:
        dd = _gemm(d * T, n, partners * d * T) + 2 * d * d * pairs * _ELEM
    return G * (pp + dd)


def compact(factors: list[Factor]) -> list[Factor]:
    """Each factor in its smaller representation (:meth:`Outer.compact`)."""
    return [f.compact() for f in factors]


def prepare(factors: list[Factor], mode: str) -> list[Factor]:
    """Convert each factor to the representation that makes its Gram tiles cheapest (docs/method.md, "How the
    kernel is computed")."""
    return [f.dense() if f.prefers_dense(mode) else f for f in factors]


def gram(fa: list[Factor], fb: list[Factor], mode: str) -> Tensor:
    """Sum over factors of the exact Gram tile: [B1, B2, d, d] (full) or [B1, B2] (trace).

    The pairs whose Gram is one matrix product (``gram_operand``: explicit gradients) are accumulated in one
    output: a chunk's tile with itself by the upper row strips of every factor, mirrored once at the end
    (``_gemm.self_gram_sum``), other tiles by one in-place product per factor (``_gemm.gram_sum``). The other
    pairs' tiles (pairwise products over positions) are added to it. Full tiles are built in the
    [B1, d, B2, d] layout that the products produce and permuted (a view) once at the end.
    """
    products, others = [], []
    for x, y in zip(fa, fb, strict=True):
        a, b = x.gram_operand(mode), y.gram_operand(mode)
        if a is not None and b is not None:
            products.append((x is y, a, b))
        else:
            others.append((x, y))
    out = None
    if products:
        if all(same for same, _, _ in products):  # a chunk with itself: symmetric
            out = self_gram_sum([a for _, a, _ in products])
        else:
            out = gram_sum([a for _, a, _ in products], [b for _, _, b in products])
        if mode != "trace":
            out = _full_layout(out, fa[0].batch_size, fa[0].outputs)
    for x, y in others:
        t = x.gram(y, mode)
        out = t if out is None else out.add_(t)
    return out if mode == "trace" else out.permute(0, 2, 1, 3)


def inner(factors: list[Factor], sums: dict[str, Tensor]) -> Tensor:
    """<G_b columns, S columns> summed over factors, for parameter sums {name: [e, *shape]}: [B, d, e]."""
    return _summed(f.inner([sums[name] for name, _ in f.params]) for f in factors)


def batch_sum(factors: list[Factor], into: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """Accumulate sum_b G_b per parameter, {name: [d, *shape]}, into ``into``."""
    into = {} if into is None else into
    for f in factors:
        for (name, _), g in zip(f.params, f.batch_grad()):
            into[name] = into[name] + g if name in into else g
    return into


def project(factors: list[Factor], k: int, seed: int) -> Tensor:
    """Concatenated per-factor projections [B, d, sum k'] with E <proj_i, proj_j> = <g_i, g_j>."""
    return torch.cat([f.project(k, seed) for f in factors], dim=-1)


def self_gram(factors: list[Factor]) -> Tensor:
    """Per-sample K(x, x) [B, d, d] summed over factors."""
    return _summed(f.self_gram() for f in factors)


def pair_gram(factors: list[Factor], I: Tensor, J: Tensor) -> Tensor:
    """K(x_I[p], x_J[p]) [n, d, d] for index pairs, summed over factors (differentiable)."""
    return _summed(f.pair_gram(I, J) for f in factors)


def _summed(terms: Iterable[Tensor]) -> Tensor:
    """The sum of per-factor terms, in order (a new tensor, never an in-place update of a term)."""
    return functools.reduce(operator.add, terms)
