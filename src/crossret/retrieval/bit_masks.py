"""Bit masks of 64 equality tests in one vector compare, for numba kernels.

:func:`equal_mask64` is a numba intrinsic: ``equal_mask64(array, start, value)`` is the uint64 whose
bit ``i`` is set where ``array[start + i] == value``, for ``i = 0..63``. It loads the 64 elements as one
LLVM vector, compares them with ``value`` and reinterprets the 64 results as an integer. On a CPU with
AVX-512 that is one ``vpcmpeqb`` (or four ``vpcmpeqd``) and a ``kmovq``; elsewhere LLVM lowers it to
narrower compares and ``vpmovmskb``, with the same result.

Written as an intrinsic because LLVM does not recognise the scalar spelling
(``mask |= uint64(a[i] == v) << i``): it builds that mask with a shift and an OR per element and a
horizontal reduction, several times the work. The index-rule walk of
:mod:`crossret.retrieval.hamming` finds the relevant items of 64 database items, and the items at one
distance before one of them, with it.

``value`` must have the array's dtype (a typing error otherwise, rather than a silent truncation). No
bounds check: the caller guarantees ``0 <= start`` and ``start + 64 <= len(array)`` (a C-contiguous
1-D integer array).
"""

from __future__ import annotations

from typing import Any

from llvmlite import ir
from numba.core import types
from numba.extending import intrinsic

__all__ = ["MASK_WIDTH", "equal_mask64"]

MASK_WIDTH = 64


@intrinsic
def equal_mask64(typingctx: Any, array: Any, start: Any, value: Any) -> Any:
    """uint64 mask of ``array[start + i] == value`` for ``i = 0..63`` (see the module docstring)."""
    if not (isinstance(array, types.Array) and array.ndim == 1 and array.layout == "C"
            and isinstance(array.dtype, types.Integer) and isinstance(start, types.Integer)
            and value == array.dtype):
        return None

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        array_value, start_value, scalar = args
        array_type, start_type, _ = signature.args
        data = context.make_array(array_type)(context, builder, array_value).data
        element = context.get_data_type(array_type.dtype)
        offset = context.cast(builder, start_value, start_type, types.intp)
        vector_type = ir.VectorType(element, MASK_WIDTH)
        vector = builder.load(builder.gep(data, [offset]), typ=vector_type, align=1)
        undefined = ir.Constant(vector_type, ir.Undefined)
        lane0 = builder.insert_element(undefined, scalar, ir.Constant(ir.IntType(32), 0))
        splat = builder.shuffle_vector(lane0, undefined,
                                       ir.Constant(ir.VectorType(ir.IntType(32), MASK_WIDTH), [0] * MASK_WIDTH))
        equal = builder.icmp_unsigned("==", vector, splat)
        return builder.bitcast(equal, ir.IntType(MASK_WIDTH))

    return types.uint64(array, start, value), codegen
