"""GCKD against source-only training and each GCKD module switched off, on two benchmarks.

    python benchmarks/gckd.py --data-dir ../shared/data [--parts wiki synth] [--seeds 0 1 2] [--jobs 2]

* ``wiki`` — **real features**: the Wikipedia image–text set (Rasiwasia et al. 2010; 128-d image,
  100-d text features) with the *feature-heads* backbone as a cross-category transfer: source = the
  training pairs of categories 0–4 with labels, target = the training pairs of categories 5–9 without
  labels; evaluation = text→image retrieval over the target *test* pairs (relevant = same category).
* ``synth`` — **synthetic cross-dataset person retrieval**: datasets generated in the three real
  annotation formats (``crossret gckd synth``; a different rendering and caption style per dataset),
  the tiny ALBEF backbone on pixels and WordPiece tokens, all six source→target settings; evaluation =
  text→image over the target test split (relevant = same identity). As the real pipeline starts from
  ALBEF's generic pre-trained weights, the tiny model first learns word–pixel grounding on a **generic
  pre-training corpus** (:func:`crossret.data.synthetic_person.generate_pretraining_corpus`: random
  rendering styles, a fourth caption style; no identity of any benchmark dataset). That model and its
  WordPiece vocabulary (trained on the generic captions only) are made once (seed ``SYNTH["generic"]``)
  and cached under ``benchmarks/.cache/``, and every (source, seed) starts from them — as every run of
  the paper starts from the same released ALBEF checkpoint.

Protocol (both): per (source, seed) a model is first trained on the source only (``pretrain_epochs``);
from that same model every variant then trains ``adapt_epochs`` more epochs:

* ``source-only``  — the source losses only (ITC + MD, ITM, MLM): same schedule, no target term;
* ``gckd``         — the full method (defaults of :class:`crossret.textimage.gckd.GckdConfig`);
* ``no-gmp``       — no graph propagation (KD targets from raw teacher features, no propagated ITC);
* ``no-cmkd``      — no contrastive KD on the target (``kd_weight=0``);
* ``no-cd-itm``    — no cross-domain ITM (``cd_itm_weight=0``);
* ``no-memory``    — no memory banks (graph and candidates from the batch only).

Every variant is evaluated once at its last epoch: no model selection, no target label in any choice.
Runs are appended to ``results/gckd_runs.jsonl`` as they finish (an interrupted benchmark resumes), each
with the CPU, pinned numerics and package versions it ran with (``environment``; benchmarks/_repro.py);
tables (mean ± std over seeds) go to ``results/gckd.{json,md}``.

    python benchmarks/gckd.py --protocol v3 [--settings C->I ...] [--seeds 0 .. 7] [--variants ...]

runs the synthetic part with protocol v3 (``SYNTH_V3``: captions naming a subset of the attributes, each
dataset's own words for some concepts, 1,000-image target test galleries, α = 0.4; docs/benchmarks.md),
8 seeds by default. Its rows go to the same runs file with ``"synth_version": 3`` (resumed the same way);
``results/gckd_v3.md`` reports ITM-reranked mAP (the paper's inference) and ITC mAP per variant with the
paired difference to source-only on the same (setting, seed) and its 95 % percentile-bootstrap interval
over those pairs (benchmarks/_bootstrap.py), and the same table for the recorded Wikipedia rows;
``results/gckd_v3_summary.json`` has exactly ``protocol``, ``seeds``, ``settings`` and per variant
``itm_map``, ``itc_map``, ``delta_itm`` and ``delta_itc`` (``mean``, ``ci95``), in %.

    python benchmarks/gckd.py --check N [--check-seed S] [--parts wiki synth] [--jobs 1]

re-runs N sampled recorded rows (one per part and variant in turn) with their recorded training config
and compares their metrics exactly (ITC / ITM mAP, R@1/5/10, mINP; pseudo-pairs per step and their
precision); writes ``results/gckd_check.{json,md}`` and exits 1 when a row moved; nothing else is run
or written. Only rows this code can make are sampled: wiki rows, and synthetic rows of protocol
v2 (or of today's v3 configuration) from the current generic model's digest. A synthetic row's source
pre-training is redone, and so is the generic pre-training it starts from (once per check and protocol,
in a temporary directory, never from ``benchmarks/.cache``: a cached model may come from other
numerics); its held-out metrics are compared with the ones ``results/gckd.json`` (v3:
``results/gckd_v3.json``) records. A recorded config runs with the trainer's legacy values for keys it
predates.

    python benchmarks/gckd.py --regenerate [--parts wiki synth] [--protocol v2|v3] [--jobs 2]

re-runs every recorded row this code can re-make (the rows ``--check`` samples from) with its recorded
config, one job per (part, protocol, seed, source) so that each source pre-training is done once; the
generic model of each synthetic protocol comes from ``benchmarks/.cache`` as in a normal run. Fresh rows go
to ``results/gckd_runs.regenerating.jsonl`` as they finish (a re-started regeneration skips the rows already
there); once every selected row is redone, the runs file is replaced atomically by the rows in their
recorded order, each re-made row by its fresh version and every other row (protocol v1, another v3
configuration, or outside ``--parts`` / ``--protocol``) byte for byte as recorded. The runs file is left
alone when another invocation wrote to it meanwhile. ``results/gckd_regenerate.{json,md}`` list the rows
whose metrics moved (recorded vs new ITC / ITM mAP) and the rows kept, and the tables are rewritten.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import _bootstrap
import _repro
from crossret.storage.atomic import write_json_atomic, write_text_atomic

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS: dict[str, dict[str, Any] | None] = {
    "source-only": None,  # GckdConfig.source_only
    "gckd": {},
    "no-gmp": {"use_gnn": False, "prop_weight": 0.0},
    "no-cmkd": {"kd_weight": 0.0},
    "no-cd-itm": {"cd_itm_weight": 0.0},
    "no-memory": {"memory_size": 0},
}

def _gckd_fields() -> set[str]:
    import dataclasses

    from crossret.textimage.gckd import GckdConfig

    return {f.name for f in dataclasses.fields(GckdConfig)}


# Optional v3 variants (not run unless named in --variants) for GckdConfig options that not every version of
# the trainer has: registered only when the fields exist.
_V3_OPTIONAL: dict[str, dict[str, Any]] = {
    "gckd-bank-itm": {"cd_itm_mining": "banks"},  # cross-domain ITM pairs mined over the target banks
    "gckd-target-mlm": {"target_mlm_weight": 1.0},  # masked LM on the pseudo-pairs' target captions
    "gckd-no-warm-start": {"warm_start_banks": False},  # banks filled during training only
}
V3_VARIANTS: dict[str, dict[str, Any] | None] = {
    **VARIANTS, **{name: change for name, change in _V3_OPTIONAL.items() if set(change) <= _gckd_fields()}}


def _legacy(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` with every GckdConfig key it lacks set to the value that reproduces the trainer from before
    that key existed (``crossret.textimage.gckd.LEGACY_VALUES`` where the trainer has it): the wiki and v2
    protocols, and any recorded row's config, run as they ran when they were recorded."""
    from crossret.textimage import gckd

    legacy: dict[str, Any] = getattr(gckd, "LEGACY_VALUES", {})
    return {**{k: v for k, v in legacy.items() if k not in values}, **values}


SETTINGS = ("C->I", "C->R", "I->C", "I->R", "R->C", "R->I")
WIKI_SETTING = "wiki 0-4 -> 5-9"
DATASET = {"C": "cuhk-pedes", "I": "icfg-pedes", "R": "rstpreid"}
DIRS = {"C": "CUHK-PEDES", "I": "ICFG-PEDES", "R": "RSTPReid"}

# Fixed before any run (no tuning on target test labels). Wikipedia: heads trained from scratch, so a
# larger learning rate than RaSa's 1e-5 fine-tuning rate; memory ≈ the target training size (1,053).
WIKI = {"pretrain_epochs": 20, "adapt_epochs": 10,
        "train": {"lr": 1e-3, "head_lr": 1e-3, "ids_per_batch": 5, "pairs_per_id": 8, "target_batch": 40,
                  "memory_size": 1024}}
# Synthetic: a small ALBEF (width 64) on 48×24 images, pre-trained on the generic corpus, then trained on
# the source. Version 2 of this protocol; version 1 (rows without "synth_version") trained from scratch on
# the source and stayed at chance on every target (docs/gckd.md).
SYNTH_VERSION = 2
SYNTH = {"pretrain_epochs": 12, "adapt_epochs": 4, "train_ids": 100, "test_ids": 30, "images_per_id": 4,
         # Generic pre-training from random weights: ITC only over the student's own in-batch features
         # (teacher candidates are collapsed from random init: held-out mAP 9 after 25 epochs; docs/gckd.md).
         "generic": {"n_ids": 1000, "images_per_id": 2, "n_test_ids": 40, "seed": 0, "epochs": 15,
                     "vocab_size": 600, "batch": {"ids_per_batch": 32, "pairs_per_id": 2},
                     "train": {"itc_candidates": "student", "itm_weight": 0.0, "mlm_weight": 0.0,
                               "memory_size": 0, "alpha": 0.0}},
         "model": {"image_size": [48, 24], "vision_width": 64, "vision_heads": 4, "text_width": 64,
                   "text_heads": 4, "text_intermediate": 128, "text_layers": 2, "embed_dim": 32},
         "train": {"lr": 1e-3, "head_lr": 1e-3, "ids_per_batch": 8, "pairs_per_id": 2, "target_batch": 16,
                   "memory_size": 512, "alpha": 0.0}}
