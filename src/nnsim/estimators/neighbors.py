"""The k most similar samples, exact: tiles of the similarity reduced by a running top-k (bounded memory)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..distributed import Ranks
from ..engine import ALL, Chunker, Form, Quantity, RankReport, Request, sweep
from ..inputs import Source


def top_k(chunker: Chunker, src: Source, ref: Source, k: int, *, same: bool, exclude_self: bool, ranks: Ranks,
          progress: bool) -> tuple[Tensor, Tensor]:
    """(similarities [Q, k], indices [Q, k]) of the k samples of ``ref`` most similar to each of ``src``
    (``same``: ``ref`` is ``src``, swept as a triangle; ``exclude_self`` then skips each sample itself)."""
    report = RankReport("neighbors", int(chunker.fisher))
    top: TopK | None = None
    with ranks.together():
        for ca, cb, tiles in sweep(chunker, src, ref, Request(Quantity.SIMILARITY, Form.TRACE), report,
                                   ("queries", "data"), symmetric=same, plan=ranks.tiles, progress=progress):
            t = tiles[ALL]
            if top is None:
                top = TopK(len(src), k, t.dtype, t.device)
            if same and exclude_self and ca.start == cb.start:
                t.fill_diagonal_(float("nan"))
            top.update(ca.rows, t, cb.start)
            if same and cb.start != ca.start:
                top.update(cb.rows, t.T, ca.start)
    if top is None:  # a process without tiles (more processes than tiles)
        top = TopK(len(src), k, chunker.dtype, chunker.device)
    top.values, top.indices = ranks.topk(top.values, top.indices, k)
    ranks.merge(report)
    report.emit()
    return top.result()


class TopK:
    """Exact running top-k of the rows of a [Q, M] score matrix fed tile by tile (columns in increasing order);
    ties go to the lowest index."""

    def __init__(self, rows: int, k: int, dtype: torch.dtype, device: torch.device) -> None:
        self.k = k
        self.values = torch.full((rows, k), float("-inf"), dtype=dtype, device=device)
        self.indices = torch.full((rows, k), -1, dtype=torch.long, device=device)

    def update(self, rows: slice, tile: Tensor, col_start: int = 0, indices: Tensor | None = None) -> None:
        """Merge a tile [R, C] whose columns are data indices col_start .. col_start + C - 1, or ``indices``
        [R, C] (any order, e.g. a search library's candidates)."""
        scores = torch.nan_to_num(tile, nan=float("-inf"))
        cols = indices if indices is not None else torch.arange(
            col_start, col_start + tile.shape[1], device=tile.device).expand(tile.shape[0], -1)
        values = torch.cat([self.values[rows], scores], dim=1)
        indices = torch.cat([self.indices[rows], cols], dim=1)
        k = min(self.k, values.shape[1])
        top = values.topk(min(k + 1, values.shape[1]), dim=1)
        order = top.indices[:, :k]
        # torch.topk breaks ties arbitrarily. Among equal similarities the lowest index must win, whatever the
        # tiling or the number of processes whose lists are merged afterwards: rows with a finite tie among
        # their k + 1 best are sorted by index, then stably by value. Ties are rare; a sort of every row costs
        # ~5x a topk.
        tv = top.values
        ties = ((tv[:, 1:] == tv[:, :-1]) & torch.isfinite(tv[:, 1:])).any(1)
        if bool(ties.any()):
            order = order.clone()
            by_index = indices[ties].argsort(dim=1, stable=True)
            by_value = values[ties].gather(1, by_index).argsort(dim=1, descending=True, stable=True)
            order[ties] = by_index.gather(1, by_value[:, :k])
        self.values[rows] = values.gather(1, order)
        self.indices[rows] = indices.gather(1, order)

    def result(self) -> tuple[Tensor, Tensor]:
        """(values [Q, k], indices [Q, k]); missing neighbours are NaN with index -1."""
        missing = torch.isinf(self.values) & (self.values < 0)
        return self.values.masked_fill(missing, float("nan")), self.indices.masked_fill(missing, -1)
