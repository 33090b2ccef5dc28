"""Run one hashing method on one protocol split, evaluate it, and write a run directory.

This is the Python API behind ``crossret run`` and ``crossret demo``::

    from crossret.experiment import RunConfig, run_experiment
    result = run_experiment(RunConfig(method="itq", benchmark="digits-m2u", bits=64, data_dir="data"))
    result.metrics["map_cross"]

A run directory holds (docs/usage.md, "Run directory"):

* ``config.yaml``   the resolved configuration (method config with every default filled in),
* ``metrics.json``  the metric contract (``method``, ``benchmark``, ``bits``, ``seed``, ``ties``,
  ``map_cross``, ``map_single``, ``precision_at``, ``p_at_r2``, ``train_seconds``,
  ``encode_seconds`` ...) plus protocol, curves and method diagnostics,
* ``codes/``        ±1 int8 codes and labels of the queries, the source and the target-train set,
* ``model.*``       the fitted method (safe formats, see each method's ``save``),
* ``run.log``       a log of the run, and ``plots/`` when asked for,
* ``.crossret-run`` the marker that makes it a crossret run directory (see :mod:`crossret.runs`, which
  creates, locks, resumes and replaces run directories).

Under ``torchrun`` (docs/distributed.md) every rank trains (methods with ``data_parallel``, i.e.
COUPLE); rank 0 alone prepares and writes the run directory, encodes and evaluates, and every rank
returns its result.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from crossret import distributed, runs
from crossret.config_keys import reject_unknown_keys
from crossret.data.domain import RetrievalSplit
from crossret.errors import ConfigError, DataError, FileFormatError
from crossret.hashing.base import HashMethod
from crossret.hashing.registry import make_method
from crossret.model import evaluate_codes as evaluate_codes  # re-exported: part of this module's API
from crossret.model import train_method, use_device
from crossret.progress import ProgressFn, no_progress
from crossret.provenance import collect_provenance
from crossret.retrieval.metrics import DEFAULT_PRECISION_NS, TIE_RULES
from crossret.storage.atomic import save_npy_atomic, write_json_atomic, write_yaml_atomic
from crossret.storage.safe_read import read_json_file, read_yaml_mapping

logger = logging.getLogger("crossret")
LABEL_BASES = ("auto", 0, 1)


@dataclass
class RunConfig:
    """Everything that defines a run. Serialised to ``config.yaml``; every field is a plain type."""

    method: str
    bits: int
    seed: int = 0
    benchmark: str | None = None
    source: str | None = None
    target: str | None = None
    data_dir: str | None = None
    split_seed: int = 313
    n_queries: int | None = None
    query_fraction: float = 0.1
    label_base: str | int = "auto"
    source_label_base: str | int | None = None
    target_label_base: str | int | None = None
    allow_class_mismatch: bool = False
    ties: str = "expected"
    topk: int | None = None
    precision_ns: list[int] = field(default_factory=lambda: list(DEFAULT_PRECISION_NS))
    method_config: dict[str, Any] = field(default_factory=dict)
    out_dir: str | None = None
    plots: bool = False

    def validate(self) -> RunConfig:
        if not isinstance(self.bits, int) or self.bits <= 0:
            raise ConfigError(f"--bits must be a positive integer, got {self.bits!r}")
        if self.ties not in TIE_RULES:
            raise ConfigError(f"--ties must be one of {', '.join(TIE_RULES)}, got {self.ties!r}")
        if self.topk is not None and self.topk < 1:
            raise ConfigError(f"--topk must be >= 1, got {self.topk}")
        if (self.benchmark is None) == (self.source is None and self.target is None):
            raise ConfigError("give either --benchmark NAME or both --source FILE and --target FILE")
        if self.benchmark is None and (self.source is None or self.target is None):
            raise ConfigError("custom domains need both --source FILE and --target FILE")
        if self.benchmark is not None and (self.n_queries is not None or self.query_fraction != 0.1
                                           or self.label_base != "auto" or self.source_label_base is not None
                                           or self.target_label_base is not None):
            raise ConfigError(
                "--n-queries, --query-fraction and --label-base apply to --source/--target files only; a named "
                "benchmark has a fixed protocol (see docs/benchmarks.md)"
            )
        if self.label_base not in LABEL_BASES:
            raise ConfigError(f"--label-base must be auto, 0 or 1, got {self.label_base!r}")
        for option, value in (("--source-label-base", self.source_label_base),
                              ("--target-label-base", self.target_label_base)):
            if value is not None and value not in LABEL_BASES:
                raise ConfigError(f"{option} must be auto, 0 or 1, got {value!r}")
        if not 0.0 < self.query_fraction < 1.0:
            raise ConfigError(f"query fraction must be in (0, 1), got {self.query_fraction}")
        if any(int(n) < 1 for n in self.precision_ns):
            raise ConfigError("precision@N cut-offs must be >= 1")
        return self

    @property
    def benchmark_label(self) -> str:
        return self.benchmark or "custom"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_yaml(cls, path: str | Path) -> RunConfig:
        """Load a ``config.yaml`` written by a run (unknown keys are an error)."""
        path = Path(path)
        raw = read_yaml_mapping(path, "run config")
        raw = raw.get("run", raw)
        if not isinstance(raw, dict) or not all(isinstance(k, str) for k in raw):
            raise FileFormatError(f"{path}: not a run config ('run' must map option names to values)")
        raw = dict(raw)
        raw.pop("resolved_method_config", None)
        reject_unknown_keys(cls, raw, f"{path}: run config")
        try:
            config = cls(**raw)
        except TypeError as exc:  # a required option is missing
            raise FileFormatError(f"{path}: incomplete run config ({exc})") from exc
        config.validate()
        return config


@dataclass
class RunResult:
    """What :func:`run_experiment` returns."""

    config: RunConfig
    metrics: dict[str, Any]
    method: HashMethod
    split: RetrievalSplit
    codes: dict[str, np.ndarray]
    run_dir: Path | None


def load_split(config: RunConfig) -> RetrievalSplit:
    """The protocol split a config asks for (a named benchmark or two domain files)."""
    from crossret.data import load_benchmark, make_split, read_domain_pair, resolve_data_dir

    config.validate()
    if config.benchmark is not None:
        data_dir = resolve_data_dir(config.data_dir)
        return load_benchmark(config.benchmark, data_dir, split_seed=config.split_seed)
    assert config.source is not None and config.target is not None
    from crossret.data.readers import check_label_overlap

    source, target, bases = read_domain_pair(config.source, config.target, label_base=config.label_base,
                                             source_label_base=config.source_label_base,
                                             target_label_base=config.target_label_base)
    check_label_overlap(source, target, allow_mismatch=config.allow_class_mismatch)
    return make_split(
        source,
        target,
        benchmark="custom",
        n_queries=config.n_queries,
        query_fraction=config.query_fraction,
        split_seed=config.split_seed,
        protocol_extra={"source_file": str(config.source), "target_file": str(config.target), **bases},
    )


def run_experiment(
    config: RunConfig,
    *,
    split: RetrievalSplit | None = None,
    progress: ProgressFn = no_progress,
    overwrite: bool = False,
    resume: bool = False,
    command: list[str] | None = None,
    device: str = "cpu",
) -> RunResult:
    """Fit ``config.method`` on the split, encode, evaluate cross- and single-domain retrieval.

    Writes a run directory when ``config.out_dir`` is set. The target's labels are never shown to
    the method: it receives :meth:`RetrievalSplit.training_target`; methods with a ``label_report``
    hook (COUPLE) get the target-train labels *after* training, for diagnostics only.

    Methods that checkpoint (COUPLE) write ``checkpoints/`` into the run directory after every
    epoch; ``resume=True`` continues an interrupted run in the same directory (same config
    required). ``overwrite=True`` replaces the crossret run in ``out_dir``: the new run is built
    beside it and swapped in only when it has finished. The run directory is locked for the whole
    run; see :mod:`crossret.runs` for what is refused. ``command`` (the command line that started the
    run, if any) is recorded with package versions and the source commit under ``provenance`` in
    ``metrics.json``. ``device`` (``cpu``, ``cuda``, ``cuda:N``) is where the torch methods train and encode;
    it is a placement, not part of the configuration (the torch methods record it in their diagnostics).

    Launched by ``torchrun`` with several processes, the method trains data-parallel (gloo, CPU only) and
    rank 0 writes the run directory; see docs/distributed.md.
    """
    with distributed.process_group("gloo"):  # data-parallel hashing networks train on CPU processes
        return _run_experiment(config, split, progress, overwrite, resume, command, device)


def _run_experiment(config: RunConfig, split: RetrievalSplit | None, progress: ProgressFn, overwrite: bool,
                    resume: bool, command: list[str] | None = None, device: str = "cpu") -> RunResult:
    config.validate()
    # Everything that can fail on bad input happens before the run directory is touched.
    method = make_method(config.method, bits=config.bits, seed=config.seed, overrides=config.method_config)
    if distributed.active() and not method.data_parallel:
        raise ConfigError(f"method {config.method!r} does not train data-parallel; run it without torchrun "
                          "(see docs/distributed.md)")
    if distributed.active() and device != "cpu":
        raise ConfigError(f"--device {device}: data-parallel training under torchrun runs on CPU processes (gloo) "
                          "only; use --device cpu under torchrun, or one process with --device cuda")
    use_device(method, device)
    if resume and not config.out_dir:
        raise ConfigError("--resume needs the run directory of the interrupted run (--out DIR)")
    target = Path(config.out_dir) if config.out_dir else None
    check_resume = partial(_check_resumable, config=config, method=method)
    if target is not None:
        distributed.run_on_main(partial(_check_target, target, overwrite, resume, check_resume))
    if split is None:
        split = load_split(config)
    method.check_sizes(split.source, split.training_target())  # options too large for memory: before any write
    main = distributed.is_main()  # rank 0 (or the only process) writes files and reports progress
    if not main:
        progress = no_progress
    handle: runs.RunDirectory | None = None

    def open_run_dir() -> Path:
        nonlocal handle
        handle = runs.open_run(target, "hashing", overwrite=overwrite, resume=resume, check_resume=check_resume)
        return handle.path

    # Under --overwrite the run is written into a staging directory beside the old run (rank 0 names it).
    work_dir = distributed.run_on_main(open_run_dir) if target is not None else None
    handler = None
    try:
        if work_dir is not None and hasattr(method, "checkpoint_dir"):
            method.checkpoint_dir = work_dir / "checkpoints"
            method.resume = resume
        handler = runs.attach_run_log(work_dir) if work_dir and main else None
        if work_dir:
            distributed.run_on_main(partial(write_yaml_atomic, work_dir / "config.yaml",
                                            _resolved_config(config, method)))
        logger.info("split: %s", split.summary())
        logger.info("method %s, %d bits, seed %d, config %s", config.method, config.bits, config.seed,
                    method.config_dict())

        # The same training step as crossret fit: the target reaches the method without labels.
        train_seconds = train_method(method, split.source, split.target_train, progress)
        # Encoding, evaluation and the run directory: rank 0's job under torchrun, shared with the others.
        codes, metrics = distributed.run_on_main(
            partial(_evaluate_and_write, config, method, split, work_dir, train_seconds, progress, command))
        if target is not None:
            distributed.run_on_main(lambda: handle.commit() if handle is not None else None)
            if hasattr(method, "checkpoint_dir"):
                method.checkpoint_dir = target / "checkpoints"
        return RunResult(config, metrics, method, split, codes, target)
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt):
            logger.warning("interrupted; the run directory holds no metrics.json")
        if handle is not None:
            handle.abort()
        raise
    finally:
        runs.detach_run_log(handler)
        if handle is not None:
            handle.release()


def _evaluate_and_write(config: RunConfig, method: HashMethod, split: RetrievalSplit, run_dir: Path | None,
                        train_seconds: float, progress: ProgressFn,
                        command: list[str] | None = None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Encode the three sets, evaluate both databases, write the run directory (when there is one)."""
    start = time.perf_counter()
    codes = {
        "queries": method.encode(split.queries.features),
        "source": method.encode(split.source.features, domain="source"),
        "target_train": method.encode(split.target_train.features),
    }
    encode_seconds = time.perf_counter() - start
    if hasattr(method, "label_report"):
        # Diagnostics only (pseudo-label accuracy per refresh); training is already over.
        method.diagnostics["label_report"] = method.label_report(split.target_train.labels)

    start = time.perf_counter()
    evaluated = evaluate_codes(
        codes["queries"], split.queries.labels,
        {"cross": (codes["source"], split.source.labels),
         "single": (codes["target_train"], split.target_train.labels)},
        ties=config.ties, topk=config.topk, precision_ns=config.precision_ns, progress=progress,
    )
    eval_seconds = time.perf_counter() - start

    metrics: dict[str, Any] = {
        "method": config.method,
        "benchmark": config.benchmark_label,
        "bits": config.bits,
        "seed": config.seed,
        "split_seed": config.split_seed,
        "ties": config.ties,
        "topk": config.topk,
        "map_definition": _map_definition(config.ties, config.topk),
        "map_cross": evaluated.pop("map_cross"),
        "map_single": evaluated.pop("map_single"),
        **evaluated,
        "train_seconds": round(train_seconds, 4),
        "encode_seconds": round(encode_seconds, 4),
        "eval_seconds": round(eval_seconds, 4),
        "n_queries": split.queries.n,
        "n_source": split.source.n,
        "n_target_train": split.target_train.n,
        "protocol": split.summary(),
        "method_config": method.config_dict(),
        "diagnostics": method.diagnostics,
        "provenance": collect_provenance(command),
    }
    logger.info("MAP cross %.4f, single %.4f (ties=%s); train %.2fs", metrics["map_cross"],
                metrics["map_single"], config.ties, train_seconds)
    if run_dir:
        _write_run(run_dir, config, method, split, codes, metrics)
    return codes, metrics


