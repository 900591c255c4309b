"""``FeatureIndex``: projected similarity features on disk, for repeated neighbour queries on large data.

Each sample x is mapped to phi(x) = vec(P U(x)) / sqrt(d_eff), with U(x) the kernel-corrected per-sample
gradient (its Gram is the normalised kernel K~) and P a seeded, per-layer Kronecker-structured Gaussian
projection generated on the fly and never stored (``Similarity.features``). Then E[phi(x) . phi(x')] =
tr K~(x, x') / d_eff, the scalar similarity, so a plain inner product of stored rows estimates it.

Search = candidate generation by inner product over the store (FAISS ``IndexFlatIP`` when installed,
exact chunked torch matmul + top-k otherwise, both streaming one block of one shard at a time), then,
when the data are given, exact re-ranking of the candidates with ``Similarity.similarity``.
"""

from __future__ import annotations

import hashlib
import importlib
import math
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, IterableDataset, SequentialSampler, Subset
from tqdm.auto import tqdm

from .. import distributed as dist_mod
from ..errors import InputError, RankDeficiencyWarning
from ..factors import Dense, Outer, project
from ..inputs import Batch, Source, as_source, sample_signature
from ..similarity import _ALL, Similarity
from . import store as st

# Defaults: projection dimension per layer (``dim=None``) and candidates per query (``candidates=None``).
# Measured (projection of commit 9a9fde7: narrow layer sides exact): recall@10 of ``search`` against exact
# ``Similarity.neighbors``, 200 held-out digits queries against the other 1597 digits, models trained 30
# epochs (test accuracy 0.985-1.0), projection seeds 0 / 1, "projected only / re-ranked 50 / re-ranked 100":
#                                      dim=512                  dim=1024                 dim=2048
#   MLP 64-64-10    flatten  (d=10)   .60/.99/1.0 .52/.95/.99  .62/.98/1.0 .66/.99/1.0  .69/.99/1.0 .68/.99/1.0
#   MLP 64-64-10    logits   (d=1)    .48/.96/1.0 .45/.91/.99  .52/.97/1.0 .52/.95/1.0  .60/.98/1.0 .55/.97/1.0
#   MLP 64-256-10   flatten  (d=10)   .56/.97/1.0 .53/.95/1.0  .56/.97/1.0 .60/.98/1.0  .64/.99/1.0 .65/.99/1.0
#   MLP 64-256-10   logits   (d=1)    .51/.95/1.0 .47/.94/1.0  .50/.95/1.0 .53/.97/1.0  .59/.98/1.0 .58/.99/1.0
#   CNN 8-16 ch.    flatten  (d=10)   .17/.53/.74 .44/.87/.96  .98/1.0/1.0 .98/1.0/1.0
#   CNN 8-16 ch.    logits   (d=1)    .30/.84/.99 .52/.93/1.0  .93/1.0/1.0 .94/1.0/1.0
#   CNN 16-32 ch.   flatten  (d=10)                            .54/.96/1.0 .43/.87/.96  .97/1.0/1.0 .98/1.0/1.0
#   CNN 16-32 ch.   logits   (d=1)                             .59/.98/1.0 .49/.94/1.0  .98/1.0/1.0 .98/1.0/1.0
# ("logits" = outputs.logits("predicted"); exact worst cases at dim=1024 with 100 candidates: 0.961 for CNN
# 16-32 flatten seed 1, >= 0.996 elsewhere; with 50 candidates 0.874.) Re-ranking more candidates is far cheaper
# than a wider projection (disk and scan time grow with dim; re-ranking costs one gradient per candidate), so
# the defaults are dim=1024 with max(10k, 100) candidates: recall@10 >= 0.96 on every model and seed above.
DEFAULT_DIM = 1024


def default_candidates(k: int) -> int:
    """Candidates re-ranked per query when ``candidates=None`` (see the measurements above)."""
    return max(10 * k, 100)


# The projection scheme written into manifests (informational: ``projection_probe`` detects any change).
PROJECTION = "kronecker-gaussian/2"
Backend = Literal["auto", "faiss", "torch"]

_SCORE_ELEMS = 2**25  # elements of one [queries, rows] score block
_FEATURE_BYTES = 2**27  # bytes of one block of computed or loaded features
_SHARD_BYTES = 2**26  # default target size of one shard file
_RERANK_ROWS = 4096  # candidate rows re-ranked in one exact tile


# ---------------------------------------------------------------------------------------------- fingerprints
def _hash_tensor(h: Any, kind: str, name: str, t: Tensor) -> None:
    t = t.detach().to("cpu").contiguous()
    h.update(f"{kind}\0{name}\0{tuple(t.shape)}\0{t.dtype}\0".encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy())


def model_fingerprint(sim: Similarity) -> str:
    """sha256 over names, shapes, dtypes and values of the selected parameters, then of every other tensor
    of the model's state (frozen parameters, buffers such as BatchNorm statistics), which also shape the
    gradients."""
    h = hashlib.sha256(b"nnsim-model/1\0")
    for name, p in sim.params.items():
        _hash_tensor(h, "param", name, p)
    selected = {id(p) for p in sim.params.values()}
    for name, t in sim.model.state_dict(keep_vars=True).items():
        if isinstance(t, Tensor) and id(t) not in selected:
            _hash_tensor(h, "state", name, t)
    return h.hexdigest()


