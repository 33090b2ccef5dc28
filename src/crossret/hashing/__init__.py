"""Hashing methods: baselines (LSH, ITQ, source-only) and, later, COUPLE."""

from crossret.hashing.base import HashMethod, available_methods, make_method, register

__all__ = ["HashMethod", "available_methods", "make_method", "register"]
