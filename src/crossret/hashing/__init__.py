"""Hashing methods: baselines (LSH, ITQ, source-only) and COUPLE.

Names are imported lazily so that ``import crossret.hashing`` stays cheap (no numpy or torch until
a method is used).
"""

from __future__ import annotations

from crossret.lazy_exports import lazy_getattr

_EXPORTS = {
    "HashMethod": "crossret.hashing.base",
    "make_method": "crossret.hashing.base",
    "available_methods": "crossret.hashing._registry",
    "register": "crossret.hashing._registry",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_getattr("crossret.hashing", _EXPORTS)
