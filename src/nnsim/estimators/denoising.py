"""Self-denoising statistics from kernel sums (spec §10): pure tensor algebra.

With K_ij the unnormalised d x d kernel between sample i and reference sample j:
R_i = sum_j K_ij, Q_i = sum_j K_ij K_ij^T and Y_i = sum_j K_ij yhat_j, the weights are
W_ij = R_i^-1 K_ij, the denoising factor D_i = sum_j W_ij W_ij^T = R_i^-1 Q_i R_i^-T, and the
neighbour average of the predictions e_i = R_i^-1 Y_i.

A row is flagged ``ill_conditioned`` when its weights cannot be trusted: R_i (near-)singular, fewer than one
effective neighbour (tr D_i / d > 1: the "average" amplifies the noise), or a kernel sum that nearly cancels,
||sum_j K_ij||_F < CANCELLATION_THRESHOLD * sum_j ||K_ij||_F (exact path only; the sum of norms has no
linear-time form).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from torch import Tensor

CANCELLATION_THRESHOLD = 0.5  # ||sum_j K_ij|| / sum_j ||K_ij|| below this: most of the row's kernel cancels


@dataclass
class DenoisingReport:
    """Per-sample denoising statistics (N samples, d outputs).

    Attributes:
        factor_matrix: [N, d, d] D_i = sum_j W_ij W_ij^T (variance factor; its trace equals that of the
            authors' sum_j W_ij^T W_ij).
        factor: [N] tr(D_i) / d.
        effective_neighbors: [N] 1 / factor: how many neighbours' labels are averaged.
        consistency: [N] |yhat_i - e_i|, e_i the kernel-weighted average of the predictions.
        predicted_error: [N] sigma * sqrt(factor) when a label-noise level sigma was given, else None.
        ill_conditioned: [N] bool, the statistics of the row cannot be trusted (module docstring; for
            ``method="linearized"``: the smoother does not reproduce the network's prediction there,
            |f_i - (S y)_i| > 2 sigma).
        approximate: whether Q_i came from projected features (paper) / a Nystroem kernel (linearized) instead
            of exact tiles.
        singular: [N] bool, R_i (near-)singular and pseudo-inverted (paper method; None for linearized).
        cancellation: [N] ||sum_j K_ij||_F / sum_j ||K_ij||_F in [0, 1] (paper method, exact tiles), else None.
        method: ``"paper"`` (W_ij = R_i^-1 K_ij) or ``"linearized"`` (S = spectral smoother of K).
        noise_std: the label-noise sigma used for ``predicted_error``: given, or estimated (linearized).
        noise_std_estimated: the linearized estimate of sigma (also when a sigma was given), else None.
        smoother, lam, dof, fit_error: linearized only: the filter, its fitted parameter, tr S, and
            ||S y - f|| / ||f - mean f|| (how well the smoother reproduces the network).
    """

    factor_matrix: Tensor
    factor: Tensor
    effective_neighbors: Tensor
    consistency: Tensor
    predicted_error: Tensor | None
    ill_conditioned: Tensor
    approximate: bool = False
    singular: Tensor | None = None
    cancellation: Tensor | None = None
    method: str = "paper"
    noise_std: float | None = None
    noise_std_estimated: float | None = None
    smoother: str | None = None
    lam: float | None = None
    dof: float | None = None
    fit_error: float | None = None

    def __repr__(self) -> str:
        """Shapes and medians, not the tensors (N can be large)."""
        n, d = len(self.factor), self.factor_matrix.shape[-1]

        def med(t: Tensor) -> str:
            finite = t[torch.isfinite(t)]
            return f"{float(finite.double().median()):.4g}" if len(finite) else "nan"

        noise = "" if self.predicted_error is None else f", predicted_error median {med(self.predicted_error)}"
        return (f"DenoisingReport(N={n}, d={d}, approximate={self.approximate}, factor_matrix [{n}, {d}, {d}], "
                f"effective_neighbors median {med(self.effective_neighbors)}, consistency median "
                f"{med(self.consistency)}{noise}, ill_conditioned {int(self.ill_conditioned.sum())})")

    def to_dict(self) -> dict[str, Tensor]:
        """A plain dict of tensors (no pandas)."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if isinstance(getattr(self, f.name), Tensor)}

    def to_csv(self, path: str | Path) -> None:
        """One row per sample: index, the scalar fields, and the factor matrix entries D_ab."""
        d = self.factor_matrix.shape[-1]
        cols = ["factor", "effective_neighbors", "consistency"] + (
            ["predicted_error"] if self.predicted_error is not None else []) + ["ill_conditioned"] + (
            ["cancellation"] if self.cancellation is not None else [])
        data = [getattr(self, c).detach().cpu() for c in cols]
        D = self.factor_matrix.detach().cpu().reshape(len(self.factor), -1)
        with open(path, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["index"] + cols + [f"D_{a}{b}" for a in range(d) for b in range(d)])
            for i in range(len(self.factor)):
                w.writerow([i] + [_fmt(x[i]) for x in data] + [repr(float(v)) for v in D[i]])


def _fmt(v: Tensor) -> str:
    return str(bool(v)) if v.dtype == torch.bool else repr(float(v))


def denoising_from_sums(
    R: Tensor, Q: Tensor, Y: Tensor, yhat: Tensor, noise_std: float | None = None, rtol: float | None = None,
    approximate: bool = False, norm_sum: Tensor | None = None,
) -> DenoisingReport:
    """Assemble the report from R [N, d, d], Q [N, d, d], Y [N, d] and the predictions yhat [N, d].

    ``norm_sum`` [N]: sum_j ||K_ij||_F (exact tiles), which enables the cancellation flag.

    R_i is not symmetric in general: it is inverted by a pseudo-inverse with a relative singular-value
    threshold (not the symmetric procedure used for K(x, x)), and flagged when ill-conditioned.
    """
    R64, Q64, Y64 = R.double(), Q.double(), Y.double()
    rtol = (1e-10 if R.dtype == torch.float64 else 1e-5) if rtol is None else rtol
    Rinv = torch.linalg.pinv(R64, rtol=rtol)
    sv = torch.linalg.svdvals(R64)
    ill = sv[..., -1] <= rtol * sv[..., 0]
    D = Rinv @ Q64 @ Rinv.transpose(-1, -2)
    D = 0.5 * (D + D.transpose(-1, -2))
    d = R.shape[-1]
    factor = D.diagonal(dim1=-2, dim2=-1).sum(-1) / d
    e = (Rinv @ Y64.unsqueeze(-1)).squeeze(-1)
    consistency = (yhat.double() - e).norm(dim=-1)
    dtype = R.dtype
    predicted = None if noise_std is None else (noise_std * factor.clamp_min(0).sqrt()).to(dtype)
    cancellation = None
    untrusted = ill | (factor > 1)
    if norm_sum is not None:
        cancellation = R64.flatten(1).norm(dim=1) / norm_sum.double().clamp_min(torch.finfo(torch.float64).tiny)
        untrusted = untrusted | (cancellation < CANCELLATION_THRESHOLD)
        cancellation = cancellation.to(dtype)
    return DenoisingReport(D.to(dtype), factor.to(dtype), (1.0 / factor).to(dtype), consistency.to(dtype),
                           predicted, untrusted, approximate, singular=ill, cancellation=cancellation,
                           noise_std=None if noise_std is None else float(noise_std))
