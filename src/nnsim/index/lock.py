"""One build at a time per store folder: an advisory lock file naming its holder (pid, host, start time).

The lock is ``fcntl.flock`` on ``.nnsim-build.lock`` in the store folder: the operating system releases it
when its holder exits, however it exits, so a lock left by a process that died is simply taken over (its
file still names the dead holder until the new one writes itself in). Without ``fcntl`` (Windows) the file
is created exclusively instead, and a lock whose holder is a dead process of this host is taken over.
Nothing here knows about models or stores.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from . import store

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

LOCK = store.LOCK


class LockedError(store.StoreError):
    """Another build holds the store folder's lock."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists, owned by someone else
    return True


def _describe(folder: Path, holder: dict[str, Any] | None) -> str:
    if not holder:
        who = "another process (it has not written its details yet)"
    else:
        started = holder.get("started", 0.0)
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(started)) if isinstance(started, (int, float)) \
            else "?"
        age = time.time() - started if isinstance(started, (int, float)) else float("nan")
        who = (f"pid {holder.get('pid')} on host {holder.get('host')!r}, started {when} ({age:.0f} s ago)"
               + (f": {holder['command']}" if holder.get("command") else ""))
    return (f"another nnsim index build is writing to {folder}: {who}. Wait for it to finish (then this build "
            "resumes or reuses its store), stop it, or build into another folder; a lock whose holder died is "
            "taken over automatically")


def _read(path: Path) -> dict[str, Any] | None:
    try:
        holder = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


class BuildLock:
    """``with BuildLock(folder):`` holds the folder's build lock, or raises :class:`LockedError` naming the holder."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK
        self._fd: int | None = None

    def _info(self) -> bytes:
        return json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                           "command": " ".join(sys.argv)[:200]}).encode()

    def acquire(self) -> BuildLock:
        if fcntl is None:  # pragma: no cover - Windows
            return self._acquire_exclusive()
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                os.close(fd)
                if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise LockedError(_describe(self.folder, _read(self.path))) from None
                warnings.warn(f"{self.folder}: the filesystem does not support file locks ({err}); concurrent "
                              "builds into this folder are not detected", UserWarning, stacklevel=3)
                return self
            try:  # the holder before us may have unlinked the file after we opened it: lock the current one
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, self._info())
        os.fsync(fd)
        self._fd = fd
        return self

    def _acquire_exclusive(self) -> BuildLock:  # pragma: no cover - Windows
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder = _read(self.path)
                if holder and holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int) \
                        and not _pid_alive(holder["pid"]):
                    self.path.unlink(missing_ok=True)  # a dead holder of this host: take over
                    continue
                raise LockedError(_describe(self.folder, holder)) from None
            os.write(fd, self._info())
            self._fd = fd
            return self
        raise LockedError(_describe(self.folder, _read(self.path)))

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            self.path.unlink(missing_ok=True)  # while still holding it: a waiter re-checks the inode
        finally:
            os.close(fd)  # releases the flock

    def __enter__(self) -> BuildLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()
