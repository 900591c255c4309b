"""Self-denoising statistics from kernel sums (spec §10): pure tensor algebra.

With K_ij the unnormalised d x d kernel between sample i and reference sample j:
R_i = sum_j K_ij, Q_i = sum_j K_ij K_ij^T and Y_i = sum_j K_ij yhat_j, the weights are
W_ij = R_i^-1 K_ij, the denoising factor D_i = sum_j W_ij W_ij^T = R_i^-1 Q_i R_i^-T, and the
neighbour average of the predictions e_i = R_i^-1 Y_i.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from torch import Tensor


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
        ill_conditioned: [N] bool, R_i = sum_j K_ij was (near-)singular and pseudo-inverted.
        approximate: whether Q_i came from projected features instead of exact tiles.
    """

    factor_matrix: Tensor
    factor: Tensor
    effective_neighbors: Tensor
    consistency: Tensor
    predicted_error: Tensor | None
    ill_conditioned: Tensor
    approximate: bool = False

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
            ["predicted_error"] if self.predicted_error is not None else []) + ["ill_conditioned"]
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
    approximate: bool = False,
) -> DenoisingReport:
    """Assemble the report from R [N, d, d], Q [N, d, d], Y [N, d] and the predictions yhat [N, d].

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
    return DenoisingReport(D.to(dtype), factor.to(dtype), (1.0 / factor).to(dtype), consistency.to(dtype),
                           predicted, ill, approximate)
