"""``Similarity``: the one entry point to the network's view of input similarity."""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import Tensor, nn

from . import algebra, backends, distributed, outputs
from ._model import ParamSelection, check_model, select_params
from .backends.base import Problem
from .engine import ALL, Chunker, Form, Quantity, RankReport, Request, pairwise
from .errors import InputError
from .estimators import DenoisingReport, denoising, density, neighbors
from .factors import Factor, project
from .inputs import Batch, Source, as_source, sample_signature

Metric = Literal["euclidean", "fisher"] | Tensor
By = Literal["layer"] | None


def _setting(name: str, doc: str) -> property:
    """An attribute kept by the engine's :class:`~nnsim.engine.Chunker` (read when chunks are made)."""
    return property(lambda self: getattr(self._chunker, name), lambda self, v: setattr(self._chunker, name, v),
                    doc=doc)


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
        rtol, atol: rank guard of K(x, x)^-1/2 (docs/method.md, "Normalisation"; rtol defaults to 1e-5 in
            float32, 1e-10 in float64).
        singular: ``"pinv"`` (normalise on the range), ``"raise"`` or ``"ridge"``.
        max_result_bytes: refuse dense results larger than this (suggesting ``reduce="trace"``).
        cache_bytes: keep the factors of the second argument in memory up to this size instead of
            recomputing them for every chunk of the first.

    The dataset-scale methods (:meth:`density`, :meth:`neighbors`, :meth:`denoising`) take ``group``, a
    ``torch.distributed`` process group (default: the initialised default group, if any; ``False``: this
    process alone): every rank passes the same arguments (they are not broadcast: under torchrun every rank
    runs the same script), computes its share and gets the full result (``docs/scaling.md``).
    """

    def __init__(
        self,
        model: nn.Module,
        output: outputs.OutputFn | None = None,
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
        self.output = outputs.flatten if output is None else output
        self.params = select_params(model, params)
        self.metric, self.backend, self.progress, self.max_result_bytes = metric, backend, progress, max_result_bytes
        self._problem = Problem(model, self.params, self.output)
        self._factor_fn = backends.make(backend, self._problem)
        self._chunker = Chunker(model, self.params, self._problem, self._factor_fn, metric, backend, chunk_size, rtol,
                                atol, singular, cache_bytes)
        self.device, self.dtype = self._chunker.device, self._chunker.dtype

    chunk_size = _setting("chunk_size", "samples per chunk (None: measured)")
    rtol = _setting("rtol", "relative rank guard of K(x, x)^-1/2 (None: by dtype)")
    atol = _setting("atol", "absolute rank guard of K(x, x)^-1/2")
    singular = _setting("singular", "'pinv', 'raise' or 'ridge'")
    cache_bytes = _setting("cache_bytes", "bytes of the second argument's factors kept in memory")

    @property
    def d(self) -> int | None:
        """The output dimension, measured by a first computation (None before)."""
        return self._chunker.d

    def self_kernel(self, x: Any) -> Tensor:
        """K(x, x) for every sample: [N, d, d] (with the output metric applied)."""
        chunks = self._chunker.chunks(as_source(x, "x"), "x", Request(Quantity.KERNEL, Form.FULL))
        return torch.cat([c.K[ALL] for c in chunks])

    def rank(self, x: Any) -> Tensor:
        """Numerical rank of K(x, x) per sample [N] (d for full rank; 0 for a zero gradient)."""
        return algebra.inv_sqrt_psd(self.self_kernel(x), self.rtol, self.atol)[1]

    def kernel(self, xa: Any, xb: Any = None, *, by: By = None) -> Tensor | dict[str, Tensor]:
        """Unnormalised K(xa_i, xb_j) = G(xa_i) G(xb_j)^T: [N, M, d, d] (``xb=None``: xa against itself).

        ``by="layer"``: a dict {module name: [N, M, d, d]} of per-layer terms that sum to the kernel.
        """
        return self._pairwise(xa, xb, Quantity.KERNEL, Form.FULL, by)

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
        return self._pairwise(xa, xb, Quantity.SIMILARITY, Form.TRACE if reduce == "trace" else Form.FULL, by)

    def influence(self, xa: Any, xb: Any = None) -> Tensor:
        """Asymmetric move transfer from xa_i to xb_j: K(xb_j, xa_i) K(xa_i, xa_i)^+, [N, M, d, d].

        The output move produced at xb_j by the smallest parameter change that moves f(xa_i) by v is
        ``influence[i, j] @ v`` (first order). For d = 1: k(x, x') / |g(x)|^2.
        """
        return self._pairwise(xa, xb, Quantity.INFLUENCE, Form.FULL, None)

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
        """Neighbour count of each sample of ``data`` among ``reference`` (default: ``data``), [N]
        (docs/method.md, "Density and neighbour counts").

        * ``"soft"``: sum_j sim(x_i, x_j) (``normalized=False``: sum_j tr K(x_i, x_j) / d). Linear time and
          matrix-free: one pass accumulates S = sum_j U_j (kernel-corrected gradients) per parameter, a
          second scores <U_i, S>; memory O(P d) plus one chunk. ``algorithm="tiles"`` sums tiles instead.
        * ``"hard"``: #{j : sim(x_i, x_j) > threshold} (strict). ``"less_soft"``: sum_j max(sim, 0)^power.
          Both exact by tiles with streaming row reductions, never holding the N x M matrix.

        ``include_self=False`` drops j = i (only meaningful when ``reference`` is ``data``). Samples with a
        zero gradient get NaN (with a warning) and contribute nothing to the others' counts.

        ``group`` (class docstring): soft: each rank its chunks, then one all-reduce of S; tiles: a balanced
        share of the tiles, then one all-reduce of the counts.
        """
        density.check_args(method, normalized, threshold, power, algorithm)
        same = reference is None or reference is data
        if not include_self and not same:
            raise InputError("include_self=False needs reference=None (the self-term exists only when the data "
                             "are their own reference)")
        src, ref = self._sources(data, None if same else reference, ("data", "reference"))
        ranks = self._ranks(group, "density", (src, ref), (method, normalized, threshold, power, include_self,
                                                            algorithm, same))
        if method == "soft" and algorithm != "tiles":
            return density.soft_linear(self._chunker, src, ref, normalized=normalized, include_self=include_self,
                                       ranks=ranks)
        return density.by_tiles(self._chunker, src, ref, same=same, method=method, threshold=threshold, power=power,
                                include_self=include_self, normalized=normalized, ranks=ranks)

    def neighbors(
        self, queries: Any, data: Any = None, k: int = 10, exclude_self: bool = False, *, group: Any = None
    ) -> tuple[Tensor, Tensor]:
        """The k samples of ``data`` most similar to each query: (similarities [Q, k], indices [Q, k]).

        Exact, by tiles with a running top-k (bounded memory). ``data=None`` searches the queries
        themselves; ``exclude_self`` then skips each query's own index. Queries with a zero gradient get
        NaN similarities and index -1. Among equal similarities the lowest index comes first.

        ``group`` (class docstring): each rank sweeps its share of the tiles (a shard of the data, or of the
        triangle when ``data=None``), then the ranks' top-k lists are merged exactly.
        """
        same = data is None or data is queries
        src, ref = self._sources(queries, None if same else data, ("queries", "data"))
        limit = len(ref) - (1 if same and exclude_self else 0)
        if not isinstance(k, int) or not 1 <= k <= limit:
            raise InputError(f"k must be an integer in [1, {limit}], got {k!r}")
        ranks = self._ranks(group, "neighbors", (src, ref), (k, exclude_self, same))
        return neighbors.top_k(self._chunker, src, ref, k, same=same, exclude_self=exclude_self, ranks=ranks)

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
        """Self-denoising statistics of each sample of ``data`` with respect to ``data`` (docs/method.md,
        "Self-denoising").

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

        ``group`` (class docstring): the exact tiles (or, approximate, the chunks of both passes) are spread
        over the ranks and the per-sample sums all-reduced.
        """
        if isinstance(self.metric, Tensor) or self._chunker.fisher:
            raise InputError("denoising is derived for a squared loss on the outputs: use metric='euclidean'")
        if noise_std is not None and not (isinstance(noise_std, (int, float)) and math.isfinite(noise_std)
                                          and noise_std >= 0):
            raise InputError(f"noise_std must be a non-negative number, got {noise_std!r}")
        if method not in ("paper", "linearized"):
            raise InputError(f"method must be 'paper' or 'linearized', got {method!r}")
        src = denoising.check(self._chunker, data, method, predictions, targets, approximate, dim, smoother, landmarks)
        arrays = {k: v for k, v in (("predictions", predictions), ("targets", targets)) if v is not None}
        ranks = self._ranks(group, "denoising", (src,), (distributed.params_checksum(arrays), noise_std, approximate,
                                                          dim, landmarks, seed, smoother, method))
        if method == "paper":
            return denoising.paper(self._chunker, src, predictions, noise_std, approximate, dim, seed, ranks=ranks)
        assert targets is not None
        return denoising.linearized_report(self._chunker, src, predictions, targets, noise_std, approximate,
                                           landmarks, seed, smoother, ranks=ranks)

    def features(self, x: Any, dim: int = 1024, seed: int = 0, normalized: bool = True) -> Tensor:
        """Seeded random projections of the per-sample (kernel-corrected if ``normalized``) gradients.

        Returns [N, d, k] with E <phi(x)_c, phi(x')_e> = K~(x, x')_ce (or K): per layer a Kronecker-structured
        Gaussian projection to about ``dim`` dimensions (layers smaller than ``dim`` are kept exact), never
        stored. The same seed gives the same projection in any process.
        """
        if not isinstance(dim, int) or dim < 1:
            raise InputError(f"dim must be a positive integer, got {dim!r}")
        request = Request(Quantity.SIMILARITY if normalized else Quantity.KERNEL, Form.RAW)
        parts = []
        for c in self._chunker.chunks(as_source(x, "x"), "x", request):
            with torch.no_grad():
                parts.append(project(c.groups[ALL], dim, seed))
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
        chunk = self._chunker.prepare(batch, start, name, Request(Quantity.SIMILARITY, Form.RAW))
        return chunk.groups[ALL], chunk.rank[ALL]

    def chunk_size_for(self, x: Any) -> int:
        """Samples per chunk for the per-sample factors of ``x`` (``chunk_size`` when set, else measured; a sizing
        kept from an earlier ``Similarity`` of the model is checked on a 2-sample probe first, so that chunks of
        this size keep the memory budget even when the kept plan turns out stale)."""
        return self._chunker.chunk_size_for(as_source(x, "x"), "x", Request(Quantity.SIMILARITY, Form.RAW))

    @property
    def d_eff(self) -> int:
        """The rank of a full-rank normalised kernel: d (outputs), or d - 1 with ``metric="fisher"``.

        The scalar similarity is tr(K~) / d_eff. Known after a first computation (raises before)."""
        if self.d is None:
            raise InputError("d_eff is known after a first computation (the output dimension is measured)")
        return self._chunker.d_eff

    def describe(self) -> dict[str, str]:
        """How each layer is computed by the structured backend (after a first call)."""
        fn = self._factor_fn
        plan = getattr(getattr(fn, "__self__", None), "plan", None)
        return plan.describe() if plan is not None else {}

    def _sources(self, xa: Any, xb: Any, names: tuple[str, str] = ("xa", "xb")) -> tuple[Source, Source]:
        src_a = as_source(xa, names[0])
        src_b = src_a if xb is None else as_source(xb, names[1])
        if src_b is not src_a:
            sa, sb = sample_signature(src_a.first(), src_a.keys), sample_signature(src_b.first(), src_b.keys)
            if sa != sb:
                raise InputError(f"{names[0]} and {names[1]} samples differ: {names[0]} has (shape, dtype) {sa}, "
                                 f"{names[1]} has {sb}; both must be valid inputs of the same model")
        return src_a, src_b

    def _ranks(self, group: Any, op: str, sources: tuple[Source, ...], args: Any) -> distributed.Ranks:
        return distributed.for_call(group, op, sources, self.params, args, self.device, self.progress)

    def _pairwise(self, xa: Any, xb: Any, quantity: Quantity, form: Form, by: By) -> Tensor | dict[str, Tensor]:
        if by not in (None, "layer"):
            raise InputError(f"by must be None or 'layer', got {by!r}")
        src_a, src_b = self._sources(xa, xb)
        request = Request(quantity, form, by_layer=by == "layer")
        report = RankReport(request.quantity.value, int(self._chunker.fisher))
        results = pairwise(self._chunker, src_a, src_b, request, report, max_bytes=self.max_result_bytes,
                           symmetric=xb is None and quantity is not Quantity.INFLUENCE, progress=self.progress)
        report.emit()
        return results[ALL] if by is None else results
