"""Time of COUPLE's graph + per-class flow diffusion step against the number of nodes.

    python benchmarks/graph_scaling.py [--sizes 10000 20000 50000 100000] [--dim 64] [--classes 10]

Synthetic features: a Gaussian mixture (``classes`` clusters in ``dim`` dimensions); half the nodes
are the labelled source, half the target, which is the source shifted by a fixed random offset
plus noise — so cross-domain mutual neighbours exist but are sparse, as in real tasks. For every
size the script builds the graph (k = 3, neighbour search ``auto``: exact faiss search up to
20,000 rows per search, HNSW above) and runs the per-class diffusion of COUPLE (target_fill 3,
active-set solver, tol 1e-4). It reports wall times, edges, solver rounds and the growth exponent
``b`` of ``time ≈ a · size^b`` fitted by least squares on log-log axes, against nodes and against
edges. Writes ``results/graph_scaling.{json,md}``.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np

from crossret._io import write_json_atomic, write_text_atomic
from crossret.graph import build_cross_domain_graph, class_seed_mass, clip_to_feasible, l2_flow_diffusion_active_set

RESULTS = Path(__file__).resolve().parent / "results"


def synthetic(n_nodes: int, dim: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim)) * 2.0
    n_s = n_nodes // 2
    ys = rng.integers(0, classes, n_s)
    yt = rng.integers(0, classes, n_nodes - n_s)
    xs = centres[ys] + rng.normal(size=(n_s, dim))
    shift = rng.normal(size=dim)
    xt = centres[yt] + shift + rng.normal(size=(n_nodes - n_s, dim)) * 1.2
    return xs.astype(np.float32), ys.astype(np.int64), xt.astype(np.float32)


def fit_exponent(sizes: list[float], seconds: list[float]) -> float:
    return float(np.polyfit(np.log(sizes), np.log(seconds), 1)[0])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 20_000, 50_000, 100_000])
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(RESULTS / "graph_scaling"))
    args = parser.parse_args(argv)
    rows = []
    for n in args.sizes:
        xs, ys, xt = synthetic(n, args.dim, args.classes, args.seed)
        start = time.perf_counter()
        graph = build_cross_domain_graph(xs, ys, xt, k_cross=3, k_target=3, k_source=3, knn="auto")
        graph_seconds = time.perf_counter() - start
        degree = graph.degree
        start = time.perf_counter()
        seed_mass, _ = clip_to_feasible(graph.adjacency,
                                        class_seed_mass(degree, graph.n_source, ys, args.classes, 3.0), degree)
        result = l2_flow_diffusion_active_set(graph.adjacency, seed_mass, degree, tol=1e-4, cg_tol=1e-6)
        diffusion_seconds = time.perf_counter() - start
        edges = int(graph.adjacency.nnz // 2)
        row = {"nodes": n, "edges": edges, **graph.edge_counts, "graph_seconds": round(graph_seconds, 3),
               "diffusion_seconds": round(diffusion_seconds, 3),
               "total_seconds": round(graph_seconds + diffusion_seconds, 3),
               "diffusion_rounds": result.passes, "cg_products": result.pushes, "converged": result.converged,
               "targets_reached": int((result.mass[graph.n_source:].max(axis=1) > 0).sum())}
        rows.append(row)
        print(row, flush=True)
    exponents = {}
    if len(rows) >= 2:
        for key in ("graph_seconds", "diffusion_seconds", "total_seconds"):
            exponents[f"{key}_vs_nodes"] = fit_exponent([r["nodes"] for r in rows], [r[key] for r in rows])
            exponents[f"{key}_vs_edges"] = fit_exponent([r["edges"] for r in rows], [r[key] for r in rows])
    payload = {"script": "benchmarks/graph_scaling.py", "created": time.strftime("%Y-%m-%d %H:%M:%S"),
               "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
               "settings": vars(args) | {"k": 3, "target_fill": 3.0, "solver": "active-set", "tol": 1e-4,
                                         "knn": "auto (exact <= 20k rows per search, HNSW above)"},
               "rows": rows, "exponents": exponents}
    out = Path(args.out)
    write_json_atomic(out.with_suffix(".json"), payload)
    lines = ["# COUPLE graph + diffusion scaling", "",
             f"Synthetic Gaussian mixture, {args.dim}-d, {args.classes} classes, half source / half shifted target; "
             "k = 3, per-class diffusion (target_fill 3, active-set solver, tol 1e-4). Written by "
             "`benchmarks/graph_scaling.py`.", "",
             "| nodes | edges | cross edges | graph s | diffusion s | total s | rounds | CG products |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['nodes']:,} | {r['edges']:,} | {r['cross']:,} | {r['graph_seconds']:.2f} | "
                     f"{r['diffusion_seconds']:.2f} | {r['total_seconds']:.2f} | {r['diffusion_rounds']} | "
                     f"{r['cg_products']} |")
    if exponents:
        lines += ["", "Fitted growth exponent b of time ≈ a·x^b:", ""]
        lines += [f"- {key.replace('_', ' ')}: {value:.2f}" for key, value in exponents.items()]
    write_text_atomic(out.with_suffix(".md"), "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
