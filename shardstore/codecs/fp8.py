"""``fp8-channel.v1``: FP8 (e4m3fn or e5m2) codes with one scale per output row, lossy.

``scale = absmax(row) / FP8_MAX`` (rounded up to BF16; 448 for e4m3fn, 57344
for e5m2), ``code = fp8(x / scale)`` rounded to nearest, ties to even (the
same bits as ``torch.Tensor.to(torch.float8_e4m3fn)``). Layout: the codes (the
fp8 bit patterns), then one BF16 scale per row (``shardstore.codecs.quantize``).
A runtime with FP8 matmuls takes the codes as they are and the scale per row.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from shardstore.codecs.int8 import symmetric_scales
from shardstore.codecs.quantize import F32Array, QuantizeCodec, QuantizedPiece, fp8_table

FP8_FORMATS = {"e4m3": "f8_e4m3", "e5m2": "f8_e5m2"}


@functools.cache
def _positive_values(code_format: str) -> F32Array:
    """The finite non-negative fp8 values, ascending; index = bit pattern (they are in code order)."""
    table = fp8_table(code_format)[:128]
    return table[np.isfinite(table)]


def fp8_max(code_format: str) -> float:
    return float(_positive_values(code_format)[-1])


def to_fp8(values: F32Array, code_format: str) -> npt.NDArray[np.uint8]:
    """Round finite values (|v| <= the format's max) to fp8 bit patterns, nearest with ties to even."""
    table = _positive_values(code_format)
    magnitude = np.minimum(np.abs(values), table[-1])
    upper = np.clip(np.searchsorted(table, magnitude, side="left"), 1, table.size - 1)
    lower = upper - 1
    below = magnitude - table[lower]
    above = table[upper] - magnitude
    # Nearest; on a tie the even bit pattern (even mantissa), as IEEE round-to-nearest-even does.
    pick_upper = (above < below) | ((above == below) & (upper % 2 == 0))
    codes: npt.NDArray[np.uint8] = np.where(pick_upper, upper, lower).astype(np.uint8)
    codes |= np.where(np.signbit(values), np.uint8(0x80), np.uint8(0))
    return codes


@dataclass(frozen=True)
class Fp8ChannelCodec(QuantizeCodec):
    """Per-row scaled FP8; follow it with a lossless coder."""

    codec_id = "fp8-channel.v1"
    format: str = "e4m3"

    def __post_init__(self) -> None:
        if self.format not in FP8_FORMATS:
            raise ValueError(f"format must be one of {sorted(FP8_FORMATS)}")

    def layout(self, rows: int, columns: int) -> tuple[int, str, bool]:
        return max(columns, 1), FP8_FORMATS[self.format], False

    def quantize(self, matrix: F32Array) -> QuantizedPiece:
        code_format = FP8_FORMATS[self.format]
        scales, divisors = symmetric_scales(matrix, fp8_max(code_format))
        codes = to_fp8(matrix / divisors, code_format)
        return QuantizedPiece(codes, scales, None, max(matrix.shape[1], 1), code_format)
