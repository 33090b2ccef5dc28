"""Leftovers of killed atomic writes.

:func:`crossret._io.atomic_open` writes ``.<name>.<8 random chars>.tmp`` next to its target and renames
it into place. A process killed before the rename (SIGKILL, power loss) cannot remove it: the target
still holds its previous, complete version and the temporary file is ignored by every reader, but it
stays — for a checkpoint, a multi-GB copy per crash. Resuming a run removes them
(:func:`remove_stale_temporaries`), before anything of the new attempt is written.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

# tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp"): 8 characters from [a-z0-9_]
_TEMPORARY = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")


def remove_stale_temporaries(*directories: str | os.PathLike) -> list[Path]:
    """Delete the leftover temporary files of atomic writes directly inside ``directories`` (not below;
    missing directories are skipped); returns what was removed. Call it only where no other process
    is writing: at the start of a (resumed) run, on the rank that writes the files."""
    removed = []
    for directory in directories:
        try:
            entries = list(os.scandir(directory))
        except (FileNotFoundError, NotADirectoryError):
            continue
        for entry in entries:
            if _TEMPORARY.match(entry.name) and entry.is_file(follow_symlinks=False):
                try:
                    os.unlink(entry.path)
                except FileNotFoundError:
                    continue
                removed.append(Path(entry.path))
    return removed
