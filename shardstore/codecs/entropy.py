"""``float-entropy.v1``: float-aware lossless coding with interleaved rANS, near the entropy limit.

Why this shape. The order-0 entropy of a weight tensor sits almost entirely in
its exponent and the top mantissa bit, which track each other (a value's
magnitude decides both); the low mantissa bits are close to random. So each
element is cut into *fields* of at most 9 bits, from the top: floats first
rotate the sign bit to the bottom so the exponent is one whole field together
with the top mantissa bit (byte grouping cuts the bf16/f32 exponent across two
bytes, which is what costs ZipNN ratio). Each field of each block is either
rANS-coded with its own frequency table or bit-packed raw, whichever is
smaller; near-random fields cost nothing to try since the choice comes from a
cost estimate made from the histogram.

rANS rather than Huffman: the exponent distribution is skewed (one symbol often
above 30 %), where Huffman's whole-bit codes lose more than the 0.6 % budget;
rANS with 12-bit probabilities loses < 0.05 %. 32 interleaved states keep the
C decoder's dependency chains independent (fast) and let the numpy fallback
vectorise across lanes.

Field layouts (widths from the top bit; ``rot`` = sign rotated to bit 0)::

    BF16  rot  [9, 7]          e8 m6 | m5..0 s
    F16   rot  [8, 8]          e5 m9..7 | m6..0 s
    F32   rot  [9, 8, 8, 7]    e8 m22 | m21..14 | m13..6 | m5..0 s
    F64   rot  [8] * 8         byte planes of the rotated value
    1-, 2-, 4-, 8-byte ints, bools, f8, c64: byte planes (top byte first)

Stream (little-endian), for a piece of ``n`` elements cut into blocks of
``block_elems`` (the last may be shorter; no blocks when ``n == 0``)::

    for each block, for each field f (width w, nb elements in the block):
        u8 mode
        mode 0 (raw):  ceil(nb * w / 8) bytes, values bit-packed LSB first
        mode 1 (rANS): varint nsym-1 (nsym <= 256)
                       nsym varints: first symbol, then gaps-1 between ascending symbols
                       nsym varints: frequency-1 (frequencies sum to 4096)
                       u32 payload length
                       payload: 32 u32 lane states, then u16 renormalisation words

rANS: 32-bit states in [2^16, 2^32), 16-bit renormalisation, 12-bit
probabilities; element i of a block uses lane i % 32. The decoder, for each
element in order, looks up slot = x & 4095, sets x = f * (x >> 12) + slot -
start, and if x < 2^16 reads the next word: x = x << 16 | word. Every lane
must end at 2^16 with every word consumed. A varint is LEB128, at most 3 bytes.

The C extension (``_entropy.c``) encodes and decodes a whole piece per call with the GIL
released: histograms, frequency normalisation, the raw/coded choice and the payloads on encode;
every block and field plus the merge back into elements, written straight into the caller's
buffer, on decode (AVX2 rANS, bit packing and unpacking where the CPU has it, chosen at run
time, the rANS steps in an AVX-512 build where the CPU has that, and a portable C path otherwise;
all give the same bytes). Without the extension the numpy kernels below produce the same bytes;
the C planning mirrors :func:`normalize` and :func:`_plan` step for step (integer-only
arithmetic, so identical input gives identical bytes on every machine, invariant 5).
"""

from __future__ import annotations

import functools
import struct
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from shardstore.codecs.base import Buffer, Codec, PieceInfo, check_out
from shardstore.errors import CodecError
from shardstore.format.dtypes import itemsize

PROB_BITS = 12
PROB_SCALE = 1 << PROB_BITS
LANES = 32
RANS_L = 1 << 16
ALPHABET = 512  # histograms are this wide whatever the field width (9 bits at most)
MAX_SYMBOLS = 256  # a coded table holds at most this many symbols (rank fits the decode entry)
DEFAULT_BLOCK_ELEMS = 1 << 18

_MODE_RAW = 0
_MODE_RANS = 1
_U32 = struct.Struct("<I")

