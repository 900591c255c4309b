"""nnsim: input similarity from the neural network's perspective (Charpiat et al., NeurIPS 2019)."""

from . import algebra, outputs
from .errors import InputError, ModelError, RankDeficiencyWarning, ResultTooLargeError
from .similarity import Similarity

__all__ = [
    "Similarity", "outputs", "algebra", "InputError", "ModelError", "RankDeficiencyWarning",
    "ResultTooLargeError",
]
__version__ = "0.1.0"