def _output_name(fn: Any) -> str:
    """A readable identifier of the analysed output: qualified name plus simple closure values."""
    name = f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__qualname__)}"
    cells = getattr(fn, "__closure__", None) or ()
    simple = []
    for c in cells:
        try:
            v = c.cell_contents
        except ValueError:
            continue
        if isinstance(v, (int, float, str, bool, tuple, type(None))):
            simple.append(repr(v))
    return name + (f"({', '.join(simple)})" if simple else "")


def _metric_spec(sim: Similarity) -> Any:
    if isinstance(sim.metric, Tensor):
        h = hashlib.sha256()
        _hash_tensor(h, "metric", "M", sim.metric)
        return {"tensor_sha256": h.hexdigest(), "shape": list(sim.metric.shape)}
    return sim.metric


def _sample_digest(batch: Batch) -> str:
    h = hashlib.sha256(b"nnsim-sample/1\0")
    for k, t in enumerate(batch):
        _hash_tensor(h, "input", str(k), t)
    return h.hexdigest()


def _signature(batch: Batch) -> list[list[Any]]:
    return [[list(shape), str(dtype)] for shape, dtype in sample_signature(batch)]


def projection_probe(dim: int, seed: int) -> list[float]:
    """Summary numbers of the projection of fixed synthetic gradients: they change exactly when the projection
    (generator, seeding, layer split) changes, so a store is never searched with a different projection."""
    r = math.isqrt(dim) + 2  # an r x r layer with r^2 > dim is projected, not kept exact
    f64 = torch.float64
    a = torch.cos(torch.arange(2 * r, dtype=f64)).reshape(1, 1, 2, r)
    delta = torch.sin(torch.arange(2 * r, dtype=f64) + 0.5).reshape(1, 1, 1, 2, r)
    factors: list[Any] = [Outer("nnsim-probe", a, delta, ("w", torch.Size([r, r])))]
    if dim <= 4096:  # the dense projection costs dim^2 random numbers
        factors.append(Dense("nnsim-probe-dense", torch.cos(torch.arange(dim + 1, dtype=f64) * 0.3)[None, None],
                             [("v", torch.Size([dim + 1]))]))
    v = project(factors, dim, seed).flatten()
    w = torch.cos(torch.arange(v.numel(), dtype=f64) * 0.7)
    return [float(v.numel()), float(v @ v), float(v @ w), float(v.sum())]


def _probe_matches(stored: Any, now: list[float]) -> bool:
    if not isinstance(stored, list) or len(stored) != len(now):
        return False
    return all(isinstance(s, (int, float)) and math.isclose(s, c, rel_tol=1e-6, abs_tol=1e-9)
               for s, c in zip(stored, now))


def _model_config(sim: Similarity) -> dict[str, Any]:
    """The entries that tie a store to a model and its similarity settings."""
    return {
        "model_fingerprint": model_fingerprint(sim),
        "params": list(sim.params),
        "output": _output_name(sim.output),
        "metric": _metric_spec(sim),
        "rtol": sim.rtol,
        "atol": sim.atol,
        "singular": sim.singular,
    }


_MODEL_KEYS = ["model_fingerprint", "params", "output", "metric", "rtol", "atol", "singular"]


# ---------------------------------------------------------------------------------------------- features
class _RankNotes:
    """Zero-gradient and rank-deficient samples seen while computing features; one warning each at the end."""

    def __init__(self, sim: Similarity, side: str) -> None:
        self.side, self.nullity = side, int(sim._fisher)
        self.zero: list[int] = []
        self.deficient: list[int] = []

    def add(self, name: str, chunk: Any) -> None:
        r = chunk.rank[_ALL]
        full = chunk.K[_ALL].shape[-1] - self.nullity
        self.zero += (torch.nonzero(r == 0).flatten() + chunk.start).tolist()
        self.deficient += (torch.nonzero((r > 0) & (r < full)).flatten() + chunk.start).tolist()

    def emit(self) -> None:
        if self.zero:
            effect = ("they are stored but never returned as neighbours" if self.side == "data"
                      else "their similarities are NaN and their indices -1")
            warnings.warn(f"{len(self.zero)} sample(s) of {self.side} have a zero gradient (no direction): {effect}. "
                          f"Samples: {self.zero[:20]}", RankDeficiencyWarning, stacklevel=3)
        if self.deficient:
            warnings.warn(f"{len(self.deficient)} sample(s) of {self.side} have a rank-deficient K(x, x): normalised "
                          f"on its range (self-similarity rank/d < 1). Samples: {self.deficient[:20]}",
                          RankDeficiencyWarning, stacklevel=3)


def chunk_features(sim: Similarity, batch: Batch, start: int, dim: int, seed: int, name: str,
                   report: Any = None) -> tuple[Tensor, Tensor]:
    """Projected kernel-corrected gradients of one chunk, pre-divided by sqrt(d_eff): ([B, d k], rank [B])."""
    chunk = sim._prepare(batch, start, name, None, "similarity", "raw")
    if report is not None:
        report.add(name, chunk)
    with torch.no_grad():
        phi = project(chunk.groups[_ALL], dim, seed)
    return phi.reshape(phi.shape[0], -1) / math.sqrt(sim._d_eff), chunk.rank[_ALL]


