"""Golden fixtures: encoded streams checked into tests/codecs/golden/, decoded on every run.

A codec id names a byte format forever. The streams here were written by
``python tests/codecs/test_golden.py``, which goes through the append-only
:class:`shardstore.testing.codecs.FixtureWriter`: it writes the fixtures of :data:`PLAN` that
are missing and refuses to touch one that exists. If a test here fails, a format changed
silently: give the new format a new codec id instead. To cover a new codec id or dtype, add it
to :data:`PLAN` and run the script.
"""

from __future__ import annotations

import filecmp
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from shardstore.codecs import entropy as E
from shardstore.codecs import get_codec
from shardstore.codecs.base import PieceInfo
from shardstore.codecs.registry import codec_ids
from shardstore.format.dtypes import ITEMSIZE
from shardstore.testing.codecs import (
    INDEX_NAME,
    FixtureExistsError,
    FixtureWriter,
    GoldenCase,
    check_config_round_trip,
    check_golden,
    codec_ids_covered,
    read_index,
)

GOLDEN = Path(__file__).parent / "golden"
# Codecs whose encoder is ours end to end, so re-encoding must give the fixture bytes
# (byteplanes-zstd depends on the zstd library's encoder, which may change its output).
DETERMINISTIC = {"raw.v1", "float-entropy.v1"}
FLOAT_ENTROPY = "float-entropy.v1"
# Fixtures of lossy codecs are named so: their input is finite (quantizers refuse NaN and infinity) and
# their index entry has a decoded_sha256. The first prune-magnitude fixtures (fraction 0) are not.
LOSSY_PREFIX = "lossy-"

# The first fixtures' shapes (written before this plan existed; kept as they are).
_FIRST_SHAPES = {"BF16": (40, 31), "F32": (25, 21), "F16": (33, 17), "I64": (45,), "U8": (301,)}
# Every other dtype the float codec handles (all of safetensors'), each with a small shape.
_MORE_SHAPES = {"F64": (25, 21), "C64": (19, 7), "I32": (61, 3), "U32": (61, 3), "U64": (45,), "I16": (77, 4),
                "U16": (77, 4), "I8": (301,), "BOOL": (301,), "F8_E4M3": (43, 7), "F8_E5M2": (43, 7),
                "F8_E8M0": (43, 7)}
_QUANTIZERS: list[dict[str, Any]] = [
    {"id": "int8-channel.v1"},
    {"id": "intn-group.v1", "bits": 4, "group": 64, "clip_steps": 11},
    {"id": "fp8-channel.v1", "format": "e4m3"},
]


def _name(config: dict[str, Any], dtype: str) -> str:
    params = [str(v) for k, v in config.items() if k not in ("id", "level", "fraction")]
    if config["id"] == "sparse-bitmap.v1" and config.get("block_elems") == 256:
        params = []  # the first sparse fixtures were named without it
    return "-".join([config["id"], *params, dtype]) + ".bin"


def _plan() -> list[tuple[dict[str, Any], str, tuple[int, ...], str]]:
    """(config, dtype, shape, file) of every fixture the project wants; the script writes the missing ones."""
    plan: list[tuple[dict[str, Any], str, tuple[int, ...], str]] = []
    lossless: list[dict[str, Any]] = [
        {"id": "raw.v1"}, {"id": "byteplanes-zstd.v1", "level": 3},
        {"id": FLOAT_ENTROPY, "block_elems": 1 << 18}, {"id": FLOAT_ENTROPY, "block_elems": 256},
        {"id": "sparse-bitmap.v1", "block_elems": 256}, {"id": "prune-magnitude.v1", "fraction": 0.0},
    ]
    for config in lossless:
        shapes = dict(_FIRST_SHAPES)
        shapes.update(_MORE_SHAPES if config["id"] == FLOAT_ENTROPY else {"F64": _MORE_SHAPES["F64"]})
        plan += [(config, dtype, shape, _name(config, dtype)) for dtype, shape in shapes.items()]
    # xor-delta.v1 streams are made by push --base, not by the codec: its first fixtures stay as they are.
    plan += [({"id": "xor-delta.v1"}, dtype, shape, _name({"id": "xor-delta.v1"}, dtype))
             for dtype, shape in _FIRST_SHAPES.items()]
    for config in _QUANTIZERS:
        plan += [(config, dtype, _FIRST_SHAPES.get(dtype, (25, 21)), LOSSY_PREFIX + _name(config, dtype))
                 for dtype in ("F32", "F64")]
    pruning = {"id": "prune-magnitude.v1", "fraction": 0.5}
    plan.append((pruning, "F32", (25, 21), f"{LOSSY_PREFIX}prune-magnitude.v1-0.5-F32.bin"))
    return plan


