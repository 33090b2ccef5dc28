"""crossret.retrieval.vector_width: a numba kernel can ask LLVM for 512-bit vectors without changing
what it computes, and without touching any other numba function of the process."""

from __future__ import annotations

import numba as nb
import numpy as np
import pytest

from crossret.retrieval.vector_width import WIDE_VECTOR_ATTRIBUTE, prefer_wide_vectors


@nb.njit
def _plain(a, b):  # pragma: no cover - compiled
    total = np.int64(0)
    for j in range(a.shape[0]):
        total += min(np.int64(a[j] ^ b[j]) & 0xFFFF, 70)
    return total


@nb.njit
def _wide(a, b):  # pragma: no cover - compiled
    prefer_wide_vectors()
    total = np.int64(0)
    for j in range(a.shape[0]):
        total += min(np.int64(a[j] ^ b[j]) & 0xFFFF, 70)
    return total


def _host_has_avx512() -> bool:
    import llvmlite.binding as ll

    return bool(ll.get_host_cpu_features().get("avx512f"))


def test_the_marked_kernel_carries_the_attribute_and_the_plain_one_does_not() -> None:
    rng = np.random.default_rng(0)
    a = rng.integers(0, 2**63, 1000, dtype=np.int64).view(np.uint64)
    b = rng.integers(0, 2**63, 1000, dtype=np.int64).view(np.uint64)
    assert _wide(a, b) == _plain(a, b) == int(np.minimum(((a ^ b) & np.uint64(0xFFFF)).astype(np.int64), 70).sum())
    wide_ir = "\n".join(_wide.inspect_llvm().values())
    plain_ir = "\n".join(_plain.inspect_llvm().values())
    assert WIDE_VECTOR_ATTRIBUTE in wide_ir
    assert WIDE_VECTOR_ATTRIBUTE not in plain_ir


def _host_prefers_256_bit() -> bool:
    """Whether LLVM's tuning for this CPU keeps to 256-bit vectors unless asked (Intel's AVX-512 cores do; AMD's
    Zen 4 and later have no such preference, so plain kernels get 512-bit vectors too)."""
    import llvmlite.binding as ll

    return not ll.get_host_cpu_name().startswith("znver")


@pytest.mark.skipif(not _host_has_avx512(), reason="the CPU has no 512-bit vectors")
def test_on_an_avx512_cpu_only_the_marked_kernel_uses_zmm_registers() -> None:
    a = np.arange(4096, dtype=np.uint64)
    _wide(a, a)
    _plain(a, a)
    assert "zmm" in "\n".join(_wide.inspect_asm().values())
    if _host_prefers_256_bit():  # elsewhere (AMD Zen 4) LLVM picks 512-bit vectors for every kernel anyway
        assert "zmm" not in "\n".join(_plain.inspect_asm().values())
