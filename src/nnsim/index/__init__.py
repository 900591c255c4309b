"""On-disk index of projected similarity features for repeated neighbour queries on large data.

``FeatureIndex.build(sim, data, path)`` writes seeded random projections of the kernel-corrected per-sample
gradients to a folder of ``.npy`` shards with a JSON manifest (resumable, checksummed);
``FeatureIndex.open(path, sim)`` reopens it; ``index.search(queries, k)`` finds candidates by inner product
(FAISS when installed, exact torch top-k otherwise) and re-ranks them exactly when given the data.
"""

from .feature_index import DEFAULT_DIM, FeatureIndex, model_fingerprint
from .store import StoreError

__all__ = ["FeatureIndex", "DEFAULT_DIM", "StoreError", "model_fingerprint"]
