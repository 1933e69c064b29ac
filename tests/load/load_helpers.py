"""Helpers for the loading tests (``tests/load`` is a package so that tests and its conftest can import this)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

import shardstore
from shardstore.store import LocalStore

# 64 KiB pieces: a 384x384 F32 matrix is 9 pieces, so a rank of 3 needs about a third of them.
FINE_CHUNK = 64 << 10
REF = "minilm:v1"


@dataclass(frozen=True)
class Pushed:
    store: LocalStore
    path: Path
    originals: dict[str, torch.Tensor]

    @property
    def stored_bytes(self) -> int:
        with shardstore.open(REF, store=self.store) as view:
            return view.manifest.stored_bytes

    @property
    def raw_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.originals.values())
