"""``benchmarks/gckd.py --regenerate``: every re-makeable row is re-run with its recorded config, the runs file is
replaced (recorded order, other rows byte for byte) only once all are redone, an interrupted regeneration
resumes, and the summary names the rows that moved. Spy run functions stand in for training; one test runs the
real synthetic pipeline at toy sizes."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
_NAME = "gckd_benchmark_regenerate"
_SPEC = importlib.util.spec_from_file_location(_NAME, BENCHMARKS / "gckd.py")
bench = importlib.util.module_from_spec(_SPEC)
sys.modules[_NAME] = bench
_SPEC.loader.exec_module(bench)

DIGESTS = {v: bench.generic_spec(v)[1] for v in (bench.SYNTH_VERSION, bench.SYNTH_V3_VERSION)}


def _metrics(value: float) -> dict[str, Any]:
    return {"rank1": value, "rank5": value, "rank10": value, "map": value, "minp": value / 2}


def _row(part: str, setting: str, variant: str, seed: int, value: float, version: int | None = None,
         **extra: Any) -> dict[str, Any]:
    """A recorded row: ``version`` None = wiki, 1 = synthetic v1 (no ``synth_version``), 2 / 3 = today's."""
    config = {"epochs": 4, "kd_weight": 0.0 if variant == "source-only" else 1.0, "seed": seed,
              "marker": f"{setting}|{variant}|{seed}|{version}"}  # only the spies read it
    row: dict[str, Any] = {"part": part, "setting": setting, "variant": variant, "seed": seed,
                           "itc": _metrics(value), "itm": _metrics(value + 0.01), "rerank_score": "itm",
                           "train_seconds": 1.0, "pseudo_pairs_per_step": 2.0, "pseudo_pair_precision": 0.1,
                           "config": config, "host": {"node": "recorded"}}
    if part == "wiki":
        row["pretrain_epochs"] = bench.WIKI["pretrain_epochs"]
    else:
        proto = bench.SYNTH if version in (1, 2) else bench.SYNTH_V3
        row.update(pretrain_epochs=proto["pretrain_epochs"], generic_digest=DIGESTS.get(version),
                   synthetic={k: proto[k] for k in ("train_ids", "test_ids", "images_per_id")})
        if version != 1:
            row["synth_version"] = version
        if version == 3:
            config.update(epochs=proto["adapt_epochs"], **bench._adapt_settings(3, variant))
            row.update(rerank_k=proto["rerank_k"])
    row.update(extra)
    return row


def _recorded() -> list[dict[str, Any]]:
    wiki = "wiki 0-4 -> 5-9"
    return [
        _row("synth", "C->I", "gckd", 0, 0.05, 1, code_note="INVALID (superseded code)"),  # v1: kept
        _row("wiki", wiki, "source-only", 0, 0.30),
        _row("synth", "C->I", "source-only", 0, 0.10, 2),
        _row("synth", "C->I", "gckd", 0, 0.11, 2),
        _row("wiki", wiki, "gckd", 0, 0.31),
        _row("synth", "C->R", "gckd", 0, 0.12, 2),  # (C->R, source-only) seed 0 is not recorded: not run
        _row("synth", "C->I", "gckd", 0, 0.20, 3),
        _row("synth", "C->I", "source-only", 1, 0.13, 2, generic_digest="0123456789ab"),  # another generic: kept
        _row("synth", "C->I", "source-only", 0, 0.19, 3),
        _row("synth", "C->I", "gckd", 0, 0.21, 3, pretrain_epochs=99),  # another v3 configuration, same key: kept
        _row("synth", "I->C", "no-cmkd", 1, 0.14, 2),
        _row("synth", "C->I", "source-only", 0, 0.04, 1),  # v1: kept
    ]


KEPT = {0, 7, 9, 11}  # indices of the rows this code cannot re-make
MOVE = {3: 0.015, 4: -0.02, 6: 0.03}  # fresh = recorded + delta on ITC mAP (the others reproduce exactly)


