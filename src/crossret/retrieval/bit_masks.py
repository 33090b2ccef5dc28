"""Vector tests over 64 to 1,024 array elements at once, for numba kernels.

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

:func:`any_popcount_below` is the first pass of the flat Hamming scan: whether any of 256 codes of 1, 2
or 4 words lies at Hamming distance ``p < bound`` from a query (``0 <= bound <= 64 · words + 1``).
:func:`quarters_popcount_below` answers the same per 64 codes and :func:`blocks_popcount_below` per 256 of
1,024 codes, as bits of an int64. They keep a running minimum of the distances, read as 32-bit lanes:
a distance fits in the low half of its 64-bit lane and the high half is zero, so an unsigned 32-bit
minimum (``vpminud``) keeps every low half's minimum, and only the low halves are compared with the
bound at the end. That is one operation per eight codes on a port the vector popcount does not use,
the same count as a popcount sum: the 64-bit minimum (``vpminuq``) and an add-and-AND test measured
slower (docs/scale.md).

:func:`popcount_below_mask64` is the uint64 whose bit ``j`` is set where code ``j`` of 64 lies below the
bound: eight vector compares whose lane masks are concatenated. The scan computes it only for the
64 codes where the test found a hit, and walks its set bits.

Same contract for all four: a C-contiguous 1-D uint64 array holding every word read, unchecked.
"""

from __future__ import annotations

from typing import Any

from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic

__all__ = ["BELOW_BLOCK", "MASK_WIDTH", "any_popcount_below", "blocks_popcount_below", "equal_mask64",
           "popcount_below_mask64", "quarters_popcount_below"]

MASK_WIDTH = 64
BELOW_BLOCK = 256  # codes per any_popcount_below test
_LANES = 8  # uint64 lanes per vector: 512 bits


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
        vector = _load_vector(builder, data, offset, vector_type, 1)
        equal = builder.icmp_unsigned("==", vector, _splat(builder, scalar, vector_type))
        return builder.bitcast(equal, ir.IntType(MASK_WIDTH))

    return types.uint64(array, start, value), codegen


def _intp_type(context: Any) -> Any:
    """LLVM type of numba's ``intp``."""
    return context.get_value_type(types.intp)


def _load_vector(builder: Any, data: Any, offset: Any, vector_type: Any, align: int) -> Any:
    """The vector of ``vector_type`` at element ``offset`` of ``data``. The element pointer is cast to a
    vector pointer for llvmlite builds with typed pointers; with opaque pointers the cast is a no-op."""
    pointer = builder.bitcast(builder.gep(data, [offset]), vector_type.as_pointer())
    return builder.load(pointer, typ=vector_type, align=align)


def _splat(builder: Any, value: Any, vector_type: Any) -> Any:
    """``value`` in every lane of ``vector_type``."""
    undefined = ir.Constant(vector_type, ir.Undefined)
    lane0 = builder.insert_element(undefined, value, ir.Constant(ir.IntType(32), 0))
    lanes = vector_type.count
    return builder.shuffle_vector(lane0, undefined, ir.Constant(ir.VectorType(ir.IntType(32), lanes), [0] * lanes))


def _codes_typing(codes: Any, start: Any, stride: Any, query: Any, bound: Any) -> bool:
    """Whether the arguments fit the popcount intrinsics' contract (else numba reports a typing error)."""
    return (isinstance(codes, types.Array) and codes.ndim == 1 and codes.layout == "C"
            and codes.dtype == types.uint64 and isinstance(start, types.Integer)
            and isinstance(stride, types.Integer) and isinstance(query, types.UniTuple)
            and query.dtype == types.uint64 and query.count in (1, 2, 4) and isinstance(bound, types.Integer))


class _DistanceVectors:
    """LLVM code for the Hamming distances of eight word-major codes at a time to one query (shared by
    the popcount intrinsics)."""

    def __init__(self, context: Any, builder: Any, signature: Any, args: Any) -> None:
        codes_value, start_value, stride_value, query_value, bound_value = args
        codes_type, start_type, stride_type, query_type, bound_type = signature.args
        self.builder = builder
        self.vector_type = ir.VectorType(ir.IntType(64), _LANES)
        self.data = context.make_array(codes_type)(context, builder, codes_value).data
        self.offset = context.cast(builder, start_value, start_type, types.intp)
        self.step = context.cast(builder, stride_value, stride_type, types.intp)
        self.bound = context.cast(builder, bound_value, bound_type, types.int64)
        self.popcount = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(self.vector_type, [self.vector_type]), "llvm.ctpop.v8i64")
        self.words = [_splat(builder, builder.extract_value(query_value, w), self.vector_type)
                      for w in range(query_type.count)]

    def distances(self, at: Any) -> Any:
        """The distances of the eight codes from element ``at`` on, as a vector of 8 × i64."""
        builder = self.builder
        distance = None
        for word in self.words:
            codes_vector = _load_vector(builder, self.data, at, self.vector_type, 8)
            bits = builder.call(self.popcount, [builder.xor(codes_vector, word)])
            distance = bits if distance is None else builder.add(distance, bits)
            at = builder.add(at, self.step)
        return distance