# Version 3 (``--protocol v3``): captions name 2-4 attributes in varied wording, each dataset has its own words
# for five concepts that the generic corpus (base words only) never uses, 1,000-image target test galleries,
# momentum distillation at ALBEF's α = 0.4. Sizes and epochs are fixed by the CPU cost of the whole benchmark
# and development runs on data seed SYNTH_V3_DEV_SEED (the source's own splits) and on the held-out generic
# identities (docs/benchmarks.md); no target test label enters any choice.
SYNTH_V3_VERSION = 3
SYNTH_V3_DEV_SEED = 100
SYNTH_V3 = {"pretrain_epochs": 12, "adapt_epochs": 4, "train_ids": 100, "test_ids": 250, "images_per_id": 4,
            "rerank_k": 32,
            # The generic stage trains the ITM head too (itm_weight 1): with it off the head stays near
            # chance and re-ranking can only hurt; chosen on held-out generic identities (docs/benchmarks.md).
            # 10,000 generic identities for 15 epochs (as many pairs as 1,000 identities for 150 epochs): chosen on the
            # source's own test split of the development seed (docs/benchmarks.md).
            "generic": {**SYNTH["generic"], "protocol": "v3", "n_ids": 10000, "epochs": 15,
                        "train": {**SYNTH["generic"]["train"], "itm_weight": 1.0}},
            "model": SYNTH["model"],
            "train": {**SYNTH["train"], "alpha": 0.4},
            # Settings of the target terms, given to every variant that adapts (a variant's own change wins);
            # source-only has no target term, so its config and rows do not depend on them.
            "adapt": {}}
V3_SEEDS = tuple(range(8))


def _adapt_settings(version: int, variant: str) -> dict[str, Any]:
    """The protocol's target-term settings (``adapt``) as ``variant`` runs them: empty for source-only and
    for protocols without them, the variant's own change where it sets the same key."""
    change = V3_VARIANTS.get(variant)
    if change is None:
        return {}
    return {k: change.get(k, v) for k, v in _protocol(version).get("adapt", {}).items()}


def _protocol(version: int) -> dict[str, Any]:
    """The synthetic protocol of ``version`` (2 or 3)."""
    return {SYNTH_VERSION: SYNTH, SYNTH_V3_VERSION: SYNTH_V3}[version]


def _variant_config(name: str, base: dict[str, Any], epochs: int) -> Any:
    from crossret.textimage.gckd import GckdConfig

    values = {**base, "epochs": epochs}
    change = VARIANTS[name]
    return GckdConfig.source_only(**values) if change is None else GckdConfig.from_dict({**values, **change})


