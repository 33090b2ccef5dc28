"""GCKD's memory banks and cross-domain ITM mining on development data draws of the synthetic v3 stand-in.

    python benchmarks/gckd_dev.py [--draws 100:C:I 101:I:R ...] [--jobs 2]

Development evidence for choices of GCKD's target terms, kept apart from the benchmark: each *draw* is a data seed
that is not a benchmark seed (benchmarks/gckd.py runs seeds 0-7; these are 100 and up) with one source → target
setting. Per draw the protocol v3 datasets are generated, the model is trained on the source from the v3 generic
model exactly as benchmarks/gckd.py does, then every variant of :data:`DEV_VARIANTS` adapts from it and is
evaluated once on the draw's target test split (text → image, ITM re-rank of the ITC top-k and ITC). The
pseudo-pair precision (the target *training* labels) is reported, never used to choose.

Variants (every target-term setting explicit, whatever the benchmark's protocol settings are):

* ``batch-itm`` — the full method with cross-domain ITM pairs mined inside the batch (teacher t2i probability
  over the batch's 16 images ≥ δ = 0.5);
* ``bank-itm`` — pairs mined over batch ∪ target banks (mutual nearest neighbours, probability over all
  candidate images ≥ δ = 0.1; δ = 0.3 admitted no pair on draws 100-102 and 0.5 none in the benchmark);
* ``*-no-memory`` — the same without memory banks (``memory_size=0``: graph, KD candidates and mining over the
  batch only).

Writes ``results/gckd_dev.{json,md}``: per draw and variant the metrics, and paired differences over the draws
with 95 % percentile-bootstrap intervals (benchmarks/_bootstrap.py).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import _bootstrap
import _repro
import gckd as bench
from crossret.storage.atomic import write_json_atomic, write_text_atomic

RESULTS = Path(__file__).resolve().parent / "results"

DEV_VARIANTS: dict[str, dict[str, Any]] = {
    "batch-itm": {"cd_itm_mining": "batch", "delta": 0.5},
    "batch-itm-no-memory": {"cd_itm_mining": "batch", "delta": 0.5, "memory_size": 0},
    "bank-itm": {"cd_itm_mining": "banks", "delta": 0.1},
    "bank-itm-no-memory": {"cd_itm_mining": "banks", "delta": 0.1, "memory_size": 0},
}
DRAWS = ("100:C:I", "101:I:R", "102:R:C", "103:C:R", "104:R:I", "105:I:C", "106:C:I", "107:R:I", "108:I:R")
# (variant, minus): what each comparison says
COMPARISONS = (("bank-itm", "batch-itm", "bank mining − in-batch mining (with banks)"),
               ("batch-itm", "batch-itm-no-memory", "memory banks, in-batch mining"),
               ("bank-itm", "bank-itm-no-memory", "memory banks, bank mining"))


def parse_draw(text: str) -> tuple[int, str, str]:
    """``"SEED:SOURCE:TARGET"`` → ``(seed, source, target)``; only development seeds (not benchmark seeds)."""
    try:
        seed, source, target = text.split(":")
        seed_value = int(seed)
    except ValueError:
        raise argparse.ArgumentTypeError(f"draw {text!r}: expected SEED:SOURCE:TARGET, e.g. 100:C:I") from None
    if seed_value in bench.V3_SEEDS:
        raise argparse.ArgumentTypeError(f"draw {text!r}: seed {seed_value} is a benchmark seed; use 100 or more")
    if source not in bench.DIRS or target not in bench.DIRS or source == target:
        raise argparse.ArgumentTypeError(f"draw {text!r}: source and target are two of {sorted(bench.DIRS)}")
    return seed_value, source, target


def _row(row: dict[str, Any]) -> dict[str, Any]:
    return {"seed": row["seed"], "setting": row["setting"], "variant": row["variant"],
            "itm_map": row["itm"]["map"], "itc_map": row["itc"]["map"],
            "pseudo_pairs_per_step": row["pseudo_pairs_per_step"],
            "pseudo_pair_precision": row["pseudo_pair_precision"],
            "train_seconds": row["train_seconds"], "config": row["config"]}


def comparisons(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Paired differences (mAP points) over the draws that have both variants, with bootstrap intervals."""
    by = {(r["seed"], r["variant"]): r for r in rows}
    out = []
    for variant, minus, what in COMPARISONS:
        seeds = sorted(s for (s, v) in by if v == variant and (s, minus) in by)
        if not seeds:
            continue
        entry: dict[str, Any] = {"variant": variant, "minus": minus, "what": what, "draws": len(seeds)}
        for metric in ("itm_map", "itc_map"):
            entry[metric] = _bootstrap.paired_ci([100 * (by[(s, variant)][metric] - by[(s, minus)][metric])
                                                  for s in seeds])
        out.append(entry)
    return out


