"""Chunking: row-aligned pieces, small tensors of one layer packed, nothing of two layers in one shard."""

from __future__ import annotations

import itertools

from shardstore.repo.chunking import TensorSpec, layer_of, plan_shards, split_rows


def test_layer_of() -> None:
    assert layer_of("encoder.layer.3.attention.self.query.weight") == "encoder.layer.3"
    assert layer_of("model.layers.10.mlp.up_proj.weight") == "model.layers.10"
    assert layer_of("embeddings.word_embeddings.weight") == "embeddings.word_embeddings"
    assert layer_of("bias") == ""


def test_split_rows_is_row_aligned_and_covers_everything() -> None:
    tensor = TensorSpec("w", "F32", (1000, 256))  # 1 KiB rows
    pieces = split_rows(tensor, 64 << 10)
    assert pieces[0] == (0, 64)
    assert pieces[-1][1] == 1000
    assert all(a[1] == b[0] for a, b in itertools.pairwise(pieces))


def test_split_rows_edge_cases() -> None:
    assert split_rows(TensorSpec("s", "F32", ()), 1024) == [(0, 1)]
    assert split_rows(TensorSpec("e", "F32", (0, 5)), 1024) == [(0, 0)]
    assert split_rows(TensorSpec("z", "F32", (3, 0)), 1024) == [(0, 3)]
    assert split_rows(TensorSpec("big-row", "F32", (3, 1 << 20)), 1024) == [(0, 1), (1, 2), (2, 3)]


def test_vocabulary_extension_keeps_existing_piece_boundaries() -> None:
    before = split_rows(TensorSpec("emb", "BF16", (30000, 384)), 1 << 20)
    after = split_rows(TensorSpec("emb", "BF16", (30100, 384)), 1 << 20)
    assert after[: len(before) - 1] == before[:-1]


def test_packing_groups_small_tensors_by_layer() -> None:
    tensors = [
        TensorSpec("layer.0.a", "F32", (16,)),
        TensorSpec("layer.0.b", "F32", (16,)),
        TensorSpec("layer.1.a", "F32", (16,)),
        TensorSpec("layer.0.c", "F32", (16,)),
        TensorSpec("layer.1.big", "F32", (1024, 64)),
    ]
    shards = plan_shards(tensors, chunk_bytes=64 << 10)
    layers = [{layer_of(p.tensor.name) for p in shard} for shard in shards]
    assert all(len(group) == 1 for group in layers)
    names = [[p.tensor.name for p in shard] for shard in shards]
    assert names[0] == ["layer.0.a", "layer.0.b", "layer.0.c"]
    assert ["layer.1.a"] in names
    big = [s for s in shards if s[0].tensor.name == "layer.1.big"]
    assert len(big) == 4 and all(len(s) == 1 for s in big)
    assert plan_shards(tensors, 64 << 10) == shards  # deterministic
