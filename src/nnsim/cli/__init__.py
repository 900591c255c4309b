"""The ``nnsim`` command line: ``nnsim demo``, ``nnsim analyze``, single steps, ``nnsim reproduce``.

See docs/cli.md. Exit codes: 0 success, 1 internal error, 2 usage error, 3 bad input (missing or corrupt file,
shapes that do not match), 4 model error (cannot load it, or it does not accept the data), 130 interrupted.
"""

from .main import main

__all__ = ["main"]
