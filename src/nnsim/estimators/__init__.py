"""What is estimated at dataset scale: each a small module calling the engine (nnsim.engine)."""

from .denoising import DenoisingReport, denoising_from_sums
from .density import row_statistic
from .neighbors import TopK

__all__ = ["DenoisingReport", "denoising_from_sums", "TopK", "row_statistic"]