class Spy:
    """Stand-ins for run_wiki / run_synth: record each job, make each of its rows from the recorded config it
    was given (fresh metrics = recorded + :data:`MOVE`), record them as the real functions do; ``fail_after``
    rows, raise (an interruption)."""

    def __init__(self, recorded: list[dict[str, Any]], fail_after: int | None = None) -> None:
        self.by_marker = {r["config"]["marker"]: (i, r) for i, r in enumerate(recorded) if i not in KEPT}
        self.jobs: list[dict[str, Any]] = []
        self.made: list[str] = []
        self.fail_after = fail_after

    def _make(self, job: dict[str, Any], setting: str, variant: str, version: int | None) -> dict[str, Any]:
        if self.fail_after is not None and len(self.made) >= self.fail_after:
            raise RuntimeError("interrupted")
        config = job["configs"][bench._config_key(setting, variant)]
        i, old = self.by_marker[config["marker"]]
        assert (old["setting"], old["variant"], old["seed"], old.get("synth_version")) == (
            setting, variant, job["seed"], version)
        value = old["itc"]["map"] + MOVE.get(i, 0.0)
        row = {**old, "itc": _metrics(value), "config": {**config, "resolved": True}, "host": {"node": "fresh"}}
        self.made.append(config["marker"])
        bench._record(job, row)
        return row

    def wiki(self, job: dict[str, Any]) -> list[dict[str, Any]]:
        self.jobs.append(job)
        return [self._make(job, bench.WIKI_SETTING, v, None) for v in job["variants"]]

    def synth(self, job: dict[str, Any]) -> list[dict[str, Any]]:
        self.jobs.append(job)
        assert job["generic"]["digest"] == DIGESTS[job["version"]]
        done = {tuple(d) for d in job["done"]}
        return [self._make(job, f"{job['source']}->{t}", v, job["version"])
                for t in job["targets"] for v in job["variants"] if (f"{job['source']}->{t}", v) not in done]


@pytest.fixture
def setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    monkeypatch.setenv("CROSSRET_BENCH_NUMERICS", "native")
    monkeypatch.setattr(bench, "CACHE", tmp_path / "cache")
    monkeypatch.setattr(bench, "_run_jobs", lambda jobs, workers: [fn(job) for fn, job in jobs])  # in-process
    monkeypatch.setattr(bench, "caption_uniqueness_table", lambda seeds: {})
    generic_calls: list[int] = []

    def generic(cache: Path = bench.CACHE, threads: int = 1, version: int = 2) -> dict[str, Any]:
        generic_calls.append(version)
        return {"digest": DIGESTS[version], "run_dir": str(cache / str(version)), "train_seconds": 1.0,
                "generic_test": _metrics(0.5)}

    monkeypatch.setattr(bench, "generic_pretraining", generic)
    out = tmp_path / "results" / "gckd"
    out.parent.mkdir()
    runs = tmp_path / "results" / "gckd_runs.jsonl"
    recorded = _recorded()
    runs.write_text("".join(json.dumps(r) + "\n" for r in recorded))

    def install(spy: Spy) -> Spy:
        monkeypatch.setattr(bench, "run_wiki", spy.wiki)
        monkeypatch.setattr(bench, "run_synth", spy.synth)
        return spy

    return {"out": out, "runs": runs, "recorded": recorded, "generic_calls": generic_calls, "install": install,
            "args": ["--regenerate", "--out", str(out), "--data-dir", str(tmp_path)]}


