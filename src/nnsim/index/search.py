"""Search of a feature store: candidates by inner product over the shards, then exact re-ranking.

Candidates: FAISS ``IndexFlatIP`` when installed, an exact chunked torch matmul + top-k otherwise, both
streaming one block of one shard at a time. Re-ranking: ``Similarity.similarity`` of each query with its
candidates, grouping queries that share candidates.
"""

from __future__ import annotations

import importlib
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import RankDeficiencyWarning
from ..estimators import TopK
from ..inputs import Batch, Source, as_source
from ..similarity import Similarity
from .features import _FEATURE_BYTES

_SCORE_ELEMS = 2**25  # elements of one [queries, rows] score block
_RERANK_ROWS = 4096  # candidate rows re-ranked in one exact tile


def faiss_module() -> Any:
    try:
        return importlib.import_module("faiss")
    except ImportError:
        return None


def candidates(folder: Path, shards: list[dict[str, Any]], width: int, fq: Tensor, C: int, faiss: Any) -> TopK:
    """Top-C inner products of the query vectors [Q, W] with every stored row, streaming the shards (each
    block's own top-C first, so that no [Q, block] index matrix is made; ties at that cut are arbitrary)."""
    Q = fq.shape[0]
    top = TopK(Q, C, torch.float32, fq.device)
    rows_per_block = max(1, min(_SCORE_ELEMS // Q, _FEATURE_BYTES // (4 * width)))
    fq_np = fq.cpu().numpy() if faiss is not None else None
    for entry in shards:
        array = np.load(folder / entry["file"], mmap_mode="r")  # rows are read from disk only when touched
        zero = torch.tensor(entry.get("zero_rows", []), dtype=torch.long) - entry["start"]
        for a in range(0, array.shape[0], rows_per_block):
            b = min(array.shape[0], a + rows_per_block)
            rows = np.array(array[a:b], dtype=np.float32)  # a writable copy read from disk
            local_zero = zero[(zero >= a) & (zero < b)] - a
            if faiss is not None:
                flat = faiss.IndexFlatIP(width)
                flat.add(rows)
                D, I = flat.search(fq_np, min(b - a, C + len(local_zero)))
                values = torch.from_numpy(D).to(fq.device)
                local = torch.from_numpy(I).long().to(fq.device)
                if len(local_zero):
                    values[torch.isin(local, local_zero.to(fq.device))] = float("-inf")
                values[local < 0] = float("-inf")
            else:
                scores = fq @ torch.from_numpy(rows).to(fq.device).T
                if len(local_zero):
                    scores[:, local_zero.to(fq.device)] = float("-inf")
                values, local = scores.topk(min(C, b - a), dim=1)
            top.update(slice(None), values, local.clamp_min(0) + entry["start"] + a)
    return top


def _readable(dsrc: Source, cand: Tensor, n: int, chunk: int) -> tuple[Source, Tensor | None]:
    """Where the candidates are read: ``dsrc`` itself, or for a loader without random access the candidates of
    the whole block, fetched in one streaming pass, with the map [n] from data indices to their rows."""
    if dsrc.random_access:
        return dsrc, None
    union = sorted(set(cand[cand >= 0].tolist()))
    remap = torch.full((n,), -1, dtype=torch.long)
    remap[torch.tensor(union, dtype=torch.long)] = torch.arange(len(union))
    return as_source(dsrc.take(union, chunk), "data"), remap


def rerank(sim: Similarity, n: int, sample_bytes: int, qbatch: Batch, cand: Tensor, valid: Tensor, dsrc: Source,
           k: int, chunk: int) -> tuple[Tensor, Tensor]:
    """Exact similarities of each query with its candidates [Q, C] (best k first), grouping queries that
    share candidates; ``valid`` [Q] marks the queries with a direction."""
    Q, C = cand.shape
    out_v = torch.full((Q, k), float("nan"), dtype=sim.dtype)
    out_i = torch.full((Q, k), -1, dtype=torch.long)
    cand = cand.cpu()
    # Preparing a sample (its kernel-corrected gradient) costs ~1000x more than one pair of an exact
    # tile (measured: 7-230 us vs 0.02-0.1 us on the digits models), so queries that share candidates are
    # re-ranked together against the union of their candidates, up to ``cap`` rows (also bounded in bytes).
    cap = max(C, min(_RERANK_ROWS, _FEATURE_BYTES // max(1, sample_bytes)))
    source, remap = _readable(dsrc, cand, n, chunk)

    def flush(group: list[int], union: set[int]) -> None:
        ids = sorted(union)
        where = torch.tensor(ids, dtype=torch.long)
        rows = source.take(ids if remap is None else remap[where].tolist(), chunk)
        qs = torch.tensor(group, dtype=torch.long)
        qinput = tuple(t[qs.to(t.device)] for t in qbatch)
        progress = sim.progress
        sim.progress = False
        try:
            with warnings.catch_warnings():  # rank problems were reported once by the feature pass
                warnings.simplefilter("ignore", RankDeficiencyWarning)
                exact = sim.similarity(qinput, rows).cpu()  # [g, |union|]
        finally:
            sim.progress = progress
        cq = cand[qs]
        pos = torch.searchsorted(where, cq.clamp_min(0))
        values = exact.gather(1, pos.clamp_max(len(ids) - 1))
        values[cq < 0] = float("nan")
        scores = torch.nan_to_num(values.float(), nan=float("-inf"))
        kk = min(k, C)
        best = scores.topk(kk, dim=1)
        missing = torch.isneginf(best.values)
        out_v[qs, :kk] = values.gather(1, best.indices).masked_fill(missing, float("nan")).to(sim.dtype)
        out_i[qs, :kk] = cq.gather(1, best.indices).masked_fill(missing, -1)

    group: list[int] = []
    union: set[int] = set()
    order = torch.nonzero(valid.cpu()).flatten()
    order = order[torch.argsort(cand[order, 0], stable=True)]  # neighbouring queries share candidates
    for q in order.tolist():
        mine = set(cand[q][cand[q] >= 0].tolist())
        if not mine:
            continue
        if group and len(union | mine) > cap:
            flush(group, union)
            group, union = [], set()
        group.append(q)
        union |= mine
    if group:
        flush(group, union)
    return out_v, out_i
