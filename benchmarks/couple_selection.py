"""Can a label-free criterion choose a COUPLE configuration, or a seed, on a new target? (dev tasks only)

    python benchmarks/couple_selection.py --data-dir ../shared/data --seeds 0 1 2 3 --jobs 2
    python benchmarks/couple_selection.py --tables-only

On the reported benchmarks no target label may choose anything, and the development tasks'
choices have not carried over to them (docs/couple.md, sessions 7–9). The remaining honest route to
per-task choices is a criterion computed *without labels* on each target. This script asks whether
any common criterion can make such choices, on the development tasks of ``couple_dev.py``
(MNIST / USPS / 200 MNIST → optdigits16), where target labels exist to check it.

Every configuration in :data:`CONFIGS` runs on every task and seed (64 bits). After training, each
run records its label-free criteria, computed on the unlabelled target-train set and the labelled
source, next to what they are meant to predict: cross-domain MAP on the target queries and the
pseudo-label accuracy (the only uses of target labels, both for this check):

* ``ent``: mean entropy of the classifier's target predictions (lower is better; Grandvalet &
  Bengio, NeurIPS 2004, as a selection score in Morerio et al., ICLR 2018);
* ``im``: information maximisation, ``mean H(p_i) − H(mean p)`` (lower is better; SHOT, Liang et al.,
  ICML 2020);
* ``snd``: soft neighbourhood density (higher is better; Saito et al., ICCV 2021): the entropy of
  each target's softmax over its similarities ``p̂_i · p̂_j / τ`` (``p̂``: L2-normalised predictions,
  ``τ = 0.05``) to every other target, averaged;
* ``agree``: share of targets whose classifier argmax equals the last diffusion pseudo-label;
* ``rev_lr_cls`` / ``rev_knn_cls`` / ``rev_lr_diff`` / ``rev_knn_diff``: reverse validation (Zhong
  et al., ECML 2010; Ganin et al., JMLR 2016): a fresh classifier (logistic regression, or 5-NN on
  cosine) trained on the target-train *inputs* with the model's labels (classifier argmax, or the
  diffusion's) and scored on the labelled source inputs;
* ``rev_code``: the same with 5-NN on the binary codes (circular: the codes follow the model's own
  labels, so it is near 1 whatever their accuracy; here as the practitioner's obvious first try).

The analysis per task and criterion: Spearman's ρ with MAP over all runs, over the configurations'
mean values, and within each configuration over its seeds (averaged); and the mean MAP of picking,
for every seed, the configuration with the best criterion, next to the defaults, the mean of all
configurations and the oracle (the best configuration of each seed by MAP). Rows go to
``results/couple_selection_runs.jsonl`` (with the resolved method config and the CPU, pinned numerics and
package versions they ran with: ``method_config``, ``environment``; benchmarks/_repro.py);
``results/couple_selection.{json,md}`` hold the analysis.

    python benchmarks/couple_selection.py --check N [--check-seed S] [--jobs 1]

re-runs N sampled recorded rows (one per configuration and task in turn) with their recorded config and
compares MAP, the two accuracies and every criterion exactly; writes ``results/couple_selection_check.{json,md}``
and exits 1 when a row moved; nothing else is run or written.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

import _repro
from couple import _read_runs, run_jobs  # same runs-file format and recovery rule
from couple_dev import TASKS, dev_split
from crossret.graph.knn import unit_rows
from crossret.hashing.couple import _information_maximisation
from crossret.storage.atomic import write_json_atomic, write_text_atomic

RESULTS = Path(__file__).resolve().parent / "results"
RUNS_FILE = RESULTS / "couple_selection_runs.jsonl"
BITS = 64
# Configurations a user could plausibly choose between (the defaults and benchmark variants / dev rows).
CONFIGS: dict[str, dict[str, Any]] = {
    "default": {},
    "pooled": {"center_per_domain": False},
    "centroids": {"label_refine": "centroids"},
    "paper": {"k_target": 3, "k_source": 3, "select_balance": False},
    "emaend": {"ema_decay": 0.99, "mix_pairs": "endpoints"},
    "nodiff": {"selection": "classifier"},
    "notce": {"target_ce_weight": 0.0},
    "graphboth": {"graph_features": "both"},
}
# +1: higher is better; −1: lower is better.
CRITERIA: dict[str, int] = {"ent": -1, "im": -1, "snd": 1, "agree": 1, "rev_lr_cls": 1, "rev_knn_cls": 1,
                            "rev_lr_diff": 1, "rev_knn_diff": 1, "rev_code": 1}
SND_TEMPERATURE = 0.05
REVERSE_NEIGHBOURS = 5


def _entropy(p: np.ndarray) -> np.ndarray:
    """Row entropies (nats) of probability rows ``p`` (N, C); ``0·log 0 = 0``."""
    return -(p * np.log(np.clip(p, 1e-12, None))).sum(axis=1)


def prediction_entropy(p: np.ndarray) -> float:
    """``mean_i H(p_i)`` of the predictions ``p`` (N, C)."""
    return float(_entropy(p).mean())


def soft_neighbourhood_density(p: np.ndarray, temperature: float = SND_TEMPERATURE) -> float:
    """SND (Saito et al., ICCV 2021): ``mean_i H(softmax_{j≠i}(p̂_i·p̂_j / τ))``, ``p̂`` L2-normalised rows."""
    unit = unit_rows(p, "predictions", "SND")
    logits = unit @ unit.T / temperature
    np.fill_diagonal(logits, -np.inf)  # a sample is not its own neighbour
    logits -= logits.max(axis=1, keepdims=True)
    weights = np.exp(logits)
    weights /= weights.sum(axis=1, keepdims=True)
    return float(_entropy(weights).mean())


def reverse_accuracy(train_x: np.ndarray, train_labels: np.ndarray, test_x: np.ndarray, test_labels: np.ndarray,
                     kind: str) -> float:
    """Reverse validation: fit ``kind`` (``lr`` | ``knn`` cosine 5-NN | ``hamming`` 5-NN) on the target with
    the model's labels, return its accuracy on the labelled source. One label class → 0 (nothing learnt)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier

    if np.unique(train_labels).size < 2:
        return 0.0
    if kind == "lr":
        model = LogisticRegression(max_iter=500).fit(train_x, train_labels)
    elif kind in ("knn", "hamming"):
        if kind == "knn":  # cosine neighbours = Euclidean neighbours of unit rows
            train_x = unit_rows(train_x, "target features", "reverse 5-NN")
            test_x = unit_rows(test_x, "source features", "reverse 5-NN")
        model = KNeighborsClassifier(REVERSE_NEIGHBOURS).fit(train_x, train_labels)
    else:
        raise ValueError(f"reverse_accuracy: kind must be lr, knn or hamming, got {kind!r}")
    return float((model.predict(test_x) == test_labels).mean())


