"""What a computation asks of the engine, as small typed values instead of strings threaded through helpers."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

ALL = ""  # the group name when the kernel is not decomposed by layer


class Quantity(Enum):
    """What the chunks are prepared for and what a tile holds."""

    KERNEL = "kernel"  # K(x, x') = G(x) G(x')^T: factors as the rules made them
    SIMILARITY = "similarity"  # K~: factors mixed with K(x, x)^-1/2 (kernel-corrected gradients)
    INFLUENCE = "influence"  # K(x', x) K(x, x)^+: factors as for the kernel, plus K(x, x)^+ per sample


class Form(Enum):
    """How the factors are kept and what a tile entry is (the values are :mod:`nnsim.factors`' modes)."""

    RAW = "raw"  # factors as computed, for sums and projections (no Gram tiles)
    FULL = "full"  # d x d blocks per pair
    TRACE = "trace"  # the trace of each block (the scalar summary)


@dataclass(frozen=True)
class Request:
    """One kind of prepared chunk (and tile): ``quantity`` in ``form``, by layer or for the whole model."""

    quantity: Quantity
    form: Form
    by_layer: bool = False
