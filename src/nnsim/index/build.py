"""Building a feature store: configuration, lock, resume, shards, and the digest of the data read.

``build_store`` writes (or resumes) the store at a folder under :class:`~nnsim.index.lock.BuildLock`.
The shard layout depends only on the data length and the shard size, never on the number of processes, so
each shard's manifest entry carries the sha256 of the samples it was computed from (``data_sha256``,
hashed while they are read) and the store's data digest is the hash of those, in order: the same for any
world size and chunk size. A resume checks the finished shards' data, a search or open with data checks all.
"""

from __future__ import annotations

import functools
import hashlib
import time
import warnings
from collections.abc import Callable, Iterator
from itertools import groupby
from operator import itemgetter
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from .. import distributed
from ..engine import RankReport
from ..errors import InputError
from ..inputs import Batch, Source
from ..similarity import Similarity
from . import features as ft
from . import store
from .lock import BuildLock

_SHARD_BYTES = 2**26  # default target size of one shard file
DATA_SCHEME = "nnsim-data/1"
T = TypeVar("T")


# ---------------------------------------------------------------------------------------------- data digest
class DataDigest:
    """sha256 of a run of samples' bytes in dataset order, independent of how they are split into chunks.

    One hash per input of the tuple, each fed the contiguous row-major bytes of that input's rows: the
    concatenation of chunks [a, b) and [b, c) is the bytes of [a, c), whatever b is."""

    def __init__(self) -> None:
        self._hashes: list[Any] = []
        self.rows = 0

    def update(self, batch: Batch) -> None:
        if not self._hashes:
            for k, t in enumerate(batch):
                h = hashlib.sha256(f"{DATA_SCHEME}\0{k}\0{tuple(t.shape[1:])}\0{t.dtype}\0".encode())
                self._hashes.append(h)
        if len(batch) != len(self._hashes):
            raise InputError(f"data chunks hold {len(batch)} inputs, earlier ones {len(self._hashes)}")
        for h, t in zip(self._hashes, batch):
            ft.hash_bytes(h, t)
        self.rows += batch[0].shape[0]

    def hexdigest(self) -> str:
        out = hashlib.sha256(f"{DATA_SCHEME}\0rows={self.rows}\0".encode())
        for h in self._hashes:
            out.update(h.digest())
        return out.hexdigest()


def combine_digests(shard_digests: list[str]) -> str:
    """The store's data digest: sha256 of the shards' data digests in row order."""
    return hashlib.sha256(("\0".join([DATA_SCHEME, *shard_digests])).encode()).hexdigest()


def shard_pieces(src: Source, ranges: list[tuple[int, int]], todo: list[int], chunk: int
                 ) -> Iterator[tuple[int, int, Batch]]:
    """(shard id, global start, batch) pieces covering the shards ``todo`` (sorted), in order; group them by
    shard with :func:`itertools.groupby`.

    A sliceable source (tensors, map-style dataset) is read only where needed (``rows(a, b)``); any other is
    streamed once from the start up to the last wanted shard, its chunks split at shard boundaries (the
    samples of the shards not wanted are read and dropped)."""
    if src.sliceable:
        for i in todo:
            a, b = ranges[i]
            yield from ((i, a + s, batch) for s, batch in src.rows(a, b).chunks(chunk))
        return
    if not todo:
        return
    size, wanted, end = ranges[0][1] - ranges[0][0], set(todo), ranges[todo[-1]][1]
    for s, batch in src.chunks(chunk):
        if s >= end:
            return
        pos, stop = s, s + batch[0].shape[0]
        while pos < stop:
            i, cut = pos // size, min(stop, (pos // size + 1) * size)
            if i in wanted:
                yield i, pos, tuple(t[pos - s : cut - s] for t in batch)
            pos = cut


def data_digests(src: Source, ranges: list[tuple[int, int]], ids: list[int], chunk: int) -> dict[int, str]:
    """{shard id: data digest of its rows in ``src``} for the shards ``ids`` (reads only, computes nothing)."""
    out = {i: "<0 rows>" for i in ids}
    for i, pieces in groupby(shard_pieces(src, ranges, sorted(ids), chunk), key=itemgetter(0)):
        digest = DataDigest()
        for _, _, batch in pieces:
            digest.update(batch)
        out[i] = digest.hexdigest() if digest.rows == ranges[i][1] - ranges[i][0] else f"<{digest.rows} rows>"
    return out


