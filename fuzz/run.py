"""Fuzz crossret's readers and packing / metrics functions with atheris (libFuzzer for Python).

    python fuzz/run.py TARGET [libFuzzer flags] [CORPUS_DIR ...]

``TARGET`` is one of the names in ``fuzz/targets.py`` (``python fuzz/run.py list`` prints them),
several joined by commas, ``default`` (every target whose code is owned by the reliability work)
or ``all``. With several targets the first byte of each input picks the target (one process,
one start-up); the seed corpus is prefixed accordingly.

Seeds are generated from valid files written by crossret's own writers into a fresh temporary
corpus folder unless corpus folders are given (then new interesting inputs are kept there).
Unless given, these libFuzzer flags are added: ``-rss_limit_mb=2048`` (a huge allocation is a
finding), ``-timeout=20`` (a hang is a finding) and ``-max_len=8192``. Every target is run once
on each seed before fuzzing starts (imports, numba compilation), so timeouts measure the target.

Scratch files (each input is written to a file for the reader) go to ``$CROSSRET_FUZZ_TMP``, else
``/dev/shm``. ``--instrument-all`` (not passed to libFuzzer) also instruments every Python module loaded at start
(numpy's ``.npy`` parser, ``zipfile``, scipy's MAT reader, ``json``, ...): slower to start and to run,
but coverage then guides the mutations through the parsers too.

Examples::

    python fuzz/run.py npz -runs=20000
    python fuzz/run.py index_payload -max_total_time=300 fuzz/corpus/index_payload
    python fuzz/run.py default -runs=500 -seed=1

A finding stops the run with a non-zero exit status and writes the input to
``<artifact_prefix>crash-*`` / ``timeout-*`` / ``oom-*``; reproduce it with
``python fuzz/run.py TARGET path/to/crash-file``.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

DEFAULT_FLAGS = {"-rss_limit_mb": "2048", "-timeout": "20", "-max_len": "8192"}


def _names(spec: str) -> list[str]:
    from targets import TARGETS

    if spec == "all":
        return list(TARGETS)
    if spec == "default":
        return [name for name, target in TARGETS.items() if target.owned]
    names = [name for name in spec.split(",") if name]
    unknown = [name for name in names if name not in TARGETS]
    if unknown or not names:
        raise SystemExit(f"unknown fuzz target(s) {unknown or spec!r}; known: {', '.join(TARGETS)}, default, all")
    return names


def _remove_stale(base: Path) -> None:
    """Scratch folders of earlier runs whose process is gone (libFuzzer exits without cleaning up)."""
    for folder in base.glob("crossret-fuzz-*-*"):
        try:
            pid = int(folder.name.split("-")[2])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except (ValueError, IndexError, PermissionError):
            continue


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 2
    if argv[0] == "list":
        from targets import TARGETS

        for name, target in TARGETS.items():
            print(f"{name:15s} {'owned' if target.owned else 'elsewhere'}{' (torch)' if target.heavy else ''}")
        return 0
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from crossret.errors import MissingExtraError
    from crossret.extras import require

    try:
        require("fuzz", load=True)
    except MissingExtraError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    import atheris

    names = _names(argv[0])
    instrument_all = "--instrument-all" in argv
    argv = [a for a in argv if a != "--instrument-all"]
    flags = [a for a in argv[1:] if a.startswith("-")]
    paths = [a for a in argv[1:] if not a.startswith("-")]
    given = {flag.split("=", 1)[0] for flag in flags}
    flags += [f"{key}={value}" for key, value in DEFAULT_FLAGS.items() if key not in given]
    multiplexed = len(names) > 1
    # Scratch files (the corpus of seeds, each input written as a file) live in $CROSSRET_FUZZ_TMP,
    # else in memory (/dev/shm); libFuzzer exits without returning, so stale ones are removed here.
    base = Path(os.environ.get("CROSSRET_FUZZ_TMP") or ("/dev/shm" if os.path.isdir("/dev/shm")
                                                        else tempfile.gettempdir()))
    _remove_stale(base)
    scratch = Path(tempfile.mkdtemp(prefix=f"crossret-fuzz-{os.getpid()}-", dir=base))
    work = scratch / "work"
    work.mkdir()

    # numba compiles the Python bytecode of its kernels: instrumented bytecode would not compile.
    with atheris.instrument_imports(include=["crossret"], exclude=["crossret.retrieval.hamming"]):
        from targets import TARGETS, run_target

        seeds: list[bytes] = []
        for index, name in enumerate(names):
            for seed in TARGETS[name].seeds():
                run_target(name, seed, work)  # warm-up: imports and numba compilation happen here
                seeds.append(bytes([index]) + seed if multiplexed else seed)

    if instrument_all:
        atheris.instrument_all()
    reproduce = len(paths) == 1 and Path(paths[0]).is_file()
    if not paths:
        corpus = scratch / "corpus"
        corpus.mkdir()
        for i, seed in enumerate(seeds):
            (corpus / f"seed-{i:03d}").write_bytes(seed)
        paths = [str(corpus)]
    elif not reproduce:
        for directory in paths:
            Path(directory).mkdir(parents=True, exist_ok=True)
            for i, seed in enumerate(seeds):
                target = Path(directory) / f"seed-{i:03d}"
                if not target.exists():
                    target.write_bytes(seed)

    def test_one(data: bytes) -> None:
        if multiplexed:
            if not data:
                return
            name, data = names[data[0] % len(names)], data[1:]
        else:
            name = names[0]
        run_target(name, data, work)

    try:
        atheris.Setup([sys.argv[0], *flags, *paths], test_one)
        atheris.Fuzz()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