def _compute_chunk(sim: Similarity, src: Source, width: int | None) -> int:
    size = sim.chunk_size or sim._auto_chunk(src, "data", None, "similarity", "raw")
    if width:
        size = min(size, max(1, _FEATURE_BYTES // (8 * width)))
    return max(1, size)


def _slice(batch: Batch, a: int, b: int) -> Batch:
    return tuple(t[a:b] for t in batch)


def _sub_source(src: Source, start: int, stop: int) -> Source | None:
    """Random access to rows [start, stop) when the source allows it (tensors, map-style datasets)."""
    if src.kind == "tensors":
        return Source(_slice(src.data, start, stop), stop - start, "tensors", src.keys)
    if src.kind == "dataset":
        return Source(Subset(src.data, range(start, stop)), stop - start, "dataset")
    return None


def _loader_random_access(loader: DataLoader) -> bool:
    bs = loader.batch_sampler
    return (not isinstance(loader.dataset, IterableDataset) and type(bs) is BatchSampler
            and isinstance(bs.sampler, SequentialSampler))


def _fetch_rows(src: Source, idx: list[int], chunk: int) -> Any:
    """The samples ``idx`` (sorted, unique) of ``src`` as something ``Similarity`` accepts."""
    if src.kind == "tensors":
        where = torch.tensor(idx, dtype=torch.long)
        rows = tuple(t[where.to(t.device)] for t in src.data)
        return rows if src.keys is None else dict(zip(src.keys, rows, strict=True))  # keyword inputs stay so
    if src.kind == "dataset":
        return Subset(src.data, idx)
    loader = src.data
    if _loader_random_access(loader):
        return DataLoader(Subset(loader.dataset, idx), batch_size=loader.batch_size, shuffle=False,
                          collate_fn=loader.collate_fn)
    # Custom sampler or iterable dataset: one streaming pass picks the rows.
    want = torch.tensor(idx, dtype=torch.long)
    parts: list[Batch] = []
    for s, batch in src.chunks(chunk):
        n = batch[0].shape[0]
        lo, hi = torch.searchsorted(want, torch.tensor([s, s + n])).tolist()
        if hi > lo:
            local = want[lo:hi] - s
            parts.append(tuple(t[local.to(t.device)] for t in batch))
    return tuple(torch.cat([p[k] for p in parts]) for k in range(len(parts[0])))


# ---------------------------------------------------------------------------------------------- top-k
class _Top:
    """Running top-C of scores given as (values [Q, c], global indices [Q, c]) blocks."""

    def __init__(self, rows: int, k: int, device: torch.device) -> None:
        self.k = k
        self.values = torch.full((rows, 0), float("-inf"), device=device)
        self.indices = torch.full((rows, 0), -1, dtype=torch.long, device=device)

    def update(self, values: Tensor, indices: Tensor) -> None:
        v = torch.cat([self.values, torch.nan_to_num(values.float(), nan=float("-inf"))], 1)
        i = torch.cat([self.indices, indices], 1)
        if v.shape[1] > self.k:
            top = v.topk(self.k, dim=1)
            v, i = top.values, i.gather(1, top.indices)
        self.values, self.indices = v, i

    def result(self, k: int | None = None) -> tuple[Tensor, Tensor]:
        """(values [Q, k], indices [Q, k]) sorted, padded with NaN / -1 where fewer valid entries exist."""
        k = self.k if k is None else k
        v, i = self.values, self.indices
        if v.shape[1] < k:
            pad = k - v.shape[1]
            v = torch.cat([v, v.new_full((v.shape[0], pad), float("-inf"))], 1)
            i = torch.cat([i, i.new_full((i.shape[0], pad), -1)], 1)
        top = v.topk(k, dim=1)
        v, i = top.values, i.gather(1, top.indices)
        missing = torch.isneginf(v)
        return v.masked_fill(missing, float("nan")), i.masked_fill(missing, -1)


def _faiss() -> Any:
    try:
        return importlib.import_module("faiss")
    except ImportError:
        return None


# ---------------------------------------------------------------------------------------------- the index
class FeatureIndex:
    """Projected similarity features of a data set in an on-disk store, searchable by inner product.

    Build with :meth:`build`, reopen with :meth:`open`, query with :meth:`search`, measure with :meth:`recall`.
    ``dim`` is the projection dimension per layer (layers with at most ``dim`` parameters are kept exact),
    so a row holds ``width`` = d x (sum over layers of about min(dim, layer size)) numbers.
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

    def __len__(self) -> int:
        return self.n

    def __repr__(self) -> str:
        return (f"FeatureIndex({str(self.path)!r}, n={self.n}, dim={self.dim}, seed={self.seed}, width={self.width}, "
                f"dtype={self.dtype}, shards={len(self.manifest['shards'])})")

    # ------------------------------------------------------------------ build / open
    @classmethod
    def build(cls, sim: Similarity, data: Any, path: str | Path, dim: int | None = None, *, seed: int = 0,
              shard_size: int | None = None, dtype: Literal["float32", "float16"] = "float32",
              overwrite: bool = False, group: Any = None) -> FeatureIndex:
        """Compute the projected features of ``data`` into the store folder ``path`` and open it.

        Resumable: when ``path`` already holds a store of the same configuration (model, parameters, output,
        metric, seed, dim, dtype, data length, shard size), finished shards whose checksum verifies are kept
        and only the missing ones are computed (a shard failing its checksum is recomputed, with a warning).
        A store of another configuration is refused with an :class:`~nnsim.InputError` naming the
        differences: use a new path, or ``overwrite=True`` (which deletes only the store's own files).

        Args:
            sim: the :class:`~nnsim.Similarity` defining model, output, parameters and metric.
            data: tensor, tuple of tensors, Dataset or DataLoader (``shuffle=False``), in a fixed order.
            dim: projection dimension per layer; ``None`` = :data:`DEFAULT_DIM` (1024: with the default
                candidates, recall@10 after re-ranking >= 0.96 on the measured digits MLPs and CNNs).
            seed: projection seed (same seed, same projection, in any process).
            shard_size: rows per shard file (default: about 64 MiB per shard).
            dtype: ``"float32"`` or ``"float16"`` (half the disk; estimates lose ~3 decimal digits).
            overwrite: delete an existing store at ``path`` first.
            group: a ``torch.distributed`` process group (default: the initialised default group, if any;
                ``False``: this process alone). Every rank passes the same arguments (``path`` on a filesystem
                all ranks share) and computes a balanced share of the missing shards, reading only its rows;
                rank 0 writes the one manifest. The shard layout does not depend on the number of processes,
                so a store is resumed by any number of them (e.g. ``torchrun --max-restarts``) without
                recomputing finished shards.
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
        first = src.first()
        config = {
            **_model_config(sim), "projection": PROJECTION, "seed": seed, "dim": dim, "dtype": dtype,
            "n": len(src), "input_signature": _signature(first), "first_sample_sha256": _sample_digest(first),
        }
        probe = projection_probe(dim, seed)
        comm = dist_mod.resolve(group)
        if comm is not None:
            dist_mod.agree(comm, "the index build (model, data, settings, path)",
                           (config, shard_size, overwrite, str(folder)))

            def start() -> dict[str, Any] | None:
                return cls._start(sim, folder, config, shard_size, probe, overwrite, first, src) if comm.rank == 0 \
                    else None

            manifest = dist_mod.broadcast_object(comm, dist_mod.run_together(comm, start))

            def visible() -> None:
                if not (folder / st.MANIFEST).is_file():
                    raise InputError(f"{folder} holds no manifest on this rank although rank 0 wrote one: the "
                                     "store must be on a filesystem shared by all ranks")

            dist_mod.run_together(comm, visible)
        else:
            manifest = cls._start(sim, folder, config, shard_size, probe, overwrite, first, src)
        cls._fill(sim, src, folder, manifest, comm)
        return cls(folder, sim, manifest)

    @classmethod
    def _start(cls, sim: Similarity, folder: Path, config: dict[str, Any], shard_size: int | None, probe: list[float],
               overwrite: bool, first: Batch, src: Source) -> dict[str, Any]:
        """The manifest of the compatible store at ``folder``, or a new empty one written there."""
        manifest = cls._existing(folder, config, shard_size, probe, overwrite)
        if manifest is None:
            dim, seed, dtype = config["dim"], config["seed"], config["dtype"]
            folder.mkdir(parents=True, exist_ok=True)
            feats, _ = chunk_features(sim, first, 0, dim, seed, "data")  # one sample: the row width
            width = feats.shape[1]
            itemsize = np.dtype(st.DTYPES[dtype]).itemsize
            size = shard_size or max(1, min(len(src), _SHARD_BYTES // (width * itemsize)))
            manifest = {
                "format": st.FORMAT, "version": st.VERSION, "complete": False,
                "config": {**config, "shard_size": size},
                "layout": {"width": width, "d": sim.d, "d_eff": sim._d_eff},
                "projection_probe": probe, "shards": [],
                "info": {"nnsim": _nnsim_version(), "torch": torch.__version__, "numpy": np.__version__,
                         "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
            }
            st.write_manifest(folder, manifest)
        return manifest

    @staticmethod
    def _existing(folder: Path, config: dict[str, Any], shard_size: int | None, probe: list[float],
                  overwrite: bool) -> dict[str, Any] | None:
        """The manifest of a compatible partial or complete store at ``folder``, or None to start afresh."""
        if folder.exists() and not folder.is_dir():
            raise InputError(f"{folder} exists and is not a folder; choose a folder path for the store")
        if not folder.is_dir():
            return None
        if overwrite:
            st.clear(folder)
        if not (folder / st.MANIFEST).exists():
            others = [p.name for p in folder.iterdir() if not st.is_store_file(p.name)]
            if others and not overwrite:
                raise InputError(f"{folder} is not empty and holds no nnsim feature store ({others[:5]}); choose an "
                                 "empty or new folder (or overwrite=True: other files are left untouched)")
            return None
        try:
            manifest = st.read_manifest(folder)
        except st.StoreError as err:
            raise st.StoreError(f"cannot resume: {err}") from err
        stored = manifest["config"]
        current = {**config, "shard_size": shard_size or stored["shard_size"]}
        diffs = st.describe_differences(stored, current)
        if not _probe_matches(manifest.get("projection_probe"), probe):
            diffs.append(st.describe_differences({"projection_probe": manifest.get("projection_probe")},
                                                 {"projection_probe": probe})[0])
        if diffs:
            raise st.StoreError(f"{folder} holds a feature store built differently:\n  " + "\n  ".join(diffs)
                                + "\nUse a new path, or overwrite=True to rebuild it.")
        return manifest

    @classmethod
    def _fill(cls, sim: Similarity, src: Source, folder: Path, manifest: dict[str, Any],
              comm: dist_mod.Comm | None = None) -> None:
        """Compute every shard not yet finished (verifying the finished ones), then mark the store complete.

        Finished shards are those of the manifest and those whose entry a (crashed) multi-process build
        published next to them. With ``comm``, the ranks verify and compute balanced shares of the shards and
        rank 0 alone writes the manifest."""
        cfg, width = manifest["config"], manifest["layout"]["width"]
        ranges = st.shard_ranges(cfg["n"], cfg["shard_size"])
        main = comm is None or comm.rank == 0
        rank, world = (0, 1) if comm is None else (comm.rank, comm.world)
        candidates: dict[int, dict[str, Any]] = {}
        published = st.read_entries(folder)
        for entry in [*manifest["shards"], *published.values()]:
            i = entry["start"] // cfg["shard_size"]
            if i >= len(ranges) or (entry["start"], entry["stop"]) != ranges[i]:
                if entry in published.values():
                    continue  # a stray published entry (another layout): its shard is computed again
                raise st.StoreError(f"{folder / st.MANIFEST} is corrupted: shard {entry['file']} covers rows "
                                    f"[{entry['start']}, {entry['stop']}), not a shard of this layout; rebuild it "
                                    "(overwrite=True)")
            candidates.setdefault(i, entry)
        # Verifying is one read of every finished shard: each rank checks its share.
        ids = sorted(candidates)
        problems = {i: st.check_shard(folder, candidates[i], width, cfg["dtype"]) for i in ids[rank::world]}
        if comm is not None:
            problems = {i: p for part in dist_mod.all_gather_object(comm, problems) for i, p in part.items()}
        done = {i: candidates[i] for i in ids if problems[i] is None}
        for i in ids:
            if problems[i] is not None:
                warnings.warn(f"{folder}: {problems[i]}; recomputing that shard", UserWarning, stacklevel=3)
        if main and [e["start"] for e in manifest["shards"]] != [done[i]["start"] for i in sorted(done)]:
            manifest["shards"] = [done[i] for i in sorted(done)]
            manifest["complete"] = False
            st.write_manifest(folder, manifest)
        manifest["shards"] = [done[i] for i in sorted(done)]
        todo = [i for i in range(len(ranges)) if i not in done]
        a, b = dist_mod.split(len(todo), rank, world)
        mine = todo[a:b]
        report = _RankNotes(sim, "data")

        def compute() -> list[dict[str, Any]]:
            written: list[dict[str, Any]] = []
            if not mine:
                return written
            chunk = _compute_chunk(sim, src, width)
            with tqdm(total=len(ranges), initial=len(done), disable=not sim.progress or not main, desc="nnsim index",
                      unit="shard") as bar:
                for i, pieces in cls._shard_pieces(src, ranges, mine, chunk):
                    start, stop = ranges[i]

                    def fill(array: np.ndarray, pieces: Iterator[tuple[int, Batch]] = pieces,
                             start: int = start, stop: int = stop) -> dict[str, Any]:
                        zero: list[int] = []
                        filled = start
                        for s, batch in pieces:
                            feats, rank = chunk_features(sim, batch, s, cfg["dim"], cfg["seed"], "data", report)
                            if feats.shape[1] != width:
                                raise st.StoreError(f"the features have width {feats.shape[1]}, the store "
                                                    f"{width}: the model or output changed; rebuild the store")
                            if feats.dtype not in (torch.float32, torch.float64):
                                feats = feats.float()  # numpy has no bfloat16
                            array[s - start : s - start + feats.shape[0]] = feats.cpu().numpy()
                            zero += (torch.nonzero(rank == 0).flatten() + s).tolist()
                            filled = s + feats.shape[0]
                        if filled != stop:
                            raise InputError(f"data yielded {filled} samples, but its length is {cfg['n']}: a "
                                             "sized data set must yield exactly len(data) samples")
                        return {"start": start, "stop": stop, "zero_rows": zero}

                    entry = st.write_shard(folder, i, stop - start, width, cfg["dtype"], fill)
                    written.append(entry)
                    if comm is None:
                        manifest["shards"] = sorted([*manifest["shards"], entry], key=lambda e: e["start"])
                        st.write_manifest(folder, manifest)
                    else:  # the manifest is rank 0's: publish the entry next to the shard
                        st.write_entry(folder, i, entry)
                    bar.update(1)
            return written

        if comm is None:
            compute()
        else:
            written = dist_mod.run_together(comm, compute)
            new = [e for part in dist_mod.all_gather_object(comm, written) for e in part]
            manifest["shards"] = sorted([*manifest["shards"], *new], key=lambda e: e["start"])
            notes = dist_mod.all_gather_object(comm, (report.zero, report.deficient))
            report.zero = sorted({r for z, _ in notes for r in z})
            report.deficient = sorted({r for _, low in notes for r in low})
        report.emit()
        if len(manifest["shards"]) != len(ranges):
            raise InputError(f"data yielded fewer samples than its length {cfg['n']}")
        if main and (not manifest["complete"] or published or comm is not None):
            manifest["complete"] = True
            st.write_manifest(folder, manifest)
            st.remove_entries(folder)
        manifest["complete"] = True
        if comm is not None:
            dist_mod.barrier(comm.group)  # every rank returns once the manifest is complete on disk

    @staticmethod
    def _shard_pieces(src: Source, ranges: list[tuple[int, int]], todo: list[int], chunk: int
                      ) -> Iterator[tuple[int, Iterator[tuple[int, Batch]]]]:
        """For each shard to compute: (shard id, iterator of (global start, batch) pieces covering it).

        Tensors and map-style datasets are read only where needed; a DataLoader is streamed from the start
        (finished shards are read, not computed)."""
        if src.kind in ("tensors", "dataset"):
            for i in todo:
                a, b = ranges[i]
                sub = _sub_source(src, a, b)
                assert sub is not None
                yield i, ((a + s, batch) for s, batch in sub.chunks(chunk))
            return
        size = ranges[0][1] - ranges[0][0]
        wanted = set(todo)
        stream = src.chunks(chunk)
        pending: list[tuple[int, Batch]] = []  # pieces read ahead that belong to the next shard

        def pieces(i: int) -> Iterator[tuple[int, Batch]]:
            a, b = ranges[i]
            while pending:
                s, batch = pending.pop(0)
                if s >= b:
                    pending.insert(0, (s, batch))
                    return
                yield s, batch
            for s, batch in stream:
                n = batch[0].shape[0]
                pos = s
                while pos < s + n:  # split a chunk at shard boundaries
                    end = min(s + n, (pos // size + 1) * size)
                    piece = (pos, _slice(batch, pos - s, end - s))
                    if pos >= b:
                        pending.append(piece)
                    elif pos >= a:
                        yield piece
                    pos = end
                if pending:
                    return

        for i in range(max(todo) + 1):  # nothing after the last wanted shard is read
            if i in wanted:
                yield i, pieces(i)
            else:  # skip a finished shard: read its samples without computing anything
                for _ in pieces(i):
                    pass

    @classmethod
    def open(cls, path: str | Path, sim: Similarity, *, verify: bool = True) -> FeatureIndex:
        """Open a complete store built by :meth:`build` for the model and settings of ``sim``.

        Refuses (:class:`~nnsim.InputError`) a folder without a valid manifest, an incomplete store (resume it
        with ``build``), a store built for another model (fingerprint) or other similarity settings, a store
        whose projection differs from this version's, and (``verify=True``: sha256 of every shard, one read of
        the store) a shard that is missing, truncated or altered.
        """
        if not isinstance(sim, Similarity):
            raise InputError(f"sim must be an nnsim.Similarity, got {type(sim).__name__}")
        folder = Path(path)
        manifest = st.read_manifest(folder)
        cfg = manifest["config"]
        ranges = st.shard_ranges(cfg["n"], cfg["shard_size"])
        covered = [(e["start"], e["stop"]) for e in manifest["shards"]]
        if not manifest["complete"] or covered != ranges:
            raise st.StoreError(
                f"{folder} is incomplete ({len(covered)} of {len(ranges)} shards finished): resume it with "
                f"nnsim.FeatureIndex.build(sim, data, {str(folder)!r}, dim={cfg['dim']}, seed={cfg['seed']}, "
                f"dtype={cfg['dtype']!r}) on the same data")
        diffs = st.describe_differences({k: cfg.get(k) for k in _MODEL_KEYS}, _model_config(sim), _MODEL_KEYS)
        if diffs:
            raise st.StoreError(f"{folder} was built for another model or similarity settings:\n  "
                                + "\n  ".join(diffs) + "\nBuild a new index for this model.")
        probe = projection_probe(cfg["dim"], cfg["seed"])
        if not _probe_matches(manifest.get("projection_probe"), probe):
            raise st.StoreError(f"{folder}: the random projection of this nnsim/torch version differs from the one "
                                "the store was built with; rebuild it (overwrite=True)")
        for entry in manifest["shards"]:
            problem = st.check_shard(folder, entry, manifest["layout"]["width"], cfg["dtype"], checksum=verify)
            if problem is not None:
                raise st.StoreError(f"{folder}: {problem}. Rebuild that shard with nnsim.FeatureIndex.build(sim, "
                                    f"data, {str(folder)!r}, dim={cfg['dim']}, seed={cfg['seed']}) (it recomputes "
                                    "only failing shards)")
        return cls(folder, sim, manifest)

    # ------------------------------------------------------------------ search
    def search(self, queries: Any, k: int = 10, candidates: int | None = None, data: Any = None, *,
               backend: Backend = "auto") -> tuple[Tensor, Tensor]:
        """The k indexed samples most similar to each query: (similarities [Q, k], indices [Q, k]), best first.

        Candidates (``candidates`` per query, default max(10k, 100)) are the largest inner products of the
        query features with the stored rows, found with FAISS (``backend="faiss"``, or ``"auto"`` when
        ``faiss`` is importable) or an exact chunked torch matmul + top-k (``"torch"``), streaming one block
        of one shard at a time.

        * With ``data`` (the data the index was built from, same order): the candidates are re-ranked by the
          exact similarity ``Similarity.similarity``, and the returned similarities are exact.
        * Without ``data``: the returned similarities are the projected *estimates* phi(q) . phi(x) of
          tr K~ / d (exact only when every layer is within ``dim``), and the order is the estimated one.

        Queries with a zero gradient get NaN and index -1 (with a warning); samples with a zero gradient are
        never returned.
        """
        qsrc = as_source(queries, "queries")
        usable = self.n - len(self.zero_rows)
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.n:
            raise InputError(f"k must be an integer in [1, {self.n}], got {k!r}")
        if candidates is None:
            candidates = default_candidates(k)
        if isinstance(candidates, bool) or not isinstance(candidates, int) or candidates < k:
            raise InputError(f"candidates must be an integer >= k = {k}, got {candidates!r}")
        candidates = min(candidates, max(usable, k))
        if backend not in ("auto", "faiss", "torch"):
            raise InputError(f"backend must be 'auto', 'faiss' or 'torch', got {backend!r}")
        faiss = _faiss() if backend in ("auto", "faiss") else None
        if backend == "faiss" and faiss is None:
            raise InputError("backend='faiss' needs the faiss package: pip install faiss-cpu (or nnsim[index])")
        self._check_inputs(qsrc, "queries")
        dsrc = None
        if data is not None:
            dsrc = as_source(data, "data")
            self._check_data(dsrc)
        sim, cfg = self.sim, self.manifest["config"]
        chunk = _compute_chunk(sim, qsrc, self.width)
        block = max(1, min(len(qsrc), _FEATURE_BYTES // (4 * self.width), 4096))
        out_v = torch.full((len(qsrc), k), float("nan"), dtype=sim.dtype)
        out_i = torch.full((len(qsrc), k), -1, dtype=torch.long)
        report = _RankNotes(sim, "queries")
        n_blocks = math.ceil(len(qsrc) / block)
        with tqdm(total=n_blocks, disable=not sim.progress or n_blocks < 2, desc="nnsim search", unit="block") as bar:
            for q0, qbatch in qsrc.chunks(block):
                feats, rank = [], []
                for s in range(0, qbatch[0].shape[0], chunk):
                    f, r = chunk_features(sim, _slice(qbatch, s, s + chunk), q0 + s, cfg["dim"], cfg["seed"],
                                          "queries", report)
                    feats.append(f.float())
                    rank.append(r)
                fq, qrank = torch.cat(feats), torch.cat(rank)
                self._check_layout(fq.shape[1])
                top = self._candidates(fq, candidates, faiss)
                valid = (qrank > 0).to(top.values.device)
                if dsrc is None:
                    v, i = top.result(k)
                else:
                    v, i = self._rerank(qbatch, q0, top.result()[1], valid, dsrc, k, chunk)
                v, i = v.cpu(), i.cpu()
                v[~valid.cpu()], i[~valid.cpu()] = float("nan"), -1
                rows = slice(q0, q0 + qbatch[0].shape[0])
                out_v[rows], out_i[rows] = v.to(sim.dtype), i
                bar.update(1)
        report.emit()
        return out_v, out_i

    def _candidates(self, fq: Tensor, C: int, faiss: Any) -> _Top:
        """Top-C inner products of the query features [Q, W] with every stored row, streaming the shards."""
        Q = fq.shape[0]
        top = _Top(Q, C, fq.device)
        rows_per_block = max(1, min(_SCORE_ELEMS // Q, _FEATURE_BYTES // (4 * self.width)))
        fq_np = fq.cpu().numpy() if faiss is not None else None
        for entry in self.manifest["shards"]:
            array = st.load_shard(self.path, entry)
            zero = torch.tensor(entry.get("zero_rows", []), dtype=torch.long) - entry["start"]
            for a in range(0, array.shape[0], rows_per_block):
                b = min(array.shape[0], a + rows_per_block)
                rows = np.array(array[a:b], dtype=np.float32)  # a writable copy read from disk
                local_zero = zero[(zero >= a) & (zero < b)] - a
                if faiss is not None:
                    flat = faiss.IndexFlatIP(self.width)
                    flat.add(rows)
                    D, I = flat.search(fq_np, min(b - a, C + len(local_zero)))
                    values = torch.from_numpy(D).to(fq.device)
                    local = torch.from_numpy(I).long().to(fq.device)
                    if len(local_zero):
                        values[torch.isin(local, local_zero.to(fq.device))] = float("-inf")
                    values[local < 0] = float("-inf")
                    top.update(values, local.clamp_min(0) + entry["start"] + a)
                else:
                    scores = fq @ torch.from_numpy(rows).to(fq.device).T
                    if len(local_zero):
                        scores[:, local_zero.to(fq.device)] = float("-inf")
                    c = min(C, b - a)
                    best = scores.topk(c, dim=1)
                    top.update(best.values, best.indices + entry["start"] + a)
        return top

    def _rerank(self, qbatch: Batch, q0: int, cand: Tensor, valid: Tensor, dsrc: Source, k: int, chunk: int
                ) -> tuple[Tensor, Tensor]:
        """Exact similarities of each query with its candidates, grouping queries that share candidates."""
        sim = self.sim
        Q, C = cand.shape
        out_v = torch.full((Q, k), float("nan"), dtype=sim.dtype)
        out_i = torch.full((Q, k), -1, dtype=torch.long)
        cand = cand.cpu()
        # Preparing a sample (its kernel-corrected gradient) costs ~1000x more than one pair of an exact
        # tile (measured: 7-230 us vs 0.02-0.1 us on the digits models), so queries that share candidates are
        # re-ranked together against the union of their candidates, up to ``cap`` rows (also bounded in bytes).
        cap = max(C, min(_RERANK_ROWS, _FEATURE_BYTES // max(1, self._sample_bytes)))
        source = dsrc
        if dsrc.kind == "loader" and not _loader_random_access(dsrc.data):
            # One streaming pass fetches the candidates of the whole block, then tensors are indexed.
            union = sorted(set(cand[cand >= 0].tolist()))
            rows = _fetch_rows(dsrc, union, chunk)
            source = Source(rows, len(union), "tensors")
            remap = torch.full((self.n,), -1, dtype=torch.long)
            remap[torch.tensor(union, dtype=torch.long)] = torch.arange(len(union))
        else:
            remap = None

        def flush(group: list[int], union: set[int]) -> None:
            ids = sorted(union)
            where = torch.tensor(ids, dtype=torch.long)
            rows = _fetch_rows(source, ids if remap is None else remap[where].tolist(), chunk)
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
            v = values.gather(1, best.indices)
            i = cq.gather(1, best.indices)
            missing = torch.isneginf(best.values)
            out_v[qs, :kk] = v.masked_fill(missing, float("nan")).to(sim.dtype)
            out_i[qs, :kk] = i.masked_fill(missing, -1)

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

    def _check_layout(self, width: int) -> None:
        layout = self.manifest["layout"]
        if self.sim.d != layout["d"] or self.sim._d_eff != layout["d_eff"]:
            raise st.StoreError(f"the analysed output has d = {self.sim.d}, the store was built with d = {layout['d']}")
        if width != self.width:
            raise st.StoreError(f"the query features have width {width}, the stored rows {self.width}: the "
                                "projection or model layout differs from the store's")

    def _check_inputs(self, src: Source, name: str) -> None:
        sig = _signature(src.first())
        stored = self.manifest["config"].get("input_signature")
        if stored is not None and sig != stored:
            raise InputError(f"{name} samples have (shape, dtype) {sig}, but the index was built on samples "
                             f"{stored}")

    def _check_data(self, src: Source) -> None:
        cfg = self.manifest["config"]
        if len(src) != self.n:
            raise InputError(f"data has {len(src)} samples but the index was built on {self.n}: pass the data "
                             "the index was built from, in the same order")
        self._check_inputs(src, "data")
        digest = _sample_digest(src.first())
        if cfg.get("first_sample_sha256") not in (None, digest):
            raise InputError("data differ from the data the index was built from (the first sample differs: "
                             "other data, another order, or random transforms); pass the same data, same order")

    # ------------------------------------------------------------------ quality
    def recall(self, queries: Any, data: Any, k: int = 10, *, rerank: bool = True, candidates: int | None = None,
               backend: Backend = "auto") -> float:
        """recall@k of :meth:`search` against the exact ``Similarity.neighbors(queries, data, k)``.

        The mean, over queries with a defined neighbourhood, of |found ∩ exact| / |exact|. ``rerank=True``
        measures the full search (candidates re-ranked exactly); ``rerank=False`` the projection alone.
        """
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


def _itemsize(dtype: str) -> int:
    t = getattr(torch, dtype.removeprefix("torch."), None)
    return t.itemsize if isinstance(t, torch.dtype) else 8


def _nnsim_version() -> str | None:
    import nnsim  # at call time: nnsim/__init__ may still be importing this module

    return getattr(nnsim, "__version__", None)


def _dtype_name(dtype: Any) -> str:
    names = {"float32": "float32", "float16": "float16", np.float32: "float32", np.float16: "float16",
             torch.float32: "float32", torch.float16: "float16"}
    try:
        return names[dtype]
    except (KeyError, TypeError):
        if isinstance(dtype, np.dtype) and dtype.name in st.DTYPES:
            return dtype.name
        raise InputError(f"dtype must be 'float32' or 'float16', got {dtype!r}") from None
