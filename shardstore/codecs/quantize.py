"""What every quantizing codec shares: float views of a piece, BF16 scales, one byte layout, the quantized form.

A quantizer is the first stage of a pipeline: it turns a float piece into a
self-contained byte string (``output_info`` says ``U8`` of a size known from
the shape alone) that the lossless last stage (``float-entropy.v1`` by
default) then entropy-codes. Decoding gives the *dequantized* tensor in the
piece's own dtype, so every reader (pull, the lazy view, the loader) works
unchanged; :func:`quantized_piece` gives runtimes the codes and scales instead.

The piece is seen as a matrix of ``R`` rows and ``L`` columns: ``R`` = dim 0
and ``L`` = the product of the other dims when the piece has two or more
dims (so "per channel" means per output row, and it holds within any row
range a push cuts); a 0-d or 1-D piece is one row. Groups run along a row.

Byte layout of every quantizer's output (little-endian), ``ng`` groups per row::

    codes   R * L bytes, row-major, one code per byte (int8: two's complement;
            intN: unsigned 0..2^N-1; fp8: the e4m3fn / e5m2 bit pattern)
    scales  R * ng BF16
    zeros   R * ng u8, only for asymmetric codecs (intN)

Codes come first so that, in the entropy coder's blocks of 2^18 bytes, the
scales share a table with as few codes as possible. One code per byte rather
than bit-packed: the entropy coder then codes each code in about its entropy
(int4 g64 on MiniLM: 3.7 bits a code), while 5-, 6- and 3-bit codes packed
across bytes defeat an order-0 coder (int5 g64: 5.08 bits a weight with scales
one code per byte, 5.31 packed then coded, 5.38 packed; docs/lossy.md).

Scales are BF16, rounded *up* from the exact scale, and codes are computed
against the rounded scale: two bytes per group instead of four, no F16
overflow or underflow, no clipped extremes, and at most 0.8 % coarser steps
(< 0.07 dB). The error a push reports is measured on the decoded values, so it
includes this.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from shardstore.codecs.base import Buffer, Codec, PieceInfo, check_out
from shardstore.codecs.pipeline import Pipeline
from shardstore.errors import CodecError

F32Array = npt.NDArray[np.float32]
# The dtypes a quantizer takes; every other dtype is stored losslessly by the policy.
FLOAT_DTYPES = frozenset({"F32", "F16", "BF16", "F64"})


def to_float32(data: Buffer, dtype: str) -> F32Array:
    """The elements of ``data`` (little-endian ``dtype``) as a flat float32 array."""
    raw = memoryview(data).cast("B")
    if dtype == "F32":
        return np.frombuffer(raw, dtype="<f4").astype(np.float32)
    if dtype == "F16":
        return np.frombuffer(raw, dtype="<f2").astype(np.float32)
    if dtype == "F64":
        return np.frombuffer(raw, dtype="<f8").astype(np.float32)
    if dtype == "BF16":
        return (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
    raise CodecError(f"not a float dtype: {dtype}")


def from_float32(values: F32Array, dtype: str) -> npt.NDArray[Any]:
    """``values`` in ``dtype``'s little-endian storage (BF16 rounded to nearest even)."""
    if dtype == "F32":
        return values.astype("<f4")
    if dtype == "F16":
        return values.astype("<f2")
    if dtype == "F64":
        return values.astype("<f8")
    if dtype == "BF16":
        bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
        return ((bits + (0x7FFF + ((bits >> 16) & 1))) >> 16).astype("<u2")
    raise CodecError(f"not a float dtype: {dtype}")


def bf16_ceil(values: F32Array) -> F32Array:
    """Non-negative finite float32 values rounded up to the next BF16 (as float32)."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return (((bits + 0xFFFF) >> 16) << 16).astype(np.uint32).view(np.float32)


def matrix_shape(info: PieceInfo) -> tuple[int, int]:
    """(rows, columns) of a piece seen as a matrix: dim 0 by the rest, or one row for 0-d / 1-D."""
    if len(info.shape) >= 2:
        rows = info.shape[0]
        return rows, (int(np.prod(info.shape[1:])) if rows else 0)
    return 1, int(np.prod(info.shape))


def group_sizes(columns: int, group: int) -> list[int]:
    """The lengths of a row's groups: ``group`` each, the last one shorter when it does not divide."""
    if columns == 0:
        return []
    full, tail = divmod(columns, group)
    return [group] * full + ([tail] if tail else [])


