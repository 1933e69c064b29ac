"""The safetensors dtype names and how many bytes one element takes.

Everything below the Python API works on raw little-endian bytes, so the only
thing a dtype needs to tell us is its element size; numpy and torch views are
made at the edges.
"""

from __future__ import annotations

import numpy as np

from shardstore.errors import FormatError

# Every dtype the safetensors format knows (safetensors/src/tensor.rs).
ITEMSIZE: dict[str, int] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "F8_E8M0": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "F64": 8,
    "I64": 8,
    "U64": 8,
    "C64": 8,
}

# The dtypes whose bits are an IEEE-style sign / exponent / mantissa split:
# (exponent bits, mantissa bits). Float-aware codecs use it.
FLOAT_LAYOUT: dict[str, tuple[int, int]] = {
    "F64": (11, 52),
    "F32": (8, 23),
    "F16": (5, 10),
    "BF16": (8, 7),
    "F8_E4M3": (4, 3),
    "F8_E5M2": (5, 2),
}

# numpy dtype with the same bytes; bf16 and f8 have none, so they travel as
# unsigned integers of the same width, which keeps every bit.
_NUMPY_STORAGE: dict[str, str] = {
    "BOOL": "bool",
    "U8": "u1",
    "I8": "i1",
    "F8_E5M2": "u1",
    "F8_E4M3": "u1",
    "F8_E8M0": "u1",
    "I16": "<i2",
    "U16": "<u2",
    "F16": "<f2",
    "BF16": "<u2",
    "I32": "<i4",
    "U32": "<u4",
    "F32": "<f4",
    "F64": "<f8",
    "I64": "<i8",
    "U64": "<u8",
    "C64": "<c8",
}


def itemsize(dtype: str) -> int:
    try:
        return ITEMSIZE[dtype]
    except KeyError:
        raise FormatError(f"unknown dtype {dtype!r}") from None


def numpy_storage_dtype(dtype: str) -> np.dtype[np.generic]:
    """A numpy dtype with the same bytes per element (not always the same meaning)."""
    itemsize(dtype)
    return np.dtype(_NUMPY_STORAGE[dtype])


def nbytes(dtype: str, shape: tuple[int, ...] | list[int]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count * itemsize(dtype)
