"""Safetensors dtype names as torch dtypes, and torch tensors over raw byte buffers without a copy."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from shardstore.errors import InvalidInputError
from shardstore.format.dtypes import numpy_storage_dtype

_TORCH_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "U16": torch.uint16,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I32": torch.int32,
    "U32": torch.uint32,
    "F32": torch.float32,
    "F64": torch.float64,
    "I64": torch.int64,
    "U64": torch.uint64,
    "C64": torch.complex64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E8M0": torch.float8_e8m0fnu,
}


def torch_dtype(dtype: str) -> torch.dtype:
    try:
        return _TORCH_DTYPES[dtype]
    except KeyError:
        raise InvalidInputError(f"dtype {dtype} has no torch equivalent") from None


def as_tensor(flat: np.ndarray[Any, Any], dtype: str) -> torch.Tensor:
    """A flat tensor of ``dtype`` over the bytes of ``flat`` (no copy)."""
    return torch.from_numpy(flat.view(numpy_storage_dtype(dtype))).view(torch_dtype(dtype))
