"""``crossret`` command line: a thin typer layer over the Python API.

Errors a user can cause are :class:`~crossret.errors.CrossretError`; they are printed to stderr
as ``error: ...`` and the command exits with status 2. ``--json`` makes the last line of stdout one
JSON object (progress bars and tables go to stderr then).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import signal
import sys
import time
from collections.abc import Iterator
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
import yaml
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from crossret.errors import ConfigError, CrossretError, DataError
from crossret.hashing.registry import available_methods
from crossret.progress import ProgressFn

if TYPE_CHECKING:
    import numpy as np

# `crossret --help` and every `crossret CMD --help` import no numpy, torch, faiss, scikit-learn, scipy or
# numba (tests/test_cli_startup.py): a command imports what it needs in its body.

app = typer.Typer(
    help="Unsupervised domain-adaptive retrieval: adapt from a labelled source to an unlabelled target "
    "(hash codes with COUPLE and baselines; text-to-image person retrieval with GCKD), evaluate, index, "
    "search and serve.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
index_app = typer.Typer(help="Build and search persistent indexes: binary (Hamming) codes, in a local file or a "
                        "Milvus collection (--backend), and GCKD galleries searched by text.", no_args_is_help=True)
app.add_typer(index_app, name="index")
gckd_app = typer.Typer(help="GCKD cross-dataset text-to-image person retrieval: synthetic data, source "
                       "pre-training, adaptation to an unlabelled target, evaluation.", no_args_is_help=True)
app.add_typer(gckd_app, name="gckd")

# Text is printed as it is: no markup, no emoji codes, no highlighting. Paths, messages and table cells
# hold user text ("[/b]", ":x:"), which rich would otherwise parse (and crash on) or replace.
out = Console(markup=False, emoji=False, highlight=False)
err = Console(stderr=True, markup=False, emoji=False, highlight=False)


class Ties(str, Enum):
    expected = "expected"
    index = "index"


class Setting(str, Enum):
    cross = "cross"
    single = "single"


class EncodeDomain(str, Enum):
    target = "target"
    source = "source"


DataDirOpt = Annotated[
    Path | None,
    typer.Option("--data-dir", help="Directory with the benchmark files (default: $CROSSRET_DATA)."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object as the last line of stdout.")]
BackendOpt = Annotated[
    str,
    typer.Option("--backend", help="Where the binary index lives: local (an index file searched in this process) or "
                 "milvus (a Milvus collection; needs the 'milvus' extra, see docs/milvus.md)."),
]
UriOpt = Annotated[
    str | None,
    typer.Option("--uri", help="--backend milvus: the server address (default: the locator file's, else "
                 "http://127.0.0.1:19530). A token is read from $CROSSRET_MILVUS_TOKEN."),
]
TiesOpt = Annotated[
    Ties,
    typer.Option(help="Tie rule for equal Hamming distances: 'expected' = exact expected AP under random "
                 "order of tied items; 'index' = ties broken by database order."),
]


def _print_error(message: str) -> None:
    """``error: MESSAGE`` on one stderr line; the message is printed literally (see ``err``)."""
    err.print(Text.assemble(("error:", "bold red"), " ", " ".join(message.split("\n"))), soft_wrap=True)


def _print_interrupted() -> None:
    err.print(Text.assemble(("interrupted", "yellow"), ": nothing after the last completed step was written"),
              soft_wrap=True)


def _caused_by_interrupt(exc: BaseException) -> bool:
    """Whether ``exc`` was raised while handling a KeyboardInterrupt (typer turns Ctrl-C into a silent
    ``Exit(130)``)."""
    seen: set[int] = set()
    stack: list[BaseException | None] = [exc.__cause__, exc.__context__]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        if isinstance(current, KeyboardInterrupt):
            return True
        seen.add(id(current))
        stack += [current.__cause__, current.__context__]
    return False


_interrupt_requested = False


def _on_interrupt(signum: int, frame: object) -> None:
    """SIGINT: remember it, then raise KeyboardInterrupt as Python's own handler does. The exception can
    be lost: raised while Python runs a C callback (numba's compiler, through llvmlite's ctypes
    callbacks), it is printed as "ignored" and the work goes on. The progress callbacks re-raise it
    (:func:`_check_interrupt`), so a long run still stops at its next step."""
    global _interrupt_requested
    _interrupt_requested = True
    raise KeyboardInterrupt


def _quiet_lost_interrupts(unraisable: Any) -> None:
    """``sys.unraisablehook``: say nothing of a KeyboardInterrupt that a C callback swallowed (the
    progress callbacks raise it again, and the run ends with the one "interrupted" line), nor, once
    Ctrl-C was pressed, of what the objects it cut short raise when they are collected (llvmlite's
    half-built ``PassBuilder`` raises AttributeError in ``__del__``). Anything else goes to Python's
    own hook."""
    if _interrupt_requested or (unraisable.exc_type is not None
                                and issubclass(unraisable.exc_type, KeyboardInterrupt)):
        return
    sys.__unraisablehook__(unraisable)


def _check_interrupt() -> None:
    """Raise KeyboardInterrupt if Ctrl-C was pressed, even if the first one was swallowed."""
    if _interrupt_requested:
        raise KeyboardInterrupt


def main() -> None:
    """Console-script entry point."""
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _on_interrupt)
        sys.unraisablehook = _quiet_lost_interrupts
    try:
        from crossret.threads import ThreadPolicy

        ThreadPolicy.from_env()  # a bad CROSSRET_THREADS* fails here, before any work
        app()
    except CrossretError as exc:
        _print_error(str(exc))
        sys.exit(2)
    except OSError as exc:
        # unwritable --out, a directory where a file is expected, a full disk, ...
        where = f" {exc.filename}" if getattr(exc, "filename", None) else ""
        _print_error(f"cannot read or write{where}: {exc.strerror or exc}")
        sys.exit(2)
    except KeyboardInterrupt:
        _print_interrupted()
        sys.exit(130)
    except SystemExit as exc:
        if exc.code == 130 and _caused_by_interrupt(exc):
            _print_interrupted()
        raise


# --------------------------------------------------------------------------- helpers
@contextlib.contextmanager
def _progress_bar(enabled: bool = True) -> Iterator[ProgressFn]:
    """A rich progress bar on stderr, exposed to library code as a ``progress(step, total, msg)``.

    Shown on a terminal only: elsewhere (a log file, a pipe) rich would draw nothing but an empty line.
    Either way the callback raises KeyboardInterrupt once Ctrl-C was pressed (see :func:`_on_interrupt`).
    """
    if not enabled or not err.is_terminal:
        def quiet(step: int, total: int, message: str = "") -> None:
            _check_interrupt()

        yield quiet
        return
    progress = Progress(
        TextColumn("{task.description}", markup=False), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(), console=err, transient=True,
    )
    task = progress.add_task("starting", total=1)

    def update(step: int, total: int, message: str = "") -> None:
        _check_interrupt()
        progress.update(task, completed=step, total=max(total, 1), description=message or "working")

    with progress:
        yield update


def _parse_overrides(items: list[str] | None) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {item!r}: cannot parse the value ({exc})") from exc
        if isinstance(parsed, str):
            # YAML 1.1 reads "1e-3" (no dot) as a string; a user writing it means the number.
            try:
                parsed = float(parsed) if parsed.strip().lower() not in ("nan", "inf", "-inf", "infinity") else parsed
            except ValueError:
                pass
        overrides[key.strip().replace("-", "_")] = parsed
    return overrides


def _int_option(value: str, name: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"{name} must be auto, 0 or 1, got {value!r}") from None


def _print_json(obj: Any) -> None:
    from crossret.storage.atomic import to_jsonable

    sys.stdout.write(json.dumps(to_jsonable(obj), separators=(",", ":")) + "\n")
    sys.stdout.flush()


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def load_npy(path: Path, what: str, **kwargs: Any) -> np.ndarray:
    """:func:`crossret.storage.safe_read.load_npy`, imported on first use (it needs numpy)."""
    from crossret.storage.safe_read import load_npy as _load

    return _load(path, what, **kwargs)


def _load_npy(path: Path, what: str) -> np.ndarray:
    return load_npy(path, what)


# options of `crossret run` that name the data; given with --config, they replace the saved data as a whole
_DATA_FIELDS = ("benchmark", "source", "target")
# metrics.json keys left out of `run --json` (they stay in the file the summary names)
_FILE_ONLY_KEYS = ("curves", "diagnostics")


def _override_saved_config(saved: Any, values: dict[str, Any], ctx: typer.Context) -> Any:
    """A saved :class:`RunConfig` with the options the user typed (not their defaults) put over it; ``--set``
    items are merged into the saved method config (which is dropped when METHOD names another method)."""
    def typed(name: str) -> bool:
        # compared by name: typer may bring its own copy of click's ParameterSource enum
        source = ctx.get_parameter_source("set_" if name == "method_config" else name)
        return getattr(source, "name", None) in ("COMMANDLINE", "ENVIRONMENT")

    given = {name for name in values if typed(name)}
    config = dataclasses.replace(saved)
    if given & set(_DATA_FIELDS):
        for name in _DATA_FIELDS:
            setattr(config, name, values[name])
    if "method" in given and values["method"] != saved.method:
        config.method_config = {}
    for name in given - set(_DATA_FIELDS):
        if name == "method_config":
            config.method_config = {**config.method_config, **values[name]}
        else:
            setattr(config, name, values[name])
    return config.validate()


def _run_summary(metrics: dict[str, Any], run_dir: Path | None) -> dict[str, Any]:
    """The ``run --json`` line: the metrics without curves and per-epoch diagnostics, and where the full
    ``metrics.json`` is."""
    summary = {key: value for key, value in metrics.items() if key not in _FILE_ONLY_KEYS}
    summary["run_dir"] = None if run_dir is None else str(run_dir)
    summary["metrics_file"] = None if run_dir is None else str(Path(run_dir) / "metrics.json")
    return summary


# --------------------------------------------------------------------------- demo
@app.command()
def demo(
    bits: Annotated[int, typer.Option(help="Code length in bits.")] = 32,
    seed: Annotated[int, typer.Option(help="Seed of the methods.")] = 0,
    out_dir: Annotated[Path | None, typer.Option("--out", help="Root of the run directories "
                                                 "(default runs/demo-<time>).")] = None,
    ties: TiesOpt = Ties.expected,
    as_json: JsonOpt = False,
) -> None:
    """Run LSH, ITQ and source-only on the always-available demo data and print a MAP table.

    The demo pairs scikit-learn's bundled handwritten digits (source) with a deterministically
    style-shifted copy of other digits (target); no files are needed.
    """
    from crossret.data import load_benchmark
    from crossret.experiment import RunConfig, run_experiment

    root = out_dir or Path("runs") / f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    split = load_benchmark("demo", None)
    rows = []
    with _progress_bar() as progress:
        for method in ("lsh", "itq", "source-only"):
            config = RunConfig(method=method, benchmark="demo", bits=bits, seed=seed, ties=ties.value,
                               out_dir=str(root / method))
            result = run_experiment(config, split=split, progress=progress, overwrite=True)
            rows.append(result.metrics)
    summary = {
        "benchmark": "demo", "bits": bits, "seed": seed, "ties": ties.value,
        "split_seed": split.protocol.get("split_seed"), "run_root": str(root),
        "results": [{k: m[k] for k in ("method", "map_cross", "map_single", "p_at_r2", "train_seconds")}
                    for m in rows],
    }
    if as_json:
        _print_json(summary)
        return
    table = Table(title=f"crossret demo — {bits} bits, % (MAP@all, ties: {ties.value})")
    for column in ("method", "MAP cross", "MAP single", "P@100 cross", "P(r≤2) cross", "train s"):
        table.add_column(column, justify="left" if column == "method" else "right")
    for m in rows:
        table.add_row(m["method"], _pct(m["map_cross"]), _pct(m["map_single"]),
                      _pct(m["precision_at"]["cross"].get("100")), _pct(m["p_at_r2"]["cross"]),
                      f"{m['train_seconds']:.2f}")
    out.print(table)
    protocol = split.protocol
    out.print(
        f"source {split.source.n} items, target train {split.target_train.n}, queries {split.queries.n} "
        f"(split seed {protocol.get('split_seed')}). Cross-domain: target queries vs source; "
        f"single-domain: target queries vs target train. Run directories: {root}"
    )


# --------------------------------------------------------------------------- benchmarks
@app.command()
def benchmarks(data_dir: DataDirOpt = None, as_json: JsonOpt = False) -> None:
    """List the named benchmarks and whether their data files are present."""
    from crossret.data import list_benchmarks, resolve_data_dir

    resolved = resolve_data_dir(data_dir)
    infos = list_benchmarks(resolved)
    if as_json:
        _print_json({"data_dir": str(resolved) if resolved else None,
                     "benchmarks": [{"name": i.name, "family": i.family, "present": i.present,
                                     "files": [str(f) for f in i.files]} for i in infos]})
        return
    table = Table(title=f"benchmarks (data dir: {resolved or 'not set — use --data-dir or CROSSRET_DATA'})")
    table.add_column("name")
    table.add_column("family")
    table.add_column("data")
    table.add_column("files")
    for info in infos:
        presence = Text("present", style="green") if info.present else Text("absent", style="red")
        table.add_row(info.name, info.family, presence, ", ".join(str(f) for f in info.files) or "(built in)")
    out.print(table)


# --------------------------------------------------------------------------- fit / encode / evaluate options
SourceLabelBaseOpt = Annotated[str | None, typer.Option(help="Labels of --source are 0- or 1-based (0, 1) or "
                                                        "'auto' (default: --label-base).")]
TargetLabelBaseOpt = Annotated[str | None, typer.Option(help="Labels of --target are 0- or 1-based (0, 1) or "
                                                        "'auto' (default: --label-base).")]
AllowMismatchOpt = Annotated[bool, typer.Option(help="Go on when source and target labels share fewer than half "
                                                "of the source classes (or none).")]


def _label_base(value: str | None, option: str) -> str | int | None:
    """``--*-label-base`` as RunConfig/fit take it: ``None`` (not given), ``"auto"``, 0 or 1."""
    if value is None or value == "auto":
        return value
    base = _int_option(value, option)
    if base not in (0, 1):
        raise ConfigError(f"{option} must be auto, 0 or 1, got {value!r}")
    return base


# --------------------------------------------------------------------------- run
@app.command()
def run(
    ctx: typer.Context,
    method: Annotated[str | None, typer.Argument(help="Method: " + ", ".join(available_methods()) + " (taken from "
                                                 "--config when left out).")] = None,
    bits: Annotated[int | None, typer.Option(help="Code length in bits (1 to 65536); required unless --config.")]
    = None,
    config_file: Annotated[Path | None, typer.Option("--config", help="Run again from a saved run: RUN_DIR or "
                                                     "RUN_DIR/config.yaml. Options given here override its values "
                                                     "(--set adds to its method config).")] = None,
    benchmark: Annotated[str | None, typer.Option(help="Named benchmark (see `crossret benchmarks`).")] = None,
    source: Annotated[Path | None, typer.Option(help="Source domain file (labelled).")] = None,
    target: Annotated[Path | None, typer.Option(help="Target domain file (labels used for evaluation only).")]
    = None,
    seed: Annotated[int, typer.Option(help="Seed of the method.")] = 0,
    split_seed: Annotated[int, typer.Option(help="Seed of the query/train split of the target.")] = 313,
    n_queries: Annotated[int | None, typer.Option(help="Custom domains: number of target queries "
                                                  "(default: --query-fraction).")] = None,
    query_fraction: Annotated[float, typer.Option(help="Custom domains: fraction of the target used as "
                                                  "queries.")] = 0.1,
    label_base: Annotated[str, typer.Option(help="Custom domains: labels are 0- or 1-based (0, 1) or 'auto' "
                                            "(decided once for the pair).")] = "auto",
    source_label_base: SourceLabelBaseOpt = None,
    target_label_base: TargetLabelBaseOpt = None,
    allow_class_mismatch: AllowMismatchOpt = False,
    data_dir: DataDirOpt = None,
    out_dir: Annotated[Path | None, typer.Option("--out", help="Run directory (default runs/<name>-<time>).")]
    = None,
    ties: TiesOpt = Ties.expected,
    topk: Annotated[int | None, typer.Option(help="Also report MAP@k (normalised by relevant items "
                                             "retrieved in the top k).")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Method config override KEY=VALUE "
                                                   "(repeatable).")] = None,
    plots: Annotated[bool, typer.Option("--plots", help="Write P-R and precision@N plots (PNG).")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace the crossret run in --out (finished or interrupted) once "
                                            "the new one has finished.")] = False,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted run in --out from its last checkpoint "
                                         "(methods that checkpoint, e.g. couple; same options required).")]
    = False,
    device: Annotated[str, typer.Option(help="Where torch methods (source-only, couple) train and encode: cpu "
                                        "or cuda.")] = "cpu",
    as_json: JsonOpt = False,
) -> None:
    """Train METHOD on a benchmark (or --source/--target files), evaluate, write a run directory.

    COUPLE checkpoints every epoch into DIR/checkpoints; after an interruption, run the same
    command with --out DIR --resume. With --config RUN_DIR the saved run is run again (same data,
    split, seeds and resolved method config) into a new --out.
    """
    from crossret.experiment import RunConfig, default_run_dir, load_run_config, run_experiment

    values: dict[str, Any] = dict(
        method=method, bits=bits, seed=seed, benchmark=benchmark,
        source=str(source) if source else None, target=str(target) if target else None,
        data_dir=str(data_dir) if data_dir else None, split_seed=split_seed, n_queries=n_queries,
        query_fraction=query_fraction, label_base=label_base if label_base == "auto" else _int_option(
            label_base, "--label-base"), ties=ties.value, topk=topk, method_config=_parse_overrides(set_),
        plots=plots, source_label_base=_label_base(source_label_base, "--source-label-base"),
        target_label_base=_label_base(target_label_base, "--target-label-base"),
        allow_class_mismatch=allow_class_mismatch,
    )
    if config_file is not None:
        config = _override_saved_config(load_run_config(config_file), values, ctx)
    elif method is None or bits is None:
        raise ConfigError("give METHOD and --bits (or --config RUN_DIR to run a saved run again)")
    else:
        config = RunConfig(**values).validate()
    if resume and out_dir is None:
        raise ConfigError("--resume needs the run directory of the interrupted run (--out DIR)")
    config.out_dir = str(out_dir) if out_dir else default_run_dir(config)
    with _progress_bar() as progress:
        result = run_experiment(config, progress=progress, overwrite=overwrite, resume=resume,
                                command=list(sys.argv), device=device)
    metrics = result.metrics
    if as_json:
        _print_json(_run_summary(metrics, result.run_dir))
        return
    method, bits, topk = config.method, config.bits, config.topk
    table = Table(title=f"{method} on {config.benchmark_label}, {bits} bits (ties: {config.ties})")
    for column in ("retrieval", "MAP@all %", *( [f"MAP@{topk} %"] if topk else []), "P@100 %", "P(r<=2) %",
                   "queries w/o relevant"):
        table.add_column(column, justify="left" if column == "retrieval" else "right")
    for setting, label in (("cross", "cross-domain (db = source)"), ("single", "single-domain (db = target)")):
        extra = [_pct(metrics[f"map_at_{topk}_{setting}"])] if topk else []
        table.add_row(label, _pct(metrics[f"map_{setting}"]), *extra,
                      _pct(metrics["precision_at"][setting].get("100")), _pct(metrics["p_at_r2"][setting]),
                      str(metrics["queries_without_relevant"][setting]))
    out.print(table)
    out.print(f"train {metrics['train_seconds']:.2f}s, encode {metrics['encode_seconds']:.2f}s; "
              f"run directory: {result.run_dir}")


# --------------------------------------------------------------------------- fit / encode / evaluate
def _domain_option(value: str, option: str) -> str:
    """A ``--*domain`` value: target or source (a one-line error otherwise)."""
    if value not in ("target", "source"):
        raise ConfigError(f"{option} must be target or source, got {value!r}")
    return value


@app.command()
def fit(
    method: Annotated[str, typer.Argument(help="Method: lsh, itq, source-only or couple.")],
    source: Annotated[Path, typer.Option(help="Source domain file (labelled for source-only and couple; lsh and "
                                         "itq need no labels).")],
    target: Annotated[Path, typer.Option(help="Target domain file; features alone are enough (.npz with "
                                         "'features', a 2-D .npy, or any format); its labels are never used.")],
    bits: Annotated[int, typer.Option(help="Code length in bits (1 to 65536).")],
    out_dir: Annotated[Path, typer.Option("--out", help="Model directory to write.")],
    seed: Annotated[int, typer.Option(help="Seed of the method.")] = 0,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Method config override KEY=VALUE "
                                                   "(repeatable).")] = None,
    device: Annotated[str, typer.Option(help="Where torch methods (source-only, couple) train: cpu or "
                                        "cuda.")] = "cpu",
    label_base: Annotated[str, typer.Option(help="Labels of both files are 0- or 1-based (0, 1) or 'auto' "
                                            "(decided once for the pair).")] = "auto",
    source_label_base: SourceLabelBaseOpt = None,
    target_label_base: TargetLabelBaseOpt = None,
    allow_class_mismatch: AllowMismatchOpt = False,
    overwrite: Annotated[bool, typer.Option(help="Replace the crossret model directory in --out.")] = False,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted fit in --out from its last checkpoint "
                                         "(methods that checkpoint: couple; same options required).")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Adapt METHOD from --source to an unlabelled --target and write a model directory (no evaluation).

    The model directory holds config.yaml, the model (model.npz / model.pt), run.log and diagnostics.json;
    use it with `crossret encode` and `crossret evaluate`.
    """
    from crossret.model import fit as fit_model

    base = _label_base(label_base, "--label-base")
    with _progress_bar(not as_json) as progress:
        model = fit_model(method, source, target, bits=bits, seed=seed, config=_parse_overrides(set_),
                          out=out_dir, device=device,
                          source_label_base=_label_base(source_label_base, "--source-label-base") or base,
                          target_label_base=_label_base(target_label_base, "--target-label-base") or base,
                          allow_class_mismatch=allow_class_mismatch, overwrite=overwrite, resume=resume,
                          progress=progress)
    summary = {"model_dir": str(out_dir), "method": model.method, "bits": model.bits, "seed": seed,
               "input_dim": model.input_dim, "n_source": model.config["n_source"],
               "n_target": model.config["n_target"]}
    if as_json:
        _print_json(summary)
        return
    out.print(f"wrote {out_dir}: {model.method}, {model.bits} bits, fitted on {summary['n_source']} source and "
              f"{summary['n_target']} target items (target labels not used)")


