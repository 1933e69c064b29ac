"""Tensor-parallel slices of the real MiniLM: ranks concatenate to the model; a rank fetches about its share."""

from __future__ import annotations

from itertools import pairwise

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import shardstore
from load.load_helpers import REF, Pushed
from shardstore.errors import InvalidInputError
from shardstore.load import LoadOptions
from shardstore.load.tensor_parallel import rank_range, split_dim

COLUMNS = {"*.bias": None, "*LayerNorm*": None, "*": 1}


@given(size=st.integers(0, 10_000), tp_size=st.integers(1, 64))
def test_rank_ranges_tile_the_dim_as_tensor_split_does(size: int, tp_size: int) -> None:
    ranges = [rank_range(size, rank, tp_size) for rank in range(tp_size)]
    expected = [len(part) for part in torch.tensor_split(torch.empty(size), tp_size)]
    assert [stop - start for start, stop in ranges] == expected
    assert ranges[0][0] == 0 and ranges[-1][1] == size
    assert all(a[1] == b[0] for a, b in pairwise(ranges))


def test_first_matching_pattern_wins() -> None:
    plan = {"*.query.weight": 1, "*.bias": None, "*": 0}
    assert split_dim("encoder.layer.0.attention.self.query.weight", plan) == 1
    assert split_dim("encoder.layer.0.attention.self.query.bias", plan) is None
    assert split_dim("pooler.dense.weight", plan) == 0
    assert split_dim("anything", {"*.weight": 0}) is None  # no match: replicated


@pytest.mark.parametrize("tp_size", [2, 3, 4])
def test_row_slices_of_every_rank_concatenate_to_the_model(minilm_fine: Pushed, tp_size: int) -> None:
    with shardstore.open(REF, store=minilm_fine.store) as view:
        ranks = [view.state_dict(tp_rank=rank, tp_size=tp_size, tp_plan={"*": 0}) for rank in range(tp_size)]
    for name, original in minilm_fine.originals.items():
        parts = [rank[name] for rank in ranks]
        if original.dim() == 0:
            assert all(torch.equal(p, original) for p in parts), name
            continue
        expected = torch.tensor_split(original, tp_size, dim=0)
        assert all(torch.equal(p, e) for p, e in zip(parts, expected, strict=True)), name
        assert torch.equal(torch.cat(parts, 0), original), name


@pytest.mark.parametrize("tp_size", [2, 3])
def test_column_slices_concatenate_and_the_rest_is_replicated(minilm_fine: Pushed, tp_size: int) -> None:
    with shardstore.open(REF, store=minilm_fine.store) as view:
        ranks = [view.state_dict(tp_rank=rank, tp_size=tp_size, tp_plan=COLUMNS) for rank in range(tp_size)]
    split = 0
    for name, original in minilm_fine.originals.items():
        parts = [rank[name] for rank in ranks]
        if split_dim(name, COLUMNS) == 1 and original.dim() >= 2:
            split += 1
            assert parts[0].shape[1] == -(-original.shape[1] // tp_size)
            assert torch.equal(torch.cat(parts, 1), original), name
        else:  # biases, LayerNorm, and anything without a dim 1 (position_ids has one: it is [1, 512])
            assert all(torch.equal(p, original) for p in parts), name
    assert split > 30


def test_a_row_rank_fetches_about_its_share(minilm_fine: Pushed) -> None:
    tp_size = 4
    stored = minilm_fine.stored_bytes
    fetched = []
    for rank in range(tp_size):
        with shardstore.open(REF, store=minilm_fine.store) as view:
            manifest_bytes = view.source.transferred_bytes
            result = view.load(LoadOptions(tp_rank=rank, tp_size=tp_size, tp_plan={"*": 0}))
            expected_pieces = sum(
                len(record.pieces_for_rows(*rank_range(record.rows, rank, tp_size)) if record.shape else record.pieces)
                for record in view.manifest.tensors.values()
            )
        assert result.fetched_bytes == view.source.transferred_bytes - manifest_bytes
        assert result.stats.pieces == expected_pieces  # only the pieces holding the rank's rows are decoded
        assert result.raw_bytes == pytest.approx(minilm_fine.raw_bytes / tp_size, rel=0.01)
        fetched.append(result.fetched_bytes)
    share = stored / tp_size
    # Each rank also reads the pieces its row range cuts through and the packed small tensors: a few % more.
    assert all(0.9 * share < f < 1.15 * share for f in fetched), (fetched, share)
    assert sum(fetched) >= stored


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"tp_rank": 4, "tp_size": 4}, "tp_rank"),
    ({"tp_rank": 0, "tp_size": 0}, "tp_size"),
    ({"tp_rank": 0}, "both"),
    ({"tp_plan": {"*": 0}}, "tp_plan needs"),
    ({"tp_rank": 0, "tp_size": 2, "tp_plan": {"*": 2}}, "0, 1 or None"),
])
def test_bad_tensor_parallel_arguments_are_one_line_errors(minilm_fine: Pushed, kwargs: dict[str, object],
                                                           message: str) -> None:
    with shardstore.open(REF, store=minilm_fine.store) as view, pytest.raises(InvalidInputError, match=message):
        view.state_dict(**kwargs)  # type: ignore[arg-type]