def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def test_every_remakeable_row_is_rerun_with_its_recorded_config_in_order(setup: dict[str, Any]) -> None:
    recorded, runs = setup["recorded"], setup["runs"]
    before = _lines(runs)
    spy = setup["install"](Spy(recorded))
    assert bench.main(setup["args"]) == 0
    remakeable = [r["config"]["marker"] for i, r in enumerate(recorded) if i not in KEPT]
    assert sorted(spy.made) == sorted(remakeable)  # each re-makeable row once, nothing else
    # one job per (part, version, seed, source): the source pre-training is shared by its rows
    groups = sorted(((j.get("version"), j["seed"], j.get("source"), tuple(j["variants"]), tuple(j.get("targets", ())),
                      tuple(map(tuple, j.get("done", [])))) for j in spy.jobs), key=str)
    assert groups == sorted([(None, 0, None, ("source-only", "gckd"), (), ()),
                             (2, 0, "C", ("source-only", "gckd"), ("I", "R"), (("C->R", "source-only"),)),
                             (2, 1, "I", ("no-cmkd",), ("C",), ()),
                             (3, 0, "C", ("gckd", "source-only"), ("I",), ())], key=str)
    assert [j["data_dir"] for j in spy.jobs if "source" not in j] == [str(runs.parent.parent)]
    assert sorted(setup["generic_calls"]) == [2, 3]  # each protocol's generic model once, none for v1
    after = _lines(runs)
    assert len(after) == len(recorded)
    for i, (old, line) in enumerate(zip(recorded, after, strict=True)):
        if i in KEPT:
            assert line == before[i]  # byte for byte
        else:
            new = json.loads(line)
            assert new["host"] == {"node": "fresh"} and new["config"] == {**old["config"], "resolved": True}
            assert new["itc"]["map"] == pytest.approx(old["itc"]["map"] + MOVE.get(i, 0.0))
    assert not bench._repro.regenerating_path(runs).exists()
    report = json.loads((setup["out"].parent / "gckd_regenerate.json").read_text())
    assert report["regenerated"] == len(remakeable) and report["kept"] == len(KEPT)
    assert report["moved"] == len(MOVE) and report["unchanged"] == len(remakeable) - len(MOVE)
    assert report["kept_by_reason"] == {"synthetic protocol v1 (trained from scratch)": 2,
                                        "synthetic protocol v2 of another configuration or generic model": 1,
                                        "synthetic protocol v3 of another configuration or generic model": 1}
    moved = {(r["part"], r["synth_version"], r["setting"], r["variant"]): r for r in report["rows"]
             if not r["reproduced"]}
    assert set(moved) == {("synth", 2, "C->I", "gckd"), ("wiki", None, "wiki 0-4 -> 5-9", "gckd"),
                          ("synth", 3, "C->I", "gckd")}
    wiki = moved[("wiki", None, "wiki 0-4 -> 5-9", "gckd")]
    assert wiki["values"]["itc_map"] == {"recorded": 0.31, "now": pytest.approx(0.29)}
    assert wiki["values"]["itm_map"]["recorded"] == wiki["values"]["itm_map"]["now"] == 0.32
    assert set(wiki["moved"]) == {"itc_map", "itc_rank1", "itc_rank5", "itc_rank10", "itc_minp"}
    assert report["headline_deltas"]["itc_map"]["max_abs_delta"] == pytest.approx(0.03)
    text = (setup["out"].parent / "gckd_regenerate.md").read_text()
    assert "| wiki | - | wiki 0-4 -> 5-9 | gckd | 0 | 0.31 → 0.29 | 0.32 → 0.32 |" in text
    # the tables are rewritten from the new rows
    summary = {(e["part"], e["setting"], e["variant"]): e
               for e in json.loads((setup["out"].parent / "gckd.json").read_text())["summary"]}
    assert summary[("wiki", "wiki 0-4 -> 5-9", "gckd")]["itc_map_mean"] == pytest.approx(0.29)
    v3 = json.loads((setup["out"].parent / "gckd_v3_summary.json").read_text())
    assert v3["variants"]["gckd"]["delta_itc"]["mean"] == pytest.approx(100 * (0.23 - 0.19))


def test_an_interrupted_regeneration_leaves_the_runs_file_and_resumes(setup: dict[str, Any]) -> None:
    runs, recorded = setup["runs"], setup["recorded"]
    before = runs.read_bytes()
    first = setup["install"](Spy(recorded, fail_after=3))
    with pytest.raises(RuntimeError, match="interrupted"):
        bench.main(setup["args"])
    assert runs.read_bytes() == before  # untouched until every row is redone
    partial = bench._repro.regenerating_path(runs)
    assert [json.loads(line)["config"]["marker"] for line in _lines(partial)] == first.made
    assert not (setup["out"].parent / "gckd_regenerate.json").exists()
    second = setup["install"](Spy(recorded))
    assert bench.main(setup["args"]) == 0
    assert not set(second.made) & set(first.made)  # the rows already redone are skipped
    assert sorted(first.made + second.made) == sorted(r["config"]["marker"] for i, r in enumerate(recorded)
                                                      if i not in KEPT)
    after = [json.loads(line) for line in _lines(runs)]
    assert [bench._row_key(r) for r in after] == [bench._row_key(r) for r in recorded]  # recorded order
    assert all(r["host"] == {"node": "fresh"} for i, r in enumerate(after) if i not in KEPT)
    assert not partial.exists()
    assert json.loads((setup["out"].parent / "gckd_regenerate.json").read_text())["moved"] == len(MOVE)


