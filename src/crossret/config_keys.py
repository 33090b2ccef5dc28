"""Small helpers shared by the dataclass configs."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from crossret.errors import ConfigError


def reject_unknown_keys(config_class: type, keys: Iterable[str], where: str) -> None:
    """Raise :class:`ConfigError` naming every key of ``keys`` that is not a field of ``config_class``."""
    known = {f.name for f in dataclasses.fields(config_class)}
    unknown = sorted(set(keys) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown config key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
