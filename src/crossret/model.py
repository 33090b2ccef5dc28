"""Fit a hashing method to an unlabelled target, save it as a model directory, load it, encode, evaluate.

The Python API behind ``crossret fit``, ``crossret encode`` and ``crossret evaluate``::

    import crossret
    model = crossret.fit("itq", "source.npz", "target.npz", bits=64, out="models/itq")
    codes = model.encode(target_features)                   # ±1 int8, one row per item
    model = crossret.load("models/itq")

The target may hold features only (an ``.npz`` with just ``features``, a bare ``.npy`` matrix, or an
array): fitting never reads target labels; the method gets the target with every label -1.
``crossret run`` trains through the same :func:`train_method`.

A model directory is a crossret run directory of kind ``model`` (see :mod:`crossret.runs`) holding

* ``config.yaml``      the resolved configuration (method, bits, seed, every method option, inputs),
* ``model.npz`` / ``model.pt``  the fitted method (the format ``crossret run`` writes),
* ``run.log``          the log of the fit,
* ``diagnostics.json`` the method's label-free diagnostics, written last: it marks a finished fit.

:func:`load` also reads the model of a finished ``crossret run`` directory (kind ``hashing``).
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from crossret import runs
from crossret.data.domain import UNKNOWN_LABEL, Domain
from crossret.errors import ConfigError, DataError, FileFormatError
from crossret.hashing.base import HashMethod, check_domain
from crossret.hashing.registry import make_method
from crossret.progress import ProgressFn, no_progress
from crossret.storage.atomic import to_jsonable, write_json_atomic, write_text_atomic, write_yaml_atomic
from crossret.storage.safe_read import read_json_file, read_yaml_mapping

__all__ = ["DEVICES", "FittedModel", "as_domain", "check_device", "evaluate", "evaluate_codes", "fit", "load",
           "train_method", "use_device"]

logger = logging.getLogger("crossret")

#: Devices ``--device`` accepts (``cuda:N`` names one GPU).
DEVICES = ("cpu", "cuda")
_DEVICE_PATTERN = re.compile(r"cpu|cuda(:[0-9]+)?")
#: The file whose presence marks a finished model directory.
DONE_FILE = "diagnostics.json"

DomainLike = Domain | str | os.PathLike | np.ndarray


# ---------------------------------------------------------------------------------------------- shared steps
def train_method(method: HashMethod, source: Domain, target: Domain, progress: ProgressFn = no_progress) -> float:
    """Fit ``method`` on the labelled ``source`` and the target *without its labels*; returns the seconds
    it took. The one training step of ``crossret fit`` and ``crossret run``."""
    start = time.perf_counter()
    method.fit(source, target.without_labels(), progress=progress)
    return time.perf_counter() - start


def check_device(device: str, method: HashMethod) -> str:
    """``device`` if ``method`` can train and encode there: ``cpu`` always; ``cuda`` (or ``cuda:N``) needs a
    torch method (source-only, COUPLE) and a CUDA-enabled torch that sees the GPU. Anything else is a
    one-line :class:`ConfigError` naming ``--device``."""
    if not isinstance(device, str) or not _DEVICE_PATTERN.fullmatch(device):
        raise ConfigError(f"--device must be cpu or cuda (cuda:N for one GPU), got {device!r}")
    if device == "cpu":
        return device
    if getattr(method, "storage", "npz") != "torch" or not callable(getattr(method, "to", None)):
        raise ConfigError(f"--device {device}: {method.name} is not a torch method and runs on the CPU only; "
                          "leave out --device")
    from crossret.hashing.deep import resolve_device

    resolve_device(device)
    return device


def use_device(method: HashMethod, device: str) -> None:
    """Check ``device`` (:func:`check_device`) and make a torch ``method`` train and encode there."""
    check_device(device, method)
    if callable(getattr(method, "to", None)):
        method.to(device)  # type: ignore[attr-defined]


def as_domain(value: DomainLike, role: str, label_base: Any = "auto") -> Domain:
    """A :class:`Domain` from a Domain, a feature file (any supported format) or an array (features
    with unknown labels)."""
    if isinstance(value, Domain):
        return value
    if isinstance(value, (str, os.PathLike)):
        from crossret.data.readers import read_domain

        half = role if role in ("source", "target") else None  # which half of a two-domain (JDA) file
        return read_domain(value, half, label_base=label_base)  # type: ignore[arg-type]
    array = np.asarray(value)
    if array.ndim != 2:
        raise DataError(f"{role}: expected a 2-D feature array (items x dims), got shape {array.shape}")
    return Domain(role, array, np.full(array.shape[0], UNKNOWN_LABEL, np.int64))


def _where(domain: Domain, role: str) -> str:
    return f"--{role} {domain.origin}" if domain.origin else role


def _read_pair(source: DomainLike, target: DomainLike, source_label_base: Any,
               target_label_base: Any) -> tuple[Domain, Domain, dict[str, Any]]:
    """Both domains, with one label-base decision for a pair of files."""
    if isinstance(source, (str, os.PathLike)) and isinstance(target, (str, os.PathLike)):
        from crossret.data.readers import read_domain_pair

        src, tgt, bases = read_domain_pair(source, target, source_label_base=source_label_base,
                                           target_label_base=target_label_base)
        return src, tgt, dict(bases)
    return (as_domain(source, "source", source_label_base), as_domain(target, "target", target_label_base),
            {"source_label_base": source_label_base, "target_label_base": target_label_base})


def _check_fit_pair(method: HashMethod, source: Domain, target: Domain) -> None:
    """What fitting needs of the pair, as one-line errors naming the file and the fix."""
    src, tgt = _where(source, "source"), _where(target, "target")
    if source.dim != target.dim:
        raise DataError(f"{tgt} has {target.dim} features per item but {src} has {source.dim}; both domains must "
                        "be described by the same feature extractor")
    if target.n < 2:
        raise DataError(f"{tgt} holds {target.n} item(s); adapting to a target needs at least 2 (give the whole "
                        "unlabelled target collection)")
    if source.n < 2:
        raise DataError(f"{src} holds {source.n} item(s); fitting needs at least 2 source items")
    if method.uses_source_labels:
        unknown = int((source.labels < 0).sum())
        if unknown:
            raise DataError(f"{src}: {unknown} of {source.n} items have no label; {method.name} learns from source "
                            "labels: give a labelled source (or use lsh / itq, which need none)")
        if source.classes.size < 2:
            raise DataError(f"{src}: every item has the same class; {method.name} needs at least 2 source classes")


@contextmanager
def _log_lines() -> Iterator[list[str]]:
    """Collect crossret's log records (INFO and up) as formatted lines while the block runs."""
    lines: list[str] = []

    class _Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(self.format(record))

    handler = _Collect()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    root = logging.getLogger("crossret")
    previous = root.level
    root.addHandler(handler)
    if root.level == logging.NOTSET or root.level > logging.INFO:
        root.setLevel(logging.INFO)
    try:
        yield lines
    finally:
        root.removeHandler(handler)
        root.setLevel(previous)