def _map_definition(ties: str, topk: int | None) -> str:
    rule = ("ties: exact expected AP under a uniformly random order of tied items" if ties == "expected"
            else "ties: broken by database order")
    text = f"MAP@all: mean over queries of AP over the whole Hamming ranking; {rule}"
    if topk is not None:
        text += (f"; MAP@{topk}: AP normalised by the number of relevant items retrieved in the top {topk} "
                 "(DA-hashing convention)")
    return text


def _resolved_config(config: RunConfig, method: HashMethod) -> dict[str, Any]:
    resolved = config.to_dict()
    resolved["resolved_method_config"] = method.config_dict()
    return resolved


def _check_target(run_dir: Path, overwrite: bool, resume: bool, check_resume: Any) -> None:
    """Refuse a run directory early, before the split is loaded (nothing is changed)."""
    if runs.check_run_target(run_dir, "hashing", overwrite=overwrite, resume=resume) == "resume":
        check_resume(run_dir)


def _check_resumable(run_dir: Path, config: RunConfig, method: HashMethod) -> None:
    """A resumed run must have the same resolved configuration as the interrupted one."""
    saved_path = run_dir / "config.yaml"
    if not os.path.lexists(saved_path):
        return  # nothing was started there yet: a fresh run
    saved = read_yaml_mapping(saved_path, "the interrupted run's config")
    current = _resolved_config(config, method)
    ignore = {"out_dir", "plots"}
    differing = sorted(k for k in set(current) | set(saved)
                       if k not in ignore and saved.get(k) != current.get(k))
    if differing:
        raise ConfigError(f"--resume: {run_dir} was started with a different configuration "
                          f"({', '.join(differing)} differ); use the same options or a new --out")


