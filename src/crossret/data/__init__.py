"""Data: domains, feature-file readers, named benchmarks and protocol splits.

Imported here: the torch-free core. The size checks of MAT / HDF5 files (:mod:`crossret.data.declared_sizes`),
the person-retrieval datasets (:mod:`crossret.data.person`, torch and PIL), their synthetic generator and the
cross-modal Wikipedia features are imported from their own modules.
"""

from crossret.data.benchmarks import (
    BenchmarkInfo,
    benchmark_names,
    demo_domains,
    list_benchmarks,
    load_benchmark,
    make_split,
    resolve_data_dir,
)
from crossret.data.domain import Domain, RetrievalSplit
from crossret.data.readers import check_label_overlap, check_pair, detect_format, read_domain, read_domain_pair

__all__ = [
    "BenchmarkInfo",
    "Domain",
    "RetrievalSplit",
    "benchmark_names",
    "check_label_overlap",
    "check_pair",
    "demo_domains",
    "detect_format",
    "list_benchmarks",
    "load_benchmark",
    "make_split",
    "read_domain",
    "read_domain_pair",
    "resolve_data_dir",
]
