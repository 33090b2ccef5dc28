"""Load test of the search service (``crossret serve``): throughput and latency under a fixed concurrency.

Three processes: this one (orchestrates), the **server** (``python -m crossret.cli serve`` under
uvicorn on a loopback port) and the **load driver** (a second local process: ``concurrency`` threads,
each with its own keep-alive ``httpx.Client``, sending requests back to back for ``seconds`` after a
warm-up). Keeping the driver out of this process keeps a caller's own work (e.g. ``benchmarks/scale.py``)
from skewing the numbers, and the server's CPU from being shared with the driver's GIL.

Without a run directory the server gets a synthetic flat index of ``n_codes`` random ``bits``-bit
codes (``crossret serve --index FILE``); with one it serves the run's cross-domain database. Each
request holds ``batch`` queries (random packed codes as hex, or random feature vectors with
``--mode features``), ``k`` results each. Every non-200 answer or transport failure is an error;
the run is only valid with 0 errors.

    python benchmarks/serve_load.py                         # 100k synthetic 64-bit codes, 10 s, 8 clients
    python benchmarks/serve_load.py --run-dir runs/RUN --mode features --batch 16

Writes ``benchmarks/results/serve_load.json`` and ``.md``. From Python::

    from serve_load import measure_service
    result = measure_service(None, n_codes=1_000_000, bits=64, seconds=10, concurrency=8)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"
STARTUP_TIMEOUT_S = 300.0  # loading (and reading back) a large index takes a while
REQUEST_TIMEOUT_S = 60.0
N_BODIES = 256  # distinct pre-serialised request bodies, cycled (the driver spends no time building JSON)


# ------------------------------------------------------------------------------------------- server
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def make_synthetic_index(directory: Path, n_codes: int, bits: int, seed: int = 0) -> Path:
    """A flat index file of ``n_codes`` uniformly random ``bits``-bit codes (built in chunks)."""
    import numpy as np

    from crossret.retrieval.index import BinaryIndex
    from crossret.retrieval.packing import packed_width

    rng = np.random.default_rng(seed)
    index = BinaryIndex(bits, "flat")
    width, last_bits = packed_width(bits), bits % 8
    for start in range(0, n_codes, 1 << 20):
        chunk = rng.integers(0, 256, size=(min(1 << 20, n_codes - start), width), dtype=np.uint8)
        if last_bits:  # bits beyond the code length must be zero
            chunk[:, -1] &= (1 << last_bits) - 1
        index.add(chunk)
    return index.save(directory / f"synthetic_{n_codes}x{bits}.crbi")


def _start_server(run_dir: Path | None, index_file: Path | None, port: int, log_path: Path, max_batch: int,
                  max_k: int, server_threads: int | None) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "crossret.cli", "serve"]
    if run_dir is not None:
        command.append(str(run_dir))
    if index_file is not None:
        command += ["--index", str(index_file)]
    command += ["--host", "127.0.0.1", "--port", str(port), "--max-batch", str(max_batch), "--max-k", str(max_k)]
    env = dict(os.environ)
    if server_threads is not None:  # OpenMP/torch threads of the server (its searches use 1 faiss thread each)
        env["OMP_NUM_THREADS"] = str(server_threads)
    with open(log_path, "wb") as log:
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)


def _wait_ready(base_url: str, process: subprocess.Popen[bytes], log_path: Path) -> dict[str, Any]:
    import httpx

    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with status {process.returncode}:\n{_tail(log_path)}")
        try:
            response = httpx.get(f"{base_url}/info", timeout=2.0)
            if response.status_code == 200:
                return response.json()
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the server did not answer within {STARTUP_TIMEOUT_S:.0f}s:\n{_tail(log_path)}")


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        # uvicorn shuts down gracefully on SIGTERM (SIGINT may be ignored in background jobs).
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process (Linux ``/proc``), or None where unavailable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _tail(path: Path, n: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return "(no server log)"


# ------------------------------------------------------------------------------------------- driver
def _make_bodies(info: dict[str, Any], mode: str, batch: int, k: int, seed: int) -> tuple[str, list[bytes]]:
    """The endpoint and ``N_BODIES`` request bodies of ``batch`` random queries each."""
    import numpy as np

    rng = np.random.default_rng(seed)
    bits = int(info["bits"])
    bodies = []
    if mode == "features":
        if not info.get("feature_search"):
            raise RuntimeError("--mode features needs a run directory whose model the server can load")
        dim = int(info["feature_dim"])
        for _ in range(N_BODIES):
            features = rng.standard_normal((batch, dim)).astype(np.float32).round(4)
            bodies.append(json.dumps({"features": features.tolist(), "k": k}).encode())
        return "/search/features", bodies
    if mode == "ids":
        for _ in range(N_BODIES):
            ids = rng.integers(0, int(info["size"]), size=batch)
            bodies.append(json.dumps({"ids": ids.tolist(), "k": k, "exclude_self": True}).encode())
        return "/search/ids", bodies
    width = (bits + 7) // 8
    for _ in range(N_BODIES):
        packed = rng.integers(0, 256, size=(batch, width), dtype=np.uint8)
        if bits % 8:
            packed[:, -1] &= (1 << (bits % 8)) - 1
        bodies.append(json.dumps({"hex": [row.tobytes().hex() for row in packed], "k": k}).encode())
    return "/search/codes", bodies


def drive(base_url: str, path: str, bodies: list[bytes], seconds: float, concurrency: int,
          warmup_seconds: float, batch: int) -> dict[str, Any]:
    """Send requests back to back from ``concurrency`` threads; record those started after the warm-up."""
    import httpx
    import numpy as np

    start = time.perf_counter()
    measure_from, stop_at = start + warmup_seconds, start + warmup_seconds + seconds
    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    finished: list[float] = [measure_from] * concurrency
    errors = [0] * concurrency
    warmup = [0] * concurrency
    samples: list[str] = []
    headers = {"content-type": "application/json"}

    def worker(slot: int) -> None:
        with httpx.Client(base_url=base_url, timeout=REQUEST_TIMEOUT_S) as client:
            i = slot
            while True:
                t0 = time.perf_counter()
                if t0 >= stop_at:
                    return
                problem = None
                try:
                    response = client.post(path, content=bodies[i % len(bodies)], headers=headers)
                    if response.status_code != 200:
                        problem = f"HTTP {response.status_code}: {response.text[:200]}"
                    elif len(response.json()["results"]) != batch:
                        problem = "wrong number of results"
                except (httpx.HTTPError, ValueError, KeyError) as exc:
                    problem = f"{type(exc).__name__}: {exc}"
                t1 = time.perf_counter()
                i += concurrency
                if t0 < measure_from:
                    warmup[slot] += 1
                    continue
                latencies[slot].append(t1 - t0)
                finished[slot] = t1
                if problem is not None:
                    errors[slot] += 1
                    if len(samples) < 5:
                        samples.append(problem)

    threads = [threading.Thread(target=worker, args=(slot,)) for slot in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    all_latencies = np.array([x for per in latencies for x in per]) * 1000.0
    requests = int(all_latencies.size)
    window = max(max(finished) - measure_from, 1e-9)

    def percentile(q: float) -> float | None:
        return round(float(np.percentile(all_latencies, q)), 3) if requests else None

    return {
        "requests": requests,
        "queries": requests * batch,
        "errors": int(sum(errors)),
        "warmup_requests": int(sum(warmup)),
        "error_samples": samples,
        "window_seconds": round(window, 3),
        "throughput_rps": round(requests / window, 1),
        "queries_per_s": round(requests * batch / window, 1),
        "p50_ms": percentile(50),
        "p90_ms": percentile(90),
        "p99_ms": percentile(99),
        "mean_ms": round(float(all_latencies.mean()), 3) if requests else None,
        "max_ms": round(float(all_latencies.max()), 3) if requests else None,
    }


def _driver_main(spec_json: str) -> int:
    """Entry point of the driver process: read the spec, fetch /info, drive, print one JSON line."""
    import httpx

    spec = json.loads(spec_json)
    info = httpx.get(f"{spec['base_url']}/info", timeout=10).json()
    path, bodies = _make_bodies(info, spec["mode"], spec["batch"], spec["k"], spec["seed"])
    result = drive(spec["base_url"], path, bodies, spec["seconds"], spec["concurrency"], spec["warmup_seconds"],
                   spec["batch"])
    print(json.dumps(result))
    return 0


# ------------------------------------------------------------------------------------------- measure
def measure_service(run_dir_or_none: str | Path | None, n_codes: int, bits: int, seconds: float, concurrency: int,
                    *, k: int = 10, batch: int = 1, mode: str = "codes", warmup_seconds: float = 1.0,
                    server_threads: int | None = None, seed: int = 0) -> dict[str, Any]:
    """Start the service in a subprocess, load it from a second process, return throughput and latency.

    ``run_dir_or_none``: a finished run directory to serve, or ``None`` for a synthetic flat index of
    ``n_codes`` random ``bits``-bit codes (``n_codes``/``bits`` are ignored with a run directory:
    the run's cross-domain database is served). ``mode``: ``codes`` (hex codes), ``ids`` (item ids,
    excluding themselves) or ``features`` (needs a run directory). Returns ``requests``, ``errors``,
    ``throughput_rps``, ``queries_per_s``, ``p50_ms``, ``p99_ms`` (and more), the configuration and
    the server's startup time.
    """
    if mode not in ("codes", "ids", "features"):
        raise ValueError(f"mode must be codes, ids or features, got {mode!r}")
    if seconds <= 0 or concurrency < 1 or batch < 1 or k < 1:
        raise ValueError("seconds must be > 0 and concurrency, batch, k >= 1")
    run_dir = Path(run_dir_or_none) if run_dir_or_none is not None else None
    with tempfile.TemporaryDirectory(prefix="crossret-serve-load-") as tmp:
        tmp_path = Path(tmp)
        index_file = None
        build_seconds = None
        if run_dir is None:
            t0 = time.perf_counter()
            index_file = make_synthetic_index(tmp_path, n_codes, bits, seed)
            build_seconds = round(time.perf_counter() - t0, 3)
        port = _free_port()
        base_url = f"http://127.0.0.1:{port}"
        log_path = tmp_path / "server.log"
        t0 = time.perf_counter()
        server = _start_server(run_dir, index_file, port, log_path, max_batch=max(1024, batch), max_k=max(1000, k),
                               server_threads=server_threads)
        try:
            info = _wait_ready(base_url, server, log_path)
            startup_seconds = round(time.perf_counter() - t0, 3)
            load_before = _loadavg()
            cpu_before = _cpu_seconds(server.pid)
            spec = {"base_url": base_url, "mode": mode, "batch": batch, "k": k, "seed": seed, "seconds": seconds,
                    "concurrency": concurrency, "warmup_seconds": warmup_seconds}
            driver = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--drive", json.dumps(spec)],
                                    capture_output=True, text=True, timeout=seconds + warmup_seconds + 300)
            if driver.returncode != 0:
                raise RuntimeError(f"the load driver failed ({driver.returncode}):\n{driver.stderr[-2000:]}")
            result = json.loads(driver.stdout.strip().splitlines()[-1])
            cpu_after = _cpu_seconds(server.pid)
            if server.poll() is not None:
                raise RuntimeError(f"the server died during the load:\n{_tail(log_path)}")
        finally:
            _stop(server)
    # Server CPU per request is robust to other load on the machine (unlike req/s); it includes the
    # warm-up requests, so it is slightly pessimistic.
    server_cpu = None if cpu_before is None or cpu_after is None else round(cpu_after - cpu_before, 3)
    cpu_ms = (round(1000 * server_cpu / (result["requests"] + result["warmup_requests"]), 3)
              if server_cpu is not None and result["requests"] else None)
    return {
        **result,
        "server_cpu_seconds": server_cpu,
        "server_cpu_ms_per_request": cpu_ms,
        "config": {"run_dir": str(run_dir) if run_dir else None, "n_codes": int(info["size"]),
                   "bits": int(info["bits"]),
                   "kind": info.get("kind"), "mode": mode, "batch": batch, "k": k, "seconds": seconds,
                   "warmup_seconds": warmup_seconds, "concurrency": concurrency, "server_threads": server_threads,
                   "synthetic": run_dir is None},
        "server": {"startup_seconds": startup_seconds, "index_build_seconds": build_seconds,
                   "method": info.get("method")},
        "machine": {**_machine(), "loadavg_before": load_before},
    }


def _loadavg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:  # pragma: no cover - not on every platform
        return None


def _machine() -> dict[str, Any]:
    load = _loadavg()
    import fastapi
    import uvicorn

    return {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "loadavg_after": load, "fastapi": fastapi.__version__, "uvicorn": uvicorn.__version__}


def markdown(result: dict[str, Any]) -> str:
    c, s, m = result["config"], result["server"], result["machine"]
    source = "synthetic flat index (random codes)" if c["synthetic"] else f"run `{c['run_dir']}`"
    lines = [
        "# Search service load test",
        "",
        f"`python benchmarks/serve_load.py` — {source}: {c['n_codes']:,} codes of {c['bits']} bits ({c['kind']}); "
        f"`POST /search/{c['mode']}` with {c['batch']} quer"
        f"{'y' if c['batch'] == 1 else 'ies'} per request, k = {c['k']}; {c['concurrency']} concurrent clients "
        f"(threads with keep-alive httpx clients in a second process) for {c['seconds']} s after a "
        f"{c['warmup_seconds']} s warm-up; server: uvicorn, one process, on loopback.",
        "",
        "| requests | errors | req/s | queries/s | p50 ms | p90 ms | p99 ms | max ms |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {result['requests']:,} | {result['errors']} | {result['throughput_rps']:,} | {result['queries_per_s']:,} "
        f"| {result['p50_ms']} | {result['p90_ms']} | {result['p99_ms']} | {result['max_ms']} |",
        "",
        f"Server CPU per request: {result['server_cpu_ms_per_request']} ms ({result['server_cpu_seconds']} s of CPU "
        "for the warm-up and measured requests; it depends far less than req/s on what else runs). "
        f"Server startup (process start to first answer): {s['startup_seconds']} s. Machine: {m['cpus']} CPUs "
        f"(shared; load average before/after the run {m['loadavg_before']} / {m['loadavg_after']}), "
        f"{m['platform']}, Python {m['python']}, "
        f"fastapi {m['fastapi']}, uvicorn {m['uvicorn']}. Server, driver and anything else running share these "
        "cores, so the numbers are a floor for a dedicated machine.",
        "",
    ]
    if result["errors"]:
        lines += ["Errors (samples):", "", *[f"- {e}" for e in result["error_samples"]], ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, default=None, help="serve this run (default: synthetic index)")
    parser.add_argument("--n-codes", type=int, default=100_000, help="synthetic index size")
    parser.add_argument("--bits", type=int, default=64, help="synthetic code length")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured load duration")
    parser.add_argument("--warmup", type=float, default=1.0, help="warm-up before measuring (s)")
    parser.add_argument("--concurrency", type=int, default=8, help="concurrent clients")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--batch", type=int, default=1, help="queries per request")
    parser.add_argument("--mode", choices=("codes", "ids", "features"), default="codes")
    parser.add_argument("--server-threads", type=int, default=None, help="OMP_NUM_THREADS of the server process")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "serve_load", help="output path without suffix")
    args = parser.parse_args(argv)

    from crossret.storage.atomic import write_json_atomic, write_text_atomic

    result = measure_service(args.run_dir, args.n_codes, args.bits, args.seconds, args.concurrency, k=args.k,
                             batch=args.batch, mode=args.mode, warmup_seconds=args.warmup,
                             server_threads=args.server_threads)
    result["script"] = "benchmarks/serve_load.py"
    write_json_atomic(args.out.with_suffix(".json"), result)
    write_text_atomic(args.out.with_suffix(".md"), markdown(result))
    print(markdown(result))
    return 0 if result["errors"] == 0 else 1


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--drive":
        sys.exit(_driver_main(sys.argv[2]))
    sys.exit(main())
