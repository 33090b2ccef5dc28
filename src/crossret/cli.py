"""``crossret`` command line: a thin typer layer over the Python API.

Errors a user can cause are :class:`~crossret.errors.CrossretError`; they are printed to stderr
as ``error: ...`` and the command exits with status 2. ``--json`` makes the last line of stdout one
JSON object (progress bars and tables go to stderr then).
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Iterator
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
import yaml
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from crossret._io import load_npy
from crossret.errors import ConfigError, CrossretError, DataError
from crossret.hashing.base import ProgressFn, available_methods

app = typer.Typer(
    help="Unsupervised domain-adaptive retrieval: learn hash codes that work on an unlabelled target "
    "domain, evaluate them (MAP, precision@N, P-R) and search them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
index_app = typer.Typer(help="Build and search persistent binary (Hamming) indexes.", no_args_is_help=True)
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


def main() -> None:
    """Console-script entry point."""
    try:
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
    """
    if not enabled or not err.is_terminal:
        yield lambda step, total, message="": None
        return
    progress = Progress(
        TextColumn("{task.description}", markup=False), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(), console=err, transient=True,
    )
    task = progress.add_task("starting", total=1)

    def update(step: int, total: int, message: str = "") -> None:
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
    from crossret._io import to_jsonable

    sys.stdout.write(json.dumps(to_jsonable(obj), separators=(",", ":")) + "\n")
    sys.stdout.flush()


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def _load_npy(path: Path, what: str) -> np.ndarray:
    return load_npy(path, what)


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


# --------------------------------------------------------------------------- run
@app.command()
def run(
    method: Annotated[str, typer.Argument(help="Method: " + ", ".join(available_methods()) + ".")],
    bits: Annotated[int, typer.Option(help="Code length in bits (1 to 65536).")],
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
    as_json: JsonOpt = False,
) -> None:
    """Train METHOD on a benchmark (or --source/--target files), evaluate, write a run directory.

    COUPLE checkpoints every epoch into DIR/checkpoints; after an interruption, run the same
    command with --out DIR --resume.
    """
    from crossret.experiment import RunConfig, default_run_dir, run_experiment

    config = RunConfig(
        method=method, bits=bits, seed=seed, benchmark=benchmark,
        source=str(source) if source else None, target=str(target) if target else None,
        data_dir=str(data_dir) if data_dir else None, split_seed=split_seed, n_queries=n_queries,
        query_fraction=query_fraction, label_base=label_base if label_base == "auto" else _int_option(
            label_base, "--label-base"), ties=ties.value, topk=topk, method_config=_parse_overrides(set_),
        plots=plots,
    ).validate()
    if resume and out_dir is None:
        raise ConfigError("--resume needs the run directory of the interrupted run (--out DIR)")
    config.out_dir = str(out_dir) if out_dir else default_run_dir(config)
    with _progress_bar() as progress:
        result = run_experiment(config, progress=progress, overwrite=overwrite, resume=resume)
    metrics = result.metrics
    if as_json:
        _print_json(metrics)
        return
    table = Table(title=f"{method} on {config.benchmark_label}, {bits} bits (ties: {ties.value})")
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
    table = Table(title=f"{evaluation.n_queries} queries x {evaluation.n_database} items, {evaluation.bits} bits "
                  f"(ties: {ties.value})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("MAP@all %", _pct(evaluation.map))
    if topk is not None:
        table.add_row(f"MAP@{topk} % (normalised by relevant in top {topk})", _pct(evaluation.map_at_k))
    for n, value in sorted(evaluation.precision_at.items()):
        table.add_row(f"precision@{n} %", _pct(value))
    table.add_row("precision within radius 2 %", _pct(evaluation.p_at_r2))
    table.add_row("queries without a relevant item (AP 0)", str(evaluation.n_queries_without_relevant))
    out.print(table)


# --------------------------------------------------------------------------- report
@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="A finished run directory.")],
    out_dir: Annotated[Path | None, typer.Option("--out", help="Where to write PNGs (default RUN_DIR/plots).")]
    = None,
    overwrite: Annotated[bool, typer.Option(help="Replace plots crossret wrote there before (other files are never "
                                            "replaced).")] = False,
) -> None:
    """Write P-R (by Hamming radius and by rank) and precision@N plots of a run as PNG."""
    from crossret.experiment import read_run_metrics
    from crossret.report.plots import run_plot_files, write_run_plots
    from crossret.runs import check_output_file, run_file

    metrics = read_run_metrics(run_dir)
    target = out_dir or run_file(run_dir, "plots")
    for path in run_plot_files(metrics, target):
        check_output_file(path, "plot", overwrite=overwrite)
    paths = write_run_plots(metrics, target)
    for path in paths:
        out.print(str(path))


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
) -> None:
    """Build a binary index from codes and save it (atomic write, checksummed).

    Packed uint8 codes (e.g. from `crossret index encode`) are memory-mapped and added in batches.
    """
    from crossret.retrieval.streaming import build_index_from_packed
    from crossret.runs import check_output_file, run_file

    if (codes is None) == (run_dir is None):
        raise ConfigError("give exactly one of --codes FILE or --run RUN_DIR")
    check_output_file(output, "index", overwrite=overwrite)
    if run_dir is not None:
        name = "source" if database is Setting.cross else "target_train"
        codes = run_file(run_dir, "codes", f"{name}_codes.npy")
    assert codes is not None
    params = _index_params(param)
    source: Any = _packed_codes_file(codes, bits)
    if source is None:  # ±1 / {0,1} codes: small enough to load and pack in memory
        source, bits = _as_packed(_load_npy(codes, "--codes"), bits, "--codes")
    with _progress_bar() as progress:
        index = build_index_from_packed(source, bits, kind, batch_size=batch_size, train_size=train_size,
                                        seed=seed, ids=_load_npy(ids, "--ids") if ids else None,
                                        progress=progress, **params)
    index.save(output)
    out.print(f"wrote {output}: {index.ntotal} codes, {index.bits} bits, kind {kind} {index.params or ''}")


