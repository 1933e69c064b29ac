"""Cooperative loading: 4 gloo ranks (real processes) load MiniLM over gRPC, each shard fetched once by the group."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from helpers import free_port

import shardstore
from shardstore.repo.repository import Repository
from shardstore.rpc.background import BackgroundServer
from shardstore.store import LocalStore

WORLD = 4
WORKER = Path(__file__).with_name("coop_worker.py")


def test_four_gloo_ranks_fetch_each_shard_once_and_get_every_tensor(minilm_dir: Path, tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    pushed = shardstore.push(minilm_dir, "minilm:v1", store=store)
    shards = Repository(store).get_manifest(pushed.manifest_id).shards
    # One server per phase, so each one's counters say what that phase cost.
    with BackgroundServer(store) as plain_server, BackgroundServer(store) as tp_server:
        port = free_port()
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        workers = [
            subprocess.Popen([sys.executable, str(WORKER), str(rank), str(WORLD), str(port),
                              str(tmp_path / f"rank{rank}.json"), str(minilm_dir / "model.safetensors"),
                              f"grpc://{plain_server.address}/minilm:v1", f"grpc://{tp_server.address}/minilm:v1",
                              str(tmp_path / "caches")], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            for rank in range(WORLD)
        ]
        outputs = [w.communicate(timeout=180)[0].decode(errors="replace") for w in workers]
        assert [w.returncode for w in workers] == [0] * WORLD, "\n".join(o[-3000:] for o in outputs)
        results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(WORLD)]

        # Every rank holds every tensor, equal to the original, and its own tensor-parallel part of each.
        assert all(r["plain_equal"] for r in results)
        assert all(r["tp_equal"] for r in results)
        assert all(r["tp_split"] > 0 for r in results)
        # The registry sent each shard once in total, not once per rank.
        for server in (plain_server, tp_server):
            assert server.servicer.sent_shard_bytes == pushed.stored_bytes
            assert server.servicer.cache.misses == len(shards)
        assert sum(r["plain_fetched_shards"] for r in results) == len(shards)
        assert sum(r["tp_fetched_shards"] for r in results) == len(shards)
        assert sum(r["plain"]["shards_owned"] for r in results) == len(shards)
        # The work was shared: every rank fetched some shards and received what the others decoded.
        assert all(0 < r["plain"]["shards_owned"] < len(shards) for r in results)
        assert sum(r["plain"]["sent_bytes"] for r in results) == sum(r["plain"]["received_bytes"] for r in results)
        assert all(r["plain"]["received_bytes"] > 0 for r in results)