def _metrics_row(evaluation: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for ranking in ("itc", "itm"):
        if evaluation.get(ranking):
            out[ranking] = {k: evaluation[ranking][k] for k in ("rank1", "rank5", "rank10", "map", "minp")}
    if "itm" in out:  # how the top-k was re-ranked (rows without it used the ITM logit alone)
        out["rerank_score"] = evaluation.get("rerank_score", "itm")
    return out


def _record(job: dict[str, Any], row: dict[str, Any]) -> None:
    """Append one finished run to the runs file at once (a single short ``write`` in append mode, so
    parallel workers do not interleave lines), so that an interrupted benchmark keeps every run done.
    A check's job has no runs file: its rows are only returned."""
    if job.get("runs_path"):
        with open(job["runs_path"], "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")
    itc = row["itc"]
    print(f"{row['setting']:16s} {row['variant']:12s} seed {row['seed']}: ITC mAP {100 * itc['map']:6.2f} "
          f"R@1 {100 * itc['rank1']:6.2f} ({row['train_seconds']:.0f}s)", file=sys.stderr, flush=True)


def _host() -> dict[str, Any]:
    import torch

    return {"node": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__}


# ---------------------------------------------------------------------------------------------- wiki
def run_wiki(job: dict[str, Any]) -> list[dict[str, Any]]:
    """Pre-train on the source categories, then every requested variant from that model."""
    import numpy as np
    import torch

    from crossret.data.crossmodal import category_transfer_split, load_wikipedia
    from crossret.textimage.evaluate import evaluate_model
    from crossret.textimage.feature_heads import FeatureHeadsConfig, FeatureHeadsModel
    from crossret.textimage.gckd import GckdConfig, GckdTrainer
    from crossret.textimage.streams import FeatureTrainingData

    torch.set_num_threads(1)
    seed = job["seed"]
    split = category_transfer_split(*load_wikipedia(job["data_dir"]), source_classes=(0, 1, 2, 3, 4))
    source, target, test = split["source_train"], split["target_train"], split["target_test"]
    # z-score with the source statistics only
    stats = {m: (getattr(source, m).mean(0), getattr(source, m).std(0) + 1e-6) for m in ("image", "text")}

    def z(s: Any, m: str) -> np.ndarray:
        return ((getattr(s, m) - stats[m][0]) / stats[m][1]).astype(np.float32)

    base = {**WIKI["train"], "seed": seed}
    data = FeatureTrainingData(z(source, "image"), z(source, "text"), source.labels, target_image=z(target, "image"),
                               target_text=z(target, "text"), ids_per_batch=base["ids_per_batch"],
                               pairs_per_id=base["pairs_per_id"], target_batch=base["target_batch"], seed=seed,
                               target_truth_ids=(target.labels, target.labels))
    torch.manual_seed(seed)
    model = FeatureHeadsModel(FeatureHeadsConfig(image_dim=source.image_dim, text_dim=source.text_dim))
    GckdTrainer(model, GckdConfig.source_only(**{**base, "epochs": WIKI["pretrain_epochs"]})).fit(data)

    def evaluate(m: Any) -> dict[str, Any]:
        return evaluate_model(m, [torch.from_numpy(z(test, "image"))], [(torch.from_numpy(z(test, "text")), None)],
                              test.labels, test.labels, rerank_k=128)

    rows = []
    for variant in job["variants"]:
        student = copy.deepcopy(model)
        # A check or a regeneration re-runs a recorded row with its recorded config, whatever today's defaults are.
        recorded = job["configs"][_config_key(WIKI_SETTING, variant)] if "configs" in job else job.get("config")
        config = (GckdConfig.from_dict(_legacy(recorded)) if recorded is not None
                  else _variant_config(variant, _legacy(base), WIKI["adapt_epochs"]))
        started = time.perf_counter()
        result = GckdTrainer(student, config).fit(data)
        last = result.history[-1]
        rows.append({"part": "wiki", "setting": WIKI_SETTING, "variant": variant, "seed": seed,
                     **_metrics_row(evaluate(student)), "train_seconds": time.perf_counter() - started,
                     "pseudo_pairs_per_step": last.get("pseudo_pairs"),
                     "pseudo_pair_precision": last.get("pseudo_pair_precision"),
                     "config": config.to_dict(), "pretrain_epochs": WIKI["pretrain_epochs"], "host": _host(),
                     "environment": _repro.environment()})
        _record(job, rows[-1])
    return rows


# ---------------------------------------------------------------------------------------------- synth
CACHE = Path(__file__).resolve().parent / ".cache"


def generic_spec(version: int = SYNTH_VERSION) -> tuple[dict[str, Any], str]:
    """What decides the generic pre-trained model of protocol ``version``, and its digest (the cache key;
    synthetic rows record it). Version 3's corpus is marked by ``generic["protocol"]``."""
    import hashlib

    proto = _protocol(version)
    spec = {"generic": proto["generic"], "model": proto["model"], "train": proto["train"]}
    return spec, hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


def generic_pretraining(cache: Path = CACHE, threads: int = 1, version: int = SYNTH_VERSION) -> dict[str, Any]:
    """The generic pre-trained tiny ALBEF (and its vocabulary) every synthetic run starts from: built once
    and cached under ``cache/gckd-generic-<digest of the protocol>``; returns its run directory and report.

    The report's ``generic_test`` is text→image on held-out *generic* identities (a check that the
    pre-training learnt grounding; no benchmark dataset is involved)."""
    import torch

    from crossret.data.synthetic_person import generate_pretraining_corpus, write_wordpiece_corpus
    from crossret.textimage.pipeline import GckdRunConfig, run_gckd
    from crossret.textimage.tokenize import train_wordpiece_vocab

    spec, digest = generic_spec(version)
    proto = _protocol(version)
    root = cache / f"gckd-generic-{digest}"
    report_path = root / "report.json"
    if report_path.is_file():
        report = json.loads(report_path.read_text(encoding="utf-8"))
        if "weights" not in report:  # cached before reports named their weights
            report["weights"] = generic_weights(Path(report["run_dir"]))
            write_json_atomic(report_path, report)
        return report
    g = proto["generic"]
    root.mkdir(parents=True, exist_ok=True)
    corpus_dir = generate_pretraining_corpus(root / "corpus", n_ids=g["n_ids"], images_per_id=g["images_per_id"],
                                             n_test_ids=g["n_test_ids"], seed=g["seed"], overwrite=True,
                                             **({"protocol": g["protocol"]} if "protocol" in g else {}))
    vocab = train_wordpiece_vocab(write_wordpiece_corpus([corpus_dir], root / "captions.txt"), root / "vocab.txt",
                                  vocab_size=g["vocab_size"])
    # One thread by default: several OpenMP threads on a busy machine spin against each other (measured:
    # 10x slower per step than one thread under a load of 8 on 2 cores).
    torch.set_num_threads(max(1, threads))
    started = time.perf_counter()
    metrics = run_gckd(GckdRunConfig(stage="pretrain", source_dir=str(corpus_dir), vocab=str(vocab), model="tiny",
                                     model_overrides=proto["model"], vocab_size=g["vocab_size"], rerank_k=0,
                                     train={**proto["train"], **g["batch"], **g["train"], "seed": g["seed"],
                                            "epochs": g["epochs"]}),
                       root / "model", resume=(root / "model" / "checkpoints").is_dir(),
                       overwrite=not (root / "model" / "checkpoints").is_dir())
    report = {"run_dir": str(root / "model"), "spec": spec, "digest": digest,
              "train_seconds": time.perf_counter() - started, "host": _host(), "environment": _repro.environment(),
              "generic_test": _metrics_row(metrics["evaluation"]).get("itc"),
              "final_loss": metrics["history"][-1].get("loss"), "weights": generic_weights(root / "model")}
    write_json_atomic(report_path, report)
    return report


def generic_weights(run_dir: Path) -> str:
    """A digest of the generic model's weights (the student's tensors in the run's checkpoint, by name): what
    tells two generic models of one spec apart. The spec digest alone does not: the same spec trained with
    another torch thread count or on another CPU gives other weights (docs/benchmarks.md)."""
    import hashlib

    from crossret.textimage.gckd import read_checkpoint

    state = read_checkpoint(run_dir / "checkpoints" / "checkpoint.pt")["model"]
    h = hashlib.sha256()
    for name in sorted(state):
        h.update(name.encode())
        h.update(state[name].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:12]


# The protocol-v3 generic model the rows recorded before rows named their generic weights were made with: its
# spec digest, held-out ITC mAP and final training loss (its report; the weights were not kept).
UNNAMED_V3_GENERIC = {"digest": "d50732e8846c", "map": 0.856826636904762, "final_loss": 1.6779146608352662}


def row_generic(row: dict[str, Any], generic: dict[str, Any] | None) -> str | None:
    """The weights digest of the generic model a synthetic row started from (``None``: not known). A row
    recorded before rows named it counts as made by ``generic`` only when ``generic`` has exactly the spec,
    held-out mAP and final loss of the model those rows were made with (:data:`UNNAMED_V3_GENERIC`): that
    model, rebuilt bit for bit."""
    if "generic_weights" in row:
        return row["generic_weights"]
    if generic and (generic.get("digest"), (generic.get("generic_test") or {}).get("map"),
                    generic.get("final_loss")) == tuple(UNNAMED_V3_GENERIC.values()):
        return generic.get("weights")
    return None


def recorded_generic(out: Path) -> dict[str, Any] | None:
    """The generic model's report as ``<out>_v3.json`` records it (what the tables were made with), if any."""
    path = out.parent / f"{out.name}_v3.json"
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("generic_pretraining")
    except (OSError, ValueError):
        return None


def run_synth(job: dict[str, Any]) -> list[dict[str, Any]]:
    """One (source, seed): generate the datasets, train the generic model on the source, adapt to both
    other datasets with every variant."""
    import torch

    from crossret.data.synthetic_person import generate_person_datasets
    from crossret.textimage.pipeline import GckdRunConfig, run_gckd

    torch.set_num_threads(1)
    seed, source, generic = job["seed"], job["source"], job["generic"]
    version = job.get("version", SYNTH_VERSION)
    proto = _protocol(version)
    rows = []
    with tempfile.TemporaryDirectory(prefix="crossret-gckd-bench-") as tmp:
        root = Path(tmp)
        generate_person_datasets(root / "data", n_train_ids=proto["train_ids"], n_test_ids=proto["test_ids"],
                                 images_per_id=proto["images_per_id"], seed=seed,
                                 **({} if version == SYNTH_VERSION else {"protocol": "v3"}))
        common = {"source_dir": str(root / "data" / DIRS[source]), "model": "tiny",
                  "rerank_k": proto.get("rerank_k", 32)}
        pre = root / "pretrain"
        # Source training from the generic model; the run inherits the generic vocabulary. It is evaluated
        # (ITC) on the source's own test split: a source-domain diagnostic, recorded in v3 rows.
        started = time.perf_counter()
        pre_metrics = run_gckd(GckdRunConfig(stage="pretrain", init=generic["run_dir"], rerank_k=0,
                                             train={**proto["train"], "seed": seed, "epochs": proto["pretrain_epochs"]},
                                             **{k: v for k, v in common.items() if k != "rerank_k"}), pre)
        pretrain_seconds = time.perf_counter() - started
        done = {tuple(key) for key in job.get("done", [])}
        for target in job["targets"]:
            for variant in job["variants"]:
                if (f"{source}->{target}", variant) in done:
                    continue
                change = job.get("changes", V3_VARIANTS)[variant]  # a job may bring its own variants
                train = {**proto["train"], **_adapt_settings(version, variant), "seed": seed,
                         "epochs": proto["adapt_epochs"], **(change or {})}
                if change is None:
                    train.update(prop_weight=0.0, kd_weight=0.0, cd_itm_weight=0.0)
                    if "target_mlm_weight" in _gckd_fields():
                        train["target_mlm_weight"] = 0.0
                if version == SYNTH_VERSION:  # v2 runs as it was recorded, whatever today's defaults are
                    train = _legacy(train)
                if "config" in job:  # a check: the recorded row's config
                    train = _legacy(job["config"])
                if "configs" in job:  # a regeneration: each recorded row's config
                    train = _legacy(job["configs"][_config_key(f"{source}->{target}", variant)])
                started = time.perf_counter()
                metrics = run_gckd(GckdRunConfig(stage="adapt", target_dir=str(root / "data" / DIRS[target]),
                                                 init=str(pre), train=train, **common),
                                   root / f"{target}-{variant}")
                last = metrics["history"][-1]
                rows.append({"part": "synth", "synth_version": version, "setting": f"{source}->{target}",
                             "variant": variant, "seed": seed,
                             **_metrics_row(metrics["evaluation"]), "train_seconds": time.perf_counter() - started,
                             "pseudo_pairs_per_step": last.get("pseudo_pairs"),
                             "pseudo_pair_precision": last.get("pseudo_pair_precision"),
                             "config": metrics["train_config"], "pretrain_epochs": proto["pretrain_epochs"],
                             "synthetic": {k: proto[k] for k in ("train_ids", "test_ids", "images_per_id")},
                             "generic_digest": generic["digest"], "generic_weights": generic.get("weights"),
                             "host": _host(),
                             "environment": _repro.environment(),
                             **({} if version == SYNTH_VERSION else {
                                 "rerank_k": common["rerank_k"], "eval_seconds": metrics.get("eval_seconds"),
                                 "pretrain_seconds": pretrain_seconds,
                                 "source_test_itc": _metrics_row(pre_metrics["evaluation"]).get("itc")})})
                _record(job, rows[-1])
    return rows


# ---------------------------------------------------------------------------------------------- tables
def valid_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows the tables use. A row marked ``INVALID`` (produced by superseded code, see its ``code_note``)
    stays in the runs file for the record but only counts where the note says it is unaffected
    (source-only rows have no target term)."""
    return [r for r in rows
            if not str(r.get("code_note", "")).startswith("INVALID") or r["variant"] == "source-only"]


def _setting_label(row: dict[str, Any]) -> str:
    """The table's setting name; synthetic runs of another protocol version are labelled as such."""
    version = row.get("synth_version", 1)
    if row["part"] == "synth" and version == 1:
        return f"{row['setting']} (v1: no generic pre-training)"
    if row["part"] == "synth" and version != SYNTH_VERSION:
        return f"{row['setting']} (v{version})"
    return row["setting"]


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = valid_rows(rows)
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["part"], _setting_label(row), row["variant"]), []).append(row)
    out = []
    for (part, setting, variant), group in sorted(groups.items()):
        entry: dict[str, Any] = {"part": part, "setting": setting, "variant": variant,
                                 "seeds": sorted(r["seed"] for r in group)}
        for ranking in ("itc", "itm"):
            for metric in ("rank1", "map", "minp"):
                values = [r[ranking][metric] for r in group if ranking in r]
                if values:
                    entry[f"{ranking}_{metric}_mean"] = statistics.mean(values)
                    entry[f"{ranking}_{metric}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        precision = [r["pseudo_pair_precision"] for r in group if r.get("pseudo_pair_precision") is not None]
        entry["pseudo_pair_precision_mean"] = statistics.mean(precision) if precision else None
        entry["pseudo_pairs_per_step_mean"] = statistics.mean(r.get("pseudo_pairs_per_step") or 0.0 for r in group)
        out.append(entry)
    return out


def synth_overview(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per variant, the current protocol's ITC mAP averaged over the six settings for each seed that has all
    six, then mean ± std over those seeds; Δ and (setting, seed) wins are paired against source-only."""
    runs = [r for r in valid_rows(rows) if r["part"] == "synth" and r.get("synth_version", 1) == SYNTH_VERSION]
    by = {(r["variant"], r["seed"], r["setting"]): r["itc"]["map"] for r in runs}
    out = []
    for variant in VARIANTS:
        seeds = sorted({s for (v, s, _) in by if v == variant
                        if all((variant, s, k) in by and ("source-only", s, k) in by for k in SETTINGS)})
        if not seeds:
            continue
        per_seed = [statistics.mean(by[(variant, s, k)] for k in SETTINGS) for s in seeds]
        base = [statistics.mean(by[("source-only", s, k)] for k in SETTINGS) for s in seeds]
        wins = sum(by[(variant, s, k)] > by[("source-only", s, k)] for s in seeds for k in SETTINGS)
        out.append({"variant": variant, "seeds": seeds, "itc_map_per_seed": per_seed,
                    "itc_map_mean": statistics.mean(per_seed),
                    "itc_map_std": statistics.stdev(per_seed) if len(seeds) > 1 else 0.0,
                    "delta_vs_source_only": statistics.mean(per_seed) - statistics.mean(base),
                    "wins_vs_source_only": wins, "pairs": len(seeds) * len(SETTINGS)})
    return out


def _overview_lines(rows: list[dict[str, Any]]) -> list[str]:
    overview = synth_overview(rows)
    if not overview:
        return []
    lines = [f"Mean over the six settings (protocol v{SYNTH_VERSION}; per seed, then mean ± std over seeds; wins = "
             "(setting, seed) pairs where the variant's ITC mAP beats source-only's):", "",
             "| variant | ITC mAP, mean of 6 settings | Δ vs source-only | per seed | wins vs source-only |",
             "|---|---:|---:|---|---:|"]
    for o in overview:
        name = f"**{o['variant']}**" if o["variant"] == "gckd" else o["variant"]
        seeds = ", ".join(f"{100 * v:.2f} (s{s})" for s, v in zip(o["seeds"], o["itc_map_per_seed"], strict=True))
        wins = "-" if o["variant"] == "source-only" else f"{o['wins_vs_source_only']}/{o['pairs']}"
        lines.append(f"| {name} | {100 * o['itc_map_mean']:.2f} ± {100 * o['itc_map_std']:.2f} | "
                     f"{100 * o['delta_vs_source_only']:+.2f} | {seeds} | {wins} |")
    return [*lines, ""]


def markdown(rows: list[dict[str, Any]], generic: dict[str, Any] | None = None) -> str:
    summary = summarise(rows)
    lines = ["# GCKD: text→image retrieval on the target (%)", "",
             "Mean ± std over seeds; every variant continues from the same source-pretrained model for the same "
             "number of epochs and is evaluated once at its last epoch. ITC = cosine ranking; ITM = top-k "
             "re-ranked by the ITM head (k = 128 wiki, 32 synth). Written by `benchmarks/gckd.py`.", ""]
    for part, title in (("wiki", "Real features: Wikipedia, categories 0-4 (labelled) → 5-9 (unlabelled)"),
                        ("synth", "Synthetic cross-dataset person retrieval (tiny ALBEF, pixels + tokens)")):
        entries = [e for e in summary if e["part"] == part]
        if not entries:
            continue
        excluded = len([r for r in rows if r["part"] == part]) - len([r for r in valid_rows(rows) if r["part"] == part])
        lines += [f"## {title}", "",
                  "| setting | variant | ITC mAP | ITC R@1 | ITC mINP | ITM mAP | ITM R@1 | pseudo-pairs/step | "
                  "pseudo-pair precision | seeds |", "|---|---|" + "---:|" * 8]
        if excluded:
            lines[-2:-2] = [f"{excluded} runs of this part were made by superseded code (their `code_note` in the runs "
                            "file says why) and are left out of this table.", ""]
        if part == "synth" and generic:
            itc = generic.get("generic_test") or {}
            g = SYNTH["generic"]
            v2_runs = sum(1 for r in rows if r["part"] == "synth" and r.get("synth_version", 1) == SYNTH_VERSION)
            lines[-2:-2] = [f"Protocol v{SYNTH_VERSION}: every run starts from one generic pre-trained tiny ALBEF "
                            f"({g['n_ids']} generic identities × {g['images_per_id']} images, {g['epochs']} epochs, "
                            f"{generic['train_seconds']:.0f} s), then trains {SYNTH['pretrain_epochs']} epochs on "
                            f"the source. That model's text→image on {g['n_test_ids']} held-out generic identities: "
                            f"mAP {100 * itc.get('map', float('nan')):.2f}, "
                            f"R@1 {100 * itc.get('rank1', float('nan')):.2f}. "
                            + (f"{v2_runs} v{SYNTH_VERSION} runs recorded." if v2_runs else
                               f"No v{SYNTH_VERSION} runs recorded yet (see docs/benchmarks.md)."), ""]
        if part == "synth":
            lines[-2:-2] = _overview_lines(rows)
        for e in sorted(entries, key=lambda e: (e["setting"], list(VARIANTS).index(e["variant"]))):
            def cell(key: str, e: dict[str, Any] = e) -> str:
                return (f"{100 * e[key + '_mean']:.2f} ± {100 * e[key + '_std']:.2f}" if key + "_mean" in e else "-")
            prec = e["pseudo_pair_precision_mean"]
            name = f"**{e['variant']}**" if e["variant"] == "gckd" else e["variant"]
            lines.append(f"| {e['setting']} | {name} | {cell('itc_map')} | {cell('itc_rank1')} | {cell('itc_minp')} | "
                         f"{cell('itm_map')} | {cell('itm_rank1')} | {e['pseudo_pairs_per_step_mean']:.2f} | "
                         f"{'-' if prec is None else f'{100 * prec:.1f}'} | {len(e['seeds'])} |")
        lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- v3 tables
def current_v3(row: dict[str, Any], generic_digest: str, generic: dict[str, Any] | None = None) -> bool:
    """Whether ``row`` is a synthetic row of today's protocol v3 (generic model, epochs, sizes, ITM k and, for
    a variant that adapts, the protocol's target-term settings); v3 rows of another v3 configuration are
    neither "done" nor tabulated with today's. With ``generic`` (the generic model's report), only rows made
    from that very model (:func:`row_generic`) count."""
    if generic is not None and row_generic(row, generic) != generic.get("weights"):
        return False
    return (row["part"] == "synth" and row.get("synth_version") == SYNTH_V3_VERSION
            and row.get("generic_digest") == generic_digest and row["pretrain_epochs"] == SYNTH_V3["pretrain_epochs"]
            and row["config"]["epochs"] == SYNTH_V3["adapt_epochs"] and row.get("rerank_k") == SYNTH_V3["rerank_k"]
            and row.get("synthetic") == {k: SYNTH_V3[k] for k in ("train_ids", "test_ids", "images_per_id")}
            and all(row["config"].get(k) == v for k, v in _adapt_settings(SYNTH_V3_VERSION, row["variant"]).items()))


def paired_summary(rows: list[dict[str, Any]], resamples: int = _bootstrap.RESAMPLES,
                   seed: int = _bootstrap.SEED) -> dict[str, dict[str, Any]]:
    """Per variant: mean ITM / ITC mAP (%) over its (setting, seed) rows and the mean paired difference to
    source-only on the same (setting, seed), with its 95 % percentile-bootstrap interval over those pairs
    (benchmarks/_bootstrap.py); ``pairs`` = how many pairs the differences have."""
    import numpy as np

    by = {(r["variant"], r["setting"], r["seed"]): r for r in rows}

    def values(variant: str, ranking: str) -> dict[tuple[str, int], float]:
        return {(k[1], k[2]): 100.0 * r[ranking]["map"] for k, r in by.items() if k[0] == variant and r.get(ranking)}

    out: dict[str, dict[str, Any]] = {}
    for variant in V3_VARIANTS:
        if not any(k[0] == variant for k in by):
            continue
        entry: dict[str, Any] = {}
        for ranking in ("itm", "itc"):
            mine = values(variant, ranking)
            entry[f"{ranking}_map"] = float(np.mean(list(mine.values()))) if mine else float("nan")
            keys, diffs = _bootstrap.paired_differences(mine, values("source-only", ranking))
            ci = (_bootstrap.paired_ci(diffs, resamples, seed) if keys
                  else {"mean": float("nan"), "ci95": [float("nan"), float("nan")]})
            entry[f"delta_{ranking}"] = {"mean": ci["mean"], "ci95": ci["ci95"]}
            entry[f"{ranking}_pairs"] = len(keys)
        out[variant] = entry
    return out


SUMMARY_KEYS = ("itm_map", "itc_map", "delta_itm", "delta_itc")
ABLATIONS = ("no-gmp", "no-cmkd", "no-cd-itm", "no-memory")


def module_effects(rows: list[dict[str, Any]], resamples: int = _bootstrap.RESAMPLES,
                   seed: int = _bootstrap.SEED) -> dict[str, dict[str, Any]]:
    """What each module adds: per ablation, the mean paired difference full − ablation (``gckd`` minus the
    variant without the module, mAP points, same (setting, seed)) under ITM re-ranking and ITC, with its 95 %
    percentile-bootstrap interval; above 0 = the module helps. Ablations without a ``gckd`` pair are left out."""
    def values(variant: str, ranking: str) -> dict[tuple[str, int], float]:
        return {(r["setting"], r["seed"]): 100.0 * r[ranking]["map"] for r in rows
                if r["variant"] == variant and r.get(ranking)}

    out: dict[str, dict[str, Any]] = {}
    for ablation in ABLATIONS:
        entry = {}
        for ranking in ("itm", "itc"):
            keys, diffs = _bootstrap.paired_differences(values("gckd", ranking), values(ablation, ranking))
            if keys:
                ci = _bootstrap.paired_ci(diffs, resamples, seed)
                entry[ranking] = {"mean": ci["mean"], "ci95": ci["ci95"], "pairs": len(keys)}
        if entry:
            out[ablation] = entry
    return out


def _module_effect_lines(effects: dict[str, dict[str, Any]]) -> list[str]:
    lines = ["What each module adds: full GCKD − the ablation on the same (setting, seed), mAP points with the 95 % "
             "interval (above 0 = the module helps).", "",
             "| module removed | full − ablation, ITM [95 % CI] | full − ablation, ITC [95 % CI] | pairs |",
             "|---|---:|---:|---:|"]
    for name, e in effects.items():
        cells = [_ci_cell(e[k]) if k in e else "–" for k in ("itm", "itc")]
        lines.append(f"| {name} | {cells[0]} | {cells[1]} | {max(v['pairs'] for v in e.values())} |")
    return lines


def v3_summary(rows: list[dict[str, Any]], generic_digest: str, generic: dict[str, Any] | None = None
               ) -> dict[str, Any]:
    """``results/gckd_v3_summary.json``: protocol, seeds (how many), settings, and per variant of the six of
    every protocol (:data:`VARIANTS`; the optional ones are in ``gckd_v3.json``) the mean ITM / ITC mAP (%) and
    the paired Δ against source-only with its 95 % bootstrap interval — exactly these keys."""
    runs = [r for r in valid_rows(rows) if current_v3(r, generic_digest, generic) and r["variant"] in VARIANTS]
    paired = paired_summary(runs)
    return {"protocol": f"v{SYNTH_V3_VERSION}", "seeds": len({r["seed"] for r in runs}),
            "settings": [s for s in SETTINGS if any(r["setting"] == s for r in runs)],
            "variants": {name: {k: entry[k] for k in SUMMARY_KEYS} for name, entry in paired.items()}}


def _ci_cell(delta: dict[str, Any]) -> str:
    lo, hi = delta["ci95"]
    return f"{delta['mean']:+.2f} [{lo:+.2f}, {hi:+.2f}]"


def _paired_lines(paired: dict[str, dict[str, Any]]) -> list[str]:
    lines = ["| variant | ITM-reranked mAP | Δ ITM vs source-only [95 % CI] | ITC mAP | Δ ITC vs source-only [95 % CI] "
             "| pairs |", "|---|---:|---:|---:|---:|---:|"]
    for name, e in paired.items():
        label = f"**{name}**" if name == "gckd" else name
        lines.append(f"| {label} | {e['itm_map']:.2f} | {_ci_cell(e['delta_itm'])} | {e['itc_map']:.2f} | "
                     f"{_ci_cell(e['delta_itc'])} | {e['itc_pairs']} |")
    return lines


def caption_uniqueness_table(seeds: list[int]) -> dict[str, dict[str, float]]:
    """Per dataset, the v3 target test captions' ``unique`` fraction and ``mean_fitting`` (identities a caption
    fits), averaged over ``seeds`` (:func:`crossret.data.synthetic_person.caption_uniqueness`), and
    ``oracle_pair_precision``: how right the mutual-nearest pairs of an attribute oracle are on the *training*
    split, the split cross-domain ITM mines its pseudo-pairs from
    (:func:`crossret.data.synthetic_person.mutual_pair_precision`). Generator properties: no rendering, no model."""
    import numpy as np

    from crossret.data.synthetic_person import caption_uniqueness, mutual_pair_precision, v3_split_fits

    sizes = (SYNTH_V3["train_ids"], SYNTH_V3["test_ids"], SYNTH_V3["images_per_id"])
    out = {}
    for key, style in DATASET.items():
        stats = [caption_uniqueness(style, *sizes, seed) for seed in seeds]
        oracle = [mutual_pair_precision(*v3_split_fits(style, *sizes, seed, split="train"))["precision"]
                  for seed in seeds]
        out[DIRS[key]] = {**{k: float(np.mean([s[k] for s in stats])) for k in ("unique", "mean_fitting")},
                          "oracle_pair_precision": float(np.mean(oracle))}
    return out


def v3_markdown(rows: list[dict[str, Any]], generic: dict[str, Any] | None, generic_digest: str,
                uniqueness: dict[str, dict[str, float]] | None = None) -> str:
    """``results/gckd_v3.md``: the paired table of protocol v3 (ITM re-ranking, the paper's inference, first;
    ITC beside it), the per-setting means, and the same paired table for the recorded Wikipedia rows."""
    runs = [r for r in valid_rows(rows) if current_v3(r, generic_digest, generic)]
    other = sum(1 for r in rows if r["part"] == "synth" and r.get("synth_version") == SYNTH_V3_VERSION) - len(runs)
    p = SYNTH_V3
    lines = ["# GCKD, synthetic protocol v3: text→image on the target (mAP, %)", "",
             f"Every run starts from one generic pre-trained tiny ALBEF (base lexicon only), trains "
             f"{p['pretrain_epochs']} epochs on the source, then each variant trains {p['adapt_epochs']} epochs from "
             f"that model (α = {p['train']['alpha']}); evaluated once at the last epoch on the target test split "
             f"({p['test_ids']} identities × {p['images_per_id']} images). ITM = the paper's inference (ITC top-"
             f"{p['rerank_k']} re-ranked by the ITM head); ITC = cosine ranking. Δ = variant − source-only on the "
             "same (setting, seed), mean over the pairs with a 95 % percentile-bootstrap interval (10,000 "
             "resamples, seed 0). Written by `benchmarks/gckd.py --protocol v3`.", ""]
    if generic:
        itc = generic.get("generic_test") or {}
        lines += [f"Generic model: held-out generic identities ITC mAP {100 * itc.get('map', float('nan')):.2f} "
                  f"({generic.get('train_seconds', float('nan')):.0f} s to train).", ""]
    if other:
        lines += [f"{other} v3 rows of another v3 configuration are left out (paired tables of the earlier "
                  "configurations with source-only rows are at the end).", ""]
    if runs:
        seeds = sorted({r["seed"] for r in runs})
        settings = [s for s in SETTINGS if any(r["setting"] == s for r in runs)]
        lines += [f"## Synthetic v3: {len(settings)} settings × {len(seeds)} seeds ({len(runs)} runs)", "",
                  *_paired_lines(paired_summary(runs)), ""]
        effects = module_effects(runs)
        if effects:
            lines += [*_module_effect_lines(effects), ""]
        lines += ["Per setting (mean ± std over seeds):", "",
                  "| setting | variant | ITM mAP | ITC mAP | ITC R@1 | pseudo-pairs/step | pseudo-pair precision "
                  "| seeds |", "|---|---|---:|---:|---:|---:|---:|---:|"]
        for e in sorted(summarise(runs), key=lambda e: (e["setting"], list(V3_VARIANTS).index(e["variant"]))):
            def cell(key: str, e: dict[str, Any] = e) -> str:
                return f"{100 * e[key + '_mean']:.2f} ± {100 * e[key + '_std']:.2f}" if key + "_mean" in e else "-"
            prec = e["pseudo_pair_precision_mean"]
            lines.append(f"| {e['setting'].split(' ')[0]} | {e['variant']} | {cell('itm_map')} | {cell('itc_map')} | "
                         f"{cell('itc_rank1')} | {e['pseudo_pairs_per_step_mean']:.2f} | "
                         f"{'-' if prec is None else f'{100 * prec:.1f}'} | {len(e['seeds'])} |")
        lines.append("")
    else:
        lines += ["No v3 runs recorded yet.", ""]
    if uniqueness:
        lines += ["Target test captions that fit exactly one identity of the split (unique), the mean number of "
                  "the split's identities a caption fits, and how right an attribute oracle's mutual-nearest "
                  "caption-image pairs are on the training split, where cross-domain ITM mines its pseudo-pairs "
                  "(score 1 when a caption fits an image's identity, random ties: the ceiling of mutual-pair "
                  "mining from what the captions say). Generator properties, mean over the seeds:", "",
                  "| dataset | unique captions | identities per caption | oracle mutual-pair precision (train) |",
                  "|---|---:|---:|---:|"]
        lines += [f"| {name} | {100 * u['unique']:.1f} % | {u['mean_fitting']:.2f} | "
                  + (f"{100 * u['oracle_pair_precision']:.1f} % |" if "oracle_pair_precision" in u else "– |")
                  for name, u in uniqueness.items()]
        lines.append("")
    lines += earlier_v3_lines(rows, generic_digest, generic)
    wiki = [r for r in valid_rows(rows) if r["part"] == "wiki"]
    if wiki:
        lines += [f"## Wikipedia, categories 0-4 → 5-9 (recorded rows as they are; {len({r['seed'] for r in wiki})} "
                  "seeds, one setting: pairs = seeds)", "", "With this few pairs a percentile-bootstrap interval "
                  "is too narrow (it can only take the few distinct resample means); read it as the spread of "
                  "the seeds, not as a 95 % interval.", "", *_paired_lines(paired_summary(wiki)), ""]
    return "\n".join(lines)


def _v3_configuration(row: dict[str, Any]) -> tuple[Any, ...]:
    """What :func:`current_v3` compares, less the target-term settings: rows with equal keys share their
    source training (and so their source-only rows)."""
    return (row.get("generic_digest"), row["pretrain_epochs"], row["config"]["epochs"], row.get("rerank_k"),
            json.dumps(row.get("synthetic"), sort_keys=True))


def _adapt_values(row: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    """The values a row ran with for today's protocol target-term keys (what tells configurations that share a
    source training apart)."""
    return tuple((k, row["config"].get(k)) for k in SYNTH_V3.get("adapt", {}))


def earlier_v3_lines(rows: list[dict[str, Any]], generic_digest: str, generic: dict[str, Any] | None = None
                     ) -> list[str]:
    """The paired table (ITM first) of each earlier v3 configuration that has source-only rows, labelled by
    its generic model (another spec, or with ``generic`` another build of the same spec), epochs and target-term
    settings: superseded results stay readable beside today's, never mixed with them."""
    v3 = [r for r in valid_rows(rows) if r["part"] == "synth" and r.get("synth_version") == SYNTH_V3_VERSION]
    baselines: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    earlier: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for row in v3:
        # a source training: its configuration and the generic model it started from
        training = (*_v3_configuration(row), row_generic(row, generic) if generic is not None else None)
        if row["variant"] == "source-only":  # shared by every configuration on the same source training
            baselines.setdefault(training, []).append(row)
        elif not current_v3(row, generic_digest, generic):
            earlier.setdefault((*training, _adapt_values(row)), []).append(row)
    lines: list[str] = []
    for (*training, adapt_values), adapted in earlier.items():
        digest, pretrain, adapt, rerank_k, _, weights = training
        group = [*baselines.get(tuple(training), []), *adapted]
        if not any(r["variant"] == "source-only" for r in group):
            continue
        seeds = sorted({r["seed"] for r in group})
        settings = [s for s in SETTINGS if any(r["setting"] == s for r in group)]
        settings_note = "".join(f", {k} {v}" for k, v in adapt_values if v != SYNTH_V3["adapt"][k])
        build = ""
        if generic is not None and digest == generic_digest and weights != generic.get("weights"):
            build = f" (another build of it: weights {weights})" if weights else " (another build of it)"
        lines += [f"## Earlier v3 configuration (superseded): generic model {digest}{build}, {pretrain} source "
                  f"epochs, {adapt} adaptation epochs, ITM top-{rerank_k}{settings_note}", "",
                  f"{len(settings)} settings × {len(seeds)} seeds ({len(group)} runs), kept as recorded.", "",
                  *_paired_lines(paired_summary(group)), ""]
        effects = module_effects(group)
        if effects:
            lines += [*_module_effect_lines(effects), ""]
    return lines


