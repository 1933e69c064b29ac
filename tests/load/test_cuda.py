"""On a GPU machine: tensors land on cuda:i, copies overlap decoding, host memory stays small.

Skipped cleanly where torch sees no CUDA device.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import shardstore
from load.load_helpers import REF, Pushed
from shardstore.load import LoadOptions
from shardstore.load.memory import PeakRss

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
]


def _layer(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[2]) if name.startswith("encoder.layer.") else None


def test_a_device_map_places_each_tensor_on_its_gpu(minilm_fine: Pushed) -> None:
    count = torch.cuda.device_count()
    device_map: dict[str, str | int] = {"": "cpu"} | {f"encoder.layer.{i}": i % count for i in range(6)}
    with shardstore.open(REF, store=minilm_fine.store) as view:
        state = view.state_dict(device_map=device_map)
    for name, tensor in state.items():
        layer = _layer(name)
        assert str(tensor.device) == ("cpu" if layer is None else f"cuda:{layer % count}"), name
        assert torch.equal(tensor.cpu(), minilm_fine.originals[name]), name


def test_auto_fills_the_gpu_then_the_host(minilm_fine: Pushed) -> None:
    budget = minilm_fine.raw_bytes // 4
    with shardstore.open(REF, store=minilm_fine.store) as view:
        result = view.load(LoadOptions(device_map="auto", max_memory={0: budget, "cpu": 4 * minilm_fine.raw_bytes}))
    assert 0 < result.stats.bytes_by_device["cuda:0"] <= budget
    on_gpu = [n for n, t in result.tensors.items() if t.is_cuda]
    assert on_gpu and all(torch.equal(result.tensors[n].cpu(), minilm_fine.originals[n]) for n in on_gpu)


def test_copies_to_the_gpu_overlap_decoding(minilm_fine: Pushed) -> None:
    with shardstore.open(REF, store=minilm_fine.store) as view:
        result = view.load(LoadOptions(device="cuda:0"), threads=2)
    stats = result.stats
    assert stats.copies == stats.pieces > 100  # one non-blocking copy per piece, as soon as it is decoded
    # Most copies were finished on the device while the host was still decoding later pieces.
    assert stats.copies_done_before_decode_end > stats.copies // 2
    assert all(t.device == torch.device("cuda:0") for t in result.tensors.values())
    assert all(torch.equal(result.tensors[n].cpu(), t) for n, t in minilm_fine.originals.items())


def test_a_tensor_parallel_rank_on_the_gpu_equals_its_host_slice(minilm_fine: Pushed) -> None:
    with shardstore.open(REF, store=minilm_fine.store) as view:
        plan = {"*.bias": None, "*": 1}
        on_gpu = view.state_dict("cuda:0", tp_rank=1, tp_size=3, tp_plan=plan)
        on_host = view.state_dict(tp_rank=1, tp_size=3, tp_plan=plan)
    assert all(torch.equal(on_gpu[n].cpu(), t) for n, t in on_host.items())


def test_load_into_a_module_on_the_gpu_goes_straight_there(minilm_fine: Pushed, minilm_dir: Path) -> None:
    from transformers import BertConfig, BertModel

    bert = BertModel(BertConfig.from_pretrained(str(minilm_dir))).to("cuda:0")
    with shardstore.open(REF, store=minilm_fine.store) as view:
        result = view.load_into(bert, strict=False)  # no device given: where the module's tensors are
    assert result.stats.bytes_by_device.keys() == {"cuda:0"} and result.stats.copies > 0
    state = bert.state_dict()
    assert all(state[n].is_cuda and torch.equal(state[n].cpu(), t)
               for n, t in minilm_fine.originals.items() if n in state)


def test_host_memory_while_loading_to_the_gpu_is_small(minilm_fine: Pushed) -> None:
    torch.empty(1, device="cuda:0")  # the CUDA context is not the loader's memory
    with shardstore.open(REF, store=minilm_fine.store) as view, PeakRss() as rss:
        state = view.state_dict("cuda:0")
    assert all(t.is_cuda for t in state.values())
    assert rss.growth < minilm_fine.raw_bytes // 2  # no host copy of the model: only pinned staging buffers
