"""The k most similar samples, exact: tiles of the similarity reduced by a running top-k (bounded memory)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..distributed import Ranks, topk_lowest_index
from ..engine import ALL, Chunker, Form, Quantity, RankReport, Request, sweep
from ..inputs import Source


def top_k(chunker: Chunker, src: Source, ref: Source, k: int, *, same: bool, exclude_self: bool, ranks: Ranks
          ) -> tuple[Tensor, Tensor]:
    """(similarities [Q, k], indices [Q, k]) of the k samples of ``ref`` most similar to each of ``src``
    (``same``: ``ref`` is ``src``, swept as a triangle; ``exclude_self`` then skips each sample itself)."""
    report = RankReport("neighbors", int(chunker.fisher))
    top = TopK(len(src), k, chunker.dtype, chunker.device)  # a process without tiles keeps it empty
    with ranks.together():
        for ca, cb, tiles in sweep(chunker, src, ref, Request(Quantity.SIMILARITY, Form.TRACE), report,
                                   ("queries", "data"), symmetric=same, plan=ranks.tiles, progress=ranks.progress):
            t = tiles[ALL]
            if same and exclude_self and ca.start == cb.start:
                t.fill_diagonal_(float("nan"))
            top.update(ca.rows, t, cb.start)
            if same and cb.start != ca.start:
                top.update(cb.rows, t.T, ca.start)
    top.values, top.indices = ranks.topk(top.values, top.indices, k)
    ranks.merge(report)
    report.emit()
    return top.result()


class TopK:
    """Exact running top-k of the rows of a [Q, M] score matrix fed tile by tile, in any order; among equal
    scores the lowest index wins (whatever the tiling, and as :meth:`nnsim.distributed.Ranks.topk` merges)."""

    def __init__(self, rows: int, k: int, dtype: torch.dtype, device: torch.device) -> None:
        self.k = k
        self.values = torch.full((rows, k), float("-inf"), dtype=dtype, device=device)
        self.indices = torch.full((rows, k), -1, dtype=torch.long, device=device)

    def update(self, rows: slice, tile: Tensor, cols: int | Tensor) -> None:
        """Merge a tile [R, C] (NaN: no candidate) whose columns are the data indices ``cols`` [R, C], or
        cols .. cols + C - 1 for an int."""
        scores = torch.nan_to_num(tile, nan=float("-inf"))
        if isinstance(cols, int):
            cols = torch.arange(cols, cols + tile.shape[1], device=tile.device).expand(tile.shape[0], -1)
        values = torch.cat([self.values[rows], scores], dim=1)
        indices = torch.cat([self.indices[rows], cols], dim=1)
        k = min(self.k, values.shape[1])
        top = values.topk(min(k + 1, values.shape[1]), dim=1)
        v, i = top.values[:, :k].clone(), indices.gather(1, top.indices[:, :k])
        # torch.topk breaks ties arbitrarily: rows with a finite tie among their k + 1 best are re-ordered by
        # index, then stably by score. Ties are rare; sorting every row costs ~5x a topk.
        tv = top.values
        ties = ((tv[:, 1:] == tv[:, :-1]) & torch.isfinite(tv[:, 1:])).any(1)
        if bool(ties.any()):
            v[ties], i[ties] = topk_lowest_index(values[ties], indices[ties], k)
        self.values[rows], self.indices[rows] = v, i

    def result(self) -> tuple[Tensor, Tensor]:
        """(values [Q, k], indices [Q, k]); missing neighbours are NaN with index -1."""
        missing = torch.isinf(self.values) & (self.values < 0)
        return self.values.masked_fill(missing, float("nan")), self.indices.masked_fill(missing, -1)