# Row fields stored once, by digest, in ``<out>_configs.json`` beside the runs file (many rows share them).
COMPACT_KEYS = ("config", "environment", "host", "synthetic", "source_test_itc", "code_note")


def configs_path(runs_path: Path) -> Path:
    """``<out>_configs.json`` for ``<out>_runs.jsonl``."""
    return runs_path.with_name(runs_path.name.replace("_runs.jsonl", "") + "_configs.json")


# Fields that every row of one source training shares (after COMPACT_KEYS became digests): stored together as
# one record named by ``shared_id``, so a row keeps only what is its own (metrics, variant, timings).
SHARED_KEYS = ("part", "synth_version", "generic_digest", "generic_weights", "pretrain_epochs", "rerank_k",
               "pretrain_seconds", "host_id", "environment_id", "synthetic_id", "source_test_itc_id")


def _share(row: dict[str, Any], records: dict[str, Any]) -> dict[str, Any]:
    """``row`` with its :data:`SHARED_KEYS` moved into one record (digest → record in ``records``)."""
    shared = {key: row[key] for key in SHARED_KEYS if key in row}
    if len(shared) < 2:
        return row
    records[_repro.digest(shared)] = shared
    return {"shared_id": _repro.digest(shared), **{k: v for k, v in row.items() if k not in shared}}


