"""Hostile command lines: every one ends in exit status 2 and one ``error:`` line naming the option or
file, never a traceback, a crash or runaway memory, and leaves nothing written.

Each case is a command over small files made by the fixture. Sizes far beyond the data or the machine
(``k``, ``nlist``, HNSW ``M``/``ef``, ``nflip``, ``--bits``, network widths, walk lengths, thread
counts) are refused before anything is allocated; bad shapes, dtypes, NaN, empty domains, label
mismatches and corrupt files are refused by the readers; user text in messages is printed literally.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest

from _cli import cli
from crossret.retrieval.index import BinaryIndex
from crossret.retrieval.packing import pack_codes


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """Small inputs: two domains, broken domains, ±1 codes and labels, saved indexes."""
    root = tmp_path_factory.mktemp("hostile")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 8)).astype(np.float32)
    y = np.arange(60) % 3
    np.savez(root / "src.npz", features=x, labels=y)
    np.savez(root / "tgt.npz", features=x + 0.1, labels=y)
    np.savez(root / "nan.npz", features=np.where(np.arange(480).reshape(60, 8) == 5, np.nan, x), labels=y)
    np.savez(root / "empty.npz", features=np.zeros((0, 8), np.float32), labels=np.zeros(0, np.int64))
    np.savez(root / "dim5.npz", features=x[:, :5], labels=y)
    np.savez(root / "labmis.npz", features=x, labels=y[:50])
    np.savez(root / "strlab.npz", features=x, labels=np.array(["a"] * 60))
    np.savez(root / "cube.npz", features=x.reshape(60, 2, 4), labels=y)
    np.savez(root / "onehot.npz", features=x, labels=np.eye(3)[y])
    np.savez(root / "other.npz", weights=x)
    (root / "corrupt.npz").write_bytes(b"PK\x03\x04" + b"garbage" * 20)
    (root / "corrupt.npy").write_bytes(b"\x93NUMPY garbage")
    (root / "short.csv").write_text("1,2,0\n3,4\n")
    codes = np.where(rng.normal(size=(50, 16)) >= 0, 1, -1).astype(np.int8)
    np.save(root / "codes.npy", codes)
    np.save(root / "q.npy", codes[:5])
    np.save(root / "q8.npy", codes[:5, :8])
    np.save(root / "lab.npy", np.arange(50) % 3)
    np.save(root / "qlab.npy", np.arange(5) % 3)
    np.save(root / "lab49.npy", np.arange(49) % 3)
    np.save(root / "nanlab.npy", np.full(50, np.nan))
    np.save(root / "realcodes.npy", rng.normal(size=(50, 16)))
    np.save(root / "codes3d.npy", np.ones((2, 3, 4)))
    with zipfile.ZipFile(root / "twoarrays.npy", "w") as archive:  # an .npz named .npy
        archive.writestr("a.npy", b"")
    codes64 = np.where(rng.normal(size=(50, 64)) >= 0, 1, -1).astype(np.int8)
    np.save(root / "codes64.npy", codes64)
    packed = pack_codes(codes)
    for kind in ("flat", "hnsw", "ivf"):
        BinaryIndex.from_packed(packed, 16, kind, **({"nlist": 2} if kind == "ivf" else {})).save(root / f"{kind}.crbi")
    (root / "garbage.crbi").write_bytes(b"CRBINIDX" + b"\x00" * 40)
    return root


# (case id, argv with {root} for the fixture folder and {out} for a fresh output path, words the error names)

def _run(method: str, *settings: str, bits: str = "16", source: str = "{root}/src.npz",
         target: str = "{root}/tgt.npz") -> list[str]:
    """``crossret run METHOD`` on two domain files, with ``--set`` for each of ``settings``."""
    extra = [item for setting in settings for item in ("--set", setting)]
    return ["run", method, "--bits", bits, "--source", source, "--target", target, "--out", "{out}", *extra]


def _lsh(source: str, target: str = "{root}/tgt.npz") -> list[str]:
    """The command most input cases go through."""
    return _run("lsh", source=source, target=target)


CASES: list[tuple[str, list[str], list[str]]] = [
    # -- sizes that imply huge allocations (search k, IVF lists, HNSW sizes, hash probes)
    ("hnsw-k-2e9", ["index", "search", "{root}/hnsw.crbi", "--queries", "{root}/q.npy", "-k", "2000000000",
                    "--save", "{out}"], ["k=2000000000"]),
    ("hnsw-k-1e8", ["index", "search", "{root}/hnsw.crbi", "--queries", "{root}/q.npy", "-k", "100000000"],
     ["k=100000000"]),
    ("ivf-k-2e9", ["index", "search", "{root}/ivf.crbi", "--queries", "{root}/q.npy", "-k", "2000000000"],
     ["k=2000000000"]),
    ("flat-k-1e8", ["index", "search", "{root}/flat.crbi", "--queries", "{root}/q.npy", "-k", "100000000"],
     ["k=100000000"]),
    ("recall-k-1e9", ["index", "recall", "{root}/hnsw.crbi", "--exact", "{root}/flat.crbi", "--queries",
                      "{root}/q.npy", "-k", "1000000000"], ["k=1000000000"]),
    ("ivf-nlist-2e9", ["index", "build", "--codes", "{root}/codes.npy", "--out", "{out}", "--kind", "ivf",
                       "--param", "nlist=2000000000"], ["nlist=2000000000"]),
    ("ivf-nlist-above-n", ["index", "build", "--codes", "{root}/codes.npy", "--out", "{out}", "--kind", "ivf",
                           "--param", "nlist=51"], ["nlist=51", "50 codes"]),
    ("factory-ivf-2e9", ["index", "build", "--codes", "{root}/codes.npy", "--out", "{out}", "--kind",
                         "BIVF2000000000"], ["nlist=2000000000"]),
    ("factory-ivf-2e10", ["index", "build", "--codes", "{root}/codes.npy", "--out", "{out}", "--kind",
                          "BIVF20000000000"], ["nlist=20000000000"]),
    ("hnsw-M-2e9", ["index", "build", "--codes", "{root}/codes.npy", "--out", "{out}", "--kind", "hnsw",
                    "--param", "M=2000000000"], ["M=2000000000"]),
    ("factory-hnsw-2e9", ["index", "build", "--codes", "{root}/codes.npy", "--out", "{out}", "--kind",
                          "BHNSW2000000000"], ["M=2000000000"]),
    ("hnsw-efSearch-2e9", ["index", "build", "--codes", "{root}/codes.npy", "--out", "{out}", "--kind", "hnsw",
                           "--param", "efSearch=2000000000"], ["efSearch=2000000000"]),
    ("hnsw-efConstruction-2e9", ["index", "build", "--codes", "{root}/codes.npy", "--out", "{out}", "--kind",
                                 "hnsw", "--param", "efConstruction=2000000000"], ["efConstruction=2000000000"]),
    ("multihash-nflip", ["index", "build", "--codes", "{root}/codes64.npy", "--out", "{out}", "--kind", "multihash",
                         "--param", "b=64", "--param", "nhash=1", "--param", "nflip=20"], ["nflip=20"]),
    ("recall-efSearch", ["index", "recall", "{root}/hnsw.crbi", "--exact", "{root}/flat.crbi", "--queries",
                         "{root}/q.npy", "--param", "efSearch=2000000000"], ["efSearch=2000000000"]),
    # -- code lengths, network widths, walk lengths, thread counts
    ("bits-1e11", _run("lsh", bits="100000000000"), ["--bits=100000000000"]),
    ("itq-bits-1e5", _run("itq", bits="100000"), ["--bits=100000"]),
    ("source-only-hash-hidden", _run("source-only", "hash_hidden=100000000000"),
     ["hash_hidden=100000000000"]),
    ("source-only-encoder-dim", _run("source-only", "encoder_dim=100000000000"),
     ["encoder_dim=100000000000"]),
    ("couple-hash-hidden", _run("couple", "hash_hidden=10000000000"),
     ["hash_hidden=10000000000"]),
    ("couple-walk-length", _run("couple", "walk_length=100000000000"),
     ["walk_length=100000000000"]),
    ("source-only-threads", _run("source-only", "num_threads=100000000000"),
     ["num_threads", "100000000000"]),
    ("couple-threads", _run("couple", "num_threads=1000000"), ["num_threads", "1000000"]),
    # -- bad shapes, dtypes, NaN, empty domains, label mismatches, corrupt files
    ("nan-features", _lsh("{root}/nan.npz"), ["nan.npz", "NaN"]),
    ("empty-source", _lsh("{root}/empty.npz"), ["empty.npz", "empty"]),
    ("empty-target", _lsh("{root}/src.npz", "{root}/empty.npz"), ["empty.npz", "empty"]),
    ("dim-mismatch", _lsh("{root}/dim5.npz"), ["dim5.npz", "5 features"]),
    ("label-count", _lsh("{root}/labmis.npz"), ["labmis.npz", "50 labels"]),
    ("string-labels", _lsh("{root}/strlab.npz"), ["strlab.npz", "numeric"]),
    ("3d-features", _lsh("{root}/cube.npz"), ["cube.npz", "2-D"]),
    ("one-hot-labels", _lsh("{root}/onehot.npz"), ["onehot.npz", "vector of labels"]),
    ("unknown-layout", _lsh("{root}/other.npz"), ["other.npz", "weights"]),
    ("corrupt-npz", _lsh("{root}/corrupt.npz"), ["corrupt.npz"]),
    ("ragged-csv", _lsh("{root}/short.csv"), ["short.csv"]),
    ("missing-file", _lsh("{root}/absent.npz"), ["absent.npz", "not found"]),
    ("set-markup-value", _run("lsh", "center=[/b]"), ["center", "['/b']"]),
    ("real-codes", ["eval-codes", "--query-codes", "{root}/realcodes.npy", "--db-codes", "{root}/codes.npy",
                    "--query-labels", "{root}/lab.npy", "--db-labels", "{root}/lab.npy"], ["query codes", "±1"]),
    ("3d-codes", ["eval-codes", "--query-codes", "{root}/codes3d.npy", "--db-codes", "{root}/codes.npy",
                  "--query-labels", "{root}/qlab.npy", "--db-labels", "{root}/lab.npy"], ["query codes", "2-D"]),
    ("code-length-mismatch", ["eval-codes", "--query-codes", "{root}/q8.npy", "--db-codes", "{root}/codes.npy",
                              "--query-labels", "{root}/qlab.npy", "--db-labels", "{root}/lab.npy"], ["bits"]),
    ("db-label-count", ["eval-codes", "--query-codes", "{root}/q.npy", "--db-codes", "{root}/codes.npy",
                        "--query-labels", "{root}/qlab.npy", "--db-labels", "{root}/lab49.npy"],
     ["database labels", "49 labels"]),
    ("nan-labels", ["eval-codes", "--query-codes", "{root}/q.npy", "--db-codes", "{root}/codes.npy",
                    "--query-labels", "{root}/qlab.npy", "--db-labels", "{root}/nanlab.npy"], ["database labels"]),
    ("corrupt-npy", ["eval-codes", "--query-codes", "{root}/corrupt.npy", "--db-codes", "{root}/codes.npy",
                     "--query-labels", "{root}/qlab.npy", "--db-labels", "{root}/lab.npy"],
     ["--query-codes", "corrupt.npy"]),
    ("npz-as-npy", ["eval-codes", "--query-codes", "{root}/twoarrays.npy", "--db-codes", "{root}/codes.npy",
                    "--query-labels", "{root}/qlab.npy", "--db-labels", "{root}/lab.npy"], ["twoarrays.npy"]),
    ("garbage-index", ["index", "search", "{root}/garbage.crbi", "--queries", "{root}/q.npy"], ["garbage.crbi"]),
    ("query-width", ["index", "search", "{root}/flat.crbi", "--queries", "{root}/q8.npy", "--save", "{out}"],
     ["--queries", "8 bits"]),
    ("float-codes-build", ["index", "build", "--codes", "{root}/realcodes.npy", "--out", "{out}"], ["--codes"]),
    ("encode-no-model", ["index", "encode", "--run", "{root}", "--features", "{root}/codes.npy", "--out", "{out}"],
     ["--run", "model"]),
    # -- user text that rich would read as markup or emoji codes is printed as it is
    ("markup-in-path", _lsh("{root}/x[/b]y:x:.npz"), ["x[/b]y:x:.npz"]),
    ("markup-in-index-path", ["index", "search", "{root}/[bold]a[/]:cross_mark:.crbi", "--queries", "{root}/q.npy"],
     ["[bold]a[/]:cross_mark:.crbi"]),
]


@pytest.mark.parametrize(("argv", "named"), [pytest.param(argv, named, id=case) for case, argv, named in CASES])
def test_hostile_command_gives_one_clean_error(files, tmp_path, monkeypatch, capsys, argv, named):
    out = tmp_path / "out"
    before = sorted(p.name for p in files.iterdir())
    args = [a.replace("{root}", str(files)).replace("{out}", str(out)) for a in argv]
    code, stdout, stderr = cli(monkeypatch, capsys, *args)
    lines = stderr.splitlines()
    assert code == 2, stderr
    assert "Traceback" not in stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr  # no blank line either
    for word in named:
        assert word in lines[0], f"{word!r} not named in: {lines[0]}"
    assert stdout == ""
    assert not out.exists(), "a refused command wrote its output"
    assert sorted(p.name for p in files.iterdir()) == before, "a refused command wrote next to its inputs"


@pytest.fixture(scope="module")
def person_data(tmp_path_factory) -> Path:
    from crossret.data.synthetic_person import generate_person_datasets

    root = tmp_path_factory.mktemp("persons")
    generate_person_datasets(root, styles=("cuhk-pedes", "rstpreid"), n_train_ids=4, n_test_ids=3, images_per_id=2)
    return root


GCKD_CASES: list[tuple[str, list[str], list[str]]] = [
    ("albef-vocab-size", ["gckd", "pretrain", "--source", "{data}/CUHK-PEDES", "--out", "{out}", "--model-set",
                          "vocab_size=100000000000"], ["vocab_size=100000000000"]),
    ("albef-image-size", ["gckd", "pretrain", "--source", "{data}/CUHK-PEDES", "--out", "{out}", "--model-set",
                          "image_size=[800000,800000]"], ["10000000000 image patches"]),
    ("pairs-per-id", ["gckd", "pretrain", "--source", "{data}/CUHK-PEDES", "--out", "{out}", "--set",
                      "pairs_per_id=100000000000"], ["pairs_per_id", "k=100000000000"]),
    ("memory-size", ["gckd", "adapt", "--source", "{data}/CUHK-PEDES", "--target", "{data}/RSTPReid", "--out", "{out}",
                     "--set", "memory_size=100000000000", "--set", "target_batch=4"], ["memory_size=100000000000"]),
]


@pytest.mark.parametrize(("argv", "named"), [pytest.param(argv, named, id=case) for case, argv, named in GCKD_CASES])
def test_hostile_gckd_sizes_give_one_clean_error(person_data, tmp_path, monkeypatch, capsys, argv, named):
    """GCKD model and training sizes are checked against memory before torch allocates them, and before the
    run directory is opened: nothing is left behind."""
    pytest.importorskip("transformers")
    out = tmp_path / "out"
    args = [a.replace("{data}", str(person_data)).replace("{out}", str(out)) for a in argv]
    code, _, stderr = cli(monkeypatch, capsys, *args)
    assert code == 2 and "Traceback" not in stderr
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert all(word in lines[0] for word in named), lines[0]
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == []
