"""Device maps: accelerate-style prefix maps, "auto" and "balanced" over max_memory, in layer order."""

from __future__ import annotations

import pytest
import torch

import shardstore
from load.load_helpers import REF, Pushed
from shardstore.errors import InvalidInputError
from shardstore.load import LoadOptions
from shardstore.load.device_map import natural_key, normalize_device, plan_device_map, resolve_device_map

MIB = 1 << 20


def _sizes(blocks: dict[str, int]) -> tuple[list[str], dict[str, int]]:
    """One tensor per layer, named like a transformer's."""
    names = [f"{block}.weight" for block in blocks]
    return names, {f"{block}.weight": size for block, size in blocks.items()}


def test_prefix_map_takes_the_longest_dotted_prefix() -> None:
    device_map = {"": "meta", "encoder": "cpu", "encoder.layer.1": "meta"}
    names = ["embeddings.weight", "encoder.layer.1.q.weight", "encoder.layer.10.q.weight", "encoder.layer.1"]
    assert resolve_device_map(device_map, names) == {
        "embeddings.weight": "meta",
        "encoder.layer.1.q.weight": "meta",
        "encoder.layer.10.q.weight": "cpu",  # "encoder.layer.1" is not a dotted parent of layer.10
        "encoder.layer.1": "meta",
    }


def test_prefix_map_without_an_entry_names_the_tensor() -> None:
    with pytest.raises(InvalidInputError, match=r"'pooler.dense.weight'"):
        resolve_device_map({"encoder": "cpu"}, ["encoder.a", "pooler.dense.weight"])


def test_auto_fills_each_device_up_to_its_budget_in_layer_order() -> None:
    names, sizes = _sizes({f"layers.{i}": 10 * MIB for i in range(6)})
    plan = plan_device_map(names, sizes, "auto", {"meta": 100 * MIB, "cpu": 25 * MIB})
    # cpu first (fill order: cuda, cpu, meta whatever order max_memory lists them), two layers fit.
    assert plan == {"layers.0": "cpu", "layers.1": "cpu"} | {f"layers.{i}": "meta" for i in range(2, 6)}


def test_balanced_gives_each_device_an_equal_share() -> None:
    names, sizes = _sizes({f"layers.{i}": 10 * MIB for i in range(6)})
    plan = plan_device_map(names, sizes, "balanced", {"cpu": 1000 * MIB, "meta": 1000 * MIB})
    assert list(plan.values()) == ["cpu"] * 3 + ["meta"] * 3
    auto = plan_device_map(names, sizes, "auto", {"cpu": 1000 * MIB, "meta": 1000 * MIB})
    assert set(auto.values()) == {"cpu"}  # auto fills the first device while it has room


def test_balanced_still_respects_max_memory() -> None:
    names, sizes = _sizes({f"layers.{i}": 10 * MIB for i in range(6)})
    plan = plan_device_map(names, sizes, "balanced", {"cpu": 15 * MIB, "meta": 1000 * MIB})
    assert list(plan.values()) == ["cpu"] + ["meta"] * 5


def test_a_model_that_does_not_fit_names_the_first_layer_left_over() -> None:
    names, sizes = _sizes({f"layers.{i}": 10 * MIB for i in range(3)})
    with pytest.raises(InvalidInputError, match=r"layers\.1 .* and 1 more do not fit"):
        plan_device_map(names, sizes, "auto", {"cpu": 15 * MIB})


def test_layers_sort_naturally() -> None:
    names = ["layers.10.w", "layers.2.w", "embed.w", "layers.1.w"]
    assert sorted(names, key=natural_key) == ["embed.w", "layers.1.w", "layers.2.w", "layers.10.w"]


@pytest.mark.parametrize("bad", ["cuda:3", 3, "disk", "tpu:0", "gpu"])
def test_devices_that_do_not_exist_here_are_one_line_errors(bad: str | int) -> None:
    if torch.cuda.is_available() and bad in ("cuda:3", 3) and torch.cuda.device_count() > 3:
        pytest.skip("this machine has a cuda:3")
    with pytest.raises(InvalidInputError) as info:
        normalize_device(bad)
    assert "\n" not in str(info.value) and str(bad) in str(info.value)


def test_state_dict_follows_a_prefix_map(minilm_fine: Pushed) -> None:
    device_map = {"embeddings": "cpu", "encoder.layer.0": "cpu", "encoder": "meta", "pooler": "cpu"}
    with shardstore.open(REF, store=minilm_fine.store) as view:
        state = view.state_dict(device_map=device_map)
        moved = view.source.transferred_bytes
        meta_stored = sum(p.stored_bytes for n, t in view.manifest.tensors.items()
                          if n.startswith("encoder.layer.") and not n.startswith("encoder.layer.0.")
                          for p in t.pieces)
    assert list(state) == list(minilm_fine.originals)
    for name, tensor in state.items():
        original = minilm_fine.originals[name]
        if name.startswith("encoder.") and not name.startswith("encoder.layer.0."):
            assert tensor.is_meta and tensor.shape == original.shape and tensor.dtype == original.dtype
        else:
            assert tensor.device.type == "cpu" and torch.equal(tensor, original), name
    # Nothing was fetched for the meta layers (their shards hold nothing of other layers).
    assert moved < view.manifest.stored_bytes - meta_stored + (1 << 20)


@pytest.mark.parametrize("strategy", ["auto", "balanced"])
def test_auto_and_balanced_over_max_memory_on_the_real_model(minilm_fine: Pushed, strategy: str) -> None:
    raw = minilm_fine.raw_bytes
    budget = {"cpu": 3 * raw // 4, "meta": raw}
    with shardstore.open(REF, store=minilm_fine.store) as view:
        result = view.load(LoadOptions(device_map=strategy, max_memory=budget))
    per_device = result.stats.bytes_by_device
    assert sum(per_device.values()) == raw
    assert per_device["cpu"] <= 3 * raw // 4
    # Layer order: every cpu tensor comes before every meta tensor in natural order.
    order = sorted(result.tensors, key=natural_key)
    devices = [result.tensors[n].device.type for n in order]
    assert devices == sorted(devices, key=["cpu", "meta"].index)
    assert "cpu" in devices and "meta" in devices
    for name in order:
        if result.tensors[name].device.type == "cpu":
            assert torch.equal(result.tensors[name], minilm_fine.originals[name]), name
    if strategy == "balanced":  # about half each (a layer of slack)
        assert abs(per_device["cpu"] - per_device["meta"]) < 0.1 * raw
    else:  # the cpu is filled to within a layer of its budget
        assert per_device["cpu"] > 3 * raw // 4 - 0.1 * raw


def test_device_and_device_map_together_are_refused(minilm_fine: Pushed) -> None:
    with shardstore.open(REF, store=minilm_fine.store) as view, pytest.raises(InvalidInputError, match="not both"):
        view.state_dict("cpu", device_map="auto")
