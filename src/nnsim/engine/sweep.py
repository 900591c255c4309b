"""The one tile sweep: chunk pairs of two sources over a tile plan, with the second source's chunks cached when
they fit, and the dense pairwise results assembled from it."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .. import algebra
from ..errors import ResultTooLargeError
from ..factors import gram
from ..inputs import Source
from .chunks import Chunk, Chunker, restarted_on_resize
from .rank_report import RankReport
from .request import Form, Quantity, Request

Segments = list[tuple[int, int, int]]  # (row chunk i, first column chunk, end column chunk)
Plan = Callable[[int, int, bool], Segments]  # (row chunks, column chunks, symmetric) -> the tiles to sweep


def tile(ca: Chunk, cb: Chunk, g: str, request: Request, d_eff: int) -> Tensor:
    """The tile of group ``g`` between two chunks: [Ra, Cb] (trace) or [Ra, Cb, d, d] (full)."""
    with torch.no_grad():
        t = gram(ca.groups[g], cb.groups[g], request.form.value)
        if request.quantity is Quantity.SIMILARITY:
            t = _normalised(t, ca.scale.get(g), cb.scale.get(g))
            if request.form is Form.TRACE:
                t = t / d_eff
            t[ca.rank[g] == 0] = float("nan")
            t[:, cb.rank[g] == 0] = float("nan")
        elif request.quantity is Quantity.INFLUENCE:
            t = algebra.influence_from_kernel(t, ca.pinv[g])
            t[ca.rank[g] == 0] = float("nan")
    return t


def _normalised(t: Tensor, left: Tensor | None, right: Tensor | None) -> Tensor:
    """A Gram tile of factors left unmixed on one or both sides (``Chunk.scale``) made the tile of the mixed
    factors: K~_ij = L_i^T K_ij R_j, L and R the sides' K(x, x)^-1/2 [B, d, d] (identity where None).

    t: [B1, B2] (trace, d = 1 only) or [B1, B2, d, d] (full); a new tensor of the same shape."""
    if left is None and right is None:
        return t
    d = (left if left is not None else right).shape[-1]
    if d == 1:
        lead = (-1,) + (1,) * (t.dim() - 1)
        if left is not None:
            t = t * left.reshape(lead)
        if right is not None:
            t = t * right.reshape((1, -1) + (1,) * (t.dim() - 2))
        return t
    if left is not None:
        t = torch.einsum("ica,ijce->ijae", left, t)
    if right is not None:
        t = torch.einsum("ijae,jeb->ijab", t, right)
    return t


def sweep(chunker: Chunker, src_a: Source, src_b: Source, request: Request, report: RankReport,
          names: tuple[str, str] = ("xa", "xb"), *, symmetric: bool, plan: Plan | None = None, progress: bool = True
          ) -> Iterator[tuple[Chunk, Chunk, dict[str, Tensor]]]:
    """Yield (chunk a, chunk b, {group: tile}) for the tiles of ``plan`` (default: every tile), row segment by row
    segment.

    Symmetric sweeps (``src_b`` is ``src_a``) visit only tiles with cb.start >= ca.start. Every chunk swept is
    added to ``report`` once (columns too when not symmetric).

    A first chunk that finds its kept sizing too large for the chunk budget (:class:`~nnsim.engine.chunks.Resized`:
    its model's kept plan failed its check on it, and the new plan's factors are larger) comes before any tile:
    the sweep then starts again at the size measured on that chunk (the new plan is kept by the backend)."""
    return restarted_on_resize(
        lambda resize: _sweep(chunker, src_a, src_b, request, report, names, symmetric, plan, progress, resize))


def _sweep(chunker: Chunker, src_a: Source, src_b: Source, request: Request, report: RankReport,
           names: tuple[str, str], symmetric: bool, plan: Plan | None, progress: bool, resize: bool
           ) -> Iterator[tuple[Chunk, Chunk, dict[str, Tensor]]]:
    size = chunker.chunk_size_for(src_a, names[0], request, restarts=True)
    n_a, n_b = math.ceil(len(src_a) / size), math.ceil(len(src_b) / size)
    segments = plan(n_a, n_b, symmetric) if plan else [(i, i if symmetric else 0, n_b) for i in range(n_a)]
    if not segments:
        return
    name_b = names[0] if src_b is src_a else names[1]
    c0, c1 = min(s[1] for s in segments), max(s[2] for s in segments)
    r0, r1 = segments[0][0], segments[-1][0] + 1
    if symmetric:  # rows and columns come from the same chunks; every row index is below its columns
        c0 = min(c0, r0)
    # The second argument is swept once per row chunk: keep its factors when they fit.
    cache = chunker.cached(src_b, name_b, request, size, c0 * size, c1 * size, partners=len(src_a), resize=resize)

    def columns(j0: int, j1: int) -> Iterator[Chunk]:
        if cache is not None:
            return iter(cache[j0 - c0 : j1 - c0])
        # re-prepared for every row chunk: paired with one chunk each time
        return chunker.chunks(src_b, name_b, request, size, j0 * size, j1 * size, partners=size)

    if symmetric and cache is not None:
        rows = columns(r0, r1)
    else:  # symmetric: src_a is src_b and names[0] its name
        rows = chunker.chunks(src_a, names[0], request, size, r0 * size, r1 * size, partners=len(src_b),
                              resize=resize)
    total = sum(j1 - j0 for _, j0, j1 in segments)
    seen_b: set[int] = set()
    label = f"nnsim {request.quantity.value}"
    with tqdm(total=total, disable=not progress or total < 2, desc=label, unit="tile") as bar:
        for (i, j0, j1), ca in zip(segments, rows, strict=True):
            assert ca.start == i * size
            report.add(names[0], ca)
            for cb in columns(j0, j1):
                # An influence column is defined whatever its K(x', x') (a zero gradient is moved by nothing).
                if not symmetric and cb.start not in seen_b and request.quantity is not Quantity.INFLUENCE:
                    seen_b.add(cb.start)
                    report.add(names[1], cb)
                yield ca, cb, {g: tile(ca, cb, g, request, chunker.d_eff) for g in ca.groups}
                bar.update(1)


def pairwise(chunker: Chunker, src_a: Source, src_b: Source, request: Request, report: RankReport, *,
             symmetric: bool, max_bytes: int, progress: bool) -> dict[str, Tensor]:
    """Every tile of ``src_a`` x ``src_b`` assembled into dense results {group: [N, M(, d, d)]}, refused above
    ``max_bytes``."""
    results: dict[str, Tensor] = {}
    for ca, cb, tiles in sweep(chunker, src_a, src_b, request, report, symmetric=symmetric, progress=progress):
        if not results:  # d is known now
            N, M, d = len(src_a), len(src_b), chunker.d
            shape = (N, M) + ((d, d) if request.form is Form.FULL else ())
            need = math.prod(shape) * (torch.finfo(chunker.dtype).bits // 8) * len(tiles)
            if need > max_bytes:
                raise ResultTooLargeError(
                    f"the result would take {need / 2**30:.2f} GiB (N={N}, M={M}, d={d}, {len(tiles)} "
                    f"group(s)) > max_result_bytes = {max_bytes / 2**30:.2f} GiB; use reduce='trace' "
                    "for an [N, M] summary, split the inputs, or raise max_result_bytes")
            results = {g: torch.empty(shape, dtype=chunker.dtype, device=chunker.device) for g in tiles}
        for g, t in tiles.items():
            results[g][ca.rows, cb.rows] = t
            if symmetric and cb.start != ca.start:
                t = t.transpose(0, 1)
                results[g][cb.rows, ca.rows] = t.transpose(-1, -2) if request.form is Form.FULL else t
    return results