def _read_runs(path: Path) -> list[dict[str, Any]]:
    """The rows of a runs file, each with its ``config`` / ``environment`` (stored by digest) filled in."""
    if not path.exists():
        return []
    records_file = configs_path(path)
    records = json.loads(records_file.read_text(encoding="utf-8")) if records_file.exists() else {}
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
            row = {**records[row.pop("shared_id")], **row} if "shared_id" in row else row
            rows.append(_repro.expand_row(row, records, COMPACT_KEYS))
        except json.JSONDecodeError:
            continue  # a line cut by an interruption: that run is redone
    return rows


def compact_runs_file(path: Path) -> None:
    """Rewrite the runs file with each row's ``config`` / ``environment`` replaced by a digest, the records
    in :func:`configs_path` (written first, so every digest the runs file names is there; records no row
    names any more are dropped). Workers append
    full rows while a benchmark runs; the main process compacts once they are done."""
    if not path.exists():
        return
    records_file = configs_path(path)
    records = json.loads(records_file.read_text(encoding="utf-8")) if records_file.exists() else {}
    rows = [_repro.compact_row(row, records, COMPACT_KEYS) for row in _read_runs(path)]
    # Only the records some row names (a regenerated row replaces its old config record).
    named = {row[f"{key}_id"] for row in rows for key in COMPACT_KEYS if f"{key}_id" in row}
    rows = [_share(row, records) for row in rows]
    named |= {row["shared_id"] for row in rows if "shared_id" in row}
    records = {name: record for name, record in records.items() if name in named}
    write_text_atomic(records_file, json.dumps(records, indent=1, sort_keys=True) + "\n")
    write_text_atomic(path, "".join(json.dumps(row, separators=(",", ":")) + "\n" for row in rows))


