"""Load an earlier commit's version of a crossret module, to time it beside today's in the same run.

A speed-up claimed against an earlier kernel is only honest when both are measured on the same
machine, under the same load, in one process. This reads the module's source at ``commit`` with
``git show`` and imports it under a private name (its own imports resolve to today's package, which
is fine for self-contained kernel modules such as ``crossret.retrieval.hamming``).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent

# The last commit before the query-blocked Hamming kernels: the baseline of their first speed-ups.
BEFORE_BLOCKED_KERNELS = "b12b415"
# The last commit before the 512-bit-vector search and metric kernels.
BEFORE_WIDE_VECTOR_KERNELS = "e0a99d8"
# The last commit before the sampled starting bound, quarter minima and kept worker threads of the search
# scan.
BEFORE_SAMPLED_BOUND = "7eb4d72"
# The last commit before candidate buffers cut every few offers at small k and cache-line-aligned scan
# buffers: the default baseline now.
BEFORE_FREQUENT_CUTS = "362fa0d"


def load_module_at(commit: str, module_path: str, name: str) -> ModuleType | None:
    """The module at ``src/<module_path>`` as of ``commit``, imported as ``name``; ``None`` (with the
    reason on stderr) when git or the commit is unavailable, e.g. in a source archive."""
    try:
        source = subprocess.run(["git", "show", f"{commit}:src/{module_path}"], cwd=ROOT, check=True,
                                capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        print(f"previous kernel unavailable ({commit}:src/{module_path}): {exc}", file=sys.stderr)
        return None
    # A file of its own, so that numba can cache the old kernels apart from today's.
    folder = Path(tempfile.mkdtemp(prefix="crossret-previous-"))
    path = folder / f"{name}.py"
    path.write_text(source, encoding="utf-8")
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