# dtype -> (rotate the sign to bit 0, field widths from the top bit)
_FLOAT_LAYOUTS: dict[str, tuple[bool, tuple[int, ...]]] = {
    "BF16": (True, (9, 7)),
    "F16": (True, (8, 8)),
    "F32": (True, (9, 8, 8, 7)),
    "F64": (True, (8,) * 8),
}


def layout(dtype: str) -> tuple[int, bool, tuple[int, ...]]:
    """(item size, rotate, field widths) for a dtype."""
    k = itemsize(dtype)
    if dtype in _FLOAT_LAYOUTS:
        rotate, widths = _FLOAT_LAYOUTS[dtype]
        return k, rotate, widths
    return k, False, (8,) * k


class Kernels(Protocol):
    """Whole-piece encode and decode; ``_entropy`` (C) and :class:`NumpyKernels` both provide them."""

    def encode_piece(
        self, data: Buffer, itemsize: int, rotate: int, widths: bytes, block_elems: int, cost: bytes
    ) -> bytes: ...

    def decode(
        self,
        stream: Buffer,
        itemsize: int,
        rotate: int,
        widths: bytes,
        block_elems: int,
        out: memoryview,
    ) -> None: ...


# ---------------------------------------------------------------- shared planning (Python)


def _log2_fixed(value: int, frac_bits: int = 16) -> int:
    """floor(log2(value) * 2**frac_bits) by integer squaring: the same on every machine."""
    ip = value.bit_length() - 1
    scale = 62
    y = (value << scale) >> ip  # value / 2**ip in [1, 2), fixed point
    result = ip << frac_bits
    for bit in range(frac_bits):
        y = (y * y) >> scale
        if y >= 2 << scale:
            y >>= 1
            result |= 1 << (frac_bits - 1 - bit)
    return result


@functools.cache
def _cost_table() -> npt.NDArray[np.int64]:
    """Cost in 1/65536 bits of coding a symbol of frequency f (index f), integers only."""
    table = np.zeros(PROB_SCALE + 1, dtype=np.int64)
    for f in range(1, PROB_SCALE + 1):
        table[f] = (PROB_BITS << 16) - _log2_fixed(f)
    return table


def normalize(counts: npt.NDArray[np.int64], total: int) -> npt.NDArray[np.int64]:
    """Frequencies summing to 4096, every present symbol >= 1, by largest remainder (rows)."""
    counts = counts.astype(np.int64)
    scaled = counts * PROB_SCALE
    freqs = scaled // total
    rem = scaled % total
    bumped = (counts > 0) & (freqs == 0)
    freqs[bumped] = 1
    rem[bumped] = -1  # a bumped symbol already got more than its share
    rem[counts == 0] = -1
    diff = PROB_SCALE - freqs.sum(axis=1)
    # Give the missing units to the largest remainders; ties to the lower symbol (stable sort).
    order = np.argsort(-rem, axis=1, kind="stable")
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(counts.shape[1])[None, :], axis=1)
    freqs += (ranks < np.maximum(diff, 0)[:, None]) & (rem >= 0)
    for row in np.nonzero(diff < 0)[0]:
        # Rare symbols bumped to 1 overshoot: take the excess from the most frequent symbols.
        excess = int(-diff[row])
        while excess:
            top = int(np.argmax(freqs[row]))
            take = min(excess, int(freqs[row, top]) - 1)
            freqs[row, top] -= take
            excess -= take
    return freqs


def _varints(values: npt.NDArray[np.int64]) -> bytes:
    """LEB128 of values < 2**14 (one or two bytes each), vectorised."""
    values = values.astype(np.int64)
    two = values >= 0x80
    first = np.where(two, (values & 0x7F) | 0x80, values).astype(np.uint8)
    pairs = np.stack([first, (values >> 7).astype(np.uint8)], axis=1)
    keep = np.stack([np.ones_like(two), two], axis=1)
    return pairs[keep].tobytes()