def differing_rows(src: Source, manifest: dict[str, Any], chunk: int, comm: distributed.Comm | None = None
                   ) -> list[tuple[int, int]]:
    """Row ranges [a, b) of the shards whose data in ``src`` differ from those the store was built from."""
    cfg = manifest["config"]
    ranges = store.shard_ranges(cfg["n"], cfg["shard_size"])
    entries = {e["start"] // cfg["shard_size"]: e for e in manifest["shards"]}
    ids = sorted(entries)
    now = _gathered(comm, data_digests(src, ranges, _share(ids, comm), chunk))
    return [ranges[i] for i in ids if now[i] != entries[i].get("data_sha256")]


def describe_rows(rows: list[tuple[int, int]]) -> str:
    shown = ", ".join(f"[{a}, {b})" for a, b in rows[:6]) + (", ..." if len(rows) > 6 else "")
    return f"rows {shown} ({sum(b - a for a, b in rows)} samples in {len(rows)} shard(s))"


# ---------------------------------------------------------------------------------------------- the build
def build_store(sim: Similarity, src: Source, folder: Path, dim: int, seed: int, shard_size: int | None,
                dtype: str, overwrite: bool, group: Any) -> dict[str, Any]:
    """Write or resume the store at ``folder`` for ``src`` (validated arguments) and return its manifest."""
    first = src.first()
    config = {
        **ft.model_config(sim), "projection": ft.PROJECTION, "seed": seed, "dim": dim, "dtype": dtype,
        "n": len(src), "input_signature": ft.signature(first), "first_sample_sha256": ft.sample_digest(first),
    }
    probe = ft.projection_probe(dim, seed)
    comm = distributed.resolve(group)
    lock = BuildLock(folder)
    try:
        if comm is not None:
            distributed.agree(comm, "the index build (model, data, settings, path)",
                              (config, shard_size, overwrite, str(folder)))
        fresh = _on_rank0(comm, lambda: _take(folder, lock))
        # Every rank computes the same centre from the same rows (it is needed to fill rows).
        proj = distributed.run_together(comm, lambda: ft.make_projection(sim, src, dim, seed))
        manifest = _on_rank0(comm, lambda: _start(sim, folder, config, shard_size, probe, overwrite, proj, src,
                                                  fresh))
        distributed.run_together(comm, lambda: _check_visible(folder))
        _fill(sim, src, folder, manifest, proj, comm)
    finally:
        lock.release()  # rank 0's; _fill ends with a barrier, so every rank is done writing
    return manifest


def _on_rank0(comm: distributed.Comm | None, fn: Callable[[], T]) -> T:
    """``fn()`` on rank 0 (raised on every rank if it fails there), its result broadcast to every rank."""
    if comm is None:
        return fn()
    return distributed.broadcast_object(comm, distributed.run_together(comm, lambda: fn() if comm.rank == 0 else None))


def _check_visible(folder: Path) -> None:
    if not (folder / store.MANIFEST).is_file():
        raise InputError(f"{folder} holds no manifest on this rank although rank 0 wrote one: the store must be on "
                         "a filesystem shared by all ranks")


def _share(ids: list[int], comm: distributed.Comm | None) -> list[int]:
    return ids if comm is None else ids[comm.rank::comm.world]


def _gathered(comm: distributed.Comm | None, part: dict[int, Any]) -> dict[int, Any]:
    """The union of every rank's ``part`` ({shard id: value})."""
    return part if comm is None else {i: v for p in distributed.all_gather_object(comm, part) for i, v in p.items()}


def _take(folder: Path, lock: BuildLock) -> bool:
    """Create the folder if needed and take its build lock, before anything is read; whether it is new."""
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{folder} exists and is not a folder; choose a folder path for the store")
    fresh = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    lock.acquire()
    return fresh


def _start(sim: Similarity, folder: Path, config: dict[str, Any], shard_size: int | None, probe: list[float],
           overwrite: bool, proj: ft.Projection, src: Source, fresh: bool) -> dict[str, Any]:
    """The manifest of the compatible store at ``folder`` (locked), or a new empty one written there."""
    from .. import __version__  # at call time: nnsim/__init__ may still be importing this module

    manifest = None if fresh else _existing(folder, config, shard_size, probe, overwrite)
    centre = None if proj.centre_projected is None else proj.centre_projected.tolist()
    if manifest is not None and not _same_centre(manifest["layout"].get("centre"), centre):
        raise store.StoreError(f"{folder}: the centre recomputed from the data's reference rows differs from the "
                            "stored one: the data changed. Pass the same data in the same order, or rebuild the "
                            "store (overwrite=True)")
    if manifest is None:
        width = proj.width + 1  # the sketch, then <u, c>
        itemsize = np.dtype(store.DTYPES[config["dtype"]]).itemsize
        size = shard_size or max(1, min(len(src), _SHARD_BYTES // (width * itemsize)))
        manifest = {
            "format": store.FORMAT, "version": store.VERSION, "complete": False,
            "config": {**config, "shard_size": size},
            "layout": {"width": width, "d": sim.d, "d_eff": sim.d_eff, "sketch": proj.width, "exact": proj.exact,
                       "centre_rows": proj.centre_rows, "centre": centre},
            "projection_probe": probe, "shards": [],
            "info": {"nnsim": __version__, "torch": torch.__version__, "numpy": np.__version__,
                     "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
        }
        store.write_manifest(folder, manifest)
    return manifest


def _existing(folder: Path, config: dict[str, Any], shard_size: int | None, probe: list[float],
              overwrite: bool) -> dict[str, Any] | None:
    """The manifest of a compatible partial or complete store at ``folder``, or None to start afresh."""
    if overwrite:
        store.clear(folder)
    if not (folder / store.MANIFEST).exists():
        others = [p.name for p in folder.iterdir() if not store.is_store_file(p.name)]
        if others and not overwrite:
            raise InputError(f"{folder} is not empty and holds no nnsim feature store ({others[:5]}); choose an "
                             "empty or new folder (or overwrite=True: other files are left untouched)")
        return None
    try:
        manifest = store.read_manifest(folder)
    except store.StoreError as err:
        raise store.StoreError(f"cannot resume: {err}") from err
    stored = manifest["config"]
    current = {**config, "shard_size": shard_size or stored["shard_size"]}
    diffs = store.describe_differences(stored, current)
    if not ft.probe_matches(manifest.get("projection_probe"), probe):
        diffs.append(store.describe_differences({"projection_probe": manifest.get("projection_probe")},
                                             {"projection_probe": probe})[0])
    if diffs:
        raise store.StoreError(f"{folder} holds a feature store built differently:\n  " + "\n  ".join(diffs)
                            + "\nUse a new path, or overwrite=True to rebuild it.")
    return manifest


def _finished(folder: Path, manifest: dict[str, Any], ranges: list[tuple[int, int]]
              ) -> tuple[dict[int, dict[str, Any]], dict[int, dict[str, Any]]]:
    """The finished shards by id (those of the manifest, then those a crashed multi-process build published
    next to them), and the published entries."""
    shard_size = manifest["config"]["shard_size"]
    finished: dict[int, dict[str, Any]] = {}
    published = store.read_entries(folder)
    for entry in [*manifest["shards"], *published.values()]:
        i = entry["start"] // shard_size
        if i >= len(ranges) or (entry["start"], entry["stop"]) != ranges[i]:
            if entry in published.values():
                continue  # a stray published entry (another layout): its shard is computed again
            raise store.StoreError(f"{folder / store.MANIFEST} is corrupted: shard {entry['file']} covers rows "
                                   f"[{entry['start']}, {entry['stop']}), not a shard of this layout; rebuild it "
                                   "(overwrite=True)")
        finished.setdefault(i, entry)
    return finished, published


def _verified(src: Source, folder: Path, manifest: dict[str, Any], finished: dict[int, dict[str, Any]], chunk: int,
              comm: distributed.Comm | None) -> dict[int, dict[str, Any]]:
    """The finished shards whose file checks out (the others are recomputed, with a warning); refuses data
    that differ from those they were computed from. One read of every finished shard and of its data, each
    rank checking its share."""
    cfg, width = manifest["config"], manifest["layout"]["width"]
    ids = sorted(finished)
    problems = _gathered(comm, {i: store.check_shard(folder, finished[i], width, cfg["dtype"])
                                for i in _share(ids, comm)})
    changed = differing_rows(src, {"config": cfg, "shards": [finished[i] for i in ids]}, chunk, comm)
    if changed:
        raise store.StoreError(f"{folder}: the data differ from those its finished shards were computed from "
                               f"({describe_rows(changed)}): other data, another order, or random transforms. "
                               "Pass the same data in the same order, or rebuild the store (overwrite=True)")
    for i in ids:
        if problems[i] is not None:
            warnings.warn(f"{folder}: {problems[i]}; recomputing that shard", UserWarning, stacklevel=5)
    return {i: finished[i] for i in ids if problems[i] is None}


def _fill_shard(sim: Similarity, proj: ft.Projection, report: RankReport, array: np.ndarray,
                pieces: Iterator[tuple[int, int, Batch]], span: tuple[int, int], width: int, n: int) -> dict[str, Any]:
    """Write the rows of the shard [start, stop) into ``array``; its manifest entry."""
    start, stop = span
    zero: list[int] = []
    digest = DataDigest()
    filled = start
    for _, s, batch in pieces:
        digest.update(batch)
        feats, rank = ft.chunk_features(sim, batch, s, proj, report)
        _write_rows(array, s - start, feats, width)
        zero += (torch.nonzero(rank == 0).flatten() + s).tolist()
        filled = s + feats.shape[0]
        if filled == stop:  # read nothing more before the shard is published (groupby would read ahead)
            break
    if filled != stop:
        raise InputError(f"data yielded {filled} samples, but its length is {n}: a sized data set must yield "
                         "exactly len(data) samples")
    return {"start": start, "stop": stop, "zero_rows": zero, "data_sha256": digest.hexdigest()}


def _fill(sim: Similarity, src: Source, folder: Path, manifest: dict[str, Any], proj: ft.Projection,
          comm: distributed.Comm | None = None) -> None:
    """Compute every shard not yet finished (verifying the finished ones), then mark the store complete.

    Finished shards are those of the manifest and those whose entry a (crashed) multi-process build
    published next to them; their checksum and the digest of their data in ``src`` must match. With
    ``comm``, the ranks verify and compute balanced shares of the shards and rank 0 alone writes the manifest."""
    cfg, width = manifest["config"], manifest["layout"]["width"]
    ranges = store.shard_ranges(cfg["n"], cfg["shard_size"])
    main = comm is None or comm.rank == 0
    finished, published = _finished(folder, manifest, ranges)
    chunk = ft.compute_chunk(sim, src, width)
    done = _verified(src, folder, manifest, finished, chunk, comm)
    kept = [done[i] for i in sorted(done)]
    if main and [e["start"] for e in manifest["shards"]] != [e["start"] for e in kept]:
        manifest["shards"], manifest["complete"] = kept, False
        store.write_manifest(folder, manifest)
    manifest["shards"] = kept
    todo = [i for i in range(len(ranges)) if i not in done]
    mine = todo[slice(*distributed.split(len(todo), *((0, 1) if comm is None else (comm.rank, comm.world))))]
    report = ft.rank_notes("data")

    def compute() -> list[dict[str, Any]]:
        written: list[dict[str, Any]] = []
        if not mine:
            return written
        with tqdm(total=len(ranges), initial=len(done), disable=not sim.progress or not main, desc="nnsim index",
                  unit="shard") as bar:
            for i, pieces in groupby(shard_pieces(src, ranges, mine, chunk), key=itemgetter(0)):
                start, stop = ranges[i]
                fill = functools.partial(_fill_shard, sim, proj, report, pieces=pieces, span=ranges[i], width=width,
                                         n=cfg["n"])
                entry = store.write_shard(folder, i, stop - start, width, cfg["dtype"], fill)
                written.append(entry)
                if comm is None:
                    manifest["shards"] = sorted([*manifest["shards"], entry], key=lambda e: e["start"])
                    store.write_manifest(folder, manifest)
                else:  # the manifest is rank 0's: publish the entry next to the shard
                    store.write_entry(folder, i, entry)
                bar.update(1)
        return written

    written = distributed.run_together(comm, compute)
    if comm is not None:
        new = [e for part in distributed.all_gather_object(comm, written) for e in part]
        manifest["shards"] = sorted([*manifest["shards"], *new], key=lambda e: e["start"])
        report.merge(distributed.all_gather_object(comm, report.notes()))
    report.emit()
    _complete(folder, manifest, len(ranges), bool(published), comm)


def _complete(folder: Path, manifest: dict[str, Any], n_shards: int, published: bool,
              comm: distributed.Comm | None) -> None:
    """Mark the store complete (with the digest of its data), on disk by rank 0, once every shard is there."""
    if len(manifest["shards"]) != n_shards:
        raise InputError(f"data yielded fewer samples than its length {manifest['config']['n']}: a sized data "
                         "set must yield exactly len(data) samples")
    data = {"scheme": DATA_SCHEME, "sha256": combine_digests([e["data_sha256"] for e in manifest["shards"]])}
    main = comm is None or comm.rank == 0
    if main and (not manifest["complete"] or published or comm is not None or manifest.get("data") != data):
        manifest["complete"], manifest["data"] = True, data
        store.write_manifest(folder, manifest)
        store.remove_entries(folder)
    manifest["complete"], manifest["data"] = True, data
    if comm is not None:
        distributed.barrier(comm.group)  # every rank returns once the manifest is complete on disk


def _same_centre(stored: Any, now: list[float] | None) -> bool:
    if stored is None or now is None:
        return stored is None and now is None
    a, b = np.asarray(stored, dtype=np.float64), np.asarray(now, dtype=np.float64)
    return a.shape == b.shape and bool(np.allclose(a, b, rtol=1e-5, atol=1e-7 * max(1.0, float(np.abs(b).max()))))


def _write_rows(array: np.ndarray, row: int, feats: Tensor, width: int) -> None:
    if feats.shape[1] != width:
        raise store.StoreError(f"the features have width {feats.shape[1]}, the store {width}: the model or output "
                            "changed; rebuild the store")
    if feats.dtype not in (torch.float32, torch.float64):
        feats = feats.float()  # numpy has no bfloat16
    array[row : row + feats.shape[0]] = feats.cpu().numpy()