def test_parts_and_protocol_restrict_what_is_rerun(setup: dict[str, Any]) -> None:
    runs, recorded = setup["runs"], setup["recorded"]
    before = _lines(runs)
    spy = setup["install"](Spy(recorded))
    assert bench.main([*setup["args"], "--protocol", "v3"]) == 0  # the v3 synthetic rows only
    assert sorted(spy.made) == sorted(recorded[i]["config"]["marker"] for i in (6, 8))
    after = _lines(runs)
    assert [i for i, (a, b) in enumerate(zip(before, after, strict=True)) if a != b] == [6, 8]
    report = json.loads((setup["out"].parent / "gckd_regenerate.json").read_text())
    assert [(r["setting"], r["variant"], r["reproduced"]) for r in report["rows"]] == [
        ("C->I", "gckd", False), ("C->I", "source-only", True)]  # recorded order
    assert report["kept_by_reason"]["outside --parts / --protocol"] == 6
    spy = setup["install"](Spy(recorded))
    assert bench.main([*setup["args"], "--parts", "wiki"]) == 0
    assert sorted(spy.made) == sorted(recorded[i]["config"]["marker"] for i in (1, 4))
    assert setup["generic_calls"] == [3]  # no synthetic row to run: no generic model made


def test_the_runs_file_is_left_alone_when_written_meanwhile(setup: dict[str, Any]) -> None:
    runs, recorded = setup["runs"], setup["recorded"]
    spy = setup["install"](Spy(recorded))
    appended = json.dumps(_row("synth", "R->I", "gckd", 5, 0.5, 1)) + "\n"
    original = spy.wiki

    def wiki_and_another_writer(job: dict[str, Any]) -> list[dict[str, Any]]:
        with runs.open("a") as handle:  # a benchmark invocation appending a row
            handle.write(appended)
        return original(job)

    spy.wiki = wiki_and_another_writer  # type: ignore[method-assign]
    setup["install"](spy)
    with pytest.raises(SystemExit, match="changed during the regeneration"):
        bench.main(setup["args"])
    assert runs.read_text() == "".join(json.dumps(r) + "\n" for r in recorded) + appended
    again = setup["install"](Spy(recorded))
    assert bench.main(setup["args"]) == 0
    assert again.made == []  # everything was in the partial file
    assert _lines(runs)[-1] == appended.strip() and len(_lines(runs)) == len(recorded) + 1


def test_remakeable_rows_recorded_twice_are_refused(setup: dict[str, Any]) -> None:
    runs, recorded = setup["runs"], setup["recorded"]
    runs.write_text("".join(json.dumps(r) + "\n" for r in [*recorded, recorded[2]]))
    setup["install"](Spy(recorded))
    with pytest.raises(SystemExit, match="recorded twice"):
        bench.main(setup["args"])


TOY = {"pretrain_epochs": 1, "adapt_epochs": 1, "train_ids": 6, "test_ids": 3, "images_per_id": 2, "rerank_k": 3,
       "generic": {**bench.SYNTH_V3["generic"], "n_ids": 16, "n_test_ids": 3, "epochs": 1, "vocab_size": 200,
                   "batch": {"ids_per_batch": 8, "pairs_per_id": 2}},
       "train": {**bench.SYNTH_V3["train"], "ids_per_batch": 3, "pairs_per_id": 2, "target_batch": 4,
                 "memory_size": 8}}


