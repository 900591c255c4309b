"""The ``nnsim`` command line: ``nnsim demo``, ``nnsim analyze``, single steps, ``nnsim reproduce``.

See docs/cli.md. Exit codes: 0 success, 1 internal error, 2 usage error, 3 bad input (missing or corrupt file,
shapes that do not match), 4 model error (cannot load it, or it does not accept the data), 130 interrupted.
Every command also runs under ``torchrun --nproc_per_node=K -m nnsim ...``: the work is split between the
processes, rank 0 alone prints and writes, and all of them exit with the same code (docs/cli.md).
"""

from .main import main

__all__ = ["main"]
