"""Reading and writing the safetensors container, strictly.

The format (https://github.com/huggingface/safetensors): 8 bytes little-endian
header length N, N bytes of JSON header ``{name: {dtype, shape, data_offsets},
"__metadata__": {str: str}}``, then the data area. We parse it ourselves
rather than through the safetensors package so that every violation becomes a
one-line :class:`FormatError` naming the file, and so that shards (which are
safetensors files) and users' model files share one validator.

Rules enforced (those of the reference implementation, plus a size cap):
header size ≤ 100 MB and within the file; valid UTF-8 JSON object without
duplicate keys; known dtypes; non-negative integer shapes whose byte size does
not overflow (nor does any single dimension: ``[0, 2**100]`` holds no bytes
but no framework can make it); offsets that match the byte size, lie inside the
data area, and tile it exactly (no overlaps, no holes). Error messages quote at
most a few dozen characters of what they refuse, however large it is.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from shardstore.errors import FormatError
from shardstore.format import canonical_json
from shardstore.format.dtypes import ITEMSIZE

MAX_HEADER_BYTES = 100_000_000
_LEN = struct.Struct("<Q")
# Every element count we accept fits an int64, like torch and numpy.
_MAX_BYTES = 1 << 62
_QUOTE_CHARS = 60


def quote(value: Any) -> str:
    """``repr(value)`` cut short: a hostile header must not turn into a megabyte error line."""
    text = repr(value)
    return text if len(text) <= _QUOTE_CHARS else f"{text[:_QUOTE_CHARS]}...({len(text)} chars)"


def checked_nbytes(dtype: str, shape: Any, what: str) -> int:
    """The byte size of ``dtype`` x ``shape`` from untrusted input, or a FormatError naming ``what``.

    Every dimension must be a non-negative int and neither it nor the product may
    pass 2**62 bytes, so the result is safe to allocate against (when small) and to
    hand to numpy or torch (always).
    """
    if not isinstance(dtype, str) or dtype not in ITEMSIZE:
        raise FormatError(f"{what}: unknown dtype {quote(dtype)}")
    if not isinstance(shape, list | tuple) or not all(type(d) is int and d >= 0 for d in shape):
        raise FormatError(f"{what}: shape must be a list of non-negative integers, not {quote(shape)}")
    size = ITEMSIZE[dtype]
    for dim in shape:
        if dim > _MAX_BYTES:
            raise FormatError(f"{what}: shape {quote(shape)} overflows")
        size *= dim
        if size > _MAX_BYTES:
            raise FormatError(f"{what}: shape {quote(shape)} overflows")
    return size


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # offsets relative to the start of the data area
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class SafetensorsHeader:
    header_bytes: bytes  # the N bytes exactly as found (padding included)
    tensors: tuple[TensorEntry, ...]  # in data order
    metadata: dict[str, str] | None

    @property
    def data_offset(self) -> int:
        return _LEN.size + len(self.header_bytes)

    @property
    def data_bytes(self) -> int:
        return self.tensors[-1].end if self.tensors else 0

    def by_name(self) -> dict[str, TensorEntry]:
        return {t.name: t for t in self.tensors}


def header_length(prefix: bytes, what: str, file_size: int) -> int:
    """The header length N from the first 8 bytes, checked against the file size."""
    if len(prefix) < _LEN.size:
        raise FormatError(f"{what}: not a safetensors file (only {file_size} bytes)")
    (length,) = _LEN.unpack_from(prefix)
    if length > MAX_HEADER_BYTES:
        raise FormatError(f"{what}: header of {length} bytes exceeds the {MAX_HEADER_BYTES} byte limit")
    if _LEN.size + length > file_size:
        raise FormatError(f"{what}: truncated: header says {length} bytes but the file has {file_size}")
    return int(length)


def _entry(name: str, raw: Any, what: str) -> TensorEntry:
    where = f"{what}: tensor {quote(name)}"
    if not isinstance(raw, dict) or set(raw) != {"dtype", "shape", "data_offsets"}:
        raise FormatError(f"{where}: entry must have exactly dtype, shape, data_offsets")
    dtype, shape, offsets = raw["dtype"], raw["shape"], raw["data_offsets"]
    size = checked_nbytes(dtype, shape, where)
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int and o >= 0 for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise FormatError(f"{where}: bad data_offsets {quote(offsets)}")
    if offsets[1] - offsets[0] != size:
        raise FormatError(
            f"{where}: data_offsets span {offsets[1] - offsets[0]} bytes, dtype {dtype} x shape {quote(shape)} "
            f"needs {size}"
        )
    return TensorEntry(name, dtype, tuple(shape), offsets[0], offsets[1])


def parse_header(header_bytes: bytes, what: str, data_size: int) -> SafetensorsHeader:
    """Validate a header against the size of the data area that follows it."""
    doc = canonical_json.loads(header_bytes, f"{what}: header")
    if not isinstance(doc, dict):
        raise FormatError(f"{what}: header must be a JSON object")
    metadata = doc.pop("__metadata__", None)
    if metadata is not None and (
        not isinstance(metadata, dict)
        or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    ):
        raise FormatError(f"{what}: __metadata__ must map strings to strings")
    entries = sorted((_entry(name, raw, what) for name, raw in doc.items()), key=lambda e: (e.begin, e.end))
    position = 0
    for entry in entries:
        if entry.begin != position:
            problem = "overlaps the previous tensor" if entry.begin < position else "leaves a hole before it"
            raise FormatError(f"{what}: tensor {quote(entry.name)} {problem} (offset {entry.begin}, "
                              f"expected {position})")
        position = entry.end
    if position != data_size:
        problem = "truncated" if position > data_size else "has trailing bytes"
        raise FormatError(f"{what}: {problem}: tensors need {position} data bytes, the file has {data_size}")
    return SafetensorsHeader(bytes(header_bytes), tuple(entries), metadata)


def read_file_header(path: str, what: str | None = None) -> SafetensorsHeader:
    """Parse and validate the header of a safetensors file on disk (reads only the header)."""
    what = what or path
    try:
        with open(path, "rb") as handle:
            handle.seek(0, 2)
            file_size = handle.tell()
            handle.seek(0)
            length = header_length(handle.read(_LEN.size), what, file_size)
            header_bytes = handle.read(length)
    except FileNotFoundError:
        raise FormatError(f"{what}: no such file") from None
    except IsADirectoryError:
        raise FormatError(f"{what}: is a folder, not a safetensors file") from None
    return parse_header(header_bytes, what, file_size - _LEN.size - length)


def parse_bytes(data: bytes | bytearray | memoryview, what: str) -> tuple[SafetensorsHeader, memoryview]:
    """Parse a whole safetensors file held in memory; returns the header and the data area."""
    view = memoryview(data).cast("B")
    length = header_length(bytes(view[: _LEN.size]), what, len(view))
    header = parse_header(bytes(view[_LEN.size : _LEN.size + length]), what, len(view) - _LEN.size - length)
    return header, view[_LEN.size + length :]


def build_header(entries: Sequence[tuple[str, str, tuple[int, ...], int]], metadata: dict[str, str] | None) -> bytes:
    """The 8-byte length plus canonical JSON header for tensors laid out in the given order.

    ``entries`` are (name, dtype, shape, nbytes). The JSON is padded with spaces
    to a multiple of 8 bytes so the data area is aligned, as the reference
    writer does.
    """
    doc: dict[str, Any] = {}
    if metadata:
        doc["__metadata__"] = metadata
    position = 0
    for name, dtype, shape, size in entries:
        doc[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [position, position + size]}
        position += size
    header = canonical_json.dumps(doc)
    header += b" " * (-len(header) % 8)
    return _LEN.pack(len(header)) + header
