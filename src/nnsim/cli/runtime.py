"""The state of one ``nnsim`` run (quiet or not, the torchrun process group), passed to every command, and the
one place where the command line prints and writes: on rank 0 only under torchrun, files atomically."""

from __future__ import annotations

import csv
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import distributed
from ..io import atomic_path


def launched_rank() -> int:
    """torchrun's RANK, known before the process group is joined (0 in a plain run)."""
    if "WORLD_SIZE" not in os.environ:
        return 0
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def main_process() -> bool:
    """Rank 0 under torchrun (also before and after the process group exists); True in a plain run."""
    return distributed.is_main_process() and launched_rank() == 0


def error(message: str, every_rank: bool = False) -> None:
    """One error line on stderr: on rank 0 only under torchrun (the ranks agree on it first, see
    :func:`nnsim.cli.main.main`), unless ``every_rank`` (a failure the ranks could not agree on), then prefixed
    with the rank."""
    if main_process() or every_rank:
        where = f"rank {launched_rank()}: " if every_rank and not main_process() else ""
        print(f"nnsim: error: {where}{' '.join(message.split())}", file=sys.stderr, flush=True)


def write_file(path: Path, write: Callable[[Path], Any]) -> None:
    """Every file the command writes (besides the library's own writers) goes through here: rank 0 only,
    atomically (``write`` fills a temporary file, renamed onto ``path``: an interrupted run never leaves half a
    file)."""
    if main_process():
        with atomic_path(path) as tmp:
            write(tmp)


def write_csv(path: Path, header: Sequence[str], rows: Any) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(header)
            w.writerows(rows)

    write_file(path, write)


@dataclass(frozen=True)
class Runtime:
    """What every command knows about its run: ``--quiet``, and the process group under ``torchrun`` (None in a
    plain run)."""

    quiet: bool = False
    comm: distributed.Comm | None = None

    @property
    def progress(self) -> bool:
        """Whether progress bars are shown (not quiet, and on rank 0)."""
        return not self.quiet and main_process()

    def say(self, message: str) -> None:
        """Every line the command prints goes through here: on rank 0 only under torchrun."""
        if self.progress:
            print(message, flush=True)

    def together(self) -> distributed.together:
        """Around each rank's local work before the next collective step (loading files, checking the model,
        writing the outputs): when it fails on one rank, every rank raises on leaving the block, instead of the
        others waiting forever for that rank in the next collective. A no-op in a plain run.

        Under torchrun every step of a command is either a collective nnsim call (density, neighbors, denoising,
        FeatureIndex.build, which fail on every rank together by themselves) or local work inside this block,
        so that all ranks always reach the exit-status exchange together.
        """
        return distributed.together(self.comm)