def _write_run(run_dir: Path, config: RunConfig, method: HashMethod, split: RetrievalSplit,
               codes: dict[str, np.ndarray], metrics: dict[str, Any]) -> None:
    labels = {"queries": split.queries.labels, "source": split.source.labels,
              "target_train": split.target_train.labels}
    for name, array in codes.items():
        save_npy_atomic(run_dir / "codes" / f"{name}_codes.npy", array)
        save_npy_atomic(run_dir / "codes" / f"{name}_labels.npy", labels[name])
    if hasattr(method, "save"):
        suffix = ".pt" if getattr(method, "storage", "npz") == "torch" else ".npz"
        method.save(run_dir / f"model{suffix}")
    if config.plots:
        from crossret.report.plots import write_run_plots

        write_run_plots(metrics, run_dir / "plots")
    # metrics.json last: its presence marks a finished run.
    write_json_atomic(run_dir / "metrics.json", metrics)


def read_run_metrics(run_dir: str | Path) -> dict[str, Any]:
    """Load ``metrics.json`` of a finished run directory (clear error when missing or corrupt)."""

    path = runs.run_file(run_dir, "metrics.json")
    if not path.is_file():
        raise DataError(f"{run_dir}: no metrics.json; is this a finished crossret run directory?")
    metrics = read_json_file(path, "metrics")
    if not isinstance(metrics, dict):
        raise FileFormatError(f"{path}: cannot parse metrics (expected a JSON object)")
    return metrics


def default_run_dir(config: RunConfig, root: str | Path = "runs") -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return str(Path(root) / f"{config.benchmark_label}-{config.method}-{config.bits}b-s{config.seed}-{stamp}")



def load_run_config(path: str | Path) -> RunConfig:
    """The configuration of a saved run, to run it again: ``path`` is a run directory or its ``config.yaml``.

    The method's resolved configuration (every default as the run used it) becomes ``method_config``, so a
    default changed since does not change the re-run; ``out_dir`` is cleared.
    """
    path = Path(path)
    if path.is_dir():
        path = runs.run_file(path, "config.yaml")
    if not path.is_file():
        raise DataError(f"{path}: no such run config; give a run directory or its config.yaml")
    config = RunConfig.from_yaml(path)
    resolved = read_yaml_mapping(path, "run config")
    resolved = resolved.get("run", resolved).get("resolved_method_config")
    if resolved is not None:
        if not isinstance(resolved, dict):
            raise FileFormatError(f"{path}: resolved_method_config must be a mapping")
        config.method_config = {**resolved, **config.method_config}
    config.out_dir = None
    return config
