"""How a request is executed, independent of what is estimated: typed requests, prepared chunks, the tile
sweep and the rank report. Knows nothing of processes: a sweep runs on the tile plan it is given."""

from .chunks import Chunk, Chunker
from .rank_report import RankReport
from .request import ALL, Form, Quantity, Request
from .sweep import pairwise, sweep

__all__ = ["ALL", "Chunk", "Chunker", "Form", "Quantity", "RankReport", "Request", "pairwise", "sweep"]
