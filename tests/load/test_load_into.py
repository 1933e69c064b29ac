"""load_into: the loaded tensors become the module's (assign semantics), meta-device modules included."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import shardstore
from load.load_helpers import REF, Pushed
from shardstore.errors import InvalidInputError
from shardstore.rpc.server import BackgroundServer
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


def test_buffers_no_checkpoint_holds_are_named(minilm_fine: Pushed, minilm_dir: Path) -> None:
    from transformers import BertConfig, BertModel

    config = BertConfig.from_pretrained(str(minilm_dir))
    with torch.device("meta"):
        bert = BertModel(config, add_pooling_layer=True)
    result = shardstore.load_into(bert, REF, store=minilm_fine.store, strict=False)
    # The old checkpoint saved position_ids; today's BertModel makes it a non-persistent buffer.
    assert result.unexpected == ["embeddings.position_ids"] and result.missing == []
    assert result.still_meta == ["embeddings.position_ids", "embeddings.token_type_ids"]
    assert not bert.embeddings.word_embeddings.weight.is_meta


def test_strict_load_names_what_stays_on_meta(net_store: tuple[LocalStore, Net]) -> None:
    store, _original = net_store
    with torch.device("meta"):
        net = Net()
        net.register_buffer("scale", torch.ones(64), persistent=False)  # in no checkpoint
    with pytest.raises(InvalidInputError, match=r"still on the meta device after loading: scale "):
        shardstore.load_into(net, "net:v1", store=store)


def test_load_into_a_transformers_model_over_grpc(fine_server: BackgroundServer, minilm_fine: Pushed,
                                                  minilm_dir: Path) -> None:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    bert = BertModel(BertConfig.from_pretrained(str(minilm_dir)))  # random weights
    result = shardstore.load_into(bert, f"grpc://{fine_server.address}/{REF}", threads=2, strict=False)
    assert result.unexpected == ["embeddings.position_ids"] and result.missing == []
    state = bert.state_dict()
    assert all(torch.equal(state[n], t) for n, t in minilm_fine.originals.items() if n in state)
    assert result.raw_bytes == minilm_fine.raw_bytes - sum(
        t.nbytes for n, t in minilm_fine.originals.items() if n not in state)