# ---------------------------------------------------------------------------------------------- the model
class FittedModel:
    """A fitted hashing method with the configuration it was fitted with.

    ``method`` is the method's name, ``bits`` the code length, ``hash_method`` the fitted
    :class:`~crossret.hashing.base.HashMethod`, ``config`` the resolved configuration, ``path`` the model
    directory it was saved to or loaded from (``None`` before :meth:`save`).
    """

    def __init__(self, hash_method: HashMethod, config: dict[str, Any], path: Path | None = None) -> None:
        self.hash_method = hash_method
        self.config = config
        self.path = path

    @property
    def method(self) -> str:
        return self.hash_method.name

    @property
    def bits(self) -> int:
        return int(self.hash_method.bits)

    @property
    def input_dim(self) -> int:
        return int(self.hash_method.input_dim or 0)

    @property
    def diagnostics(self) -> dict[str, Any]:
        return self.hash_method.diagnostics

    def __repr__(self) -> str:
        return f"FittedModel({self.method!r}, bits={self.bits}, input_dim={self.input_dim}, path={self.path})"

    def to(self, device: str) -> FittedModel:
        """Encode on ``device`` (``cpu``, or ``cuda`` / ``cuda:N`` for the torch methods) from now on; returns
        the model. A GPU's codes may differ from the CPU's in a few bits (float rounding near zero)."""
        use_device(self.hash_method, device)
        return self

    def encode(self, x: DomainLike, domain: str = "target") -> np.ndarray:
        """±1 int8 codes ``(N, bits)`` of ``x`` (an array, a :class:`Domain` or a feature file).
        ``domain`` (``target`` | ``source``) says where the features come from (COUPLE centres each on
        its own mean)."""
        check_domain(domain)
        features = x if isinstance(x, np.ndarray) else as_domain(x, domain).features
        return self.hash_method.encode(features, domain=domain)

    def encode_file(self, features: str | os.PathLike, out: str | os.PathLike, *, domain: str = "target",
                    packed: bool = False, batch_size: int | None = None, overwrite: bool = False,
                    shape: tuple[int, int] | None = None, dtype: str = "float32",
                    progress: ProgressFn = no_progress) -> Any:
        """Encode a feature file into a codes ``.npy`` at ``out`` batch by batch (a ``.npy`` input, or a raw
        binary matrix of ``shape`` and ``dtype``, is memory-mapped, so it may exceed memory): ±1 int8 rows, or
        packed uint8 rows with ``packed``; a sidecar ``OUT.json`` records the code length. Returns the
        :class:`~crossret.retrieval.streaming.PackedCodesFile` record."""
        from crossret.hashing.encoding import DEFAULT_ENCODE_BATCH, encode_to_file
        from crossret.retrieval.streaming import open_features

        check_domain(domain)
        runs.check_output_file(out, "codes", overwrite=overwrite)
        path = Path(features)
        if shape is not None or path.suffix.lower() == ".npy":
            array: Any = open_features(path, shape=shape, dtype=dtype)
        else:
            array = as_domain(path, domain).features
        meta = {"features": str(path), "model": str(self.path) if self.path else None}
        return encode_to_file(self.hash_method, array, out, batch_size=batch_size or DEFAULT_ENCODE_BATCH,
                              progress=progress, meta=meta, domain=domain, packed=packed)

    def evaluate(self, queries: DomainLike, database: DomainLike, *, query_domain: str = "target",
                 database_domain: str = "target", ties: str = "expected", topk: int | None = None,
                 label_base: Any = "auto", progress: ProgressFn = no_progress) -> dict[str, Any]:
        """Encode labelled ``queries`` and ``database`` and evaluate retrieval (MAP@all, precision@N, ...);
        see :func:`evaluate`."""
        return evaluate(self, queries, database, query_domain=query_domain, database_domain=database_domain,
                        ties=ties, topk=topk, label_base=label_base, progress=progress)

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write this model as a model directory at ``path`` (see the module doc); returns it."""
        self.path = _write_model_dir(Path(path), self.hash_method, self.config, [], overwrite=overwrite)
        return self.path


def _model_file_name(method: HashMethod) -> str:
    return "model.pt" if getattr(method, "storage", "npz") == "torch" else "model.npz"


def _write_model_files(directory: Path, method: HashMethod, config: dict[str, Any], log_lines: list[str]) -> None:
    """The model directory's files, ``diagnostics.json`` last (its presence marks a finished fit)."""
    method.save(directory / _model_file_name(method))  # type: ignore[attr-defined]
    write_text_atomic(directory / "run.log", "".join(f"{line}\n" for line in log_lines))
    write_json_atomic(directory / DONE_FILE, to_jsonable(method.diagnostics))