def test_real_synthetic_rows_reproduce_and_run_with_their_recorded_config(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("tokenizers")
    for key, value in TOY.items():
        monkeypatch.setitem(bench.SYNTH_V3, key, value)
    monkeypatch.setattr(bench, "CACHE", tmp_path / "cache")
    monkeypatch.setattr(bench, "_run_jobs", lambda jobs, workers: [fn(job) for fn, job in jobs])
    monkeypatch.setenv("CROSSRET_BENCH_NUMERICS", "native")
    out = tmp_path / "results" / "gckd"
    out.parent.mkdir()
    assert bench.main(["--protocol", "v3", "--settings", "C->I", "--seeds", "3", "--variants", "source-only", "gckd",
                       "--out", str(out)]) == 0
    runs = out.parent / "gckd_runs.jsonl"
    recorded = bench._read_runs(runs)
    # a row recorded before warm_start_banks existed: it runs with the trainer of then (no warm start)
    gckd = next(r for r in recorded if r["variant"] == "gckd")
    assert gckd["config"]["warm_start_banks"] is True
    del gckd["config"]["warm_start_banks"]
    runs.write_text("".join(json.dumps(r) + "\n" for r in recorded))
    assert bench.main(["--regenerate", "--out", str(out)]) == 0
    fresh = bench._read_runs(runs)
    assert [bench._row_key(r) for r in fresh] == [bench._row_key(r) for r in recorded]
    assert fresh[0]["config"] == recorded[0]["config"]
    new_gckd = next(r for r in fresh if r["variant"] == "gckd")
    assert new_gckd["config"] == {**gckd["config"], "warm_start_banks": False}
    report = json.loads((out.parent / "gckd_regenerate.json").read_text())
    source_only = next(r for r in report["rows"] if r["variant"] == "source-only")
    assert source_only["reproduced"] and source_only["moved"] == {}  # same code, same numerics: exact
    assert fresh[0]["itc"] == recorded[0]["itc"] and fresh[0]["itm"] == recorded[0]["itm"]
    assert len(list((tmp_path / "cache").glob("gckd-generic-*/report.json"))) == 1  # the cached generic model


def test_compacted_runs_file_reads_back_the_same_rows(tmp_path: Path) -> None:
    """``config`` / ``environment`` stored once by digest in ``<out>_configs.json``: the rows read back are
    the rows written, and a row appended uncompacted afterwards (a worker) reads back as written too."""
    runs = tmp_path / "gckd_runs.jsonl"
    config, env = {"epochs": 4, "lr": 1e-3}, {"torch": "2.13.0", "cpu": "x"}
    host, sizes = {"node": "vm", "cpus": 2}, {"train_ids": 100, "test_ids": 250}
    rows = [{"part": "wiki", "seed": s, "variant": v, "config": config, "environment": env, "itc": {"map": 0.1 * s},
             "host": host, "synthetic": sizes} for s in range(3) for v in ("gckd", "source-only")]
    runs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    bench.compact_runs_file(runs)
    text = runs.read_text()
    for key in ("config", "environment", "host", "synthetic"):
        assert f'"{key}"' not in text
    assert text.count('"config_id"') == len(rows)  # a row's own
    # the fields every row of a source training shares sit in one record the rows name
    assert text.count('"shared_id"') == len(rows) and '"part"' not in text and '"host_id"' not in text
    records = json.loads(bench.configs_path(runs).read_text())
    assert len(records) == 5  # one record of each kind, and one shared record
    shared = records[json.loads(text.splitlines()[0])["shared_id"]]
    assert set(shared) == {"part", "environment_id", "host_id", "synthetic_id"} and shared["part"] == "wiki"
    assert bench._read_runs(runs) == rows
    extra = {**rows[0], "seed": 9}
    with runs.open("a") as handle:
        handle.write(json.dumps(extra) + "\n")
    assert bench._read_runs(runs) == [*rows, extra]
    bench.compact_runs_file(runs)
    assert bench._read_runs(runs) == [*rows, extra]


def test_compacting_drops_the_records_no_row_names_any_more(tmp_path: Path) -> None:
    """A regenerated row replaces its row (and config record) in place: the old record goes."""
    runs = tmp_path / "gckd_runs.jsonl"
    old, new, env = {"epochs": 4}, {"epochs": 4, "warm_start_banks": False}, {"torch": "2.13.0"}
    rows = [{"part": "wiki", "seed": s, "config": old, "environment": env} for s in range(2)]
    runs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    bench.compact_runs_file(runs)
    assert len(json.loads(bench.configs_path(runs).read_text())) == 3  # config, environment, shared fields
    rows = [{**r, "config": new} for r in rows]  # every row re-made with a new config
    runs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    bench.compact_runs_file(runs)
    records = json.loads(bench.configs_path(runs).read_text())
    shared = {"part": "wiki", "environment_id": next(k for k, v in records.items() if v == env)}
    by_text = lambda record: json.dumps(record, sort_keys=True)  # noqa: E731
    assert sorted(records.values(), key=by_text) == sorted([new, env, shared], key=by_text)
    assert bench._read_runs(runs) == rows


def test_check_samples_only_from_the_parts_asked_for(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--check N --parts wiki`` hands the check the Wikipedia rows only (default: every part)."""
    out = tmp_path / "gckd"
    runs = tmp_path / "gckd_runs.jsonl"
    rows = [{"part": part, "setting": s, "variant": "gckd", "seed": 0, "itc": {"map": 0.1}}
            for part, s in (("wiki", "wiki 0-4 -> 5-9"), ("synth", "C->I"))]
    runs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    seen: list[list[str]] = []

    def fake_check(rows: list[dict[str, Any]], *args: Any) -> int:
        seen.append([r["part"] for r in rows])
        return 0

    monkeypatch.setattr(bench, "check", fake_check)
    monkeypatch.setattr(bench._repro, "pin_numerics", lambda: None)
    monkeypatch.setenv("CROSSRET_DATA", str(tmp_path))
    assert bench.main(["--check", "1", "--parts", "wiki", "--out", str(out)]) == 0
    assert bench.main(["--check", "1", "--out", str(out)]) == 0
    assert seen == [["wiki"], ["wiki", "synth"]]
