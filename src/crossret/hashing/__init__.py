"""Hashing methods: baselines (LSH, ITQ, source-only) and COUPLE.

Names are imported lazily so that ``import crossret.hashing`` stays cheap (no numpy or torch until
a method is used). Methods are made and loaded by name through :mod:`crossret.hashing.registry`;
:class:`HashMethod` is the interface every method implements, :class:`DeepHashMethod` the base of
the network methods, and :mod:`crossret.hashing.persistence` the saved-method file format.
"""

from __future__ import annotations

from crossret.lazy_exports import lazy_getattr

_EXPORTS = {
    "HashMethod": "crossret.hashing.base",
    "DeepHashMethod": "crossret.hashing.deep",
    "HashNetMethod": "crossret.hashing.deep",
    "PersistentMethod": "crossret.hashing.persistence",
    "available_methods": "crossret.hashing.registry",
    "load_method": "crossret.hashing.registry",
    "make_method": "crossret.hashing.registry",
    "register": "crossret.hashing.registry",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_getattr("crossret.hashing", _EXPORTS)