def _write_model_dir(path: Path, method: HashMethod, config: dict[str, Any], log_lines: list[str], *,
                     overwrite: bool) -> Path:
    """Create (or, with ``overwrite``, replace) the model directory ``path`` of a fitted method."""
    with runs.open_run(path, "model", overwrite=overwrite) as handle:
        write_yaml_atomic(handle.path / "config.yaml", to_jsonable(config))
        _write_model_files(handle.path, method, config, log_lines)
        return handle.commit()


def _check_same_fit(directory: Path, config: dict[str, Any]) -> None:
    """A resumed fit must have the configuration of the interrupted one."""
    saved_path = runs.run_file(directory, "config.yaml")
    if not saved_path.is_file():
        return  # nothing was started there yet
    saved = read_yaml_mapping(saved_path, "the interrupted fit's config")
    current = to_jsonable(config)
    differing = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    if differing:
        raise ConfigError(f"--resume: {directory} was started with a different configuration ({', '.join(differing)} "
                          "differ); use the same options or a new --out")


def fit(method: str, source: DomainLike, target: DomainLike, *, bits: int, seed: int = 0,
        config: dict[str, Any] | None = None, out: str | os.PathLike | None = None, device: str = "cpu",
        source_label_base: Any = "auto", target_label_base: Any = "auto", allow_class_mismatch: bool = False,
        overwrite: bool = False, resume: bool = False, progress: ProgressFn = no_progress) -> FittedModel:
    """Fit ``method`` (``lsh``, ``itq``, ``source-only``, ``couple``) to adapt from ``source`` to ``target``.

    ``source`` and ``target`` are :class:`Domain` objects, feature files or arrays (features with unknown
    labels). Target labels are never given to the method; when both sides carry labels, they are only
    checked to overlap (:func:`crossret.data.readers.check_label_overlap`, off with
    ``allow_class_mismatch``). ``config`` overrides method options (``--set``). ``device`` (``cpu``,
    ``cuda``, ``cuda:N``) is where the torch methods train; the saved model holds CPU tensors either way.
    Every check on the input and on ``out`` happens before anything is written, so bad input writes
    nothing. With ``out`` the
    model directory is opened before training: methods that checkpoint (COUPLE) write
    ``checkpoints/`` there after every epoch, and ``resume=True`` continues an interrupted fit from its
    last checkpoint (same configuration required).
    """
    from crossret.data.readers import check_label_overlap

    hash_method = make_method(method, bits=bits, seed=seed, overrides=config)
    use_device(hash_method, device)
    if resume and out is None:
        raise ConfigError("--resume needs the model directory of the interrupted fit (--out DIR)")
    if out is not None:
        runs.check_run_target(out, "model", overwrite=overwrite, resume=resume)
    src, tgt, bases = _read_pair(source, target, source_label_base, target_label_base)
    _check_fit_pair(hash_method, src, tgt)
    check_label_overlap(src, tgt, allow_mismatch=allow_class_mismatch)
    hash_method.check_sizes(src, tgt.without_labels())
    resolved = {
        "method": method, "bits": bits, "seed": seed, "device": device,
        "source": src.origin or None, "target": tgt.origin or None,
        "n_source": src.n, "n_target": tgt.n, "input_dim": src.dim, **bases,
        "allow_class_mismatch": allow_class_mismatch,
        "method_config": dict(config or {}), "resolved_method_config": hash_method.config_dict(),
    }
    if out is None:
        with _log_lines():
            train_method(hash_method, src, tgt, progress)
        return FittedModel(hash_method, resolved)
    with runs.open_run(out, "model", overwrite=overwrite, resume=resume,
                       check_resume=lambda directory: _check_same_fit(directory, resolved)) as handle:
        write_yaml_atomic(handle.path / "config.yaml", to_jsonable(resolved))
        if hasattr(hash_method, "checkpoint_dir"):
            hash_method.checkpoint_dir = handle.path / "checkpoints"
            hash_method.resume = resume
        with _log_lines() as lines:
            logger.info("fit %s, %d bits, seed %d: source %s (%d items), target %s (%d items, labels hidden)",
                        method, bits, seed, src.origin or src.name, src.n, tgt.origin or tgt.name, tgt.n)
            seconds = train_method(hash_method, src, tgt, progress)
            logger.info("trained in %.2fs", seconds)
        _write_model_files(handle.path, hash_method, resolved, lines)
        model = FittedModel(hash_method, resolved)
        model.path = handle.commit()
    return model


