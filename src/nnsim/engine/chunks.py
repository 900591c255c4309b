"""Chunks: a bounded number of samples' factors on the device, with the metric mixed in, their K(x, x), and
what the request needs of it (the inverse square root mixed into the factors, or kept to scale the Gram tiles
where that is cheaper; K^+ kept for influence)."""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

import torch
from torch import Tensor, nn

from .. import algebra, distributed
from .._model import analysis_mode, input_failure
from ..backends import plan_cache
from ..backends.base import Problem, checked_output
from ..errors import InputError, ModelError
from ..factors import Factor, compact, prepare, self_gram
from ..inputs import Batch, Source, check_finite, sample_signature
from .request import ALL, Form, Quantity, Request

CHUNK_BYTES = 2**28  # budget of one chunk's factors
TILE_BYTES = 2**28  # budget of one result tile, counted in float32 entries (4 bytes)
MIN_CHUNK, MAX_CHUNK = 8, 256  # samples per chunk when measured
PROBE_SAMPLES = 2  # factor bytes grow linearly with the batch: a batch of 2 measures the bytes per sample
FORWARD_CHUNK = 1024  # samples per forward-only pass
T = TypeVar("T")
_MAX_KEPT = 64  # measured sizings kept per model object (in plan_cache.SIZES, under ``_shared_key``)
# What to suggest when a backend fails on a model whose forward runs: only backends that compute differently
# ('auto' is the structured backend; the loop is plain per-sample autograd, exact wherever the model runs).
_ALTERNATIVES = {
    "auto": "backend='loop' (per-sample autograd) or backend='functorch'",
    "structured": "backend='loop' (per-sample autograd) or backend='functorch'",
    "functorch": "backend='loop' (per-sample autograd) or backend='structured' (the default)",
    "loop": "backend='structured' (the default) or backend='functorch'",
}


class Resized(Exception):  # noqa: N818  (a signal, not an error)
    """Raised by :meth:`Chunker.prepare` (with ``resize=True``) on the first chunk of a call whose kept sizing
    turned out too large for the chunk budget: the caller sizes again and starts over."""


def restarted_on_resize(make: Callable[[bool], Iterator[T]]) -> Iterator[T]:
    """The items of ``make(True)``, or of ``make(False)`` when its first item raises :class:`Resized` (nothing
    of it is finished then: the first chunk comes before any item); ``make(resize)`` sizes its chunks itself."""
    for resize in (True, False):
        items = make(resize)
        try:
            first = next(items, None)
        except Resized:
            continue
        if first is not None:
            yield first
            yield from items
        return


@dataclass
class Chunk:
    """Samples [start, start + size) prepared for a :class:`~nnsim.engine.request.Request`.

    ``groups``: factors per group ({ALL: ...}, or per layer), mixed with K(x, x)^-1/2 for the similarity
    unless the group is in ``scale``; ``scale``: K(x, x)^-1/2 [B, d, d] of the similarity's groups whose factors
    were left unmixed, applied to each Gram tile instead (``engine.sweep.tile``); ``K``: K(x, x) per group
    [B, d, d]; ``pinv``: K(x, x)^+ per group (influence only); ``rank``: rank of K(x, x) per group [B]
    (similarity and influence); ``y``: the analysed outputs [B, d]."""

    start: int
    size: int
    groups: dict[str, list[Factor]]
    K: dict[str, Tensor]
    pinv: dict[str, Tensor] = field(default_factory=dict)
    rank: dict[str, Tensor] = field(default_factory=dict)
    y: Tensor | None = None
    scale: dict[str, Tensor] = field(default_factory=dict)

    @property
    def rows(self) -> slice:
        return slice(self.start, self.start + self.size)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for fs in self.groups.values() for f in fs for t in vars(f).values()
                   if isinstance(t, Tensor))


