"""The package structure: layers, no import cycles, no reaching into another package's private modules.

Imports are read from the source with ``ast`` (imports inside functions and under ``TYPE_CHECKING`` count
too), so the check covers code paths no test happens to run. docs/architecture.md shows the layers.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# Lowest first. A module may import modules of its own layer or of a lower one, never of a higher one.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("crossret", "crossret.errors", "crossret.progress", "crossret.limits", "crossret.extras",
     "crossret.config_keys", "crossret.lazy_exports", "crossret.kernel_cache", "crossret.threads",
     "crossret.storage", "crossret.provenance"),
    ("crossret.data",),
    ("crossret.graph", "crossret.retrieval"),
    ("crossret.hashing", "crossret.textimage", "crossret.distributed", "crossret.runs", "crossret.report"),
    ("crossret.model", "crossret.experiment"),
    ("crossret.serve", "crossret.warmup", "crossret.cli", "crossret.__main__"),
)


def _modules() -> dict[str, Path]:
    modules = {}
    for path in sorted((SRC / "crossret").rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


MODULES = _modules()


def _package(module: str) -> str:
    """The package a module belongs to (a package's ``__init__`` belongs to the package itself)."""
    return module if MODULES[module].name == "__init__.py" else module.rsplit(".", 1)[0]


def _imports(module: str) -> set[str]:
    """crossret modules that ``module`` imports anywhere in its source."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = _package(module).split(".")
                base = base[: len(base) - node.level + 1]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            candidates = [origin, *(f"{origin}.{alias.name}" for alias in node.names)]
        elif isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        else:
            continue
        # ``from crossret.x import y``: y is a module or a name; the module imported is the longest known.
        found.update(c for c in candidates if c in MODULES and c != module)
    return found


GRAPH = {module: _imports(module) for module in MODULES}


def layer_of(module: str) -> int | None:
    best: tuple[int, int] | None = None
    for number, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > best[1]):
                best = (number, len(prefix))
    return None if best is None else best[0]


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(sorted(component))
    return components


def test_the_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert _cycles(graph) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_every_module_has_a_layer():
    assert [m for m in MODULES if layer_of(m) is None] == []


def test_no_import_cycles():
    assert _cycles(GRAPH) == []


def test_no_upward_imports():
    upward = [f"{a} (layer {layer_of(a)}) imports {b} (layer {layer_of(b)})"
              for a in sorted(GRAPH) for b in sorted(GRAPH[a]) if layer_of(b) > layer_of(a)]
    assert upward == []


def test_no_module_imports_another_packages_private_module():
    reaching = [f"{a} imports {b}" for a in sorted(GRAPH) for b in sorted(GRAPH[a])
                if b.rsplit(".", 1)[-1].startswith("_") and not b.endswith("__main__")
                and _package(a) != _package(b)]
    assert reaching == []


@pytest.mark.parametrize("module, expected", [
    ("crossret.cli", 5), ("crossret.hashing.base", 3), ("crossret.retrieval.packing", 2), ("crossret.errors", 0),
])
def test_layer_of(module, expected):
    assert layer_of(module) == expected
