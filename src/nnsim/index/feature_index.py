"""``FeatureIndex``: projected similarity features on disk, for repeated neighbour queries on large data.

Each sample x is stored as phi(x) = vec(P U(x)) / sqrt(d_eff) (:mod:`nnsim.index.features`), so a plain
inner product of stored rows estimates the scalar similarity tr K~(x, x') / d_eff. This module is the
public facade: argument checks, and the checks that tie a store to a model, its settings and its data;
:mod:`~nnsim.index.build` writes stores (lock, resume, data digest), :mod:`~nnsim.index.search` reads them
(candidates by inner product, exact re-ranking), :mod:`~nnsim.index.store` is the file format.
"""

from __future__ import annotations

import math
import warnings
import weakref
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..errors import InputError, RankDeficiencyWarning
from ..inputs import Source, TensorSource, as_source
from ..similarity import Similarity
from . import build as bd
from . import features as ft
from . import search as sr
from . import store
from .features import model_fingerprint

__all__ = ["DEFAULT_DIM", "FeatureIndex", "default_candidates", "model_fingerprint"]

# Defaults: numbers per row (``dim=None``) and candidates per query (``candidates=None``). Measured with
# benchmarks/bench_index.py (docs/benchmarks.md, "FeatureIndex recall"): with dim = 1024, centred CountSketch
# rows, the exact top-10 is among the top-100 candidates for >= 0.999 of the neighbours on the demo (trained
# digits CNN, d = 10) and the untrained benchmark MLP (Fashion-MNIST, d = 10), and among the top-50 for
# >= 0.997; the benchmark CNN: see the table. Re-ranking more candidates is cheaper than a wider row (disk
# and scan time grow with dim; re-ranking costs one gradient per candidate).
DEFAULT_DIM = 1024


def default_candidates(k: int) -> int:
    """Candidates re-ranked per query when ``candidates=None`` (see the measurements above)."""
    return max(10 * k, 100)


Backend = Literal["auto", "faiss", "torch"]


