"""`crossret warmup` compiles every kernel group into the cache; a later process loads them, compiling none.

One warm-up (a fresh process compiling everything, the slow part) is shared by the module's tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from crossret.warmup import KERNEL_GROUPS

# Kernels every install uses (metrics, exact search, distance matrix, multi-hash check, diffusion).
# The kernels the later process below runs (one-pass index rule, threshold-scan and counting top-k).
CORE_KERNELS = {"hamming._histogram_kernel", "hamming._expected_kernel", "hamming._index_walk_kernel",
                "hamming._index_score_kernel", "hamming._topk_blocked", "hamming._topk_by_query",
                "hamming._distance_kernel", "hamming._scan_bit_table", "diffusion._block_cg_kernel"}
# The warm-up also compiles the two-pass index rule (labels too large to record in one pass).
CACHED_KERNELS = CORE_KERNELS | {"hamming._index_rank_kernel"}


def _env(cache: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    return {**env, "CROSSRET_CACHE_DIR": str(cache)}


@pytest.fixture(scope="module")
def warmed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    cache = tmp_path_factory.mktemp("warm-cache")
    result = subprocess.run([sys.executable, "-m", "crossret", "warmup", "--json"], env=_env(cache),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    return cache, json.loads(result.stdout.strip().splitlines()[-1])


def test_warmup_reports_every_group_and_fills_the_cache(warmed: tuple[Path, dict]) -> None:
    cache, report = warmed
    assert list(report["seconds"]) == list(KERNEL_GROUPS)
    assert all(isinstance(s, float) and s >= 0 for s in report["seconds"].values())
    assert report["total_seconds"] == pytest.approx(sum(report["seconds"].values()))
    assert report["cache_dir"] == str(cache / "numba")
    cached = {p.name.split("-")[0] for p in (cache / "numba").rglob("*.nbi")}
    assert CACHED_KERNELS <= cached, CACHED_KERNELS - cached


# Typical work of a later process, through the public API (not the warm-up's own calls): both metric
# tie rules at 64 and 128 bits, flat-index search with many queries (small and large k) and with one query over a large
# database, the distance matrix, a multi-hash index round trip and COUPLE's diffusion. Reports numba's
# per-kernel cache statistics.
_LATER_PROCESS = """
import json, tempfile
from pathlib import Path
import numpy as np
import scipy.sparse as sp
from numba.core.registry import CPUDispatcher
from crossret.retrieval import hamming
from crossret.graph import diffusion
from crossret.retrieval.index import BinaryIndex
from crossret.retrieval.metrics import evaluate_hamming
from crossret.retrieval.packing import pack_codes

rng = np.random.default_rng(5)
codes = lambda n, bits: np.where(rng.random((n, bits)) < 0.5, -1, 1).astype(np.int8)
for bits in (64, 128):
    for ties in ("expected", "index"):
        evaluate_hamming(codes(30, bits), codes(500, bits), rng.integers(0, 4, 30), rng.integers(0, 4, 500),
                         ties=ties, topk=50)
index = BinaryIndex.from_packed(pack_codes(codes(1 << 18, 64)), 64)
index.search(pack_codes(codes(40, 64)), 10)
index.search(pack_codes(codes(40, 64)), 1000)
index.search(pack_codes(codes(1, 64)), 10)
hamming.hamming_distances(pack_codes(codes(3, 64)), pack_codes(codes(5, 64)), 64)
multi = BinaryIndex(32, kind="multihash", nhash=2, b=8)
multi.add(pack_codes(codes(30, 32)))
with tempfile.TemporaryDirectory() as tmp:
    BinaryIndex.load(multi.save(Path(tmp) / "m.crbi"))
path = sp.csr_matrix(np.diag(np.ones(5), 1) + np.diag(np.ones(5), -1))
mass = np.zeros((6, 1)); mass[0, 0] = 4.0
diffusion.l2_flow_diffusion_active_set(path, mass, np.asarray(path.sum(axis=1)).ravel())
stats = {}
for module in (hamming, diffusion):
    for name, kernel in vars(module).items():
        if isinstance(kernel, CPUDispatcher) and kernel.signatures:
            stats[module.__name__.rsplit(".", 1)[1] + "." + name] = [
                sum(kernel.stats.cache_hits.values()), sum(kernel.stats.cache_misses.values())]
print(json.dumps(stats))
"""


def test_a_later_process_loads_every_kernel_from_the_cache(warmed: tuple[Path, dict]) -> None:
    cache, _ = warmed
    result = subprocess.run([sys.executable, "-c", _LATER_PROCESS], env=_env(cache), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    stats = json.loads(result.stdout.strip().splitlines()[-1])
    assert CORE_KERNELS <= set(stats), CORE_KERNELS - set(stats)
    compiled = {name: hits_misses for name, hits_misses in stats.items() if hits_misses[1]}
    assert compiled == {}, f"compiled again instead of loaded from the warm-up's cache: {compiled}"
    assert all(hits >= 1 for hits, _ in stats.values())


def test_a_cold_cache_compiles(tmp_path: Path) -> None:
    """The control of the test above: without the warm-up the same kernel is compiled (a cache miss)."""
    probe = ("import numpy as np\nfrom crossret.retrieval import hamming\n"
             "hamming.hamming_distances(np.zeros((1, 8), np.uint8), np.zeros((2, 8), np.uint8), 64)\n"
             "s = hamming._distance_kernel.stats\nprint(sum(s.cache_hits.values()), sum(s.cache_misses.values()))")
    result = subprocess.run([sys.executable, "-c", probe], env=_env(tmp_path), capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["0", "1"]
