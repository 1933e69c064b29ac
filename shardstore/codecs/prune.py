"""``prune-magnitude.v1``: zero the smallest fraction of a piece's elements by magnitude (lossy, opt-in).

It runs first in a pipeline and hands the pruned elements, same dtype and
shape, to a lossless coder (``sparse-bitmap.v1``, which then stores the zeros
as a bitmap). Decoding is the identity: the zeros are the data now.

Magnitude is read from the bits, not from numbers: for sign-magnitude floats
the order of ``|x|`` is the order of the bits with the sign cleared, which
works for bf16 and f8 (no numpy type) alike, and puts NaN above every number,
so a NaN is never pruned. Exactly ``floor(fraction * n)`` elements are zeroed
(to ``+0.0``); ties at the threshold go to the first elements in memory order,
so the same piece always prunes the same way (DESIGN invariant 5). Pieces are
pruned one at a time, so the fraction holds for every piece and so for the
tensor; which elements go is decided per piece (4 MiB of rows by default).
Integer and bool tensors pass unchanged: pruning is for float weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from shardstore.codecs.base import Buffer, Codec, PieceInfo
from shardstore.codecs.bits import element_words, pass_through
from shardstore.errors import CodecError
from shardstore.format.dtypes import FLOAT_LAYOUT, itemsize


def prune_mask(words: npt.NDArray[np.unsignedinteger], dtype: str, fraction: float) -> npt.NDArray[np.bool_]:
    """Which elements to zero: the ``floor(fraction * n)`` smallest magnitudes, ties in memory order."""
    count = math.floor(fraction * words.size)
    mask = np.zeros(words.size, dtype=bool)
    if count == 0:
        return mask
    sign = words.dtype.type(1 << (8 * itemsize(dtype) - 1))
    magnitude = words & ~sign
    threshold = np.partition(magnitude, count - 1)[count - 1]
    np.less(magnitude, threshold, out=mask)
    ties = np.flatnonzero(magnitude == threshold)[: count - int(np.count_nonzero(mask))]
    mask[ties] = True
    return mask


@dataclass(frozen=True)
class MagnitudePruneCodec(Codec):
    """Zero the smallest ``fraction`` of each piece by magnitude; follow it with a lossless coder."""

    codec_id = "prune-magnitude.v1"
    lossless = False
    fraction: float = 0.5

    def __post_init__(self) -> None:
        if isinstance(self.fraction, bool) or not isinstance(self.fraction, int | float):
            raise ValueError("fraction must be a number")
        if not 0.0 <= self.fraction < 1.0:
            raise ValueError("fraction must be in [0, 1)")

    def output_info(self, info: PieceInfo) -> PieceInfo:
        return info

    def encode(self, data: Buffer, info: PieceInfo) -> bytes:
        if memoryview(data).nbytes != info.nbytes:
            raise CodecError(f"{self.codec_id}: got {memoryview(data).nbytes} bytes, expected {info.nbytes}")
        if info.dtype not in FLOAT_LAYOUT:
            return bytes(data)
        words = element_words(data, info.dtype).copy()
        words[prune_mask(words, info.dtype, self.fraction)] = 0
        return words.tobytes()

    def decode(self, encoded: Buffer, info: PieceInfo, out: memoryview | None = None) -> Buffer:
        return pass_through(self.codec_id, encoded, info, out)  # the zeros are the data now
