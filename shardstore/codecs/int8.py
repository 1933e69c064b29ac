"""``int8-channel.v1``: symmetric int8 with one scale per output row (per channel), lossy.

``scale = absmax(row) / 127`` (rounded up to BF16), ``code = round(x / scale)``
in [-127, 127]; -128 is never used, so the code range is symmetric and zero is
exact. The byte layout is the one in ``shardstore.codecs.quantize`` (codes,
then one BF16 scale per row); the entropy coder after it codes the codes in
about 7.3 bits on MiniLM, which is what brings int8 under a quarter of FP32.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shardstore.codecs.quantize import F32Array, QuantizeCodec, QuantizedPiece, bf16_ceil

INT8_MAX = 127


def symmetric_scales(matrix: F32Array, code_max: float) -> tuple[F32Array, F32Array]:
    """(per-row BF16 scales so that absmax maps to at most ``code_max``, the same with zeros replaced by 1)."""
    absmax = np.abs(matrix).max(axis=1, keepdims=True) if matrix.size else np.zeros((matrix.shape[0], 1), np.float32)
    scales = bf16_ceil(absmax / np.float32(code_max))
    # An all-zero row keeps scale 0 (its codes are 0); dividing by 1 instead keeps it finite.
    return scales, np.where(scales > 0, scales, np.float32(1))


@dataclass(frozen=True)
class Int8ChannelCodec(QuantizeCodec):
    """Per-row symmetric int8; follow it with a lossless coder."""

    codec_id = "int8-channel.v1"

    def layout(self, rows: int, columns: int) -> tuple[int, str, bool]:
        return max(columns, 1), "int8", False

    def quantize(self, matrix: F32Array) -> QuantizedPiece:
        scales, divisors = symmetric_scales(matrix, INT8_MAX)
        codes = np.clip(np.rint(matrix / divisors), -INT8_MAX, INT8_MAX).astype(np.int8)
        return QuantizedPiece(codes, scales, None, max(matrix.shape[1], 1), "int8")
