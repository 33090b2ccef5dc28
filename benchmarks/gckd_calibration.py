"""How good can GCKD's cross-domain ITM pseudo-pairs be on the synthetic v3 stand-in? δ calibrated on the source.

    python benchmarks/gckd_calibration.py [--sources C I R] [--seeds 0 1] [--precision 0.5 0.3]

Per (source, seed) of protocol v3 (benchmarks/gckd.py: the same datasets, generic model and source training as
its rows), the source-trained model, i.e. the model every variant starts adapting from, encodes

* the source's test split (labelled; v3 datasets have no val split): its mutual-nearest caption–image pairs,
  their identity precision, and δ for each ``--precision`` (``crossret.textimage.calibration``, what
  ``crossret gckd adapt --delta-precision`` does);
* each target's *training* split (the unlabelled data the pseudo-pairs are mined from): its mutual-nearest
  pairs, and how many of them each calibrated δ admits and how many of those are right. The target's labels
  are used for this report only; nothing is chosen from them.

Writes ``results/gckd_calibration.{json,md}`` with the environment (benchmarks/_repro.py).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

import _repro
import gckd as bench
from crossret.storage.atomic import write_json_atomic, write_text_atomic

RESULTS = Path(__file__).resolve().parent / "results"


def _features(run_dir: Path, dataset_dir: Path, split: str) -> tuple[Any, Any, Any]:
    from crossret.data.person import build_eval_view, load_person_dataset
    from crossret.storage.safe_read import read_yaml_mapping
    from crossret.textimage.albef import AlbefConfig
    from crossret.textimage.checkpoint import load_albef_checkpoint
    from crossret.textimage.pipeline import encode_view
    from crossret.textimage.tokenize import CaptionTokenizer

    saved = read_yaml_mapping(run_dir / "config.yaml")
    model = load_albef_checkpoint(run_dir / "model.pt", AlbefConfig.from_dict(saved["albef"])).model
    tokenizer = CaptionTokenizer.from_vocab(run_dir / "vocab.txt", max_length=int(saved["run"]["max_tokens"]))
    view = build_eval_view(load_person_dataset(None, dataset_dir), split, max_words=int(saved["run"]["max_words"]))
    text_feat, image_feat = encode_view(model, tokenizer, view)
    return text_feat, image_feat, view


def source_trained_model(root: Path, source: str, seed: int, generic: dict[str, Any]) -> Path:
    """Write the v3 datasets of ``seed`` under ``root / "data"`` and train the model on ``source`` from the generic
    model, exactly as benchmarks/gckd.py's source training of this (source, seed); returns its run folder."""
    import torch

    from crossret.data.synthetic_person import generate_person_datasets
    from crossret.textimage.pipeline import GckdRunConfig, run_gckd

    torch.set_num_threads(1)
    proto = bench.SYNTH_V3
    generate_person_datasets(root / "data", n_train_ids=proto["train_ids"], n_test_ids=proto["test_ids"],
                             images_per_id=proto["images_per_id"], seed=seed, protocol="v3")
    pre = root / "pretrain"
    run_gckd(GckdRunConfig(stage="pretrain", init=generic["run_dir"], rerank_k=0, model="tiny",
                           source_dir=str(root / "data" / bench.DIRS[source]),
                           train={**proto["train"], "seed": seed, "epochs": proto["pretrain_epochs"]}), pre)
    return pre


def one(source: str, seed: int, precisions: list[float], generic: dict[str, Any]) -> dict[str, Any]:
    from crossret.textimage.calibration import delta_from_scores, mutual_pair_scores

    with tempfile.TemporaryDirectory(prefix="crossret-gckd-calibration-") as tmp:
        root = Path(tmp)
        pre = source_trained_model(root, source, seed, generic)
        text_feat, image_feat, view = _features(pre, root / "data" / bench.DIRS[source], "test")
        scores, correct = mutual_pair_scores(text_feat, image_feat, view.caption_person_ids, view.image_person_ids)
        calibrations = {str(p): delta_from_scores(scores, correct, precision=p, captions=view.num_queries,
                                                  images=view.num_gallery).to_dict() for p in precisions}
        targets = {}
        for target in (t for t in bench.DIRS if t != source):
            t_text, t_image, t_view = _features(pre, root / "data" / bench.DIRS[target], "train")
            t_scores, t_correct = mutual_pair_scores(t_text, t_image, t_view.caption_person_ids,
                                                     t_view.image_person_ids)
            at_delta = {}
            for p, cal in calibrations.items():
                admitted = t_scores >= cal["delta"] if cal["reached"] else np.zeros(t_scores.size, dtype=bool)
                at_delta[p] = {"pairs": int(admitted.sum()),
                               "correct": int(t_correct[admitted].sum())}
            targets[target] = {"captions": t_view.num_queries, "images": t_view.num_gallery,
                               "mutual_pairs": int(t_scores.size), "mutual_correct": int(t_correct.sum()),
                               "best_cosine": float(t_scores[0]) if t_scores.size else None,
                               "at_delta": at_delta}
    return {"source": source, "seed": seed, "source_split": "test", "source_mutual_pairs": int(scores.size),
            "source_mutual_correct": int(correct.sum()), "calibration": calibrations, "targets": targets}


