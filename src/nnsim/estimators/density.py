"""Neighbour counts (docs/method.md, "Density and neighbour counts"): soft by two linear passes over the
kernel-corrected gradients, or any method by tiles with streaming row reductions, never the N x M matrix."""

from __future__ import annotations

import math

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..distributed import Ranks
from ..engine import ALL, Chunker, Form, Quantity, RankReport, Request, sweep
from ..errors import InputError
from ..factors import batch_sum, inner, self_gram
from ..inputs import Source


def check_args(method: str, normalized: bool, threshold: float | None, power: float | None, algorithm: str) -> None:
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


def row_statistic(tile: Tensor, method: str, threshold: float | None = None, power: float | None = None) -> Tensor:
    """Per-entry contribution of a similarity tile [R, C] to a neighbour count.

    NaN entries (excluded pairs, zero gradients) contribute nothing.
    """
    if method == "soft":
        v = tile
    elif method == "hard":
        v = (tile > threshold).to(tile.dtype)  # strict, as the authors' count
    elif method == "less_soft":
        v = tile.clamp_min(0.0) ** power
    else:
        raise ValueError(f"unknown method {method!r}")
    return torch.nan_to_num(v, nan=0.0)


def soft_linear(chunker: Chunker, src: Source, ref: Source, *, normalized: bool, include_self: bool, ranks: Ranks
                ) -> Tensor:
    """sum_j tr K~(x_i, x_j) / d_eff (or tr K) [N]: S = sum_j U_j in one pass, <U_i, S> in a second."""
    request = Request(Quantity.SIMILARITY if normalized else Quantity.KERNEL, Form.RAW)
    report = RankReport("density", int(chunker.fisher))
    size = chunker.chunk_size_for(src, "data", request)
    # Processes split both passes by chunks: S is summed between them, the scores gathered after.
    f0, f1 = ranks.samples(len(ref), size)
    a0, a1 = ranks.samples(len(src), size)
    S: dict[str, Tensor] = {}
    with torch.no_grad():
        with ranks.together():  # (reading, and caching, the chunks may fail on one rank)
            refs = chunker.reader(ref, "reference", request, size, f0, f1)
            for c in tqdm(refs(), total=-(-(f1 - f0) // size), disable=not ranks.progress, desc="nnsim density: sum",
                          unit="chunk"):
                batch_sum(c.groups[ALL], S)
        S = ranks.sum(S)
        scored = refs() if ref is src else chunker.chunks(src, "data", request, size, a0, a1)
        out = torch.empty(a1 - a0, dtype=chunker.dtype, device=chunker.device)
        with ranks.together():
            for c in tqdm(scored, total=-(-(a1 - a0) // size), disable=not ranks.progress,
                          desc="nnsim density: score", unit="chunk"):
                report.add("data", c)
                fs = c.groups[ALL]
                score = inner(fs, S).diagonal(dim1=-2, dim2=-1).sum(-1)
                if not include_self:
                    score = score - self_gram(fs).diagonal(dim1=-2, dim2=-1).sum(-1)
                score = score / chunker.d_eff
                if normalized:
                    score[c.rank[ALL] == 0] = float("nan")
                out[c.start - a0 : c.start - a0 + c.size] = score
    out = ranks.rows([out], a0, len(src))
    ranks.merge(report)
    report.emit()
    return out


def by_tiles(chunker: Chunker, src: Source, ref: Source, *, same: bool, method: str, threshold: float | None,
             power: float | None, include_self: bool, normalized: bool, ranks: Ranks) -> Tensor:
    """Any count by tiles of the [N, M] similarity (symmetric when ``same``), [N]."""
    report = RankReport("density", int(chunker.fisher))
    out = torch.zeros(len(src), dtype=torch.float64, device=chunker.device)
    quantity = Quantity.SIMILARITY if normalized else Quantity.KERNEL  # only method="soft" allows normalized=False
    with ranks.together():
        for ca, cb, tiles in sweep(chunker, src, ref, Request(quantity, Form.TRACE), report, ("data", "reference"),
                                   symmetric=same, plan=ranks.tiles, progress=ranks.progress):
            t = tiles[ALL] if normalized else tiles[ALL] / chunker.d_eff
            if same and not include_self and ca.start == cb.start:
                t.fill_diagonal_(float("nan"))
            v = row_statistic(t, method, threshold, power).double()
            out[ca.rows] += v.sum(1)
            if same and cb.start != ca.start:
                out[cb.rows] += v.sum(0)
    out = ranks.sum({"counts": out})["counts"].to(chunker.dtype)
    ranks.merge(report)
    report.emit()
    zero = report.zero.get(("data", ALL), [])  # every row chunk is swept by some rank: all zero-gradient rows
    out[torch.tensor(zero, dtype=torch.long, device=out.device)] = float("nan")
    return out
