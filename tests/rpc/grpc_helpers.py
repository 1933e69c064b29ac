"""Helpers for the gRPC tests (``tests/rpc`` is a package so that its conftest can import this)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from shardstore.repo.push import PushReport
from shardstore.rpc.background import BackgroundServer
from shardstore.store import LocalStore


@dataclass
class Served:
    server: BackgroundServer
    store: LocalStore
    push: PushReport

    def url(self, ref: str) -> str:
        return f"grpc://{self.server.address}/{ref}"


def write_small_model(folder: Path, seed: int = 0) -> Path:
    """A small safetensors model that chunk_bytes=64KiB cuts into several shards."""
    generator = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"layers.{i}.weight": torch.randn(256, 128, generator=generator) for i in range(4)}
    tensors["head.bias"] = torch.randn(128, generator=generator)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text('{"layers": 4}\n')
    return folder


SMALL_CHUNK = 64 << 10


def push_small_model(root: Path) -> tuple[LocalStore, Path]:
    """A store under ``root`` holding :func:`write_small_model` as ``small:v1`` in several shards, and the model."""
    import shardstore

    model = write_small_model(root / "small")
    store = LocalStore(root / "store")
    shardstore.push(model, "small:v1", store=store, chunk_bytes=SMALL_CHUNK)
    return store, model
