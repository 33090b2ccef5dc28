"""Graphs: kNN / mutual-kNN (faiss + scipy.sparse), COUPLE's cross-domain graph, ℓ2 flow diffusion
and weighted random walks."""

from crossret.kernel_cache import configure_numba_cache

# Before diffusion imports numba: its kernel cache goes to a user cache directory (crossret.kernel_cache).
configure_numba_cache()

from crossret.graph.cross_domain import CrossDomainGraph, build_cross_domain_graph  # noqa: E402
from crossret.graph.diffusion import (  # noqa: E402
    FlowDiffusionResult,
    check_feasible,
    class_seed_mass,
    clip_to_feasible,
    disagreement_reweight,
    l2_flow_diffusion,
    l2_flow_diffusion_active_set,
    laplacian,
)
from crossret.graph.knn import knn_search, l2_normalize, mutual_pairs  # noqa: E402
from crossret.graph.walks import Walks, random_walks  # noqa: E402

__all__ = [
    "CrossDomainGraph",
    "FlowDiffusionResult",
    "Walks",
    "build_cross_domain_graph",
    "check_feasible",
    "class_seed_mass",
    "clip_to_feasible",
    "disagreement_reweight",
    "knn_search",
    "l2_flow_diffusion",
    "l2_flow_diffusion_active_set",
    "l2_normalize",
    "laplacian",
    "mutual_pairs",
    "random_walks",
]
