"""Data: domains, feature-file readers, named benchmarks and protocol splits."""

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