@dataclass(frozen=True)
class QuantizedPiece:
    """The quantized form of a piece (or of a whole tensor, rows concatenated), for runtimes that consume it.

    ``value = (code - zero_point) * scale`` for integer codes (``zero_points`` is
    ``None`` for symmetric ones), ``value = fp8(code) * scale`` for fp8 codes;
    each row is cut into groups of ``group`` columns (the last one may be
    shorter), one scale (and zero point) per row and group.
    """

    codes: npt.NDArray[Any]  # (rows, columns): int8, uint8 (intN) or uint8 fp8 bit patterns
    scales: F32Array  # (rows, groups), every value exactly a BF16
    zero_points: npt.NDArray[np.uint8] | None  # (rows, groups) or None
    group: int
    code_format: str  # "int8", "uint2".."uint8", "f8_e4m3", "f8_e5m2"

    def code_values(self) -> F32Array:
        if self.code_format.startswith("f8_"):
            values: F32Array = fp8_table(self.code_format)[self.codes]
            return values
        return self.codes.astype(np.float32)

    def expand(self, per_group: npt.NDArray[Any]) -> npt.NDArray[Any]:
        """A per-(row, group) array repeated to one value per element."""
        sizes = group_sizes(self.codes.shape[1], self.group)
        if len(set(sizes)) <= 1:
            return np.repeat(per_group, sizes[0] if sizes else 0, axis=1)
        return np.repeat(per_group, sizes, axis=1)

    def dequantize(self) -> F32Array:
        values = self.code_values()
        if self.zero_points is not None:
            values -= self.expand(self.zero_points).astype(np.float32)
        values *= self.expand(self.scales)
        return values

    def to_bytes(self) -> bytes:
        scales = (np.ascontiguousarray(self.scales, dtype=np.float32).view(np.uint32) >> 16).astype("<u2")
        parts = [np.ascontiguousarray(self.codes).tobytes(), scales.tobytes()]
        if self.zero_points is not None:
            parts.append(np.ascontiguousarray(self.zero_points).tobytes())
        return b"".join(parts)


def concat_pieces(pieces: Sequence[QuantizedPiece]) -> QuantizedPiece:
    """The quantized form of a tensor from its pieces' (row ranges in order, same codec)."""
    first = pieces[0]
    zeros = [p.zero_points for p in pieces if p.zero_points is not None]
    return QuantizedPiece(np.concatenate([p.codes for p in pieces], axis=0),
                          np.concatenate([p.scales for p in pieces], axis=0),
                          np.concatenate(zeros, axis=0) if zeros else None, first.group, first.code_format)


_FP8_LAYOUTS = {"f8_e4m3": (4, 3, 7), "f8_e5m2": (5, 2, 15)}  # exponent bits, mantissa bits, bias


def fp8_table(code_format: str) -> F32Array:
    """The float32 value of each of the 256 fp8 bit patterns (e4m3fn: no infinities, 0x7f/0xff NaN)."""
    ebits, mbits, bias = _FP8_LAYOUTS[code_format]
    codes = np.arange(256, dtype=np.int64)
    sign = np.where(codes >> 7, -1.0, 1.0)
    exponent = (codes >> mbits) & ((1 << ebits) - 1)
    mantissa = codes & ((1 << mbits) - 1)
    normal = (1.0 + mantissa / (1 << mbits)) * np.exp2(exponent - bias)
    subnormal = mantissa / (1 << mbits) * 2.0 ** (1 - bias)
    values = sign * np.where(exponent == 0, subnormal, normal)
    top = (1 << ebits) - 1
    if code_format == "f8_e4m3":
        values[(exponent == top) & (mantissa == (1 << mbits) - 1)] = np.nan
    else:
        values[exponent == top] = np.where(mantissa[exponent == top] == 0, sign[exponent == top] * np.inf, np.nan)
    return values.astype(np.float32)


