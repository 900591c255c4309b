"""nnsim: input similarity from the neural network's perspective (Charpiat et al., NeurIPS 2019)."""

from . import algebra, datasets, outputs, pairs
from .errors import InputError, ModelError, RankDeficiencyWarning, ResultTooLargeError
from .estimators import DenoisingReport
from .index import FeatureIndex
from .similarity import Similarity
from .training import SimilarityLoss

__all__ = [
    "Similarity", "DenoisingReport", "FeatureIndex", "outputs", "algebra", "datasets",
    "InputError", "ModelError", "RankDeficiencyWarning", "ResultTooLargeError",
    "SimilarityLoss", "pairs",
]
__version__ = "0.1.0"
