"""The method registry, importable without numpy or torch (the CLI's help lists the method names)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from crossret.hashing.base import HashMethod

# The methods crossret ships; a test checks that loading their modules registers exactly these names.
BUILTIN_METHODS: tuple[str, ...] = ("couple", "itq", "lsh", "source-only")

_REGISTRY: dict[str, type[HashMethod]] = {}


def register(cls: type[HashMethod]) -> type[HashMethod]:
    """Class decorator: make a method available by its ``name`` (CLI ``crossret run NAME``)."""
    _REGISTRY[cls.name] = cls
    return cls


def available_methods() -> list[str]:
    """Names of the built-in and registered methods, sorted; imports no method module."""
    return sorted({*BUILTIN_METHODS, *_REGISTRY})


def _load_builtin_methods() -> None:
    # Importing the modules runs their @register decorators.
    from crossret.hashing import couple, itq, lsh, source_only  # noqa: F401