def _table_bytes(freqs: npt.NDArray[np.int64]) -> bytes:
    symbols = np.nonzero(freqs)[0]
    gaps = np.diff(symbols) - 1
    return _varints(np.concatenate([[len(symbols) - 1], symbols[:1], gaps, freqs[symbols] - 1]))


@dataclass
class _Plan:
    modes: bytearray
    freqs: npt.NDArray[np.uint16]
    tables: list[bytes]


def _plan(counts: npt.NDArray[np.int64], widths: tuple[int, ...], n: int, block_elems: int) -> _Plan:
    """Choose raw or rANS for every (block, field) from the histograms, and the tables."""
    nblocks, nfields = counts.shape[0], counts.shape[1]
    rows = counts.reshape(nblocks * nfields, ALPHABET)
    sizes = np.array(
        [min(block_elems, n - b * block_elems) for b in range(nblocks) for _ in range(nfields)],
        dtype=np.int64,
    )
    freqs = normalize_rows(rows, sizes)
    cost = _cost_table()
    bits = (rows * cost[freqs]).sum(axis=1) >> 16
    nsyms = np.count_nonzero(rows, axis=1)
    modes = bytearray(len(rows))
    tables: list[bytes] = []
    for part in range(len(rows)):
        w = widths[part % nfields]
        raw_bytes = (int(sizes[part]) * w + 7) // 8
        table = b""
        if nsyms[part] <= MAX_SYMBOLS:
            table = _table_bytes(freqs[part])
            coded_bytes = (int(bits[part]) + 7) // 8 + len(table) + _U32.size + 4 * LANES
            if coded_bytes < raw_bytes:
                modes[part] = _MODE_RANS
        if modes[part] == _MODE_RAW:
            table = b""
            freqs[part] = 0
        tables.append(table)
    return _Plan(modes, freqs.astype(np.uint16), tables)


