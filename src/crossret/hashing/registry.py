"""Which hashing methods exist, by name: make one, load a saved one, register your own.

Built-in methods are a table of ``name -> "module:Class"`` strings, imported on first use (like
package entry points). So ``import crossret.hashing.registry`` loads neither numpy nor torch (the
CLI's ``--help`` lists :func:`available_methods`), only the module of the method asked for is ever
imported, and the method modules need not import this one. Adding a built-in method is one module
plus one line in :data:`BUILTIN_METHODS`; users' own methods use the :func:`register` decorator.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from typing import TYPE_CHECKING, Any

from crossret.config_keys import reject_unknown_keys
from crossret.errors import ConfigError

if TYPE_CHECKING:
    from crossret.hashing.base import HashMethod

# name -> "module:Class" of the methods crossret ships; tests check that each class's ``name`` is its key.
BUILTIN_METHODS: dict[str, str] = {
    "couple": "crossret.hashing.couple:Couple",
    "itq": "crossret.hashing.itq:ITQ",
    "lsh": "crossret.hashing.lsh:LSH",
    "source-only": "crossret.hashing.source_only:SourceOnly",
}

# Registered methods and built-ins already imported, by name.
_REGISTRY: dict[str, type[HashMethod]] = {}


def register(cls: type[HashMethod]) -> type[HashMethod]:
    """Class decorator: make a method available by its ``name`` (``make_method``, CLI ``crossret run NAME``).

    A registered name takes precedence over a built-in of the same name; registering a built-in class
    under its own name changes nothing.
    """
    _REGISTRY[cls.name] = cls
    return cls


def available_methods() -> list[str]:
    """Names of the built-in and registered methods, sorted; imports no method module."""
    return sorted({*BUILTIN_METHODS, *_REGISTRY})


def method_class(name: str) -> type[HashMethod]:
    """The class of method ``name``, importing a built-in's module on first use.

    An unknown name is a :class:`~crossret.errors.ConfigError` listing :func:`available_methods`.
    """
    cls = _REGISTRY.get(name)
    if cls is not None:
        return cls
    target = BUILTIN_METHODS.get(name)
    if target is None:
        raise ConfigError(f"unknown method {name!r}; choose one of: {', '.join(available_methods())}")
    module, _, attribute = target.partition(":")
    cls = getattr(importlib.import_module(module), attribute)
    _REGISTRY.setdefault(name, cls)
    return cls


def make_method(name: str, bits: int, seed: int = 0, overrides: dict[str, Any] | None = None) -> HashMethod:
    """Instantiate method ``name`` with its default config updated by ``overrides`` (unknown keys refused)."""
    cls = method_class(name)
    config = cls.config_class()
    if overrides:
        reject_unknown_keys(type(config), overrides, name)
        config = dataclasses.replace(config, **overrides)
    return cls(bits=bits, seed=seed, config=config)


def load_method(path: str | os.PathLike) -> Any:
    """Load any method saved with ``.save()``, choosing the class by the ``method`` its file records.

    Corrupt, foreign or newer-format files, and methods that are unknown or cannot be saved, raise
    :class:`~crossret.errors.FileFormatError` naming the file.
    """
    from crossret.errors import FileFormatError
    from crossret.hashing.persistence import PersistentMethod, read_method_file

    header, _, _ = read_method_file(path)
    try:
        cls = method_class(header["method"])
    except ConfigError:
        cls = None
    if cls is None or not issubclass(cls, PersistentMethod):
        raise FileFormatError(f"{path}: unknown or non-persistent method {header['method']!r}")
    return cls.load(path)
