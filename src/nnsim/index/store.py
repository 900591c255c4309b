"""The on-disk feature store: a folder of ``.npy`` shards and a JSON manifest.

Layout of a store folder::

    manifest.json        format, configuration (model fingerprint, projection, dtype, ...), finished shards
    shard-00000.npy      rows [0, shard_size) of the projected features, [rows, width]
    shard-00001.npy      ...
    shard-00001.json     (while a multi-process build runs) the shard's manifest entry, written by the rank
                         that computed it; rank 0 moves the entries into the manifest at the end


Crash safety: a shard is written through a numpy memmap under a temporary name, flushed, checksummed
(sha256 of the file), renamed into place with ``os.replace`` and only then recorded in the manifest,
which is itself replaced atomically. A crash therefore loses at most the shard being written; a shard
listed in the manifest is complete, and its checksum says whether it was altered since. In a multi-process
build the ranks do not share the manifest: each publishes a finished shard's entry next to it (atomically,
after the shard), so that a crashed build leaves every finished shard recorded; a resumed build adopts them.

Nothing here knows about models: :mod:`nnsim.index.build` fills the store, :mod:`nnsim.index.search` reads it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError

FORMAT = "nnsim.FeatureIndex"
VERSION = 2  # 2: per-shard data digests, centred rows (one extra column), sketch projection
MANIFEST = "manifest.json"
LOCK = ".nnsim-build.lock"  # see nnsim.index.lock
_SHARD_RE = re.compile(r"^\.?shard-\d{5,}\.npy(\.tmp)?$")
_ENTRY_RE = re.compile(r"^\.?shard-(\d{5,})\.json(\.tmp)?$")
DTYPES = {"float32": np.float32, "float16": np.float16}


class StoreError(InputError):
    """A feature store that cannot be used as asked: foreign, corrupted, incomplete or built differently."""


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.npy"


def sha256_file(path: Path, block: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # not supported on this platform (e.g. Windows)
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_json(folder: Path, name: str, value: Any, tmp: str, indent: int | None = None) -> None:
    """Write ``folder / name`` atomically and durably: the temporary file ``tmp``, fsync, ``os.replace``, fsync
    of the folder."""
    with open(folder / tmp, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=indent)
        f.write("\n" if indent is not None else "")
        f.flush()
        os.fsync(f.fileno())
    os.replace(folder / tmp, folder / name)
    _fsync_dir(folder)


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    _write_json(folder, MANIFEST, manifest, MANIFEST + ".tmp", indent=1)


_REQUIRED = {"format": str, "version": int, "complete": bool, "config": dict, "layout": dict, "shards": list}
_REQUIRED_CONFIG = ("model_fingerprint", "params", "seed", "dim", "dtype", "n", "shard_size")
_REQUIRED_LAYOUT = ("width", "d", "d_eff", "sketch")


def read_manifest(folder: Path) -> dict[str, Any]:
    """Read and validate ``manifest.json``; raise :class:`StoreError` saying what is wrong."""
    path = folder / MANIFEST
    if not path.is_file():
        raise StoreError(f"{folder} is not an nnsim feature store (no {MANIFEST}); build one with "
                         "nnsim.FeatureIndex.build(sim, data, path)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise StoreError(f"{path} is corrupted or truncated ({err}); rebuild the store with "
                         "nnsim.FeatureIndex.build(..., overwrite=True) or use a new path") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise StoreError(f"{path} is not an nnsim feature-store manifest (format {found!r}, expected {FORMAT!r}); "
                         "use another path, or overwrite=True to replace it")
    if not isinstance(manifest.get("version"), int) or manifest["version"] > VERSION:
        raise StoreError(f"{path} has format version {manifest.get('version')!r}; this nnsim reads version "
                         f"{VERSION}: upgrade nnsim or rebuild the store")
    if manifest["version"] < VERSION:
        raise StoreError(f"{path} has format version {manifest['version']}, written by an older nnsim (it lacks "
                         f"the data digests and the centred rows of version {VERSION}); rebuild the store with "
                         "this nnsim (overwrite=True, or `nnsim index build --overwrite`)")
    for key, kind in _REQUIRED.items():
        if not isinstance(manifest.get(key), kind):
            raise StoreError(f"{path} is corrupted: field {key!r} is missing or not a {kind.__name__}; "
                             "rebuild the store (overwrite=True)")
    missing = [k for k in _REQUIRED_CONFIG if k not in manifest["config"]]
    missing += [k for k in _REQUIRED_LAYOUT if not isinstance(manifest["layout"].get(k), int)]
    if missing:
        raise StoreError(f"{path} is corrupted: missing fields {missing}; rebuild the store (overwrite=True)")
    n, size = manifest["config"]["n"], manifest["config"]["shard_size"]
    if not (isinstance(n, int) and isinstance(size, int) and n >= 1 and size >= 1):
        raise StoreError(f"{path} is corrupted: n={n!r}, shard_size={size!r}; rebuild the store (overwrite=True)")
    for entry in manifest["shards"]:
        ok = isinstance(entry, dict) and isinstance(entry.get("file"), str) and isinstance(entry.get("sha256"), str)
        ok = ok and isinstance(entry.get("start"), int) and isinstance(entry.get("stop"), int)
        ok = ok and _SHARD_RE.match(entry["file"]) is not None and os.sep not in entry["file"]
        if not ok:
            raise StoreError(f"{path} is corrupted: bad shard entry {entry!r}; rebuild the store (overwrite=True)")
    return manifest


def shard_ranges(n: int, shard_size: int) -> list[tuple[int, int]]:
    return [(s, min(n, s + shard_size)) for s in range(0, n, shard_size)]


def write_shard(folder: Path, i: int, rows: int, width: int, dtype: str,
                fill: Callable[[np.ndarray], dict[str, Any]]) -> dict[str, Any]:
    """Create shard ``i`` as a [rows, width] memmap under a temporary name, let ``fill`` write it, then publish it.

    ``fill(array)`` writes every row and returns extra manifest fields for the shard. Returns the shard's
    manifest entry (file name and sha256 added). If ``fill`` raises, the temporary file is left behind and
    overwritten by the next attempt; nothing is published.
    """
    name = shard_name(i)
    tmp = folder / f".{name}.tmp"
    array = np.lib.format.open_memmap(tmp, mode="w+", dtype=DTYPES[dtype], shape=(rows, width))
    try:
        extra = fill(array)
        array.flush()
    finally:
        del array  # closes the map
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    digest = sha256_file(tmp)
    os.replace(tmp, folder / name)
    return {"file": name, **extra, "sha256": digest}


def check_shard(folder: Path, entry: dict[str, Any], width: int, dtype: str, checksum: bool = True) -> str | None:
    """Why the shard recorded by ``entry`` is unusable (missing, wrong shape, checksum mismatch), or None."""
    path = folder / entry["file"]
    if not path.is_file():
        return f"{entry['file']} is missing"
    if checksum:
        digest = sha256_file(path)
        if digest != entry["sha256"]:
            return f"{entry['file']} fails its checksum (sha256 {digest[:12]}... != recorded {entry['sha256'][:12]}...)"
    try:
        array = np.load(path, mmap_mode="r")
    except (ValueError, OSError) as err:
        return f"{entry['file']} is not a readable .npy file ({err})"
    shape = (entry["stop"] - entry["start"], width)
    if array.shape != shape or array.dtype != np.dtype(DTYPES[dtype]):
        return f"{entry['file']} holds {array.dtype} {array.shape}, expected {np.dtype(DTYPES[dtype])} {shape}"
    return None


def is_store_file(name: str) -> bool:
    """Whether a file name is one the store writes (manifest, shards, and their temporary forms)."""
    return (name in (MANIFEST, MANIFEST + ".tmp", LOCK) or _SHARD_RE.match(name) is not None
            or _ENTRY_RE.match(name) is not None)


def write_entry(folder: Path, i: int, entry: dict[str, Any]) -> None:
    """Publish shard ``i``'s manifest entry as ``shard-0000i.json`` (atomically; the shard is already in place)."""
    name = f"shard-{i:05d}.json"
    _write_json(folder, name, entry, f".{name}.tmp")