def _below_test_intrinsic(n_codes: int, group: int, as_bool: bool) -> Any:
    """The intrinsic that tests ``n_codes`` codes for a distance below the bound and answers per ``group``
    of them: an int64 with bit ``i`` set where group ``i`` has one, or (``as_bool``) whether any has."""
    n_groups, steps = n_codes // group, group // MASK_WIDTH

    @intrinsic
    def below(typingctx: Any, codes: Any, start: Any, stride: Any, query: Any, bound: Any) -> Any:
        if not _codes_typing(codes, start, stride, query, bound):
            return None

        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            vectors = _DistanceVectors(context, builder, signature, args)
            word64, word32, intp = ir.IntType(64), ir.IntType(32), _intp_type(context)
            halves = ir.VectorType(word32, 2 * _LANES)  # each distance's 64-bit lane as two 32-bit lanes
            umin = cgutils.get_or_insert_function(builder.module, ir.FunctionType(halves, [halves, halves]),
                                                  "llvm.umin.v16i32")
            limit = _splat(builder, builder.trunc(vectors.bound, word32), halves)
            low_halves = ir.Constant(ir.IntType(2 * _LANES), int("01" * _LANES, 2))  # little-endian
            offset = vectors.offset
            found = cgutils.alloca_once_value(builder, ir.Constant(word64, 0))
            nearest = cgutils.alloca_once(builder, halves)
            # Loops of steps of 64 codes, so that the body stays small inside a large kernel.
            with cgutils.for_range(builder, ir.Constant(intp, n_groups)) as group_loop:
                group_start = builder.add(offset, builder.mul(group_loop.index, ir.Constant(offset.type, group)))
                builder.store(ir.Constant(halves, [-1] * 2 * _LANES), nearest)
                with cgutils.for_range(builder, ir.Constant(intp, steps)) as loop:
                    step_start = builder.add(group_start,
                                             builder.mul(loop.index, ir.Constant(offset.type, MASK_WIDTH)))
                    terms = []
                    for block in range(MASK_WIDTH // _LANES):
                        at = builder.add(step_start, ir.Constant(offset.type, _LANES * block))
                        terms.append(builder.bitcast(vectors.distances(at), halves))
                    while len(terms) > 1:  # a balanced tree: independent operations
                        terms = [builder.call(umin, [terms[i], terms[i + 1]]) for i in range(0, len(terms), 2)]
                    builder.store(builder.call(umin, [builder.load(nearest), terms[0]]), nearest)
                below = builder.bitcast(builder.icmp_unsigned("<", builder.load(nearest), limit),
                                        ir.IntType(2 * _LANES))
                hit = builder.icmp_unsigned("!=", builder.and_(below, low_halves),
                                            ir.Constant(ir.IntType(2 * _LANES), 0))
                bit = builder.shl(builder.zext(hit, word64), builder.zext(group_loop.index, word64))
                builder.store(builder.or_(builder.load(found), bit), found)
            result = builder.load(found)
            if as_bool:
                return builder.icmp_unsigned("!=", result, ir.Constant(word64, 0))
            return result

        return (types.boolean if as_bool else types.int64)(codes, start, stride, query, bound), codegen

    return below


@intrinsic
def popcount_below_mask64(typingctx: Any, codes: Any, start: Any, stride: Any, query: Any, bound: Any) -> Any:
    """uint64 whose bit ``j`` is set where ``sum_w popcount(query[w] ^ codes[start + w · stride + j]) < bound``,
    ``j = 0..63`` (same contract as :func:`any_popcount_below`). Eight vector compares whose lane masks
    are concatenated (``kunpck`` on AVX-512) and read as one integer: the scan walks its set bits with
    ``tzcnt`` instead of storing and re-reading 64 distances (see the module docstring)."""
    if not _codes_typing(codes, start, stride, query, bound):
        return None

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        vectors = _DistanceVectors(context, builder, signature, args)
        limit = _splat(builder, vectors.bound, vectors.vector_type)
        parts = []
        for block in range(MASK_WIDTH // _LANES):
            at = builder.add(vectors.offset, ir.Constant(vectors.offset.type, _LANES * block))
            parts.append(builder.icmp_unsigned("<", vectors.distances(at), limit))
        while len(parts) > 1:  # concatenate: <8 x i1> pairs into <16 x i1>, ... into <64 x i1>
            width = parts[0].type.count
            order = ir.Constant(ir.VectorType(ir.IntType(32), 2 * width), list(range(2 * width)))
            parts = [builder.shuffle_vector(parts[i], parts[i + 1], order) for i in range(0, len(parts), 2)]
        return builder.bitcast(parts[0], ir.IntType(MASK_WIDTH))

    return types.uint64(codes, start, stride, query, bound), codegen


any_popcount_below = _below_test_intrinsic(BELOW_BLOCK, BELOW_BLOCK, as_bool=True)
any_popcount_below.__doc__ = """Whether ``sum_w popcount(query[w] ^ codes[start + w · stride + j]) < bound`` for some
``j < 256`` (word-major codes: word ``w`` of item ``j`` at ``codes[start + w · stride + j]``; ``query`` a tuple
of 1, 2 or 4 uint64 words; see the module docstring)."""
quarters_popcount_below = _below_test_intrinsic(BELOW_BLOCK, MASK_WIDTH, as_bool=False)
quarters_popcount_below.__doc__ = """:func:`any_popcount_below` answered per quarter: an int64 whose bit ``i``
(``i = 0..3``) is set where one of the codes ``64 i .. 64 i + 63`` lies below ``bound``."""
blocks_popcount_below = _below_test_intrinsic(4 * BELOW_BLOCK, BELOW_BLOCK, as_bool=False)
blocks_popcount_below.__doc__ = """:func:`any_popcount_below` over 1,024 codes, answered per block of 256: an int64
whose bit ``i`` (``i = 0..3``) is set where one of the codes ``256 i .. 256 i + 255`` lies below ``bound``."""
