"""Time of COUPLE's graph + per-class flow diffusion step against the number of nodes.

    python benchmarks/graph_scaling.py [--sizes 10000 20000 50000 ...] [--dim 64] [--classes 10]

Synthetic features (:func:`synthetic`): ``classes`` clusters in ``dim`` dimensions; half the nodes
are the labelled source, half the target, which is drawn from the same classes, shifted by a fixed
random offset and spread 1.2× wider — so cross-domain mutual neighbours exist but are sparse, as in
real tasks. Within a class the variation spans a random ``intrinsic_dim``-dimensional subspace plus
small isotropic noise (deep features have an intrinsic dimension of ~10–40, far below their
width); ``intrinsic_dim=None`` gives the earlier full-rank isotropic mixture, on which every
sub-quadratic neighbour search loses recall as n grows, and which the script also runs
(``--isotropic-sizes``) to show it.

For every size it builds the graph (k = 3, neighbour search ``auto``: exact faiss search up to
20,000 rows per searched database, the ``ivf`` cell search above) and runs the per-class diffusion
of COUPLE (target_fill 3, active-set solver, tol 1e-4, CG tolerance 1e-6), and records wall and CPU
seconds (minimum of ``repeats``; the development machine is shared, CPU time is the steadier
measure), edges, solver rounds and CG iterations, and — where a search was approximate — its
recall@k against exact search on a sample of queries. It fits the growth exponent ``b`` of
``time ≈ a · x^b`` by least squares on log-log axes, against nodes and against edges. Writes
``results/graph_scaling.{json,md}``.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from crossret.graph import (
    CrossDomainGraph,
    FlowDiffusionResult,
    build_cross_domain_graph,
    class_seed_mass,
    clip_to_feasible,
    l2_flow_diffusion_active_set,
)
from crossret.graph import knn as knn_module
from crossret.graph.knn import KnnIndex, l2_normalize
from crossret.storage.atomic import write_json_atomic, write_text_atomic

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_SIZES = [10_000, 20_000, 50_000, 100_000, 200_000, 500_000, 1_000_000]
K = 3
TARGET_FILL = 3.0
TOL = 1e-4
CG_TOL = 1e-6
INTRINSIC_DIM = 16


def synthetic(n_nodes: int, dim: int, classes: int, seed: int,
              intrinsic_dim: int | None = INTRINSIC_DIM) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(source features, source labels, target features)``, float32 / int64, ``n_nodes // 2`` sources.

    Source ``x = μ_y + U_y z + ε`` with class centres ``μ ~ N(0, 4 I)``, a class basis
    ``U_y ∈ R^{dim×r}`` of ``N(0, 1/r)`` entries (so ``E||U_y z||² = dim``, the spread of the earlier
    isotropic noise), ``z ~ N(0, I_r)``, ``ε ~ N(0, 0.25² I)``; target ``x = μ_y + s + 1.2 U_y z + ε``
    with one random shift ``s ~ N(0, I)``. ``intrinsic_dim=None``: the earlier generator
    (``x = μ_y + N(0, I)``, target ``μ_y + s + N(0, 1.44 I)``), reproduced draw for draw.
    """
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim)) * 2.0
    n_s = n_nodes // 2
    ys = rng.integers(0, classes, n_s)
    yt = rng.integers(0, classes, n_nodes - n_s)
    if intrinsic_dim is None:
        xs = centres[ys] + rng.normal(size=(n_s, dim))
        shift = rng.normal(size=dim)
        xt = centres[yt] + shift + rng.normal(size=(n_nodes - n_s, dim)) * 1.2
        return xs.astype(np.float32), ys.astype(np.int64), xt.astype(np.float32)
    basis = rng.normal(size=(classes, intrinsic_dim, dim)) / np.sqrt(intrinsic_dim)
    shift = rng.normal(size=dim)

    def draw(labels: np.ndarray, spread: float) -> np.ndarray:
        z = rng.normal(size=(labels.size, intrinsic_dim)) * spread
        x = centres[labels] + rng.normal(size=(labels.size, dim)) * 0.25
        for c in range(classes):  # per class: a (n, r, dim) gather would need n·r·dim floats
            rows = np.flatnonzero(labels == c)
            x[rows] += z[rows] @ basis[c]
        return x

    xs = draw(ys, 1.0)
    xt = draw(yt, 1.2) + shift
    return xs.astype(np.float32), ys.astype(np.int64), xt.astype(np.float32)


def fit_exponent(sizes: list[float], seconds: list[float]) -> float:
    """Least-squares slope ``b`` of ``log t = log a + b log x``."""
    return float(np.polyfit(np.log(sizes), np.log(seconds), 1)[0])


