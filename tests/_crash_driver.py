"""Crash-and-resume driver for tests/test_crash_resume.py (test-side only: no hook lives in the library).

``python tests/_crash_driver.py PLAN.json`` imports crossret once, then runs every job of every scenario
(COUPLE, GCKD) in a *forked* child process, so that the slow torch / torch-geometric / lazy imports are
paid once, not once per kill:

1. the uninterrupted **reference** run, through the real CLI entry point (``crossret.cli.main`` with the
   argv of ``python -m crossret ...``), recording the trace of *events* it passes: optimizer steps,
   COUPLE graph/diffusion refreshes, GCKD kNN graphs, checkpoint writes (before / after the rename of
   the finished temporary file) and the other run files' writes;
2. a kill plan drawn from that trace with ``random.Random(seed)`` (:func:`draw_plan`);
3. for each planned kill, a child resuming the **run** directory (``--resume``) with hooks that send it
   ``SIGKILL`` (``os.kill(os.getpid(), SIGKILL)``: nothing is flushed or cleaned up) when it reaches the
   event; then a checker child loads every file of the run directory (:func:`check_run_dir`);
4. a last, uninterrupted resume; the final run directory is compared with the reference (checkpoint and
   model through the library's own readers, so the comparison does not depend on the file format);
5. optionally, an ``external`` run (started first, :func:`killed_from_outside`) that the test SIGKILLs from
   outside after a seeded delay is resumed and compared as well.

Events carry *absolute* positions (the optimizer's own step count, the number of refreshes already in
the selection history, the trainer's step, the checkpoint's epoch), so a resumed child recognises the
planned event although it restarted from an earlier checkpoint. The report (JSON) is what the test
asserts on.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT = f"checkpoints/{CHECKPOINT_NAME}"
# Besides every key ending in "seconds": what legitimately differs between a resumed and an uninterrupted run
# (the command line of a resumed run has --resume; provenance records it).
TIMING_KEYS = ("resumed_from_epoch", "command")


# ---------------------------------------------------------------------------------------------- the plan
def classify(trace: list[list[Any]]) -> dict[str, list[int]]:
    """Indices of the trace's events by category: ``create`` (the run directory renamed into place, once
    per run, not met again by a resumed attempt), ``startup`` (file writes before training), ``final``
    (file writes after the last checkpoint), ``step``, ``refresh`` (COUPLE), ``graph`` (GCKD),
    ``ckpt-before``, ``ckpt-after``, ``ckpt-after-last`` (the last epoch's checkpoint, just renamed)."""
    first_training = next((i for i, e in enumerate(trace) if e[0] != "file"), len(trace))
    last_ckpt = max((i for i, e in enumerate(trace) if e[0] == "ckpt"), default=-1)
    out: dict[str, list[int]] = {}
    for i, event in enumerate(trace):
        if event[0] == "file" and event[1] == ".":
            category = "create"
        elif event[0] == "file":
            category = "startup" if i < first_training else "final" if i > last_ckpt else "other-file"
        elif event[0] == "ckpt":
            category = f"ckpt-{event[2]}"
        else:
            category = event[0]
        out.setdefault(category, []).append(i)
    if last_ckpt >= 0:
        out["ckpt-after-last"] = [i for i in out.get("ckpt-after", []) if trace[i][1] == trace[last_ckpt][1]]
    return out


def draw_plan(trace: list[list[Any]], seed: int, required: list[str], extra: int, startup: int = 1
              ) -> list[list[Any]]:
    """The kill events, in the order the attempts meet them: one random event of each ``required``
    category plus ``extra`` random training events, in trace order (each resume restarts at or before
    the previous kill, so every later event is reached again). Then ``startup`` distinct kills among the
    writes an attempt starts with (config.yaml, vocab.txt; met by any attempt, whatever its checkpoint)
    are inserted at random places in the second half, where a checkpoint exists already, but before the
    last kill (which may finish the run)."""
    rng = random.Random(seed)
    categories = classify(trace)
    missing = [c for c in required if not categories.get(c)]
    if missing:
        raise ValueError(f"the reference trace has no event of {missing} (it has {sorted(categories)})")
    chosen = {rng.choice(categories[c]) for c in required}
    training = [i for c in ("step", "refresh", "graph", "ckpt-before", "ckpt-after") for i in categories.get(c, [])
                if i not in chosen]
    chosen |= set(rng.sample(training, min(extra, len(training))))
    kills = [trace[i] for i in sorted(chosen)]
    starts = categories.get("startup", [])
    for i in rng.sample(starts, min(startup, len(starts))):
        kills.insert(rng.randrange(len(kills) // 2, len(kills)), trace[i])
    return kills


# ---------------------------------------------------------------------------------------------- hooks (child side)
class Hooks:
    """Observe events; record them (one JSON line each, appended as they happen, so a killed child's
    trace survives) and ``SIGKILL`` this process at the ``target`` event."""

    def __init__(self, run_dir: Path, trace_path: Path, target: list[Any] | None, start_epoch: int) -> None:
        self.run_dir = run_dir.resolve()
        self.trace = open(trace_path, "a", encoding="utf-8")  # closed by os._exit
        self.target = target
        self.start_epoch = start_epoch
        self.checkpoints = 0  # checkpoint writes in this attempt
        self.writes: dict[str, int] = {}  # other files' writes in this attempt
        self.refresh: int | None = None
        self.gckd_step: int | None = None
        self.graph_calls = 0

    def event(self, *key: Any) -> None:
        event = list(key)
        self.trace.write(json.dumps(event) + "\n")
        self.trace.flush()
        if event == self.target:
            os.kill(os.getpid(), signal.SIGKILL)

    # -- the rename that finishes every atomic write (crossret.storage.atomic.atomic_open)
    def rename(self, original: Any, src: Any, dst: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            rel = Path(os.fspath(dst)).resolve().relative_to(self.run_dir).as_posix()
        except ValueError:
            return original(src, dst, *args, **kwargs)
        if rel == CHECKPOINT:
            self.checkpoints += 1
            key: list[Any] = ["ckpt", self.start_epoch + self.checkpoints]
        else:
            self.writes[rel] = self.writes.get(rel, 0) + 1
            key = ["file", rel, self.writes[rel]]
        self.event(*key[:2], "before", *key[2:])
        result = original(src, dst, *args, **kwargs)
        self.event(*key[:2], "after", *key[2:])
        return result


def install_hooks(kind: str, hooks: Hooks) -> None:
    import torch

    for name in ("replace", "rename"):
        original = getattr(os, name)
        setattr(os, name, lambda src, dst, *a, _o=original, **k: hooks.rename(_o, src, dst, *a, **k))

    adam_step = torch.optim.Adam.step  # AdamW inherits it

    def step(self: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
        result = adam_step(self, *args, **kwargs)
        # the optimizer's own step count: restored with its state, so it is absolute across resumes
        done = max((int(s["step"]) for s in self.state.values() if "step" in s), default=0)
        hooks.event("step", done)
        return result

    torch.optim.Adam.step = step

    if kind == "couple":
        from crossret.hashing import couple
        from crossret.hashing.couple import selection as couple_selection  # where the refresh calls these

        refresh = couple.Couple._refresh

        def _refresh(self: Any, *args: Any, **kwargs: Any) -> Any:
            hooks.refresh = len(self.selection_history)  # refreshes before this one: restored on resume
            hooks.event("refresh", hooks.refresh, "enter")
            result = refresh(self, *args, **kwargs)
            hooks.event("refresh", hooks.refresh, "exit")
            return result

        couple.Couple._refresh = _refresh

        def watch(name: str, before: str, after: str | None) -> None:
            original = getattr(couple_selection, name, None)
            if original is None:  # not used by this version of the refresh
                return

            def wrapped(*args: Any, **kwargs: Any) -> Any:
                hooks.event("refresh", hooks.refresh, before)
                result = original(*args, **kwargs)
                if after:
                    hooks.event("refresh", hooks.refresh, after)
                return result

            setattr(couple_selection, name, wrapped)

        watch("build_cross_domain_graph", "graph", None)
        watch("l2_flow_diffusion_active_set", "diffusion", "diffused")
        watch("l2_flow_diffusion", "diffusion", "diffused")
    else:
        from crossret.textimage import gckd, propagation

        losses = gckd.GckdTrainer.losses

        def _losses(self: Any, batch: Any) -> Any:
            hooks.gckd_step, hooks.graph_calls = self.step, 0  # trainer.step: restored on resume
            return losses(self, batch)

        gckd.GckdTrainer.losses = _losses
        for module in (gckd, propagation):
            original = module.knn_graph

            def knn_graph(*args: Any, _o: Any = original, **kwargs: Any) -> Any:
                hooks.graph_calls += 1
                hooks.event("graph", hooks.gckd_step, hooks.graph_calls)
                return _o(*args, **kwargs)

            module.knn_graph = knn_graph


# ---------------------------------------------------------------------------------------------- forked jobs
def spawn(job: Any, log_path: Path, modules_out: Path | None = None, timeout: int = 300) -> int:
    """Run ``job()`` in a forked child (stdout/stderr to ``log_path``) and return its pid at once. The
    child exits with ``job()``'s code; past ``timeout`` seconds it dies of SIGALRM instead of hanging the
    test. ``modules_out`` receives the names of the modules it imported (see :func:`warm_up`)."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return pid
    code = 1  # the child: never returns
    imported = set(sys.modules)
    signal.alarm(timeout)
    try:
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        import torch

        torch.set_num_threads(1)
        code = job()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        if modules_out is not None:
            modules_out.write_text("\n".join(sorted(set(sys.modules) - imported)), encoding="utf-8")
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def fork(job: Any, log_path: Path, modules_out: Path | None = None, timeout: int = 300) -> int:
    """:func:`spawn` and wait: the child's exit code, or ``-signal`` (``-SIGKILL``, ``-SIGALRM``)."""
    _, status = os.waitpid(spawn(job, log_path, modules_out, timeout), 0)
    return os.waitstatus_to_exitcode(status)


def killed_from_outside(job: Any, log_path: Path, pid_file: Path, exited_file: Path, ready_file: Path) -> int:
    """Spawn ``job`` and publish its pid in ``pid_file`` for the test, which SIGKILLs it and then writes
    ``ready_file``. The child is reaped only after that: until then its pid (a zombie once it ended) stays
    this child's, so the test's kill can never reach another process. ``exited_file`` tells the test
    that the child ended (killed, or on its own). Returns its exit code (``-SIGKILL`` when killed)."""
    pid = spawn(job, log_path)
    pid_file.write_text(str(pid), encoding="utf-8")
    os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)  # ended; not reaped yet
    exited_file.write_text("", encoding="utf-8")
    deadline = time.monotonic() + 300
    while not ready_file.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


# What the runs import lazily and slowly (seconds each): imported before the first child.
WARM_UP = ("torch._dynamo", "sklearn.model_selection", "sklearn.decomposition", "sklearn.linear_model", "numba",
           "faiss", "scipy.sparse.linalg", "scipy.stats", "crossret.hashing", "crossret.hashing.itq",
           "crossret.retrieval.metrics", "crossret.data", "tokenizers", "PIL.Image")


def warm_up(modules: Path | tuple[str, ...]) -> int:
    """Import in this parent what a child imports lazily (torch._dynamo for the optimizers, sklearn, faiss,
    numba, ...), so that later children inherit it instead of importing it again, each one. ``modules``:
    names, or a file listing what a child imported (:func:`fork`'s ``modules_out``)."""
    import importlib
    import warnings

    names = modules if isinstance(modules, tuple) else modules.read_text(encoding="utf-8").split()
    count = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in names:
            if name in sys.modules or name.startswith("__"):
                continue
            try:
                importlib.import_module(name)
                count += 1
            except Exception:  # not importable on its own (an alias, a generated module)
                continue
    return count


def cli_job(argv: list[str], hooks_args: dict[str, Any] | None, kind: str):
    def job() -> int:
        if hooks_args is not None:
            install_hooks(kind, Hooks(**hooks_args))
        from crossret.cli import main

        sys.argv = ["crossret", *argv]
        main()
        return 0

    return job


def json_job(out: Path, fn: Any):
    def job() -> int:
        out.write_text(json.dumps(fn(), default=str), encoding="utf-8")
        return 0

    return job


# ---------------------------------------------------------------------------------------------- readers
def strip_timings(obj: Any) -> Any:
    """``obj`` without wall-clock timings (keys ending in ``seconds``) and the keys of ``TIMING_KEYS``."""
    if isinstance(obj, dict):
        return {k: strip_timings(v) for k, v in obj.items()
                if not (str(k).endswith("seconds") or k in TIMING_KEYS)}
    if isinstance(obj, (list, tuple)):
        return [strip_timings(v) for v in obj]
    return obj


def diff(a: Any, b: Any, where: str = "") -> list[str]:
    """Paths where ``a`` and ``b`` differ, bit for bit (tensors and arrays by dtype, shape and bytes)."""
    import numpy as np
    import torch

    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or a.dtype != b.dtype \
                or a.shape != b.shape:
            return [where]
        bits = [t.detach().cpu().reshape(-1).contiguous().view(torch.uint8) for t in (a, b)]
        return [] if torch.equal(*bits) else [where]
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        a, b = np.asarray(a), np.asarray(b)
        same = a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
        return [] if same else [where]
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return [f"{where}{{keys: {sorted(map(str, set(a) ^ set(b)))}}}"]
        return [d for k in a for d in diff(a[k], b[k], f"{where}/{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{where}[len {len(a)} != {len(b)}]"]
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in diff(x, y, f"{where}[{i}]")]
    if isinstance(a, float) and isinstance(b, float):
        return [] if a == b or (math.isnan(a) and math.isnan(b)) else [where]
    return [] if type(a) is type(b) and a == b else [where]


class Reader:
    """Loads a run directory's files with the library's own readers (format-agnostic)."""

    def __init__(self, kind: str, reference: Path) -> None:
        import yaml

        self.kind = kind
        self.reference = reference
        self.epoch: int | None = None  # of the last checkpoint loaded
        self.ref_config = yaml.safe_load((reference / "config.yaml").read_text(encoding="utf-8"))

    # -- checkpoints
    def checkpoint(self, run_dir: Path) -> dict[str, Any]:
        if self.kind == "gckd":
            from crossret.textimage.gckd import read_checkpoint

            return read_checkpoint(run_dir / CHECKPOINT)
        import torch

        from crossret.experiment import RunConfig, load_split
        from crossret.hashing import make_method
        from crossret.hashing.couple import _data_fingerprint

        config = RunConfig.from_yaml(self.reference / "config.yaml")
        split = load_split(config)
        method = make_method("couple", bits=config.bits, seed=config.seed, overrides=config.method_config)
        method.checkpoint_dir = run_dir / "checkpoints"
        source, target = split.source, split.training_target()
        torch.manual_seed(12345)  # a net of the right shape; _restore overwrites every weight
        net = method._build(source.dim, int(source.labels.max()) + 1)
        optimizer = torch.optim.Adam(net.parameters(), lr=method.config.lr, weight_decay=method.config.weight_decay)
        generator = torch.Generator()
        restored = method._restore(net, optimizer, generator, _data_fingerprint(source, target))
        if restored is None:
            raise FileNotFoundError(run_dir / CHECKPOINT)
        epoch, selection, epoch_log, numpy_rng = restored
        return {"epoch": epoch, "model": net.state_dict(), "optimizer": optimizer.state_dict(),
                "generator": generator.get_state(), "numpy_rng": numpy_rng, "epoch_log": strip_timings(epoch_log),
                "selection": None if selection is None else {
                    "pseudo_labels": selection.pseudo_labels, "selected": selection.selected,
                    "graph": None if selection.graph is None else
                    [selection.graph.indptr, selection.graph.indices, selection.graph.data]},
                "history": method.selection_history}

    def model(self, path: Path) -> dict[str, Any]:
        if self.kind == "gckd":
            from crossret.textimage.albef import AlbefConfig
            from crossret.textimage.checkpoint import load_albef_checkpoint

            return {"state": load_albef_checkpoint(path, AlbefConfig.from_dict(self.ref_config["albef"]))
                    .model.state_dict()}
        from crossret.hashing.persistence import read_method_file

        header, arrays, state_dict = read_method_file(path, expected_method="couple")
        return {"header": strip_timings(header), "arrays": arrays, "state": state_dict}

    def load(self, run_dir: Path, rel: str) -> str | None:
        """Load one file; ``None`` when it is fine, else what is wrong."""
        import numpy as np
        import yaml

        path = run_dir / rel
        try:
            name = path.name
            if rel == CHECKPOINT:
                self.epoch = int(self.checkpoint(run_dir)["epoch"])
            elif name == "model.pt":
                self.model(path)
            elif name.endswith(".npy"):
                np.load(path, allow_pickle=False)
            elif name.endswith(".json"):
                json.loads(path.read_text(encoding="utf-8"))
            elif name.endswith(".yaml"):
                if not isinstance(yaml.safe_load(path.read_text(encoding="utf-8")), dict):
                    return "not a mapping"
            elif name == "vocab.txt":
                from crossret.textimage.tokenize import CaptionTokenizer

                CaptionTokenizer.from_vocab(path, max_length=16)
                if path.read_bytes() != (self.reference / rel).read_bytes():
                    return "differs from the reference run's vocabulary"
            elif name.endswith(".log"):
                path.read_bytes().decode("utf-8")
            else:
                return None  # unknown (e.g. a newer file kind): reported by the listing, not loaded
        except Exception as exc:  # any failure to load is the finding
            return f"{type(exc).__name__}: {exc}"
        return None


def check_run_dir(reader: Reader, run_dir: Path) -> dict[str, Any]:
    """Every file of ``run_dir``: loads or not; leftover temporaries; the run's invariants."""
    files = sorted(p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*") if p.is_file())
    temporaries = [f for f in files if Path(f).name.startswith(".") and f.endswith(".tmp")]
    errors = {f: e for f in files if f not in temporaries and (e := reader.load(run_dir, f)) is not None}
    present = set(files)
    problems = []
    if CHECKPOINT in present and "config.yaml" not in present:
        problems.append("a checkpoint without config.yaml: a resume cannot check its configuration")
    finished = "metrics.json" in present
    if finished:
        needed = ["model.pt", "config.yaml", CHECKPOINT]
        if reader.kind == "couple":
            needed += [f"codes/{s}_{k}.npy" for s in ("queries", "source", "target_train") for k in ("codes", "labels")]
        else:
            needed += ["vocab.txt"]
        problems += [f"metrics.json present but {f} missing" for f in needed if f not in present]
    epoch = reader.epoch if CHECKPOINT in present and CHECKPOINT not in errors else None
    return {"files": files, "temporaries": temporaries, "errors": errors, "problems": problems,
            "finished": finished, "epoch": epoch}


def compare_runs(reader: Reader, run_dir: Path, reference: Path) -> dict[str, Any]:
    """Differences between a resumed run directory and the uninterrupted reference."""
    out: dict[str, list[str]] = {}
    out["checkpoint"] = diff(reader.checkpoint(run_dir), reader.checkpoint(reference))
    out["model"] = diff(reader.model(run_dir / "model.pt"), reader.model(reference / "model.pt"))
    for rel in ("metrics.json",):
        a, b = (json.loads((d / rel).read_text(encoding="utf-8")) for d in (run_dir, reference))
        out[rel] = diff(strip_timings(a), strip_timings(b))
    for rel in sorted(p.relative_to(reference).as_posix() for p in reference.rglob("*")
                      if p.suffix == ".npy" or p.name == "vocab.txt"):
        same = (run_dir / rel).is_file() and (run_dir / rel).read_bytes() == (reference / rel).read_bytes()
        out[rel] = [] if same else ["bytes differ"]
    return out


# ---------------------------------------------------------------------------------------------- main
def run_scenario(scenario: dict[str, Any], work: Path) -> dict[str, Any]:
    """Reference, the seeded kills and the final resume of one scenario (see the module docstring)."""
    kind, argv = scenario["kind"], list(scenario["argv"])
    ref, run, logs = work / "reference", work / "run", work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    report: dict[str, Any] = {"attempts": [], "warmed_up": 0}

    def attempt(name: str, out_dir: Path, target: list[Any] | None, start_epoch: int, record: bool = True,
                modules_out: Path | None = None) -> dict:
        trace = logs / f"{name}.trace"
        hooks = ({"run_dir": out_dir, "trace_path": trace, "target": target, "start_epoch": start_epoch}
                 if record else None)
        t0 = time.perf_counter()
        code = fork(cli_job([*argv, "--out", str(out_dir), "--resume"], hooks, kind), logs / f"{name}.log",
                    modules_out)
        events = ([json.loads(line) for line in trace.read_text(encoding="utf-8").splitlines()]
                  if trace.is_file() else [])
        return {"name": name, "target": target, "exit": code, "last_event": events[-1] if events else None,
                "events": len(events), "seconds": round(time.perf_counter() - t0, 3)}

    def check(run_dir: Path, name: str, modules_out: Path | None = None) -> dict[str, Any]:
        out = logs / f"{name}.check.json"
        code = fork(json_job(out, lambda: check_run_dir(Reader(kind, ref), run_dir)), logs / f"{name}.check.log",
                    modules_out)
        if code != 0:
            return {"checker_failed": (logs / f"{name}.check.log").read_text()[-3000:]}
        return json.loads(out.read_text(encoding="utf-8"))

    def finish(run_dir: Path, name: str, before: dict[str, Any]) -> dict[str, Any]:
        result = {"name": name, "skipped": "finished by a kill"} if before.get("finished") else \
            attempt(name, run_dir, None, before.get("epoch") or 0, record=False)
        result["check"] = check(run_dir, name)
        out = logs / f"{name}.compare.json"
        code = fork(json_job(out, lambda: compare_runs(Reader(kind, ref), run_dir, ref)), logs / f"{name}.cmp.log")
        result["compare"] = (json.loads(out.read_text(encoding="utf-8")) if code == 0 else
                             {"comparison failed": [(logs / f"{name}.cmp.log").read_text()[-3000:]]})
        return result

    if scenario.get("external"):  # a run the test kills from outside after a delay of its choice; resumed last
        external = Path(scenario["external"])
        report["external_run"] = {"exit": killed_from_outside(
            cli_job([*argv, "--out", str(external), "--resume"], None, kind), logs / "external-killed.log",
            Path(scenario["external_pid"]), Path(scenario["external_exited"]), Path(scenario["external_ready"]))}
    report["reference"] = reference = attempt("reference", ref, None, 0, modules_out=logs / "reference.modules")
    if reference["exit"] != 0:
        report["error"] = f"the reference run failed: {(logs / 'reference.log').read_text()[-3000:]}"
        return report
    trace = [json.loads(line) for line in (logs / "reference.trace").read_text(encoding="utf-8").splitlines()]
    report["trace_categories"] = {k: len(v) for k, v in classify(trace).items()}
    report["plan"] = kills = draw_plan(trace, scenario["seed"], scenario["required"], scenario["extra"],
                                       scenario.get("startup", 1))
    report["warmed_up"] += warm_up(logs / "reference.modules")
    reference["check"] = check(ref, "reference", logs / "reference.check.modules")
    report["warmed_up"] += warm_up(logs / "reference.check.modules")
    report["setup_seconds"] = round(time.perf_counter() - started, 2)

    state: dict[str, Any] = {"epoch": None, "finished": False}
    for i, target in enumerate(kills):
        if state.get("finished"):
            report["attempts"].append({"name": f"kill{i}", "target": target, "skipped": "run already finished"})
            continue
        result = attempt(f"kill{i}", run, target, state.get("epoch") or 0)
        state = result["check"] = check(run, f"kill{i}")
        report["attempts"].append(result)
    report["final"] = finish(run, "final", state)

    if scenario.get("external"):
        report["external_before"] = check(external, "external-before")
        report["external"] = finish(external, "external", report["external_before"])
    report["seconds"] = round(time.perf_counter() - started, 2)
    return report


def trainers_remove_stale_temporaries(work: Path) -> dict[str, Any]:
    """The trainers' own clean-up (Python API, no run directory): ``fit(resume=True)`` on a checkpoint
    directory holding the leftover of a killed checkpoint write and an unrelated file."""
    import numpy as np

    from crossret.data.domain import Domain
    from crossret.hashing.couple import Couple, CoupleConfig
    from crossret.textimage.feature_heads import FeatureHeadsConfig, FeatureHeadsModel
    from crossret.textimage.gckd import GckdConfig, GckdTrainer
    from crossret.textimage.streams import FeatureTrainingData

    def planted(name: str) -> tuple[Path, Path, Path]:
        directory = work / name
        directory.mkdir(parents=True)
        stale, other = directory / ".checkpoint.pt.k1ll_d42.tmp", directory / "notes.tmp"
        stale.write_bytes(b"PK\x03\x04 half a checkpoint")
        other.write_text("not ours", encoding="utf-8")
        return directory, stale, other

    out = {}
    rng = np.random.default_rng(0)
    directory, stale, other = planted("couple")
    labels = np.repeat(np.arange(2), 10)
    method = Couple(8, config=CoupleConfig(epochs=1, warmup_epochs=1, batch_size=8, target_batch_size=8,
                                           hash_hidden=8, encoder_dim=8))
    method.checkpoint_dir, method.resume = directory, True
    method.fit(Domain("s", rng.normal(size=(20, 4)), labels), Domain("t", rng.normal(size=(20, 4)), labels * 0 - 1))
    out["couple"] = {"stale_removed": not stale.exists(), "other_kept": other.exists(),
                     "checkpoint_written": (directory / CHECKPOINT_NAME).is_file()}

    directory, stale, other = planted("gckd")
    model = FeatureHeadsModel(FeatureHeadsConfig(image_dim=6, text_dim=5, embed_dim=8, hidden_dim=8, fusion_dim=8))
    data = FeatureTrainingData(rng.normal(size=(8, 6)), rng.normal(size=(8, 5)), np.repeat(np.arange(4), 2),
                               target_image=rng.normal(size=(4, 6)), target_text=rng.normal(size=(4, 5)),
                               ids_per_batch=2, pairs_per_id=2, target_batch=4)
    config = GckdConfig.from_dict({"epochs": 1, "ids_per_batch": 2, "pairs_per_id": 2, "target_batch": 4,
                                   "memory_size": 8, "knn_k": 3})
    GckdTrainer(model, config, checkpoint_dir=directory).fit(data, resume=True)
    out["gckd"] = {"stale_removed": not stale.exists(), "other_kept": other.exists(),
                   "checkpoint_written": (directory / CHECKPOINT_NAME).is_file()}
    return out


def main(plan_path: str) -> None:
    """``PLAN.json``: ``{"work": DIR, "report": FILE, "scenarios": {name: {kind, argv, seed, required, extra,
    startup, [external, external_pid, external_exited, external_ready]}}, ["person_datasets": {style: DIR},
    "person_dataset_options": {...}]}``; writes ``{"scenarios": {name: report}, "trainers": {...}}`` to
    ``report``."""
    plan = json.loads(Path(plan_path).read_text(encoding="utf-8"))
    started = time.perf_counter()
    # Import everything once in this parent; the forked children inherit it.
    import crossret.cli
    import crossret.experiment
    import crossret.hashing.couple
    import crossret.textimage.pipeline  # noqa: F401

    out: dict[str, Any] = {"warmed_up": warm_up(WARM_UP), "import_seconds": round(time.perf_counter() - started, 2),
                           "scenarios": {}}
    if plan.get("person_datasets"):  # generated here, where crossret is imported already
        from crossret.data.synthetic_person import generate_person_dataset

        options = {k: tuple(v) if isinstance(v, list) else v for k, v in plan.get("person_dataset_options", {}).items()}
        for style, where in plan["person_datasets"].items():
            generate_person_dataset(style, where, **options)
    for name, scenario in plan["scenarios"].items():
        try:
            out["scenarios"][name] = run_scenario(scenario, Path(plan["work"]) / name)
        except Exception:  # reported to the test, which fails naming it
            out["scenarios"][name] = {"error": traceback.format_exc()}
    api = Path(plan["work"]) / "api"
    api.mkdir(parents=True, exist_ok=True)
    code = fork(json_job(api / "report.json", lambda: trainers_remove_stale_temporaries(api)), api / "log.txt")
    out["trainers"] = (json.loads((api / "report.json").read_text(encoding="utf-8")) if code == 0 else
                       {"error": (api / "log.txt").read_text(encoding="utf-8")[-3000:]})
    out["seconds"] = round(time.perf_counter() - started, 2)
    Path(plan["report"]).write_text(json.dumps(out, indent=1, default=str), encoding="utf-8")


if __name__ == "__main__":
    main(sys.argv[1])
