"""Let a numba kernel's loops use the CPU's widest vectors (512-bit on AVX-512 CPUs).

LLVM, which numba compiles through, vectorises at most 256 bits wide on Intel CPUs with AVX-512
unless a function asks for more: their tuning prefers 256-bit vectors because early AVX-512 cores
lowered their clock for 512-bit work. For integer kernels such as XOR + popcount that preference
halves the throughput, since ``vpopcntq`` handles eight 64-bit words per 512-bit instruction.

:func:`prefer_wide_vectors` is a numba intrinsic that, called at the top of a kernel (or inside a
``prange`` body, which numba compiles as a function of its own), marks the LLVM function being built
with ``"prefer-vector-width"="512"``. It changes instruction selection only: integer results are
the same bit for bit, and floating-point code is not reassociated unless it is compiled with
``fastmath``. On a CPU without 512-bit vectors the attribute is inert. The process-wide alternative
(numba's ``NUMBA_CPU_FEATURES`` with ``-prefer-256-bit``) would change every numba function of the
user's process, so it is not used.
"""

from __future__ import annotations

from typing import Any

from numba.core import types
from numba.extending import intrinsic

__all__ = ["WIDE_VECTOR_ATTRIBUTE", "prefer_wide_vectors"]

WIDE_VECTOR_ATTRIBUTE = '"prefer-vector-width"="512"'


def _mark_function(function: Any) -> None:
    """Add the string attribute to an llvmlite function. llvmlite validates attribute names against
    a list of enum attributes, so the set is extended directly (it renders its members verbatim)."""
    attributes = function.attributes
    if WIDE_VECTOR_ATTRIBUTE not in attributes:
        try:
            set.add(attributes, WIDE_VECTOR_ATTRIBUTE)
        except TypeError:  # a future llvmlite with another container: keep the default width
            pass


@intrinsic
def prefer_wide_vectors(typingctx: Any) -> Any:
    """Mark the calling numba function for 512-bit vectors (see the module docstring); no value."""
    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        _mark_function(builder.function)
        return context.get_dummy_value()

    return types.void(), codegen