@index_app.command("search")
def index_search(
    index_file: Annotated[Path, typer.Argument(help="Index file written by `crossret index build`.")],
    queries: Annotated[Path, typer.Option(help=".npy of query codes (±1 or 0/1, or packed uint8).")],
    k: Annotated[int, typer.Option("-k", "--k", help="Neighbours per query.")] = 10,
    save: Annotated[Path | None, typer.Option(help="Write distances and ids to this .npz.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace --save when it holds crossret search results (other files "
                                            "are never replaced).")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Search an index: the k nearest codes (Hamming) of every query."""
    from crossret._io import atomic_open
    from crossret.retrieval.index import BinaryIndex
    from crossret.runs import check_output_file

    if save is not None:
        check_output_file(save, "search", overwrite=overwrite, option="--save")
    index = BinaryIndex.load(index_file)
    packed, _ = _as_packed(_load_npy(queries, "--queries"), index.bits, "--queries")
    distances, ids = index.search(packed, k)
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
    """Encode a (large) feature file with a run's model into packed codes, batch by batch.

    The output appears only when every batch succeeded; rows with NaN/inf stop it with an error naming them.
    """
    from crossret.hashing._state import load_method
    from crossret.retrieval.streaming import encode_to_packed, open_features
    from crossret.runs import check_output_file, find_model_file

    check_output_file(output, "codes", overwrite=overwrite)
    model_file = find_model_file(run_dir)
    if model_file is None:
        raise DataError(f"--run {run_dir}: no model.npz or model.pt; is this a finished run of a method that "
                        "saves its model?")
    method = load_method(model_file)
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
    array = open_features(features, shape=raw_shape, dtype=dtype)
    with _progress_bar(not as_json) as progress:
        result = encode_to_packed(method, array, output, batch_size=batch_size, progress=progress,
                                  meta={"features": str(features), "run": str(run_dir)}, domain=domain.value)
    summary = {"out": str(result.path), "n": result.n, "bits": result.bits, "bytes_per_code": result.width,
               "seconds": round(result.seconds, 3), "method": method.name, "domain": domain.value}
    if as_json:
        _print_json(summary)
        return
    rate = result.n / result.seconds if result.seconds > 0 else float("inf")
    out.print(f"wrote {output}: {result.n} codes, {result.bits} bits ({method.name}) in {result.seconds:.2f}s "
              f"({rate:,.0f} rows/s); code length in {output.name}.json")


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
    packed, _ = _as_packed(_load_npy(queries, "--queries"), index.bits, "--queries")
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


def _packed_codes_file(path: Path, bits: int | None) -> Path | None:
    """``path`` when it holds packed uint8 codes to stream (it has a sidecar, or ``bits`` says the rows
    are packed); ``None`` for ±1 / {0,1} code files."""
    from crossret.retrieval.streaming import sidecar_path

    array = load_npy(path, "--codes", mmap=True)
    if array.dtype != np.uint8 or array.ndim != 2:
        return None
    if sidecar_path(path).is_file() or (bits is not None and array.shape[1] != bits):
        return path
    return None


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
    index: Annotated[Path | None, typer.Option(help="Serve this saved index (.crbi) instead of building a flat "
                                               "one over the run's codes.")] = None,
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
) -> None:
    """Serve Hamming k-NN search over a run's database as a read-only JSON API (see docs/serve.md).

    Bounded by design: request size, batch, k and results are capped (4xx above), every request has a
    deadline (--request-timeout), at most --max-concurrent requests compute at once and --max-requests are
    in progress, and idle or slow clients cannot crowd others out (request heads within 5 s, idle
    keep-alive connections closed after 5 s, and at the connection cap the longest-idle connection makes
    room for a new one). Files are chosen on
    this command line only: no request value reaches the file system. No authentication: bind to loopback
    (the default) or put a proxy in front.

    Needs the optional 'serve' extra: pip install 'crossret\\[serve]'.
    """
    from crossret.serve.app import ServerSettings, create_app, require_serve_extra, run_server
    from crossret.serve.state import ServiceLimits

    require_serve_extra(server=True)
    limits = ServiceLimits(max_k=max_k, max_batch=max_batch, max_body_bytes=max_body_bytes,
                           request_timeout=request_timeout,
                           **({"max_concurrent": max_concurrent} if max_concurrent is not None else {}))
    service = create_app(run_dir, database=database.value, index=index, limits=limits)
    info = service.state.service.info()
    err.print(f"serving {info['size']} codes ({info['bits']} bits, {info['kind']}) on http://{host}:{port}",
              highlight=False)
    run_server(service, host=host, port=port,
               settings=ServerSettings(max_connections=max_connections, max_requests=max_requests))


# --------------------------------------------------------------------------- gckd
ModelOpt = Annotated[str, typer.Option("--model", help="Backbone size: 'tiny' (tests, CPU) or 'base' (ALBEF "
                                       "ViT-B/16 + BERT-base).")]
ModelSetOpt = Annotated[list[str] | None, typer.Option("--model-set", help="ALBEF config override KEY=VALUE, e.g. "
                                                       "image_size=[64,32] (repeatable).")]
TrainSetOpt = Annotated[list[str] | None, typer.Option("--set", help="GCKD training override KEY=VALUE, e.g. "
                                                       "epochs=5 kd_weight=0 (repeatable; see docs/gckd.md).")]
VocabOpt = Annotated[Path | None, typer.Option("--vocab", help="BERT vocab.txt (default: the --init run's, or a "
                                               "WordPiece vocabulary trained on the training captions).")]
DeviceOpt = Annotated[str, typer.Option("--device", help="torch device, e.g. cpu or cuda.")]
RerankOpt = Annotated[int, typer.Option("--rerank-k", help="ITM re-ranking of each query's top-k images "
                                        "(0: ITC ranking only).")]
OverwriteOpt = Annotated[bool, typer.Option(help="Replace the crossret run in --out (finished or interrupted) once the "
                                            "new one has finished.")]
GckdResumeOpt = Annotated[bool, typer.Option(help="Continue an interrupted run in --out (same options).")]


def _gckd_run(stage: str, source: Path, target: Path | None, out_dir: Path, model: str, model_set: list[str] | None,
              init: str | None, vocab: Path | None, set_: list[str] | None, rerank_k: int, device: str,
              overwrite: bool, resume: bool, as_json: bool) -> None:
    from crossret._extras import require

    require("gckd")
    from crossret.textimage.pipeline import GckdRunConfig, run_gckd

    config = GckdRunConfig(stage=stage, source_dir=str(source), target_dir=str(target) if target else None,
                           model=model, model_overrides=_parse_overrides(model_set), init=init,
                           vocab=str(vocab) if vocab else None, train=_parse_overrides(set_), rerank_k=rerank_k,
                           device=device).validate()
    with _progress_bar() as progress:
        metrics = run_gckd(config, out_dir, resume=resume, overwrite=overwrite, progress=progress)
    if as_json:
        _print_json(metrics)
        return
    _print_person_metrics(metrics["evaluation"], f"{stage}: {metrics['source']} -> {metrics['evaluated_on']}")
    out.print(f"train {metrics['train_seconds']:.1f}s, eval {metrics['eval_seconds']:.1f}s; run directory: {out_dir}")


def _print_person_metrics(evaluation: dict[str, Any], title: str) -> None:
    table = Table(title=title)
    for column in ("ranking", "R@1 %", "R@5 %", "R@10 %", "mAP %", "mINP %"):
        table.add_column(column, justify="left" if column == "ranking" else "right")
    for key, label in (("itc", "ITC"), ("itm", f"ITM re-rank top-{evaluation.get('rerank_k')}")):
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
    overwrite: Annotated[bool, typer.Option(help="Replace dataset folders an earlier gckd synth wrote (never other "
                                            "folders).")] = False,
) -> None:
    """Write small synthetic person-retrieval datasets in the three real annotation formats, each with its
    own rendering and caption style (for trying the pipeline end to end; not a substitute for real data)."""
    from crossret._extras import require

    require("gckd")
    from crossret.data.synthetic_person import generate_person_datasets

    paths = generate_person_datasets(out_root, n_train_ids=train_ids, n_test_ids=test_ids,
                                     images_per_id=images_per_id, seed=seed, overwrite=overwrite)
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
    device: DeviceOpt = "cpu",
    overwrite: OverwriteOpt = False,
    resume: GckdResumeOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Source training (identity-aware ITC with momentum distillation, ITM with hard negatives, MLM)."""
    _gckd_run("pretrain", source, target, out_dir, model, model_set, init, vocab, set_, rerank_k, device, overwrite,
              resume, as_json)


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
    device: DeviceOpt = "cpu",
    overwrite: OverwriteOpt = False,
    resume: GckdResumeOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """GCKD adaptation: memory banks + kNN graph + GNN, EMA teacher with contrastive KD, δ-filtered
    cross-domain ITM, on top of the source losses."""
    _gckd_run("adapt", source, target, out_dir, model, model_set, init, vocab, set_, rerank_k, device, overwrite,
              resume, as_json)


@gckd_app.command("eval")
def gckd_eval(
    run_dir: Annotated[Path, typer.Argument(help="A finished `gckd pretrain|adapt` run directory.")],
    data: Annotated[Path, typer.Option("--data", help="Dataset folder to evaluate on.")],
    split: Annotated[str, typer.Option(help="Split: test, val or train.")] = "test",
    rerank_k: RerankOpt = 128,
    device: DeviceOpt = "cpu",
    as_json: JsonOpt = False,
) -> None:
    """Text-to-image Rank-1/5/10, mAP and mINP of a run's model on a dataset split."""
    from crossret._extras import require

    require("gckd")
    from crossret.textimage.pipeline import evaluate_run

    result = evaluate_run(run_dir, data, split=split, rerank_k=rerank_k, device=device)
    if as_json:
        _print_json(result)
        return
    _print_person_metrics(result["evaluation"], f"{run_dir} on {result['evaluated_on']}")


def _as_packed(array: np.ndarray, bits: int | None, what: str) -> tuple[np.ndarray, int]:
    """±1/{0,1} codes -> packed. uint8 arrays are packed codes when ``bits`` is given (exact or 64-bit
    padded width)."""
    from crossret.retrieval.packing import check_packed, pack_codes

    if array.ndim != 2:
        raise DataError(f"{what}: expected a 2-D array of codes (one row per item), got shape {array.shape}")
    if bits is not None and array.dtype == np.uint8 and array.shape[1] != bits:
        return check_packed(array, bits, allow_padding=True, name=what), bits
    if bits is not None and array.shape[1] != bits:
        raise DataError(f"{what}: codes have {array.shape[1]} bits but {bits} were expected; code lengths "
                        "must match")
    if array.dtype == np.uint8 and array.size and int(array.max()) > 1:
        raise DataError(f"{what}: holds uint8 values above 1, i.e. packed codes; pass --bits L to read them")
    return pack_codes(array, name=what), int(array.shape[1])


if __name__ == "__main__":  # pragma: no cover
    main()
