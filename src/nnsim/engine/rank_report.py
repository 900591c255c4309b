"""The one report of zero-gradient and rank-deficient samples: collected while chunks are prepared, merged
across processes, then one warning per kind naming the samples."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from ..errors import RankDeficiencyWarning
from .chunks import Chunk

Notes = dict[tuple[str, str], list[int]]  # (side, group) -> sample indices


class RankReport:
    """Zero-gradient and rank-deficient samples, one warning per kind, side and group at the end.

    ``label``: what was computed (named in the default ``effect`` of a zero gradient); ``nullity``: the
    rank a full-rank K(x, x) lacks by construction (1 for the Fisher metric); ``stacklevel``: of the
    warnings, from :meth:`emit`'s caller's caller."""

    def __init__(self, label: str, nullity: int = 0, effect: str | None = None, stacklevel: int = 4) -> None:
        self.nullity, self.stacklevel = nullity, stacklevel
        self.effect = effect or f"their {label} values are NaN"
        self.zero: Notes = {}
        self.deficient: Notes = {}

    def note(self, side: str, group: str, start: int, rank: Tensor, full: int) -> None:
        """Record the samples start + i whose rank[i] is 0 or below ``full``."""
        zero = torch.nonzero(rank == 0).flatten() + start
        low = torch.nonzero((rank > 0) & (rank < full)).flatten() + start
        if len(zero):
            self.zero.setdefault((side, group), []).extend(zero.tolist())
        if len(low):
            self.deficient.setdefault((side, group), []).extend(low.tolist())

    def add(self, side: str, chunk: Chunk) -> None:
        for g, r in chunk.rank.items():
            self.note(side, g, chunk.start, r, chunk.K[g].shape[-1] - self.nullity)

    def notes(self) -> tuple[Notes, Notes]:
        return self.zero, self.deficient

    def merge(self, parts: list[tuple[Notes, Notes]]) -> None:
        """Replace the notes by the union of ``parts`` (every process's :meth:`notes`), so that every process
        warns about all the samples (once each)."""
        merged: tuple[dict, dict] = ({}, {})
        for part in parts:
            for into, notes in zip(merged, part):
                for key, idx in notes.items():
                    into.setdefault(key, set()).update(idx)
        self.zero, self.deficient = ({k: sorted(v) for k, v in sorted(m.items())} for m in merged)

    def emit(self, show: Callable[..., None] = warnings.warn) -> None:
        for notes, what, why in ((self.zero, "a zero gradient", f" (no direction): {self.effect}"),
                                 (self.deficient, "a rank-deficient K(x, x)",
                                  ": normalised on its range (self-similarity rank/d < 1)")):
            for (side, g), idx in notes.items():
                where = f" in layer {g!r}" if g else ""
                show(f"{len(idx)} sample(s) of {side} have {what}{where}{why}. Samples: {sorted(set(idx))[:20]}",
                     RankDeficiencyWarning, stacklevel=self.stacklevel)
