"""Files written by crossret before the architecture consolidation still load, and behave exactly the same.

``tests/fixtures/premove`` holds small files of every kind crossret saves, written by commit 3d601e1
(``make_fixtures.py`` there says how), with what that commit computed from them
(``expected/manifest.json`` and ``expected/**/*.npy``): saved methods and ``crossret fit`` model
directories of lsh / itq / source-only / couple, a ``crossret run`` directory, an interrupted COUPLE fit
with its training checkpoint, packed and ±1 codes files, binary indexes of every built-in kind, dense and
gallery indexes, a GCKD training checkpoint of the feature-heads backbone and an ALBEF-layout
``model.pt``. Each test loads one kind with the current code and compares behaviour bit for bit: codes,
search results, state digests, resumed training. File bytes are never compared (several formats embed
their creation time).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import crossret
from _golden_cpu import RECORDING_CPU
from crossret.data.domain import Domain

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "premove"
MANIFEST: dict[str, Any] = json.loads((FIXTURES / "expected" / "manifest.json").read_text(encoding="utf-8"))
METHODS = sorted(MANIFEST["models"])
BINARY_INDEXES = sorted(name for name in MANIFEST["indexes"] if name.startswith("binary_"))
DENSE_INDEXES = sorted(name for name in MANIFEST["indexes"] if name.startswith("dense_"))


def state_digest(state: Mapping[str, Any]) -> str:
    """SHA-256 over ``(name, dtype, shape, bytes)`` of every tensor of a state dict, by sorted name (the
    same digest as ``make_fixtures.state_digest``)."""
    import torch

    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private copy of the fixtures: loading, resuming and locking must never touch the committed files."""
    root = tmp_path_factory.mktemp("premove") / "fixtures"
    shutil.copytree(FIXTURES, root, ignore=shutil.ignore_patterns("make_fixtures.py", "__pycache__"))
    return root


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One torch thread, as when the fixtures were made: the same reductions give the same bits."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _array(root: Path, rel: str) -> np.ndarray:
    return np.load(root / rel, allow_pickle=False)


def _domains(root: Path) -> tuple[Domain, Domain]:
    """The source and the unlabelled target the hashing fixtures were fitted on."""
    target = _array(root, "inputs/target_features.npy")
    return (Domain("source", _array(root, "inputs/source_features.npy"), _array(root, "inputs/source_labels.npy")),
            Domain("target", target, np.full(target.shape[0], -1, np.int64)))


# ------------------------------------------------------------------------------------------------ hashing
@pytest.mark.parametrize("name", METHODS)
def test_model_directory_encodes_as_before(fixtures: Path, name: str) -> None:
    entry = MANIFEST["models"][name]
    model = crossret.load(fixtures / entry["dir"])
    assert (model.method, model.bits, model.input_dim) == (name, entry["bits"], entry["input_dim"])
    features = _array(fixtures, "inputs/encode_features.npy")
    for domain in ("target", "source"):
        codes = model.encode(features, domain=domain)
        expected = _array(fixtures, entry[f"codes_{domain}"])
        assert codes.dtype == expected.dtype and np.array_equal(codes, expected), (name, domain)


@pytest.mark.parametrize("name", METHODS)
def test_saved_method_file_loads(fixtures: Path, name: str) -> None:
    from crossret.hashing import load_method

    entry = MANIFEST["models"][name]
    method = load_method(fixtures / entry["model_file"])
    assert method.name == name and method.bits == entry["bits"]
    features = _array(fixtures, "inputs/encode_features.npy")
    for domain in ("target", "source"):
        assert np.array_equal(method.encode(features, domain=domain), _array(fixtures, entry[f"codes_{domain}"]))


def test_hashing_run_directory_encodes_as_before(fixtures: Path) -> None:
    entry = MANIFEST["hashing_run"]
    model = crossret.load(fixtures / entry["dir"])
    assert model.method == "itq" and model.bits == entry["bits"]
    codes = model.encode(_array(fixtures, "inputs/encode_features.npy"))
    assert np.array_equal(codes, _array(fixtures, entry["codes_target"]))


def test_couple_checkpoint_contents(fixtures: Path) -> None:
    from crossret.hashing.couple import read_checkpoint

    entry = MANIFEST["couple_checkpoint"]
    payload = read_checkpoint(fixtures / entry["checkpoint"])
    header = json.loads(payload["header"])
    assert sorted(payload) == entry["payload_keys"] and sorted(payload["arrays"]) == entry["array_keys"]
    for key in ("epochs_done", "bits", "seed", "config", "data_fingerprint", "history_epochs"):
        assert header[key] == entry[key], key
    assert state_digest(payload["model"]) == entry["model_digest"]
    assert state_digest(payload["ema"]) == entry["ema_digest"]
    assert state_digest(payload["arrays"]) == entry["arrays_digest"]


def test_couple_checkpoint_resumes_to_the_uninterrupted_fit(fixtures: Path, tmp_path: Path) -> None:
    entry = MANIFEST["couple_checkpoint"]
    run = tmp_path / "run"
    shutil.copytree(fixtures / entry["run_dir"], run)
    source, target = _domains(fixtures)
    model = crossret.fit("couple", source, target, bits=entry["bits"], seed=entry["seed"],
                         config=MANIFEST["models"]["couple"]["config"], out=run, resume=True)
    assert model.diagnostics["resumed_from_epoch"] == entry["epochs_done"]
    codes = model.encode(_array(fixtures, "inputs/encode_features.npy"))
    assert np.array_equal(codes, _array(fixtures, entry["resumed_codes_target"]))