@app.command()
def encode(
    model_dir: Annotated[Path, typer.Argument(help="Model directory written by `crossret fit` (or a finished "
                                              "`crossret run` directory).")],
    features: Annotated[Path, typer.Option("--input", help="Features to encode: a 2-D .npy (memory-mapped, may "
                                           "exceed memory) or any supported feature file.")],
    output: Annotated[Path, typer.Option("--out", help="Codes .npy to write (plus OUT.json with the code "
                                         "length).")],
    domain: Annotated[str, typer.Option(help="Where the features come from: target (the adapted domain) or "
                                        "source.")] = "target",
    packed: Annotated[bool, typer.Option("--packed", help="Write packed uint8 codes (faiss bit order) instead of "
                                         "±1 int8 rows.")] = False,
    batch_size: Annotated[int, typer.Option(help="Rows encoded per batch (memory is O(batch)).")] = 65_536,
    shape: Annotated[str | None, typer.Option(help="Raw binary feature file: N,D (rows, dimensions).")] = None,
    dtype: Annotated[str, typer.Option(help="Raw binary feature file: element type.")] = "float32",
    overwrite: Annotated[bool, typer.Option(help="Replace --out when it holds crossret codes (other files are "
                                            "never replaced).")] = False,
    device: Annotated[str, typer.Option(help="Where torch models (source-only, couple) encode: cpu or cuda.")]
    = "cpu",
    as_json: JsonOpt = False,
) -> None:
    """Encode features with a fitted model into hash codes, batch by batch.

    The output appears only when every batch succeeded; rows with NaN/inf stop it with an error naming them.
    """
    _encode_features(model_dir, features, output, domain=domain, packed=packed, batch_size=batch_size,
                     shape=shape, dtype=dtype, overwrite=overwrite, as_json=as_json, option="MODEL_DIR",
                     device=device)