def _points(value: float) -> str:
    """``+1.23``; a difference that rounds to zero is ``+0.00``, never ``-0.00``."""
    return f"{round(value, 2) + 0.0:+.2f}"


def markdown(rows: list[dict[str, Any]], generic: dict[str, Any]) -> str:
    itc = generic.get("generic_test") or {}
    lines = ["# GCKD target terms on development draws of the synthetic v3 stand-in", "",
             "Each draw: a data seed that is not a benchmark seed, one source → target setting; source training "
             "and adaptation as `benchmarks/gckd.py --protocol v3`; target test mAP (%) once at the last epoch. "
             "Pseudo-pair precision uses the target training labels (reported only). Written by "
             "`benchmarks/gckd_dev.py`.", "",
             f"Generic model: weights {generic.get('weights')} (held-out generic mAP "
             f"{100 * itc.get('map', float('nan')):.2f}).", "",
             "| draw | setting | variant | ITM mAP | ITC mAP | pseudo-pairs/step | pseudo-pair precision |",
             "|---:|---|---|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: (r["seed"], list(DEV_VARIANTS).index(r["variant"]))):
        prec = r["pseudo_pair_precision"]
        lines.append(f"| {r['seed']} | {r['setting']} | {r['variant']} | {100 * r['itm_map']:.2f} | "
                     f"{100 * r['itc_map']:.2f} | {r['pseudo_pairs_per_step'] or 0:.2f} | "
                     f"{'-' if prec is None else f'{100 * prec:.1f} %'} |")
    lines += ["", "Mean over the draws:", "", "| variant | ITM mAP | ITC mAP | pseudo-pair precision | draws |",
              "|---|---:|---:|---:|---:|"]
    for variant in DEV_VARIANTS:
        group = [r for r in rows if r["variant"] == variant]
        if group:
            prec = [r["pseudo_pair_precision"] for r in group if r["pseudo_pair_precision"] is not None]
            lines.append(f"| {variant} | {100 * statistics.mean(r['itm_map'] for r in group):.2f} | "
                         f"{100 * statistics.mean(r['itc_map'] for r in group):.2f} | "
                         f"{f'{100 * statistics.mean(prec):.1f} %' if prec else '-'} | {len(group)} |")
    lines += ["", "Paired differences over the draws (mAP points, 95 % percentile-bootstrap interval):", "",
              "| comparison | ITM [95 % CI] | ITC [95 % CI] | draws |", "|---|---:|---:|---:|"]
    for c in comparisons(rows):
        cells = [f"{_points(c[m]['mean'])} [{_points(c[m]['ci95'][0])}, {_points(c[m]['ci95'][1])}]"
                 for m in ("itm_map", "itc_map")]
        lines.append(f"| {c['variant']} − {c['minus']} ({c['what']}) | {cells[0]} | {cells[1]} | {c['draws']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", nargs="+", type=parse_draw, default=[parse_draw(d) for d in DRAWS],
                        metavar="SEED:SOURCE:TARGET", help="development draws (data seed >= 100, setting)")
    parser.add_argument("--variants", nargs="+", choices=list(DEV_VARIANTS), default=list(DEV_VARIANTS))
    parser.add_argument("--jobs", type=int, default=1, help="draws run in parallel (one torch thread each)")
    parser.add_argument("--out", type=Path, default=RESULTS / "gckd_dev")
    args = parser.parse_args(argv)
    _repro.pin_numerics()
    started = time.time()
    generic = bench.generic_pretraining(version=bench.SYNTH_V3_VERSION)
    jobs = [{"seed": seed, "source": source, "targets": [target], "generic": generic, "version": bench.SYNTH_V3_VERSION,
             "variants": args.variants, "changes": DEV_VARIANTS} for seed, source, target in args.draws]
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        rows = [_row(r) for rows in pool.map(bench.run_synth, jobs) for r in rows]
    payload = {"protocol": "synthetic v3 (benchmarks/gckd.py SYNTH_V3), development draws",
               "draws": [f"{s}:{a}:{b}" for s, a, b in args.draws],
               "variants": {v: DEV_VARIANTS[v] for v in args.variants},
               "generic": {k: generic.get(k) for k in ("digest", "weights", "generic_test", "final_loss")},
               "rows": rows, "comparisons": comparisons(rows), "environment": _repro.environment(),
               "wall_seconds": round(time.time() - started, 1),
               "command": "python benchmarks/gckd_dev.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    write_json_atomic(args.out.with_suffix(".json"), payload)
    write_text_atomic(args.out.with_suffix(".md"), markdown(rows, generic))
    print(f"wrote {args.out.with_suffix('.md')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
