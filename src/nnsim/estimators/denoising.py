"""Self-denoising statistics (docs/method.md, "Self-denoising"): the paper's factor from kernel sums (exact
tiles or two sketched linear passes), and the linearized estimator's orchestration.

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
import math
import warnings
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from torch import Tensor

from ..distributed import Ranks
from ..engine import ALL, Chunk, Chunker, Form, Quantity, RankReport, Request, sweep
from ..errors import InputError, RankDeficiencyWarning
from ..factors import Factor, batch_sum, inner, project
from ..inputs import Source, as_source
from . import linearized

CANCELLATION_THRESHOLD = 0.5  # ||sum_j K_ij|| / sum_j ||K_ij|| below this: most of the row's kernel cancels
SECOND_SKETCH_SEED = 7919  # seed offset of the second projection: any fixed offset makes it independent
LINEARIZED_EXACT_MAX = 6000  # rows N d of the exact eigendecomposition (~0.3 GB in float64, a minute on a core)
FIT_WARN = 0.5  # ||S y - f|| / ||f - mean f|| above this: the smoother does not describe the network


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


def paper(chunker: Chunker, src: Source, predictions: Tensor | None, noise_std: float | None, approximate: bool,
          dim: int, seed: int, *, ranks: Ranks) -> DenoisingReport:
    """The paper's W_ij = (sum_l K_il)^-1 K_ij statistics, exact by tiles or from sketched sums."""
    R, Q, Y, yhat, norm_sum = approximate_sums(chunker, src, predictions, dim, seed, ranks) if approximate else \
        exact_sums(chunker, src, predictions, ranks)
    report = denoising_from_sums(R, Q, Y, yhat, noise_std, chunker.rtol, approximate, norm_sum)
    assert report.singular is not None
    if bool(report.singular.any()):
        idx = torch.nonzero(report.singular).flatten().tolist()
        warnings.warn(f"{len(idx)} sample(s) have a (near-)singular kernel row sum sum_j K_ij: pseudo-inverted, "
                      f"their denoising statistics are unreliable. Samples: {idx[:20]}", RankDeficiencyWarning,
                      stacklevel=3)
    return report


