"""Streaming reductions of similarity tiles: neighbour counts and exact top-k, never the N x M matrix."""

from __future__ import annotations

import torch
from torch import Tensor


def row_statistic(tile: Tensor, method: str, threshold: float | None = None, power: float | None = None) -> Tensor:
    """Per-entry contribution of a similarity tile [R, C] to a neighbour count (spec §9.1).

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


class TopK:
    """Exact running top-k of the rows of a [Q, M] score matrix fed tile by tile (columns in increasing order);
    ties go to the lowest index."""

    def __init__(self, rows: int, k: int, dtype: torch.dtype, device: torch.device) -> None:
        self.k = k
        self.values = torch.full((rows, k), float("-inf"), dtype=dtype, device=device)
        self.indices = torch.full((rows, k), -1, dtype=torch.long, device=device)

    def update(self, rows: slice, tile: Tensor, col_start: int) -> None:
        """Merge a tile [R, C] whose columns are data indices col_start .. col_start + C - 1."""
        scores = torch.nan_to_num(tile, nan=float("-inf"))
        cols = torch.arange(col_start, col_start + tile.shape[1], device=tile.device).expand(tile.shape[0], -1)
        values = torch.cat([self.values[rows], scores], dim=1)
        indices = torch.cat([self.indices[rows], cols], dim=1)
        k = min(self.k, values.shape[1])
        top = values.topk(min(k + 1, values.shape[1]), dim=1)
        order = top.indices[:, :k]
        # torch.topk breaks ties arbitrarily. Among equal similarities the lowest index must win, whatever the
        # tiling or the number of processes whose lists are merged afterwards: rows with a finite tie among
        # their k + 1 best are re-ordered by a stable sort (kept entries have lower indices than the tile's
        # columns, which arrive in increasing order). Ties are rare; a sort of every row costs ~5x a topk.
        tv = top.values
        ties = ((tv[:, 1:] == tv[:, :-1]) & torch.isfinite(tv[:, 1:])).any(1)
        if bool(ties.any()):
            order = order.clone()
            order[ties] = values[ties].argsort(dim=1, descending=True, stable=True)[:, :k]
        self.values[rows] = values.gather(1, order)
        self.indices[rows] = indices.gather(1, order)

    def result(self) -> tuple[Tensor, Tensor]:
        """(values [Q, k], indices [Q, k]); missing neighbours are NaN with index -1."""
        missing = torch.isinf(self.values) & (self.values < 0)
        return self.values.masked_fill(missing, float("nan")), self.indices.masked_fill(missing, -1)
