"""The thread policy (crossret.threads): environment parsing, per-phase settings restored, faiss' own count."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator

import numpy as np
import pytest

from crossret.errors import ConfigError
from crossret.threads import DEFAULT_THREADS, PHASES, ThreadPolicy, env_name, usable_cpus, use_threads


# ------------------------------------------------------------------------------------ the environment
def test_defaults_without_environment() -> None:
    policy = ThreadPolicy.from_env({})
    assert policy == ThreadPolicy()
    for phase in PHASES:
        expected = usable_cpus() if DEFAULT_THREADS[phase] == "cores" else DEFAULT_THREADS[phase]
        assert policy.threads(phase) == expected


def test_precedence_phase_over_all_over_default() -> None:
    policy = ThreadPolicy.from_env({"CROSSRET_THREADS": " 3 ", "CROSSRET_THREADS_EVALUATE": "5",
                                    "CROSSRET_THREADS_TRAIN": "", "OTHER": "x"})
    assert policy.threads("evaluate") == 5
    assert [policy.threads(p) for p in PHASES if p != "evaluate"] == [3, 3, 3, 3]  # "" is unset
    assert ThreadPolicy.from_env({"CROSSRET_THREADS_LINEAR_ALGEBRA": "2"}) == ThreadPolicy(linear_algebra=2)
    assert env_name("graph_search") == "CROSSRET_THREADS_GRAPH_SEARCH"


def test_explicit_count_beats_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CROSSRET_THREADS_EVALUATE", "2")
    with use_threads("evaluate", 1) as n:
        assert n == 1
    with use_threads("evaluate") as n:
        assert n == 2
    with use_threads("evaluate", policy=ThreadPolicy(evaluate=1)) as n:
        assert n == 1


@pytest.mark.parametrize("raw", ["abc", "0", "-1", "1.5", "2 threads", "١", "100000000"])
@pytest.mark.parametrize("name", ["CROSSRET_THREADS", "CROSSRET_THREADS_SEARCH"])
def test_bad_values_name_the_variable(name: str, raw: str) -> None:
    with pytest.raises(ConfigError) as info:
        ThreadPolicy.from_env({name: raw})
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{name} must be an integer from 1 to ")
    assert f"set {name} to a thread count or unset it" in message


def test_unknown_phase_variable_is_an_error() -> None:
    with pytest.raises(ConfigError, match=r"^unknown variable CROSSRET_THREADS_EVAL: .*CROSSRET_THREADS_EVALUATE"):
        ThreadPolicy.from_env({"CROSSRET_THREADS_EVAL": "2"})


@pytest.mark.parametrize("value", [0, -2, True, 2.0, "2"])
def test_bad_policy_and_explicit_counts(value: object) -> None:
    with pytest.raises(ConfigError, match=r"^ThreadPolicy\.search must be an integer"):
        ThreadPolicy(search=value)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"^train threads must be an integer"):
        with use_threads("train", value):  # type: ignore[arg-type]
            pass
    with pytest.raises(ConfigError, match="unknown thread phase 'training'"):
        with use_threads("training"):
            pass


def test_cli_refuses_a_bad_variable_before_any_work() -> None:
    env = {**os.environ, "CROSSRET_THREADS_EVALUATE": "lots"}
    result = subprocess.run([sys.executable, "-m", "crossret", "warmup"], env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"error: CROSSRET_THREADS_EVALUATE must be an integer from 1 to {max(256, 4 * (os.cpu_count() or 1))} "
        f"({usable_cpus()} CPUs here), got 'lots'; set CROSSRET_THREADS_EVALUATE to a thread count or unset it"]
    assert result.stdout == ""


# --------------------------------------------------------------------------------- settings restored
def _blas_threads() -> list[int]:
    from threadpoolctl import threadpool_info

    return [info["num_threads"] for info in threadpool_info() if info["user_api"] == "blas"]


def _settings() -> dict[str, object]:
    import faiss
    import numba
    import torch

    return {"torch": torch.get_num_threads(), "faiss": faiss.omp_get_max_threads(),
            "numba": numba.get_num_threads(), "blas": _blas_threads()}


@pytest.fixture
def one_thread_everywhere() -> Iterator[dict[str, object]]:
    """Every library at 1 thread (so that a phase's 2 shows), the originals put back afterwards."""
    import faiss
    import numba
    import torch
    from threadpoolctl import threadpool_limits

    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("numba's thread pool has one thread here")
    original = (torch.get_num_threads(), faiss.omp_get_max_threads(), numba.get_num_threads())
    numba.set_num_threads(1)  # starts numba's threads first: that may reset the OpenMP count
    limits = threadpool_limits(limits=1, user_api="blas")
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    try:
        yield _settings()
    finally:
        limits.restore_original_limits()
        numba.set_num_threads(original[2])
        faiss.omp_set_num_threads(original[1])
        torch.set_num_threads(original[0])


SET_BY_PHASE = {"train": {"torch"}, "linear_algebra": {"blas"}, "graph_search": {"faiss"},
                "search": {"faiss", "numba"}, "evaluate": {"numba"}}


@pytest.mark.parametrize("phase", PHASES)
def test_use_threads_sets_its_libraries_and_restores_all(phase: str, one_thread_everywhere: dict) -> None:
    before = one_thread_everywhere
    assert before == {"torch": 1, "faiss": 1, "numba": 1, "blas": [1] * len(before["blas"])}
    with use_threads(phase, policy=ThreadPolicy(**{phase: 2})) as n:
        inside = _settings()
        assert n == 2
    for library in SET_BY_PHASE[phase]:
        assert inside[library] == ([2] * len(before["blas"]) if library == "blas" else 2), (library, inside)
    assert _settings() == before


def test_nested_blocks_restore_the_outer_setting(one_thread_everywhere: dict) -> None:
    import torch

    with use_threads("train", 2):
        with use_threads("graph_search", 2):
            pass
        with use_threads("train", 1):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
    assert _settings() == one_thread_everywhere


def test_settings_restored_after_an_exception(one_thread_everywhere: dict) -> None:
    with pytest.raises(RuntimeError), use_threads("search", 2):
        raise RuntimeError("boom")
    assert _settings() == one_thread_everywhere


# ------------------------------------------------------------------------------------ where it applies
def test_knn_search_gets_faiss_threads_inside_a_one_thread_training_block(monkeypatch: pytest.MonkeyPatch) -> None:
    """COUPLE builds its graphs inside torch_threads(1); faiss must still get the graph-search count."""
    import faiss
    import torch

    from crossret.graph import knn
    from crossret.hashing.networks import torch_threads

    seen: list[int] = []
    build = knn.KnnIndex._build

    class Recorder:
        def __init__(self, index: object) -> None:
            self.index = index

        def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
            seen.append(faiss.omp_get_max_threads())
            return self.index.search(queries, k)

    monkeypatch.setattr(knn.KnnIndex, "_build", lambda self: Recorder(build(self)))
    monkeypatch.setenv("CROSSRET_THREADS_GRAPH_SEARCH", "2")
    x = np.random.default_rng(0).standard_normal((50, 8)).astype(np.float32)
    faiss_before, torch_before = faiss.omp_get_max_threads(), torch.get_num_threads()
    faiss.omp_set_num_threads(1)  # as if it shared torch's 1-thread setting
    try:
        with torch_threads(1):
            knn.knn_search(x, x, 5, exclude_self=True)
            after_search = (torch.get_num_threads(), faiss.omp_get_max_threads())
        assert seen == [2]
        assert after_search == (1, 1)  # the training block's setting is back after the search
    finally:
        faiss.omp_set_num_threads(faiss_before)
        torch.set_num_threads(torch_before)


_SHARED_RUNTIME = """
import json, torch, faiss  # torch first: faiss then runs on torch's OpenMP runtime
import numpy as np
from crossret.graph import knn
seen = []
build = knn.KnnIndex._build
class Recorder:
    def __init__(self, index): self.index = index
    def search(self, q, k):
        seen.append(faiss.omp_get_max_threads())
        return self.index.search(q, k)
knn.KnnIndex._build = lambda self: Recorder(build(self))
torch.set_num_threads(1)
follows = faiss.omp_get_max_threads()
x = np.random.default_rng(0).standard_normal((40, 4)).astype(np.float32)
knn.knn_search(x, x, 3)
print(json.dumps({"faiss_follows_torch": follows, "search": seen, "torch_after": torch.get_num_threads()}))
"""


def test_faiss_on_torchs_openmp_runtime_gets_its_own_count() -> None:
    env = {**os.environ, "CROSSRET_THREADS_GRAPH_SEARCH": "2"}
    result = subprocess.run([sys.executable, "-c", _SHARED_RUNTIME], env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["search"] == [2] and report["torch_after"] == 1
    if report["faiss_follows_torch"] != 1:
        pytest.skip("faiss has its own OpenMP runtime in this install (the search count above still held)")


def test_itq_fit_runs_its_linear_algebra_on_the_policy_blas_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    from threadpoolctl import threadpool_limits

    from crossret.data.domain import Domain
    from crossret.hashing import itq

    seen: list[list[int]] = []

    class RecordingPCA(itq.PCA):
        def fit(self, x: np.ndarray, y: object = None) -> RecordingPCA:
            seen.append(_blas_threads())
            return super().fit(x, y)

    monkeypatch.setattr(itq, "PCA", RecordingPCA)
    monkeypatch.setenv("CROSSRET_THREADS_LINEAR_ALGEBRA", "1")
    x = np.random.default_rng(0).standard_normal((120, 16))
    with threadpool_limits(limits=2, user_api="blas"):
        outside = _blas_threads()
        itq.ITQ(8, seed=0).fit(Domain("s", x[:80], np.zeros(80, dtype=int)), Domain("t", x[80:], np.full(40, -1)))
        assert _blas_threads() == outside
    assert seen == [[1] * len(outside)] and set(outside) == {2}


def test_evaluate_hamming_leaves_the_torch_thread_count_as_it_found_it() -> None:
    """The metric kernels run in the "evaluate" phase: numba's threads starting must not move torch's count."""
    torch = pytest.importorskip("torch")
    import numpy as np

    from crossret.retrieval.metrics import evaluate_hamming

    rng = np.random.default_rng(0)
    q, db = rng.choice([-1, 1], size=(40, 64)), rng.choice([-1, 1], size=(3_000, 64))
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for ties in ("expected", "index"):
            evaluate_hamming(q, db, rng.integers(0, 5, 40), rng.integers(0, 5, 3_000), ties=ties)
            assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(previous)