def check(chunker: Chunker, data: object, method: str, predictions: Tensor | None, targets: Tensor | None,
          approximate: bool, dim: int, smoother: str, landmarks: int) -> Source:
    """The data's source, after refusing arguments ``method`` does not take or cannot use (measures d when
    the paper's predictions need it)."""
    linear = method == "linearized"
    if linear and smoother not in linearized.SMOOTHERS:
        raise InputError(f"smoother must be one of {linearized.SMOOTHERS}, got {smoother!r}")
    if linear and (not isinstance(landmarks, int) or isinstance(landmarks, bool) or landmarks < 1):
        raise InputError(f"landmarks must be a positive integer, got {landmarks!r}")
    if not linear and targets is not None:
        raise InputError("targets are used by method='linearized' only; the paper's factor is label-free "
                         "(pass method='linearized' to estimate sigma from the targets)")
    if not linear and approximate and not (isinstance(dim, int) and dim >= 1):
        raise InputError(f"dim must be a positive integer (the projection size of approximate=True), got {dim!r}")
    src = as_source(data, "data")
    N = len(src)
    for name, t in (("targets", targets), ("predictions", predictions)):
        if t is not None and (not isinstance(t, Tensor) or t.dim() not in ((1, 2) if linear else (2,))
                              or t.shape[0] != N):
            raise InputError(f"{name} must be a [N, d] tensor with N = {N} rows, got "
                             f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
        if t is not None and not torch.isfinite(t).all():
            raise InputError(f"{name} contain NaN or Inf")
    if linear and targets is None:
        raise InputError("method='linearized' needs the noisy training targets: denoising(data, targets=y, "
                         "method='linearized'), y [N, d] the labels the network was trained on")
    if not linear and predictions is not None:
        if chunker.d is None:  # the output dimension is known after one sample's factors
            chunker.prepare(src.first(), 0, "data", Request(Quantity.KERNEL, Form.RAW))
        if predictions.shape[1] != chunker.d:
            raise InputError(f"predictions have {predictions.shape[1]} columns but the analysed output has "
                             f"d = {chunker.d}: pass a [N, {chunker.d}] tensor")
    return src


def exact_sums(chunker: Chunker, src: Source, predictions: Tensor | None, ranks: Ranks) -> tuple[Tensor, ...]:
    """R = sum_j K_ij, Q = sum_j K_ij K_ij^T, Y = sum_j K_ij yhat_j, yhat and A = sum_j ||K_ij||_F (exact tiles)."""
    report = RankReport("kernel", int(chunker.fisher))
    sums: dict[str, Tensor] = {}
    with ranks.together():
        for ca, cb, tiles in sweep(chunker, src, src, Request(Quantity.KERNEL, Form.FULL), report, ("data", "data"),
                                   symmetric=True, plan=ranks.tiles, progress=ranks.progress):
            t = tiles[ALL]  # [Ra, Cb, d, d], t[i, j] = K(a_i, b_j)
            if not sums:
                N, d = len(src), t.shape[-1]
                sums = {"R": t.new_zeros(N, d, d, dtype=torch.float64), "Q": t.new_zeros(N, d, d, dtype=torch.float64),
                        "Y": t.new_zeros(N, d, dtype=torch.float64), "yhat": t.new_zeros(N, d),
                        "A": t.new_zeros(N, dtype=torch.float64)}
            _add_tile(sums, ca, cb, t, predictions)
    sums = ranks.sum(sums)  # (a kernel sweep notes no ranks: nothing to merge into the report)
    return sums["R"], sums["Q"], sums["Y"], sums["yhat"], sums["A"]


def _add_tile(sums: dict[str, Tensor], ca: Chunk, cb: Chunk, t: Tensor, predictions: Tensor | None) -> None:
    R, Q, Y, A = (sums[k] for k in "RQYA")
    ia, ib = ca.rows, cb.rows
    ya = ca.y if predictions is None else predictions[ia].to(t)
    yb = cb.y if predictions is None else predictions[ib].to(t)
    if cb.start == ca.start:  # each row's diagonal tile is swept exactly once, by one process
        sums["yhat"][ia] = ya
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


def approximate_sums(chunker: Chunker, src: Source, predictions: Tensor | None, dim: int, seed: int, ranks: Ranks
                     ) -> tuple[Tensor, ...]:
    """Two linear passes: sums S = sum_j G_j, S_y = sum_j G_j^T yhat_j and C = sum_j phi_j^T psi_j from two
    independent projections phi, psi; then R_i = <G_i, S>, Y_i = <G_i, S_y> and Q_i ~ phi_i C psi_i^T.

    Using two independent sketches makes the estimate of Q_i = sum_j K_ij K_ij^T unbiased
    (E[phi_i phi_j^T psi_j psi_i^T] = K_ij K_ji); one sketch used twice would add its variance to Q.
    """
    request = Request(Quantity.KERNEL, Form.RAW)
    size = chunker.chunk_size_for(src, "data", request)
    a0, a1 = ranks.samples(len(src), size)

    def preds(c: Chunk) -> Tensor:
        return c.y if predictions is None else predictions[c.start : c.start + c.size].to(c.y)

    def sketches(fs: list[Factor]) -> tuple[Tensor, Tensor]:
        return project(fs, dim, seed).double(), project(fs, dim, seed + SECOND_SKETCH_SEED).double()

    S: dict[str, Tensor] = {}
    Sy: dict[str, Tensor] = {}
    C: dict[str, Tensor] = {}
    with torch.no_grad():
        with ranks.together():  # (reading, and caching, the chunks may fail on one rank)
            chunks = chunker.reader(src, "data", request, size, a0, a1)
            for c in chunks():
                fs = c.groups[ALL]
                batch_sum(fs, S)
                batch_sum([f.mix(preds(c).unsqueeze(-1)) for f in fs], Sy)
                phi, psi = sketches(fs)  # [B, d, k] each
                cross = torch.einsum("bck,bcl->kl", phi, psi)
                C["C"] = cross if "C" not in C else C["C"] + cross
        S, Sy, C = ranks.sum(S), ranks.sum(Sy), ranks.sum(C)
        R, Q, Y, yhat = [], [], [], []
        with ranks.together():
            for c in chunks():
                fs = c.groups[ALL]
                R.append(inner(fs, S).double())  # R_i[c, e] = sum_j <g_ic, g_je> = <g_ic, S_e>
                Y.append(inner(fs, Sy)[..., 0].double())
                phi, psi = sketches(fs)
                q = phi @ C["C"] @ psi.transpose(-1, -2)
                Q.append(0.5 * (q + q.transpose(-1, -2)))
                yhat.append(preds(c))
    return (*(ranks.rows(p, a0, len(src)) for p in (R, Q, Y, yhat)), None)  # no norm sums: no cancellation flag


def linearized_report(chunker: Chunker, src: Source, predictions: Tensor | None, targets: Tensor,
                      noise_std: float | None, approximate: bool, landmarks: int, seed: int, smoother: str, *,
                      ranks: Ranks) -> DenoisingReport:
    """``method="linearized"`` (see :mod:`nnsim.estimators.linearized`), on checked arguments."""
    N = len(src)
    f = (chunker.forward(src) if predictions is None else predictions.reshape(N, -1)).double()
    y = targets.reshape(N, -1).double().to(f.device)
    d = f.shape[1]
    if y.shape[1] != d:
        raise InputError(f"targets have {y.shape[1]} columns but the analysed output has d = {d}")
    if not approximate:
        if N * d > LINEARIZED_EXACT_MAX:
            raise InputError(f"method='linearized' exact needs the eigendecomposition of an [N d, N d] = "
                             f"[{N * d}, {N * d}] kernel (limit {LINEARIZED_EXACT_MAX}); pass "
                             "approximate=True for the Nystroem version (landmarks=...)")
        spec = linearized.exact_spectrum(kernel_matrix(chunker, src, src, ranks))
    else:
        m = min(landmarks, N)
        idx = torch.randperm(N, generator=torch.Generator().manual_seed(seed))[:m].sort().values
        K_nm = kernel_matrix(chunker, src, as_source(src.take(idx.tolist()), "landmarks"), ranks)
        K_mm = K_nm.reshape(N, d, m * d)[idx].reshape(m * d, m * d)
        spec = linearized.nystroem_spectrum(K_nm, K_mm)
    fit = linearized.linearized_fit(spec, y, f, smoother, noise_std)
    dtype = chunker.dtype
    factor = fit.factor_matrix.diagonal(dim1=-2, dim2=-1).sum(-1) / d
    consistency = (f - fit.smoothed.to(f.device)).norm(dim=-1)
    # Where the smoother misses the network's own prediction by more than twice the noise level, the
    # linear model of this sample is not what the network did: do not trust its predicted error.
    untrusted = consistency / math.sqrt(d) > 2 * fit.noise_std
    if fit.fit_error > FIT_WARN:
        warnings.warn(f"the {smoother} smoother of the network's kernel reproduces its training predictions only "
                      f"to a relative error of {fit.fit_error:.2f} (> {FIT_WARN}): the linearized "
                      "predicted errors are unreliable for this network", RankDeficiencyWarning, stacklevel=3)
    return DenoisingReport(
        fit.factor_matrix.to(dtype), factor.to(dtype), (1.0 / factor).to(dtype), consistency.to(dtype),
        (fit.noise_std * factor.clamp_min(0).sqrt()).to(dtype), untrusted.cpu(), approximate,
        method="linearized", noise_std=fit.noise_std, noise_std_estimated=fit.noise_std_estimated,
        smoother=smoother, lam=fit.lam, dof=fit.trace, fit_error=fit.fit_error)


def kernel_matrix(chunker: Chunker, src_a: Source, src_b: Source, ranks: Ranks) -> Tensor:
    """The unnormalised kernel as a float64 [Na d, Nb d] matrix, row (i, c), column (j, e); summed over ranks."""
    symmetric = src_b is src_a
    report = RankReport("kernel", int(chunker.fisher))
    out: dict[str, Tensor] = {}
    with ranks.together():
        for ca, cb, tiles in sweep(chunker, src_a, src_b, Request(Quantity.KERNEL, Form.FULL), report,
                                   ("data", "landmarks"), symmetric=symmetric, plan=ranks.tiles,
                                   progress=ranks.progress):
            t = tiles[ALL].double()  # [Ra, Cb, d, d]
            d = t.shape[-1]
            if not out:
                out["K"] = t.new_zeros(len(src_a) * d, len(src_b) * d)
            ia, ib = slice(ca.start * d, (ca.start + ca.size) * d), slice(cb.start * d, (cb.start + cb.size) * d)
            block = t.permute(0, 2, 1, 3).reshape(ca.size * d, cb.size * d)
            out["K"][ia, ib] = block
            if symmetric and cb.start != ca.start:
                out["K"][ib, ia] = block.T
    return ranks.sum(out)["K"]