def label_free_criteria(method: Any, source: Any, target: Any) -> tuple[dict[str, float], np.ndarray, np.ndarray]:
    """The criteria of a fitted ``Couple`` on ``target`` (unlabelled) and ``source`` (labelled), with the
    classifier's target predictions and the last diffusion pseudo-labels (for the accuracy check)."""
    import torch

    hash_t, logits_t = method._outputs(target.features, "target")
    p = torch.softmax(logits_t.double(), dim=1).numpy()
    predicted = p.argmax(axis=1)
    diffusion = (method.selection_history[-1]["pseudo_labels"] if method.selection_history else predicted)
    x_t = method._normalizer_for("target").transform(target.features)
    x_s = method._normalizer_for("source").transform(source.features)
    hash_s = method._outputs(source.features, "source")[0]
    # IM exactly as COUPLE's optional training term computes it (SHOT: mean H(p_i) − H(mean p)).
    out = {"ent": prediction_entropy(p), "im": float(_information_maximisation(logits_t.double())),
           "snd": soft_neighbourhood_density(p),
           "agree": float((predicted == diffusion).mean())}
    for name, labels in (("cls", predicted), ("diff", diffusion)):
        out[f"rev_lr_{name}"] = reverse_accuracy(x_t, labels, x_s, source.labels, "lr")
        out[f"rev_knn_{name}"] = reverse_accuracy(x_t, labels, x_s, source.labels, "knn")
    out["rev_code"] = reverse_accuracy(np.sign(hash_t.numpy()), predicted, np.sign(hash_s.numpy()), source.labels,
                                       "hamming")
    return out, predicted, diffusion


