"""float-entropy.v1: bit-exact round trips for every dtype, C == numpy, malformed streams rejected."""

from __future__ import annotations

import struct

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shardstore.codecs import entropy as E
from shardstore.codecs.base import PieceInfo
from shardstore.codecs.entropy import FloatEntropyCodec
from shardstore.errors import CodecError
from shardstore.format.dtypes import ITEMSIZE

IMPLEMENTATIONS: list[E.Kernels] = [E.NUMPY_KERNELS]
if E.C_KERNELS is not None and E.C_PORTABLE_KERNELS is not None:
    IMPLEMENTATIONS += [E.C_KERNELS, E.C_PORTABLE_KERNELS]
if E.C_AVX2_KERNELS is not None:  # the CPU has AVX-512: its decode loops and the AVX2 ones both
    IMPLEMENTATIONS.append(E.C_AVX2_KERNELS)
_NAMES = {
    id(E.NUMPY_KERNELS): "numpy",
    id(E.C_KERNELS): "c",
    id(E.C_PORTABLE_KERNELS): "c-portable",
    id(E.C_AVX2_KERNELS): "c-avx2",
}
KERNELS = [pytest.param(k, id=_NAMES[id(k)]) for k in IMPLEMENTATIONS]

# Bit patterns that break naive float handling: NaN payloads (quiet, signalling, negative),
# signed zeros, infinities, subnormals, extremes.
SPECIALS: dict[int, list[int]] = {
    2: [
        0x0000,
        0x8000,
        0x7C00,
        0xFC00,
        0x7E01,
        0xFD55,
        0x0001,
        0x83FF,  # f16
        0x7F80,
        0xFF80,
        0x7FC1,
        0xFFA5,
        0x0001,
        0x807F,
        0x7F7F,
        0xFFFF,
    ],  # bf16
    4: [
        0x00000000,
        0x80000000,
        0x7F800000,
        0xFF800000,
        0x7FC00001,
        0xFFB00000,
        0x00000001,
        0x807FFFFF,
        0x7F7FFFFF,
        0xFFFFFFFF,
    ],
    8: [
        0,
        1 << 63,
        0x7FF0000000000000,
        0xFFF0000000000000,
        0x7FF8000000000001,
        0xFFF4000000000000,
        1,
        0x800FFFFFFFFFFFFF,
        0xFFFFFFFFFFFFFFFF,
    ],
    1: [0x00, 0x80, 0x7F, 0xFF, 0x7C, 0xFC, 0x01, 0x81],
}


@st.composite
def pieces(draw: st.DrawFn) -> tuple[str, bytes]:
    dtype = draw(st.sampled_from(sorted(ITEMSIZE)))
    k = ITEMSIZE[dtype]
    # A small pool of values makes some fields compressible (coded), random bits keep others raw.
    pool = draw(st.lists(st.integers(0, (1 << (8 * k)) - 1), min_size=1, max_size=12))
    element = st.one_of(st.sampled_from(SPECIALS[k]), st.sampled_from(pool), st.integers(0, (1 << (8 * k)) - 1))
    values = draw(st.lists(element, max_size=300))
    return dtype, b"".join(v.to_bytes(k, "little") for v in values)


@settings(max_examples=300, deadline=None)
@given(pieces(), st.sampled_from([32, 64, 1 << 18]))
def test_round_trip_every_dtype(piece: tuple[str, bytes], block_elems: int) -> None:
    dtype, data = piece
    encoded = {}
    for kernels in IMPLEMENTATIONS:
        blob = E.encode_piece(data, dtype, block_elems, kernels)
        encoded[id(kernels)] = blob
        for decoder in IMPLEMENTATIONS:
            out = bytearray(len(data))
            E.decode_piece(blob, dtype, block_elems, memoryview(out), decoder)
            assert bytes(out) == data
    # Invariant 5 across implementations: the same bytes whichever kernels encoded.
    assert len(set(encoded.values())) == 1


