"""Bounds on the sizes a user passes (code lengths, thread counts, network widths, ``k``, list counts).

Every size that decides an allocation is checked here *before* the allocation: against a fixed bound
where one exists (:data:`MAX_BITS`, :func:`max_threads`) and against the memory it implies
(:func:`check_memory`). A violation is one :class:`~crossret.errors.ConfigError` line that names the
option and the fix, never a ``MemoryError``, a ``std::bad_alloc`` or an overflow deep in numpy, torch
or faiss.
"""

from __future__ import annotations

import os
import resource
from pathlib import Path
from typing import Any

import numpy as np

from crossret.errors import ConfigError

__all__ = [
    "MAX_BITS",
    "MAX_PADDED_RESULTS",
    "available_memory",
    "check_bits",
    "check_memory",
    "check_result_slots",
    "check_threads",
    "format_bytes",
    "max_threads",
]

#: The longest code crossret accepts, in bits. Far beyond any hashing use (codes are 16-1024 bits);
#: it keeps every per-bit structure (projections, rotations, distance histograms) small.
MAX_BITS = 1 << 16
#: Result slots a search may allocate when ``k`` exceeds the database size (all but the database size
#: per row are padding).
MAX_PADDED_RESULTS = 1 << 28
_SMALL_ALLOCATION = 1 << 24  # allocations up to this are never checked against memory
_MIN_THREAD_BOUND = 256  # thread counts up to this are accepted on any machine
_THREADS_PER_CPU = 4


def format_bytes(n: float) -> str:
    """``n`` bytes in binary units, e.g. ``"3.0 GiB"``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"  # pragma: no cover - the loop returns


def _read_int(path: str) -> int | None:
    try:
        text = Path(path).read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() else None


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        return None


def _cgroup_available() -> int | None:
    """Room left under the process' cgroup memory limit (containers), if there is one."""
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        limit, usage = _read_int(limit_file), _read_int(usage_file)
        if limit is not None and usage is not None and limit < 1 << 60:  # "max" / a huge number: no limit
            return max(limit - usage, 0)
    return None


def _address_space_available() -> int | None:
    """Room left under ``RLIMIT_AS`` (``ulimit -v``), if one is set."""
    try:
        soft, _hard = resource.getrlimit(resource.RLIMIT_AS)
    except (ValueError, OSError):  # pragma: no cover - platforms without the limit
        return None
    if soft == resource.RLIM_INFINITY:
        return None
    try:
        with open("/proc/self/statm", encoding="ascii") as handle:
            used = int(handle.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        used = 0
    return max(soft - used, 0)


def available_memory() -> int | None:
    """Bytes this process can still allocate: the least of the system's available memory, the room
    under a cgroup limit and under ``RLIMIT_AS``; ``None`` when none of them can be read."""
    known = [v for v in (_meminfo_available(), _cgroup_available(), _address_space_available()) if v is not None]
    return min(known) if known else None


def check_memory(nbytes: float, what: str, fix: str, *, error: type[Exception] = ConfigError) -> None:
    """Refuse an allocation of about ``nbytes`` that cannot fit in the available memory.

    ``what`` says what needs the memory and names the option or file (``"couple: walk_length=10**9"``);
    ``fix`` says what to change. One ``error`` line (default :class:`ConfigError`); nothing is allocated.
    """
    if nbytes <= _SMALL_ALLOCATION:  # no need to read the system's figures (searches call this per request)
        return
    available = available_memory()
    if available is not None and nbytes > available:
        raise error(f"{what} needs about {format_bytes(nbytes)} of memory but only {format_bytes(available)} "
                    f"is available; {fix}")


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def check_bits(bits: Any, option: str = "--bits") -> int:
    """A code length: a positive integer up to :data:`MAX_BITS`."""
    if not _is_int(bits) or bits <= 0:
        raise ConfigError(f"{option} must be a positive integer, got {bits!r}")
    if bits > MAX_BITS:
        raise ConfigError(f"{option}={bits} exceeds the longest supported code length of {MAX_BITS} bits; "
                          "choose a shorter code")
    return int(bits)


def max_threads() -> int:
    """The most threads a thread-count option accepts: 4 per CPU, and at least 256 on any machine."""
    return max(_MIN_THREAD_BOUND, _THREADS_PER_CPU * (os.cpu_count() or 1))


def check_threads(value: Any, option: str, *, minimum: int = 0) -> int:
    """A thread count: an integer in ``[minimum, max_threads()]`` (more threads than that only add
    thread stacks and contention)."""
    bound = max_threads()
    if not _is_int(value) or not minimum <= value <= bound:
        raise ConfigError(f"{option} must be an integer in [{minimum}, {bound}] ({os.cpu_count() or 1} CPUs "
                          f"here), got {value!r}")
    return int(value)


def check_result_slots(k: int, n_queries: int, n_items: int, *, option: str = "k", bytes_per_slot: int = 12) -> None:
    """A search of ``n_queries`` for ``k`` results each over ``n_items`` items: refuse a ``k`` beyond the
    database whose result rows would be nearly all padding (more than :data:`MAX_PADDED_RESULTS` slots),
    and any result that cannot fit in memory (``bytes_per_slot``: a distance and an id)."""
    slots = n_queries * k
    if k > n_items and slots > MAX_PADDED_RESULTS:
        raise ConfigError(f"{option}={k} exceeds the {n_items} database items and {n_queries} x {k} result slots "
                          "would be allocated, nearly all of them empty; ask for at most the database size")
    # Twice the result: the search's own output and the sorted copy handed back.
    check_memory(2 * slots * bytes_per_slot, f"{option}={k}: {n_queries} x {k} search results",
                 f"ask for fewer results ({option}) or search fewer queries at a time")
