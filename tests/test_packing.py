"""Bit packing: round trips, faiss bit order, sign(0) = +1, padding, and every error path."""

from __future__ import annotations

import numpy as np
import pytest

from crossret.errors import CodeError
from crossret.retrieval.packing import (
    as_pm1,
    binarize,
    check_packed,
    pack_codes,
    packed_to_words,
    packed_width,
    pad_packed,
    padded_bits,
    unpack_codes,
)

LENGTHS = [1, 7, 8, 9, 48, 63, 64, 65, 100, 128, 130]


def _pm1(rng: np.random.Generator, n: int, bits: int) -> np.ndarray:
    return rng.choice(np.array([-1, 1], dtype=np.int8), size=(n, bits))


@pytest.mark.parametrize("bits", LENGTHS)
def test_round_trip_pm1_and_01(bits: int) -> None:
    rng = np.random.default_rng(bits)
    codes = _pm1(rng, 17, bits)
    packed = pack_codes(codes)
    assert packed.dtype == np.uint8 and packed.shape == (17, (bits + 7) // 8) == (17, packed_width(bits))
    back = unpack_codes(packed, bits)
    assert back.dtype == np.int8
    np.testing.assert_array_equal(back, codes)
    np.testing.assert_array_equal(pack_codes((codes > 0).astype(np.uint8)), packed)
    np.testing.assert_array_equal(pack_codes(codes > 0), packed)
    np.testing.assert_array_equal(pack_codes(codes.astype(np.float32)), packed)
    # Unpacking also accepts rows padded to 64-bit words.
    np.testing.assert_array_equal(unpack_codes(pad_packed(packed, bits), bits), codes)


def test_bit_order_is_lsb_first() -> None:
    for bit in range(20):
        code = -np.ones((1, 20), dtype=np.int8)
        code[0, bit] = 1
        packed = pack_codes(code)
        expected = np.zeros(3, dtype=np.uint8)
        expected[bit // 8] = 1 << (bit % 8)
        np.testing.assert_array_equal(packed[0], expected)
        words = packed_to_words(packed, 20)
        assert words.dtype == np.uint64 and words.shape == (1, 1)
        assert int(words[0, 0]) == 1 << bit
    code = -np.ones((1, 130), dtype=np.int8)
    code[0, 64 + 3] = 1
    words = packed_to_words(pack_codes(code), 130)
    assert words.shape == (1, 3) and int(words[0, 1]) == 1 << 3 and words[0, 0] == words[0, 2] == 0


@pytest.mark.parametrize("bits", [8, 12, 16, 48, 64, 72, 128])
def test_faiss_distances_agree_with_packed_bit_order(bits: int) -> None:
    faiss = pytest.importorskip("faiss")
    rng = np.random.default_rng(bits + 1)
    q, db = _pm1(rng, 9, bits), _pm1(rng, 31, bits)
    index = faiss.IndexBinaryFlat(8 * packed_width(bits))  # whole bytes; the unused bits are 0
    index.add(pack_codes(db))
    distances, ids = index.search(pack_codes(q), 31)
    brute = (bits - q.astype(np.int64) @ db.astype(np.int64).T) // 2
    np.testing.assert_array_equal(np.take_along_axis(brute, ids, axis=1), distances)
    # faiss's own packer (IndexLSH's fvecs2bitvecs: bit j -> byte j // 8, bit j % 8) gives the same bytes.
    faiss_packed = np.zeros((9, (bits + 7) // 8), dtype=np.uint8)
    as_float = np.ascontiguousarray(q, dtype=np.float32)
    faiss.fvecs2bitvecs(faiss.swig_ptr(as_float), faiss.swig_ptr(faiss_packed), bits, 9)
    np.testing.assert_array_equal(faiss_packed, pack_codes(q))


def test_binarize_sign_zero_is_plus_one() -> None:
    values = np.array([[-2.5, -0.0, 0.0, 1e-30, -1e-30, 3.0]])
    np.testing.assert_array_equal(binarize(values), [[-1, 1, 1, 1, -1, 1]])
    assert binarize(values).dtype == np.int8
    np.testing.assert_array_equal(binarize(np.zeros((2, 3))), np.ones((2, 3)))
    with pytest.raises(CodeError, match="NaN"):
        binarize(np.array([[0.0, np.nan]]))
    with pytest.raises(CodeError, match="NaN or inf"):
        binarize(np.array([[np.inf]]))


@pytest.mark.parametrize("bits", LENGTHS)
def test_padding_to_64_bit_words(bits: int) -> None:
    rng = np.random.default_rng(bits)
    packed = pack_codes(np.ones((3, bits), dtype=np.int8))  # every real bit set
    padded = pad_packed(packed, bits)
    assert padded_bits(bits) % 64 == 0 and padded.shape == (3, padded_bits(bits) // 8)
    np.testing.assert_array_equal(padded[:, : packed.shape[1]], packed)
    assert not padded[:, packed.shape[1]:].any()
    words = packed_to_words(packed, bits)
    assert words.shape == (3, -(-bits // 64))
    # Exactly `bits` set bits per row: nothing leaks into the padding.
    counts = [sum(bin(int(w)).count("1") for w in row) for row in words]
    assert counts == [bits] * 3
    # Already aligned input is returned without padding; wider padded input is trimmed.
    assert pad_packed(padded, bits).shape == padded.shape
    codes = _pm1(rng, 4, bits)
    np.testing.assert_array_equal(packed_to_words(pad_packed(pack_codes(codes), bits), bits),
                                  packed_to_words(pack_codes(codes), bits))


def test_as_pm1_accepts_and_converts() -> None:
    np.testing.assert_array_equal(as_pm1(np.array([[0, 1], [1, 0]])), [[-1, 1], [1, -1]])
    np.testing.assert_array_equal(as_pm1(np.array([[-1.0, 1.0]])), [[-1, 1]])
    np.testing.assert_array_equal(as_pm1(np.array([[True, False]])), [[1, -1]])
    np.testing.assert_array_equal(as_pm1(np.ones((2, 2))), np.ones((2, 2)))  # all ones: all +1
    np.testing.assert_array_equal(as_pm1(np.zeros((1, 3))), -np.ones((1, 3)))  # {0,1}: all 0 -> -1
    assert as_pm1(np.array([[0, 1]])).dtype == np.int8
    assert as_pm1(np.empty((0, 5))).shape == (0, 5)


@pytest.mark.parametrize(
    ("codes", "message"),
    [
        (np.array([1, -1]), "2-D"),
        (np.ones((2, 2, 2)), "2-D"),
        (np.ones((3, 0)), "code length is 0"),
        (np.array([["a", "b"]]), "numeric"),
        (np.array([[1.0, np.nan]]), "NaN"),
        (np.array([[1.0, np.inf]]), "NaN or inf"),
        (np.array([[2, 1]]), "values must be"),
        (np.array([[-1, 0, 1]]), "values must be"),
        (np.array([[0.5, 1.0]]), "values must be"),
    ],
)
def test_as_pm1_errors(codes: np.ndarray, message: str) -> None:
    with pytest.raises(CodeError, match=message):
        as_pm1(codes, name="my codes")
    with pytest.raises(CodeError, match="my codes" if message != "numeric" else message):
        as_pm1(codes, name="my codes")
    with pytest.raises(CodeError):
        pack_codes(codes)


def test_check_packed_errors() -> None:
    good = pack_codes(np.ones((2, 12), dtype=np.int8))
    assert check_packed(good, 12) is good
    with pytest.raises(CodeError, match="uint8"):
        check_packed(good.astype(np.int16), 12)
    with pytest.raises(CodeError, match="2-D"):
        check_packed(good[0], 12)
    with pytest.raises(CodeError, match="rows have 2 bytes but a 24-bit code takes 3"):
        check_packed(good, 24)
    with pytest.raises(CodeError, match="do not match"):
        check_packed(good, 8)
    bad = good.copy()
    bad[0, 1] |= 0x10  # bit 12, beyond a 12-bit code
    with pytest.raises(CodeError, match="beyond the declared 12-bit"):
        check_packed(bad, 12)
    wide = pad_packed(good, 12)
    assert check_packed(wide, 12, allow_padding=True) is wide
    with pytest.raises(CodeError, match="do not match"):
        check_packed(wide, 12)  # padding not allowed by default
    wide = wide.copy()
    wide[1, 5] = 1
    with pytest.raises(CodeError, match="padding bytes"):
        check_packed(wide, 12, allow_padding=True)
    with pytest.raises(CodeError, match="my packed"):
        check_packed(good.astype(np.int16), 12, name="my packed")
    for bits in (0, -8, 2.0, True, "8"):
        with pytest.raises(CodeError, match="positive integer"):
            check_packed(good, bits)  # type: ignore[arg-type]
    with pytest.raises(CodeError, match="positive integer"):
        packed_width(0)
    # Empty packed arrays are fine.
    assert check_packed(np.zeros((0, 2), dtype=np.uint8), 12).shape == (0, 2)
