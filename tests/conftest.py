"""Shared fixtures. Tests that need the real benchmark files look in ../shared/data (or
$CROSSRET_DATA) and skip with a clear reason when they are absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def _shared_data_dir() -> Path | None:
    candidates = [os.environ.get("CROSSRET_DATA"), REPO_ROOT.parent / "shared" / "data"]
    for candidate in candidates:
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    return None


SHARED_DATA = _shared_data_dir()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real benchmark data directory; skips the test when it is not present."""
    if SHARED_DATA is None:
        pytest.skip("real benchmark data not found in ../shared/data or $CROSSRET_DATA")
    return SHARED_DATA