def _timed(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, float, float]:
    """``(fn(*args, **kwargs), wall seconds, CPU seconds of this process)``."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - wall, time.process_time() - cpu


def _diffuse(graph: CrossDomainGraph, source_labels: np.ndarray, classes: int) -> FlowDiffusionResult:
    """COUPLE's per-class diffusion: seeds ``α·deg`` on each class's sources, clipped per component."""
    degree = graph.degree
    seed_mass = class_seed_mass(degree, graph.n_source, source_labels, classes, TARGET_FILL)
    seed_mass, _ = clip_to_feasible(graph.adjacency, seed_mass, degree)
    return l2_flow_diffusion_active_set(graph.adjacency, seed_mass, degree, tol=TOL, cg_tol=CG_TOL)


def _overlap(approx: np.ndarray, exact: np.ndarray) -> float:
    """Mean recall@k: ``|approx_i ∩ exact_i| / k`` over the rows."""
    hits = (approx[:, :, None] == exact[:, None, :]).any(axis=2).sum()
    return float(hits / exact.size) if exact.size else 1.0


def _recall(database: np.ndarray, queries: np.ndarray, k: int, knn: str, self_ids: np.ndarray | None = None,
            ) -> float | None:
    """Recall@k of the ``knn`` index the graph builder uses (same database, same deterministic build)
    against exact search, on the given queries; ``None`` when that index is exact. ``self_ids``: the
    queries are these database rows, which must not count as their own neighbour."""
    index = KnnIndex(database, method=knn, normalized=True)
    if not index.approximate or queries.shape[0] == 0:
        return None
    extra = 0 if self_ids is None else 1
    approx = index.search(queries, k + extra, normalized=True)[1]
    exact = KnnIndex(database, method="exact", normalized=True).search(queries, k + extra, normalized=True)[1]
    if self_ids is not None:
        approx, exact = _without(approx, self_ids, k), _without(exact, self_ids, k)
    return _overlap(approx, exact)


def _without(idx: np.ndarray, self_ids: np.ndarray, k: int) -> np.ndarray:
    """Each row's first ``k`` entries other than its own id (drop the last one if it is absent)."""
    keep = idx != self_ids[:, None]
    keep[~(~keep).any(axis=1), -1] = False
    return idx[keep].reshape(idx.shape[0], k)


def search_recall(xs: np.ndarray, ys: np.ndarray, xt: np.ndarray, *, k: int = K, knn: str = "auto",
                  queries: int = 1000, seed: int = 0) -> dict[str, float | None]:
    """Recall@k of each search of :func:`~crossret.graph.build_cross_domain_graph` (``None`` = exact):
    cross target→source and source→target, intra-target, and intra-source (per class, pooled)."""
    rng = np.random.default_rng(seed)
    xs, xt = l2_normalize(xs), l2_normalize(xt)
    qs = np.sort(rng.choice(xs.shape[0], size=min(queries, xs.shape[0]), replace=False))
    qt = np.sort(rng.choice(xt.shape[0], size=min(queries, xt.shape[0]), replace=False))
    out: dict[str, float | None] = {
        "cross_target_to_source": _recall(xs, xt[qt], k, knn),
        "cross_source_to_target": _recall(xt, xs[qs], k, knn),
        "target": _recall(xt, xt[qt], k, knn, self_ids=qt),
    }
    hits, total, approximate = 0.0, 0, False
    for cls in np.unique(ys):
        members = np.flatnonzero(ys == cls)
        local = np.flatnonzero(np.isin(members, qs))
        if members.size < 2 or local.size == 0:
            continue
        value = _recall(xs[members], xs[members[local]], min(k, members.size - 1), knn, self_ids=local)
        if value is not None:
            approximate = True
        hits += (1.0 if value is None else value) * local.size
        total += local.size
    out["source"] = hits / total if approximate and total else None
    return out


