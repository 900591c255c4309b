"""``python -m nnsim ...``: the same as the ``nnsim`` command."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