def read_entries(folder: Path) -> dict[int, dict[str, Any]]:
    """The shard entries published next to their shards, {shard id: entry}; unreadable ones are ignored
    (their shard is then simply computed again)."""
    out: dict[int, dict[str, Any]] = {}
    for p in sorted(folder.iterdir()):
        m = _ENTRY_RE.match(p.name)
        if m is None or p.name.startswith(".") or not p.is_file():
            continue
        try:
            entry = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            continue
        ok = isinstance(entry, dict) and entry.get("file") == shard_name(int(m.group(1)))
        ok = ok and isinstance(entry.get("sha256"), str) and isinstance(entry.get("start"), int)
        if ok and isinstance(entry.get("stop"), int):
            out[int(m.group(1))] = entry
    return out


def remove_entries(folder: Path) -> None:
    """Delete the published shard entries (once the manifest records them)."""
    for p in folder.iterdir():
        if _ENTRY_RE.match(p.name) is not None and p.is_file():
            p.unlink()


def clear(folder: Path) -> None:
    """Remove the store's own files (manifest and shards, also temporary ones; not the build lock, which the
    caller holds); leave anything else alone."""
    for p in folder.iterdir():
        if p.is_file() and is_store_file(p.name) and p.name != LOCK:
            p.unlink()


def describe_differences(stored: dict[str, Any], current: dict[str, Any], keys: list[str] | None = None) -> list[str]:
    """Human-readable 'key: stored X, now Y' lines for the configuration entries that differ."""
    out = []
    for key in keys or sorted(set(stored) | set(current)):
        a, b = stored.get(key, "<absent>"), current.get(key, "<absent>")
        if a != b:
            out.append(f"{key}: stored {_short(a)}, now {_short(b)}{_HINTS.get(key, '')}")
    return out


_HINTS = {
    "model_fingerprint": " (the model's parameters or buffers differ in values, shapes or dtypes: another model, "
                         "or retrained since)",
    "params": " (another parameter selection)",
    "projection_probe": " (the random projection of this nnsim/torch version differs from the stored one)",
    "n": " (the data have another length)",
    "first_sample_sha256": " (the first sample differs: other data, another order, or random transforms)",
}


def _short(value: Any, limit: int = 80) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