def load(model_dir: str | os.PathLike, *, device: str = "cpu") -> FittedModel:
    """The model of a model directory written by :func:`fit` / ``crossret fit`` (or of a finished
    ``crossret run`` directory), encoding on ``device`` (see :meth:`FittedModel.to`; models trained on a
    GPU load on the CPU too). A missing, unfinished or foreign directory is a one-line error."""
    from crossret.hashing.registry import load_method

    path = Path(model_dir)
    if not path.is_dir():
        raise DataError(f"model directory {path}: not found (or not a directory); create one with crossret fit")
    marker = runs.read_marker(path)
    model_file = runs.find_model_file(path)
    if marker is None:
        # Read only, never written: a run from before run directories carried a marker, or a folder holding a
        # method saved by HashMethod.save.
        if model_file is None:
            raise DataError(f"model directory {path}: not a crossret model directory (no {runs.MARKER} and no "
                            "model.npz / model.pt); give a directory written by crossret fit")
        marker = {"kind": "saved"}
    elif marker["kind"] not in ("model", "hashing"):
        raise DataError(f"model directory {path}: holds a {marker['kind']} run, not a hashing model; give a "
                        "directory written by crossret fit (or crossret run)")
    else:
        done = DONE_FILE if marker["kind"] == "model" else "metrics.json"
        if model_file is None or not runs.run_file(path, done).is_file():
            raise DataError(f"model directory {path}: incomplete (no model file or no {done}: an interrupted fit); "
                            "fit it again with --overwrite")
    assert model_file is not None
    method = load_method(model_file)
    config_path = runs.run_file(path, "config.yaml")
    config = read_yaml_mapping(config_path, "model config") if config_path.is_file() else {}
    if marker["kind"] == "model":
        diagnostics = read_json_file(runs.run_file(path, DONE_FILE), "diagnostics")
        if not isinstance(diagnostics, dict):
            raise FileFormatError(f"{path / DONE_FILE}: not a JSON object; fit the model again with --overwrite")
        method.diagnostics = diagnostics
    return FittedModel(method, config, path).to(device)


