"""``intn-group.v1``: asymmetric N-bit integers (2 to 8) per group of a row, with a clipping search, lossy.

Each row is cut into groups of ``group`` columns (``0``: the whole row; the
last group may be shorter). A group's range ``[lo, hi]`` (always holding 0, so
zero is exact) is shrunk by a factor ``a`` in 1.00, 0.95, ... (``clip_steps``
factors; 1 = plain round-to-nearest), and for each factor::

    scale = bf16_ceil((hi - lo) * a / (2^N - 1))
    zero  = clip(round(-lo * a / scale), 0, 2^N - 1)
    code  = clip(round(x / scale) + zero, 0, 2^N - 1)

The factor with the smallest squared error of the group is kept (ties to the
larger factor), as in AWQ's and OmniQuant's clipping searches: cutting a few
outliers buys a finer step for every other weight. Layout
(``shardstore.codecs.quantize``): codes (one byte each), BF16 scales, u8 zero
points, per row and group.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from shardstore.codecs.quantize import F32Array, QuantizeCodec, QuantizedPiece, bf16_ceil

CLIP_STEP = 0.05  # the shrink factors are 1 - CLIP_STEP * i
MAX_CLIP_STEPS = 19  # down to 0.10


def _search(groups: F32Array, bits: int, clip_steps: int) -> tuple[npt.NDArray[np.uint8], F32Array, F32Array]:
    """Codes, scales and zero points of (rows, ngroups, size) float32 groups, clipping searched."""
    qmax = np.float32((1 << bits) - 1)
    lo = np.minimum(groups.min(axis=2), 0)
    hi = np.maximum(groups.max(axis=2), 0)
    best_err = np.full(lo.shape, np.inf, dtype=np.float32)
    best_scale = np.zeros_like(lo)
    best_zero = np.zeros_like(lo)
    work = np.empty_like(groups)
    for step in range(clip_steps):
        factor = np.float32(1 - CLIP_STEP * step)
        scale = bf16_ceil((hi - lo) * factor / qmax)
        divisor = np.where(scale > 0, scale, np.float32(1))
        zero = np.clip(np.rint(-lo * factor / divisor), 0, qmax)
        # work = (clip(round(x / s) + z, 0, qmax) - z) * s - x, in place: the search is the cost of this codec.
        np.divide(groups, divisor[..., None], out=work)
        np.rint(work, out=work)
        work += zero[..., None]
        np.clip(work, 0, qmax, out=work)
        work -= zero[..., None]
        work *= scale[..., None]
        work -= groups
        np.square(work, out=work)
        err = work.sum(axis=2)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_scale = np.where(better, scale, best_scale)
        best_zero = np.where(better, zero, best_zero)
    divisor = np.where(best_scale > 0, best_scale, np.float32(1))
    codes = np.clip(np.rint(groups / divisor[..., None]) + best_zero[..., None], 0, qmax).astype(np.uint8)
    return codes, best_scale, best_zero


@dataclass(frozen=True)
class IntGroupCodec(QuantizeCodec):
    """Group-wise asymmetric N-bit quantization with a clipping search; follow it with a lossless coder."""

    codec_id = "intn-group.v1"
    bits: int = 4
    group: int = 64
    clip_steps: int = 11

    def __post_init__(self) -> None:
        for field, low, high in (("bits", 2, 8), ("group", 0, 1 << 30), ("clip_steps", 1, MAX_CLIP_STEPS)):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
                raise ValueError(f"{field} must be an integer in [{low}, {high}]")

    def layout(self, rows: int, columns: int) -> tuple[int, str, bool]:
        return (self.group or max(columns, 1)), f"uint{self.bits}", True

    def quantize(self, matrix: F32Array) -> QuantizedPiece:
        rows, columns = matrix.shape
        group = self.group or max(columns, 1)
        full = columns // group * group
        parts = [matrix[:, :full].reshape(rows, -1, group)] if full else []
        if full < columns:
            parts.append(matrix[:, full:].reshape(rows, 1, columns - full))
        searched = [_search(np.ascontiguousarray(part), self.bits, self.clip_steps) for part in parts]
        if not searched:
            empty = np.zeros((rows, 0), dtype=np.float32)
            return QuantizedPiece(np.zeros((rows, 0), np.uint8), empty, empty.astype(np.uint8), group,
                                  f"uint{self.bits}")
        codes = np.concatenate([c.reshape(rows, -1) for c, _s, _z in searched], axis=1)
        scales = np.concatenate([s for _c, s, _z in searched], axis=1)
        zeros = np.concatenate([z for _c, _s, z in searched], axis=1).astype(np.uint8)
        return QuantizedPiece(codes, scales, zeros, group, f"uint{self.bits}")