class FeatureIndex:
    """Projected similarity features of a data set in an on-disk store, searchable by inner product.

    Build with :meth:`build`, reopen with :meth:`open`, query with :meth:`search`, measure with :meth:`recall`.
    A row holds ``width`` = ``dim`` + 1 numbers: a CountSketch of the sample's kernel-corrected gradient (all
    layers and outputs together) and its exact inner product with the centre (:mod:`nnsim.index.features`);
    when d x P <= ``dim`` the gradient itself is stored (width d P + 1) and estimates are exact.
    """

    def __init__(self, path: Path, sim: Similarity, manifest: dict[str, Any]) -> None:
        self.path, self.sim, self.manifest = path, sim, manifest
        cfg, layout = manifest["config"], manifest["layout"]
        self.n: int = cfg["n"]
        self.dim: int = cfg["dim"]
        self.seed: int = cfg["seed"]
        self.dtype: str = cfg["dtype"]
        self.shard_size: int = cfg["shard_size"]
        self.width: int = layout["width"]
        self.zero_rows = sorted(r for e in manifest["shards"] for r in e.get("zero_rows", []))
        sig = cfg.get("input_signature") or []
        self._sample_bytes = sum(math.prod(shape) * _itemsize(dtype) for shape, dtype in sig)
        # Tensor data already checked against the digests -> weak references to those very tensors: an entry counts
        # only while they are alive (a freed tensor's id and address can be reused by other data).
        self._verified: dict[tuple[Any, ...], tuple[weakref.ref, ...]] = {}

    def __len__(self) -> int:
        return self.n

    def __repr__(self) -> str:
        return (f"FeatureIndex({str(self.path)!r}, n={self.n}, dim={self.dim}, seed={self.seed}, width={self.width}, "
                f"dtype={self.dtype}, shards={len(self.manifest['shards'])})")

    # ------------------------------------------------------------------ build / open
    @classmethod
    def build(cls, sim: Similarity, data: Any, path: str | Path, dim: int | None = None, *, seed: int = 0,
              shard_size: int | None = None, dtype: Literal["float32", "float16"] = "float16",
              overwrite: bool = False, group: Any = None) -> FeatureIndex:
        """Compute the projected features of ``data`` into the store folder ``path`` and open it.

        Resumable: when ``path`` already holds a store of the same configuration (model, parameters, output,
        metric, seed, dim, dtype, data length, shard size), finished shards whose checksum verifies, and whose
        data (sha256 of the samples' bytes) are those of ``data``, are kept and only the missing ones are
        computed (a shard failing its checksum is recomputed, with a warning; changed data are refused).
        A store of another configuration is refused with an :class:`~nnsim.InputError` naming the
        differences: use a new path, or ``overwrite=True`` (which deletes only the store's own files).
        One build at a time per folder: a second one is refused, naming the first (pid, host, start time).

        Args:
            sim: the :class:`~nnsim.Similarity` defining model, output, parameters and metric.
            data: tensor, tuple of tensors, Dataset or DataLoader (``shuffle=False``), in a fixed order.
            dim: sketch width, the numbers per row whatever d and the layers; ``None`` = :data:`DEFAULT_DIM`
                (1024: with the default candidates, recall@10 after re-ranking >= 0.99 on the measured
                models, docs/index.md). When d x P <= ``dim`` the rows are exact.
            seed: projection seed (same seed, same projection, in any process).
            shard_size: rows per shard file (default: about 64 MiB per shard).
            dtype: ``"float16"`` (default) or ``"float32"`` (twice the disk; estimates without re-ranking
                keep ~6 instead of ~3 decimal digits; re-ranked similarities are exact either way).
            overwrite: delete an existing store at ``path`` first.
            group: a ``torch.distributed`` process group (default: the initialised default group, if any;
                ``False``: this process alone). Every rank passes the same arguments (``path`` on a filesystem
                all ranks share) and computes a balanced share of the missing shards, reading only its rows;
                rank 0 writes the one manifest. The shard layout does not depend on the number of processes,
                so a store is resumed by any number of them (e.g. ``torchrun --max-restarts``) without
                recomputing finished shards, and its data digest is the same for any number.
        """
        dim = DEFAULT_DIM if dim is None else dim
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise InputError(f"dim must be a positive integer or None, got {dim!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise InputError(f"seed must be an integer, got {seed!r}")
        dtype = _dtype_name(dtype)
        if shard_size is not None and (isinstance(shard_size, bool) or not isinstance(shard_size, int)
                                       or shard_size < 1):
            raise InputError(f"shard_size must be a positive integer or None, got {shard_size!r}")
        if not isinstance(sim, Similarity):
            raise InputError(f"sim must be an nnsim.Similarity, got {type(sim).__name__}")
        src = as_source(data, "data")
        folder = Path(path)
        manifest = bd.build_store(sim, src, folder, dim, seed, shard_size, dtype, overwrite, group)
        return cls(folder, sim, manifest)

    @classmethod
    def open(cls, path: str | Path, sim: Similarity, *, verify: bool = True, data: Any = None) -> FeatureIndex:
        """Open a complete store built by :meth:`build` for the model and settings of ``sim``.

        Refuses (:class:`~nnsim.InputError`) a folder without a valid manifest, a store of an older format
        version, an incomplete store (resume it with ``build``), a store built for another model (fingerprint)
        or other similarity settings, a store whose projection differs from this version's, (``verify=True``:
        sha256 of every shard, one read of the store) a shard that is missing, truncated or altered, and
        (with ``data``: one read of the data, nothing computed) data other than those the store was built from.
        """
        if not isinstance(sim, Similarity):
            raise InputError(f"sim must be an nnsim.Similarity, got {type(sim).__name__}")
        folder = Path(path)
        manifest = store.read_manifest(folder)
        cfg = manifest["config"]
        ranges = store.shard_ranges(cfg["n"], cfg["shard_size"])
        covered = [(e["start"], e["stop"]) for e in manifest["shards"]]
        if not manifest["complete"] or covered != ranges:
            raise store.StoreError(
                f"{folder} is incomplete ({len(covered)} of {len(ranges)} shards finished): resume the build "
                f"(`nnsim index build --index {folder}` with the same settings, or FeatureIndex.build(sim, data, "
                f"{str(folder)!r}, dim={cfg['dim']}, seed={cfg['seed']}, dtype={cfg['dtype']!r})) on the same data")
        diffs = store.describe_differences({k: cfg.get(k) for k in ft.MODEL_KEYS}, ft.model_config(sim), ft.MODEL_KEYS)
        if diffs:
            raise store.StoreError(f"{folder} was built for another model or similarity settings:\n  "
                                + "\n  ".join(diffs) + "\nBuild a new index for this model.")
        probe = ft.projection_probe(cfg["dim"], cfg["seed"])
        if not ft.probe_matches(manifest.get("projection_probe"), probe):
            raise store.StoreError(f"{folder}: the random projection of this nnsim/torch version differs from the one "
                                "the store was built with; rebuild it (overwrite=True)")
        for entry in manifest["shards"]:
            problem = store.check_shard(folder, entry, manifest["layout"]["width"], cfg["dtype"], checksum=verify)
            if problem is not None:
                raise store.StoreError(f"{folder}: {problem}. Rebuild that shard with nnsim.FeatureIndex.build(sim, "
                                    f"data, {str(folder)!r}, dim={cfg['dim']}, seed={cfg['seed']}) (it recomputes "
                                    "only failing shards)")
        index = cls(folder, sim, manifest)
        if data is not None:
            index.check_data(data)
        return index

    # ------------------------------------------------------------------ search
    def search(self, queries: Any, k: int = 10, candidates: int | None = None, data: Any = None, *,
               backend: Backend = "auto") -> tuple[Tensor, Tensor]:
        """The k indexed samples most similar to each query: (similarities [Q, k], indices [Q, k]), best first.

        Candidates (``candidates`` per query, default max(10k, 100)) are the largest inner products of the
        query features with the stored rows, found with FAISS (``backend="faiss"``, or ``"auto"`` when
        ``faiss`` is importable) or an exact chunked torch matmul + top-k (``"torch"``), streaming one block
        of one shard at a time.

        * With ``data`` (the data the index was built from, same order; checked against the store's data
          digest, one read of the data): the candidates are re-ranked by the exact similarity
          ``Similarity.similarity``, and the returned similarities are exact.
        * Without ``data``: the returned similarities are the unbiased projected *estimates* of tr K~ / d
          (exact only when d x P <= ``dim``, up to the storage precision), and the order is the estimated one.

        Queries with a zero gradient get NaN and index -1 (with a warning); samples with a zero gradient are
        never returned.
        """
        qsrc = as_source(queries, "queries")
        candidates, faiss = self._search_settings(k, candidates, backend)
        self._check_inputs(qsrc, "queries")
        dsrc = None
        if data is not None:
            dsrc = as_source(data, "data")
            self.check_data(dsrc)
        sim, cfg, layout = self.sim, self.manifest["config"], self.manifest["layout"]
        sketch, exact = layout["sketch"], layout["exact"]
        centre = None if layout.get("centre") is None else torch.tensor(layout["centre"], dtype=torch.float64)
        chunk = ft.compute_chunk(sim, qsrc, self.width)
        block = max(1, min(len(qsrc), ft._FEATURE_BYTES // (4 * self.width), 4096))
        out_v = torch.full((len(qsrc), k), float("nan"), dtype=sim.dtype)
        out_i = torch.full((len(qsrc), k), -1, dtype=torch.long)
        report = ft.rank_notes("queries")
        n_blocks = math.ceil(len(qsrc) / block)
        with tqdm(total=n_blocks, disable=not sim.progress or n_blocks < 2, desc="nnsim search", unit="block") as bar:
            for q0, qbatch in qsrc.chunks(block):
                feats, rank = [], []
                for s in range(0, qbatch[0].shape[0], chunk):
                    f, r = ft.query_rows(sim, tuple(t[s : s + chunk] for t in qbatch), q0 + s, sketch, cfg["seed"],
                                         exact, centre, report)
                    feats.append(f.float())
                    rank.append(r)
                fq, qrank = torch.cat(feats), torch.cat(rank)
                self._check_layout(fq.shape[1])
                top = sr.candidates(self.path, self.manifest["shards"], self.width, fq, candidates, faiss)
                valid = (qrank > 0).to(top.values.device)
                v, i = top.result()  # best first
                if dsrc is None:
                    v, i = v[:, :k], i[:, :k]
                else:
                    v, i = sr.rerank(sim, self.n, self._sample_bytes, qbatch, i, valid, dsrc, k, chunk)
                v, i = v.cpu(), i.cpu()
                v[~valid.cpu()], i[~valid.cpu()] = float("nan"), -1
                rows = slice(q0, q0 + qbatch[0].shape[0])
                out_v[rows], out_i[rows] = v.to(sim.dtype), i
                bar.update(1)
        report.emit()
        return out_v, out_i

    def _search_settings(self, k: int, candidates: int | None, backend: str) -> tuple[int, Any]:
        """The checked number of candidates per query, and the faiss module to search with (or None)."""
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.n:
            raise InputError(f"k must be an integer in [1, {self.n}], got {k!r}")
        if candidates is None:
            candidates = default_candidates(k)
        if isinstance(candidates, bool) or not isinstance(candidates, int) or candidates < k:
            raise InputError(f"candidates must be an integer >= k = {k}, got {candidates!r}")
        if backend not in ("auto", "faiss", "torch"):
            raise InputError(f"backend must be 'auto', 'faiss' or 'torch', got {backend!r}")
        faiss = sr.faiss_module() if backend in ("auto", "faiss") else None
        if backend == "faiss" and faiss is None:
            raise InputError("backend='faiss' needs the faiss package: pip install faiss-cpu (or nnsim[index])")
        return min(candidates, max(self.n - len(self.zero_rows), k)), faiss

    def _check_layout(self, width: int) -> None:
        layout = self.manifest["layout"]
        if self.sim.d != layout["d"] or self.sim.d_eff != layout["d_eff"]:
            raise store.StoreError(f"the analysed output has d = {self.sim.d}, the store was built with "
                                   f"d = {layout['d']}")
        if width != self.width:
            raise store.StoreError(f"the query features have width {width}, the stored rows {self.width}: the "
                                "projection or model layout differs from the store's")

    def _check_inputs(self, src: Source, name: str) -> None:
        sig = ft.signature(src.first())
        stored = self.manifest["config"].get("input_signature")
        if stored is not None and sig != stored:
            raise InputError(f"{name} samples have (shape, dtype) {sig}, but the index was built on samples "
                             f"{stored}")

    def check_data(self, data: Any) -> None:
        """Refuse (:class:`~nnsim.InputError`) data other than those the store was built from: the length,
        the sample shapes, then the sha256 of every shard's samples (one read of the data, nothing computed;
        tensors already checked and not written to since are not read again). ``search(data=...)``,
        ``open(data=...)`` and ``recall`` call it."""
        src = data if isinstance(data, Source) else as_source(data, "data")
        if len(src) != self.n:
            raise InputError(f"data has {len(src)} samples but the index was built on {self.n}: pass the data "
                             "the index was built from, in the same order")
        self._check_inputs(src, "data")
        key = _tensor_key(src)
        refs = self._verified.get(key) if key is not None else None
        if refs is not None and all(r() is t for r, t in zip(refs, src.data, strict=True)):
            return
        changed = bd.differing_rows(src, self.manifest, ft.compute_chunk(self.sim, src, None))
        if changed:
            raise InputError(f"data differ from the data the index at {self.path} was built from: "
                             f"{bd.describe_rows(changed)} changed (other data, another order, or random "
                             "transforms). Pass the same data in the same order, or rebuild the index on these "
                             "data (`nnsim index build --overwrite`, or FeatureIndex.build(..., overwrite=True))")
        if key is not None:
            self._verified[key] = tuple(weakref.ref(t) for t in src.data)

    # ------------------------------------------------------------------ quality
    def recall(self, queries: Any, data: Any, k: int = 10, *, rerank: bool = True, candidates: int | None = None,
               backend: Backend = "auto") -> float:
        """recall@k of :meth:`search` against the exact ``Similarity.neighbors(queries, data, k)``.

        The mean, over queries with a defined neighbourhood, of |found ∩ exact| / |exact|. ``rerank=True``
        measures the full search (candidates re-ranked exactly); ``rerank=False`` the projection alone.
        """
        self.check_data(as_source(data, "data"))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RankDeficiencyWarning)
            _, exact = self.sim.neighbors(queries, data, k, group=False)  # local, like search
        _, found = self.search(queries, k, candidates, data if rerank else None, backend=backend)
        hits, total = 0, 0
        for e, f in zip(exact.tolist(), found.tolist()):
            want = {j for j in e if j >= 0}
            if want:
                hits += len(want & {j for j in f if j >= 0})
                total += len(want)
        return hits / total if total else float("nan")


def _tensor_key(src: Source) -> tuple[Any, ...] | None:
    """Identity and version counters of in-memory tensor data (changed by any in-place write), else None."""
    if not isinstance(src, TensorSource):
        return None
    return tuple((id(t), t.data_ptr(), t._version, tuple(t.shape)) for t in src.data)


def _itemsize(dtype: str) -> int:
    t = getattr(torch, dtype.removeprefix("torch."), None)
    return t.itemsize if isinstance(t, torch.dtype) else 8


def _dtype_name(dtype: Any) -> str:
    names = {"float32": "float32", "float16": "float16", np.float32: "float32", np.float16: "float16",
             torch.float32: "float32", torch.float16: "float16"}
    try:
        return names[dtype]
    except (KeyError, TypeError):
        if isinstance(dtype, np.dtype) and dtype.name in store.DTYPES:
            return dtype.name
        raise InputError(f"dtype must be 'float32' or 'float16', got {dtype!r}") from None
