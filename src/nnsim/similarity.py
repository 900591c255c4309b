"""``Similarity``: the one entry point to the network's view of input similarity."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import algebra, backends
from . import outputs as outputs_mod
from ._model import ParamSelection, analysis_mode, check_model, select_params
from .backends.base import Problem
from .errors import InputError, ModelError, RankDeficiencyWarning, ResultTooLargeError
from .factors import Factor, gram, prepare, self_gram
from .inputs import Batch, Source, as_source, check_finite, sample_signature

Metric = Literal["euclidean", "fisher"] | Tensor
By = Literal["layer"] | None
_ALL = ""  # the group name when the kernel is not decomposed


@dataclass
class _Chunk:
    start: int
    size: int
    groups: dict[str, list[Factor]]
    K: dict[str, Tensor]  # K(x, x) per group [B, d, d]
    inv: dict[str, Tensor] = field(default_factory=dict)  # K^-1/2 or K^+ per group
    rank: dict[str, Tensor] = field(default_factory=dict)

    def nbytes(self) -> int:
        total = 0
        for fs in self.groups.values():
            for f in fs:
                for t in vars(f).values():
                    if isinstance(t, Tensor):
                        total += t.numel() * t.element_size()
        return total


class Similarity:
    """How similar a trained network considers its inputs (Charpiat et al., NeurIPS 2019).

    With G(x) = d f(x) / d theta ([d outputs, P parameters]), the kernel is K(x, x') = G(x) G(x')^T
    (the empirical NTK, d x d), its normalised form K(x,x)^-1/2 K(x,x') K(x',x')^-1/2, and the scalar
    summary tr(.)/d (for d = 1 the cosine of the two parameter gradients).

    Args:
        model: any ``nn.Module``. It is analysed functionally at its current parameters with eval-mode
            semantics (BatchNorm running statistics, no dropout) and is returned untouched.
        output: what is analysed: ``None`` (the model output flattened to [B, d]), a callable
            ``(model_output, inputs) -> Tensor[B, d]``, or a helper from :mod:`nnsim.outputs`.
        params: ``None`` (every parameter with ``requires_grad``), names, glob patterns or submodules.
        metric: output-space metric: ``"euclidean"``, ``"fisher"`` (softmax Fisher information on logits;
            normalised on its C-1 dimensional range, trace divided by C-1) or a d x d PSD tensor M, in
            which case K_M(x, x') = M^1/2 K(x, x') M^1/2.
        backend: ``"auto"`` (= ``"structured"``), ``"structured"``, ``"functorch"`` or ``"loop"``.
        chunk_size: samples per chunk (default: chosen from the measured size of a chunk's factors).
        progress: show a tqdm progress bar on long work.
        rtol, atol: rank guard of K(x, x)^-1/2 (spec §5.4; rtol defaults to 1e-5 in float32, 1e-10 in float64).
        singular: ``"pinv"`` (normalise on the range), ``"raise"`` or ``"ridge"``.
        max_result_bytes: refuse dense results larger than this (suggesting ``reduce="trace"``).
        cache_bytes: keep the factors of the second argument in memory up to this size instead of
            recomputing them for every chunk of the first.
    """

    def __init__(
        self,
        model: nn.Module,
        output: outputs_mod.OutputFn | None = None,
        params: ParamSelection = None,
        metric: Metric = "euclidean",
        backend: str = "auto",
        *,
        chunk_size: int | None = None,
        progress: bool = True,
        rtol: float | None = None,
        atol: float = 0.0,
        singular: algebra.Singular = "pinv",
        max_result_bytes: int = 2**31,
        cache_bytes: int = 2**30,
    ) -> None:
        check_model(model)
        if output is not None and not callable(output):
            raise InputError(f"output must be None or a callable (model_output, inputs) -> [B, d], got {output!r}")
        if not (isinstance(metric, Tensor) or metric in ("euclidean", "fisher")):
            raise InputError(f"metric must be 'euclidean', 'fisher' or a d x d PSD tensor, got {metric!r}")
        if singular not in ("pinv", "raise", "ridge"):
            raise InputError(f"singular must be 'pinv', 'raise' or 'ridge', got {singular!r}")
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise InputError(f"chunk_size must be a positive integer, got {chunk_size!r}")
        if backend not in backends.BACKENDS:
            raise InputError(f"unknown backend {backend!r}; choose one of {backends.BACKENDS}")
        self.model = model
        self.output = outputs_mod.flatten if output is None else output
        self.params = select_params(model, params)
        self.metric = metric
        self._fisher = isinstance(metric, str) and metric == "fisher"
        self.backend = backend
        self.chunk_size = chunk_size
        self.progress = progress
        self.rtol, self.atol, self.singular = rtol, atol, singular
        self.max_result_bytes, self.cache_bytes = max_result_bytes, cache_bytes
        self._problem = Problem(model, self.params, self.output)
        self._factor_fn = backends.make(backend, self._problem)
        first = next(iter(self.params.values()))
        self.device, self.dtype = first.device, first.dtype
        self.d: int | None = None

    # ------------------------------------------------------------------ public API
    def self_kernel(self, x: Any) -> Tensor:
        """K(x, x) for every sample: [N, d, d] (with the output metric applied)."""
        src = as_source(x, "x")
        parts = [c.K[_ALL] for c in self._chunks(src, "x", None, "kernel", "full")]
        return torch.cat(parts)

    def rank(self, x: Any) -> Tensor:
        """Numerical rank of K(x, x) per sample [N] (d for full rank; 0 for a zero gradient)."""
        return algebra.inv_sqrt_psd(self.self_kernel(x), self.rtol, self.atol)[1]

    def kernel(self, xa: Any, xb: Any = None, *, by: By = None) -> Tensor | dict[str, Tensor]:
        """Unnormalised K(xa_i, xb_j) = G(xa_i) G(xb_j)^T: [N, M, d, d] (``xb=None``: xa against itself).

        ``by="layer"``: a dict {module name: [N, M, d, d]} of per-layer terms that sum to the kernel.
        """
        return self._pairwise(xa, xb, "kernel", "full", by)

    def similarity(
        self, xa: Any, xb: Any = None, *, reduce: Literal["trace"] | None = "trace", by: By = None
    ) -> Tensor | dict[str, Tensor]:
        """Normalised similarity: [N, M] = tr(K~)/d (``reduce="trace"``), or [N, M, d, d] K~ (``reduce=None``).

        For d = 1 this is the cosine of the two parameter gradients. A sample whose gradient is zero has
        NaN similarities (with a warning naming it). ``by="layer"`` gives each layer's own normalised
        similarity (normalised with that layer's gradient norms, so they do not sum to the total).
        """
        if reduce not in ("trace", None):
            raise InputError(f"reduce must be 'trace' or None, got {reduce!r}")
        return self._pairwise(xa, xb, "similarity", "trace" if reduce == "trace" else "full", by)

    def influence(self, xa: Any, xb: Any = None) -> Tensor:
        """Asymmetric move transfer from xa_i to xb_j: K(xb_j, xa_i) K(xa_i, xa_i)^+, [N, M, d, d].

        The output move produced at xb_j by the smallest parameter change that moves f(xa_i) by v is
        ``influence[i, j] @ v`` (first order). For d = 1: k(x, x') / |g(x)|^2.
        """
        return self._pairwise(xa, xb, "influence", "full", None)

    def describe(self) -> dict[str, str]:
        """How each layer is computed by the structured backend (after a first call)."""
        fn = self._factor_fn
        plan = getattr(getattr(fn, "__self__", None), "plan", None)
        return plan.describe() if plan is not None else {}

    # ------------------------------------------------------------------ chunks
    def _to_device(self, batch: Batch, start: int, name: str) -> Batch:
        check_finite(batch, start, name)
        out = []
        for k, t in enumerate(batch):
            if t.is_floating_point() and t.dtype != self.dtype:
                raise InputError(f"{name}: input {k} has dtype {t.dtype} but the model's parameters are "
                                 f"{self.dtype}; convert the inputs (e.g. x.to({self.dtype}))")
            out.append(t.to(self.device))
        return tuple(out)

    def _factor_groups(self, batch: Batch, start: int, by: By) -> dict[str, list[Factor]]:
        with analysis_mode(self.model, self.params):
            factors, y = self._factor_fn(batch, start)
        d = y.shape[1]
        if self.d is None:
            self.d = d
            if isinstance(self.metric, Tensor):
                algebra.check_metric(self.metric, d)
            if self._fisher and d < 2:
                raise InputError("metric='fisher' needs logits with at least 2 classes as the output")
        elif d != self.d:
            raise InputError(f"the output dimension changed from {self.d} to {d} between chunks")
        if isinstance(self.metric, Tensor):
            half = algebra.sqrt_psd(self.metric.to(device=y.device, dtype=y.dtype)).expand(y.shape[0], d, d)
            factors = [f.mix(half) for f in factors]
        elif self._fisher:
            half = algebra.sqrt_psd(algebra.softmax_fisher(y))
            factors = [f.mix(half) for f in factors]
        if by is None:
            return {_ALL: factors}
        if by != "layer":
            raise InputError(f"by must be None or 'layer', got {by!r}")
        groups: dict[str, list[Factor]] = {}
        for f in factors:
            groups.setdefault(f.layer, []).append(f)
        return groups

    @property
    def _d_eff(self) -> int:
        assert self.d is not None
        return self.d - 1 if self._fisher else self.d

    def _prepare(self, batch: Batch, start: int, name: str, by: By, kind: str, mode: str) -> _Chunk:
        batch = self._to_device(batch, start, name)
        groups = self._factor_groups(batch, start, by)
        with torch.no_grad():
            return self._normalise_chunk(groups, start, batch[0].shape[0], name, kind, mode)

    def _normalise_chunk(self, groups: dict[str, list[Factor]], start: int, size: int, name: str, kind: str,
                         mode: str) -> _Chunk:
        chunk = _Chunk(start, size, {}, {})
        for g, fs in groups.items():
            K = self_gram(fs)
            bad = ~torch.isfinite(K).flatten(1).all(1)
            if bool(bad.any()):
                idx = (torch.nonzero(bad).flatten() + start).tolist()
                raise ModelError(f"{name}: the output gradients are not finite (overflow or NaN) at samples "
                                 f"{idx[:20]}; rescale the output or check the model in float64")
            chunk.K[g] = K
            if kind == "similarity":
                # Kernel-corrected gradients U = G^T K^-1/2 (spec §5.5): their Gram is K~ directly.
                inv, chunk.rank[g] = algebra.inv_sqrt_psd(K, self.rtol, self.atol, self.singular)
                fs = [f.mix(inv) for f in fs]
            elif kind == "influence":
                chunk.inv[g], chunk.rank[g] = algebra.pinv_psd(K, self.rtol, self.atol, self.singular)
            chunk.groups[g] = prepare(fs, mode)
        return chunk

    def _auto_chunk(self, src: Source, name: str, by: By, kind: str, mode: str) -> int:
        if self.chunk_size is not None:
            return self.chunk_size
        probe = next(src.chunks(8))
        c = self._prepare(probe[1], 0, name, by, kind, mode)
        per_sample = max(1, c.nbytes() // c.size)
        d = self.d or 1
        tile_cap = int(math.sqrt(2**28 / (4 * (d * d if mode == "full" else 1))))
        return int(max(8, min(1024, tile_cap, 2**28 // per_sample)))

    def _chunks(self, src: Source, name: str, by: By, kind: str, mode: str, size: int | None = None
                ) -> Iterator[_Chunk]:
        size = size or self._auto_chunk(src, name, by, kind, mode)
        for start, batch in src.chunks(size):
            yield self._prepare(batch, start, name, by, kind, mode)

    # ------------------------------------------------------------------ tiles
    def _sources(self, xa: Any, xb: Any, names: tuple[str, str] = ("xa", "xb")) -> tuple[Source, Source]:
        src_a = as_source(xa, names[0])
        src_b = src_a if xb is None else as_source(xb, names[1])
        if src_b is not src_a:
            sa, sb = sample_signature(src_a.first()), sample_signature(src_b.first())
            if sa != sb:
                raise InputError(f"{names[0]} and {names[1]} samples differ: {names[0]} has (shape, dtype) {sa}, "
                                 f"{names[1]} has {sb}; both must be valid inputs of the same model")
        return src_a, src_b

    def _sweep(self, src_a: Source, src_b: Source, symmetric: bool, kind: str, mode: str, by: By,
               report: _RankReport, names: tuple[str, str] = ("xa", "xb"),
               ) -> Iterator[tuple[_Chunk, _Chunk, dict[str, Tensor]]]:
        """Yield (chunk a, chunk b, {group: tile}) over all tiles; symmetric sweeps yield only cb.start >= ca.start."""
        size = self._auto_chunk(src_a, names[0], by, kind, mode)
        n_a, n_b = math.ceil(len(src_a) / size), math.ceil(len(src_b) / size)
        total = n_a * (n_a + 1) // 2 if symmetric else n_a * n_b
        name_b = names[0] if src_b is src_a else names[1]
        # The second argument is swept once per chunk of the first: keep its factors when they fit.
        cache = self._cache(src_b, name_b, by, kind, mode, size)

        def inner() -> Iterator[_Chunk]:
            return iter(cache) if cache is not None else self._chunks(src_b, name_b, by, kind, mode, size)

        outer = inner() if symmetric else self._chunks(src_a, names[0], by, kind, mode, size)
        with tqdm(total=total, disable=not self.progress or total < 2, desc=f"nnsim {kind}", unit="tile") as bar:
            for ca in outer:
                report.add(names[0], ca)
                for cb in inner():
                    if symmetric and cb.start < ca.start:
                        continue
                    if not symmetric and ca.start == 0:
                        report.add(names[1], cb)
                    yield ca, cb, {g: self._tile(ca, cb, g, kind, mode) for g in ca.groups}
                    bar.update(1)

    def _pairwise(self, xa: Any, xb: Any, kind: str, mode: str, by: By) -> Tensor | dict[str, Tensor]:
        src_a, src_b = self._sources(xa, xb)
        symmetric = xb is None and kind != "influence"
        report = self._report(kind)
        results: dict[str, Tensor] = {}
        for ca, cb, tiles in self._sweep(src_a, src_b, symmetric, kind, mode, by, report):
            if not results:
                results = self._allocate(list(tiles), len(src_a), len(src_b), mode)
            ia, ib = slice(ca.start, ca.start + ca.size), slice(cb.start, cb.start + cb.size)
            for g, t in tiles.items():
                results[g][ia, ib] = t
                if symmetric and cb.start != ca.start:
                    t = t.transpose(0, 1)
                    results[g][ib, ia] = t.transpose(-1, -2) if mode == "full" else t
        report.emit()
        return results[_ALL] if by is None else results

    def _report(self, kind: str) -> _RankReport:
        return _RankReport(kind, structural_nullity=int(self._fisher))

    def _cache(self, src: Source, name: str, by: By, kind: str, mode: str, size: int) -> list[_Chunk] | None:
        chunks, used = [], 0
        for c in self._chunks(src, name, by, kind, mode, size):
            used += c.nbytes()
            if used > self.cache_bytes:
                return None
            chunks.append(c)
        return chunks

    def _allocate(self, groups: list[str], N: int, M: int, mode: str) -> dict[str, Tensor]:
        assert self.d is not None
        shape = (N, M) + ((self.d, self.d) if mode == "full" else ())
        need = math.prod(shape) * (torch.finfo(self.dtype).bits // 8) * len(groups)
        if need > self.max_result_bytes:
            raise ResultTooLargeError(
                f"the result would take {need / 2**30:.2f} GiB (N={N}, M={M}, d={self.d}, {len(groups)} "
                f"group(s)) > max_result_bytes = {self.max_result_bytes / 2**30:.2f} GiB; use reduce='trace' "
                "for an [N, M] summary, split the inputs, or raise max_result_bytes")
        return {g: torch.empty(shape, dtype=self.dtype, device=self.device) for g in groups}

    def _tile(self, ca: _Chunk, cb: _Chunk, g: str, kind: str, mode: str) -> Tensor:
        with torch.no_grad():
            t = gram(ca.groups[g], cb.groups[g], mode)
            if kind == "similarity":
                if mode == "trace":
                    t = t / self._d_eff
                t[ca.rank[g] == 0] = float("nan")
                t[:, cb.rank[g] == 0] = float("nan")
            elif kind == "influence":
                t = algebra.influence_from_kernel(t, ca.inv[g])
                t[ca.rank[g] == 0] = float("nan")
        return t


class _RankReport:
    """Collects zero-gradient and rank-deficient samples and warns once, naming them."""

    def __init__(self, kind: str, structural_nullity: int = 0) -> None:
        self.kind, self.nullity = kind, structural_nullity
        self.zero: dict[tuple[str, str], list[int]] = {}
        self.deficient: dict[tuple[str, str], list[int]] = {}

    def add(self, side: str, chunk: _Chunk) -> None:
        for g, r in chunk.rank.items():
            expected = chunk.K[g].shape[-1] - self.nullity
            zero = torch.nonzero(r == 0).flatten() + chunk.start
            low = torch.nonzero((r > 0) & (r < expected)).flatten() + chunk.start
            if len(zero):
                self.zero.setdefault((side, g), []).extend(zero.tolist())
            if len(low):
                self.deficient.setdefault((side, g), []).extend(low.tolist())

    def emit(self, show: Callable[..., None] = warnings.warn) -> None:
        for (side, g), idx in self.zero.items():
            where = f" in layer {g!r}" if g else ""
            show(f"{len(idx)} sample(s) of {side} have a zero gradient{where} (no direction): their "
                 f"{self.kind} values are NaN. Samples: {sorted(set(idx))[:20]}", RankDeficiencyWarning,
                 stacklevel=4)
        for (side, g), idx in self.deficient.items():
            where = f" in layer {g!r}" if g else ""
            show(f"{len(idx)} sample(s) of {side} have a rank-deficient K(x, x){where}: normalised on its "
                 f"range (self-similarity rank/d < 1). Samples: {sorted(set(idx))[:20]}", RankDeficiencyWarning,
                 stacklevel=4)
