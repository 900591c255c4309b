"""Enforcing similarity during training: a differentiable criterion on pairs of inputs (docs/method.md,
"Training with the similarity criterion").

Its gradient differentiates the per-sample gradients g(x) (double backward). Instead of one
``autograd.grad(create_graph=True)`` per sample, the structured pass runs with its layer factors kept in the
graph (one forward and d backward passes for the batch) and only the requested pair inner products and
self-norms are evaluated from the factors (Linear: <g_i, g_j> = (a_i . a_j)(delta_i . delta_j)), never the
[B, P] per-sample gradients unless a layer's explicit gradient is the cheaper form.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from . import backends, outputs
from ._model import ParamSelection, analysis_mode, check_model, select_params
from .backends import functorch
from .backends.base import Problem
from .backends.exact_ops import exact_weight_norm
from .errors import InputError, ModelError
from .factors import pair_gram, prepare, self_gram
from .inputs import as_source, check_finite
from .pairs import check as check_pairs

Variant = Literal["one_minus", "authors", "distance"]
BatchMode = Literal["per_pair", "mean_gradient"]
VARIANTS = ("one_minus", "authors", "distance")
_ALIASES = {"enforce": "one_minus", "authors_literal": "authors"}

__all__ = ["SimilarityLoss", "VARIANTS"]
_TARGETS = "__nnsim_targets__"  # the keyword under which labels travel with keyword inputs


class SimilarityLoss:
    """A differentiable similarity criterion on pairs of inputs, to add to the task loss (docs/method.md,
    "Training with the similarity criterion").

    ``reg = SimilarityLoss(model, output=..., variant="one_minus", weight=1.0)``;
    ``loss = task_loss + reg(inputs, pairs)``; ``loss.backward()`` back-propagates through the per-sample
    gradients (double backward). With g_A, g_B the parameter gradients of the analysed output at the two
    inputs of a pair and rho their similarity (the cosine for a scalar output; tr(K~)/d for d > 1 outputs,
    as in :meth:`nnsim.Similarity.similarity`):

    * ``"one_minus"`` (default): mean over pairs of ``1 - rho``. Minimising it *enforces* similarity
      (the paper's stated intent). Alias ``"enforce"``.
    * ``"authors"``: mean of ``+rho``, exactly what the authors' released code adds to the loss. Minimising
      it pushes the pairs' gradients *apart* (docs/method.md, "Training with the similarity criterion"). Alias
      ``"authors_literal"``.
    * ``"distance"``: mean of ``|g_A - g_B|^2 / (|g_A| |g_B|)`` (the authors' disabled alternative; it also
      penalises a norm mismatch). For d > 1 the Frobenius norms of the [d, P] Jacobians are used.

    Args:
        model: any ``nn.Module``. The criterion evaluates it with eval-mode semantics (BatchNorm running
            statistics, no dropout: per-sample gradients are otherwise coupled or random) and restores its
            modes; its task loss is computed by the caller, in whatever mode the caller chooses.
        output: what is compared: ``None`` (the model output flattened to [B, d]), a callable
            ``(model_output, inputs) -> [B, d]`` (e.g. from :mod:`nnsim.outputs`), or ``"posnegflat"``, the
            authors' scalar score s = sum_c m_c log_softmax(z)_c with m = +1 at the sample's label and
            -1/(C-1) elsewhere, which needs ``targets`` in the call (each input uses its own label: the
            authors' mask for same-class pairs; docs/method.md, "Classification outputs").
        params: the parameters whose gradients are compared: ``None`` (all with ``requires_grad``), names,
            glob patterns or submodules. The criterion's gradient flows to every parameter it depends on.
        weight: multiplier of the criterion (the authors use sqrt(batch size) = 1).
        batch_mode: ``"per_pair"`` (mean over pairs of the per-pair criterion) or ``"mean_gradient"`` (the
            authors' behaviour for batches: one criterion between the *mean* gradient of the first elements
            and the mean gradient of the second elements). Identical for a single pair.
        eps: guard of the norms in the denominators: |g_A| |g_B| is replaced by max(|g_A| |g_B|, eps^2)
            (and, for d > 1, eigenvalues of K(x, x) below eps * largest are raised to it).
        backend: ``"auto"`` / ``"structured"`` (layer factors in the graph, exact per-module fallback for
            layers without a rule) or ``"functorch"`` (per-sample Jacobians with ``torch.func``, in the graph).
    """

    def __init__(
        self,
        model: nn.Module,
        output: outputs.OutputFn | Literal["posnegflat"] | None = None,
        params: ParamSelection = None,
        variant: Variant | str = "one_minus",
        weight: float = 1.0,
        *,
        batch_mode: BatchMode = "per_pair",
        eps: float = 1e-8,
        backend: str = "auto",
    ) -> None:
        check_model(model)
        variant = _ALIASES.get(variant, variant) if isinstance(variant, str) else variant
        if variant not in VARIANTS:
            raise InputError(f"variant must be one of {VARIANTS} (or the aliases 'enforce', 'authors_literal'), "
                             f"got {variant!r}")
        if batch_mode not in ("per_pair", "mean_gradient"):
            raise InputError(f"batch_mode must be 'per_pair' or 'mean_gradient', got {batch_mode!r}")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight == weight:
            raise InputError(f"weight must be a finite number, got {weight!r}")
        if not isinstance(eps, (int, float)) or not eps >= 0:
            raise InputError(f"eps must be a number >= 0, got {eps!r}")
        if backend not in ("auto", "structured", "functorch"):
            raise InputError(f"backend must be 'auto', 'structured' or 'functorch', got {backend!r}")
        self.needs_targets = isinstance(output, str)
        if output != "posnegflat" and not (output is None or (callable(output) and not self.needs_targets)):
            raise InputError(f"output must be None, a callable (model_output, inputs) -> [B, d] or 'posnegflat', "
                             f"got {output!r}")
        self.model = model
        self.params = select_params(model, params)
        self.variant, self.batch_mode = variant, batch_mode
        self.weight, self.eps, self.backend = float(weight), float(eps), backend
        if self.needs_targets:
            # The labels travel as a last model input so that every backend slices them with the samples.
            problem = Problem(_WithTargets(model), {"model." + n: p for n, p in self.params.items()}, _posnegflat_score)
        else:
            problem = Problem(model, self.params, outputs.flatten if output is None else output)
        self._problem = problem
        self._num_classes: int | None = None
        if backend == "functorch":
            self._factor_fn: Callable = lambda batch: functorch.factors(problem, batch, graph=True)
        else:
            self._factor_fn = backends.Structured(problem, graph=True).factors

    def __repr__(self) -> str:
        return (f"SimilarityLoss(variant={self.variant!r}, weight={self.weight}, batch_mode={self.batch_mode!r}, "
                f"params={len(self.params)} tensors)")

    def __call__(
        self, inputs: Tensor | tuple[Tensor, ...], pairs: Tensor, targets: Tensor | None = None, *,
        return_similarities: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """The criterion for ``pairs`` (LongTensor [n_pairs, 2] of row indices into ``inputs``): a scalar.

        ``inputs``: the model input [B, ...] (or a tuple of tensors for a multi-input model); ``targets``:
        int64 labels [B], only for ``output="posnegflat"``. Differentiable with respect to the parameters.
        ``return_similarities=True`` also returns the pairs' similarities rho, detached ([n_pairs]; [1] in
        ``batch_mode="mean_gradient"``), at no extra cost, for logging.
        """
        blocks = self._blocks(inputs, pairs, targets)
        term = self.weight * self._criterion(*blocks)
        if return_similarities:
            return term, _similarity(*blocks, self.eps).detach()
        return term

    def pair_similarities(
        self, inputs: Tensor | tuple[Tensor, ...], pairs: Tensor, targets: Tensor | None = None
    ) -> Tensor:
        """The similarity rho of each pair [n_pairs] (differentiable; ``.detach()`` it for logging).

        In ``batch_mode="mean_gradient"``: the single similarity of the two mean gradients, [1].
        """
        return _similarity(*self._blocks(inputs, pairs, targets), self.eps)

    def _criterion(self, cross: Tensor, left: Tensor, right: Tensor) -> Tensor:
        if self.variant == "distance":
            tl, tr_ = _trace(left), _trace(right)
            norm2 = (tl * tr_).clamp_min(self.eps**2)
            return ((tl + tr_ - 2 * _trace(cross)) / norm2.sqrt()).mean()
        rho = _similarity(cross, left, right, self.eps)
        return (1 - rho).mean() if self.variant == "one_minus" else rho.mean()

    def _blocks(self, inputs: Any, pairs: Any, targets: Any) -> tuple[Tensor, Tensor, Tensor]:
        """K(A_p, B_p), K(A_p, A_p), K(B_p, B_p) per pair, [n, d, d] each (mean-gradient mode: n = 1)."""
        if not isinstance(inputs, (Tensor, tuple, Mapping)):
            raise InputError(f"inputs must be a tensor [B, ...], a tuple or a mapping of tensors, got "
                             f"{type(inputs).__name__}")
        src = as_source(inputs, "inputs")  # the checks of Similarity's inputs: tensors, one sample count, not empty
        batch, keys = src.data, src.keys
        check_finite(batch, 0, "inputs")
        self._problem.keys = None if keys is None else keys + ((_TARGETS,) if self.needs_targets else ())
        B = batch[0].shape[0]
        I, J = check_pairs(pairs, B).to(batch[0].device).unbind(1)
        if self.needs_targets:
            t = _check_targets(targets, B, batch[0].device)
            if self._num_classes is None:  # one sample through the model tells the number of classes
                with analysis_mode(self.model, {}), torch.no_grad():
                    first = tuple(x[:1] for x in batch)
                    out = self.model(*first) if keys is None else self.model(**dict(zip(keys, first, strict=True)))
                    self._num_classes = outputs.flatten(out, first).shape[1]
            if bool((t >= self._num_classes).any()):
                raise InputError(f"targets must be class indices in [0, {self._num_classes}), got {int(t.max())}")
            batch = batch + (t,)
        elif targets is not None:
            raise InputError("targets are only used with output='posnegflat'; drop them or change the output")
        # Only the samples that appear in a pair are run through the model.
        used, inv = torch.unique(torch.cat([I, J]), return_inverse=True)
        if used.numel() < B:
            batch = tuple(t[used] for t in batch)
            I, J = inv[: I.numel()], inv[I.numel():]
        with analysis_mode(self.model, self.params):
            with exact_weight_norm(self.model):  # its fused kernel's second derivative is wrong
                factors, y = self._factor_fn(batch)
            # Layers whose explicit per-sample gradient is the cheaper form (e.g. early convolutions) get it once.
            factors = prepare(factors, "full")
            n = I.numel()
            if self.batch_mode == "per_pair":
                self_K = self_gram(factors)
                return pair_gram(factors, I, J), self_K[I], self_K[J]
            # Mean gradients: <mean_p g_Ip, mean_q g_Jq> = mean over (p, q) of K(I_p, J_q), and the norms alike.
            P1, P2 = I.repeat_interleave(n), I.repeat(n)
            Q1, Q2 = J.repeat_interleave(n), J.repeat(n)
            K = pair_gram(factors, torch.cat([P1, P1, Q1]), torch.cat([Q2, P2, Q2]))
            blocks = K.view(3, n * n, *K.shape[1:]).mean(1, keepdim=True)
            return blocks[0], blocks[1], blocks[2]



class _WithTargets(nn.Module):
    """Runs the model on all inputs but the last, which carries the labels to the output spec."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args: Tensor, **kwargs: Tensor) -> Tensor:
        if kwargs:  # keyword inputs: the labels travel under their own name
            return self.model(**{k: v for k, v in kwargs.items() if k != _TARGETS})
        return self.model(*args[:-1])


def _posnegflat_score(out: Any, inputs: tuple[Tensor, ...]) -> Tensor:
    z = outputs.flatten(out, inputs)
    if z.shape[1] < 2:
        raise ModelError("output='posnegflat' needs a classifier with at least two logits")
    t = inputs[_TARGETS] if isinstance(inputs, Mapping) else inputs[-1]
    m = outputs.posnegflat_mask(t, z.shape[1], z.dtype)
    return (m * torch.log_softmax(z, dim=-1)).sum(-1, keepdim=True)


def _check_targets(targets: Any, B: int, device: torch.device) -> Tensor:
    if targets is None:
        raise InputError("output='posnegflat' needs targets: the class label of every input row, int64 [B]")
    if not isinstance(targets, Tensor) or targets.is_floating_point() or targets.dtype == torch.bool:
        raise InputError(f"targets must be an integer tensor of class labels [B], got "
                         f"{getattr(targets, 'dtype', type(targets).__name__)}")
    if targets.shape != (B,):
        raise InputError(f"targets must have shape [{B}] (one label per input row), got {tuple(targets.shape)}")
    if bool((targets < 0).any()):
        raise InputError("targets must be class indices >= 0")
    return targets.to(device=device, dtype=torch.long)


def _trace(K: Tensor) -> Tensor:
    return K.diagonal(dim1=-2, dim2=-1).sum(-1)


def _similarity(cross: Tensor, left: Tensor, right: Tensor, eps: float) -> Tensor:
    """rho = tr(K_AA^-1/2 K_AB K_BB^-1/2) / d per pair (the cosine for d = 1), differentiable: [n]."""
    d = cross.shape[-1]
    if d == 1:
        return cross[:, 0, 0] / (left[:, 0, 0] * right[:, 0, 0]).clamp_min(eps**2).sqrt()
    dtype = cross.dtype
    Ra = _InvSqrtPSD.apply(left.double(), eps)
    Rb = _InvSqrtPSD.apply(right.double(), eps)
    return (_trace(Ra @ cross.double() @ Rb) / d).to(dtype)


class _InvSqrtPSD(torch.autograd.Function):
    """K^-1/2 of symmetric PSD matrices [n, d, d] by eigendecomposition, eigenvalues floored at
    ``rel`` x the largest (a ridge guard: the criterion must stay finite for singular K).

    The backward uses the Daleckii-Krein divided differences of f(l) = l^-1/2,
    (f(l_i) - f(l_j)) / (l_i - l_j) = -1 / (s_i s_j (s_i + s_j)) with s = sqrt(l), which stay finite for
    repeated eigenvalues (autograd through ``eigh`` divides by l_i - l_j and does not).
    """

    @staticmethod
    def forward(ctx: Any, K: Tensor, rel: float) -> Tensor:
        lam, V = torch.linalg.eigh((K + K.mT) / 2)
        top = lam.amax(-1, keepdim=True).clamp_min(torch.finfo(K.dtype).tiny)
        s = lam.clamp_min(max(rel, torch.finfo(K.dtype).eps) * top).sqrt()
        ctx.save_for_backward(V, s)
        return (V / s[..., None, :]) @ V.mT

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        V, s = ctx.saved_tensors
        Gb = V.mT @ grad @ V
        Gb = (Gb + Gb.mT) / 2
        F = -1.0 / (s[..., :, None] * s[..., None, :] * (s[..., :, None] + s[..., None, :]))
        return V @ (Gb * F) @ V.mT, None
