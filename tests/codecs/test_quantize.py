"""The quantizing codecs: error bounds per codec, dtypes and shapes, the clipping search, fixed byte formats.

Golden fixtures (``golden/quantize/``) were written once by ``python tests/codecs/test_quantize.py``,
which adds only missing fixtures (append-only ``FixtureWriter``, never a rewrite): each is a
quantizer's output for a fixed weight-like sample; decoding must give the recorded dequantized
bytes and encoding the sample must give the fixture bytes again.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from shardstore.codecs import PieceInfo, Pipeline, codec_from_name, get_codec
from shardstore.codecs.fp8 import Fp8ChannelCodec, to_fp8
from shardstore.codecs.int8 import Int8ChannelCodec
from shardstore.codecs.intn import IntGroupCodec
from shardstore.codecs.quantize import QuantizeCodec, bf16_ceil, quantized_piece, to_float32
from shardstore.errors import CodecError
from shardstore.testing.codecs import FixtureWriter

GOLDEN = Path(__file__).parent / "golden" / "quantize"
CONFIGS: list[dict[str, Any]] = [
    {"id": "int8-channel.v1"},
    {"id": "intn-group.v1", "bits": 4, "group": 64, "clip_steps": 11},
    {"id": "intn-group.v1", "bits": 3, "group": 0, "clip_steps": 5},
    {"id": "fp8-channel.v1", "format": "e4m3"},
    {"id": "fp8-channel.v1", "format": "e5m2"},
]
SHAPES = {"F32": (25, 70), "BF16": (40, 31), "F16": (33, 17)}


def _weights(shape: tuple[int, ...], seed: int = 7, heavy: bool = False) -> np.ndarray[Any, Any]:
    rng = np.random.default_rng(seed)
    values = rng.standard_t(3, size=shape) if heavy else rng.standard_normal(shape)
    # Rows of different scales, as in real layers.
    scale = np.exp(rng.normal(-3, 0.5, size=(shape[0],) + (1,) * (len(shape) - 1))) if shape else 0.05
    return (values * scale).astype(np.float32)


def _as_dtype(values: np.ndarray[Any, Any], dtype: str) -> bytes:
    if dtype == "BF16":
        return (values.astype(np.float32).view(np.uint32) >> 16).astype("<u2").tobytes()
    return values.astype({"F32": "<f4", "F16": "<f2", "F64": "<f8"}[dtype]).tobytes()


def _round_trip(codec: QuantizeCodec, values: np.ndarray[Any, Any], dtype: str = "F32") -> np.ndarray[Any, Any]:
    info = PieceInfo(dtype, values.shape)
    data = _as_dtype(values, dtype)
    encoded = codec.encode(data, info)
    assert len(encoded) == codec.output_info(info).nbytes
    decoded = codec.decode(encoded, info)
    assert len(decoded) == info.nbytes
    return to_float32(decoded, dtype).reshape(values.shape)


# ------------------------------------------------------------------------------------------ error bounds


def test_int8_error_is_at_most_half_a_step_per_row() -> None:
    x = _weights((64, 300))
    codec = Int8ChannelCodec()
    y = _round_trip(codec, x)
    piece = codec.unpack(codec.encode(x.tobytes(), PieceInfo("F32", x.shape)), PieceInfo("F32", x.shape))
    steps = piece.scales[:, 0]
    assert np.all(np.abs(y - x).max(axis=1) <= steps / 2 * (1 + 1e-6))
    # The step is absmax / 127 rounded up to BF16: never more than 0.8 % coarser.
    absmax = np.abs(x).max(axis=1)
    assert np.all(steps >= absmax / 127) and np.all(steps <= absmax / 127 * 1.008)
    assert np.abs(piece.codes).max() == 127


@pytest.mark.parametrize("bits", [2, 4, 5, 8])
@pytest.mark.parametrize("group", [0, 32, 64])
def test_intn_round_to_nearest_error_is_at_most_half_a_step_per_group(bits: int, group: int) -> None:
    x = _weights((20, 200))  # 200 is no multiple of 32 or 64: each row ends in a shorter group
    codec = IntGroupCodec(bits=bits, group=group, clip_steps=1)
    y = _round_trip(codec, x)
    piece = codec.unpack(codec.encode(x.tobytes(), PieceInfo("F32", x.shape)), PieceInfo("F32", x.shape))
    assert piece.codes.max() <= (1 << bits) - 1
    assert np.all(np.abs(y - x) <= piece.expand(piece.scales) / 2 * (1 + 1e-6))
    expected_groups = 1 if group == 0 else -(-200 // group)
    assert piece.scales.shape == (20, expected_groups)


@pytest.mark.parametrize(("fmt", "mantissa_bits", "min_exponent"), [("e4m3", 3, -6), ("e5m2", 2, -14)])
def test_fp8_error_is_half_an_ulp_relative(fmt: str, mantissa_bits: int, min_exponent: int) -> None:
    x = _weights((30, 128))
    codec = Fp8ChannelCodec(fmt)
    y = _round_trip(codec, x)
    scales = codec.unpack(codec.encode(x.tobytes(), PieceInfo("F32", x.shape)), PieceInfo("F32", x.shape)).scales
    # Normal values: half an ulp relative; below the normal range, half the smallest subnormal.
    bound = np.abs(x) * 2.0 ** -(mantissa_bits + 1) + scales * 2.0 ** (min_exponent - mantissa_bits - 1)
    assert np.all(np.abs(y - x) <= bound * (1 + 1e-6))


def test_fp8_codes_are_torch_bits() -> None:
    x = np.random.default_rng(3).standard_normal(50_000).astype(np.float32) * 100
    for fmt, limit, dtype in (("f8_e4m3", 448.0, torch.float8_e4m3fn), ("f8_e5m2", 57344.0, torch.float8_e5m2)):
        values = np.clip(x * (limit / 448), -limit, limit)
        ours = to_fp8(values, fmt)
        theirs = torch.from_numpy(values).to(dtype).view(torch.uint8).numpy()
        assert np.array_equal(ours, theirs), fmt


def test_snr_grows_with_bits() -> None:
    x = _weights((32, 256))
    snrs = []
    for bits in range(2, 9):
        y = _round_trip(IntGroupCodec(bits=bits), x)
        snrs.append(10 * np.log10((x**2).sum() / ((x - y) ** 2).sum()))
    assert all(b > a + 4 for a, b in itertools.pairwise(snrs)), snrs  # about 6 dB a bit


# ------------------------------------------------------------------------------------------ clipping


def test_clipping_search_lowers_the_error() -> None:
    x = _weights((64, 512), heavy=True)  # Student-t: outliers that a plain min/max range wastes levels on
    info = PieceInfo("F32", x.shape)
    plain = IntGroupCodec(bits=4, group=128, clip_steps=1)
    searched = IntGroupCodec(bits=4, group=128)
    err_plain = (_round_trip(plain, x) - x) ** 2
    err_searched = (_round_trip(searched, x) - x) ** 2
    # Never worse on any group (a factor of 1.0 is always tried), clearly better in total.
    per_group = lambda e: e.reshape(64, 4, 128).sum(axis=2)  # noqa: E731
    assert np.all(per_group(err_searched) <= per_group(err_plain) * (1 + 1e-6))
    assert err_searched.sum() < 0.95 * err_plain.sum()
    # The search clipped something: some groups' ranges were shrunk.
    ranges = lambda c: c.unpack(c.encode(x.tobytes(), info), info).scales  # noqa: E731
    assert np.any(ranges(searched) < ranges(plain))


# ------------------------------------------------------------------------------------------ dtypes, shapes


@pytest.mark.parametrize("dtype", ["F32", "F16", "BF16", "F64"])
@pytest.mark.parametrize("name", ["int8", "int5", "fp8"])
def test_every_float_dtype_decodes_to_itself(dtype: str, name: str) -> None:
    codec = codec_from_name(name)
    assert isinstance(codec, QuantizeCodec)
    x = _weights((16, 96))
    original = to_float32(_as_dtype(x, dtype), dtype).reshape(x.shape)
    y = _round_trip(codec, x, dtype)
    snr = 10 * np.log10((original**2).sum() / ((original - y) ** 2).sum())
    assert snr > {"int8": 35, "int5": 22, "fp8": 25}[name]


@pytest.mark.parametrize("shape", [(), (7,), (1000,), (3, 4, 50), (0, 16), (5, 1)])
def test_odd_shapes(shape: tuple[int, ...]) -> None:
    x = _weights(shape) if shape else np.float32(0.25)
    x = np.asarray(x, dtype=np.float32)
    for codec in (Int8ChannelCodec(), IntGroupCodec(bits=4, group=64), Fp8ChannelCodec()):
        y = _round_trip(codec, x)
        assert y.shape == x.shape
        if x.size:
            assert np.abs(y - x).max() <= np.abs(x).max() * 0.2  # int4 with clipping: the coarsest here


def test_zero_rows_stay_exact_zero() -> None:
    x = _weights((6, 64))
    x[2] = 0
    for codec in (Int8ChannelCodec(), IntGroupCodec(bits=3), Fp8ChannelCodec()):
        y = _round_trip(codec, x)
        assert np.array_equal(y[2], np.zeros(64, np.float32))


def test_bf16_ceil_rounds_up_to_a_bf16() -> None:
    values = np.array([1.0, 1.0000001, 0.1, 3e-39, 0.0], dtype=np.float32)
    rounded = bf16_ceil(values)
    assert np.all(rounded >= values)
    assert np.all((rounded.view(np.uint32) & 0xFFFF) == 0)
    assert rounded[0] == 1.0 and rounded[4] == 0.0


# ------------------------------------------------------------------------------------------ refusals, configs


def test_refusals_are_codec_errors() -> None:
    codec = Int8ChannelCodec()
    bad = _weights((4, 8))
    bad[1, 3] = np.nan
    with pytest.raises(CodecError, match="NaN or infinity"):
        codec.encode(bad.tobytes(), PieceInfo("F32", bad.shape))
    with pytest.raises(CodecError, match="float tensors"):
        codec.encode(bytes(64), PieceInfo("I64", (8,)))
    with pytest.raises(CodecError, match="expected"):
        codec.encode(bytes(10), PieceInfo("F32", (4,)))
    with pytest.raises(CodecError, match="stream has"):
        codec.decode(bytes(3), PieceInfo("F32", (4, 8)))


@pytest.mark.parametrize(
    "config",
    [
        {"id": "intn-group.v1", "bits": 9},
        {"id": "intn-group.v1", "bits": 1},
        {"id": "intn-group.v1", "group": -1},
        {"id": "intn-group.v1", "clip_steps": 0},
        {"id": "intn-group.v1", "bits": True},
        {"id": "fp8-channel.v1", "format": "e3m4"},
        {"id": "int8-channel.v1", "bits": 8},
    ],
)
def test_bad_configs(config: dict[str, Any]) -> None:
    with pytest.raises(CodecError):
        get_codec(config)


@pytest.mark.parametrize("config", CONFIGS)
def test_config_round_trip(config: dict[str, Any]) -> None:
    codec = get_codec(dict(config))
    assert get_codec(codec.get_config()) == codec
    assert not codec.lossless


def test_encoding_is_deterministic() -> None:
    x = _weights((40, 130)).tobytes()
    info = PieceInfo("F32", (40, 130))
    for config in CONFIGS:
        assert get_codec(dict(config)).encode(x, info) == get_codec(dict(config)).encode(x, info)


# ------------------------------------------------------------------------------------------ pipeline, quantized form


@pytest.mark.parametrize("config", CONFIGS)
def test_pipeline_and_quantized_form(config: dict[str, Any]) -> None:
    x = _weights((50, 96))
    info = PieceInfo("F32", x.shape)
    pipeline = Pipeline((get_codec(dict(config)), codec_from_name("lossless")))
    assert not pipeline.lossless
    payload = pipeline.encode(x.tobytes(), info)
    decoded = np.frombuffer(bytes(pipeline.decode(payload, info)), dtype=np.float32).reshape(x.shape)
    form = quantized_piece(pipeline.configs(), payload, info)
    assert form.codes.shape == x.shape
    assert np.array_equal(form.dequantize(), decoded)


def test_quantized_form_of_a_lossless_stream_is_refused() -> None:
    info = PieceInfo("F32", (4, 4))
    pipeline = Pipeline((codec_from_name("lossless"),))
    with pytest.raises(CodecError, match="not quantized"):
        quantized_piece(pipeline.configs(), pipeline.encode(bytes(64), info), info)


def test_entropy_stage_shrinks_codes_below_their_width() -> None:
    """One code per byte, then the entropy coder: int4 codes cost well under 8 bits each."""
    x = _weights((256, 512))
    info = PieceInfo("F32", x.shape)
    pipeline = Pipeline((IntGroupCodec(bits=4), codec_from_name("lossless")))
    bits_per_weight = len(pipeline.encode(x.tobytes(), info)) * 8 / x.size
    assert bits_per_weight < 4.6  # 4-bit codes at about their entropy, plus 3 bytes of scale/zero per 64


# ------------------------------------------------------------------------------------------ golden fixtures


def _golden_cases() -> list[dict[str, Any]]:
    index = GOLDEN / "index.json"
    return list(json.loads(index.read_text())) if index.exists() else []


def _golden_sample(dtype: str) -> bytes:
    rng = np.random.default_rng(20240501)
    shape = SHAPES[dtype]
    values = (rng.standard_normal(shape) * 0.04).astype(np.float32)
    values[3] = 0  # an all-zero row
    values[5, 2] = 1.5  # an outlier
    return _as_dtype(values, dtype)


def test_every_quantizer_has_golden_fixtures() -> None:
    assert {c["config"]["id"] for c in _golden_cases()} >= {c["id"] for c in CONFIGS}


@pytest.mark.parametrize("case", _golden_cases(), ids=lambda c: c["file"])
def test_golden_fixture(case: dict[str, Any]) -> None:
    codec = get_codec(case["config"])
    info = PieceInfo(case["dtype"], tuple(case["shape"]))
    blob = (GOLDEN / case["file"]).read_bytes()
    assert hashlib.sha256(bytes(codec.decode(blob, info))).hexdigest() == case["decoded_sha256"]
    assert codec.encode(_golden_sample(case["dtype"]), info) == blob


def write_missing_fixtures(folder: Path = GOLDEN) -> list[str]:
    """Add the quantizer fixtures ``folder`` lacks, append-only (``FixtureWriter``); returns those written."""
    writer = FixtureWriter(folder)
    written = []
    for config in CONFIGS:
        codec = get_codec(dict(config))
        for dtype, shape in SHAPES.items():
            suffix = "-".join(str(v) for k, v in sorted(config.items()) if k != "id")
            name = f"{config['id']}{'-' + suffix if suffix else ''}-{dtype}.bin"
            if not writer.exists(name):
                writer.add(codec, _golden_sample(dtype), PieceInfo(dtype, shape), name)
                written.append(name)
    return written


def test_quantizer_fixture_generator_rewrites_nothing(tmp_path: Path) -> None:
    shutil.copytree(GOLDEN, tmp_path / "quantize")
    assert write_missing_fixtures(tmp_path / "quantize") == []
    for path in GOLDEN.iterdir():
        assert (tmp_path / "quantize" / path.name).read_bytes() == path.read_bytes()


if __name__ == "__main__":
    print(write_missing_fixtures())
