"""load_into: the loaded tensors become the module's (assign semantics), meta-device modules included."""

from __future__ import annotations

from itertools import chain
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import shardstore
from load.load_helpers import REF, Pushed
from shardstore.errors import InvalidInputError
from shardstore.rpc.background import BackgroundServer
from shardstore.store import LocalStore


class Net(nn.Module):
    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(4))
        self.norm = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.relu(layer(x))
        return self.norm(x)


@pytest.fixture
def net_store(tmp_path: Path) -> tuple[LocalStore, Net]:
    torch.manual_seed(0)
    original = Net()
    folder = tmp_path / "net"
    folder.mkdir()
    save_file(original.state_dict(), str(folder / "model.safetensors"))
    store = LocalStore(tmp_path / "store")
    shardstore.push(folder, "net:v1", store=store)
    return store, original


def test_a_meta_module_gets_the_loaded_tensors_as_its_own(net_store: tuple[LocalStore, Net]) -> None:
    store, original = net_store
    with torch.device("meta"):
        net = Net()
    assert net.layers[0].weight.is_meta
    with shardstore.open("net:v1", store=store) as view:
        result = view.load_into(net)
    for name, tensor in net.state_dict().items():
        assert tensor.device.type == "cpu" and torch.equal(tensor, original.state_dict()[name]), name
        # assign: the module holds the very tensor that was loaded, not a copy of it
        assert tensor.data_ptr() == result.tensors[name].data_ptr(), name
    assert isinstance(net.layers[0].weight, nn.Parameter)
    x = torch.randn(3, 64)
    assert torch.equal(net(x), original(x))
    assert result.missing == [] and result.unexpected == []


def test_a_module_on_a_device_is_loaded_where_it_is(net_store: tuple[LocalStore, Net]) -> None:
    store, original = net_store
    torch.manual_seed(1)
    net = Net()
    result = shardstore.load_into(net, "net:v1", store=store)
    assert result.stats.bytes_by_device == {"cpu": sum(t.nbytes for t in original.state_dict().values())}
    assert all(torch.equal(t, original.state_dict()[n]) for n, t in net.state_dict().items())


def test_a_device_map_may_leave_layers_on_meta_for_planning(net_store: tuple[LocalStore, Net]) -> None:
    store, original = net_store
    with torch.device("meta"):
        net = Net()
    result = shardstore.load_into(net, "net:v1", store=store, device_map={"layers.0": "cpu", "": "meta"})
    assert torch.equal(net.layers[0].weight, original.layers[0].weight)
    assert net.layers[1].weight.is_meta and net.norm.weight.is_meta
    assert set(result.stats.bytes_by_device) == {"cpu", "meta"}


def test_names_are_checked_before_anything_is_fetched(net_store: tuple[LocalStore, Net]) -> None:
    store, _original = net_store
    with torch.device("meta"):
        other = nn.ModuleDict({"layers": nn.ModuleList(nn.Linear(64, 64) for _ in range(2)), "head": nn.Linear(64, 2)})
    with shardstore.open("net:v1", store=store) as view:
        opened = view.source.transferred_bytes
        with pytest.raises(InvalidInputError) as info:
            view.load_into(other)
        assert view.source.transferred_bytes == opened
        message = str(info.value)
        assert "\n" not in message and "head.weight" in message and "layers.2.weight" in message

        result = view.load_into(other, strict=False, device="cpu")
    assert result.missing == ["head.weight", "head.bias"]
    assert "norm.weight" in result.unexpected and set(result.tensors) == {f"layers.{i}.{p}" for i in range(2)
                                                                         for p in ("weight", "bias")}
    assert other["head"].weight.is_meta and not other["layers"][0].weight.is_meta


def test_a_shape_mismatch_is_one_line(net_store: tuple[LocalStore, Net]) -> None:
    store, _original = net_store
    with pytest.raises(InvalidInputError) as info:
        shardstore.load_into(Net(width=32), "net:v1", store=store)
    assert "\n" not in str(info.value) and "size mismatch" in str(info.value)


def test_a_transformers_model_built_on_meta_is_left_with_nothing_on_meta(minilm_fine: Pushed,
                                                                         minilm_dir: Path) -> None:
    from transformers import BertConfig, BertModel

    config = BertConfig.from_pretrained(str(minilm_dir))
    with torch.device("meta"):
        bert = BertModel(config, add_pooling_layer=True)
    assert bert.embeddings.position_ids.is_meta and bert.embeddings.token_type_ids.is_meta
    result = shardstore.load_into(bert, REF, store=minilm_fine.store)  # strict: nothing may stay on meta
    # The old checkpoint saved position_ids; today's BertModel makes it a non-persistent buffer, which
    # transformers' own initialisation fills (token_type_ids is in no checkpoint at all).
    assert result.unexpected == [] and result.missing == [] and result.still_meta == []
    assert [n for n, t in chain(bert.named_parameters(), bert.named_buffers()) if t.is_meta] == []
    reference = BertModel.from_pretrained(str(minilm_dir))
    for name, buffer in reference.named_buffers():
        assert torch.equal(bert.get_buffer(name), buffer), name
    ids = torch.tensor([[101, 7592, 2088, 102]])
    with torch.no_grad():
        got, expected = bert.eval()(ids).last_hidden_state, reference(ids).last_hidden_state
    assert torch.isfinite(got).all() and torch.equal(got, expected)


def test_a_plain_module_gets_a_non_persistent_buffer_from_the_checkpoint(tmp_path: Path) -> None:
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(8, 8)
            self.register_buffer("scale", torch.arange(8.0), persistent=False)

    torch.manual_seed(0)
    original = Scaled()
    folder = tmp_path / "scaled"
    folder.mkdir()
    save_file({**original.state_dict(), "scale": original.scale}, str(folder / "model.safetensors"))
    store = LocalStore(tmp_path / "store")
    shardstore.push(folder, "scaled:v1", store=store)
    with torch.device("meta"):
        module = Scaled()
    result = shardstore.load_into(module, "scaled:v1", store=store)
    assert not module.scale.is_meta and torch.equal(module.scale, torch.arange(8.0))
    assert result.unexpected == [] and result.still_meta == []


def test_strict_load_names_what_stays_on_meta_before_fetching(net_store: tuple[LocalStore, Net]) -> None:
    store, _original = net_store
    with torch.device("meta"):
        net = Net()
        net.register_buffer("scale", torch.ones(64), persistent=False)  # in no checkpoint
    with shardstore.open("net:v1", store=store) as view:
        opened = view.source.transferred_bytes
        with pytest.raises(InvalidInputError) as info:
            view.load_into(net)
        assert view.source.transferred_bytes == opened
    message = str(info.value)
    assert "\n" not in message and message.startswith("net:v1 into Net: scale on the meta device and in no checkpoint")
    assert net.layers[0].weight.is_meta  # nothing was loaded


def test_load_into_a_transformers_model_over_grpc(fine_server: BackgroundServer, minilm_fine: Pushed,
                                                  minilm_dir: Path) -> None:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    bert = BertModel(BertConfig.from_pretrained(str(minilm_dir)))  # random weights
    result = shardstore.load_into(bert, f"grpc://{fine_server.address}/{REF}", threads=2, strict=False)
    assert result.unexpected == [] and result.missing == []
    state = bert.state_dict()
    assert all(torch.equal(state[n], t) for n, t in minilm_fine.originals.items() if n in state)
    assert result.raw_bytes == minilm_fine.raw_bytes - sum(
        t.nbytes for n, t in minilm_fine.originals.items() if n not in state)