def table(rows: list[dict[str, Any]], precisions: list[float]) -> str:
    lines = ["# GCKD pseudo-pairs on the synthetic v3 stand-in: δ calibrated on the source", "",
             "Model: the source-trained model every v3 variant starts adapting from. Mutual-nearest caption-image "
             "pairs (ITC cosine). Source: its test split (labelled). Target: its training split, the data "
             "pseudo-pairs are mined from (labels used for this report only). Counts are right/all.", "",
             "| source | seed | source mutual pairs right/all | "
             + " | ".join(f"δ at precision {p} (pairs)" for p in precisions)
             + " | target | target mutual pairs right/all | target best cosine | "
             + " | ".join(f"admitted at precision-{p} δ right/all" for p in precisions) + " |",
             "|---|---:|---:|" + "---:|" * len(precisions) + "---|---:|---:|" + "---:|" * len(precisions)]
    for r in rows:
        cals = [r["calibration"][str(p)] for p in precisions]
        cal_cells = [f"{c['delta']:.3f} ({c['pairs']})" if c["reached"] else "none reaches it" for c in cals]
        for target, t in r["targets"].items():
            best = "–" if t["best_cosine"] is None else f"{t['best_cosine']:.3f}"
            source_cell = f"{r['source_mutual_correct']}/{r['source_mutual_pairs']}"
            lines.append(f"| {r['source']} | {r['seed']} | {source_cell} | " + " | ".join(cal_cells)
                         + f" | {target} | {t['mutual_correct']}/{t['mutual_pairs']} | {best} | "
                         + " | ".join(f"{t['at_delta'][str(p)]['correct']}/{t['at_delta'][str(p)]['pairs']}"
                                      for p in precisions) + " |")
    src = [r["source_mutual_correct"] / max(1, r["source_mutual_pairs"]) for r in rows]
    tgt = [t["mutual_correct"] / max(1, t["mutual_pairs"]) for r in rows for t in r["targets"].values()]
    lines += ["", f"Mean precision of all mutual-nearest pairs: source {100 * statistics.mean(src):.1f} %, "
              f"target {100 * statistics.mean(tgt):.1f} % (chance: 1 in {bench.SYNTH_V3['train_ids']} identities "
              "on a target training split)."]
    return "\n".join(lines) + "\n"


def v3_parser(description: str, out_name: str) -> argparse.ArgumentParser:
    """The options the v3 diagnostics share: ``--sources`` and ``--out``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--sources", nargs="+", default=["C", "I", "R"], choices=list(bench.DIRS))
    parser.add_argument("--out", type=Path, default=RESULTS / out_name)
    return parser


def v3_generic_model() -> dict[str, Any]:
    """Pin the numerics as benchmarks/gckd.py does (the same source training as its rows) and return its v3
    generic model (trained once, cached)."""
    _repro.pin_numerics()
    return bench.generic_pretraining(version=bench.SYNTH_V3_VERSION)


def main(argv: list[str] | None = None) -> int:
    parser = v3_parser(__doc__.splitlines()[0], "gckd_calibration")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--precision", nargs="+", type=float, default=[0.5, 0.3])
    args = parser.parse_args(argv)
    started = time.time()
    generic = v3_generic_model()
    rows = []
    for source in args.sources:
        for seed in args.seeds:
            rows.append(one(source, seed, args.precision, generic))
            print(f"{source} seed {seed}: source {rows[-1]['source_mutual_correct']}/{rows[-1]['source_mutual_pairs']}",
                  file=sys.stderr, flush=True)
    payload = {"protocol": "synthetic v3 (benchmarks/gckd.py SYNTH_V3)", "generic_digest": generic["digest"],
               "precisions": args.precision, "rows": rows, "environment": _repro.environment(),
               "wall_seconds": round(time.time() - started, 1),
               "command": "python benchmarks/gckd_calibration.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    write_json_atomic(args.out.with_suffix(".json"), payload)
    write_text_atomic(args.out.with_suffix(".md"), table(rows, args.precision))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
