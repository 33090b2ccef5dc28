"""Optional dependency groups (pip *extras*) and the one check every optional feature makes.

The core install (``pip install crossret``) is what hashing needs. Features with heavier dependencies
check for them at the point of use with :func:`require`, which raises
:class:`~crossret.errors.MissingExtraError` naming the ``pip install`` command to run; the CLI prints it
as one ``error:`` line and exits with status 2. Nothing here imports an optional package.
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass

from crossret.errors import MissingExtraError


@dataclass(frozen=True)
class Extra:
    """An extra: the feature it enables (for messages) and the top-level modules it provides."""

    feature: str
    modules: tuple[str, ...]


#: The extras of ``pyproject.toml`` that code checks for, by name. ``dev`` (test tooling) and ``all``
#: (every feature extra) are not checked at run time.
EXTRAS: dict[str, Extra] = {
    "gckd": Extra("GCKD", ("transformers", "tokenizers", "torch_geometric", "PIL")),
    "serve": Extra("the search service", ("fastapi", "pydantic", "uvicorn")),
    "milvus": Extra("the Milvus backend", ("pymilvus",)),
    "fuzz": Extra("the fuzz harness", ("atheris",)),
}


def install_command(extra: str) -> str:
    """``pip install 'crossret[EXTRA]'``."""
    return f"pip install 'crossret[{extra}]'"


def missing_extra(extra: str, module: str, cause: BaseException | None = None) -> MissingExtraError:
    """The error for ``module`` (of ``extra``) being unavailable; ``cause``: the failed import, if any."""
    spec = EXTRAS[extra]
    top = module.partition(".")[0]
    broken = cause is not None and getattr(cause, "name", None) not in (None, module, top)
    why = f"{module} cannot be imported: {cause}" if broken else f"{top} is not installed"
    return MissingExtraError(f"{spec.feature} needs the '{extra}' extra ({why}): {install_command(extra)}",
                             extra=extra, name=module)


def _available(module: str) -> bool:
    loaded = sys.modules.get(module, False)
    if loaded is None:  # ``sys.modules[name] = None`` blocks an import
        return False
    if loaded is not False:
        return True
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def require(extra: str, *modules: str, load: bool = False) -> None:
    """Raise :class:`~crossret.errors.MissingExtraError` unless ``modules`` (default: every module of
    ``extra``) are available. Cheap by default: the modules are looked up, not imported; ``load=True``
    imports them (the caller needs them next anyway), which also catches an install that is present but
    broken."""
    if extra not in EXTRAS:
        raise ValueError(f"unknown extra {extra!r}; known: {', '.join(EXTRAS)}")
    for module in modules or EXTRAS[extra].modules:
        if not load:
            if not _available(module):
                raise missing_extra(extra, module)
            continue
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise missing_extra(extra, module, exc) from exc
