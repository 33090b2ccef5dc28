"""Retrieval core: bit packing, binary and dense indexes (faiss), metrics.

Names are imported lazily so that ``import crossret.retrieval`` stays cheap (no faiss/numba
import until an index or a metric is used).
"""

from __future__ import annotations

from crossret.kernel_cache import configure_numba_cache
from crossret.lazy_exports import lazy_getattr

# Before any submodule imports numba (hamming, and metrics/index through it): numba reads the cache
# directory at import time, and the kernels' cache location when they are defined.
configure_numba_cache()

_EXPORTS = {
    "pack_codes": "crossret.retrieval.packing",
    "unpack_codes": "crossret.retrieval.packing",
    "binarize": "crossret.retrieval.packing",
    "as_packed": "crossret.retrieval.packing",
    "IndexBackend": "crossret.retrieval.backend",
    "get_backend": "crossret.retrieval.backend",
    "open_index": "crossret.retrieval.backend",
    "create_index": "crossret.retrieval.backend",
    "build_index": "crossret.retrieval.backend",
    "BinaryIndex": "crossret.retrieval.index",
    "DenseIndex": "crossret.retrieval.index",
    "MilvusBinaryIndex": "crossret.retrieval.milvus",
    "evaluate_hamming": "crossret.retrieval.metrics",
    "HammingEvaluation": "crossret.retrieval.metrics",
    "mean_average_precision": "crossret.retrieval.metrics",
    "dense_retrieval_metrics": "crossret.retrieval.metrics",
    # Encoding with a method lives in hashing (above retrieval); kept reachable here by name only.
    "encode_to_packed": "crossret.hashing.encoding",
    "build_index_from_packed": "crossret.retrieval.streaming",
    "read_packed_codes": "crossret.retrieval.streaming",
    "open_features": "crossret.retrieval.streaming",
    "recall_at_k": "crossret.retrieval.streaming",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_getattr("crossret.retrieval", _EXPORTS)