PLAN = _plan()


def _sample(dtype: str, count: int) -> bytes:
    """Weight-like values (plus special floats) in the given dtype, from a fixed seed.

    The fixtures of the first five dtypes were written from exactly these bytes: their branches
    never change. Other dtypes have their own branches, before the U8 fallback.
    """
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
    if dtype == "F64":
        wide = rng.standard_normal(count) * 0.04
        wide[::89] = np.resize(np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 5e-324]), len(wide[::89]))
        return wide.astype("<f8").tobytes()
    if dtype == "C64":
        return (x + 1j * x[::-1]).astype("<c8").tobytes()
    if dtype.startswith("F8_E8M0"):
        return rng.integers(110, 130, count).astype(np.uint8).tobytes()  # exponent-only scales near 1
    if dtype.startswith("F8_"):
        target = torch.float8_e4m3fn if dtype == "F8_E4M3" else torch.float8_e5m2
        return torch.from_numpy(x).to(target).view(torch.uint8).numpy().tobytes()
    ranges = {"I32": (-10**6, 10**6, "<i4"), "U32": (0, 10**6, "<u4"), "U64": (0, 10**12, "<u8"),
              "I16": (-3000, 3000, "<i2"), "U16": (0, 4000, "<u2"), "I8": (-100, 100, "i1"), "BOOL": (0, 2, "u1")}
    if dtype in ranges:
        low, high, layout = ranges[dtype]
        return rng.integers(low, high, count).astype(layout).tobytes()
    return rng.integers(0, 5, count).astype(np.uint8).tobytes()


def _finite_sample(dtype: str, count: int) -> bytes:
    """What a quantizer takes: finite weights (it refuses NaN and infinity), with an outlier."""
    rng = np.random.default_rng(20241129)
    x = rng.standard_normal(count) * 0.04
    x[7] = 1.5
    layout = {"F32": "<f4", "F64": "<f8"}[dtype]
    return x.astype(layout).tobytes()


def _input(name: str, dtype: str, count: int) -> bytes:
    return _finite_sample(dtype, count) if name.startswith(LOSSY_PREFIX) else _sample(dtype, count)


def write_missing_fixtures(folder: Path) -> list[str]:
    """Add every fixture of the plan that ``folder`` lacks (append-only); returns the files written."""
    writer = FixtureWriter(folder)
    written = []
    for config, dtype, shape, name in PLAN:
        if writer.exists(name):
            continue
        writer.add(get_codec(dict(config)), _input(name, dtype, int(np.prod(shape))), PieceInfo(dtype, shape), name)
        written.append(name)
    return written


CASES = read_index(GOLDEN)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.file)
def test_golden_decodes(case: GoldenCase) -> None:
    decoded = check_golden(GOLDEN, case)
    count = int(np.prod(case.shape))
    # The index's digests were computed when the fixture was written; the input is recomputed here.
    assert hashlib.sha256(_input(case.file, case.dtype, count)).hexdigest() == case.sha256
    assert (case.decoded_sha256 is not None) == case.file.startswith(LOSSY_PREFIX)
    if case.decoded_sha256 is None:
        assert decoded == _sample(case.dtype, count)
    if case.config["id"] in DETERMINISTIC:
        assert get_codec(dict(case.config)).encode(decoded, case.info) == (GOLDEN / case.file).read_bytes()


