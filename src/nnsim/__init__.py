"""nnsim: input similarity from the neural network's perspective (Charpiat et al., NeurIPS 2019)."""

from . import algebra, datasets, outputs, pairs
from .backends.rules import register_rule
from .errors import FallbackWarning, InputError, ModelError, RankDeficiencyWarning, ResultTooLargeError
from .estimators import DenoisingReport
from .index import FeatureIndex
from .similarity import Similarity
from .training import SimilarityLoss

__all__ = [
    "Similarity", "DenoisingReport", "FeatureIndex", "outputs", "algebra", "datasets",
    "InputError", "ModelError", "RankDeficiencyWarning", "ResultTooLargeError",
    "SimilarityLoss", "pairs", "FallbackWarning", "register_rule",
]
__version__ = "0.1.0"
