"""``Similarity``: the one entry point to the network's view of input similarity."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten
from torch.utils.data import Subset
from tqdm.auto import tqdm

from . import algebra, backends
from . import distributed as dist_mod
from . import outputs as outputs_mod
from ._model import ParamSelection, analysis_mode, check_model, input_failure, select_params
from .backends.base import Problem, checked_output
from .errors import InputError, ModelError, RankDeficiencyWarning, ResultTooLargeError
from .estimators import DenoisingReport, TopK, denoising_from_sums, linearized, row_statistic
from .factors import Factor, batch_sum, compact, gram, inner, prepare, project, self_gram
from .inputs import Batch, Source, as_source, check_finite, sample_signature

Comm = dist_mod.Comm

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
    y: Tensor | None = None  # the analysed outputs [B, d]

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
        self._per_sample_bytes: dict[tuple, int] = {}  # measured factor bytes per sample, by call kind

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

    # ------------------------------------------------------------------ dataset-scale estimators
    def density(
        self,
        data: Any,
        reference: Any = None,
        method: Literal["soft", "hard", "less_soft"] = "soft",
        normalized: bool = True,
        threshold: float | None = None,
        power: float | None = None,
        include_self: bool = True,
        algorithm: Literal["auto", "linear", "tiles"] = "auto",
        *,
        group: Any = None,
    ) -> Tensor:
        """Neighbour count of each sample of ``data`` among ``reference`` (default: ``data``), [N] (spec §9).

        * ``"soft"``: sum_j sim(x_i, x_j) (``normalized=False``: sum_j tr K(x_i, x_j) / d). Linear time and
          matrix-free: one pass accumulates S = sum_j U_j (kernel-corrected gradients) per parameter, a
          second scores <U_i, S>; memory O(P d) plus one chunk. ``algorithm="tiles"`` sums tiles instead.
        * ``"hard"``: #{j : sim(x_i, x_j) > threshold} (strict). ``"less_soft"``: sum_j max(sim, 0)^power.
          Both exact by tiles with streaming row reductions, never holding the N x M matrix.

        ``include_self=False`` drops j = i (only meaningful when ``reference`` is ``data``). Samples with a
        zero gradient get NaN (with a warning) and contribute nothing to the others' counts.

        ``group``: a ``torch.distributed`` process group (default: the initialised default group, if any;
        ``False``: this process alone). Every rank passes the same arguments and gets the full result; each
        computes its share (soft: its chunks, then one all-reduce of S; tiles: a balanced share of the tiles,
        then one all-reduce of the counts). See ``docs/scaling.md``.
        """
        self._check_density_args(method, normalized, threshold, power, algorithm)
        same = reference is None or reference is data
        if not include_self and not same:
            raise InputError("include_self=False needs reference=None (the self-term exists only when the data "
                             "are their own reference)")
        src, ref = self._sources(data, None if same else reference, ("data", "reference"))
        comm = self._comm(group, "density", (src, ref), (method, normalized, threshold, power, include_self,
                                                          algorithm, same))
        if method == "soft" and algorithm != "tiles":
            return self._soft_linear(src, ref, normalized, include_self, comm)
        return self._density_tiles(src, ref, same, method, threshold, power, include_self, comm, normalized)

    def neighbors(
        self, queries: Any, data: Any = None, k: int = 10, exclude_self: bool = False, *, group: Any = None
    ) -> tuple[Tensor, Tensor]:
        """The k samples of ``data`` most similar to each query: (similarities [Q, k], indices [Q, k]).

        Exact, by tiles with a running top-k (bounded memory). ``data=None`` searches the queries
        themselves; ``exclude_self`` then skips each query's own index. Queries with a zero gradient get
        NaN similarities and index -1. Among equal similarities the lowest index comes first.

        ``group``: a ``torch.distributed`` process group (default: the initialised default group, if any;
        ``False``: this process alone). Every rank passes the same queries and data (they are not broadcast:
        under torchrun every rank runs the same script) and gets the full result; each sweeps its share of
        the tiles (a shard of the data, or of the triangle when ``data=None``), then the ranks' top-k lists
        are merged exactly.
        """
        same = data is None or data is queries
        src, ref = self._sources(queries, None if same else data, ("queries", "data"))
        limit = len(ref) - (1 if same and exclude_self else 0)
        if not isinstance(k, int) or not 1 <= k <= limit:
            raise InputError(f"k must be an integer in [1, {limit}], got {k!r}")
        comm = self._comm(group, "neighbors", (src, ref), (k, exclude_self, same))
        report = self._report("neighbors")
        top: TopK | None = None
        with dist_mod.together(comm):
            for ca, cb, tiles in self._sweep(src, ref, same, "similarity", "trace", None, report, ("queries", "data"),
                                             comm):
                t = tiles[_ALL]
                if top is None:
                    top = TopK(len(src), k, t.dtype, t.device)
                if same and exclude_self and ca.start == cb.start:
                    t.fill_diagonal_(float("nan"))
                top.update(slice(ca.start, ca.start + ca.size), t, cb.start)
                if same and cb.start != ca.start:
                    top.update(slice(cb.start, cb.start + cb.size), t.T, ca.start)
        if top is None:  # a rank without tiles (more ranks than tiles)
            top = TopK(len(src), k, self.dtype, self.device)
        if comm is not None:
            top.values, top.indices = dist_mod.merge_topk(comm, top.values, top.indices, k)
            report.merge(comm)
        report.emit()
        return top.result()

    def denoising(
        self,
        data: Any,
        predictions: Tensor | None = None,
        noise_std: float | None = None,
        approximate: bool = False,
        dim: int = 1024,
        seed: int = 0,
        *,
        targets: Tensor | None = None,
        method: Literal["paper", "linearized"] = "paper",
        smoother: Literal["ridge", "flow"] = "ridge",
        landmarks: int = 1024,
        group: Any = None,
    ) -> DenoisingReport:
        """Self-denoising statistics of each sample of ``data`` with respect to ``data`` (spec §10).

        ``method="linearized"`` (needs the noisy training ``targets`` [N, d]; see
        :mod:`nnsim.estimators.linearized` and docs/experiments/denoising.md): the trained network is modelled
        as a spectral smoother S of its unnormalised kernel (``smoother="ridge"``: K (K + lam I)^-1; ``"flow"``:
        I - exp(-K / lam)), lam fitted so that S y reproduces the network's predictions; sigma is estimated
        from the residuals (``noise_std=None``) and ``predicted_error_i = sigma sqrt(tr D_i / d)`` with
        D_i = sum_j S_ij S_ij^T. Exact (eigendecomposition of the [N d, N d] kernel) up to N d = 6000; with
        ``approximate=True`` a Nystroem kernel on ``landmarks`` seeded random samples (error measured in the
        docs). Returns ``noise_std`` (given or estimated), ``lam``, ``dof`` = tr S, ``fit_error``.

        The default, ``method="paper"``, is the rest of this docstring.

        Uses the unnormalised kernel: W_ij = (sum_l K_il)^-1 K_ij, D_i = sum_j W_ij W_ij^T. Exact by tiles
        (O(N^2) time, O(tile) memory). ``approximate=True`` replaces sum_j K_ij K_ij^T by G_i^T C G_i with
        C = sum_j G_j G_j^T estimated from projected features (``dim`` per layer), in two linear passes.
        ``predictions`` [N, d] default to the model's analysed outputs; ``noise_std`` (the label-noise
        level sigma) enables ``predicted_error = sigma sqrt(tr D / d)``.

        ``group``: a ``torch.distributed`` process group (default: the initialised default group, if any;
        ``False``: this process alone). Every rank passes the same arguments and gets the full report; the
        exact tiles (or, approximate, the chunks of both passes) are spread over the ranks and the per-sample
        sums all-reduced.
        """
        if isinstance(self.metric, Tensor) or self._fisher:
            raise InputError("denoising is derived for a squared loss on the outputs: use metric='euclidean'")
        if noise_std is not None and not (isinstance(noise_std, (int, float)) and math.isfinite(noise_std)
                                          and noise_std >= 0):
            raise InputError(f"noise_std must be a non-negative number, got {noise_std!r}")
        if method not in ("paper", "linearized"):
            raise InputError(f"method must be 'paper' or 'linearized', got {method!r}")
        if method == "linearized":
            return self._denoising_linearized(data, predictions, targets, noise_std, approximate, landmarks, seed,
                                              smoother, group)
        if targets is not None:
            raise InputError("targets are used by method='linearized' only; the paper's factor is label-free "
                             "(pass method='linearized' to estimate sigma from the targets)")
        if approximate and not (isinstance(dim, int) and dim >= 1):
            raise InputError(f"dim must be a positive integer (the projection size of approximate=True), got {dim!r}")
        src, _ = self._sources(data, None, ("data", "data"))
        if predictions is not None:
            if not isinstance(predictions, Tensor) or predictions.dim() != 2 or predictions.shape[0] != len(src):
                raise InputError(f"predictions must be a [N, d] tensor with N = {len(src)} rows")
            if not torch.isfinite(predictions).all():
                raise InputError("predictions contain NaN or Inf")
            if self.d is None:  # the output dimension is known after one sample's factors
                self._prepare(src.first(), 0, "data", None, "kernel", "raw")
            if predictions.shape[1] != self.d:
                raise InputError(f"predictions have {predictions.shape[1]} columns but the analysed output has "
                                 f"d = {self.d}: pass a [N, {self.d}] tensor")
        comm = self._comm(group, "denoising", (src,), (
            None if predictions is None else dist_mod.params_checksum({"predictions": predictions}),
            noise_std, approximate, dim, seed))
        sums = self._denoising_sums_approx(src, predictions, dim, seed, comm) if approximate else \
            self._denoising_sums_tiles(src, predictions, comm)
        R, Q, Y, yhat, norm_sum = sums if len(sums) == 5 else (*sums, None)
        report = denoising_from_sums(R, Q, Y, yhat, noise_std, self.rtol, approximate, norm_sum)
        assert report.singular is not None
        if bool(report.singular.any()):
            idx = torch.nonzero(report.singular).flatten().tolist()
            warnings.warn(f"{len(idx)} sample(s) have a (near-)singular kernel row sum sum_j K_ij: pseudo-inverted, "
                          f"their denoising statistics are unreliable. Samples: {idx[:20]}", RankDeficiencyWarning,
                          stacklevel=2)
        return report

    def features(self, x: Any, dim: int = 1024, seed: int = 0, normalized: bool = True) -> Tensor:
        """Seeded random projections of the per-sample (kernel-corrected if ``normalized``) gradients.

        Returns [N, d, k] with E <phi(x)_c, phi(x')_e> = K~(x, x')_ce (or K): per layer a Kronecker-structured
        Gaussian projection to about ``dim`` dimensions (layers smaller than ``dim`` are kept exact), never
        stored. The same seed gives the same projection in any process.
        """
        if not isinstance(dim, int) or dim < 1:
            raise InputError(f"dim must be a positive integer, got {dim!r}")
        src = as_source(x, "x")
        kind = "similarity" if normalized else "kernel"
        parts = []
        for c in self._chunks(src, "x", None, kind, "raw"):
            with torch.no_grad():
                parts.append(project(c.groups[_ALL], dim, seed))
        return torch.cat(parts)

    # Three small public hooks for code that streams its own chunks (nnsim.FeatureIndex): one chunk's
    # kernel-corrected factors, the chunk size the library would use, and the trace normaliser.
    def corrected_factors(self, batch: Batch, start: int = 0, name: str = "x") -> tuple[list[Factor], Tensor]:
        """The kernel-corrected per-sample gradients U(x) = G(x)^T K(x, x)^-1/2 of one chunk, as factors.

        ``batch`` is a tuple of tensors [B, ...] (one chunk; ``start`` its first sample's index, ``name``
        the argument named in errors). Returns (factors, rank [B]): the factors (``nnsim.factors.Factor``:
        ``project``, ``dense``, ``batch_grad``, ``inner``) hold U with d columns, so that the Gram of two
        samples' U is the normalised kernel K~ and tr(K~) / :attr:`d_eff` is their similarity; ``rank`` is
        the rank of each K(x, x) (0: a zero gradient, U = 0; below :attr:`d_eff`: normalised on its range).
        """
        chunk = self._prepare(batch, start, name, None, "similarity", "raw")
        return chunk.groups[_ALL], chunk.rank[_ALL]

    def chunk_size_for(self, x: Any) -> int:
        """Samples per chunk for the per-sample factors of ``x`` (``chunk_size`` when set, else measured)."""
        return self._auto_chunk(as_source(x, "x"), "x", None, "similarity", "raw")

    @property
    def d_eff(self) -> int:
        """The rank of a full-rank normalised kernel: d (outputs), or d - 1 with ``metric="fisher"``.

        The scalar similarity is tr(K~) / d_eff. Known after a first computation (raises before)."""
        if self.d is None:
            raise InputError("d_eff is known after a first computation (the output dimension is measured)")
        return self._d_eff

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

    def _factor_groups(self, batch: Batch, start: int, by: By) -> tuple[dict[str, list[Factor]], Tensor]:
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
            return {_ALL: factors}, y
        if by != "layer":
            raise InputError(f"by must be None or 'layer', got {by!r}")
        groups: dict[str, list[Factor]] = {}
        for f in factors:
            groups.setdefault(f.layer, []).append(f)
        return groups, y

    @property
    def _d_eff(self) -> int:
        assert self.d is not None
        return self.d - 1 if self._fisher else self.d

    def _prepare(self, batch: Batch, start: int, name: str, by: By, kind: str, mode: str) -> _Chunk:
        batch = self._to_device(batch, start, name)
        try:
            groups, y = self._factor_groups(batch, start, by)
        except (RuntimeError, TypeError, ValueError, IndexError) as e:
            # Before the model has run once, a failure is most likely the inputs: say which and how to fix.
            if self.d is not None or isinstance(e, (InputError, ModelError)):
                raise
            if self._forward_runs(batch):  # the inputs suit the model: the gradient computation failed
                raise ModelError(f"the {self.backend!r} backend failed on this model, whose forward pass runs on "
                                 f"these inputs: {type(e).__name__}: {str(e).strip().splitlines()[0][:300]}; "
                                 "try backend='structured' (the default) or backend='loop'") from e
            raise input_failure(e, batch, name, self.dtype) from e
        with torch.no_grad():
            chunk = self._normalise_chunk(groups, start, batch[0].shape[0], name, kind, mode)
        chunk.y = y
        return chunk

    def _forward_runs(self, batch: Batch) -> bool:
        try:
            with torch.no_grad():
                self._problem.call(batch)
        except Exception:
            return False
        return True

    def _normalise_chunk(self, groups: dict[str, list[Factor]], start: int, size: int, name: str, kind: str,
                         mode: str) -> _Chunk:
        chunk = _Chunk(start, size, {}, {})
        for g, fs in groups.items():
            fs = compact(fs)
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
            # "raw": kept as the rules made them (for sums and projections, not Gram tiles)
            chunk.groups[g] = fs if mode == "raw" else prepare(fs, mode)
        return chunk

    def _auto_chunk(self, src: Source, name: str, by: By, kind: str, mode: str) -> int:
        if self.chunk_size is not None:
            return self.chunk_size
        self._problem.keys = src.keys  # keyword inputs: the model is called with these names
        probe = next(src.chunks(2))  # the size per sample is linear in the batch: 2 samples (the plan's) suffice
        # The measured size per sample depends only on the sample shapes and the representation: measure it
        # once per Similarity (a reused Similarity then pays no probe pass per call).
        key = (by, kind, mode, src.keys, tuple((tuple(t.shape[1:]), t.dtype) for t in tree_flatten(probe[1])[0]
                                     if isinstance(t, Tensor)))
        if key not in self._per_sample_bytes:
            c = self._prepare(probe[1], 0, name, by, kind, mode)
            self._per_sample_bytes[key] = max(1, c.nbytes() // c.size)
        per_sample = self._per_sample_bytes[key]
        d = self.d or 1
        tile_cap = int(math.sqrt(2**28 / (4 * (d * d if mode == "full" else 1))))
        return int(max(8, min(256, tile_cap, 2**28 // per_sample)))

    def _chunks(self, src: Source, name: str, by: By, kind: str, mode: str, size: int | None = None,
                first: int = 0, stop: int | None = None) -> Iterator[_Chunk]:
        """Prepared chunks of ``src``; those starting before ``first`` are skipped without being prepared.

        With ``stop`` (a process's share: ``first`` a multiple of ``size``) only the samples [first, stop) are
        read where the source allows random access (tensors, map-style datasets)."""
        size = size or self._auto_chunk(src, name, by, kind, mode)
        self._problem.keys = src.keys
        if stop is None:
            for start, batch in src.chunks(size):
                if start >= first:
                    yield self._prepare(batch, start, name, by, kind, mode)
            return
        for start, batch in _range_chunks(src, size, first, min(stop, len(src))):
            yield self._prepare(batch, start, name, by, kind, mode)

    # ------------------------------------------------------------------ tiles
    def _sources(self, xa: Any, xb: Any, names: tuple[str, str] = ("xa", "xb")) -> tuple[Source, Source]:
        src_a = as_source(xa, names[0])
        src_b = src_a if xb is None else as_source(xb, names[1])
        if src_b is not src_a:
            sa, sb = sample_signature(src_a.first(), src_a.keys), sample_signature(src_b.first(), src_b.keys)
            if sa != sb:
                raise InputError(f"{names[0]} and {names[1]} samples differ: {names[0]} has (shape, dtype) {sa}, "
                                 f"{names[1]} has {sb}; both must be valid inputs of the same model")
        return src_a, src_b

    def _sweep(self, src_a: Source, src_b: Source, symmetric: bool, kind: str, mode: str, by: By,
               report: _RankReport, names: tuple[str, str] = ("xa", "xb"), comm: Comm | None = None,
               ) -> Iterator[tuple[_Chunk, _Chunk, dict[str, Tensor]]]:
        """Yield (chunk a, chunk b, {group: tile}) over all tiles; symmetric sweeps yield only cb.start >= ca.start.

        With ``comm``, only this rank's share of the tiles (:func:`nnsim.distributed.tile_segments`)."""
        if comm is not None:
            yield from self._sweep_part(comm, src_a, src_b, symmetric, kind, mode, by, report, names)
            return
        size = self._auto_chunk(src_a, names[0], by, kind, mode)
        n_a, n_b = math.ceil(len(src_a) / size), math.ceil(len(src_b) / size)
        total = n_a * (n_a + 1) // 2 if symmetric else n_a * n_b
        name_b = names[0] if src_b is src_a else names[1]
        # The second argument is swept once per chunk of the first: keep its factors when they fit.
        cache = self._cache(src_b, name_b, by, kind, mode, size)

        def inner(first: int = 0) -> Iterator[_Chunk]:
            # A symmetric sweep never needs the chunks below the diagonal: do not recompute them.
            return iter(cache) if cache is not None else self._chunks(src_b, name_b, by, kind, mode, size, first)

        outer = inner() if symmetric else self._chunks(src_a, names[0], by, kind, mode, size)
        with tqdm(total=total, disable=not self.progress or total < 2, desc=f"nnsim {kind}", unit="tile") as bar:
            for ca in outer:
                report.add(names[0], ca)
                for cb in inner(ca.start if symmetric else 0):
                    if symmetric and cb.start < ca.start:
                        continue
                    if not symmetric and ca.start == 0:
                        report.add(names[1], cb)
                    yield ca, cb, {g: self._tile(ca, cb, g, kind, mode) for g in ca.groups}
                    bar.update(1)

    def _sweep_part(self, comm: Comm, src_a: Source, src_b: Source, symmetric: bool, kind: str, mode: str, by: By,
                    report: _RankReport, names: tuple[str, str]) -> Iterator[tuple[_Chunk, _Chunk, dict[str, Tensor]]]:
        """This rank's tiles, row segment by row segment, with the chunks it needs cached when they fit."""
        size = self._auto_chunk(src_a, names[0], by, kind, mode)
        n_a, n_b = math.ceil(len(src_a) / size), math.ceil(len(src_b) / size)
        segments = dist_mod.tile_segments(n_a, n_b, symmetric, comm.rank, comm.world)
        if not segments:
            return
        name_b = names[0] if src_b is src_a else names[1]
        c0, c1 = dist_mod.segments_columns(segments)
        r0, r1 = segments[0][0], segments[-1][0] + 1
        if symmetric:  # rows and columns come from the same chunks; every row index is below its columns
            c0 = min(c0, r0)
        cache = self._cache(src_b, name_b, by, kind, mode, size, c0 * size, c1 * size)

        def columns(j0: int, j1: int) -> Iterator[_Chunk]:
            if cache is not None:
                return iter(cache[j0 - c0 : j1 - c0])
            return self._chunks(src_b, name_b, by, kind, mode, size, j0 * size, j1 * size)

        if symmetric and cache is not None:
            rows: Iterator[_Chunk] = iter(cache[r0 - c0 : r1 - c0])
        else:
            rows = self._chunks(src_a, names[0], by, kind, mode, size, r0 * size, r1 * size)
        total = sum(j1 - j0 for _, j0, j1 in segments)
        seen_b: set[int] = set()
        with tqdm(total=total, disable=not self._shows(comm) or total < 2, desc=f"nnsim {kind}", unit="tile") as bar:
            for (i, j0, j1), ca in zip(segments, rows, strict=True):
                assert ca.start == i * size
                report.add(names[0], ca)
                for cb in columns(j0, j1):
                    if not symmetric and cb.start not in seen_b:
                        seen_b.add(cb.start)
                        report.add(names[1], cb)
                    yield ca, cb, {g: self._tile(ca, cb, g, kind, mode) for g in ca.groups}
                    bar.update(1)

    def _comm(self, group: Any, op: str, sources: tuple[Source, ...], args: Any) -> Comm | None:
        """Resolve the process group of a dataset-scale operation and check that every rank called it alike."""
        comm = dist_mod.resolve(group)
        if comm is not None:
            seen = [(len(s), dist_mod.batch_digest(s.first())) for s in sources]
            dist_mod.agree(comm, f"the {op} call (sample counts and first-sample digests, model parameters, "
                                 "arguments)", (op, seen, dist_mod.params_checksum(self.params), repr(args)))
        return comm

    def _shows(self, comm: Comm | None) -> bool:
        """Progress bars: on, and on rank 0 only."""
        return self.progress and (comm is None or comm.rank == 0)

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

    def _cache(self, src: Source, name: str, by: By, kind: str, mode: str, size: int, first: int = 0,
               stop: int | None = None) -> list[_Chunk] | None:
        """All chunks of ``src`` (of samples [first, stop)) when they fit in ``cache_bytes`` (judged from the
        first), else None."""
        chunks, used = [], 0
        n_chunks = math.ceil((min(len(src), stop if stop is not None else len(src)) - first) / size)
        for c in self._chunks(src, name, by, kind, mode, size, first, stop):
            used += c.nbytes()
            if used > self.cache_bytes or (len(chunks) == 0 and c.nbytes() * n_chunks > 1.1 * self.cache_bytes):
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


    # ------------------------------------------------------------------ estimator internals
    @staticmethod
    def _check_density_args(method: str, normalized: bool, threshold: float | None, power: float | None,
                            algorithm: str) -> None:
        if method not in ("soft", "hard", "less_soft"):
            raise InputError(f"method must be 'soft', 'hard' or 'less_soft', got {method!r}")
        if algorithm not in ("auto", "linear", "tiles"):
            raise InputError(f"algorithm must be 'auto', 'linear' or 'tiles', got {algorithm!r}")
        if method == "hard" and not (isinstance(threshold, (int, float)) and math.isfinite(threshold)):
            raise InputError(f"method='hard' needs a finite numeric threshold (count of similarities strictly above "
                             f"it), got {threshold!r}")
        if method == "less_soft" and not (isinstance(power, (int, float)) and math.isfinite(power) and power > 0):
            raise InputError("method='less_soft' needs a positive power n (sum of max(sim, 0)^n)")
        if method != "hard" and threshold is not None:
            raise InputError(f"threshold applies to method='hard' only, not {method!r}")
        if method != "less_soft" and power is not None:
            raise InputError(f"power applies to method='less_soft' only, not {method!r}")
        if method != "soft" and not normalized:
            raise InputError(f"method={method!r} is defined on the normalised similarity: use normalized=True")
        if method != "soft" and algorithm == "linear":
            raise InputError(f"method={method!r} has no linear-time algorithm; it is exact by tiles")

    def _soft_linear(self, src: Source, ref: Source, normalized: bool, include_self: bool,
                     comm: Comm | None = None) -> Tensor:
        kind = "similarity" if normalized else "kernel"
        report = self._report("density")
        size = self._auto_chunk(src, "data", None, kind, "raw")
        # A process group splits both passes by chunks: S is all-reduced between them, scores gathered after.
        f0, f1 = (size * c for c in dist_mod.chunk_range(len(ref), size, comm))
        a0, a1 = (min(len(src), size * c) for c in dist_mod.chunk_range(len(src), size, comm))
        stop = (lambda b: b) if comm is not None else (lambda b: None)  # single process: the plain path
        cached = self._cache(ref, "reference", None, kind, "raw", size, f0, stop(f1))
        ref_chunks = cached if cached is not None else self._chunks(ref, "reference", None, kind, "raw", size, f0,
                                                                    stop(f1))
        S: dict[str, Tensor] = {}
        with torch.no_grad():
            with dist_mod.together(comm):
                for c in tqdm(ref_chunks, disable=not self._shows(comm), desc="nnsim density: sum", unit="chunk"):
                    batch_sum(c.groups[_ALL], S)
            if comm is not None:
                if not S:  # no chunk on this rank: zeros of the right shapes
                    batch_sum(self._prepare(ref.first(), 0, "reference", None, kind, "raw").groups[_ALL], S)
                    S = {key: torch.zeros_like(v) for key, v in S.items()}
                S = dist_mod.all_reduce_dict(comm, S)
            reuse = cached if ref is src and cached is not None else None
            chunks = reuse if reuse is not None else self._chunks(src, "data", None, kind, "raw", size, a0, stop(a1))
            out = torch.empty(a1 - a0, dtype=self.dtype, device=self.device)
            with dist_mod.together(comm):
                for c in tqdm(chunks, disable=not self._shows(comm), desc="nnsim density: score", unit="chunk"):
                    report.add("data", c)
                    fs = c.groups[_ALL]
                    score = inner(fs, S).diagonal(dim1=-2, dim2=-1).sum(-1)
                    if not include_self:
                        score = score - self_gram(fs).diagonal(dim1=-2, dim2=-1).sum(-1)
                    score = score / self._d_eff
                    if normalized:
                        score[c.rank[_ALL] == 0] = float("nan")
                    out[c.start - a0 : c.start - a0 + c.size] = score
        if comm is not None:
            out = dist_mod.gather_rows(comm, out, a0, len(src))
            report.merge(comm)
        report.emit()
        return out

    def _density_tiles(self, src: Source, ref: Source, same: bool, method: str, threshold: float | None,
                       power: float | None, include_self: bool, comm: Comm | None = None, normalized: bool = True
                       ) -> Tensor:
        report = self._report("density")
        out = torch.zeros(len(src), dtype=torch.float64, device=self.device)
        zero_rows = []
        kind = "similarity" if normalized else "kernel"  # only method="soft" allows normalized=False
        with dist_mod.together(comm):
            for ca, cb, tiles in self._sweep(src, ref, same, kind, "trace", None, report, ("data", "reference"),
                                             comm):
                t = tiles[_ALL] if normalized else tiles[_ALL] / self._d_eff
                if normalized and (cb.start == 0 or (same and cb.start == ca.start)):
                    zero_rows.append(torch.nonzero(ca.rank[_ALL] == 0).flatten() + ca.start)
                if same and not include_self and ca.start == cb.start:
                    t.fill_diagonal_(float("nan"))
                v = row_statistic(t, method, threshold, power).double()
                out[ca.start : ca.start + ca.size] += v.sum(1)
                if same and cb.start != ca.start:
                    out[cb.start : cb.start + cb.size] += v.sum(0)
        if comm is not None:
            out = dist_mod.all_reduce_sum(comm, out)
            zero_rows = [torch.tensor(sorted(set().union(*dist_mod.all_gather_object(
                comm, torch.cat(zero_rows).tolist() if zero_rows else []))), dtype=torch.long, device=self.device)]
            report.merge(comm)
        report.emit()
        out = out.to(self.dtype)
        if zero_rows:
            out[torch.cat(zero_rows)] = float("nan")
        return out

    def _denoising_sums_tiles(self, src: Source, predictions: Tensor | None, comm: Comm | None = None
                              ) -> tuple[Tensor, ...]:
        """R = sum_j K_ij, Q = sum_j K_ij K_ij^T, Y = sum_j K_ij yhat_j, yhat and A = sum_j ||K_ij||_F (exact tiles)."""
        report = self._report("kernel")
        R = Q = Y = yhat = A = None
        with dist_mod.together(comm):
            for ca, cb, tiles in self._sweep(src, src, True, "kernel", "full", None, report, ("data", "data"), comm):
                t = tiles[_ALL]  # [Ra, Cb, d, d], t[i, j] = K(a_i, b_j)
                if R is None:
                    N, d = len(src), t.shape[-1]
                    R, Q = (t.new_zeros(N, d, d, dtype=torch.float64) for _ in range(2))
                    Y, yhat = t.new_zeros(N, d, dtype=torch.float64), t.new_zeros(N, d)
                    A = t.new_zeros(N, dtype=torch.float64)
                ia, ib = slice(ca.start, ca.start + ca.size), slice(cb.start, cb.start + cb.size)
                ya = ca.y if predictions is None else predictions[ia].to(t)
                yb = cb.y if predictions is None else predictions[ib].to(t)
                if cb.start == ca.start:  # each row's diagonal tile is swept exactly once, by one rank
                    yhat[ia] = ya
                t64 = t.double()
                R[ia] += t64.sum(1)
                norms = t64.flatten(2).norm(dim=2)  # [Ra, Cb] ||K_ij||_F (= ||K_ji||_F)
                A[ia] += norms.sum(1)
                Q[ia] += torch.einsum("ijce,ijfe->icf", t64, t64)
                Y[ia] += torch.einsum("ijce,je->ic", t64, yb.double())
                if cb.start != ca.start:  # K(b_j, a_i) = K(a_i, b_j)^T
                    R[ib] += t64.sum(0).transpose(-1, -2)
                    A[ib] += norms.sum(0)
                    Q[ib] += torch.einsum("ijec,ijef->jcf", t64, t64)
                    Y[ib] += torch.einsum("ijec,ie->jc", t64, ya.double())
        if comm is not None:
            if R is None:  # a rank without tiles (more ranks than tiles)
                assert self.d is not None
                N, d = len(src), self.d
                R, Q = (torch.zeros(N, d, d, dtype=torch.float64, device=self.device) for _ in range(2))
                Y, yhat = torch.zeros(N, d, dtype=torch.float64, device=self.device), torch.zeros(
                    N, d, dtype=self.dtype, device=self.device)
                A = torch.zeros(N, dtype=torch.float64, device=self.device)
            sums = dist_mod.all_reduce_dict(comm, {"R": R, "Q": Q, "Y": Y, "yhat": yhat, "A": A})
            R, Q, Y, yhat, A = sums["R"], sums["Q"], sums["Y"], sums["yhat"], sums["A"]
            report.merge(comm)
        return R, Q, Y, yhat, A

    def _denoising_sums_approx(self, src: Source, predictions: Tensor | None, dim: int, seed: int,
                               comm: Comm | None = None) -> tuple[Tensor, ...]:
        """Two linear passes: sums S = sum_j G_j, S_y = sum_j G_j^T yhat_j and C = sum_j phi_j^T psi_j from two
        independent projections phi, psi; then R_i = <G_i, S>, Y_i = <G_i, S_y> and Q_i ~ phi_i C psi_i^T.

        Using two independent sketches makes the estimate of Q_i = sum_j K_ij K_ij^T unbiased
        (E[phi_i phi_j^T psi_j psi_i^T] = K_ij K_ji); one sketch used twice would add its variance to Q.
        """
        size = self._auto_chunk(src, "data", None, "kernel", "raw")
        a0, a1 = (min(len(src), size * c) for c in dist_mod.chunk_range(len(src), size, comm))
        stop = a1 if comm is not None else None
        cached = self._cache(src, "data", None, "kernel", "raw", size, a0, stop)

        def chunks() -> Iterator[_Chunk]:
            return iter(cached) if cached is not None else self._chunks(src, "data", None, "kernel", "raw", size, a0,
                                                                        stop)

        def preds(c: _Chunk) -> Tensor:
            return c.y if predictions is None else predictions[c.start : c.start + c.size].to(c.y)

        def sketches(fs: list[Factor]) -> tuple[Tensor, Tensor]:
            return project(fs, dim, seed).double(), project(fs, dim, seed + 7919).double()

        S: dict[str, Tensor] = {}
        Sy: dict[str, Tensor] = {}
        C = None
        def accumulate(c: _Chunk) -> None:
            nonlocal C
            fs = c.groups[_ALL]
            batch_sum(fs, S)
            batch_sum([f.mix(preds(c).unsqueeze(-1)) for f in fs], Sy)
            phi, psi = sketches(fs)  # [B, d, k] each
            cross = torch.einsum("bck,bcl->kl", phi, psi)
            C = cross if C is None else C + cross

        with torch.no_grad():
            with dist_mod.together(comm):
                for c in chunks():
                    accumulate(c)
            if comm is not None:
                if C is None:  # no chunk on this rank: zeros of the right shapes
                    accumulate(self._prepare(src.first(), 0, "data", None, "kernel", "raw"))
                    S, Sy, C = ({k: torch.zeros_like(v) for k, v in S.items()},
                                {k: torch.zeros_like(v) for k, v in Sy.items()}, torch.zeros_like(C))
                sums = dist_mod.all_reduce_dict(comm, {**{"S." + k: v for k, v in S.items()},
                                                       **{"Sy." + k: v for k, v in Sy.items()}, "C": C})
                S = {k[2:]: v for k, v in sums.items() if k.startswith("S.")}
                Sy = {k[3:]: v for k, v in sums.items() if k.startswith("Sy.")}
                C = sums["C"]
            R, Q, Y, yhat = [], [], [], []
            with dist_mod.together(comm):
                for c in chunks():
                    fs = c.groups[_ALL]
                    R.append(inner(fs, S).double())  # R_i[c, e] = sum_j <g_ic, g_je> = <g_ic, S_e>
                    Y.append(inner(fs, Sy)[..., 0].double())
                    phi, psi = sketches(fs)
                    q = phi @ C @ psi.transpose(-1, -2)
                    Q.append(0.5 * (q + q.transpose(-1, -2)))
                    yhat.append(preds(c))
        if comm is None:
            return torch.cat(R), torch.cat(Q), torch.cat(Y), torch.cat(yhat)
        assert self.d is not None
        d = self.d
        empty = (torch.zeros(0, d, d, dtype=torch.float64, device=self.device),) * 2 + (
            torch.zeros(0, d, dtype=torch.float64, device=self.device), torch.zeros(0, d, dtype=self.dtype,
                                                                                   device=self.device))
        local = [torch.cat(p) if p else e for p, e in zip((R, Q, Y, yhat), empty)]
        return tuple(dist_mod.gather_rows(comm, t, a0, len(src)) for t in local)


    # ------------------------------------------------------------------ linearized denoising
    _LINEARIZED_EXACT_MAX = 6000  # rows N d of the exact eigendecomposition (~0.3 GB in float64, a minute on a core)
    _FIT_WARN = 0.5  # ||S y - f|| / ||f - mean f|| above this: the smoother does not describe the network

    def _denoising_linearized(self, data: Any, predictions: Tensor | None, targets: Tensor | None,
                              noise_std: float | None, approximate: bool, landmarks: int, seed: int, smoother: str,
                              group: Any) -> DenoisingReport:
        """``method="linearized"`` of :meth:`denoising` (see :mod:`nnsim.estimators.linearized`)."""
        if smoother not in linearized.SMOOTHERS:
            raise InputError(f"smoother must be one of {linearized.SMOOTHERS}, got {smoother!r}")
        if not isinstance(landmarks, int) or isinstance(landmarks, bool) or landmarks < 1:
            raise InputError(f"landmarks must be a positive integer, got {landmarks!r}")
        src = as_source(data, "data")
        N = len(src)
        arrays = {"targets": targets, "predictions": predictions}
        for name, t in arrays.items():
            if t is None:
                continue
            if not isinstance(t, Tensor) or t.dim() not in (1, 2) or t.shape[0] != N:
                raise InputError(f"{name} must be a [N, d] tensor with N = {N} rows, got "
                                 f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
            if not torch.isfinite(t).all():
                raise InputError(f"{name} contain NaN or Inf")
        if targets is None:
            raise InputError("method='linearized' needs the noisy training targets: denoising(data, targets=y, "
                             "method='linearized'), y [N, d] the labels the network was trained on")
        comm = self._comm(group, "denoising", (src,), (
            dist_mod.params_checksum({k: v for k, v in arrays.items() if v is not None}), noise_std, approximate,
            landmarks, seed, smoother, "linearized"))
        f = (self._forward(src) if predictions is None else predictions.reshape(N, -1)).double()
        y = targets.reshape(N, -1).double().to(f.device)
        d = f.shape[1]
        if y.shape[1] != d:
            raise InputError(f"targets have {y.shape[1]} columns but the analysed output has d = {d}")
        if not approximate:
            if N * d > self._LINEARIZED_EXACT_MAX:
                raise InputError(f"method='linearized' exact needs the eigendecomposition of an [N d, N d] = "
                                 f"[{N * d}, {N * d}] kernel (limit {self._LINEARIZED_EXACT_MAX}); pass "
                                 "approximate=True for the Nystroem version (landmarks=...)")
            spec = linearized.exact_spectrum(self._kernel_matrix(src, src, comm))
        else:
            m = min(landmarks, N)
            idx = torch.randperm(N, generator=torch.Generator().manual_seed(seed))[:m].sort().values
            K_nm = self._kernel_matrix(src, as_source(self._gather(src, idx), "landmarks"), comm)
            K_mm = K_nm.reshape(N, d, m * d)[idx].reshape(m * d, m * d)
            spec = linearized.nystroem_spectrum(K_nm, K_mm)
        fit = linearized.linearized_fit(spec, y, f, smoother, noise_std)
        dtype = self.dtype
        factor = fit.factor_matrix.diagonal(dim1=-2, dim2=-1).sum(-1) / d
        gap = f - fit.smoothed.to(f.device)
        consistency = gap.norm(dim=-1)
        # Where the smoother misses the network's own prediction by more than twice the noise level, the
        # linear model of this sample is not what the network did: do not trust its predicted error.
        untrusted = consistency / math.sqrt(d) > 2 * fit.noise_std
        if fit.fit_error > self._FIT_WARN:
            warnings.warn(f"the {smoother} smoother of the network's kernel reproduces its training predictions only "
                          f"to a relative error of {fit.fit_error:.2f} (> {self._FIT_WARN}): the linearized "
                          "predicted errors are unreliable for this network", RankDeficiencyWarning, stacklevel=3)
        return DenoisingReport(
            fit.factor_matrix.to(dtype), factor.to(dtype), (1.0 / factor).to(dtype), consistency.to(dtype),
            (fit.noise_std * factor.clamp_min(0).sqrt()).to(dtype), untrusted.cpu(), approximate,
            method="linearized", noise_std=fit.noise_std, noise_std_estimated=fit.noise_std_estimated,
            smoother=smoother, lam=fit.lam, dof=fit.trace, fit_error=fit.fit_error)

    def _forward(self, src: Source) -> Tensor:
        """The analysed outputs [N, d] of every sample (no gradients)."""
        parts = []
        for start, batch in src.chunks(self.chunk_size or 1024):
            batch = self._to_device(batch, start, "data")
            with analysis_mode(self.model, self.params), torch.no_grad():
                parts.append(checked_output(self._problem, self.model(*batch), batch, start))
        return torch.cat(parts)

    @staticmethod
    def _gather(src: Source, idx: Tensor) -> Batch:
        """The samples ``idx`` (sorted) of a source, as a tuple of tensors."""
        picked: list[Batch] = []
        for start, batch in src.chunks(1024):
            local = idx[(idx >= start) & (idx < start + batch[0].shape[0])] - start
            if len(local):
                picked.append(tuple(t[local] for t in batch))
        return tuple(torch.cat([p[k] for p in picked]) for k in range(len(picked[0])))

    def _kernel_matrix(self, src_a: Source, src_b: Source, comm: Comm | None) -> Tensor:
        """The unnormalised kernel as a float64 [Na d, Nb d] matrix, row (i, c), column (j, e); summed over ranks."""
        symmetric = src_b is src_a
        report = self._report("kernel")
        M: Tensor | None = None
        with dist_mod.together(comm):
            for ca, cb, tiles in self._sweep(src_a, src_b, symmetric, "kernel", "full", None, report,
                                             ("data", "landmarks"), comm):
                t = tiles[_ALL].double()  # [Ra, Cb, d, d]
                d = t.shape[-1]
                if M is None:
                    M = t.new_zeros(len(src_a) * d, len(src_b) * d)
                ia = slice(ca.start * d, (ca.start + ca.size) * d)
                ib = slice(cb.start * d, (cb.start + cb.size) * d)
                block = t.permute(0, 2, 1, 3).reshape(ca.size * d, cb.size * d)
                M[ia, ib] = block
                if symmetric and cb.start != ca.start:
                    M[ib, ia] = block.T
        if comm is not None:
            if M is None:
                assert self.d is not None
                M = torch.zeros(len(src_a) * self.d, len(src_b) * self.d, dtype=torch.float64, device=self.device)
            M = dist_mod.all_reduce_dict(comm, {"K": M})["K"]
            report.merge(comm)
        assert M is not None
        return M


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

    def merge(self, comm: Comm) -> None:
        """Union of every rank's notes, so that every rank warns about all the samples (once each)."""
        merged_zero: dict[tuple[str, str], set[int]] = {}
        merged_low: dict[tuple[str, str], set[int]] = {}
        for zero, low in dist_mod.all_gather_object(comm, (self.zero, self.deficient)):
            for key, idx in zero.items():
                merged_zero.setdefault(key, set()).update(idx)
            for key, idx in low.items():
                merged_low.setdefault(key, set()).update(idx)
        self.zero = {k: sorted(v) for k, v in sorted(merged_zero.items())}
        self.deficient = {k: sorted(v) for k, v in sorted(merged_low.items())}

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


def _range_chunks(src: Source, size: int, first: int, stop: int) -> Iterator[tuple[int, Batch]]:
    """(global start, batch) chunks of samples [first, stop) cut at multiples of ``size`` from ``first``.

    Tensors are sliced and map-style datasets read through a ``Subset``: only these samples are touched. A
    DataLoader is streamed from its start (its order may come from any sampler), skipping other samples
    without computing anything on them."""
    if first >= stop:
        return
    if src.kind == "tensors":
        for s in range(first, stop, size):
            yield s, tuple(t[s : min(stop, s + size)] for t in src.data)
        return
    if src.kind == "dataset":
        sub = Source(Subset(src.data, range(first, stop)), stop - first, "dataset")
        for s, batch in sub.chunks(size):
            yield first + s, batch
        return
    for s, batch in src.chunks(size):
        if s >= stop:
            return
        if s >= first:
            yield s, tuple(t[: stop - s] for t in batch)