@pytest.mark.parametrize("case", [c for c in CASES if c.config["id"] == FLOAT_ENTROPY], ids=lambda c: c.file)
def test_golden_numpy_fallback(case: GoldenCase) -> None:
    blob = (GOLDEN / case.file).read_bytes()
    out = bytearray(case.info.nbytes)
    E.decode_piece(blob, case.dtype, case.config["block_elems"], memoryview(out), E.NUMPY_KERNELS)
    assert hashlib.sha256(out).hexdigest() == case.sha256
    assert E.encode_piece(out, case.dtype, case.config["block_elems"], E.NUMPY_KERNELS) == blob


def test_index_covers_every_registered_codec_id() -> None:
    assert codec_ids_covered(CASES) == set(codec_ids())


def test_float_codec_has_fixtures_for_every_dtype_it_handles() -> None:
    for block_elems in (256, 1 << 18):
        covered = {c.dtype for c in CASES if c.config == {"id": FLOAT_ENTROPY, "block_elems": block_elems}}
        assert covered == set(ITEMSIZE), block_elems  # every safetensors dtype, F64 included


def test_every_planned_fixture_is_written() -> None:
    assert [name for _c, _d, _s, name in PLAN if not (GOLDEN / name).exists()] == []
    assert {c.file for c in CASES} >= {name for _c, _d, _s, name in PLAN}


@pytest.mark.parametrize("config", sorted({json.dumps(c.config, sort_keys=True) for c in CASES}))
def test_config_of_every_fixture_round_trips(config: str) -> None:
    assert check_config_round_trip(get_codec(json.loads(config))) == json.loads(config)


def test_running_the_generator_again_rewrites_nothing(tmp_path: Path) -> None:
    copy = tmp_path / "golden"
    shutil.copytree(GOLDEN, copy)
    assert write_missing_fixtures(copy) == []
    match, mismatch, errors = filecmp.cmpfiles(GOLDEN, copy, [c.file for c in CASES] + [INDEX_NAME], shallow=False)
    assert (mismatch, errors) == ([], []) and len(match) == len(CASES) + 1


def test_generator_adds_a_missing_fixture_and_keeps_every_other_entry(tmp_path: Path) -> None:
    copy = tmp_path / "golden"
    shutil.copytree(GOLDEN, copy)
    dropped = next(c for c in CASES if c.file == "float-entropy.v1-262144-F64.bin")
    entries = [c for c in json.loads((copy / INDEX_NAME).read_text()) if c["file"] != dropped.file]
    (copy / INDEX_NAME).write_text(json.dumps(entries, indent=1) + "\n")
    (copy / dropped.file).unlink()
    assert write_missing_fixtures(copy) == [dropped.file]
    assert read_index(copy) == [c for c in CASES if c != dropped] + [dropped]  # appended, earlier ones unchanged
    assert (copy / dropped.file).read_bytes() == (GOLDEN / dropped.file).read_bytes()


def test_fixture_writer_refuses_to_overwrite(tmp_path: Path) -> None:
    writer = FixtureWriter(tmp_path)
    codec = get_codec({"id": "raw.v1"})
    info = PieceInfo("U8", (4,))
    first = writer.add(codec, b"\x01\x02\x03\x04", info, "raw.bin")
    with pytest.raises(FixtureExistsError, match="never rewritten"):
        writer.add(codec, b"\x09\x09\x09\x09", info, "raw.bin")
    (tmp_path / "stray.bin").write_bytes(b"a file not in the index")
    with pytest.raises(FixtureExistsError):
        writer.add(codec, b"\x09\x09\x09\x09", info, "stray.bin")
    assert (tmp_path / "raw.bin").read_bytes() == b"\x01\x02\x03\x04"
    assert (tmp_path / "stray.bin").read_bytes() == b"a file not in the index"
    assert read_index(tmp_path) == [first]
    assert first.sha256 == hashlib.sha256(b"\x01\x02\x03\x04").hexdigest() and first.decoded_sha256 is None


if __name__ == "__main__":
    for written_name in write_missing_fixtures(GOLDEN):
        print("wrote", written_name)