def measure_graph_scaling(sizes: list[int], dim: int = 64, classes: int = 10, seed: int = 0, *,
                          intrinsic_dim: int | None = INTRINSIC_DIM, knn: str = "auto", repeat_up_to: int = 200_000,
                          recall_queries: int = 1000,
                          progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Graph + diffusion time of COUPLE's refresh step for each number of nodes in ``sizes``.

    Returns ``{"settings", "machine", "rows", "exponents"}``. A row holds nodes, edges (all and by
    kind), wall and CPU seconds of the graph, the diffusion and both (minimum over 2 repeats for
    sizes up to ``repeat_up_to``, else 1), diffusion rounds and CG iterations, convergence, targets
    reached, and the recall@k of each approximate search (``None`` = exact search). ``exponents``:
    the fitted ``b`` of ``t ≈ a·x^b`` for every time against nodes and against edges (2+ sizes).
    ``progress`` is called with each finished row.
    """
    rows: list[dict[str, Any]] = []
    for n in sizes:
        xs, ys, xt = synthetic(n, dim, classes, seed, intrinsic_dim)
        load_before = os.getloadavg()[0]
        best: dict[str, float] = {}
        repeats = 2 if n <= repeat_up_to else 1
        for _ in range(repeats):
            graph, graph_wall, graph_cpu = _timed(build_cross_domain_graph, xs, ys, xt, k_cross=K, k_target=K,
                                                  k_source=K, knn=knn)
            result, diffusion_wall, diffusion_cpu = _timed(_diffuse, graph, ys, classes)
            for key, value in (("graph_seconds", graph_wall), ("graph_cpu_seconds", graph_cpu),
                               ("diffusion_seconds", diffusion_wall), ("diffusion_cpu_seconds", diffusion_cpu),
                               ("total_seconds", graph_wall + diffusion_wall),
                               ("total_cpu_seconds", graph_cpu + diffusion_cpu)):
                best[key] = min(best.get(key, np.inf), value)
        n_s = graph.n_source
        row: dict[str, Any] = {
            "nodes": n, "source_nodes": n_s, "target_nodes": graph.n_target,
            "edges": int(graph.adjacency.nnz // 2), **{f"edges_{kind}": c for kind, c in graph.edge_counts.items()},
            **{key: round(value, 3) for key, value in best.items()},
            "repeats": repeats,
            "diffusion_rounds": int(result.passes), "cg_iterations": int(result.pushes),
            "converged": bool(result.converged),
            "targets_reached": int((result.mass[n_s:].max(axis=1) > 0).sum()),
            "recall": search_recall(xs, ys, xt, knn=knn, queries=recall_queries, seed=seed),
            "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        }
        rows.append(row)
        if progress is not None:
            progress(row)
    exponents = _exponents(rows)
    # Both domains' searches are approximate above 2·AUTO_APPROX_ROWS nodes; below, exact search is
    # quadratic but cheaper per query than the cell search, which steepens an all-sizes fit.
    approx_rows = [r for r in rows if r["nodes"] > 2 * knn_module.AUTO_APPROX_ROWS] if knn == "auto" else []
    settings = {"sizes": list(sizes), "dim": dim, "classes": classes, "seed": seed,
                "intrinsic_dim": intrinsic_dim, "k": K, "target_fill": TARGET_FILL, "solver": "active-set",
                "tol": TOL, "cg_tol": CG_TOL, "knn": knn, "auto_approx_rows": knn_module.AUTO_APPROX_ROWS,
                "ivf_cell_rows": knn_module.IVF_CELL_ROWS, "ivf_probes": knn_module.IVF_PROBES,
                "recall_queries": recall_queries, "repeat_up_to": repeat_up_to}
    machine = {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()}
    return {"settings": settings, "machine": machine, "rows": rows, "exponents": exponents,
            "exponents_approximate_regime": _exponents(approx_rows)}


def _exponents(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Fitted ``b`` of every time (wall, CPU; graph, diffusion, total) against nodes and edges."""
    exponents: dict[str, float] = {}
    if len(rows) >= 2:
        for part in ("graph", "diffusion", "total"):
            for clock in ("seconds", "cpu_seconds"):
                key = f"{part}_{clock}"
                for axis in ("nodes", "edges"):
                    exponents[f"{key}_vs_{axis}"] = round(
                        fit_exponent([r[axis] for r in rows], [max(r[key], 1e-6) for r in rows]), 3)
    return exponents


def _fmt_recall(row: dict[str, Any]) -> str:
    values = row["recall"]
    parts = [f"{name} {values[key]:.3f}" for key, name in (
        ("cross_target_to_source", "t→s"), ("cross_source_to_target", "s→t"), ("target", "t"), ("source", "s"))
        if values.get(key) is not None]
    return ", ".join(parts) if parts else "exact"


def _table(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| nodes | edges | cross edges | graph s (cpu) | diffusion s (cpu) | total s (cpu) | rounds | CG its "
             "| kNN recall@3 | load avg |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['nodes']:,} | {r['edges']:,} | {r['edges_cross']:,} | {r['graph_seconds']:.2f} "
            f"({r['graph_cpu_seconds']:.2f}) | {r['diffusion_seconds']:.2f} ({r['diffusion_cpu_seconds']:.2f}) | "
            f"{r['total_seconds']:.2f} ({r['total_cpu_seconds']:.2f}) | {r['diffusion_rounds']} | "
            f"{r['cg_iterations']} | {_fmt_recall(r)} | {r['load_average'][0]}–{r['load_average'][1]} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=DEFAULT_SIZES)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--intrinsic-dim", type=int, default=INTRINSIC_DIM, help="0 = full-rank isotropic noise")
    parser.add_argument("--isotropic-sizes", type=int, nargs="*", default=[50_000, 200_000],
                        help="also run the earlier isotropic generator at these sizes (recall check)")
    parser.add_argument("--knn", default="auto")
    parser.add_argument("--out", default=str(RESULTS / "graph_scaling"))
    args = parser.parse_args(argv)

    def show(row: dict[str, Any]) -> None:
        print({key: row[key] for key in ("nodes", "edges", "graph_seconds", "diffusion_seconds", "total_seconds",
                                         "graph_cpu_seconds", "diffusion_cpu_seconds", "cg_iterations", "recall")},
              flush=True)

    started = time.strftime("%Y-%m-%d %H:%M:%S")
    main_run = measure_graph_scaling(args.sizes, args.dim, args.classes, args.seed,
                                     intrinsic_dim=args.intrinsic_dim or None, knn=args.knn, progress=show)
    _write(Path(args.out), main_run, None, started)  # the main sweep is kept even if the check fails
    if args.isotropic_sizes:
        isotropic = measure_graph_scaling(args.isotropic_sizes, args.dim, args.classes, args.seed, intrinsic_dim=None,
                                          knn=args.knn, progress=show)
        _write(Path(args.out), main_run, isotropic, started)
    return 0


def _write(out: Path, main_run: dict[str, Any], isotropic: dict[str, Any] | None, started: str) -> None:
    """``out.json`` (everything) and ``out.md`` (tables and exponents)."""
    payload = {"script": "benchmarks/graph_scaling.py", "created": started,
               "finished": time.strftime("%Y-%m-%d %H:%M:%S"), **main_run, "isotropic_check": isotropic}
    write_json_atomic(out.with_suffix(".json"), payload)
    s = main_run["settings"]
    lines = ["# COUPLE graph + diffusion scaling", "",
             f"Synthetic features: {s['dim']}-d, {s['classes']} classes, half source / half shifted target, "
             f"within-class variation of intrinsic dimension {s['intrinsic_dim'] or 'full (isotropic)'}; k = {K}, "
             f"per-class diffusion (target_fill {TARGET_FILL:g}, active-set solver, tol {TOL:g}, CG tol {CG_TOL:g}). "
             f"Neighbour search `{s['knn']}`: exact up to {s['auto_approx_rows']:,} rows per searched database, above "
             f"that k-means cells of ~{s['ivf_cell_rows']:,} rows with {s['ivf_probes']} probed cells per query. Host: "
             f"{main_run['machine']['cpus']} CPUs, shared with other jobs (load average before–after each size in the "
             f"table). Seconds are wall (CPU in brackets), minimum of 2 repeats up to {s['repeat_up_to']:,} nodes. "
             f"Recall is recall@{K} against exact search on {s['recall_queries']:,} sampled queries per search "
             "(t→s / s→t: cross-domain, t: intra-target, s: intra-source per class). "
             f"Written by `benchmarks/graph_scaling.py` ({started}).", ""]
    lines += _table(main_run["rows"])
    if main_run["exponents"]:
        approx = main_run["exponents_approximate_regime"]
        big = f"{2 * s['auto_approx_rows'] // 1000}k"
        lines += ["", "Fitted growth exponent b of time ≈ a·x^b, over all sizes and over the sizes above "
                  f"{2 * s['auto_approx_rows']:,} nodes (every domain search approximate):", "",
                  f"| time | vs nodes | vs edges | vs nodes, > {big} | vs edges, > {big} |",
                  "|---|---:|---:|---:|---:|"]
        for part in ("graph", "diffusion", "total"):
            for clock in ("seconds", "cpu_seconds"):
                key = f"{part}_{clock}"
                tail = (f"{approx[f'{key}_vs_nodes']:.2f} | {approx[f'{key}_vs_edges']:.2f}" if approx else "– | –")
                lines.append(f"| {key.replace('_', ' ')} | {main_run['exponents'][f'{key}_vs_nodes']:.2f} | "
                             f"{main_run['exponents'][f'{key}_vs_edges']:.2f} | {tail} |")
    if isotropic is not None:
        lines += ["", "Earlier isotropic generator (full-rank within-class noise, intrinsic dimension = "
                  f"{s['dim']}), same settings — where fixed-work approximate search loses recall as n grows:", ""]
        lines += _table(isotropic["rows"])
    write_text_atomic(out.with_suffix(".md"), "\n".join(lines) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