def run_one(job: dict[str, Any]) -> dict[str, Any]:
    from crossret.experiment import RunConfig, run_experiment

    split = dev_split(job["task"], job["data_dir"])
    # A check re-runs a recorded row with its recorded config (resolved, or its overrides in older rows).
    config = RunConfig(method="couple", benchmark=job["task"], bits=BITS, seed=job["seed"],
                       method_config=dict(job.get("method_config", CONFIGS[job["config"]])))
    result = run_experiment(config, split=split)
    criteria, predicted, diffusion = label_free_criteria(result.method, split.source, split.target_train)
    truth = split.target_train.labels
    return {"config": job["config"], "overrides": CONFIGS[job["config"]], "task": job["task"], "bits": BITS,
            "seed": job["seed"], "split_seed": result.metrics["split_seed"], "ties": result.metrics["ties"],
            "map_cross": result.metrics["map_cross"], "map_single": result.metrics["map_single"],
            "classifier_accuracy": float((predicted == truth).mean()),
            "pseudo_label_accuracy": float((diffusion == truth).mean()), **criteria,
            "method_config": result.metrics["method_config"], "environment": _repro.environment()}


CHECK_KEYS = ("config", "task", "seed")
CHECK_FIELDS = ("map_cross", "map_single", "classifier_accuracy", "pseudo_label_accuracy", *CRITERIA)


def check(rows: list[dict[str, Any]], n: int, seed: int, data_dir: str, jobs: int) -> int:
    """Re-run ``n`` sampled recorded rows with their recorded configs and compare them exactly
    (``results/couple_selection_check.{json,md}``); 0 when every sampled row reproduces, 1 otherwise."""
    sample = _repro.sample_rows(rows, n, seed, strata=lambda r: (r["config"], r["task"]))
    fresh = _repro.rerun(run_one, [{**{k: r[k] for k in CHECK_KEYS}, "data_dir": data_dir,
                                    "method_config": r.get("method_config", r["overrides"])} for r in sample],
                         jobs, describe=lambda row: (f"check {row['config']} {row['task']} seed {row['seed']}: "
                                                     f"MAP cross {100 * row['map_cross']:.2f}"))
    comparisons = _repro.compare_rows(sample, fresh, CHECK_KEYS, CHECK_FIELDS)
    environments = {_repro.digest(e): e for e in (r.get("environment", "not recorded") for r in sample)}
    payload, text = _repro.check_report("benchmarks/couple_selection.py", comparisons, list(environments.values()),
                                        CHECK_FIELDS)
    write_json_atomic(RESULTS / "couple_selection_check.json", payload)
    write_text_atomic(RESULTS / "couple_selection_check.md", text)
    print(text, file=sys.stderr)
    return 0 if payload["reproduced"] == payload["checked"] else 1


def _spearman(a: list[float], b: list[float]) -> float | None:
    from scipy.stats import spearmanr

    if len(a) < 3 or len(set(a)) < 2 or len(set(b)) < 2:
        return None  # undefined for constant or too short inputs
    return float(spearmanr(a, b)[0])