class Chunker:
    """Turns batches of a source into prepared :class:`Chunk` s for one model, metric and rank guard.

    Measures the output dimension ``d`` on the first batch (then checks it never changes)."""

    def __init__(self, model: nn.Module, params: dict[str, nn.Parameter], problem: Problem, factor_fn: Callable,
                 metric: Tensor | str, backend: str, chunk_size: int | None, rtol: float | None, atol: float,
                 singular: algebra.Singular, cache_bytes: int) -> None:
        self.model, self.params, self.problem, self.factor_fn = model, params, problem, factor_fn
        self.metric, self.fisher, self.backend = metric, isinstance(metric, str) and metric == "fisher", backend
        self.chunk_size, self.rtol, self.atol, self.singular = chunk_size, rtol, atol, singular
        self.cache_bytes = cache_bytes
        first = next(iter(params.values()))
        self.device, self.dtype = first.device, first.dtype
        self.d: int | None = None
        # measured (factor bytes per sample, d), by request and shapes
        self._per_sample_bytes: dict[tuple, tuple[int, int | None]] = {}
        # sizings taken from plan_cache.SIZES and not yet seen on a chunk: {key: the shared key they were kept under}
        self._kept_unseen: dict[tuple, tuple] = {}

    @property
    def d_eff(self) -> int:
        """The rank of a full-rank normalised kernel: d, or d - 1 with the Fisher metric."""
        assert self.d is not None
        return self.d - 1 if self.fisher else self.d

    def to_device(self, batch: Batch, start: int, name: str) -> Batch:
        check_finite(batch, start, name)
        for k, t in enumerate(batch):
            if t.is_floating_point() and t.dtype != self.dtype:
                raise InputError(f"{name}: input {k} has dtype {t.dtype} but the model's parameters are "
                                 f"{self.dtype}; convert the inputs (e.g. x.to({self.dtype}))")
        return tuple(t.to(self.device) for t in batch)

    def _measure(self, d: int) -> None:
        if self.d is None:
            self.d = d
            if isinstance(self.metric, Tensor):
                algebra.check_metric(self.metric, d)
            if self.fisher and d < 2:
                raise InputError("metric='fisher' needs logits with at least 2 classes as the output")
        elif d != self.d:
            raise InputError(f"the output dimension changed from {self.d} to {d} between chunks")

    def _factor_groups(self, batch: Batch, start: int, by_layer: bool) -> tuple[dict[str, list[Factor]], Tensor]:
        with analysis_mode(self.model, self.params):
            factors, y = self.factor_fn(batch, start)
        self._measure(y.shape[1])
        half = None  # K_M = M^1/2 K M^1/2: M^1/2 is mixed into the factors
        if isinstance(self.metric, Tensor):
            half = algebra.sqrt_psd(self.metric.to(device=y.device, dtype=y.dtype)).expand(y.shape[0], self.d, self.d)
        elif self.fisher:
            half = algebra.sqrt_psd(algebra.softmax_fisher(y))
        if half is not None:
            factors = [f.mix(half) for f in factors]
        if not by_layer:
            return {ALL: factors}, y
        groups: dict[str, list[Factor]] = {}
        for f in factors:
            groups.setdefault(f.layer, []).append(f)
        return groups, y

    def prepare(self, batch: Batch, start: int, name: str, request: Request, partners: int = MAX_CHUNK,
                resize: bool = False) -> Chunk:
        """One batch's chunk (``name``: the argument named in errors; ``partners``: how many samples its Gram
        tiles will pair it with, which only decides where K(x, x)^-1/2 is applied; ``resize``: the caller
        restarts with a new :meth:`chunk_size_for` on :class:`Resized`, see :meth:`_recheck`)."""
        # only while a kept sizing awaits its first chunk (not on the hot path of every chunk)
        key = (request, self.problem.keys, tuple(sample_signature(batch))) if self._kept_unseen else None
        batch = self.to_device(batch, start, name)
        try:
            groups, y = self._factor_groups(batch, start, request.by_layer)
        except (RuntimeError, TypeError, ValueError, IndexError) as e:
            # Before the model has run once, a failure is most likely the inputs: say which and how to fix.
            if self.d is not None or isinstance(e, (InputError, ModelError)):
                raise
            if self._forward_runs(batch):  # the inputs suit the model: the gradient computation failed
                raise ModelError(f"the {self.backend!r} backend failed on this model, whose forward pass runs on "
                                 f"these inputs: {type(e).__name__}: {str(e).strip().splitlines()[0][:300]}; "
                                 f"try {_ALTERNATIVES.get(self.backend, _ALTERNATIVES['loop'])}") from e
            raise input_failure(e, batch, name, self.dtype) from e
        with torch.no_grad():
            chunk = self._normalise(groups, start, batch[0].shape[0], name, request, partners)
        chunk.y = y
        if key is not None and key in self._kept_unseen:
            self._recheck(key, chunk, request, resize)
        return chunk

    def _recheck(self, key: tuple, chunk: Chunk, request: Request, resize: bool) -> None:
        """The first chunk prepared under a sizing kept from an earlier Chunker: if its model's kept sizings were
        dropped meanwhile (its kept plan failed its check on this chunk, and the new plan's factors may be
        larger), the bytes per sample are measured again on this chunk; when the budget then allows fewer
        samples than this chunk holds, :class:`Resized` asks a ``resize`` caller to start again with the new
        size (nothing of the call is finished yet: this is its first chunk of these shapes). Across ranks
        (torch.distributed initialised) and for callers that cannot start over, :meth:`chunk_size_for` checks
        the kept sizing on its probe batch instead, before any chunk (every rank measures the same samples)."""
        shared = self._kept_unseen.pop(key)
        if shared in plan_cache.SIZES.get(self.model, {}):
            return  # the kept plan passed its check: the kept sizing is the one measured for it
        self._per_sample_bytes[key] = (max(1, chunk.nbytes() // chunk.size), self.d)
        if resize and self._size(key, request) < chunk.size:
            raise Resized

    def _size(self, key: tuple, request: Request) -> int:
        per_sample, d = self._per_sample_bytes[key]
        entries = (self.d or d or 1) ** 2 if request.form is Form.FULL else 1
        tile_cap = int(math.sqrt(TILE_BYTES / (4 * entries)))
        return int(max(MIN_CHUNK, min(MAX_CHUNK, tile_cap, CHUNK_BYTES // per_sample)))

    def _forward_runs(self, batch: Batch) -> bool:
        try:
            with torch.no_grad():
                self.problem.call(batch)
        except Exception:
            return False
        return True

    def _normalise(self, groups: dict[str, list[Factor]], start: int, size: int, name: str, request: Request,
                   partners: int = MAX_CHUNK) -> Chunk:
        chunk = Chunk(start, size, {}, {})
        for g, fs in groups.items():
            fs = compact(fs)
            K = self_gram(fs)
            bad = ~torch.isfinite(K).flatten(1).all(1)
            if bool(bad.any()):
                idx = (torch.nonzero(bad).flatten() + start).tolist()
                raise ModelError(f"{name}: the output gradients are not finite (overflow or NaN) at samples "
                                 f"{idx[:20]}; rescale the output or check the model in float64")
            chunk.K[g] = K
            if request.quantity is Quantity.SIMILARITY:
                # Kernel-corrected gradients U = G^T K^-1/2 (docs/method.md, "Kernel-corrected gradients"):
                # their Gram is K~ directly.
                inv, chunk.rank[g] = algebra.inv_sqrt_psd(K, self.rtol, self.atol, self.singular)
                if _scales_tiles(request, fs, K, partners):
                    chunk.scale[g] = inv
                else:
                    fs = [f.mix(inv) for f in fs]
            elif request.quantity is Quantity.INFLUENCE:
                chunk.pinv[g], chunk.rank[g] = algebra.pinv_psd(K, self.rtol, self.atol, self.singular)
            chunk.groups[g] = fs if request.form is Form.RAW else prepare(fs, request.form.value)
        return chunk

    def chunk_size_for(self, src: Source, name: str, request: Request, restarts: bool = False) -> int:
        """Samples per chunk: ``chunk_size`` when set, else from the measured factor bytes per sample.

        A sizing kept from an earlier Chunker is checked on the first chunk prepared under it (:meth:`_recheck`).
        ``restarts``: the caller starts over at a new size on :class:`Resized` (the sweep, self-sized
        :meth:`chunks`). Any other caller fixes the size for its whole pass, and ranks must all cut the samples
        alike: the kept sizing is then checked here, on the probe batch (one pass over its 2 samples, which also
        checks the kept plan), before it is used."""
        if self.chunk_size is not None:
            return self.chunk_size
        self.problem.keys = src.keys  # keyword inputs: the model is called with these names
        probe = next(src.chunks(PROBE_SAMPLES))
        # The size per sample depends only on the sample shapes and the request: measured once per Chunker
        # (a reused Similarity then pays no probe pass per call), and kept per model object for later Chunkers
        # of the same model, parameters, output spec, backend and request (a new Similarity then pays no probe
        # pass either). Only the chunk size follows from it, never a result.
        key = (request, src.keys, tuple(sample_signature(probe[1])))
        if key not in self._per_sample_bytes:
            shared = _shared_key(self, key)
            kept = plan_cache.SIZES.get(self.model, {}).get(shared) if shared is not None else None
            if kept is not None:  # checked on the first real chunk (``_recheck``), as the kept plan is
                self._kept_unseen[key] = shared
            else:
                c = self.prepare(probe[1], 0, name, request)
                kept = (max(1, c.nbytes() // c.size), self.d)
                if shared is not None:
                    kept_for = plan_cache.SIZES.setdefault(self.model, {})
                    kept_for[shared] = kept
                    if len(kept_for) > _MAX_KEPT:  # the oldest goes
                        kept_for.pop(next(iter(kept_for)))
            self._per_sample_bytes[key] = kept
        if key in self._kept_unseen and not (restarts and distributed.world_size() == 1):
            self.prepare(probe[1], 0, name, request)  # _recheck: measured again if the kept plan is stale
        return self._size(key, request)

    def chunks(self, src: Source, name: str, request: Request, size: int | None = None, first: int = 0,
               stop: int | None = None, partners: int = MAX_CHUNK, resize: bool = False) -> Iterator[Chunk]:
        """Prepared chunks of ``src``; those starting before ``first`` are skipped without being prepared.

        Only the samples [first, stop) are read where the source allows random access (tensors, map-style
        datasets); ``first`` is a multiple of ``size``. ``partners``: see :meth:`prepare`; ``resize``: the first
        chunk may raise :class:`Resized` (see :meth:`prepare`). Without ``size`` the chunks are sized here and
        started again at the new size on :class:`Resized`."""
        if size is None:  # sized here: started again at the new size on Resized (raised by a first chunk only)
            yield from restarted_on_resize(lambda resize: self.chunks(
                src, name, request, self.chunk_size_for(src, name, request, restarts=True), first, stop, partners,
                resize))
            return
        self.problem.keys = src.keys
        stop = len(src) if stop is None else min(stop, len(src))
        if first >= stop:
            return
        for start, batch in src.rows(first, stop).chunks(size):
            yield self.prepare(batch, first + start, name, request, partners, resize and start == 0)

    def cached(self, src: Source, name: str, request: Request, size: int, first: int = 0, stop: int | None = None,
               partners: int = MAX_CHUNK, resize: bool = False) -> list[Chunk] | None:
        """All chunks of ``src`` (of samples [first, stop)) when they fit in ``cache_bytes`` (judged from the
        first), else None."""
        chunks, used = [], 0
        n_chunks = math.ceil((min(len(src), stop if stop is not None else len(src)) - first) / size)
        for c in self.chunks(src, name, request, size, first, stop, partners, resize):
            used += c.nbytes()
            if used > self.cache_bytes or (len(chunks) == 0 and c.nbytes() * n_chunks > 1.1 * self.cache_bytes):
                return None
            chunks.append(c)
        return chunks

    def reader(self, src: Source, name: str, request: Request, size: int, first: int = 0, stop: int | None = None
               ) -> Callable[[], Iterator[Chunk]]:
        """A re-iterable of the chunks of [first, stop): kept in memory when they fit, else recomputed."""
        cache = self.cached(src, name, request, size, first, stop)
        return lambda: iter(cache) if cache is not None else self.chunks(src, name, request, size, first, stop)

    def forward(self, src: Source) -> Tensor:
        """The analysed outputs [N, d] of every sample (no gradients)."""
        self.problem.keys = src.keys  # keyword inputs: the model is called with these names
        parts = []
        for start, batch in src.chunks(self.chunk_size or FORWARD_CHUNK):
            batch = self.to_device(batch, start, "data")
            with analysis_mode(self.model, self.params), torch.no_grad():
                parts.append(checked_output(self.problem, self.problem.call(batch), batch, start))
        return torch.cat(parts)


def _scales_tiles(request: Request, factors: list[Factor], K: Tensor, partners: int) -> bool:
    """Whether K(x, x)^-1/2 is applied to the Gram tiles (K~_ij = K_i^-1/2 K_ij K_j^-1/2, ``engine.sweep.tile``)
    rather than mixed into every factor: the same numbers to rounding, at another cost. At d = 1 the tile's scale
    is one multiply per pair against one per factor element for the mix; d x d blocks cost about 2 d^3
    multiply-adds per pair against d^2 per factor element of a sample. With ``partners`` pairs per sample:
    scale the tiles when 2 d partners is below the factor elements per sample and output (docs/benchmarks.md,
    "Issue 14, part 6"). Never for raw factors (sums, projections: no tiles) nor for the trace of d x d blocks
    (it would need the full blocks). The unmixed Gram must also stay far from float under- and overflow (the
    mixed factors have unit norm, the raw ones not): every diagonal entry of K, and every squared norm of an
    operand of the factors' Gram products, at most ``max * eps`` (no product overflows), and what the products
    that underflow can lose (``Factor.gram_range``, summed over the factors) below eps times the smallest
    nonzero diagonal entry of K; outside that the mix is kept."""
    d = K.shape[-1]
    if request.form is Form.RAW or (d > 1 and request.form is Form.TRACE):
        return False
    elements = sum(f.elements for f in factors)
    if 2 * d * partners >= elements:
        return False
    info = torch.finfo(K.dtype)
    diag = K.diagonal(dim1=-2, dim2=-1)
    nonzero = diag[diag > 0]
    if nonzero.numel() == 0:
        return True
    hi = info.max * info.eps
    k_min, k_max = float(nonzero.min()), float(nonzero.max())
    if k_max > hi:
        return False
    ranges = [f.gram_range() for f in factors]
    return all(big <= hi for big, _ in ranges) and sum(lost for _, lost in ranges) * info.tiny <= info.eps * k_min


def _shared_key(chunker: Chunker, key: tuple) -> tuple | None:
    """What the factor bytes per sample of ``key`` (request, input names, sample shapes) depend on beyond it: the
    model's structure, parameters and output spec (the structured backend's plan key), the backend and the metric
    kind. None: not kept across Chunkers (a model that is not weakly referenceable, an unusual output spec)."""
    model_key = plan_cache.key(chunker.problem, key)
    metric = chunker.metric if isinstance(chunker.metric, str) else tuple(chunker.metric.shape)
    try:
        weakref.ref(chunker.model)
    except TypeError:
        return None
    return None if model_key is None else (model_key, chunker.backend, metric)