@pytest.mark.parametrize("dtype", ["BF16", "F16", "F32", "F64", "U8", "I16"])
def test_large_pieces_every_implementation(dtype: str) -> None:
    """Several blocks of weight-like values: long enough for the SIMD paths and their tails."""
    k = ITEMSIZE[dtype]
    rng = np.random.default_rng(7)
    x = rng.standard_normal(50_003).astype(np.float32) * np.float32(0.03)
    x[::101] = 0.0
    raw = {
        "BF16": (x.view(np.uint32) >> 16).astype("<u2"),
        "F16": x.astype("<f2"),
        "F32": x.astype("<f4"),
        "F64": x.astype("<f8"),
        "U8": rng.integers(0, 40, len(x)).astype(np.uint8),
        "I16": rng.integers(-2000, 2000, len(x)).astype("<i2"),
    }[dtype].tobytes()
    assert len(raw) == len(x) * k
    for block_elems in (1 << 12, 4000, 1 << 18):
        blobs = {E.encode_piece(raw, dtype, block_elems, kernels) for kernels in IMPLEMENTATIONS}
        assert len(blobs) == 1
        (blob,) = blobs
        assert len(blob) < len(raw)
        for kernels in IMPLEMENTATIONS:
            out = bytearray(len(raw))
            E.decode_piece(blob, dtype, block_elems, memoryview(out), kernels)
            assert bytes(out) == raw


@pytest.mark.parametrize("dtype", ["BF16", "F16", "F32", "F64"])
def test_special_floats_and_codec_api(dtype: str) -> None:
    k = ITEMSIZE[dtype]
    rng = np.random.default_rng(1)
    normal = rng.standard_normal(5001).astype(np.float32) * 0.02
    bf16 = (normal.view(np.uint32) >> 16).astype(np.uint16)  # truncation is a valid bf16 too
    base = {
        "BF16": bf16,
        "F16": normal.astype(np.float16).view(np.uint16),
        "F32": normal.view(np.uint32),
        "F64": normal.astype(np.float64).view(np.uint64),
    }[dtype]
    base = np.asarray(base).astype(np.uint64)
    values = np.concatenate([base, np.array(SPECIALS[k] * 7, dtype=np.uint64)])
    data = values.astype(f"<u{k}").tobytes()
    codec = FloatEntropyCodec(block_elems=1024)
    info = PieceInfo(dtype, (len(values),))
    blob = codec.encode(data, info)
    assert len(blob) < len(data)  # the normal-looking values must compress
    assert bytes(codec.decode(blob, info)) == data
    out = bytearray(len(data))
    assert codec.decode(blob, info, memoryview(out)).obj is out  # type: ignore[union-attr]
    assert bytes(out) == data


def test_empty_and_odd_sizes() -> None:
    codec = FloatEntropyCodec()
    for dtype, k in ITEMSIZE.items():
        assert codec.encode(b"", PieceInfo(dtype, (0, 7))) == b""
        assert bytes(codec.decode(b"", PieceInfo(dtype, (0,)))) == b""
        data = bytes(i % 251 for i in range(33 * k))
        info = PieceInfo(dtype, (3, 11))
        assert bytes(codec.decode(codec.encode(data, info), info)) == data


def test_constant_field_uses_one_symbol_table() -> None:
    data = np.zeros(4096, dtype="<u2").tobytes()
    blob = FloatEntropyCodec().encode(data, PieceInfo("BF16", (4096,)))
    assert len(blob) < 400  # two tiny tables and their lane states, nothing per element


def test_config_validation() -> None:
    for bad in (0, 31, 33, 1 << 25, True, 64.0):
        with pytest.raises(CodecError):
            FloatEntropyCodec.from_config({"id": "float-entropy.v1", "block_elems": bad})
    assert FloatEntropyCodec.from_config({"id": "float-entropy.v1"}) == FloatEntropyCodec()


def _sample_stream() -> tuple[bytes, bytes]:
    rng = np.random.default_rng(2)
    data = (rng.standard_normal(700).astype(np.float32) * 0.05).tobytes()
    return data, E.encode_piece(data, "F32", 256, E.NUMPY_KERNELS)


