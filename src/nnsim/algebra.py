"""Pure tensor algebra of the similarity kernels (docs/method.md, "Kernels", "Normalisation", "Influence",
"Output metrics").

Nothing here knows about modules, data or files: every function maps tensors to tensors.
Shapes use B for a batch of samples and d for the number of analysed outputs.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from .errors import InputError

Singular = Literal["pinv", "raise", "ridge"]


def default_rtol(dtype: torch.dtype) -> float:
    """Relative eigenvalue threshold of the rank guard (docs/method.md, "Normalisation"): looser for float32."""
    return 1e-10 if dtype == torch.float64 else 1e-5


def _eigh_psd(K: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetrise and eigendecompose in float64: the matrices are only d x d, accuracy is free."""
    S = K.to(torch.float64)
    S = 0.5 * (S + S.transpose(-1, -2))
    return torch.linalg.eigh(S)


def _spectral_fn(
    K: Tensor, power: float, rtol: float | None, atol: float, singular: Singular, ridge: float
) -> tuple[Tensor, Tensor]:
    lam, V = _eigh_psd(K)
    rtol = default_rtol(K.dtype) if rtol is None else rtol
    lam_max = lam.amax(dim=-1, keepdim=True).clamp_min(0.0)
    tau = torch.clamp(rtol * lam_max, min=atol)
    keep = lam > tau
    # A zero matrix has lam_max = 0 = tau: nothing is kept and its rank is 0.
    rank = keep.sum(dim=-1)
    if singular == "raise" and bool((rank < K.shape[-1]).any()):
        flat = rank.reshape(-1)
        bad = torch.nonzero(flat < K.shape[-1]).flatten().tolist()
        raise ValueError(
            f"K(x, x) is rank-deficient for batch entries {bad[:20]} (flat indices; ranks "
            f"{flat[bad[:20]].tolist()}); "
            "use singular='pinv' to normalise on its range or singular='ridge' to regularise"
        )
    if singular == "ridge":
        phi = (lam.clamp_min(0.0) + ridge) ** power
        rank = torch.full_like(rank, K.shape[-1])
    else:
        phi = torch.where(keep, lam.clamp_min(torch.finfo(lam.dtype).tiny) ** power, torch.zeros_like(lam))
    out = (V * phi.unsqueeze(-2)) @ V.transpose(-1, -2)
    return out.to(K.dtype), rank


def inv_sqrt_psd(
    K: Tensor,
    rtol: float | None = None,
    atol: float = 0.0,
    singular: Singular = "pinv",
    ridge: float = 1e-6,
) -> tuple[Tensor, Tensor]:
    """Pseudo-inverse square root of symmetric PSD matrices with a rank guard (docs/method.md, "Normalisation").

    Args:
        K: [..., d, d] symmetric positive semi-definite.
        rtol, atol: eigenvalues at or below ``max(atol, rtol * lambda_max)`` count as zero.
        singular: "pinv" (zero on the null space), "raise", or "ridge" ((lambda + ridge)^-1/2).

    Returns:
        (K^-1/2 [..., d, d] in K's dtype, numerical rank [...] as int64).
    """
    return _spectral_fn(K, -0.5, rtol, atol, singular, ridge)


def pinv_psd(
    K: Tensor, rtol: float | None = None, atol: float = 0.0, singular: Singular = "pinv", ridge: float = 1e-6
) -> tuple[Tensor, Tensor]:
    """Guarded pseudo-inverse of symmetric PSD matrices [..., d, d]; returns (K^+, rank) (docs/method.md,
    "Influence")."""
    return _spectral_fn(K, -1.0, rtol, atol, singular, ridge)


def sqrt_psd(M: Tensor) -> Tensor:
    """Symmetric PSD square root [..., d, d] by eigendecomposition.

    Eigenvalues at rounding level (below d * eps(M.dtype) * lambda_max) count as zero: their square roots
    would otherwise be ~1e-8 in float64 and break exact null spaces such as the Fisher metric's.
    """
    lam, V = _eigh_psd(M)
    tau = M.shape[-1] * torch.finfo(M.dtype).eps * lam.amax(dim=-1, keepdim=True).clamp_min(0.0)
    root = torch.where(lam > tau, lam.clamp_min(0.0).sqrt(), torch.zeros_like(lam))
    return ((V * root.unsqueeze(-2)) @ V.transpose(-1, -2)).to(M.dtype)


def normalize_kernel(K_ab: Tensor, inv_sqrt_a: Tensor, inv_sqrt_b: Tensor) -> Tensor:
    """K~(x, x') = K(x,x)^-1/2 K(x,x') K(x',x')^-1/2 for a tile.

    Args:
        K_ab: [N, M, d, d]; inv_sqrt_a: [N, d, d]; inv_sqrt_b: [M, d, d].
    """
    return inv_sqrt_a.unsqueeze(1) @ K_ab @ inv_sqrt_b.unsqueeze(0)


def trace_summary(K: Tensor, denominator: int | None = None) -> Tensor:
    """Tr(K) / d over the last two axes (the paper's scalar summary, docs/method.md, "Kernels")."""
    d = K.shape[-1] if denominator is None else denominator
    return torch.diagonal(K, dim1=-2, dim2=-1).sum(-1) / d


def influence_from_kernel(K_ab: Tensor, pinv_a: Tensor) -> Tensor:
    """Asymmetric move transfer from x = a_i to x' = b_j: K(x', x) K(x, x)^+ (docs/method.md, "Influence").

    Args:
        K_ab: [N, M, d, d] with K_ab[i, j] = K(a_i, b_j); pinv_a: [N, d, d] = K(a_i, a_i)^+.

    Returns:
        [N, M, d, d]; for d = 1 this is k(x, x') / |g(x)|^2 = k^C(x -> x').
    """
    return K_ab.transpose(-1, -2) @ pinv_a.unsqueeze(1)


def softmax_fisher(logits: Tensor) -> Tensor:
    """Fisher information metric of the categorical distribution in logit coordinates (docs/method.md, "Output
    metrics").

    Args:
        logits: [B, C]. Returns: [B, C, C] = diag(p) - p p^T with p = softmax(logits).
    """
    p = torch.softmax(logits.to(torch.float64), dim=-1)
    F = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)
    return F.to(logits.dtype)


def check_metric(M: Tensor, d: int) -> Tensor:
    """Validate a user-supplied output metric: a symmetric PSD d x d tensor (else :class:`InputError`,
    a ``ValueError`` subclass)."""
    if not isinstance(M, Tensor) or M.shape != (d, d):
        shape = tuple(M.shape) if isinstance(M, Tensor) else type(M).__name__
        raise InputError(f"metric must be a ({d}, {d}) tensor for an output of dimension d = {d}, got {shape}")
    if not torch.isfinite(M).all():
        raise InputError("metric contains NaN or Inf")
    M64 = M.to(torch.float64)
    scale = M64.abs().max().clamp_min(1e-300)
    if (M64 - M64.T).abs().max() > 1e-6 * scale:
        raise InputError("metric must be symmetric (M == M.T)")
    if torch.linalg.eigvalsh(M64).min() < -1e-8 * scale:
        raise InputError("metric must be positive semi-definite (it has a negative eigenvalue)")
    return M
