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
import numpy.typing as npt

from shardstore.codecs.base import Buffer, PieceInfo
from shardstore.codecs.pipeline import Pipeline
from shardstore.codecs.quantize import QuantizeCodec, to_float32
from shardstore.errors import CodecError, InvalidInputError
from shardstore.format.digest import stream_checksum


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
        return EncodedStream(encoded, stream_checksum(raw), None)
    decoded = pipeline.decode(encoded, info)
    return EncodedStream(encoded, stream_checksum(decoded), ErrorStats.measure(raw, decoded, info.dtype))


@dataclass(frozen=True)
class PieceOriginal:
    """What every candidate measured on one piece shares, computed once per piece: its values and energy."""

    values: npt.NDArray[np.float32]  # the piece as float32, flat
    original: npt.NDArray[np.float64]  # the same, as float64: what errors are measured against
    energy: float
    finite: bool

    @classmethod
    def of(cls, raw: Buffer, info: PieceInfo) -> PieceOriginal:
        values = to_float32(raw, info.dtype)
        original = values.astype(np.float64)
        return cls(values, original, float(np.dot(original, original)), bool(np.isfinite(values).all()))

    def error(self, decoded: Buffer, dtype: str) -> ErrorStats:
        """:meth:`ErrorStats.measure` against this original: the same operations, the shared part done once."""
        diff = to_float32(decoded, dtype).astype(np.float64) - self.original
        return ErrorStats(
            elements=int(self.original.size),
            squared_error=float(np.dot(diff, diff)),
            energy=self.energy,
            max_abs_error=float(np.abs(diff).max()) if diff.size else 0.0,
        )


def measure_piece(pipeline: Pipeline, raw: Buffer, info: PieceInfo,
                  original: PieceOriginal | None = None) -> EncodedStream:
    """One piece encoded under ``pipeline``, with what the auto mode compares (its size and error).

    The stream is exactly what :func:`encode_stream` gives, so push can store the
    winner without encoding it again. Only the first stage can lose anything, so
    its own decode gives the values a reader would get, and the later (lossless)
    stages are only run forward. ``original`` (from :meth:`PieceOriginal.of`)
    saves converting the piece again for every candidate.
    """
    stages = pipeline.codecs
    if pipeline.lossless:
        return EncodedStream(pipeline.encode(raw, info), stream_checksum(raw), None)
    first_stage = stages[0]
    if isinstance(first_stage, QuantizeCodec) and original is not None:
        rows, columns = first_stage.check_piece(raw, info)
        if not original.finite:
            raise CodecError(f"{first_stage.codec_id}: the piece holds NaN or infinity; store this tensor losslessly")
        first: bytes = first_stage.quantize(original.values.reshape(rows, columns)).to_bytes()
    else:
        first = bytes(first_stage.encode(raw, info))
    stored = Pipeline(stages[1:]).encode(first, first_stage.output_info(info)) if len(stages) > 1 else first
    decoded = first_stage.decode(first, info)
    error = original.error(decoded, info.dtype) if original is not None else ErrorStats.measure(raw, decoded,
                                                                                                 info.dtype)
    return EncodedStream(stored, stream_checksum(memoryview(decoded).cast("B")), error)