@pytest.mark.parametrize("kernels", KERNELS)
def test_truncated_streams_raise(kernels: E.Kernels) -> None:
    data, blob = _sample_stream()
    for cut in range(len(blob)):
        with pytest.raises(CodecError):
            E.decode_piece(blob[:cut], "F32", 256, memoryview(bytearray(len(data))), kernels)
    with pytest.raises(CodecError):
        E.decode_piece(blob + b"\0", "F32", 256, memoryview(bytearray(len(data))), kernels)


@pytest.mark.parametrize("kernels", KERNELS)
def test_corrupt_streams_never_crash(kernels: E.Kernels) -> None:
    data, blob = _sample_stream()
    rng = np.random.default_rng(3)
    for _ in range(300):
        corrupt = bytearray(blob)
        for pos in rng.integers(0, len(blob), size=int(rng.integers(1, 4))):
            corrupt[pos] ^= int(rng.integers(1, 256))
        # A guard after the piece: undetected corruption must still write only the declared size.
        # (A write far past it is what the sanitizer build, scripts/sanitize.sh, catches.)
        out = bytearray(b"\xa5" * (len(data) + 64))
        try:
            E.decode_piece(bytes(corrupt), "F32", 256, memoryview(out)[: len(data)], kernels)
        except CodecError:
            continue
        finally:
            assert out[len(data):] == b"\xa5" * 64, "the decoder wrote past the piece"


@pytest.mark.parametrize("kernels", KERNELS)
def test_huge_declared_lengths_are_rejected(kernels: E.Kernels) -> None:
    # mode rANS, one symbol 0 with frequency 4096, then a payload length of 4 GiB - 1.
    header = bytes([1, 0, 0]) + bytes([0xFF, 0x1F]) + struct.pack("<I", 0xFFFFFFFF)
    stream = header * 2
    with pytest.raises(CodecError):
        E.decode_piece(stream, "BF16", 1 << 18, memoryview(bytearray(64)), kernels)
    bad_mode = bytes([7]) + bytes(100)
    with pytest.raises(CodecError):
        E.decode_piece(bad_mode, "U8", 1 << 18, memoryview(bytearray(10)), kernels)


def test_wrong_sizes_rejected() -> None:
    codec = FloatEntropyCodec()
    with pytest.raises(CodecError):
        codec.encode(b"\0" * 6, PieceInfo("F32", (2,)))
    blob = codec.encode(b"\0" * 8, PieceInfo("F32", (2,)))
    with pytest.raises(CodecError):
        codec.decode(blob, PieceInfo("F32", (2,)), memoryview(bytearray(4)))


def test_normalize_is_exact_and_keeps_rare_symbols() -> None:
    counts = np.zeros((3, E.ALPHABET), dtype=np.int64)
    counts[0, :300] = 1
    counts[0, 5] = 10**6
    counts[1, 7] = 12
    counts[2, [1, 2, 3]] = [1, 1, 10**7]
    for row, total in zip(counts, (10**6 + 299, 12, 10**7 + 2), strict=True):
        freqs = E.normalize(row[None, :], total)[0]
        assert freqs.sum() == E.PROB_SCALE
        assert ((freqs > 0) == (row > 0)).all()


# ---------------------------------------------------------------- the SIMD loops against the others
#
# The C kernels run AVX2 loops where the CPU has them (encode: rANS steps with a float-reciprocal
# division, a whole-value histogram for 2-byte elements, bit packing; decode: the rANS steps with
# the field merge fused in). They must give the same bytes as the portable C loops and numpy on
# data that reaches every branch: 9-bit fields whose symbols straddle 256 (the decode entry keeps
# only 8 symbol bits), a symbol above half the probability (the encoder's wide division),
# single-symbol tables, partial groups and blocks, and pieces long enough for the 64K histogram.

SIMD = pytest.mark.skipif(
    E.C_KERNELS is None or E._entropy.simd() == "none", reason="no C extension or no SIMD path on this CPU"
)


