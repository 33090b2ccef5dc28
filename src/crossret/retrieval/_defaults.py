"""Metric defaults, importable without numpy (the CLI's help shows them)."""

from __future__ import annotations

TIE_RULES: tuple[str, ...] = ("expected", "index")
DEFAULT_PRECISION_NS: tuple[int, ...] = tuple(range(100, 1001, 100))
