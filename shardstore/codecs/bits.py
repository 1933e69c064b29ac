"""Bit-level helpers shared by the sparse, prune and delta codecs: they work on an element's bits, not its value."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from shardstore.codecs.base import Buffer, PieceInfo, check_out
from shardstore.errors import CodecError
from shardstore.format.dtypes import itemsize

_WORDS = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def element_words(data: Buffer, dtype: str) -> npt.NDArray[np.unsignedinteger]:
    """The elements as unsigned integers of their width (a view, no copy): zero means all bits zero."""
    return np.frombuffer(data, dtype=_WORDS[itemsize(dtype)])


def xor_into(target: memoryview, other: Buffer) -> None:
    """``target ^= other``, byte for byte, in place (the two have the same length)."""
    mine = np.frombuffer(target, dtype=np.uint8)
    theirs = np.frombuffer(other, dtype=np.uint8)
    if mine.size != theirs.size:
        raise CodecError(f"xor: piece has {mine.size} bytes, its base {theirs.size}")
    # Whole words where the buffers allow it: 8x fewer operations than bytes.
    if mine.size % 8 == 0:
        mine, theirs = mine.view(np.uint64), theirs.view(np.uint64)
    np.bitwise_xor(mine, theirs, out=mine)


def pass_through(codec_id: str, encoded: Buffer, info: PieceInfo, out: memoryview | None) -> Buffer:
    """The decode of a stage whose output is its input (a marker, a pruner): checked, copied to ``out``."""
    if memoryview(encoded).nbytes != info.nbytes:
        raise CodecError(f"{codec_id}: stream has {memoryview(encoded).nbytes} bytes, expected {info.nbytes}")
    if out is None:
        return encoded
    view = check_out(out, info.nbytes, codec_id)
    view[:] = memoryview(encoded).cast("B")
    return view