def _weights(rng: np.random.Generator, n: int, decades: float, zeros: float) -> npt.NDArray[np.float32]:
    """Normal values whose magnitudes spread over `decades` powers of ten, a share of them zero."""
    x = rng.standard_normal(n) * np.power(10.0, rng.uniform(-decades, decades, n))
    x[rng.random(n) < zeros] = 0.0
    with np.errstate(over="ignore"):  # past float32's range: infinities, fine data too
        return x.astype(np.float32)


def _as_dtype(x: npt.NDArray[np.float32], dtype: str) -> bytes:
    if dtype == "BF16":
        return (x.view(np.uint32) >> 16).astype("<u2").tobytes()
    if dtype == "F16":
        with np.errstate(over="ignore"):  # magnitudes past 65504 become infinities: fine data too
            return x.astype("<f2").tobytes()
    return x.astype("<f4").tobytes()


def _all_agree(raw: bytes, dtype: str, block_elems: int) -> bytes:
    """Every encoder gives the same bytes and every decoder the input back; returns the stream."""
    blobs = {E.encode_piece(raw, dtype, block_elems, kernels) for kernels in IMPLEMENTATIONS}
    assert len(blobs) == 1
    (blob,) = blobs
    for kernels in IMPLEMENTATIONS:
        out = bytearray(len(raw))
        E.decode_piece(blob, dtype, block_elems, memoryview(out), kernels)
        assert bytes(out) == raw
    return blob


@SIMD
@settings(max_examples=60, deadline=None)
@given(
    st.sampled_from(["BF16", "F16", "F32"]),
    st.integers(1, 6000),
    st.sampled_from([0.0, 1.0, 3.0, 40.0]),
    st.sampled_from([0.0, 0.3, 0.7, 1.0]),
    st.sampled_from([32, 96, 2048, 1 << 18]),
    st.integers(0, 2**32 - 1),
)
def test_simd_matches_portable_and_numpy(
    dtype: str, n: int, decades: float, zeros: float, block_elems: int, seed: int
) -> None:
    raw = _as_dtype(_weights(np.random.default_rng(seed), n, decades, zeros), dtype)
    _all_agree(raw, dtype, block_elems)


def _field0_modes_and_symbols(blob: bytes, nbytes: int) -> tuple[int, list[int]]:
    """Mode and symbols of the first field of the first block (a stream starts with it)."""
    reader = E._Reader(memoryview(blob))
    mode = reader.take(1, "mode")[0]
    if mode != 1:
        return mode, []
    nsym = reader.varint("n") + 1
    symbols, sym = [], 0
    for r in range(nsym):
        gap = reader.varint("s")
        sym = gap if r == 0 else sym + gap + 1
        symbols.append(sym)
    return mode, symbols


@SIMD
@pytest.mark.parametrize("dtype", ["BF16", "F32"])
def test_nine_bit_symbols_either_side_of_256(dtype: str) -> None:
    """The top field of BF16 and F32 holds exponent and top mantissa bit, 9 bits: values either
    side of 2.0 in magnitude give symbols either side of 256, all in one coded table."""
    rng = np.random.default_rng(11)
    x = (rng.standard_normal(40_000) * np.power(2.0, rng.integers(-6, 7, 40_000))).astype(np.float32)
    raw = _as_dtype(x, dtype)
    blob = _all_agree(raw, dtype, 1 << 18)
    mode, symbols = _field0_modes_and_symbols(blob, len(raw))
    assert mode == 1
    assert min(symbols) < 256 <= max(symbols)
    # Every symbol at or above 256: the threshold slot is 0.
    big = _as_dtype((np.abs(x) + 2.0) * np.sign(x + 1e-30).astype(np.float32), dtype)
    blob = _all_agree(big, dtype, 1 << 18)
    mode, symbols = _field0_modes_and_symbols(blob, len(big))
    assert mode == 1 and min(symbols) >= 256