class QuantizeCodec(Codec):
    """A lossy first stage: float piece -> codes and scales (the layout above) -> dequantized floats.

    Subclasses are frozen dataclasses whose fields are their config; they say
    how to quantize a (rows, columns) float32 matrix and how long its layout is.
    """

    lossless: ClassVar[bool] = False

    @abstractmethod
    def quantize(self, matrix: F32Array) -> QuantizedPiece:
        """Codes and scales for a finite (rows, columns) float32 matrix."""

    @abstractmethod
    def layout(self, rows: int, columns: int) -> tuple[int, str, bool]:
        """(columns per group, code format, has zero points) for a matrix of this shape."""

    def _check_dtype(self, info: PieceInfo) -> tuple[int, int]:
        if info.dtype not in FLOAT_DTYPES:
            raise CodecError(f"{self.codec_id} quantizes float tensors (F32, F16, BF16, F64), not {info.dtype}")
        return matrix_shape(info)

    def encoded_size(self, info: PieceInfo) -> int:
        rows, columns = self._check_dtype(info)
        group, _format, asymmetric = self.layout(rows, columns)
        groups = rows * len(group_sizes(columns, group))
        return rows * columns + 2 * groups + (groups if asymmetric else 0)

    def output_info(self, info: PieceInfo) -> PieceInfo:
        return PieceInfo("U8", (self.encoded_size(info),))

    def check_piece(self, data: Buffer, info: PieceInfo) -> tuple[int, int]:
        """(rows, columns) of a piece this codec can take; raises for another dtype or a wrong size."""
        rows, columns = self._check_dtype(info)
        if memoryview(data).nbytes != info.nbytes:
            raise CodecError(f"{self.codec_id}: got {memoryview(data).nbytes} bytes, expected {info.nbytes}")
        return rows, columns

    def encode(self, data: Buffer, info: PieceInfo) -> bytes:
        rows, columns = self.check_piece(data, info)
        values = to_float32(data, info.dtype)
        if not np.isfinite(values).all():
            raise CodecError(f"{self.codec_id}: the piece holds NaN or infinity; store this tensor losslessly")
        return self.quantize(values.reshape(rows, columns)).to_bytes()

    def unpack(self, encoded: Buffer, info: PieceInfo) -> QuantizedPiece:
        """The codes and scales of an encoded piece (views into ``encoded``, no copy)."""
        rows, columns = self._check_dtype(info)
        size = self.encoded_size(info)
        raw = np.frombuffer(memoryview(encoded).cast("B"), dtype=np.uint8)
        if raw.size != size:
            raise CodecError(f"{self.codec_id}: stream has {raw.size} bytes, expected {size}")
        group, code_format, asymmetric = self.layout(rows, columns)
        ngroups = len(group_sizes(columns, group))
        count = rows * columns
        codes = raw[:count].reshape(rows, columns)
        if code_format == "int8":
            codes = codes.view(np.int8)
        scale_bits = raw[count : count + 2 * rows * ngroups].view("<u2").astype(np.uint32) << 16
        scales = scale_bits.view(np.float32).reshape(rows, ngroups)
        zeros = raw[count + 2 * rows * ngroups :].reshape(rows, ngroups) if asymmetric else None
        return QuantizedPiece(codes, scales, zeros, group, code_format)

    def decode(self, encoded: Buffer, info: PieceInfo, out: memoryview | None = None) -> Buffer:
        view = check_out(out, info.nbytes, self.codec_id)
        values = self.unpack(encoded, info).dequantize()
        view[:] = from_float32(values.reshape(-1), info.dtype).view(np.uint8).data
        return view


def quantized_piece(codec_configs: Sequence[dict[str, Any]], payload: Buffer, info: PieceInfo) -> QuantizedPiece:
    """The codes and scales of one stored stream whose pipeline starts with a quantizer.

    Undoes every later stage (the entropy coder) and stops before dequantizing.
    The stream's checksum covers the dequantized bytes, not these; the shard
    they come from is checked against its id when it is fetched.
    """
    pipeline = Pipeline.from_configs(codec_configs)
    first = pipeline.codecs[0]
    if not isinstance(first, QuantizeCodec):
        raise CodecError(f"stream is not quantized (pipeline {[c.get('id') for c in codec_configs]})")
    rest = Pipeline(pipeline.codecs[1:])
    data = rest.decode(payload, pipeline.stage_infos(info)[1]) if rest.codecs else payload
    return first.unpack(data, info)
