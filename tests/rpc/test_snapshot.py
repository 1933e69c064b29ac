"""shardstore.snapshot over gRPC: a folder sentence-transformers reads, written once, and free the second time."""

from __future__ import annotations

from pathlib import Path

import torch

import shardstore
from rpc.grpc_helpers import Served
from shardstore.api import snapshot_report

SENTENCES = ["A man is eating food.", "Ein Satz auf Deutsch, mit Umlauten: Größe, Übung.", "Weights, once."]


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_sentence_transformers_reads_the_snapshot_and_a_second_call_moves_nothing(
        minilm_served: Served, minilm_dir: Path, shard_cache_dir: Path) -> None:
    from sentence_transformers import SentenceTransformer

    url = minilm_served.url("minilm:v1")
    path = shardstore.snapshot(url)
    assert path.is_absolute() and path.parent == shard_cache_dir / "snapshots"
    assert path.name == minilm_served.push.manifest_id
    assert _files(path) == _files(minilm_dir)  # every file byte for byte: weights, config, tokenizer, pooling
    expected = SentenceTransformer(str(minilm_dir), device="cpu").encode(SENTENCES, convert_to_tensor=True)
    got = SentenceTransformer(str(path), device="cpu").encode(SENTENCES, convert_to_tensor=True)
    assert torch.equal(got, expected)

    weights = path / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    sent = minilm_served.server.servicer.sent_bytes
    again = snapshot_report(url)
    assert again.path == str(path) and again.reused and again.written_bytes == 0
    assert minilm_served.server.servicer.sent_bytes == sent  # the server sent no object: no blob, no shard
    assert 0 < again.transferred_bytes < 200  # only the ref's answer (a manifest id): tags move, so it is asked
    assert weights.stat().st_mtime_ns == stamp
    assert shardstore.snapshot(url) == path


def test_pull_no_weights_fetches_no_shard(minilm_served: Served, minilm_dir: Path, tmp_path: Path) -> None:
    sent = minilm_served.server.servicer.sent_bytes
    report = shardstore.pull(minilm_served.url("minilm:v1"), tmp_path / "files", weights=False)
    others = {k: v for k, v in _files(minilm_dir).items() if not k.endswith(".safetensors")}
    assert _files(tmp_path / "files") == others
    assert report.tensors == 0 and report.shards_fetched == 0 and report.raw_bytes == 0
    assert minilm_served.server.servicer.sent_bytes - sent == sum(len(v) for v in others.values())
