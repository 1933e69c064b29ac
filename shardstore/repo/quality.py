"""How far a lossy pipeline moved a tensor: error figures per piece, summed per tensor, and encoding that measures them.

The figures are those ``inspect`` and ``push --json`` report and the manifest
records per tensor (``"quality"``): relative RMSE (``||x - y|| / ||x||``), SNR
in dB (``10 log10(||x||^2 / ||x - y||^2)``) and the largest absolute error,
with ``x`` the original and ``y`` the decoded (dequantized) values. They are
summed over pieces exactly (squared errors and energies add), so a tensor's
figure does not depend on how it was cut.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from shardstore.codecs.base import Buffer, PieceInfo
from shardstore.codecs.pipeline import Pipeline
from shardstore.codecs.quantize import to_float32
from shardstore.errors import CodecError, InvalidInputError
from shardstore.format.digest import digest


def _round(value: float, digits: int = 6) -> float:
    # Few significant digits: a figure may differ in its last bits between machines (SIMD sums),
    # and a manifest's bytes should not.
    return float(f"{value:.{digits}g}")


@dataclass(frozen=True)
class ErrorStats:
    elements: int = 0
    squared_error: float = 0.0
    energy: float = 0.0  # sum of the original values squared
    max_abs_error: float = 0.0

    @classmethod
    def measure(cls, original: Buffer, decoded: Buffer, dtype: str) -> ErrorStats:
        x = to_float32(original, dtype).astype(np.float64)
        diff = to_float32(decoded, dtype).astype(np.float64) - x
        return cls(
            elements=int(x.size),
            squared_error=float(np.dot(diff, diff)),
            energy=float(np.dot(x, x)),
            max_abs_error=float(np.abs(diff).max()) if diff.size else 0.0,
        )

    def __add__(self, other: ErrorStats) -> ErrorStats:
        return ErrorStats(
            self.elements + other.elements,
            self.squared_error + other.squared_error,
            self.energy + other.energy,
            max(self.max_abs_error, other.max_abs_error),
        )

    @property
    def snr_db(self) -> float:
        """+inf for an exact round trip (or an all-zero tensor, which every quantizer keeps exact)."""
        if self.squared_error == 0:
            return math.inf
        if self.energy == 0:
            return -math.inf
        return 10 * math.log10(self.energy / self.squared_error)

    @property
    def rel_rmse(self) -> float:
        if self.squared_error == 0:
            return 0.0
        return math.sqrt(self.squared_error / self.energy) if self.energy else math.inf

    def to_json(self) -> dict[str, float | None]:
        """The manifest's ``quality`` object; an infinite figure is ``null`` (JSON has no infinity)."""
        snr, rel = self.snr_db, self.rel_rmse
        return {
            "max_abs_error": _round(self.max_abs_error),
            "rel_rmse": _round(rel) if math.isfinite(rel) else None,
            "snr_db": round(snr, 3) if math.isfinite(snr) else None,
        }


@dataclass(frozen=True)
class EncodedStream:
    data: bytes
    checksum: str  # of the decoded bytes: what every reader gets back and checks
    error: ErrorStats | None  # None for a lossless pipeline


def encode_stream(pipeline: Pipeline, raw: Buffer, info: PieceInfo, tensor: str) -> EncodedStream:
    """Encode one piece of ``tensor``; for a lossy pipeline also decode it, for its checksum and its error."""
    try:
        encoded = pipeline.encode(raw, info)
    except CodecError as exc:  # a quantizer refusing NaN, say: name the tensor, not just the codec
        raise InvalidInputError(f"tensor {tensor!r}: {exc}") from None
    if pipeline.lossless:
        return EncodedStream(encoded, digest(raw), None)
    decoded = pipeline.decode(encoded, info)
    return EncodedStream(encoded, digest(decoded), ErrorStats.measure(raw, decoded, info.dtype))


def measure_piece(pipeline: Pipeline, raw: Buffer, info: PieceInfo) -> tuple[int, ErrorStats]:
    """(stored bytes, error) of one piece under ``pipeline``, without a checksum: what the auto mode compares.

    Only the first stage can lose anything, so its own decode gives the values
    a reader would get, and the later (lossless) stages are only run forward.
    """
    stages = pipeline.codecs
    first = stages[0].encode(raw, info)
    stored = Pipeline(stages[1:]).encode(first, stages[0].output_info(info)) if len(stages) > 1 else first
    if pipeline.lossless:
        return len(stored), ErrorStats()
    decoded = stages[0].decode(first, info)
    return len(stored), ErrorStats.measure(raw, decoded, info.dtype)
