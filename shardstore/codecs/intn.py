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
from typing import Any

import numpy as np
import numpy.typing as npt

from shardstore.codecs.quantize import F32Array, QuantizeCodec, QuantizedPiece, bf16_ceil

CLIP_STEP = 0.05  # the shrink factors are 1 - CLIP_STEP * i
MAX_CLIP_STEPS = 19  # down to 0.10


try:  # the fused search (same float32 bits as the numpy passes below, several times faster)
    from shardstore.codecs import _quantize  # type: ignore[attr-defined]

    C_SEARCH: Any = _quantize
except ImportError:  # no C compiler at install time
    C_SEARCH = None


def _clip_errors(groups: F32Array, divisors: F32Array, zeros: F32Array, scales: F32Array,
                 qmax: np.float32, use_c: bool = True) -> F32Array:
    """(steps, rows, ngroups) squared errors of (rows, ngroups, size) groups under each step's parameters."""
    errors = np.empty(divisors.shape, dtype=np.float32)
    if use_c and C_SEARCH is not None and groups.size:
        C_SEARCH.clip_errors(np.ascontiguousarray(groups), groups.shape[2], np.ascontiguousarray(divisors),
                             np.ascontiguousarray(zeros), np.ascontiguousarray(scales), float(qmax), errors)
        return errors
    work = np.empty_like(groups)
    for step in range(divisors.shape[0]):
        divisor, zero = divisors[step], zeros[step]
        # work = (clip(round(x / s) + z, 0, qmax) - z) * s - x, in place: the search is the cost of this codec.
        np.divide(groups, divisor[..., None], out=work)
        np.rint(work, out=work)
        work += zero[..., None]
        np.clip(work, 0, qmax, out=work)
        work -= zero[..., None]
        work *= scales[step][..., None]
        work -= groups
        np.square(work, out=work)
        errors[step] = work.sum(axis=2)
    return errors


def _search(groups: F32Array, bits: int, clip_steps: int,
            use_c: bool = True) -> tuple[npt.NDArray[np.uint8], F32Array, F32Array]:
    """Codes, scales and zero points of (rows, ngroups, size) float32 groups, clipping searched."""
    qmax = np.float32((1 << bits) - 1)
    lo = np.minimum(groups.min(axis=2), 0)
    hi = np.maximum(groups.max(axis=2), 0)
    shape = (clip_steps, *lo.shape)
    scales, divisors, zeros = (np.empty(shape, dtype=np.float32) for _ in range(3))
    for step in range(clip_steps):
        factor = np.float32(1 - CLIP_STEP * step)
        scales[step] = bf16_ceil((hi - lo) * factor / qmax)
        divisors[step] = np.where(scales[step] > 0, scales[step], np.float32(1))
        zeros[step] = np.clip(np.rint(-lo * factor / divisors[step]), 0, qmax)
    errors = _clip_errors(groups, divisors, zeros, scales, qmax, use_c)
    best_err = np.full(lo.shape, np.inf, dtype=np.float32)
    best_scale = np.zeros_like(lo)
    best_zero = np.zeros_like(lo)
    for step in range(clip_steps):  # ties keep the earlier, larger factor
        better = errors[step] < best_err
        best_err = np.where(better, errors[step], best_err)
        best_scale = np.where(better, scales[step], best_scale)
        best_zero = np.where(better, zeros[step], best_zero)
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
