"""Pull writes each shard's pieces that lie end to end in a file with one write, and the bytes stay right.

The expected writes are computed here from the safetensors header of the pushed file (where each
tensor's data starts) and the manifest's pieces (which rows of which tensor each shard holds):
plain offset arithmetic, not the sink's own grouping.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import shardstore
import shardstore.repo.read_path as read_path
from shardstore.direct_io import DirectWriter
from shardstore.repo import pieces
from shardstore.store import LocalStore

REF = "small:v1"
CHUNK = 64 << 10


def _tensors() -> dict[str, torch.Tensor]:
    """Many small tensors of uneven sizes (biases, norms, small matrices) and two larger than a chunk."""
    gen = torch.Generator().manual_seed(11)
    tensors: dict[str, torch.Tensor] = {}
    for layer in range(6):
        tensors[f"layer.{layer}.norm.weight"] = torch.randn(96, generator=gen).to(torch.bfloat16)
        tensors[f"layer.{layer}.proj.bias"] = torch.randn(130, generator=gen)
        tensors[f"layer.{layer}.proj.weight"] = torch.randn(40, 96, generator=gen).to(torch.bfloat16)
        tensors[f"layer.{layer}.up.weight"] = torch.randn(24, 100, generator=gen)
    tensors["embed.weight"] = torch.randn(700, 64, generator=gen)  # 175 KiB: several pieces
    tensors["head.weight"] = torch.randn(300, 96, generator=gen).to(torch.float16)
    return tensors


@pytest.fixture(scope="module")
def pushed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, LocalStore]:
    root = tmp_path_factory.mktemp("pull_writes")
    save_file(_tensors(), str(root / "model.safetensors"))
    store = LocalStore(root / "store")
    shardstore.push(root / "model.safetensors", REF, store=store, chunk_bytes=CHUNK)
    return root / "model.safetensors", store


@pytest.fixture
def writes(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[int, int]]]:
    """Every (offset, size) a pull hands its file writer, in call order (the write itself still happens)."""
    seen: list[tuple[int, int]] = []
    write_at = DirectWriter.write_at

    def recording(self: DirectWriter, view: memoryview, offset: int) -> None:
        seen.append((offset, len(view)))
        write_at(self, view, offset)

    monkeypatch.setattr(DirectWriter, "write_at", recording)
    yield seen


def _data_start(path: Path) -> dict[str, int]:
    """Each tensor's first data byte in ``path``, from its safetensors header."""
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    return {name: 8 + length + entry["data_offsets"][0] for name, entry in header.items() if name != "__metadata__"}


def _expected_writes(original: Path, store: LocalStore, limit: int) -> list[tuple[int, int]]:
    """Runs of pieces, shard by shard, that follow each other end to end, each at most ``limit`` bytes."""
    starts = _data_start(original)
    with shardstore.open(REF, store=store) as view:
        manifest = view.manifest
    by_shard: dict[str, list[tuple[int, int]]] = {}
    for name in starts:  # file order is the order pull reads tensors in
        record = manifest.tensors[name]
        row_bytes = record.raw_bytes // max(1, record.shape[0] if record.shape else 1)
        for piece in record.pieces:
            at = starts[name] + piece.rows[0] * row_bytes
            by_shard.setdefault(piece.shard, []).append((at, (piece.rows[1] - piece.rows[0]) * row_bytes))
    runs: list[tuple[int, int]] = []
    for spans in by_shard.values():
        run: tuple[int, int] | None = None
        for at, size in spans:
            if run is not None and run[0] + run[1] == at and run[1] + size <= limit:
                run = (run[0], run[1] + size)
                continue
            if run is not None:
                runs.append(run)
            run = (at, size)
        assert run is not None
        runs.append(run)
    return runs


@pytest.mark.parametrize("limit", [read_path.GATHER_BYTES, 8 << 10])
def test_pull_writes_a_shard_s_adjoining_pieces_at_once(pushed: tuple[Path, LocalStore], writes: list[tuple[int, int]],
                                                         tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         limit: int) -> None:
    original, store = pushed
    monkeypatch.setattr(read_path, "GATHER_BYTES", limit)
    expected = _expected_writes(original, store, limit)
    with shardstore.open(REF, store=store) as view:
        piece_count = sum(len(record.pieces) for record in view.manifest.tensors.values())
    # The premise: shards hold several small tensors, so gathering has something to gather.
    assert len(expected) < piece_count

    shardstore.pull(REF, tmp_path / "out", store=store, threads=2)

    assert (tmp_path / "out" / "model.safetensors").read_bytes() == original.read_bytes()
    data_writes = sorted(w for w in writes if w[0] >= min(_data_start(original).values()))
    assert data_writes == sorted(expected)


def test_a_piece_that_fails_to_decode_leaves_no_file_behind(pushed: tuple[Path, LocalStore], tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            writes: list[tuple[int, int]]) -> None:
    _original, store = pushed
    decode = pieces.decode_piece
    calls = 0

    def failing_third(*args: object, **kwargs: object) -> object:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise OSError(5, "Input/output error", "piece three")
        return decode(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr("shardstore.repo.read_path.decode_piece", failing_third)
    with pytest.raises(OSError, match="piece three"):
        shardstore.pull(REF, tmp_path / "out", store=store, threads=1)
    assert not [p for p in (tmp_path / "out").rglob("*") if p.is_file()]


@pytest.mark.parametrize("given_twice", [False, True])
def test_a_piece_entered_twice_is_written_alone_and_its_run_still_whole(tmp_path: Path, given_twice: bool) -> None:
    """The gatherer's own guard: a run is written only once each of its pieces is in, whatever the
    caller does (enters a piece twice, or also names it twice when it asks to gather)."""
    from shardstore.format.manifest import PieceRef, TensorRecord
    from shardstore.repo.read_path import FileSink, FileSpot, Placement

    path = tmp_path / "out.bin"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.ftruncate(fd, 12)
        writer = DirectWriter(fd, path)
        record = TensorRecord("U8", (3, 4), (), tuple(
            PieceRef("0" * 64, f"s{i}", (i, i + 1), 4) for i in range(3)))
        placement = Placement("t", record, "file")
        sink = FileSink({"t": FileSpot(writer, 0, path)})
        order = (0, 1, 0, 2) if given_twice else (0, 1, 2)
        target = sink.gather([(placement, record.pieces[i]) for i in order])
        entered = (0, 1, 0, 2) if given_twice else (0, 0, 1, 2)
        for index, fill in ((i, b"ABC"[i : i + 1] * 4) for i in entered):
            start, stop = placement.span(record.pieces[index])
            with target.target(placement, start, stop) as view:
                view[:] = fill
        writer.close()
    finally:
        os.close(fd)
    assert path.read_bytes() == b"AAAABBBBCCCC"