def _labelled(value: DomainLike, what: str, label_base: Any, role: str) -> Domain:
    domain = as_domain(value, role, label_base)
    unknown = int((domain.labels < 0).sum())
    if unknown:
        raise DataError(f"{_where(domain, what)}: {unknown} of {domain.n} items have no label; evaluation needs a "
                        "labelled file (features and labels)")
    return domain


def evaluate_codes(
    query_codes: np.ndarray,
    query_labels: np.ndarray,
    databases: dict[str, tuple[np.ndarray, np.ndarray]],
    *,
    ties: str = "expected",
    topk: int | None = None,
    precision_ns: tuple[int, ...] | list[int] | None = None,
    progress: ProgressFn = no_progress,
) -> dict[str, Any]:
    """Evaluate query codes against one or more named databases (e.g. ``cross``, ``single``).

    Returns the flat metric keys of the contract (``map_<name>``, ``precision_at[name]`` ...) plus
    ``curves`` for plotting: P-R by Hamming radius, and P-R by rank at the ranks of
    :func:`~crossret.retrieval.metrics.rank_grid` (about 100 log-spaced ranks up to the database size).
    ``precision_ns`` defaults to :data:`~crossret.retrieval.metrics.DEFAULT_PRECISION_NS`. Shared by
    :func:`evaluate` and ``crossret run`` (:mod:`crossret.experiment`).
    """
    from crossret.retrieval.metrics import DEFAULT_PRECISION_NS, evaluate_hamming, rank_grid

    if precision_ns is None:
        precision_ns = DEFAULT_PRECISION_NS

    out: dict[str, Any] = {"precision_at": {}, "recall_at": {}, "p_at_r2": {}, "curves": {},
                           "queries_without_relevant": {}}
    requested = {int(n) for n in precision_ns}
    for name, (db_codes, db_labels) in databases.items():
        # One pass gives the contract's precision@N and the P-R curve by rank on a dense grid of ranks.
        grid = rank_grid(len(db_labels))
        evaluation = evaluate_hamming(
            query_codes, db_codes, query_labels, db_labels, ties=ties, topk=topk,
            precision_ns=tuple(sorted(requested | set(grid))),
            progress=lambda step, total, msg, _n=name: progress(step, total, f"evaluate {_n}: {msg}"),
        )
        out[f"map_{name}"] = float(evaluation.map)
        if topk is not None:
            out[f"map_at_{topk}_{name}"] = float(evaluation.map_at_k)
        out["precision_at"][name] = {str(k): float(v) for k, v in evaluation.precision_at.items() if k in requested}
        out["recall_at"][name] = {str(k): _float_or_none(v) for k, v in evaluation.recall_at.items()
                                  if k in requested}
        out["p_at_r2"][name] = float(evaluation.p_at_r2)
        out["queries_without_relevant"][name] = int(evaluation.n_queries_without_relevant)
        ns = grid
        out["curves"][name] = {
            "pr_radius": evaluation.pr_radius,
            "pr_rank": {
                "n": ns,
                "precision": [float(evaluation.precision_at[n]) for n in ns],
                "recall": [_float_or_none(evaluation.recall_at.get(n)) for n in ns],
            },
        }
    return out