def analyse(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per task: the criteria's rank agreement with MAP and what choosing by them would have given."""
    out = []
    for task in sorted({r["task"] for r in rows}):
        runs = [r for r in rows if r["task"] == task]
        by_config: dict[str, list[dict[str, Any]]] = {}
        for r in runs:
            by_config.setdefault(r["config"], []).append(r)
        seeds = sorted({r["seed"] for r in runs})
        config_map = {c: statistics.mean(r["map_cross"] for r in v) for c, v in by_config.items()}
        oracle = [max(r["map_cross"] for r in runs if r["seed"] == s) for s in seeds]
        entry: dict[str, Any] = {
            "task": task, "runs": len(runs), "seeds": seeds, "config_map": config_map,
            "default_map": config_map.get("default"),
            "mean_of_configs_map": statistics.mean(r["map_cross"] for r in runs),
            "oracle_map": statistics.mean(oracle), "criteria": {}}
        for name, sign in CRITERIA.items():
            if not all(name in r for r in runs):
                continue
            score = {id(r): sign * r[name] for r in runs}  # oriented: higher is better
            within = [_spearman([score[id(r)] for r in v], [r["map_cross"] for r in v]) for v in by_config.values()]
            within = [w for w in within if w is not None]
            picks = [max((r for r in runs if r["seed"] == s), key=lambda r: score[id(r)]) for s in seeds]
            entry["criteria"][name] = {
                "rho_runs": _spearman([score[id(r)] for r in runs], [r["map_cross"] for r in runs]),
                "rho_configs": _spearman([statistics.mean(score[id(r)] for r in v) for v in by_config.values()],
                                         [config_map[c] for c in by_config]),
                "rho_seeds": statistics.mean(within) if within else None,
                "picked_map": statistics.mean(r["map_cross"] for r in picks),
                "picked": [r["config"] for r in picks]}
        out.append(entry)
    return out


def markdown(analysis: list[dict[str, Any]]) -> str:
    def pct(v: float | None) -> str:
        return "–" if v is None else f"{100 * v:.1f}"

    def rho(v: float | None) -> str:
        return "–" if v is None else f"{v:+.2f}"

    lines = ["# Label-free selection of COUPLE configurations: development tasks", "",
             "Spearman ρ between each criterion (oriented so that higher should be better) and cross-domain MAP: "
             "over all runs, over the configurations' means, and within a configuration over its seeds (mean). "
             "*Picked*: mean MAP (%) when each seed keeps the configuration with the best criterion. Written by "
             "`benchmarks/couple_selection.py` (64 bits; target labels used only to score the criteria).", ""]
    for entry in analysis:
        configs = ", ".join(f"{c} {pct(m)}" for c, m in sorted(entry["config_map"].items(), key=lambda x: -x[1]))
        lines += [f"## {entry['task']} ({entry['runs']} runs, seeds {', '.join(map(str, entry['seeds']))})", "",
                  f"Configurations (mean MAP): {configs}.", "",
                  f"Defaults {pct(entry['default_map'])} · mean of configurations {pct(entry['mean_of_configs_map'])}"
                  f" · oracle (best configuration per seed, by target labels) {pct(entry['oracle_map'])}", "",
                  "| criterion | ρ runs | ρ configs | ρ seeds | picked MAP | picked configurations |",
                  "|---|---:|---:|---:|---:|---|"]
        for name, c in entry["criteria"].items():
            picked = ", ".join(f"{k}×{v}" if v > 1 else k for k, v in sorted(
                {p: c["picked"].count(p) for p in c["picked"]}.items()))
            lines.append(f"| {name} | {rho(c['rho_runs'])} | {rho(c['rho_configs'])} | {rho(c['rho_seeds'])} | "
                         f"{pct(c['picked_map'])} | {picked} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=None, help="benchmark data directory (default $CROSSRET_DATA)")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--tables-only", action="store_true", help="only rewrite the tables from the runs file")
    parser.add_argument("--check", type=int, default=0, metavar="N",
                        help="re-run N sampled recorded rows with their recorded configs and compare them exactly "
                        "(writes results/couple_selection_check.*; exit 1 when one moved); nothing else is run "
                        "or written")
    parser.add_argument("--check-seed", type=int, default=0, help="seed of the --check sample")
    args = parser.parse_args(argv)
    _repro.pin_numerics()

    rows = _read_runs(RUNS_FILE)
    if args.check:
        from crossret.data import resolve_data_dir

        return check(rows, args.check, args.check_seed, str(resolve_data_dir(args.data_dir)), args.jobs)
    if not args.tables_only:
        from crossret.data import resolve_data_dir

        data_dir = str(resolve_data_dir(args.data_dir))
        done = {(r["config"], r["task"], r["seed"]) for r in rows}
        jobs = [{"config": c, "task": t, "seed": s, "data_dir": data_dir}
                for c in args.configs for t in args.tasks for s in args.seeds if (c, t, s) not in done]

        run_jobs(run_one, jobs, args.jobs, RUNS_FILE, rows, describe=lambda row: (
            f"{row['config']:10s} {row['task']} seed {row['seed']}: MAP {100 * row['map_cross']:.2f}"))
    analysis = analyse(rows)
    write_json_atomic(RESULTS / "couple_selection.json", {
        "script": "benchmarks/couple_selection.py", "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "bits": BITS, "configs": CONFIGS, "criteria_orientation": CRITERIA, "snd_temperature": SND_TEMPERATURE,
        "analysis": analysis, "runs_file": RUNS_FILE.name, "runs": len(rows)})
    write_text_atomic(RESULTS / "couple_selection.md", markdown(analysis))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
