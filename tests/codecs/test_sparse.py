"""sparse-bitmap.v1 (lossless) and prune-magnitude.v1 (lossy, opt-in): ratios, every bit, malformed streams.

The sparse-mode golden fixtures (``golden/sparse/``) were written once by
``python tests/codecs/test_sparse.py``, which adds only missing fixtures (append-only
``FixtureWriter``); the generic golden test covers the dense mode.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import tree_snapshot
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import shardstore
from shardstore.codecs import Pipeline, codec_from_name, get_codec
from shardstore.codecs.base import PieceInfo
from shardstore.codecs.entropy import FloatEntropyCodec
from shardstore.codecs.int8 import Int8ChannelCodec
from shardstore.codecs.prune import MagnitudePruneCodec
from shardstore.codecs.sparse import SparseBitmapCodec, prefer_sparse, zero_fraction
from shardstore.errors import CodecError
from shardstore.format.dtypes import ITEMSIZE
from shardstore.store import LocalStore
from shardstore.testing.codecs import FixtureWriter

SPARSE_GOLDEN = Path(__file__).parent / "golden" / "sparse"
MINILM_WEIGHT = "encoder.layer.0.intermediate.dense.weight"  # 1536 x 384


def _minilm_bf16(minilm_dir: Path) -> torch.Tensor:
    return load_file(str(minilm_dir / "model.safetensors"))[MINILM_WEIGHT].to(torch.bfloat16)


def _bits(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().view(torch.uint8).numpy().tobytes()


def _info(tensor: torch.Tensor, dtype: str) -> PieceInfo:
    return PieceInfo(dtype, tuple(tensor.shape))


def test_90_percent_zeros_bf16_stores_in_012_of_raw_bit_exact(minilm_dir: Path) -> None:
    weights = _minilm_bf16(minilm_dir)  # real trained values for the non-zeros
    flat = weights.view(-1)
    generator = torch.Generator().manual_seed(1)
    flat[torch.randperm(flat.numel(), generator=generator)[: flat.numel() * 9 // 10]] = 0.0  # random positions
    kept = flat.nonzero().view(-1)
    flat[kept[::50]] = -0.0  # a -0.0 is a value (sign bit set), not a zero: it must come back as -0.0
    raw = _bits(weights)
    info = _info(weights, "BF16")
    assert zero_fraction(raw, "BF16") == pytest.approx(0.9, abs=1e-4)

    encoded = SparseBitmapCodec().encode(raw, info)
    decoded = bytes(SparseBitmapCodec().decode(encoded, info))

    assert decoded == raw
    back = torch.frombuffer(bytearray(decoded), dtype=torch.bfloat16)
    assert torch.equal(back.view(torch.int16)[kept[::50]], torch.full((len(kept[::50]),), -32768, dtype=torch.int16))
    assert len(encoded) <= 0.12 * len(raw)
    assert len(encoded) < len(FloatEntropyCodec().encode(raw, info))  # the bitmap beats the dense coder


def test_2_4_structured_sparsity_round_trips_and_beats_dense(minilm_dir: Path) -> None:
    weights = _minilm_bf16(minilm_dir).view(-1, 4)
    # 2:4: in every group of 4, the 2 of smallest magnitude are zero (what NVIDIA's sparse kernels take).
    smallest = weights.float().abs().argsort(dim=1)[:, :2]
    weights.scatter_(1, smallest, 0.0)
    raw = _bits(weights)
    info = PieceInfo("BF16", (weights.numel(),))
    encoded = SparseBitmapCodec().encode(raw, info)
    assert bytes(SparseBitmapCodec().decode(encoded, info)) == raw
    assert encoded[0] == 1  # sparse mode
    dense = FloatEntropyCodec().encode(raw, info)
    # A 2:4 bitmap byte is one of 36 patterns: 5.2 bits per 8 elements instead of 8.
    assert len(encoded) < 0.9 * len(dense)


def test_dense_data_falls_back_to_the_dense_coder_at_one_byte_cost() -> None:
    rng = np.random.default_rng(3)
    raw = (rng.standard_normal(50_000) * 0.02).astype(np.float32).tobytes()
    info = PieceInfo("F32", (50_000,))
    encoded = SparseBitmapCodec().encode(raw, info)
    assert encoded[0] == 0 and encoded[1:] == FloatEntropyCodec().encode(raw, info)
    assert bytes(SparseBitmapCodec().decode(encoded, info)) == raw


def _sparse_strategy() -> st.SearchStrategy[tuple[str, bytes, tuple[int, ...]]]:
    @st.composite
    def build(draw: st.DrawFn) -> tuple[str, bytes, tuple[int, ...]]:
        dtype = draw(st.sampled_from(sorted(ITEMSIZE)))
        count = draw(st.integers(0, 700))
        raw = bytearray(draw(st.binary(min_size=count * ITEMSIZE[dtype], max_size=count * ITEMSIZE[dtype])))
        words = np.frombuffer(raw, dtype=f"u{ITEMSIZE[dtype]}")
        zeros = draw(st.lists(st.booleans(), min_size=count, max_size=count))
        words[np.array(zeros, dtype=bool)] = 0
        return dtype, bytes(raw), (count,)

    return build()


@settings(max_examples=150, deadline=None)
@given(case=_sparse_strategy(), block=st.sampled_from([32, 256, 1 << 18]))
def test_round_trip_any_dtype_any_zeros(case: tuple[str, bytes, tuple[int, ...]], block: int) -> None:
    dtype, raw, shape = case
    codec = SparseBitmapCodec(block)
    info = PieceInfo(dtype, shape)
    encoded = codec.encode(raw, info)
    out = bytearray(len(raw))
    assert bytes(codec.decode(encoded, info, memoryview(out))) == raw and bytes(out) == raw
    assert len(encoded) <= len(FloatEntropyCodec(block).encode(raw, info)) + 1
    assert get_codec(codec.get_config()) == codec


def _sparse_sample() -> tuple[bytes, PieceInfo]:
    rng = np.random.default_rng(20240502)
    values = (rng.standard_normal(4000) * 0.04).astype(np.float32)
    values[rng.random(4000) < 0.8] = 0.0
    values[::211] = -0.0
    return (values.view(np.uint32) >> 16).astype("<u2").tobytes(), PieceInfo("BF16", (50, 80))


def test_sparse_mode_golden_fixture() -> None:
    index = json.loads((SPARSE_GOLDEN / "index.json").read_text())
    assert index
    for case in index:
        codec = get_codec(case["config"])
        raw, info = _sparse_sample()
        blob = (SPARSE_GOLDEN / case["file"]).read_bytes()
        assert blob[0] == 1  # the fixture is in sparse mode
        assert hashlib.sha256(raw).hexdigest() == case["sha256"]
        assert bytes(codec.decode(blob, info)) == raw
        assert codec.encode(raw, info) == blob  # our encoder end to end: same bytes forever


@pytest.mark.parametrize(
    "damage",
    [
        lambda b: b[:0],  # empty
        lambda b: bytes([7]) + b[1:],  # unknown mode
        lambda b: b[:10],  # truncated header
        lambda b: b[:1] + (10**6).to_bytes(8, "little") + b[9:],  # more non-zeros than elements
        lambda b: b[:1] + (int.from_bytes(b[1:9], "little") - 1).to_bytes(8, "little") + b[9:],  # count off by one
        lambda b: b[:9] + (10**7).to_bytes(4, "little") + b[13:],  # bitmap overruns the stream
        lambda b: b[:-3],  # values truncated
    ],
)
def test_malformed_stream_is_a_codec_error(damage: object) -> None:
    raw, info = _sparse_sample()
    blob = SparseBitmapCodec().encode(raw, info)
    assert blob[0] == 1
    with pytest.raises(CodecError):
        SparseBitmapCodec().decode(damage(blob), info)  # type: ignore[operator]


# ---------------------------------------------------------------- magnitude pruning


def test_prune_zeroes_exactly_the_smallest_fraction(minilm_dir: Path) -> None:
    weights = load_file(str(minilm_dir / "model.safetensors"))[MINILM_WEIGHT]
    raw = _bits(weights)
    info = _info(weights, "F32")
    pruned = torch.frombuffer(bytearray(MagnitudePruneCodec(0.75).encode(raw, info)), dtype=torch.float32)
    original = weights.view(-1)
    zeroed = pruned == 0
    assert int(zeroed.sum()) == int(0.75 * original.numel())
    assert torch.equal(pruned[~zeroed], original[~zeroed])  # survivors keep every bit
    assert original[zeroed].abs().max() <= original[~zeroed].abs().min()  # the smallest went
    assert MagnitudePruneCodec(0.75).encode(raw, info) == MagnitudePruneCodec(0.75).encode(raw, info)


def test_prune_keeps_nan_and_ties_in_memory_order_and_leaves_ints() -> None:
    values = np.array([0.5, -0.1, np.nan, 0.1, -0.1, 2.0, np.inf, 0.1], dtype=np.float16)
    info = PieceInfo("F16", (8,))
    out = np.frombuffer(MagnitudePruneCodec(0.5).encode(values.tobytes(), info), dtype=np.float16)
    # 4 smallest magnitudes: the four 0.1s; NaN and inf are the largest and stay.
    assert out.view(np.uint16).tolist() == np.array([0.5, 0, np.nan, 0, 0, 2.0, np.inf, 0], np.float16).view(
        np.uint16).tolist()
    out = np.frombuffer(MagnitudePruneCodec(0.25).encode(values.tobytes(), info), dtype=np.float16)
    assert np.isnan(out[2]) and out[1] == 0 and out[3] == 0 and out[4] == np.float16(-0.1)  # first ties first
    ints = np.arange(10, dtype="<i4").tobytes()
    assert MagnitudePruneCodec(0.5).encode(ints, PieceInfo("I32", (10,))) == ints


def test_prune_pipeline_is_lossy_sparse_coded_and_named(minilm_dir: Path) -> None:
    weights = _minilm_bf16(minilm_dir)
    raw = _bits(weights)
    info = _info(weights, "BF16")
    prune = codec_from_name("prune")
    assert prune == MagnitudePruneCodec(0.5) and not prune.lossless
    pipeline = prefer_sparse(Pipeline((MagnitudePruneCodec(0.9), FloatEntropyCodec())), raw, "BF16")
    assert [c.codec_id for c in pipeline.codecs] == ["prune-magnitude.v1", "sparse-bitmap.v1"]
    assert not pipeline.lossless
    encoded = pipeline.encode(raw, info)
    decoded = bytes(pipeline.decode(encoded, info))
    assert decoded == MagnitudePruneCodec(0.9).encode(raw, info)
    assert len(encoded) <= 0.12 * len(raw)
    original, pruned = weights.float(), torch.frombuffer(bytearray(decoded), dtype=torch.bfloat16).float()
    relative_error = float((pruned.view(-1) - original.view(-1)).norm() / original.norm())
    assert 0.3 < relative_error < 0.8  # 90 % of the weights went: a real, bounded error


def test_prefer_sparse_only_where_zeros_abound(minilm_dir: Path) -> None:
    weights = _minilm_bf16(minilm_dir)
    lossless = Pipeline((FloatEntropyCodec(),))
    assert prefer_sparse(lossless, _bits(weights), "BF16") is lossless  # trained weights: no exact zeros
    weights.view(-1)[::5] = 0.0  # 20 %
    chosen = prefer_sparse(lossless, _bits(weights), "BF16")
    assert chosen.codecs == (SparseBitmapCodec(),)
    quantized = Pipeline((Int8ChannelCodec(), FloatEntropyCodec()))
    assert prefer_sparse(quantized, _bits(weights), "BF16") is quantized  # the zeros of the input say nothing


# ---------------------------------------------------------------- through push and pull


def test_push_picks_sparse_for_a_sparse_tensor_and_pulls_bit_exact(minilm_bf16_dir: Path, tmp_path: Path) -> None:
    model = tmp_path / "model"
    shutil.copytree(minilm_bf16_dir, model)
    tensors = load_file(str(model / "model.safetensors"))
    flat = tensors[MINILM_WEIGHT].view(-1)
    generator = torch.Generator().manual_seed(2)
    flat[torch.randperm(flat.numel(), generator=generator)[: flat.numel() * 9 // 10]] = 0.0
    save_file(tensors, str(model / "model.safetensors"), metadata={"format": "pt"})

    store = LocalStore(tmp_path / "store")
    report = shardstore.push(model, "sparse:v1", store=store)
    figures = report.per_tensor[MINILM_WEIGHT]
    assert figures["codec"] == "sparse-bitmap.v1" and figures["ratio"] <= 0.12
    assert report.per_tensor["encoder.layer.0.output.dense.weight"]["codec"] == "float-entropy.v1"  # dense stays
    shardstore.pull("sparse:v1", tmp_path / "out", store=store)
    assert tree_snapshot(tmp_path / "out") == tree_snapshot(model)


def test_prune_through_lossy_push_reports_sparsity_and_error(minilm_dir: Path, tmp_path: Path) -> None:
    env = {**os.environ, "SHARDSTORE_STORE": str(tmp_path / "store")}
    pattern = "*.intermediate.dense.weight=prune:0.9"
    pushed = subprocess.run([sys.executable, "-m", "shardstore", "push", str(minilm_dir), "pruned:v1", "--lossy",
                             pattern, "--json"], capture_output=True, text=True, env=env, timeout=300)
    assert pushed.returncode == 0, pushed.stderr
    figures = json.loads(pushed.stdout)["per_tensor"][MINILM_WEIGHT]
    assert figures["codec"] == "prune-magnitude.v1+sparse-bitmap.v1" and figures["pruned"] == 0.9
    assert figures["ratio"] < 0.2
    assert 0.2 < figures["quality"]["rel_rmse"] < 0.8  # 90 % of the weights went: a real, reported error
    with shardstore.open("pruned:v1", store=str(tmp_path / "store")) as view:
        pruned = view.get_tensor(MINILM_WEIGHT)
        untouched = view.get_tensor("encoder.layer.0.output.dense.weight")
    original = load_file(str(minilm_dir / "model.safetensors"))
    assert int((pruned == 0).sum()) == pruned.numel() * 9 // 10
    kept = pruned != 0
    assert torch.equal(pruned[kept], original[MINILM_WEIGHT][kept])
    assert torch.equal(untouched, original["encoder.layer.0.output.dense.weight"])


def write_missing_sparse_fixtures(folder: Path = SPARSE_GOLDEN) -> list[str]:
    """Add the sparse-mode fixtures ``folder`` lacks, append-only (``FixtureWriter``); returns those written."""
    writer = FixtureWriter(folder)
    raw, info = _sparse_sample()
    written = []
    for codec in (SparseBitmapCodec(), SparseBitmapCodec(256)):
        name = f"{codec.codec_id}-{codec.block_elems}-BF16.bin"
        if not writer.exists(name):
            writer.add(codec, raw, info, name)
            written.append(name)
    return written


def test_sparse_fixture_generator_rewrites_nothing(tmp_path: Path) -> None:
    shutil.copytree(SPARSE_GOLDEN, tmp_path / "sparse")
    assert write_missing_sparse_fixtures(tmp_path / "sparse") == []
    for path in SPARSE_GOLDEN.iterdir():
        assert (tmp_path / "sparse" / path.name).read_bytes() == path.read_bytes()


if __name__ == "__main__":
    print(write_missing_sparse_fixtures())
