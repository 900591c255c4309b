"""Writing result files so that an interrupted run never leaves a truncated file under the final name.

Public (``nnsim.io``): the command line and the HTML report write every file through it, and so can a script.
The library's computations never touch files; the index's store has its own, fsynced, format (index/store.py).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path next to ``path`` to write to; renamed onto ``path`` (``os.replace``, atomic on one file
    system) when the block ends without an exception, deleted otherwise.

    The temporary name keeps the suffix (``.data.tmp-123.npz``): some writers (``np.savez``) append their own
    when it is missing.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.stem}.tmp-{os.getpid()}{final.suffix}")
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def write_atomic(path: str | Path, content: str | bytes) -> Path:
    """Write text (UTF-8) or bytes to ``path`` through :func:`atomic_path`."""
    with atomic_path(path) as tmp:
        if isinstance(content, bytes):
            tmp.write_bytes(content)
        else:
            tmp.write_text(content, encoding="utf-8")
    return Path(path)
