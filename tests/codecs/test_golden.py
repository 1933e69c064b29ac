"""Golden fixtures: encoded streams checked into tests/codecs/golden/, decoded on every run.

A codec id names a byte format forever. These streams were written once by
``python tests/codecs/test_golden.py`` (only ever run it to *add* fixtures for a
new codec id); if a test here fails, a format changed silently: give the new
format a new id instead.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from shardstore.codecs import entropy as E
from shardstore.codecs import get_codec
from shardstore.codecs.base import PieceInfo

GOLDEN = Path(__file__).parent / "golden"
# Codecs whose encoder is ours end to end, so re-encoding must give the fixture bytes
# (byteplanes-zstd depends on the zstd library's encoder, which may change its output).
DETERMINISTIC = {"raw.v1", "float-entropy.v1"}


def _cases() -> list[dict[str, Any]]:
    index = GOLDEN / "index.json"
    return list(json.loads(index.read_text())) if index.exists() else []


def _sample(dtype: str, count: int) -> bytes:
    """Weight-like values (plus special floats) in the given dtype, from a fixed seed."""
    rng = np.random.default_rng(20240501)
    x = (rng.standard_normal(count) * 0.04).astype(np.float32)
    x[::97] = [np.float32(v) for v in (0.0, -0.0, np.inf, -np.inf, np.nan, 1e-40)] * (len(x[::97]) // 6) + [0.0] * (
        len(x[::97]) % 6
    )
    if dtype == "F32":
        return x.tobytes()
    if dtype == "F16":
        return x.astype(np.float16).tobytes()
    if dtype == "BF16":
        return (x.view(np.uint32) >> 16).astype("<u2").tobytes()
    if dtype == "I64":
        return (rng.integers(-300, 300, count)).astype("<i8").tobytes()
    return rng.integers(0, 5, count).astype(np.uint8).tobytes()


@pytest.mark.parametrize("case", _cases(), ids=lambda c: c["file"])
def test_golden_decodes(case: dict[str, Any]) -> None:
    codec = get_codec(case["config"])
    info = PieceInfo(case["dtype"], tuple(case["shape"]))
    blob = (GOLDEN / case["file"]).read_bytes()
    decoded = bytes(codec.decode(blob, info))
    assert hashlib.sha256(decoded).hexdigest() == case["sha256"]
    assert decoded == _sample(case["dtype"], int(np.prod(case["shape"])))
    if case["config"]["id"] in DETERMINISTIC:
        assert codec.encode(decoded, info) == blob


@pytest.mark.parametrize(
    "case", [c for c in _cases() if c["config"]["id"] == "float-entropy.v1"], ids=lambda c: c["file"]
)
def test_golden_numpy_fallback(case: dict[str, Any]) -> None:
    info = PieceInfo(case["dtype"], tuple(case["shape"]))
    blob = (GOLDEN / case["file"]).read_bytes()
    out = bytearray(info.nbytes)
    E.decode_piece(blob, info.dtype, case["config"]["block_elems"], memoryview(out), E.NUMPY_KERNELS)
    assert hashlib.sha256(out).hexdigest() == case["sha256"]
    assert E.encode_piece(out, info.dtype, case["config"]["block_elems"], E.NUMPY_KERNELS) == blob


def test_every_codec_has_a_fixture() -> None:
    from shardstore.codecs.registry import codec_ids

    # Codecs whose fixtures need checks of their own (lossy ones, special modes) index them in a subfolder.
    nested = [case for index in GOLDEN.glob("*/index.json") for case in json.loads(index.read_text())]
    assert {c["config"]["id"] for c in _cases() + nested} >= set(codec_ids())


def _write_fixtures() -> None:
    configs: list[dict[str, Any]] = [
        {"id": "raw.v1"},
        {"id": "byteplanes-zstd.v1", "level": 3},
        {"id": "float-entropy.v1", "block_elems": 1 << 18},
        {"id": "float-entropy.v1", "block_elems": 256},
    ]
    shapes = {"BF16": (40, 31), "F32": (25, 21), "F16": (33, 17), "I64": (45,), "U8": (301,)}
    index = []
    for config in configs:
        codec = get_codec(dict(config))
        for dtype, shape in shapes.items():
            info = PieceInfo(dtype, shape)
            data = _sample(dtype, int(np.prod(shape)))
            name = f"{config['id']}-{config.get('block_elems', '')}-{dtype}.bin".replace("--", "-")
            (GOLDEN / name).write_bytes(codec.encode(data, info))
            index.append(
                {
                    "file": name,
                    "config": codec.get_config(),
                    "dtype": dtype,
                    "shape": list(shape),
                    "sha256": hashlib.sha256(data).hexdigest(),
                }
            )
    (GOLDEN / "index.json").write_text(json.dumps(index, indent=1) + "\n")


if __name__ == "__main__":
    _write_fixtures()