@SIMD
@pytest.mark.parametrize("widths", [[3, 5], [1, 7], [4, 4], [2, 3, 3]])
def test_one_byte_rotated_layouts_encode_alike(widths: list[int]) -> None:
    """No dtype's layout rotates one-byte elements, but the kernels take any layout: the AVX2
    encoder once ignored the rotation for them (its stream differed from the portable and numpy
    ones, and no decoder gave the input back). Every encoder now gives the same bytes and every
    decoder the input."""
    rng = np.random.default_rng(13)
    raw = bytes(rng.choice([1, 2, 3, 0x80, 0x81], 5000).astype(np.uint8))
    blobs = {kernels.encode_piece(memoryview(raw), 1, 1, bytes(widths), 2048, E._cost_bytes())
             for kernels in IMPLEMENTATIONS}
    assert len(blobs) == 1
    for kernels in IMPLEMENTATIONS:
        out = bytearray(len(raw))
        kernels.decode(next(iter(blobs)), 1, 1, bytes(widths), 2048, memoryview(out))
        assert bytes(out) == raw, _NAMES[id(kernels)]


@SIMD
@pytest.mark.parametrize("dtype", ["BF16", "F16", "F32"])
def test_long_pieces_decode_alike_on_every_simd_level(dtype: str) -> None:
    """Pieces of 2**21 weights (eight blocks, a thousand chunks): long enough that lanes meet the
    rare states next to the renormalisation threshold many times over. (The first AVX-512 loop
    compared the state with 2**16 - 1 instead of 2**16: the random short pieces of the property
    test above passed it; these fail it for every dtype.) Every C decoder, at every SIMD level the
    CPU has, gives the input back; the numpy one is left out for its speed."""
    x = (np.random.default_rng(7).standard_normal(1 << 21) * 0.02).astype(np.float32)
    raw = _as_dtype(x, dtype)
    blob = E.encode_piece(raw, dtype, E.DEFAULT_BLOCK_ELEMS, E.DEFAULT_KERNELS)
    for kernels in IMPLEMENTATIONS:
        if kernels is E.NUMPY_KERNELS:
            continue
        out = bytearray(len(raw))
        E.decode_piece(blob, dtype, E.DEFAULT_BLOCK_ELEMS, memoryview(out), kernels)
        assert bytes(out) == raw, _NAMES[id(kernels)]


@SIMD
@pytest.mark.parametrize("dtype", ["BF16", "F16", "F32"])
def test_dominant_and_single_symbol_fields(dtype: str) -> None:
    """Mostly zeros: a symbol above 2048/4096 (the encoder's two-part float conversion); all
    zeros: single-symbol tables, which the SIMD decoder fills without running the rANS loop."""
    rng = np.random.default_rng(5)
    mostly = _weights(rng, 70_001, 1.0, 0.8)
    _all_agree(_as_dtype(mostly, dtype), dtype, 1 << 14)
    blob = _all_agree(_as_dtype(np.zeros(50_000, np.float32), dtype), dtype, 1 << 18)
    assert len(blob) < 600  # one-symbol tables and lane states only


@SIMD
@pytest.mark.parametrize("dtype", ["BF16", "F16", "I16", "U8", "I32", "F64"])
def test_whole_value_histogram_and_packers(dtype: str) -> None:
    """Pieces past the 64K-bin histogram's threshold, with raw (near-random) fields for the SIMD
    packers and unpackers, a partial last block and a partial last group."""
    rng = np.random.default_rng(9)
    n = (1 << 16) + 77
    x = rng.standard_normal(n).astype(np.float32) * np.float32(0.05)
    raw = {
        "BF16": _as_dtype(x, "BF16"),
        "F16": _as_dtype(x, "F16"),
        "I16": rng.integers(-30000, 30000, n).astype("<i2").tobytes(),
        "U8": rng.integers(0, 256, n).astype(np.uint8).tobytes(),
        "I32": rng.integers(-(2**20), 2**20, n).astype("<i4").tobytes(),
        "F64": x.astype("<f8").tobytes(),
    }[dtype]
    for block_elems in (1 << 15, 1 << 18):
        _all_agree(raw, dtype, block_elems)