def normalize_rows(rows: npt.NDArray[np.int64], sizes: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """:func:`normalize` with a per-row total (the block's element count)."""
    out = np.zeros_like(rows, dtype=np.int64)
    for size in np.unique(sizes):
        sel = sizes == size
        out[sel] = normalize(rows[sel], int(size))
    return out


# ---------------------------------------------------------------- numpy kernels (fallback)


def _elements(data: Buffer, k: int, rotate: int) -> npt.NDArray[np.uint64]:
    u = np.frombuffer(data, dtype=np.dtype(f"<u{k}")).astype(np.uint64)
    if rotate:
        bits = np.uint64(8 * k)
        mask = np.uint64((1 << (8 * k)) - 1)
        u = ((u << np.uint64(1)) | (u >> (bits - np.uint64(1)))) & mask
    return u


def _field(u: npt.NDArray[np.uint64], widths: bytes, f: int) -> npt.NDArray[np.int64]:
    shift = sum(widths) - sum(widths[: f + 1])
    return ((u >> np.uint64(shift)) & np.uint64((1 << widths[f]) - 1)).astype(np.int64)


class NumpyKernels:
    """The same whole-piece loops as ``_entropy.c`` in numpy, producing the same bytes. Slow."""

    @staticmethod
    def encode_piece(data: Buffer, itemsize: int, rotate: int, widths: bytes, block_elems: int, cost: bytes) -> bytes:
        n = memoryview(data).nbytes // itemsize
        counts = _numpy_histogram(data, itemsize, rotate, widths, block_elems)
        plan = _plan(counts, tuple(widths), n, block_elems)
        parts = _numpy_parts(data, itemsize, rotate, widths, block_elems, plan)
        chunks: list[bytes] = []
        for part, payload in enumerate(parts):
            if plan.modes[part] == _MODE_RAW:
                chunks += [b"\x00", payload]
            else:
                chunks += [b"\x01", plan.tables[part], _U32.pack(len(payload)), payload]
        return b"".join(chunks)

    @staticmethod
    def decode(
        stream: Buffer,
        itemsize: int,
        rotate: int,
        widths: bytes,
        block_elems: int,
        out: memoryview,
    ) -> None:
        _numpy_decode(stream, itemsize, rotate, widths, block_elems, out)


def _numpy_histogram(
    data: Buffer, itemsize: int, rotate: int, widths: bytes, block_elems: int
) -> npt.NDArray[np.int64]:
    """Counts [block, field, 512] of every field value."""
    u = _elements(data, itemsize, rotate)
    nblocks = -(-len(u) // block_elems)
    counts = np.zeros((nblocks, len(widths), ALPHABET), dtype=np.int64)
    for b in range(nblocks):
        ub = u[b * block_elems : (b + 1) * block_elems]
        for f in range(len(widths)):
            counts[b, f] = np.bincount(_field(ub, widths, f), minlength=ALPHABET)
    return counts


def _numpy_parts(
    data: Buffer, itemsize: int, rotate: int, widths: bytes, block_elems: int, plan: _Plan
) -> list[bytes]:
    """The payload of every (block, field) part: bit-packed raw, or rANS states and words."""
    u = _elements(data, itemsize, rotate)
    nblocks = -(-len(u) // block_elems)
    table = plan.freqs.astype(np.int64).reshape(-1, ALPHABET)
    parts: list[bytes] = []
    for b in range(nblocks):
        ub = u[b * block_elems : (b + 1) * block_elems]
        for f, w in enumerate(widths):
            part = b * len(widths) + f
            values = _field(ub, widths, f)
            if plan.modes[part] == _MODE_RAW:
                parts.append(_pack_bits(values, w))
            else:
                parts.append(_rans_encode(values, table[part]))
    return parts


def _pack_bits(values: npt.NDArray[np.int64], w: int) -> bytes:
    if w == 8:
        return values.astype(np.uint8).tobytes()
    bits = ((values[:, None] >> np.arange(w)) & 1).astype(np.uint8)
    return np.packbits(bits.ravel(), bitorder="little").tobytes()


def _unpack_bits(raw: Buffer, w: int, n: int) -> npt.NDArray[np.int64]:
    packed = np.frombuffer(raw, dtype=np.uint8)
    if w == 8:
        return packed.astype(np.int64)
    bits = np.unpackbits(packed, bitorder="little")[: n * w].reshape(n, w).astype(np.int64)
    packed_values: npt.NDArray[np.int64] = (bits << np.arange(w)).sum(axis=1)
    return packed_values


def _rans_encode(symbols: npt.NDArray[np.int64], freqs: npt.NDArray[np.int64]) -> bytes:
    starts = np.concatenate([[0], np.cumsum(freqs)[:-1]])
    n = len(symbols)
    states = np.full(LANES, RANS_L, dtype=np.int64)
    emitted: list[npt.NDArray[np.int64]] = []
    # Backwards over groups, and within a group over lanes from last to first: the
    # exact reverse of the decoder's order, so that its reads come out forwards.
    for g in range((n - 1) // LANES, -1, -1):
        s = symbols[g * LANES : (g + 1) * LANES]
        cnt = len(s)
        x = states[:cnt]
        f = freqs[s]
        need = x >= (f << (32 - PROB_BITS))
        emitted.append((x[need] & 0xFFFF)[::-1])
        x = np.where(need, x >> 16, x)
        q = x // f
        states[:cnt] = x + q * (PROB_SCALE - f) + starts[s]
    words = np.concatenate(emitted)[::-1] if emitted else np.zeros(0, dtype=np.int64)
    return states.astype("<u4").tobytes() + words.astype("<u2").tobytes()


class _Reader:
    """Bounds-checked cursor over a stream; every overrun is a CodecError."""

    def __init__(self, data: memoryview) -> None:
        self.data = data
        self.pos = 0

    def take(self, size: int, what: str) -> memoryview:
        if size < 0 or size > len(self.data) - self.pos:
            raise CodecError(f"float-entropy.v1: truncated {what}")
        chunk = self.data[self.pos : self.pos + size]
        self.pos += size
        return chunk

    def varint(self, what: str) -> int:
        value = 0
        for shift in (0, 7, 14):
            byte = self.take(1, what)[0]
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return value
        raise CodecError(f"float-entropy.v1: bad varint in {what}")


def _numpy_decode(stream: Buffer, k: int, rotate: int, widths: bytes, block_elems: int, out: memoryview) -> None:
    reader = _Reader(memoryview(stream).cast("B"))
    n = out.nbytes // k
    target = np.frombuffer(out, dtype=np.dtype(f"<u{k}"))
    total_bits = 8 * k
    for i0 in range(0, n, block_elems):
        nb = min(block_elems, n - i0)
        u = np.zeros(nb, dtype=np.uint64)
        for f, w in enumerate(widths):
            shift = total_bits - sum(widths[: f + 1])
            values = _decode_field(reader, w, nb)
            u |= values.astype(np.uint64) << np.uint64(shift)
        if rotate:
            u = (u >> np.uint64(1)) | ((u & np.uint64(1)) << np.uint64(total_bits - 1))
        target[i0 : i0 + nb] = u
    if reader.pos != len(reader.data):
        raise CodecError("float-entropy.v1: trailing bytes after the last block")


def _decode_field(reader: _Reader, w: int, nb: int) -> npt.NDArray[np.int64]:
    mode = reader.take(1, "field header")[0]
    if mode == _MODE_RAW:
        return _unpack_bits(reader.take((nb * w + 7) // 8, "raw field"), w, nb)
    if mode != _MODE_RANS:
        raise CodecError("float-entropy.v1: unknown field mode")
    nsym = reader.varint("symbol count") + 1
    if nsym > MAX_SYMBOLS:
        raise CodecError("float-entropy.v1: bad symbol count")
    symbols = np.zeros(nsym, dtype=np.int64)
    sym = 0
    for r in range(nsym):
        gap = reader.varint("symbol list")
        sym = gap if r == 0 else sym + gap + 1
        if sym >= 1 << w:
            raise CodecError("float-entropy.v1: symbol out of range")
        symbols[r] = sym
    freqs = np.array([reader.varint("frequencies") + 1 for _ in range(nsym)], dtype=np.int64)
    if int(freqs.sum()) != PROB_SCALE:
        raise CodecError("float-entropy.v1: frequencies do not sum to 4096")
    (length,) = _U32.unpack(reader.take(4, "payload length"))
    if length < 4 * LANES or (length - 4 * LANES) % 2:
        raise CodecError("float-entropy.v1: bad payload length")
    payload = reader.take(length, "payload")
    states = np.frombuffer(payload[: 4 * LANES], dtype="<u4").astype(np.int64)
    if (states < RANS_L).any():
        raise CodecError("float-entropy.v1: bad initial state")
    words = np.frombuffer(payload[4 * LANES :], dtype="<u2").astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(freqs)[:-1]])
    rank = np.repeat(np.arange(nsym), freqs)
    slot_freq = freqs[rank]
    slot_bias = np.arange(PROB_SCALE) - starts[rank]
    slot_sym = symbols[rank]
    result = np.empty(nb, dtype=np.int64)
    ptr = 0
    for g in range(0, nb, LANES):
        cnt = min(LANES, nb - g)
        x = states[:cnt]
        slot = x & (PROB_SCALE - 1)
        result[g : g + cnt] = slot_sym[slot]
        x = slot_freq[slot] * (x >> PROB_BITS) + slot_bias[slot]
        need = x < RANS_L
        k = int(need.sum())
        if ptr + k > len(words):
            raise CodecError("float-entropy.v1: rANS stream ends early")
        x[need] = (x[need] << 16) | words[ptr : ptr + k]
        ptr += k
        states[:cnt] = x
    if ptr != len(words):
        raise CodecError("float-entropy.v1: rANS stream has trailing words")
    if (states != RANS_L).any():
        raise CodecError("float-entropy.v1: rANS final state mismatch")
    return result


# ---------------------------------------------------------------- kernel selection

NUMPY_KERNELS: Kernels = NumpyKernels()
C_KERNELS: Kernels | None
C_PORTABLE_KERNELS: Kernels | None  # the C loops without SIMD, for tests on machines that have it
C_AVX2_KERNELS: Kernels | None  # the AVX2 decode loops where the CPU also has AVX-512, for tests
try:
    from shardstore.codecs import _entropy  # type: ignore[attr-defined]

    C_KERNELS = _entropy

    class _CappedC:
        """The C kernels held to a SIMD level: 0 none (any x86-64 or other CPU), 1 at most AVX2.
        Every level gives the same bytes."""

        def __init__(self, level: int) -> None:
            self.level = level

        def encode_piece(
            self, data: Buffer, itemsize: int, rotate: int, widths: bytes, block_elems: int, cost: bytes
        ) -> bytes:
            encoded: bytes = _entropy.encode_piece(
                data, itemsize, rotate, widths, block_elems, cost, self.level > 0
            )
            return encoded

        def decode(
            self, stream: Buffer, itemsize: int, rotate: int, widths: bytes, block_elems: int, out: memoryview
        ) -> None:
            _entropy.decode(stream, itemsize, rotate, widths, block_elems, out, self.level)

    C_PORTABLE_KERNELS = _CappedC(0)
    C_AVX2_KERNELS = _CappedC(1) if _entropy.simd() == "avx512" else None
except ImportError:  # no compiler at install time: same format, numpy speed
    C_KERNELS = None
    C_PORTABLE_KERNELS = None
    C_AVX2_KERNELS = None

DEFAULT_KERNELS: Kernels = C_KERNELS if C_KERNELS is not None else NUMPY_KERNELS


@functools.cache
def _cost_bytes() -> bytes:
    """The cost table as the C encoder takes it: 4097 native int64."""
    return _cost_table().astype(np.int64).tobytes()


def encode_piece(data: Buffer, dtype: str, block_elems: int, kernels: Kernels) -> bytes:
    k, rotate, widths = layout(dtype)
    view = memoryview(data).cast("B")
    if len(view) < k:
        return b""
    return kernels.encode_piece(view, k, int(rotate), bytes(widths), block_elems, _cost_bytes())


def decode_piece(encoded: Buffer, dtype: str, block_elems: int, out: memoryview, kernels: Kernels) -> None:
    k, rotate, widths = layout(dtype)
    try:
        kernels.decode(encoded, k, int(rotate), bytes(widths), block_elems, out)
    except CodecError:
        raise
    except ValueError as exc:
        raise CodecError(f"float-entropy.v1: {exc}") from None


@dataclass(frozen=True)
class FloatEntropyCodec(Codec):
    """Sign/exponent/mantissa fields, each rANS-coded or raw per block. The default lossless codec."""

    codec_id = "float-entropy.v1"
    block_elems: int = DEFAULT_BLOCK_ELEMS

    def __post_init__(self) -> None:
        b = self.block_elems
        if not isinstance(b, int) or isinstance(b, bool) or not LANES <= b <= 1 << 24 or b % LANES:
            raise ValueError("block_elems must be a multiple of 32 in [32, 2**24]")

    def encode(self, data: Buffer, info: PieceInfo) -> bytes:
        if memoryview(data).nbytes != info.nbytes:
            raise CodecError(f"{self.codec_id}: got {memoryview(data).nbytes} bytes, expected {info.nbytes}")
        return encode_piece(data, info.dtype, self.block_elems, DEFAULT_KERNELS)

    def decode(self, encoded: Buffer, info: PieceInfo, out: memoryview | None = None) -> Buffer:
        view = check_out(out, info.nbytes, self.codec_id)
        decode_piece(encoded, info.dtype, self.block_elems, view, DEFAULT_KERNELS)
        return view

    def get_config(self) -> dict[str, Any]:
        return {"id": self.codec_id, "block_elems": self.block_elems}
