"""Every registered codec id, fuzzed: a mutated stream decodes to exactly the declared size or is one CodecError.

Run plain by the suite, and by ``scripts/sanitize.sh`` against a build of the C kernels with
AddressSanitizer and UndefinedBehaviorSanitizer, where an out-of-bounds read or write, or undefined
behaviour, in ``_entropy.c`` / ``_quantize.c`` stops the run even when the output looks right.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from format.test_fuzz import FUZZ, bounded, byte_mutation
from hypothesis import given
from hypothesis import strategies as st

from shardstore.codecs.base import PieceInfo
from shardstore.codecs.registry import codec_ids, get_codec
from shardstore.errors import CodecError

# Codec ids with the configs that exercise their C kernels (small blocks: many block boundaries).
CONFIGS: dict[str, dict[str, Any]] = {
    "raw.v1": {},
    "byteplanes-zstd.v1": {"level": 3},
    "float-entropy.v1": {"block_elems": 64},
    "fp8-channel.v1": {},
    "int8-channel.v1": {},
    "intn-group.v1": {},
    "prune-magnitude.v1": {},
    "sparse-bitmap.v1": {},
    "xor-delta.v1": {},  # applied against a base model only: its decoder gets arbitrary bytes
}
SHAPES = [(8, 64), (3, 17), (1, 1)]


def test_every_registered_codec_is_fuzzed() -> None:
    assert set(CONFIGS) == set(codec_ids())


def _encoded(codec_id: str, shape: tuple[int, int], seed: int) -> tuple[Any, bytes, PieceInfo]:
    codec = get_codec({"id": codec_id, **CONFIGS[codec_id]})
    info = PieceInfo("F32", shape)
    values = np.random.default_rng(seed).standard_normal(shape[0] * shape[1]).astype(np.float32)
    values[:: max(1, len(values) // 7)] = 0.0  # zeros and runs: the sparse and entropy paths
    try:
        return codec, codec.encode(values.tobytes(), info), info
    except CodecError:  # xor-delta: no encoder outside a delta push
        return codec, np.random.default_rng(seed).integers(0, 256, 512, dtype=np.uint8).tobytes(), info


@pytest.mark.parametrize("codec_id", sorted(CONFIGS))
@FUZZ
@given(shape=st.sampled_from(SHAPES), seed=st.integers(0, 2**32 - 1), data=st.data())
def test_a_mutated_stream_decodes_to_the_declared_size_or_fails_cleanly(
    codec_id: str, shape: tuple[int, int], seed: int, data: st.DataObject
) -> None:
    codec, stream, info = _encoded(codec_id, shape, seed)
    mutated = data.draw(byte_mutation(stream) | st.just(stream))
    # Decode into a slice of a bigger buffer: bytes written past the piece would show in the guard.
    guard = 64
    buffer = bytearray(b"\xa5" * (info.nbytes + guard))
    out = bounded(lambda: codec.decode(mutated, info, memoryview(buffer)[: info.nbytes]))
    if out is not None:
        assert len(out) == info.nbytes
    assert buffer[info.nbytes:] == b"\xa5" * guard, "the decoder wrote past the declared size"
