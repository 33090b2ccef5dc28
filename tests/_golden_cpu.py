"""Whether this CPU computes floats as the machine the tests' golden values and binary fixtures were recorded on.

torch and numpy pick their float kernels from the CPU when they load. The golden digests and fixture histories
were recorded on an Intel x86-64 machine; on an AMD EPYC with AVX-512 (seen on this project's machines) some
float32 results differ in the last bits, and training carries that along. Integer results (binary codes,
counts, ids) and everything within one machine stay exact. Tests that compare floats with a recording check
them exactly on such a CPU and, elsewhere, against the same computation run on this machine or within a
tolerance that a real fault (a lost weight, a wrong resume, a missing gradient average) would exceed.
"""

from __future__ import annotations

from pathlib import Path


def _vendor() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    for line in text.splitlines():
        if line.startswith("vendor_id"):
            return line.split(":", 1)[1].strip()
    return ""


CPU_VENDOR = _vendor()
RECORDING_CPU = CPU_VENDOR == "GenuineIntel"
"""True on the kind of CPU the golden float values were recorded on (Intel x86-64)."""