def _encode_features(model_dir: Path, features: Path, output: Path, *, domain: str, packed: bool, batch_size: int,
                     shape: str | None, dtype: str, overwrite: bool, as_json: bool, option: str,
                     device: str = "cpu") -> None:
    """What `crossret encode` and `crossret index encode` do: one code path."""
    import numpy as np

    from crossret.model import load
    from crossret.runs import run_kind

    domain = _domain_option(domain, "--domain")
    if run_kind(model_dir) == "gckd":
        raise ConfigError(f"{option} {model_dir} holds a gckd run: a GCKD run's model encodes captions and images, "
                          "not feature files; index its gallery with `crossret index build --run RUN --gallery DATA` "
                          "and search it with --text")
    raw_shape = None
    if shape is not None:
        try:
            raw_shape = tuple(int(v) for v in shape.split(","))
        except ValueError:
            raise ConfigError(f"--shape expects N,D (two integers), got {shape!r}") from None
        if len(raw_shape) != 2:
            raise ConfigError(f"--shape expects N,D (two integers), got {shape!r}")
    try:
        np.dtype(dtype)
    except TypeError:
        raise ConfigError(f"--dtype: unknown numpy dtype {dtype!r}") from None
    try:
        model = load(model_dir, device=device)
    except DataError as exc:
        raise DataError(f"{option}: {exc}" if option.startswith("--") else str(exc)) from None
    with _progress_bar(not as_json) as progress:
        result = model.encode_file(features, output, domain=domain, packed=packed, batch_size=batch_size,
                                   overwrite=overwrite, shape=raw_shape, dtype=dtype, progress=progress)
    summary = {"out": str(result.path), "n": result.n, "bits": result.bits, "bytes_per_code": result.width,
               "packed": packed, "method": model.method, "domain": domain, "seconds": round(result.seconds, 3)}
    if as_json:
        _print_json(summary)
        return
    rate = result.n / result.seconds if result.seconds > 0 else float("inf")
    out.print(f"wrote {output}: {result.n} {'packed ' if packed else '±1 '}codes, {result.bits} bits "
              f"({model.method}, {domain} domain) in {result.seconds:.2f}s ({rate:,.0f} rows/s); code length in "
              f"{output.name}.json")