@pytest.mark.parametrize("name", ["lsh_packed", "lsh_pm1"])
def test_codes_files_read_as_before(fixtures: Path, name: str) -> None:
    from crossret.retrieval import pack_codes, read_packed_codes

    entry = MANIFEST["codes_files"][name]
    expected = _array(fixtures, entry["codes_target"])
    path = fixtures / entry["path"]
    sidecar = json.loads(path.with_name(path.name + ".json").read_text(encoding="utf-8"))
    assert sidecar["bits"] == entry["bits"] and sidecar["packed"] is entry["packed"]
    if entry["packed"]:
        codes, bits = read_packed_codes(path)
        assert bits == entry["bits"] and np.array_equal(codes, pack_codes(expected))
    else:
        assert np.array_equal(np.load(path), expected)


# ------------------------------------------------------------------------------------------------ indexes
def _check_searches(fixtures: Path, entry: dict[str, Any], index: Any) -> None:
    queries = _array(fixtures, entry["queries"])
    for k, files in entry["searches"].items():
        distances, ids = index.search(queries, int(k))
        expected_distances, expected_ids = _array(fixtures, files["distances"]), _array(fixtures, files["ids"])
        assert distances.dtype == expected_distances.dtype and ids.dtype == expected_ids.dtype
        assert np.array_equal(distances, expected_distances) and np.array_equal(ids, expected_ids), k


@pytest.mark.parametrize("name", BINARY_INDEXES)
def test_binary_index_searches_as_before(fixtures: Path, name: str) -> None:
    from crossret.retrieval import BinaryIndex

    entry = MANIFEST["indexes"][name]
    index = BinaryIndex.load(fixtures / entry["path"])
    assert (index.kind, index.ntotal, index.bits) == (entry["kind"], entry["ntotal"], entry["bits"])
    _check_searches(fixtures, entry, index)


@pytest.mark.parametrize("name", DENSE_INDEXES)
def test_dense_index_searches_as_before(fixtures: Path, name: str) -> None:
    from crossret.retrieval import DenseIndex

    entry = MANIFEST["indexes"][name]
    index = DenseIndex.load(fixtures / entry["path"])
    assert (index.kind, index.ntotal, index.dim) == (entry["kind"], entry["ntotal"], entry["dim"])
    _check_searches(fixtures, entry, index)


def test_gallery_index_loads_with_its_metadata(fixtures: Path) -> None:
    search = pytest.importorskip("crossret.textimage.search")
    entry = MANIFEST["indexes"]["gallery"]
    gallery = search.GalleryIndex.load(fixtures / entry["path"])
    assert gallery.size == entry["ntotal"] and list(gallery.image_paths) == entry["image_paths"]
    assert list(gallery.person_ids) == entry["person_ids"] and gallery.info == entry["info"]
    _check_searches(fixtures, entry, gallery)


# ------------------------------------------------------------------------------------------------ GCKD
def _gckd_extra() -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("torch_geometric")
    if MANIFEST.get("gckd") is None:
        pytest.skip("the fixtures were made without the GCKD extra")


def test_gckd_checkpoint_contents(fixtures: Path) -> None:
    _gckd_extra()
    from crossret.textimage.gckd import read_checkpoint

    entry = MANIFEST["gckd"]
    state = read_checkpoint(fixtures / entry["checkpoint"])
    assert sorted(state) == entry["state_keys"]
    assert (state["epoch"], state["step"]) == (entry["epoch"], entry["step"])
    assert state["history"] == entry["checkpoint_history"] and state["fingerprint"] == entry["fingerprint"]
    for part, digest in entry["digests"].items():
        assert state_digest(state[part]) == digest, part


def test_gckd_checkpoint_resumes_to_the_uninterrupted_run(fixtures: Path, tmp_path: Path, one_thread: None) -> None:
    _gckd_extra()
    import torch

    from crossret.textimage.feature_heads import FeatureHeadsConfig, FeatureHeadsModel
    from crossret.textimage.gckd import GckdConfig, GckdTrainer
    from crossret.textimage.streams import FeatureTrainingData

    entry = MANIFEST["gckd"]
    arrays = {name: _array(fixtures, rel) for name, rel in entry["inputs"].items()}
    data = FeatureTrainingData(arrays["source_image"], arrays["source_text"], arrays["source_ids"],
                               target_image=arrays["target_image"], target_text=arrays["target_text"],
                               **entry["data"])
    shutil.copytree((fixtures / entry["checkpoint"]).parent, tmp_path / "checkpoints")
    torch.manual_seed(999)  # another initialisation: the checkpoint must restore every weight and RNG state
    trainer = GckdTrainer(FeatureHeadsModel(FeatureHeadsConfig(**entry["model_config"])),
                          GckdConfig.from_dict(entry["gckd_config"]), checkpoint_dir=tmp_path / "checkpoints")
    result = trainer.fit(data, resume=True)
    assert result.resumed_from_epoch == entry["epoch"]
    if RECORDING_CPU:  # bit for bit where the fixture was recorded
        assert result.history == entry["full_history"]
        assert state_digest(trainer.model.state_dict()) == entry["final_model_digest"]
    else:  # another CPU's float kernels round the last bits differently (tests/_golden_cpu.py)
        assert len(result.history) == len(entry["full_history"])
        for got, want in zip(result.history, entry["full_history"], strict=True):
            assert got == pytest.approx(want, rel=1e-5)


def test_albef_model_file_loads(fixtures: Path) -> None:
    _gckd_extra()
    from crossret.textimage.albef import AlbefConfig
    from crossret.textimage.checkpoint import load_albef_checkpoint

    entry = MANIFEST["albef_model"]
    config = AlbefConfig.tiny(**{**entry["config"], "image_size": tuple(entry["config"]["image_size"])})
    loaded = load_albef_checkpoint(fixtures / entry["path"], config)
    assert state_digest(loaded.model.state_dict()) == entry["digest"]