# ---------------------------------------------------------------------------------------------- check
# What a check compares (exactly), and what identifies a row.
CHECK_KEYS = ("part", "setting", "variant", "seed")
CHECK_FIELDS = (*(f"{ranking}_{metric}" for ranking in ("itc", "itm") for metric in ("map", "rank1", "rank5", "rank10",
                                                                                      "minp")),
                "pseudo_pairs_per_step", "pseudo_pair_precision")


def _flat(row: dict[str, Any]) -> dict[str, Any]:
    """``row`` with its ITC / ITM metrics also as top-level fields (``itc_map``, ...: :data:`CHECK_FIELDS`)."""
    return {**row, **{f"{ranking}_{k}": v for ranking in ("itc", "itm") for k, v in (row.get(ranking) or {}).items()}}


def checkable(row: dict[str, Any], generic_digest: str | dict[int, str]) -> bool:
    """Whether this code makes ``row``'s setting: a wiki row, or a synthetic row of today's protocol version,
    generic model, pre-training length and dataset sizes (version 1 trained from scratch, which it no longer does).
    ``generic_digest``: the v2 generic model's digest, or the digest per protocol version."""
    digests = generic_digest if isinstance(generic_digest, dict) else {SYNTH_VERSION: generic_digest}
    if row["part"] == "wiki":
        return row["pretrain_epochs"] == WIKI["pretrain_epochs"]
    if row.get("synth_version") == SYNTH_V3_VERSION:
        return SYNTH_V3_VERSION in digests and current_v3(row, digests[SYNTH_V3_VERSION])
    return (row.get("synth_version", 1) == SYNTH_VERSION and row.get("generic_digest") == digests.get(SYNTH_VERSION)
            and row["pretrain_epochs"] == SYNTH["pretrain_epochs"]
            and row.get("synthetic") == {k: SYNTH[k] for k in ("train_ids", "test_ids", "images_per_id")})


def _check_one(job: dict[str, Any]) -> dict[str, Any]:
    """The one row a check job makes (its pre-training redone, its variant trained with the recorded config)."""
    return _check_view((run_wiki if job["part"] == "wiki" else run_synth)(job)[0])


def _check_view(row: dict[str, Any]) -> dict[str, Any]:
    """:func:`_flat`, with v3 rows under part ``synth-v3`` (so that they never pair with a v2 row)."""
    flat = _flat(row)
    if row.get("synth_version") == SYNTH_V3_VERSION:
        flat["part"] = "synth-v3"
    return flat


def check(rows: list[dict[str, Any]], n: int, seed: int, data_dir: str, jobs: int, generic_threads: int,
          recorded_generic: dict[int, dict[str, Any] | None] | dict[str, Any] | None, out: Path) -> int:
    """Re-run ``n`` sampled checkable rows with their recorded configs and compare them exactly; writes
    ``<out>_check.{json,md}``. When synthetic rows are sampled, the generic model of each protocol version
    they start from is re-made first (in a temporary directory) and its held-out metrics are compared with
    the recorded report's (``recorded_generic``: per version, or the v2 report) as one more row. Returns 0
    when everything reproduces, 1 otherwise."""
    if recorded_generic is not None and "digest" in recorded_generic:
        recorded_generic = {SYNTH_VERSION: recorded_generic}  # type: ignore[dict-item]
    recorded = recorded_generic or {}
    digests = {v: generic_spec(v)[1] for v in (SYNTH_VERSION, SYNTH_V3_VERSION)}
    eligible = [r for r in rows if checkable(r, digests)]
    sample = _repro.sample_rows(eligible, n, seed, strata=lambda r: (
        (r["part"] + "-v3", r["variant"]) if r.get("synth_version") == SYNTH_V3_VERSION else (r["part"], r["variant"])))
    print(f"check: {len(sample)} of {len(eligible)} checkable rows ({len(rows) - len(eligible)} rows of older "
          "protocols are not checkable)", file=sys.stderr)
    generic_rows: tuple[list[dict[str, Any]], list[dict[str, Any]]] = ([], [])  # (recorded, now)
    with tempfile.TemporaryDirectory(prefix="crossret-gckd-check-") as tmp:
        generics: dict[int, dict[str, Any]] = {}
        for version in sorted({r.get("synth_version", 1) for r in sample if r["part"] == "synth"}):
            print(f"generic pre-training (protocol v{version}), re-made for the check ...", file=sys.stderr)
            generic = generics[version] = generic_pretraining(Path(tmp) / f"v{version}", threads=generic_threads,
                                                              version=version)
            print(f"generic pre-training: {generic['train_seconds']:.0f}s, held-out ITC mAP "
                  f"{100 * generic['generic_test']['map']:.2f}", file=sys.stderr)
            before = recorded.get(version)
            if before and before.get("digest") == digests[version]:
                label = {"part": "generic", "setting": f"pre-training {digests[version]}", "variant": "-",
                         "seed": generic_spec(version)[0]["generic"]["seed"]}
                generic_rows[0].append(_flat({**label, "itc": before["generic_test"]}))
                generic_rows[1].append(_flat({**label, "itc": generic["generic_test"]}))
        check_jobs = [{"part": r["part"], "seed": r["seed"], "variants": [r["variant"]], "config": r["config"],
                       "data_dir": data_dir, **({"source": r["setting"][0], "targets": [r["setting"][-1]],
                                                 "version": r.get("synth_version", 1),
                                                 "generic": generics[r.get("synth_version", 1)]}
                                                if r["part"] == "synth" else {})}
                      for r in sample]
        fresh = _repro.rerun(_check_one, check_jobs, jobs, describe=lambda row: (
            f"check {row['setting']} {row['variant']} seed {row['seed']}: ITC mAP {100 * row['itc_map']:.2f} "
            f"({row['train_seconds']:.0f}s)"))
    comparisons = _repro.compare_rows([*map(_check_view, sample), *generic_rows[0]], [*fresh, *generic_rows[1]],
                                      CHECK_KEYS, CHECK_FIELDS)
    environments = {_repro.digest(e): e for e in (r.get("environment", "not recorded") for r in sample)}
    payload, text = _repro.check_report("benchmarks/gckd.py", comparisons, list(environments.values()), CHECK_FIELDS)
    write_json_atomic(out.parent / f"{out.name}_check.json", payload)
    write_text_atomic(out.parent / f"{out.name}_check.md", text)
    print(text, file=sys.stderr)
    return 0 if payload["reproduced"] == payload["checked"] else 1


# ---------------------------------------------------------------------------------------------- regenerate
# What identifies a row in a regeneration (the synthetic protocol version too: v1, v2 and v3 rows share keys).
REGENERATE_KEYS = ("part", "synth_version", "setting", "variant", "seed")


def _config_key(setting: str, variant: str) -> str:
    """The key of a recorded config in a regeneration job's ``configs``."""
    return f"{setting}|{variant}"


def _row_key(row: dict[str, Any]) -> tuple[Any, ...]:
    """:data:`REGENERATE_KEYS` of ``row`` (a synthetic row without ``synth_version`` is protocol v1)."""
    version = row.get("synth_version", 1) if row["part"] == "synth" else None
    return row["part"], version, row["setting"], row["variant"], row["seed"]


def regenerate_jobs(rows: list[dict[str, Any]], data_dir: str | None,
                    generics: dict[int, dict[str, Any]]) -> list[tuple[Any, dict[str, Any]]]:
    """The jobs that re-make ``rows`` (re-makeable rows, :func:`checkable`): one per (part, protocol version,
    seed, source), in the order the rows first appear, so that a source pre-training is done once for every row
    that starts from it. Each job carries every row's recorded config (``configs``, by :func:`_config_key`);
    a synthetic job runs only its rows' (setting, variant) pairs (the others of its targets × variants are
    ``done``). ``generics``: the generic model report per synthetic protocol version."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for row in rows:
        part, version, setting, _, seed = _row_key(row)
        groups.setdefault((part, version, seed, setting[0] if part == "synth" else None), []).append(row)
    jobs: list[tuple[Any, dict[str, Any]]] = []
    for (part, version, seed, source), group in groups.items():
        variants = list(dict.fromkeys(r["variant"] for r in group))
        configs = {_config_key(r["setting"], r["variant"]): r["config"] for r in group}
        if part == "wiki":
            jobs.append((run_wiki, {"seed": seed, "variants": variants, "configs": configs, "data_dir": data_dir}))
            continue
        targets = list(dict.fromkeys(r["setting"][-1] for r in group))
        done = [[f"{source}->{t}", v] for t in targets for v in variants
                if _config_key(f"{source}->{t}", v) not in configs]
        jobs.append((run_synth, {"seed": seed, "source": source, "targets": targets, "variants": variants,
                                 "version": version, "generic": generics[version], "configs": configs,
                                 "done": done}))
    return jobs


def _why_kept(row: dict[str, Any], digests: dict[int, str]) -> str | None:
    """Why a regeneration keeps ``row`` as recorded, or ``None`` when this code re-makes it."""
    if checkable(row, digests):
        return None
    if row["part"] == "wiki":
        return "wiki rows of another pre-training length"
    version = row.get("synth_version", 1)
    return ("synthetic protocol v1 (trained from scratch)" if version == 1
            else f"synthetic protocol v{version} of another configuration or generic model")


def regenerate(rows: list[dict[str, Any]], runs_path: Path, out: Path, parts: list[str], versions: set[int],
               data_dir: Callable[[], Any], jobs: int, generic_threads: int) -> list[dict[str, Any]]:
    """Re-run every recorded row this code re-makes (:func:`checkable`) of ``parts`` (and, synthetic, of the
    protocol ``versions``) with its recorded config, writing the fresh rows to ``<runs>.regenerating.jsonl``
    as they finish (a re-started regeneration skips the rows already there). Only when every such row is
    redone is the runs file replaced, atomically, by the rows in their recorded order: each re-makeable row by
    its fresh version, every other row (another protocol, or outside ``parts`` / ``versions`` and not in the
    partial file) unchanged. The generic model of each synthetic protocol comes from ``benchmarks/.cache`` as
    in a normal run (made once when missing). Writes ``<out>_regenerate.{json,md}`` (which rows moved) and
    returns the new rows. ``data_dir``: a callable giving the data directory (called only for wiki rows)."""
    digests = {v: generic_spec(v)[1] for v in (SYNTH_VERSION, SYNTH_V3_VERSION)}
    remakeable = [r for r in rows if checkable(r, digests)]
    keys = [_row_key(r) for r in remakeable]
    if len(set(keys)) != len(keys):
        twice = sorted({k for k in keys if keys.count(k) > 1}, key=str)
        raise SystemExit(f"error: {runs_path} has re-makeable rows recorded twice ({twice[:3]}...); "
                         "a regeneration cannot tell them apart")
    partial = _repro.regenerating_path(runs_path)
    fresh = {_row_key(r): r for r in _read_runs(partial)}
    selected = [r for r in remakeable if r["part"] in parts
                and (r["part"] != "synth" or r.get("synth_version", 1) in versions)]
    todo = [r for r in selected if _row_key(r) not in fresh]
    print(f"regenerate: {len(todo)} of {len(selected)} selected rows to run ({len(selected) - len(todo)} already "
          f"in {partial.name}); {len(rows) - len(remakeable)} rows of other protocols are kept as recorded",
          file=sys.stderr)
    generics: dict[int, dict[str, Any]] = {}
    for version in sorted({r["synth_version"] for r in todo if r["part"] == "synth"}):
        print(f"generic pre-training, protocol v{version} (cached after the first time) ...", file=sys.stderr)
        generics[version] = generic_pretraining(CACHE, threads=generic_threads, version=version)
    work = regenerate_jobs(todo, str(data_dir()) if any(r["part"] == "wiki" for r in todo) else None, generics)
    for _, job in work:
        job["runs_path"] = str(partial)
    _run_jobs(work, jobs)
    fresh = {_row_key(r): r for r in _read_runs(partial)}
    missing = [_row_key(r) for r in selected if _row_key(r) not in fresh]
    if missing:
        raise SystemExit(f"error: {len(missing)} rows were not regenerated (e.g. {missing[0]}); run again to resume")
    if _read_runs(runs_path) != rows:
        raise SystemExit(f"error: {runs_path} changed during the regeneration (another invocation wrote to it); "
                         f"it was left as it is: run --regenerate again (it resumes from {partial.name})")
    replaced = [(r, fresh[_row_key(r)]) for r in remakeable if _row_key(r) in fresh]
    new_rows = [fresh.get(_row_key(r), r) if checkable(r, digests) else r for r in rows]
    write_text_atomic(runs_path, "".join(json.dumps(r) + "\n" for r in new_rows))
    partial.unlink()
    comparisons = _repro.compare_rows([_flat(old) for old, _ in replaced], [_flat(new) for _, new in replaced],
                                      REGENERATE_KEYS, CHECK_FIELDS)
    for comparison, (old, new) in zip(comparisons, replaced, strict=True):
        comparison["values"] = {f: {"recorded": _flat(old).get(f), "now": _flat(new).get(f)}
                                for f in ("itc_map", "itm_map")}
    kept = [{**{k: r.get(k) for k in REGENERATE_KEYS}, "why": _why_kept(r, digests) or "outside --parts / --protocol"}
            for r in rows if _row_key(r) not in fresh or not checkable(r, digests)]
    payload, text = _repro.regenerate_report("benchmarks/gckd.py --regenerate", comparisons, kept, CHECK_FIELDS,
                                             ("itc_map", "itm_map"))
    write_json_atomic(out.parent / f"{out.name}_regenerate.json", {**payload, "runs_file": runs_path.name})
    write_text_atomic(out.parent / f"{out.name}_regenerate.md", text)
    print(text, file=sys.stderr)
    return new_rows


def _run_jobs(jobs: list[tuple[Any, dict[str, Any]]], workers: int) -> None:
    with ProcessPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = [pool.submit(fn, job) for fn, job in jobs]
        for future in as_completed(futures):
            future.result()  # rows are in the runs file already; this re-raises a worker's error


def run_v3(args: argparse.Namespace, rows: list[dict[str, Any]], runs_path: Path, out: Path) -> int:
    """``--protocol v3``: the synthetic part with protocol v3 (rows appended to the same runs file, resumed
    the same way), then ``<out>_v3.json`` (everything), ``<out>_v3_summary.json`` (:func:`v3_summary`) and
    ``<out>_v3.md``. The wiki part is not run: its recorded rows are tabulated as they are."""
    started = time.time()
    seeds = list(V3_SEEDS) if args.seeds is None else args.seeds
    _, digest = generic_spec(SYNTH_V3_VERSION)
    report = CACHE / f"gckd-generic-{digest}" / "report.json"
    # the tables are of one generic model: the cached one, else the one the recorded tables name
    generic = json.loads(report.read_text(encoding="utf-8")) if report.is_file() else recorded_generic(out)
    if not args.tables_only:
        print("generic pre-training, protocol v3 (cached after the first time) ...", file=sys.stderr)
        if args.generic_threads > 1 and not report.is_file():
            print(f"note: a generic model trained with {args.generic_threads} torch threads cannot be rebuilt bit for "
                  "bit (docs/benchmarks.md); --generic-threads 1 can", file=sys.stderr)
        generic = generic_pretraining(CACHE, threads=args.generic_threads, version=SYNTH_V3_VERSION)
        # rows made from another build of the generic model are not done: they are redone from this one
        done = {(r["setting"], r["variant"], r["seed"]) for r in rows if current_v3(r, digest, generic)}
        jobs: list[tuple[Any, dict[str, Any]]] = []
        for seed in seeds:
            for source in "CIR":
                settings = [s for s in args.settings if s[0] == source]
                todo = [v for v in args.variants if any((s, v, seed) not in done for s in settings)]
                targets = [s[-1] for s in settings if any((s, v, seed) not in done for v in args.variants)]
                if targets:
                    jobs.append((run_synth, {"seed": seed, "source": source, "targets": targets, "generic": generic,
                                             "version": SYNTH_V3_VERSION, "variants": todo,
                                             "done": [[s, v] for (s, v, sd) in done if sd == seed],
                                             "runs_path": str(runs_path)}))
        print(f"{len(jobs)} v3 jobs to do ({len(done)} v3 runs already recorded in {runs_path})", file=sys.stderr)
        _run_jobs(jobs, args.jobs)
        rows = _read_runs(runs_path)
    runs = [r for r in valid_rows(rows) if current_v3(r, digest, generic)]
    uniqueness = caption_uniqueness_table(sorted({r["seed"] for r in runs}) or seeds)
    summary = v3_summary(rows, digest, generic)
    payload = {"script": "benchmarks/gckd.py --protocol v3", "created": time.strftime("%Y-%m-%d %H:%M:%S"),
               "wall_seconds_this_invocation": round(time.time() - started, 1), "variants": V3_VARIANTS,
               "synth_protocol": {**SYNTH_V3, "version": SYNTH_V3_VERSION, "dev_seed": SYNTH_V3_DEV_SEED},
               "generic_pretraining": generic, "paired": paired_summary(runs), "module_effects": module_effects(runs),
               "wiki_paired": paired_summary([r for r in valid_rows(rows) if r["part"] == "wiki"]),
               "per_setting": summarise(runs), "caption_uniqueness": uniqueness, "runs_file": runs_path.name}
    write_json_atomic(out.parent / f"{out.name}_v3.json", payload)
    write_json_atomic(out.parent / f"{out.name}_v3_summary.json", summary)
    write_text_atomic(out.parent / f"{out.name}_v3.md", v3_markdown(rows, generic, digest, uniqueness))
    print(f"wrote {out.name}_v3.json, {out.name}_v3_summary.json and {out.name}_v3.md in {out.parent}",
          file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    status = _main(argv)
    args = _parser().parse_args(argv)
    # A check writes nothing to the runs file; a regeneration keeps the rows it does not re-make byte for
    # byte (the next run or --tables-only compacts what it wrote).
    if not args.check and not args.regenerate:
        out = Path(args.out)
        compact_runs_file(out.parent / f"{out.name}_runs.jsonl")
    return status


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=None, help="benchmark data directory (default $CROSSRET_DATA)")
    parser.add_argument("--parts", nargs="+", default=None, choices=("wiki", "synth"),
                        help="default: wiki synth (with --regenerate and --protocol: synth); with --check: the "
                        "parts it samples from")
    parser.add_argument("--protocol", default=None, choices=("v2", "v3"),
                        help="synthetic protocol: v2 (default; results/gckd.*) or v3 (synthetic part only, "
                        "results/gckd_v3*; the wiki rows are tabulated as recorded); with --regenerate: only the "
                        "synthetic rows of this protocol (default: every re-makeable row)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="default: 0 1 2 (v2), 0..7 (v3)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(V3_VARIANTS),
                        help=f"default: the six of every protocol; v3 also: {', '.join(list(V3_VARIANTS)[6:]) or '-'}")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=SETTINGS)
    parser.add_argument("--jobs", type=int, default=1, help="parallel worker processes (1 torch thread each)")
    parser.add_argument("--generic-threads", type=int, default=1,
                        help="torch threads of the generic pre-training (1: the weights come out the same on every "
                        "build on one machine; more is faster but not reproducible; rows name the weights they "
                        "started from, and rows of another build are redone)")
    parser.add_argument("--out", default=str(RESULTS / "gckd"), help="output path without extension")
    parser.add_argument("--tables-only", action="store_true", help="only rewrite the tables from the runs file")
    parser.add_argument("--check", type=int, default=0, metavar="N",
                        help="re-run N sampled recorded rows and compare them exactly (writes <out>_check.*; "
                        "exit 1 when one moved); nothing else is run or written")
    parser.add_argument("--check-seed", type=int, default=0, help="seed of the --check sample")
    parser.add_argument("--regenerate", action="store_true",
                        help="re-run every recorded row this code re-makes with its recorded config (resumable, in "
                        "<runs>.regenerating.jsonl), replace the runs file once all are done (other rows kept as "
                        "recorded), write <out>_regenerate.{json,md} and rewrite the tables")
    return parser


def _main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.regenerate and (args.check or args.tables_only):
        parser.error("--regenerate runs alone (not with --check or --tables-only)")
    _repro.pin_numerics()

    out = Path(args.out)
    runs_path = out.parent / f"{out.name}_runs.jsonl"
    rows = _read_runs(runs_path)
    if args.regenerate:
        from crossret.data import resolve_data_dir

        parts = args.parts or (["synth"] if args.protocol else ["wiki", "synth"])
        versions = {SYNTH_VERSION, SYNTH_V3_VERSION} if args.protocol is None else {int(args.protocol[1:])}
        rows = regenerate(rows, runs_path, out, parts, versions, lambda: resolve_data_dir(args.data_dir), args.jobs,
                          args.generic_threads)
        args.tables_only, args.protocol = True, "v2"  # then the tables, as --tables-only writes them
        if any(r["part"] == "synth" and r.get("synth_version") == SYNTH_V3_VERSION for r in rows):
            run_v3(args, rows, runs_path, out)
    args.parts = args.parts or ["wiki", "synth"]
    if args.protocol == "v3" and not args.check:
        return run_v3(args, rows, runs_path, out)
    if args.seeds is None:
        args.seeds = [0, 1, 2]
    if set(args.variants) - set(VARIANTS):
        parser.error(f"--variants {' '.join(sorted(set(args.variants) - set(VARIANTS)))}: only with --protocol v3")
    if args.check:
        from crossret.data import resolve_data_dir

        recorded_generic = {}  # the generic models' recorded reports are in the tables, not in the cache
        for version, tables in ((SYNTH_VERSION, out.with_suffix(".json")),
                                (SYNTH_V3_VERSION, out.parent / f"{out.name}_v3.json")):
            if tables.exists():
                recorded_generic[version] = json.loads(tables.read_text(encoding="utf-8")).get("generic_pretraining")
        if args.parts:  # --parts restricts what a check samples from
            rows = [r for r in rows if r["part"] in args.parts]
        return check(rows, args.check, args.check_seed, str(resolve_data_dir(args.data_dir)), args.jobs,
                     args.generic_threads, recorded_generic, out)
    started = time.time()
    generic_reports = sorted(CACHE.glob("gckd-generic-*/report.json"))
    generic = next((json.loads(p.read_text(encoding="utf-8")) for p in generic_reports
                    if json.loads(p.read_text(encoding="utf-8"))["spec"]["generic"] == SYNTH["generic"]), None)
    if generic is None and out.with_suffix(".json").exists():
        # No cached generic model (a fresh checkout, or the tables rewritten after a regeneration): keep
        # the report the tables already record rather than dropping it.
        recorded = json.loads(out.with_suffix(".json").read_text(encoding="utf-8")).get("generic_pretraining")
        if recorded and recorded.get("spec", {}).get("generic") == SYNTH["generic"]:
            generic = recorded
    if not args.tables_only:
        from crossret.data import resolve_data_dir

        # A synthetic run of an older protocol version is not "done" for this one.
        done = {(r["part"], r["setting"], r["variant"], r["seed"]) for r in rows
                if r["part"] != "synth" or r.get("synth_version", 1) == SYNTH_VERSION}
        jobs: list[tuple[Any, dict[str, Any]]] = []
        if "synth" in args.parts:
            print("generic pre-training (cached after the first time) ...", file=sys.stderr)
            generic = generic_pretraining(threads=args.generic_threads)
        for seed in args.seeds:
            if "wiki" in args.parts:
                todo = [v for v in args.variants if ("wiki", "wiki 0-4 -> 5-9", v, seed) not in done]
                if todo:
                    jobs.append((run_wiki, {"seed": seed, "variants": todo,
                                            "data_dir": str(resolve_data_dir(args.data_dir))}))
            if "synth" in args.parts:
                for source in "CIR":
                    targets = [s[-1] for s in args.settings if s[0] == source
                               and any(("synth", s, v, seed) not in done for v in args.variants)]
                    if targets:
                        jobs.append((run_synth, {"seed": seed, "source": source, "targets": targets,
                                                 "generic": generic,
                                                 "variants": [v for v in args.variants if any(
                                                     ("synth", f"{source}->{t}", v, seed) not in done
                                                     for t in targets)],
                                                 "done": [[r[1], r[2]] for r in done
                                                          if r[0] == "synth" and r[3] == seed]}))
        for _, job in jobs:
            job["runs_path"] = str(runs_path)
        print(f"{len(jobs)} jobs to do ({len(rows)} runs already recorded in {runs_path})", file=sys.stderr)
        _run_jobs(jobs, args.jobs)
        rows = _read_runs(runs_path)
    rows = [r for r in rows if r.get("synth_version", 1) != SYNTH_V3_VERSION]  # v3 has its own tables (run_v3)
    payload = {"script": "benchmarks/gckd.py", "created": time.strftime("%Y-%m-%d %H:%M:%S"),
               "wall_seconds_this_invocation": round(time.time() - started, 1), "variants": VARIANTS,
               "wiki_protocol": WIKI, "synth_protocol": {**SYNTH, "version": SYNTH_VERSION},
               "generic_pretraining": generic, "summary": summarise(rows), "synth_overview": synth_overview(rows),
               "runs_file": runs_path.name}  # every run with its full config, one JSON line each
    write_json_atomic(out.with_suffix(".json"), payload)
    write_text_atomic(out.with_suffix(".md"), markdown(rows, generic))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