def _float_or_none(value: float | None) -> float | None:
    """Recall is undefined (None) when no query has a relevant item; keep it so, never crash."""
    return None if value is None else float(value)


def evaluate(model: FittedModel, queries: DomainLike, database: DomainLike, *, query_domain: str = "target",
             database_domain: str = "target", ties: str = "expected", topk: int | None = None,
             label_base: Any = "auto", progress: ProgressFn = no_progress) -> dict[str, Any]:
    """Encode labelled ``queries`` and ``database`` with ``model`` and evaluate Hamming ranking
    (:func:`evaluate_codes`): ``map``, ``map_at_k`` (with ``topk``), ``precision_at``,
    ``recall_at``, ``p_at_r2``, ``queries_without_relevant``, plus the sizes. An item is relevant when
    it shares the query's label."""
    from crossret.retrieval.metrics import TIE_RULES

    check_domain(query_domain)
    check_domain(database_domain)
    if ties not in TIE_RULES:
        raise ConfigError(f"--ties must be one of {', '.join(TIE_RULES)}, got {ties!r}")
    if topk is not None and topk < 1:
        raise ConfigError(f"--topk must be >= 1, got {topk}")
    q = _labelled(queries, "queries", label_base, query_domain)
    d = _labelled(database, "database", label_base, database_domain)
    q_codes = model.encode(q.features, domain=query_domain)
    d_codes = model.encode(d.features, domain=database_domain)
    result = evaluate_codes(q_codes, q.labels, {"db": (d_codes, d.labels)}, ties=ties, topk=topk, progress=progress)
    out: dict[str, Any] = {"method": model.method, "bits": model.bits, "ties": ties, "topk": topk,
                           "n_queries": q.n, "n_database": d.n, "query_domain": query_domain,
                           "database_domain": database_domain, "map": result["map_db"]}
    if topk is not None:
        out["map_at_k"] = result[f"map_at_{topk}_db"]
    for key in ("precision_at", "recall_at", "p_at_r2", "queries_without_relevant"):
        out[key] = result[key]["db"]
    return out
