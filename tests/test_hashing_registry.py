"""The method registry: built-ins resolved on demand, users' methods registered, saved methods loaded.

Also runs the example method of docs/architecture.md ("Adding a hashing method") end to end, and loads
methods saved by an earlier layout of the package (tests/fixtures/hashing, one LSH and one source-only).
"""

from __future__ import annotations

import importlib
import json
import re
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import crossret
from crossret.data.domain import Domain
from crossret.errors import ConfigError, FileFormatError
from crossret.hashing import registry
from crossret.hashing.persistence import read_method_file
from crossret.hashing.registry import BUILTIN_METHODS, available_methods, load_method, make_method, method_class

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "hashing"


@pytest.fixture()
def clean_registry(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """A private copy of the registry, so methods registered by a test vanish after it."""
    table = dict(registry._REGISTRY)
    monkeypatch.setattr(registry, "_REGISTRY", table)
    return table


def _docs_example() -> str:
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    section = text.split("## Adding a hashing method", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "docs/architecture.md: the 'Adding a hashing method' section has no python block"
    return match.group(1)


def _domains() -> tuple[Domain, Domain]:
    rng = np.random.default_rng(7)
    source = Domain("source", rng.standard_normal((60, 10)).astype(np.float32) + 2.0, np.repeat(np.arange(3), 20))
    target = rng.standard_normal((40, 10)).astype(np.float32) - 1.0
    return source, Domain("target", target, np.full(40, -1))


# ---------------------------------------------------------------------------------------- the docs example
def test_docs_example_method_works_through_the_registry_fit_and_load(clean_registry, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # Run as a module of its own (dataclasses look their module up), without this file's __future__ flags.
    module = types.ModuleType("docs_example")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    exec(compile(_docs_example(), "docs/architecture.md", "exec", dont_inherit=True), module.__dict__)
    cls = module.CenteredSign
    assert clean_registry["centered-sign"] is cls
    assert "centered-sign" in available_methods()

    source, target = _domains()
    method = make_method("centered-sign", 16, seed=5).fit(source, target)
    queries = np.random.default_rng(8).standard_normal((25, 10)).astype(np.float32)
    # The same codes computed another way: float64 mean of source ∪ target, the seeded Gaussian hyperplanes.
    mean = np.vstack([source.features, target.features]).astype(np.float64).sum(axis=0) / (source.n + target.n)
    hyperplanes = np.random.default_rng(5).standard_normal((10, 16))
    projected = (queries.astype(np.float64) - mean) @ hyperplanes
    assert np.abs(projected).min() > 1e-9  # no code bit sits on a hyperplane
    expected = np.where(projected >= 0, 1, -1).astype(np.int8)
    np.testing.assert_array_equal(method.encode(queries), expected)

    source_only = make_method("centered-sign", 16, seed=5, overrides={"use_target": False}).fit(source, target)
    np.testing.assert_allclose(source_only.mean, source.features.mean(axis=0, dtype=np.float64))
    with pytest.raises(ConfigError, match="nope"):
        make_method("centered-sign", 16, overrides={"nope": 1})

    model = crossret.fit("centered-sign", source, target.features, bits=16, seed=5, out=tmp_path / "model")
    np.testing.assert_array_equal(model.encode(queries), expected)
    saved = tmp_path / "model" / "model.npz"
    loaded = load_method(saved)
    assert type(loaded) is cls and loaded.input_dim == 10 and loaded.bits == 16
    np.testing.assert_array_equal(loaded.encode(queries), expected)
    np.testing.assert_array_equal(crossret.load(tmp_path / "model").encode(queries), expected)

    # Unregistered again (a new process that never ran the example): the file names an unknown method.
    del clean_registry["centered-sign"]
    with pytest.raises(FileFormatError, match="unknown or non-persistent method 'centered-sign'"):
        load_method(saved)


# ---------------------------------------------------------------------------------------- the table
def test_builtin_table_names_are_the_classes_names() -> None:
    for name, target in BUILTIN_METHODS.items():
        module, _, attribute = target.partition(":")
        cls = getattr(importlib.import_module(module), attribute)
        assert cls.name == name
        assert method_class(name) is cls


def test_unknown_method_lists_the_available_ones() -> None:
    with pytest.raises(ConfigError) as info:
        make_method("no-such-method", 8)
    assert str(info.value) == f"unknown method 'no-such-method'; choose one of: {', '.join(available_methods())}"


def test_register_on_a_builtin_changes_nothing(clean_registry) -> None:
    from crossret.hashing.lsh import LSH

    before = available_methods()
    assert registry.register(LSH) is LSH
    assert method_class("lsh") is LSH and available_methods() == before


def test_available_methods_imports_no_method_module() -> None:
    code = (
        "import json, sys\n"
        "from crossret.hashing.registry import available_methods\n"
        "names = available_methods()\n"
        "before = sorted(m for m in sys.modules if m.startswith(('crossret.hashing.', 'numpy', 'torch')))\n"
        "from crossret.hashing.registry import make_method\n"
        "make_method('lsh', 8)\n"
        "after = sorted(m for m in sys.modules if m.startswith('crossret.hashing.'))\n"
        "print(json.dumps([names, before, after]))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    names, before, after = json.loads(result.stdout)
    assert names == sorted(BUILTIN_METHODS)
    assert before == ["crossret.hashing.registry"]
    # Making one method imports that method's module only.
    assert "crossret.hashing.lsh" in after
    assert not {"crossret.hashing.itq", "crossret.hashing.source_only", "crossret.hashing.couple"} & set(after)


# ---------------------------------------------------------------------------------------- old files, old paths
@pytest.mark.parametrize("stem", ["lsh_12bit.npz", "source_only_8bit.pt"])
def test_methods_saved_by_the_earlier_layout_load_and_encode_the_same(stem: str, tmp_path: Path) -> None:
    queries = np.load(FIXTURES / "queries.npy")
    codes = np.load(FIXTURES / f"{Path(stem).stem}_codes.npy")
    method = load_method(FIXTURES / stem)
    np.testing.assert_array_equal(method.encode(queries), codes)
    # Saving it again writes the same header and state.
    again = method.save(tmp_path / stem)
    old_header, old_arrays, old_state = read_method_file(FIXTURES / stem)
    new_header, new_arrays, new_state = read_method_file(again)
    assert new_header == old_header
    assert old_arrays.keys() == new_arrays.keys() and old_state.keys() == new_state.keys()
    for key, value in old_arrays.items():
        np.testing.assert_array_equal(new_arrays[key], value)
    for key, value in old_state.items():
        assert bool((new_state[key] == value).all()), key


def test_old_import_paths_are_the_new_objects() -> None:
    from crossret import retrieval
    from crossret.hashing import _state, base, deep, encoding, persistence

    assert _state.load_method is registry.load_method
    assert _state.PersistentMethod is persistence.PersistentMethod
    assert deep.HashNetMethod is deep.DeepHashMethod
    assert base.make_method is registry.make_method
    assert retrieval.encode_to_packed is encoding.encode_to_packed