@app.command()
def evaluate(
    model_dir: Annotated[Path, typer.Argument(help="Model directory written by `crossret fit`.")],
    queries: Annotated[Path, typer.Option(help="Labelled query feature file.")],
    database: Annotated[Path, typer.Option(help="Labelled database feature file.")],
    query_domain: Annotated[str, typer.Option(help="Domain of the queries: target or source (COUPLE centres "
                                              "each domain on its own mean).")] = "target",
    database_domain: Annotated[str, typer.Option(help="Domain of the database: target, or source for "
                                                 "cross-domain retrieval.")] = "target",
    label_base: Annotated[str, typer.Option(help="Labels are 0- or 1-based (0, 1) or 'auto'.")] = "auto",
    ties: TiesOpt = Ties.expected,
    topk: Annotated[int | None, typer.Option(help="Also report MAP@k.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Encode labelled queries and database with a fitted model and evaluate retrieval (MAP, precision@N)."""
    from crossret.model import load

    query_domain = _domain_option(query_domain, "--query-domain")
    database_domain = _domain_option(database_domain, "--database-domain")
    model = load(model_dir)
    with _progress_bar(not as_json) as progress:
        result = model.evaluate(queries, database, query_domain=query_domain,
                                database_domain=database_domain, ties=ties.value, topk=topk,
                                label_base=_label_base(label_base, "--label-base"), progress=progress)
    if as_json:
        _print_json(result)
        return
    _print_retrieval_table(f"{model.method}, {model.bits} bits: {result['n_queries']} queries x "
                           f"{result['n_database']} items (ties: {ties.value})", result["map"],
                           (f"MAP@{topk} %", result["map_at_k"]) if topk is not None else None,
                           {int(n): v for n, v in result["precision_at"].items()}, result["p_at_r2"],
                           result["queries_without_relevant"])


def _print_retrieval_table(title: str, map_all: float, map_at_k: tuple[str, float] | None,
                           precision_at: dict[int, float], p_at_r2: float, without_relevant: int) -> None:
    """The metric table `evaluate` and `eval-codes` print."""
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("MAP@all %", _pct(map_all))
    if map_at_k is not None:
        table.add_row(map_at_k[0], _pct(map_at_k[1]))
    for n, value in sorted(precision_at.items()):
        table.add_row(f"precision@{n} %", _pct(value))
    table.add_row("precision within radius 2 %", _pct(p_at_r2))
    table.add_row("queries without a relevant item (AP 0)", str(without_relevant))
    out.print(table)


# --------------------------------------------------------------------------- eval-codes
@app.command("eval-codes")
def eval_codes(
    query_codes: Annotated[Path, typer.Option(help=".npy of query codes (±1 or 0/1), one row per item.")],
    db_codes: Annotated[Path, typer.Option(help=".npy of database codes (±1 or 0/1).")],
    query_labels: Annotated[Path, typer.Option(help=".npy of integer query labels.")],
    db_labels: Annotated[Path, typer.Option(help=".npy of integer database labels.")],
    ties: TiesOpt = Ties.expected,
    topk: Annotated[int | None, typer.Option(help="Also report MAP@k.")] = None,
    bits: Annotated[int | None, typer.Option(help="Code length, when the code files hold packed uint8 codes "
                                             "(faiss bit order).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Evaluate given hash codes: MAP@all (and MAP@k), precision@N, precision within radius 2.

    Code files hold ±1 or 0/1 values, one row per item (or packed uint8 rows with --bits).
    """
    from crossret.retrieval.metrics import evaluate_hamming

    arrays = {name: _load_npy(path, f"--{name.replace('_', '-')}") for name, path in
              (("query_codes", query_codes), ("db_codes", db_codes), ("query_labels", query_labels),
               ("db_labels", db_labels))}
    with _progress_bar() as progress:
        evaluation = evaluate_hamming(arrays["query_codes"], arrays["db_codes"], arrays["query_labels"],
                                      arrays["db_labels"], bits=bits, ties=ties.value, topk=topk,
                                      progress=progress)
    result = evaluation.to_dict()
    result["map_definition"] = (f"mean over queries of AP over the whole ranking; ties: {ties.value}"
                                + (f"; map_at_k normalised by relevant items in the top {topk}" if topk else ""))
    if topk is not None:
        result["map_at_k"] = evaluation.map_at_k
    if as_json:
        _print_json(result)
        return
    _print_retrieval_table(f"{evaluation.n_queries} queries x {evaluation.n_database} items, {evaluation.bits} bits "
                           f"(ties: {ties.value})", evaluation.map,
                           (f"MAP@{topk} % (normalised by relevant in top {topk})", evaluation.map_at_k)
                           if topk is not None else None, dict(evaluation.precision_at), evaluation.p_at_r2,
                           evaluation.n_queries_without_relevant)


# --------------------------------------------------------------------------- report
@app.command()
def report(
    run_dirs: Annotated[list[Path], typer.Argument(metavar="RUN_DIR", help="Finished run directories: one, or "
                                                   "several to overlay (e.g. runs/*).", show_default=False)],
    out_dir: Annotated[Path | None, typer.Option("--out", help="Where to write PNGs (default RUN_DIR/plots for one "
                                                 "run; required for several).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace plots crossret wrote there before (other files are never "
                                            "replaced).")] = False,
) -> None:
    """Write plots of finished runs as PNG.

    One run: P-R (by Hamming radius and by rank) and precision@N plots.

    Several runs of one data set (--out required): P-R by rank and precision@N, one curve per group of
    runs that differ only in the seed (mean over seeds), and MAP vs bits (error bars: std over seeds).
    """
    from crossret.runs import check_output_file

    if len(run_dirs) == 1:
        from crossret.experiment import read_run_metrics
        from crossret.report.plots import run_plot_files, write_run_plots
        from crossret.runs import run_file

        metrics = read_run_metrics(run_dirs[0])
        target = out_dir or run_file(run_dirs[0], "plots")
        for path in run_plot_files(metrics, target):
            check_output_file(path, "plot", overwrite=overwrite)
        paths = write_run_plots(metrics, target)
    else:
        if out_dir is None:
            raise ConfigError(f"a report of {len(run_dirs)} runs needs --out DIR for its plots; pass --out (or give "
                              "one run to write into RUN_DIR/plots)")
        from crossret.report.overlay import draw_overlay_plot, plan_overlay_plots
        from crossret.report.table import group_runs

        plots = plan_overlay_plots(group_runs(run_dirs), out_dir)
        for plot in plots:
            check_output_file(plot.path, "plot", overwrite=overwrite)
        paths = [draw_overlay_plot(plot).path for plot in plots]
    for path in paths:
        out.print(str(path), soft_wrap=True)  # one path a line, however long


# --------------------------------------------------------------------------- table
class TableFormat(str, Enum):
    md = "md"
    csv = "csv"
    json = "json"


@app.command("table")
def table_command(
    run_dirs: Annotated[list[Path], typer.Argument(help="Finished run directories (e.g. runs/*).")],
    fmt: Annotated[TableFormat, typer.Option("--format", help="md (Markdown table), csv, or json (one line: an "
                                             "array with one object per group).")] = TableFormat.md,
) -> None:
    """MAP mean ± std over seeds of finished runs, grouped by data, method, bits and configuration.

    Runs that differ only in --seed form one group; std is the sample standard deviation (ddof=1), 0 for
    a group of one run.
    """
    from crossret.report.table import format_table, summarize_runs

    sys.stdout.write(format_table(summarize_runs(run_dirs), fmt.value) + "\n")
    sys.stdout.flush()


# --------------------------------------------------------------------------- warmup
@app.command()
def warmup(as_json: JsonOpt = False) -> None:
    """Compile every numba kernel once into the user cache, so that later commands start fast.

    Run it once after installing or upgrading crossret. The cache is $NUMBA_CACHE_DIR when set, else
    $CROSSRET_CACHE_DIR/numba, $XDG_CACHE_HOME/crossret/numba or ~/.cache/crossret/numba.
    """
    from crossret.kernel_cache import configure_numba_cache
    from crossret.warmup import KERNEL_GROUPS, compile_kernels

    cache_dir = configure_numba_cache()
    with _progress_bar(not as_json) as progress:
        seconds = compile_kernels(progress=progress)
    if as_json:
        _print_json({"seconds": seconds, "total_seconds": sum(seconds.values()),
                     "cache_dir": str(cache_dir) if cache_dir else None})
        return
    table = Table(title=f"numba kernels ({len(KERNEL_GROUPS)} groups)",
                  caption=f"cache: {cache_dir or 'numba default (beside the source)'}")
    table.add_column("kernel group")
    table.add_column("seconds", justify="right")
    for name, value in seconds.items():
        table.add_row(name, f"{value:.2f}")
    table.add_row("total", f"{sum(seconds.values()):.2f}")
    out.print(table)


# --------------------------------------------------------------------------- index
@index_app.command("build")
def index_build(
    output: Annotated[Path, typer.Option("--out", help="Index file to write.")],
    codes: Annotated[Path | None, typer.Option(help=".npy of database codes (±1 or 0/1, or packed uint8 "
                                               "with --bits).")] = None,
    run_dir: Annotated[Path | None, typer.Option("--run", help="Take the database codes from a run "
                                                 "directory.")] = None,
    database: Annotated[Setting, typer.Option(help="With --run: cross = source codes, single = target-train "
                                              "codes.")] = Setting.cross,
    bits: Annotated[int | None, typer.Option(help="Code length of packed uint8 codes (read from the "
                                             "codes.npy.json sidecar that `index encode` writes).")] = None,
    kind: Annotated[str, typer.Option(help="flat | ivf | hnsw | multihash | a faiss binary factory string "
                                      "(see docs/scale.md).")] = "flat",
    param: Annotated[list[str] | None, typer.Option("--param", help="Index parameter KEY=VALUE, e.g. nlist=1024, "
                                                    "nprobe=16, M=32, efSearch=64, nhash=4, b=16, nflip=1 "
                                                    "(repeatable).")] = None,
    ids: Annotated[Path | None, typer.Option(help=".npy of int64 item ids (default 0..N-1).")] = None,
    batch_size: Annotated[int, typer.Option(help="Codes added per batch.")] = 1 << 20,
    train_size: Annotated[int | None, typer.Option(help="IVF: codes in the seeded training sample "
                                                   "(default 64 per list).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the IVF training sample.")] = 0,
    overwrite: Annotated[bool, typer.Option(help="Replace --out when it is a crossret index (other files are never "
                                            "replaced).")] = False,
    gallery: Annotated[Path | None, typer.Option(help="With --run GCKD_RUN: index the gallery images of this person "
                                                 "dataset folder (text-to-image search).")] = None,
    split: Annotated[str, typer.Option(help="With --gallery: the dataset split whose images are the "
                                       "gallery.")] = "test",
    device: Annotated[str, typer.Option(help="With --gallery: torch device that encodes the images.")] = "cpu",
    backend: BackendOpt = "local",
    uri: UriOpt = None,
    collection: Annotated[str | None, typer.Option(help="--backend milvus: name of the new collection (default: a "
                                                   "fresh crossret_<hex> name). With --overwrite a collection of "
                                                   "this name that crossret made is replaced.")] = None,
) -> None:
    """Build a binary index from codes and save it (atomic write, checksummed).

    Packed uint8 codes (e.g. from `crossret index encode`) are memory-mapped and added in batches.
    With --backend milvus the codes go to a new Milvus collection (kind flat or ivf) and --out gets a
    small locator file naming it, which `crossret index search` and `crossret serve` open.
    With a GCKD run and --gallery: a dense (inner-product) index of the gallery images' ITC embeddings
    (kind flat or hnsw), searched with `crossret index search --text`.
    """
    from crossret.retrieval.backend import build_index, check_backend
    from crossret.retrieval.packing import as_packed
    from crossret.runs import check_output_file, run_file

    check_backend(backend)
    options = _backend_options(backend, uri, collection)
    if (codes is None) == (run_dir is None):
        raise ConfigError("give exactly one of --codes FILE or --run RUN_DIR")
    if backend != "local" and gallery is not None:
        raise ConfigError(f"--gallery builds a GCKD gallery index, which is a local file; drop --backend {backend}")
    if _gckd_index_build(output, run_dir, gallery, split, kind, param, bits, ids, device, overwrite):
        return
    check_output_file(output, "index", overwrite=overwrite)
    if run_dir is not None:
        name = "source" if database is Setting.cross else "target_train"
        codes = run_file(run_dir, "codes", f"{name}_codes.npy")
    assert codes is not None
    params = _index_params(param)
    source: Any = _packed_codes_file(codes, bits)
    if source is None:  # ±1 / {0,1} codes: small enough to load and pack in memory
        source, bits = as_packed(_load_npy(codes, "--codes"), bits, name="--codes", origin="cli")
    if backend == "milvus":
        options["overwrite"] = "crossret" if overwrite else False
    with _progress_bar() as progress:
        index = build_index(source, bits, kind, backend=backend, params=params, batch_size=batch_size,
                            train_size=train_size, seed=seed, ids=_load_npy(ids, "--ids") if ids else None,
                            progress=progress, **options)
    try:
        index.save(output)
    finally:
        index.close()
    where = f"Milvus collection {index.collection} at {index.uri}, " if backend == "milvus" else ""
    out.print(f"wrote {output}: {where}{index.ntotal} codes, {index.bits} bits, kind {kind} {index.params or ''}")


@index_app.command("search")
def index_search(
    ctx: typer.Context,
    index_file: Annotated[Path | None, typer.Argument(help="Index file written by `crossret index build` (with "
                                                      "--backend milvus: the locator file it wrote, or leave it out "
                                                      "and give --collection).")] = None,
    queries: Annotated[Path | None, typer.Option(help=".npy of query codes (±1 or 0/1, or packed "
                                                 "uint8).")] = None,
    k: Annotated[int, typer.Option("-k", "--k", help="Neighbours per query.")] = 10,
    save: Annotated[Path | None, typer.Option(help="Write distances and ids to this .npz.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace --save when it holds crossret search results (other files "
                                            "are never replaced).")] = False,
    as_json: JsonOpt = False,
    run_dir: Annotated[Path | None, typer.Option("--run", help="With --text/--text-file: the GCKD run whose model "
                                                 "encodes the captions (the one the gallery index was built "
                                                 "with).")] = None,
    text: Annotated[list[str] | None, typer.Option("--text", help="A caption to search the gallery index with "
                                                   "(repeatable).")] = None,
    text_file: Annotated[Path | None, typer.Option(help="A UTF-8 file of captions, one per line (blank lines "
                                                   "skipped).")] = None,
    device: Annotated[str, typer.Option(help="With --text: torch device that encodes the captions.")] = "cpu",
    backend: BackendOpt = "local",
    uri: UriOpt = None,
    collection: Annotated[str | None, typer.Option(help="--backend milvus: the collection to search (instead of "
                                                   "the one the locator file names).")] = None,
) -> None:
    """Search an index: the k nearest codes (Hamming) of every query, or, for a GCKD gallery index,
    the k best images (ITC score) of every caption (--run, --text / --text-file)."""
    import numpy as np

    from crossret.retrieval.backend import check_backend, open_index, refuse_locator
    from crossret.retrieval.packing import as_packed
    from crossret.runs import check_output_file
    from crossret.storage.atomic import atomic_open

    check_backend(backend)
    options = _backend_options(backend, uri, collection)
    if backend == "local" and index_file is None:
        ctx.fail("Missing argument 'index_file'.")  # the usage error typer gave while the argument was required
    if backend != "local" and (text or text_file is not None or run_dir is not None):
        raise ConfigError(f"--backend {backend} searches binary codes (--queries); captions (--run, --text, "
                          "--text-file) search a local GCKD gallery index")
    if backend == "local":
        assert index_file is not None
        refuse_locator(index_file)
        if _gckd_index_search(index_file, queries, run_dir, text, text_file, k, save, device, as_json):
            return
    if queries is None:
        raise ConfigError("give --queries Q.npy (query codes) to search a binary index")
    if save is not None:
        check_output_file(save, "search", overwrite=overwrite, option="--save")
    index = open_index(index_file, backend=backend, **options)
    try:
        packed, _ = as_packed(_load_npy(queries, "--queries"), index.bits, name="--queries", origin="cli")
        from crossret.threads import use_threads

        with use_threads("search"):
            distances, ids = index.search(packed, k)
    finally:
        index.close()
    if save is not None:
        with atomic_open(save, "wb") as handle:
            np.savez(handle, distances=distances, ids=ids)
    if as_json:
        _print_json({"k": k, "bits": index.bits, "ntotal": index.ntotal,
                     "distances": distances.tolist(), "ids": ids.tolist()})
        return
    table = Table(title=f"{len(ids)} queries, top {k} of {index.ntotal} ({index.bits} bits)")
    table.add_column("query", justify="right")
    table.add_column("ids (distance)")
    shown = min(len(ids), 20)
    for q in range(shown):
        table.add_row(str(q), "  ".join(f"{i} ({d})" for i, d in zip(ids[q], distances[q], strict=True)))
    out.print(table)
    if shown < len(ids):
        out.print(f"... {len(ids) - shown} more queries (use --json or --save for all)")


@index_app.command("encode")
def index_encode(
    run_dir: Annotated[Path, typer.Option("--run", help="Run directory whose fitted model (model.npz / model.pt) "
                                          "encodes the features.")],
    features: Annotated[Path, typer.Option(help="Feature matrix: .npy (memory-mapped, may exceed RAM) or a raw "
                                           "binary file with --shape.")],
    output: Annotated[Path, typer.Option("--out", help="Packed codes .npy to write (plus OUT.json with the code "
                                         "length).")],
    batch_size: Annotated[int, typer.Option(help="Rows encoded per batch (memory is O(batch)).")] = 65_536,
    shape: Annotated[str | None, typer.Option(help="Raw feature file: N,D (rows, dimensions).")] = None,
    dtype: Annotated[str, typer.Option(help="Raw feature file: element type.")] = "float32",
    domain: Annotated[EncodeDomain, typer.Option(help="Which domain the features come from: target (queries, new "
                                                 "data of the adapted domain) or source (e.g. a labelled source "
                                                 "database). COUPLE centres each domain on its own mean; other "
                                                 "methods give the same codes for both.")] = EncodeDomain.target,
    overwrite: Annotated[bool, typer.Option(help="Replace --out when it holds crossret packed codes (other files are "
                                            "never replaced).")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Encode a (large) feature file with a run's model into packed codes: `crossret encode RUN --packed`."""
    _encode_features(run_dir, features, output, domain=domain.value, packed=True, batch_size=batch_size, shape=shape,
                     dtype=dtype, overwrite=overwrite, as_json=as_json, option="--run")


@index_app.command("recall")
def index_recall(
    index_file: Annotated[Path, typer.Argument(help="Approximate index (ivf, hnsw, multihash, ...).")],
    exact: Annotated[Path, typer.Option(help="Exact flat index over the same codes.")],
    queries: Annotated[Path, typer.Option(help=".npy of query codes (±1 or 0/1, or packed uint8).")],
    k: Annotated[int, typer.Option("-k", "--k", help="Neighbours per query.")] = 10,
    param: Annotated[list[str] | None, typer.Option("--param", help="Search parameter of INDEX_FILE, e.g. "
                                                    "nprobe=32, efSearch=128, nflip=2 (repeatable).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Recall@k of an approximate index against the exact flat index, and its query speed.

    An item as close as the exact k-th neighbour counts as a hit (ties at the k-th distance are not misses).
    """
    from crossret.retrieval.index import BinaryIndex
    from crossret.retrieval.streaming import recall_at_k

    index, reference = BinaryIndex.load(index_file), BinaryIndex.load(exact)
    if param:
        index.set_params(**_index_params(param))
    from crossret.retrieval.packing import as_packed

    packed, _ = as_packed(_load_npy(queries, "--queries"), index.bits, name="--queries", origin="cli")
    t0 = time.perf_counter()
    index.search(packed, k)
    seconds = time.perf_counter() - t0
    recall = recall_at_k(index, reference, packed, k)
    summary = {"k": k, "recall": recall, "queries": len(packed), "ntotal": index.ntotal, "kind": index.kind,
               "params": index.params, "queries_per_second": len(packed) / seconds if seconds > 0 else None}
    if as_json:
        _print_json(summary)
        return
    out.print(f"recall@{k} = {recall:.4f} ({index.kind} {index.params}, {len(packed)} queries, "
              f"{summary['queries_per_second'] or float('inf'):,.0f} queries/s)")


def _index_params(items: list[str] | None) -> dict[str, Any]:
    """``--param KEY=VALUE`` items -> integer index parameters (BinaryIndex checks names and ranges)."""
    params = _parse_overrides(items)
    for key, value in params.items():
        if isinstance(value, float) and value.is_integer():
            params[key] = int(value)
        elif isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"--param {key}: index parameters are integers, got {value!r}")
    return params


def _backend_options(backend: str, uri: str | None, collection: str | None) -> dict[str, Any]:
    """``--uri``/``--collection`` (and ``$CROSSRET_MILVUS_TOKEN``) as options of the milvus backend; both are
    refused with another backend."""
    import os

    if backend != "milvus":
        given = [name for name, value in (("--uri", uri), ("--collection", collection)) if value is not None]
        if given:
            raise ConfigError(f"{' and '.join(given)} apply to --backend milvus, not --backend {backend}")
        return {}
    options: dict[str, Any] = {}
    if uri is not None:
        options["uri"] = uri
    if collection is not None:
        options["collection"] = collection
    token = os.environ.get("CROSSRET_MILVUS_TOKEN")
    if token:
        options["token"] = token  # never a command-line option: it would show in the process list
    return options


def _packed_codes_file(path: Path, bits: int | None) -> Path | None:
    """``path`` when it holds packed uint8 codes to stream (it has a sidecar, or ``bits`` says the rows
    are packed); ``None`` for ±1 / {0,1} code files."""
    import numpy as np

    from crossret.retrieval.streaming import sidecar_path

    array = load_npy(path, "--codes", mmap=True)
    if array.dtype != np.uint8 or array.ndim != 2:
        return None
    if sidecar_path(path).is_file() or (bits is not None and array.shape[1] != bits):
        return path
    return None


# --------------------------------------------------------------------------- gckd gallery indexes
def _gckd_index_build(output: Path, run_dir: Path | None, gallery: Path | None, split: str, kind: str,
                      param: list[str] | None, bits: int | None, ids: Path | None, device: str,
                      overwrite: bool) -> bool:
    """``index build`` for a GCKD run (a gallery index); False when the run is not a GCKD run."""
    from crossret.runs import check_output_file, run_kind

    if run_dir is None:
        if gallery is not None:
            raise ConfigError("--gallery needs --run GCKD_RUN: the GCKD run whose model encodes the images")
        return False
    found = run_kind(run_dir)
    if found != "gckd":
        if gallery is not None:
            what = "a hashing run" if found == "hashing" else "not a crossret GCKD run"
            raise ConfigError(f"--gallery: --run {run_dir} is {what}; a gallery index needs a `crossret gckd "
                              "pretrain|adapt` run (hashing runs index their codes: drop --gallery)")
        return False
    if gallery is None:
        raise ConfigError(f"--run {run_dir} is a GCKD run: give --gallery DATASET_DIR, the person dataset whose "
                          "images to index (code indexes are built from hashing runs)")
    if bits is not None or ids is not None:
        raise ConfigError("--bits and --ids apply to code indexes; a gallery index takes --gallery, --split and "
                          "--kind flat|hnsw")
    if kind not in ("flat", "hnsw"):
        raise ConfigError(f"--kind {kind}: a gallery index is 'flat' (exact) or 'hnsw'")
    params = _index_params(param)
    check_output_file(output, "index", overwrite=overwrite)
    from crossret.textimage.search import GalleryIndex, GckdEncoder

    encoder = GckdEncoder.from_run(run_dir, device=device)
    with _progress_bar() as progress:
        built = GalleryIndex.build(encoder, gallery, split=split, kind=kind,
                                   progress=lambda done, total: progress(done, total, "encoding images"), **params)
    built.save(output)
    out.print(f"wrote {output}: {built.size} gallery images of {gallery} ({split}), {built.index.dim}-d ITC "
              f"embeddings, kind {kind}")
    return True


def _read_text_file(path: Path) -> list[str]:
    """The non-blank lines of a UTF-8 captions file."""
    try:
        content = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"--text-file {path}: no such file") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"--text-file {path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    texts = [line.strip() for line in content.splitlines() if line.strip()]
    if not texts:
        raise DataError(f"--text-file {path}: holds no captions; write one caption per line")
    return texts


def _gckd_index_search(index_file: Path, queries: Path | None, run_dir: Path | None, text: list[str] | None,
                       text_file: Path | None, k: int, save: Path | None, device: str, as_json: bool) -> bool:
    """``index search`` with captions (a gallery index); False when this is a search by codes."""
    texts_given = bool(text) or text_file is not None
    if not texts_given and run_dir is None:
        if queries is not None and index_file.is_file():
            from crossret.retrieval.index import read_index_header

            if read_index_header(index_file)["index_type"] == "dense":
                raise ConfigError(f"{index_file}: is a GCKD gallery index; search it with captions: --run GCKD_RUN "
                                  "--text TEXT (or --text-file FILE), not --queries")
        return False
    if queries is not None:
        raise ConfigError("give either --queries (codes, for a binary index) or --text/--text-file (captions, for "
                          "a gallery index), not both")
    if not texts_given:
        raise ConfigError("--run: give the captions with --text TEXT (repeatable) or --text-file FILE")
    if text and text_file is not None:
        raise ConfigError("give the captions with --text or with --text-file, not both")
    if run_dir is None:
        raise ConfigError("--text needs --run GCKD_RUN: the run whose model encodes the captions (the one the "
                          "gallery index was built with)")
    if save is not None:
        raise ConfigError("--save writes Hamming search results; for text search use --json")
    from crossret.textimage.search import GalleryIndex, GckdEncoder, check_text_k, search_texts

    texts = list(text) if text else _read_text_file(text_file)  # type: ignore[arg-type]
    gallery = GalleryIndex.load(index_file)
    check_text_k(k, gallery.size)
    encoder = GckdEncoder.from_run(run_dir, device=device)
    encoder.clean_texts(texts)
    result = search_texts(encoder, gallery, texts, k)
    if as_json:
        _print_json(result)
        return True
    table = Table(title=f"{len(texts)} captions, top {k} of {gallery.size} gallery images (ITC score)")
    table.add_column("caption")
    table.add_column("id (score) image")
    shown = result["results"][:20]
    for row in shown:
        table.add_row(row["text"], "\n".join(f"{i} ({score:.4f}) {path}" for i, score, path in
                                              zip(row["ids"], row["scores"], row["paths"], strict=True)))
    out.print(table)
    if len(shown) < len(texts):
        out.print(f"... {len(texts) - len(shown)} more captions (use --json for all)")
    return True


# --------------------------------------------------------------------------- serve
@app.command()
def serve(
    run_dir: Annotated[Path | None, typer.Argument(help="A finished run directory (model + database codes). "
                                                   "May be left out when --index is given (no feature search, "
                                                   "no labels).")] = None,
    host: Annotated[str, typer.Option(help="Address to bind (loopback by default).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="TCP port.")] = 8000,
    database: Annotated[Setting, typer.Option(help="cross = the source codes, single = the target-train "
                                              "codes.")] = Setting.cross,
    index: Annotated[Path | None, typer.Option(help="Serve this saved index (.crbi; with --backend milvus its "
                                               "locator file) instead of building a flat one over the run's "
                                               "codes.")] = None,
    max_k: Annotated[int, typer.Option(min=1, help="Most results per query.")] = 1000,
    max_batch: Annotated[int, typer.Option(min=1, help="Most queries per request.")] = 1024,
    max_body_bytes: Annotated[int, typer.Option(min=64, help="Largest request body (413 above).")] = 8 << 20,
    request_timeout: Annotated[float, typer.Option(min=0.001, max=86400.0, help="Seconds a request may take from "
                                                   "its headers to its answer: a body not received by then gets "
                                                   "408, a search not finished 503 'timeout'.")] = 30.0,
    max_concurrent: Annotated[int | None, typer.Option(min=1, help="Most requests parsed and searched at once "
                                                       "(others wait, within --request-timeout). Default: the "
                                                       "number of CPUs, between 2 and 8.")] = None,
    max_connections: Annotated[int, typer.Option(min=2, help="Most open client connections (lowered to fit "
                                                 "ulimit -n). At the cap a new connection closes the longest-idle "
                                                 "one; it is refused (503) only when every connection has a "
                                                 "request in progress.")] = 2048,
    max_requests: Annotated[int, typer.Option(min=1, help="Most requests in progress (bodiless GETs such as "
                                              "/health not counted); beyond it 503 'overloaded' at "
                                              "once.")] = 128,
    gallery: Annotated[Path | None, typer.Option(help="GCKD run: serve text search over the images of this person "
                                                 "dataset folder (or give --index GALLERY_INDEX).")] = None,
    split: Annotated[str, typer.Option(help="With --gallery: the split whose images are the gallery.")] = "test",
    device: Annotated[str, typer.Option(help="GCKD run: torch device that encodes the captions.")] = "cpu",
    backend: BackendOpt = "local",
    uri: UriOpt = None,
    collection: Annotated[str | None, typer.Option(help="--backend milvus: serve this collection (instead of the "
                                                   "one the --index locator file names).")] = None,
) -> None:
    """Serve a run as a read-only JSON search API: Hamming k-NN, or text search for a GCKD run (docs/serve.md).

    A GCKD run (`crossret gckd pretrain|adapt`) is served as text-to-image search instead: POST
    /search/text over --gallery DATASET_DIR or a gallery --index built with `crossret index build`.

    Bounded by design: request size, batch, k and results are capped (4xx above), every request has a
    deadline (--request-timeout), at most --max-concurrent requests compute at once and --max-requests are
    in progress, and idle or slow clients cannot crowd others out (request heads within 5 s, idle
    keep-alive connections closed after 5 s, and at the connection cap the longest-idle connection makes
    room for a new one). With --backend milvus the codes are searched in a Milvus collection: --index is the
    locator file `crossret index build --backend milvus` wrote, or --collection names it. Files are chosen on
    this command line only: no request value reaches the file system. No authentication: bind to loopback
    (the default) or put a proxy in front.

    Needs the optional 'serve' extra: pip install 'crossret\\[serve]'.
    """
    from crossret.retrieval.backend import check_backend
    from crossret.serve.app import ServerSettings, create_app, require_serve_extra, run_server
    from crossret.serve.state import ServiceLimits

    check_backend(backend)
    options = _backend_options(backend, uri, collection)
    require_serve_extra(server=True)
    limits = ServiceLimits(max_k=max_k, max_batch=max_batch, max_body_bytes=max_body_bytes,
                           request_timeout=request_timeout,
                           **({"max_concurrent": max_concurrent} if max_concurrent is not None else {}))
    from crossret.runs import run_kind

    found = run_kind(run_dir) if run_dir is not None and run_dir.is_dir() else None
    if found == "gckd":
        if backend != "local":
            raise ConfigError(f"--backend {backend} serves binary codes; a GCKD run serves text search over a local "
                              "gallery: drop --backend")
        from crossret.serve.app import create_text_app

        service = create_text_app(run_dir, gallery=gallery, split=split, index=index, limits=limits, device=device)
        info = service.state.service.info()
        err.print(f"serving text search over {info['size']} gallery images ({info['dim']}-d ITC embeddings) on "
                  f"http://{host}:{port}", highlight=False)
    else:
        if gallery is not None:
            raise ConfigError(f"--gallery needs a GCKD run (`crossret gckd pretrain|adapt`); {run_dir or 'no run'} "
                              "is not one (hashing runs serve their database codes: drop --gallery)")
        if backend == "local" and index is not None and index.is_file():
            from crossret.retrieval.backend import refuse_locator
            from crossret.retrieval.index import read_index_header

            refuse_locator(index)

            if read_index_header(index)["index_type"] == "dense":
                raise ConfigError(f"--index {index} is a GCKD gallery index: serve it with the GCKD run that built "
                                  "it, crossret serve GCKD_RUN --index FILE")
        service = create_app(run_dir, database=database.value, index=index, limits=limits,
                             **({"backend": backend, "backend_options": options} if backend != "local" else {}))
        info = service.state.service.info()
        err.print(f"serving {info['size']} codes ({info['bits']} bits, {info['kind']}) on http://{host}:{port}",
                  highlight=False)
    run_server(service, host=host, port=port,
               settings=ServerSettings(max_connections=max_connections, max_requests=max_requests))


# --------------------------------------------------------------------------- gckd
ModelOpt = Annotated[str, typer.Option("--model", help="Backbone size: 'tiny' (tests, CPU; trains at lr 1e-3 "
                                       "unless --set lr=...) or 'base' (ALBEF ViT-B/16 + BERT-base; random weights "
                                       "unless --init; the paper's lr 1e-5).")]
ModelSetOpt = Annotated[list[str] | None, typer.Option("--model-set", help="ALBEF config override KEY=VALUE, e.g. "
                                                       "image_size=[64,32] (repeatable).")]
TrainSetOpt = Annotated[list[str] | None, typer.Option("--set", help="GCKD training override KEY=VALUE, e.g. "
                                                       "epochs=5 kd_weight=0 (repeatable; see docs/gckd.md).")]
VocabOpt = Annotated[Path | None, typer.Option("--vocab", help="BERT vocab.txt. Required with an --init checkpoint "
                                               "file (the vocabulary it was trained with, e.g. bert-base-uncased's "
                                               "for ALBEF) unless the file is a crossret run's model.pt. Default: the "
                                               "--init run's, or a WordPiece vocabulary trained on the training "
                                               "captions.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="torch device, e.g. cpu or cuda.")]
RerankOpt = Annotated[int, typer.Option("--rerank-k", help="ITM re-ranking of each query's top-k images "
                                        "(0: ITC ranking only).")]
RerankScoreOpt = Annotated[str, typer.Option("--rerank-score", help="How the top-k is re-ranked: itm (the ITM "
                                             "logit, as ALBEF and RaSa) or itm+itc (plus --rerank-itc-weight "
                                             "times the ITC cosine, as BLIP).")]
RerankWeightOpt = Annotated[float, typer.Option("--rerank-itc-weight", help="Weight of the ITC cosine in "
                                                "--rerank-score itm+itc.")]
OverwriteOpt = Annotated[bool, typer.Option(help="Replace the crossret run in --out (finished or interrupted) once the "
                                            "new one has finished.")]
GckdResumeOpt = Annotated[bool, typer.Option(help="Continue an interrupted run in --out (same options; --workers "
                                             "may change).")]
MaxTokensOpt = Annotated[int, typer.Option("--max-tokens", help="Tokens per caption, [CLS] and [SEP] included; "
                                           "longer captions are cut. At most the model's position embeddings (512 "
                                           "for ALBEF-base). Stored in the run: `gckd eval` uses it.")]
WorkersOpt = Annotated[int, typer.Option("--workers", help="DataLoader processes that decode the images (0: this "
                                         "process). Results do not depend on it.")]
StrictOpt = Annotated[bool, typer.Option("--strict/--no-strict", help="--init: refuse a checkpoint whose keys differ "
                                         "from the model's (default). --no-strict loads the shared keys (extra heads "
                                         "of RaSa/APTM are ignored) and lists the missing and unexpected keys; "
                                         "shape mismatches are refused either way.")]


class _WarningLines:
    """Prints the WARNING records of crossret's loggers as ``warning: ...`` lines on stderr while a command
    runs (they also go to the run's log)."""

    def __enter__(self) -> _WarningLines:
        import logging

        class Handler(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                err.print(Text.assemble(("warning:", "bold yellow"), " ", " ".join(record.getMessage().split("\n"))),
                          soft_wrap=True)

        self.handler = Handler(logging.WARNING)
        self.logger = logging.getLogger("crossret")
        self.logger.addHandler(self.handler)
        return self

    def __exit__(self, *exc: object) -> None:
        self.logger.removeHandler(self.handler)


def _gckd_run(stage: str, source: Path, target: Path | None, out_dir: Path, model: str, model_set: list[str] | None,
              init: str | None, vocab: Path | None, set_: list[str] | None, rerank_k: int, device: str,
              overwrite: bool, resume: bool, as_json: bool, max_tokens: int, workers: int, strict: bool, *,
              rerank_score: str = "itm", rerank_itc_weight: float = 1.0, delta_precision: float | None = None,
              delta_split: str | None = None) -> None:
    from crossret.extras import require

    require("gckd")
    from crossret.textimage.pipeline import GckdRunConfig, run_gckd

    config = GckdRunConfig(stage=stage, source_dir=str(source), target_dir=str(target) if target else None,
                           model=model, model_overrides=_parse_overrides(model_set), init=init, init_strict=strict,
                           vocab=str(vocab) if vocab else None, train=_parse_overrides(set_), rerank_k=rerank_k,
                           device=device, max_tokens=max_tokens, workers=workers, rerank_score=rerank_score,
                           rerank_itc_weight=rerank_itc_weight, delta_precision=delta_precision,
                           delta_split=delta_split).validate()
    with _WarningLines(), _progress_bar() as progress:
        metrics = run_gckd(config, out_dir, resume=resume, overwrite=overwrite, progress=progress)
    if as_json:
        _print_json(metrics)
        return
    _print_person_metrics(metrics["evaluation"], f"{stage}: {metrics['source']} -> {metrics['evaluated_on']}")
    init_info = metrics.get("init") or {}
    for name, what in (("missing_keys", "missing keys (random initialisation)"),
                       ("unexpected_keys", "unexpected keys (ignored)")):
        if init_info.get(name):
            out.print(f"--init {init_info['init']}: {len(init_info[name])} {what}: {', '.join(init_info[name])}",
                      soft_wrap=True)
    calibration = metrics.get("delta_calibration")
    if calibration is not None:
        kept = (f"{calibration['pairs']} of {calibration['mutual_pairs']} mutual-nearest pairs at precision "
                f"{calibration['pair_precision']:.3f}" if calibration["reached"]
                else f"no pairs reach precision {calibration['precision']:.2f}")
        out.print(f"delta (cosine) = {calibration['delta']:.4f}, calibrated on {calibration['split']}: {kept}")
    out.print(f"train {metrics['train_seconds']:.1f}s, eval {metrics['eval_seconds']:.1f}s; run directory: {out_dir}")


def _print_person_metrics(evaluation: dict[str, Any], title: str) -> None:
    table = Table(title=title)
    for column in ("ranking", "R@1 %", "R@5 %", "R@10 %", "mAP %", "mINP %"):
        table.add_column(column, justify="left" if column == "ranking" else "right")
    rerank = "ITM" if evaluation.get("rerank_score", "itm") == "itm" else "ITM+ITC"
    for key, label in (("itc", "ITC"), ("itm", f"{rerank} re-rank top-{evaluation.get('rerank_k')}")):
        if evaluation.get(key):
            m = evaluation[key]
            table.add_row(label, _pct(m["rank1"]), _pct(m["rank5"]), _pct(m["rank10"]), _pct(m["map"]),
                          _pct(m["minp"]))
    out.print(table)


@gckd_app.command("synth")
def gckd_synth(
    out_root: Annotated[Path, typer.Argument(help="Folder to write CUHK-PEDES/, ICFG-PEDES/ and RSTPReid/ into.")],
    train_ids: Annotated[int, typer.Option(help="Training identities per dataset.")] = 40,
    test_ids: Annotated[int, typer.Option(help="Test identities per dataset.")] = 20,
    images_per_id: Annotated[int, typer.Option(help="Images per identity.")] = 4,
    seed: Annotated[int, typer.Option(help="Seed (each style adds its own offset).")] = 0,
    image_size: Annotated[tuple[int, int], typer.Option("--image-size", help="Image height and width in pixels "
                                                        "(the width is scaled by each style's aspect factor).")
                          ] = (48, 24),
    overwrite: Annotated[bool, typer.Option(help="Replace dataset folders an earlier gckd synth wrote (never other "
                                            "folders).")] = False,
    protocol: Annotated[str, typer.Option(help="Caption protocol: v2 (every attribute named, shared words) or v3 "
                                          "(2-4 attributes in varied wording, each dataset's own words for some "
                                          "colours and garments); the images are the same.")] = "v2",
) -> None:
    """Write small synthetic person-retrieval datasets in the three real annotation formats, each with its
    own rendering and caption style (for trying the pipeline end to end; not a substitute for real data)."""
    from crossret.extras import require

    require("gckd")
    from crossret.data.synthetic_person import generate_person_datasets

    paths = generate_person_datasets(out_root, n_train_ids=train_ids, n_test_ids=test_ids,
                                     images_per_id=images_per_id, seed=seed, image_size=image_size,
                                     overwrite=overwrite, protocol=protocol)
    for style, path in paths.items():
        out.print(f"{style}: {path}")


@gckd_app.command("pretrain")
def gckd_pretrain(
    source: Annotated[Path, typer.Option(help="Labelled source dataset folder (CUHK-PEDES/ICFG-PEDES/RSTPReid "
                                         "format).")],
    out_dir: Annotated[Path, typer.Option("--out", help="Run directory.")],
    target: Annotated[Path | None, typer.Option(help="Optional target dataset: evaluated on its test split "
                                                "(its training captions also enter a trained vocabulary).")] = None,
    model: ModelOpt = "tiny",
    model_set: ModelSetOpt = None,
    init: Annotated[str | None, typer.Option(help="ALBEF checkpoint (.pth) or crossret GCKD run directory to start "
                                             "from.")] = None,
    vocab: VocabOpt = None,
    set_: TrainSetOpt = None,
    rerank_k: RerankOpt = 128,
    rerank_score: RerankScoreOpt = "itm",
    rerank_itc_weight: RerankWeightOpt = 1.0,
    device: DeviceOpt = "cpu",
    max_tokens: MaxTokensOpt = 40,
    workers: WorkersOpt = 0,
    strict: StrictOpt = True,
    overwrite: OverwriteOpt = False,
    resume: GckdResumeOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Source training (identity-aware ITC with momentum distillation, ITM with hard negatives, MLM)."""
    _gckd_run("pretrain", source, target, out_dir, model, model_set, init, vocab, set_, rerank_k, device, overwrite,
              resume, as_json, max_tokens, workers, strict, rerank_score=rerank_score,
              rerank_itc_weight=rerank_itc_weight)


@gckd_app.command("adapt")
def gckd_adapt(
    source: Annotated[Path, typer.Option(help="Labelled source dataset folder.")],
    target: Annotated[Path, typer.Option(help="Target dataset folder: its train split is used without labels, "
                                         "its test split for evaluation.")],
    out_dir: Annotated[Path, typer.Option("--out", help="Run directory.")],
    init: Annotated[str | None, typer.Option(help="Start from a `gckd pretrain` run directory or an ALBEF "
                                             "checkpoint (.pth).")] = None,
    model: ModelOpt = "tiny",
    model_set: ModelSetOpt = None,
    vocab: VocabOpt = None,
    set_: TrainSetOpt = None,
    rerank_k: RerankOpt = 128,
    rerank_score: RerankScoreOpt = "itm",
    rerank_itc_weight: RerankWeightOpt = 1.0,
    device: DeviceOpt = "cpu",
    max_tokens: MaxTokensOpt = 40,
    workers: WorkersOpt = 0,
    strict: StrictOpt = True,
    delta_precision: Annotated[float | None, typer.Option(
        "--delta-precision", help="With --set cd_itm_mining=banks: set δ (cosine) to the smallest cosine at which the "
        "starting model's mutual-nearest caption-image pairs of the labelled source reach this identity precision "
        "(no target label is used). Recorded in the run's metrics.")] = None,
    delta_split: Annotated[str | None, typer.Option(
        "--delta-split", help="Source split for --delta-precision: train, val or test (default: val where the "
        "source has one, else test).")] = None,
    overwrite: OverwriteOpt = False,
    resume: GckdResumeOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """GCKD adaptation: memory banks + kNN graph + GNN, EMA teacher with contrastive KD, δ-filtered
    cross-domain ITM, on top of the source losses."""
    _gckd_run("adapt", source, target, out_dir, model, model_set, init, vocab, set_, rerank_k, device, overwrite,
              resume, as_json, max_tokens, workers, strict, rerank_score=rerank_score,
              rerank_itc_weight=rerank_itc_weight, delta_precision=delta_precision, delta_split=delta_split)


@gckd_app.command("eval")
def gckd_eval(
    run_dir: Annotated[Path, typer.Argument(help="A finished `gckd pretrain|adapt` run directory.")],
    data: Annotated[Path, typer.Option("--data", help="Dataset folder to evaluate on.")],
    split: Annotated[str, typer.Option(help="Split: test, val or train.")] = "test",
    rerank_k: RerankOpt = 128,
    rerank_score: RerankScoreOpt = "itm",
    rerank_itc_weight: RerankWeightOpt = 1.0,
    device: DeviceOpt = "cpu",
    max_tokens: Annotated[int | None, typer.Option("--max-tokens", help="Tokens per caption, [CLS] and [SEP] "
                                                   "included (default: the run's).")] = None,
    workers: WorkersOpt = 0,
    as_json: JsonOpt = False,
) -> None:
    """Text-to-image Rank-1/5/10, mAP and mINP of a run's model on a dataset split."""
    from crossret.extras import require

    require("gckd")
    from crossret.textimage.pipeline import evaluate_run

    result = evaluate_run(run_dir, data, split=split, rerank_k=rerank_k, device=device, max_tokens=max_tokens,
                          workers=workers, rerank_score=rerank_score, rerank_itc_weight=rerank_itc_weight)
    if as_json:
        _print_json(result)
        return
    _print_person_metrics(result["evaluation"], f"{run_dir} on {result['evaluated_on']}")


if __name__ == "__main__":  # pragma: no cover
    main()
