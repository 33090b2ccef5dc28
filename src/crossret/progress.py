"""Progress reporting without printing: library code calls ``progress(step, total, message)``.

The CLI passes a callback that draws a rich progress bar; notebooks may pass their own.
"""

from __future__ import annotations

from collections.abc import Callable

ProgressFn = Callable[[int, int, str], None]


def no_progress(step: int, total: int, message: str = "") -> None:
    """The default progress callback: does nothing."""
