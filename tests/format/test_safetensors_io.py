"""Strict validation of safetensors headers: every violation is a one-line FormatError naming the file."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from shardstore.errors import FormatError
from shardstore.format.safetensors_io import build_header, parse_bytes, read_file_header


def _file(header: dict[str, object], data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def test_reads_what_the_reference_writer_wrote(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_file({"b": np.arange(6, dtype=np.float32).reshape(2, 3), "a": np.zeros(0, np.int8)}, str(path),
              metadata={"format": "np"})
    header = read_file_header(str(path))
    assert header.by_name()["b"].shape == (2, 3)
    assert header.by_name()["b"].dtype == "F32"
    assert header.metadata == {"format": "np"}
    assert header.data_offset + header.data_bytes == path.stat().st_size


def test_build_header_round_trips_and_aligns() -> None:
    head = build_header([("x", "BF16", (2, 2), 8), ("y", "U8", (3,), 3)], {"k": "v"})
    assert len(head) % 8 == 0
    header, area = parse_bytes(head + bytes(11), "built")
    assert [t.name for t in header.tensors] == ["x", "y"]
    assert len(area) == 11


CASES: list[tuple[str, bytes, str]] = [
    ("empty", b"", "not a safetensors file"),
    ("short-length", b"\x01\x00", "not a safetensors file"),
    ("header-past-end", struct.pack("<Q", 1000) + b"{}", "truncated"),
    ("huge-header", struct.pack("<Q", 10**12), "exceeds"),
    ("not-json", struct.pack("<Q", 3) + b"{x}", "not valid JSON"),
    ("not-object", _file([], b""), "JSON object"),  # type: ignore[arg-type]
    ("bad-dtype", _file({"t": {"dtype": "F128", "shape": [1], "data_offsets": [0, 16]}}, bytes(16)), "unknown dtype"),
    ("negative-shape", _file({"t": {"dtype": "U8", "shape": [-1], "data_offsets": [0, 0]}}, b""), "non-negative"),
    ("size-mismatch", _file({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, bytes(4)), "needs 8"),
    ("overflow", _file({"t": {"dtype": "F64", "shape": [2**40, 2**40], "data_offsets": [0, 8]}}, bytes(8)),
     "overflows"),
    ("hole", _file({"t": {"dtype": "U8", "shape": [2], "data_offsets": [2, 4]}}, bytes(4)), "hole"),
    ("overlap", _file({"a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]},
                       "b": {"dtype": "U8", "shape": [2], "data_offsets": [2, 4]}}, bytes(4)), "overlaps"),
    ("truncated-data", _file({"t": {"dtype": "U8", "shape": [8], "data_offsets": [0, 8]}}, bytes(5)), "truncated"),
    ("trailing", _file({"t": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]}}, bytes(5)), "trailing"),
    ("bad-metadata", _file({"__metadata__": {"k": 1}}, b""), "__metadata__"),
    ("extra-field", _file({"t": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1], "x": 1}}, bytes(1)),
     "exactly"),
]


@pytest.mark.parametrize(("label", "blob", "message"), CASES, ids=[c[0] for c in CASES])
def test_malformed_files_are_refused(tmp_path: Path, label: str, blob: bytes, message: str) -> None:
    path = tmp_path / f"{label}.safetensors"
    path.write_bytes(blob)
    with pytest.raises(FormatError) as info:
        read_file_header(str(path))
    text = str(info.value)
    assert message in text
    assert str(path) in text and "\n" not in text


def test_duplicate_tensor_names_are_refused() -> None:
    raw = b'{"t":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"t":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}'
    with pytest.raises(FormatError, match="duplicate key 't'"):
        parse_bytes(struct.pack("<Q", len(raw)) + raw + b"\x00", "dup")
