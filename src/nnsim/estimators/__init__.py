"""Dataset-scale estimators built from kernel tiles and sums: pure tensor code, no modules or files."""

from .denoising import DenoisingReport, denoising_from_sums
from .reducers import TopK, row_statistic

__all__ = ["DenoisingReport", "denoising_from_sums", "TopK", "row_statistic"]
