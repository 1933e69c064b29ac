"""The one read path: a slice or a tensor-parallel cut reads exactly the pieces row arithmetic names.

The expectations are computed here from the chunk size (rows per piece = chunk bytes / row
bytes), never with ``TensorRecord.pieces_for_rows``, which is what is being tested.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import shardstore
from shardstore.errors import IntegrityError
from shardstore.load.loader import LoadOptions
from shardstore.rpc.background import BackgroundServer
from shardstore.store import LocalStore

ROWS, COLS = 1024, 64
ROW_BYTES = COLS * 4  # F32
ROWS_PER_PIECE = 256
REF = "rows:v1"


@pytest.fixture(scope="module")
def pushed(tmp_path_factory: pytest.TempPathFactory) -> tuple[LocalStore, torch.Tensor]:
    root = tmp_path_factory.mktemp("read_path")
    weight = torch.randn(ROWS, COLS, generator=torch.Generator().manual_seed(7))
    save_file({"w": weight}, str(root / "m.safetensors"))
    store = LocalStore(root / "store")
    shardstore.push(root / "m.safetensors", REF, store=store, chunk_bytes=ROWS_PER_PIECE * ROW_BYTES)
    return store, weight


@pytest.fixture(scope="module")
def server(pushed: tuple[LocalStore, torch.Tensor]) -> Iterator[BackgroundServer]:
    with BackgroundServer(pushed[0]) as running:
        yield running


def _pieces_by_arithmetic(start: int, stop: int) -> list[int]:
    return list(range(start // ROWS_PER_PIECE, (stop - 1) // ROWS_PER_PIECE + 1))


def _shard_bytes(view: shardstore.load.view.ModelView, indexes: list[int]) -> int:
    pieces = view.manifest.tensors["w"].pieces
    # The chunker cut where the arithmetic says, one piece per shard: the premise of every case below.
    assert [p.rows for p in pieces] == [(i, i + ROWS_PER_PIECE) for i in range(0, ROWS, ROWS_PER_PIECE)]
    assert len({p.shard for p in pieces}) == len(pieces)
    return sum(view.manifest.shards[pieces[i].shard] for i in indexes)


SLICES = [(256, 512), (256, 300), (200, 256), (255, 257), (0, ROWS), (768, ROWS)]


@pytest.mark.parametrize(("start", "stop"), SLICES)
def test_a_slice_reads_exactly_the_pieces_holding_its_rows(pushed: tuple[LocalStore, torch.Tensor], start: int,
                                                           stop: int) -> None:
    store, weight = pushed
    with shardstore.open(REF, store=store) as view:
        before = view.source.transferred_bytes
        rows = view.get_slice("w")[start:stop]
        assert torch.equal(rows, weight[start:stop])
        assert view.source.transferred_bytes - before == _shard_bytes(view, _pieces_by_arithmetic(start, stop))


@pytest.mark.parametrize(("start", "stop"), SLICES)
def test_a_slice_over_grpc_fetches_exactly_those_shards(pushed: tuple[LocalStore, torch.Tensor],
                                                        server: BackgroundServer, tmp_path: Path, start: int,
                                                        stop: int) -> None:
    _store, weight = pushed
    sent_before = server.servicer.sent_bytes
    with shardstore.open(f"grpc://{server.address}/{REF}", cache=tmp_path / "cache") as view:
        rows = view.get_slice("w")[start:stop]
        expected = _pieces_by_arithmetic(start, stop)
        assert torch.equal(rows, weight[start:stop])
        assert server.servicer.sent_bytes - sent_before == _shard_bytes(view, expected)


@pytest.mark.parametrize(("tp_size", "rank", "rows"), [
    (4, 0, (0, 256)), (4, 1, (256, 512)), (4, 3, (768, 1024)),  # cuts on piece boundaries: one piece each
    (3, 1, (342, 683)),  # 1024 = 342 + 341 + 341, as torch.tensor_split cuts: pieces 1 and 2
])
def test_a_tensor_parallel_cut_reads_exactly_its_pieces(pushed: tuple[LocalStore, torch.Tensor], tp_size: int,
                                                        rank: int, rows: tuple[int, int]) -> None:
    store, weight = pushed
    with shardstore.open(REF, store=store) as view:
        result = view.load(LoadOptions(tp_rank=rank, tp_size=tp_size, tp_plan={"*": 0}))
        expected = _pieces_by_arithmetic(*rows)
        assert torch.equal(result.tensors["w"], weight[rows[0] : rows[1]])
        assert result.stats.pieces == len(expected)
        assert result.fetched_bytes == _shard_bytes(view, expected)


def test_write_behind_cache_is_complete_after_a_pull_and_a_corrupt_entry_is_fetched_again(
        pushed: tuple[LocalStore, torch.Tensor], server: BackgroundServer, tmp_path: Path) -> None:
    url = f"grpc://{server.address}/{REF}"
    cache = tmp_path / "cache"
    first = shardstore.pull(url, tmp_path / "a", cache=cache)
    entries = sorted(p for p in (cache / "shards").rglob("*") if p.is_file())
    assert first.shards_fetched == ROWS // ROWS_PER_PIECE and len(entries) == first.shards_fetched
    again = shardstore.pull(url, tmp_path / "b", cache=cache)
    assert (again.shards_fetched, again.shards_cached) == (0, first.shards_fetched)
    damaged = bytearray(entries[0].read_bytes())
    damaged[len(damaged) // 2] ^= 0x40
    entries[0].write_bytes(bytes(damaged))
    third = shardstore.pull(url, tmp_path / "c", cache=cache)
    assert (third.shards_fetched, third.shards_cached) == (1, first.shards_fetched - 1)
    original = (tmp_path / "a" / "m.safetensors").read_bytes()
    assert (tmp_path / "c" / "m.safetensors").read_bytes() == original
    assert entries[0].read_bytes() != bytes(damaged)  # the entry was replaced by the verified copy


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_damaged_local_shard_is_refused_by_every_reader_and_the_read_buffers_stay_clean(
        pushed: tuple[LocalStore, torch.Tensor], tmp_path: Path, damage: str) -> None:
    # Local shards are read into reused buffers and hashed part by part (shardstore.buffers): a
    # damaged shard must still fail the id check, name itself, and leave nothing behind in the pool.
    store, weight = pushed
    with shardstore.open(REF, store=store) as view:
        shard_id = view.manifest.tensors["w"].pieces[2].shard
    path = store.root / "shards" / shard_id[:2] / shard_id
    original = path.read_bytes()
    damaged = bytearray(original)
    if damage == "flip":
        damaged[len(damaged) - 5] ^= 0x01
    else:
        del damaged[len(damaged) // 2 :]
    path.write_bytes(bytes(damaged))
    # The id check refuses it, before any decoding (a stream checksum would name it differently).
    refused = f"shard {shard_id}: content does not match its id"
    try:
        with shardstore.open(REF, store=store) as view, pytest.raises(IntegrityError, match=refused):
            view.state_dict()
        with pytest.raises(IntegrityError, match=refused):
            shardstore.pull(REF, tmp_path / "out", store=store)
    finally:
        path.write_bytes(original)
    with shardstore.open(REF, store=store) as view:
        assert torch.equal(view.state_dict()["w"], weight)
