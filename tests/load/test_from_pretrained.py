"""shardstore.from_pretrained: a transformers model straight from a ref over gRPC, equal to transformers' own load."""

from __future__ import annotations

import logging
from itertools import chain
from pathlib import Path

import pytest
import torch
from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer, BertModel

import shardstore
from load.load_helpers import REF
from shardstore.errors import NotFoundError
from shardstore.rpc.background import BackgroundServer

SENTENCES = ["A man is eating food.", "Weights are stored once and delivered lazily, row by row."]


def _on_meta(model: torch.nn.Module) -> list[str]:
    return [n for n, t in chain(model.named_parameters(), model.named_buffers()) if t.is_meta]


def _outputs(model: torch.nn.Module, minilm_dir: Path) -> torch.Tensor:
    batch = AutoTokenizer.from_pretrained(str(minilm_dir))(SENTENCES, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).last_hidden_state  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def original(minilm_dir: Path) -> torch.nn.Module:
    return AutoModel.from_pretrained(str(minilm_dir))


def test_from_pretrained_over_grpc_equals_transformers_own(fine_server: BackgroundServer, minilm_dir: Path,
                                                           original: torch.nn.Module,
                                                           shard_cache_dir: Path) -> None:
    model = shardstore.from_pretrained(f"grpc://{fine_server.address}/{REF}", cls=AutoModel, threads=2)
    assert type(model) is type(original) and not model.training
    assert _on_meta(model) == []
    # The buffers no checkpoint holds (token_type_ids) are made as transformers makes them.
    assert {n: b for n, b in model.named_buffers()}.keys() == {n: b for n, b in original.named_buffers()}.keys()
    for name, buffer in original.named_buffers():
        assert torch.equal(model.get_buffer(name), buffer), name
    for name, tensor in original.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    assert torch.equal(_outputs(model, minilm_dir), _outputs(original, minilm_dir))
    assert not (shard_cache_dir / "snapshots").exists()  # no folder written: only shards in the shard cache


def test_the_config_costs_one_blob_and_no_tensor(fine_server: BackgroundServer, minilm_dir: Path) -> None:
    sent = fine_server.servicer.sent_bytes
    model = shardstore.from_pretrained(f"grpc://{fine_server.address}/{REF}", device_map="meta")
    config_bytes = (minilm_dir / "config.json").stat().st_size
    # Everything mapped to meta: the only object the server sent is config.json.
    assert fine_server.servicer.sent_bytes - sent == config_bytes
    assert model.config.hidden_size == 384 and model.config.num_hidden_layers == 6


def test_dtype_and_config_overrides_and_a_concrete_class(fine_server: BackgroundServer, minilm_dir: Path,
                                                         original: torch.nn.Module) -> None:
    url = f"grpc://{fine_server.address}/{REF}"
    # device_map/max_memory go to the load as state_dict takes them; the other keywords to config and model.
    model = shardstore.from_pretrained(url, cls=BertModel, torch_dtype=torch.bfloat16, output_hidden_states=True,
                                       add_pooling_layer=False, device_map="auto", max_memory={"cpu": 1 << 30})
    assert isinstance(model, BertModel) and model.pooler is None and model.config.output_hidden_states
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert {str(t.device) for t in chain(model.parameters(), model.buffers())} == {"cpu"}
    assert _on_meta(model) == []
    expected = original.state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, expected[name].to(tensor.dtype)), name


def test_a_head_the_checkpoint_lacks_is_initialised_and_said(fine_server: BackgroundServer, original: torch.nn.Module,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="shardstore"):
        model = shardstore.from_pretrained(f"grpc://{fine_server.address}/{REF}",
                                           cls=AutoModelForSequenceClassification, num_labels=3)
    assert _on_meta(model) == []
    assert model.classifier.weight.shape == (3, 384) and torch.isfinite(model.classifier.weight).all()
    assert float(model.classifier.weight.detach().std()) > 0  # transformers' normal init, not zeros or garbage
    assert torch.equal(model.bert.encoder.layer[3].output.dense.weight,
                       original.encoder.layer[3].output.dense.weight)
    assert "classifier.weight" in caplog.text


def test_a_ref_without_a_config_is_one_line(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"w": torch.ones(2, 2)}, str(tmp_path / "m.safetensors"))
    shardstore.push(tmp_path / "m.safetensors", "bare:v1", store=str(tmp_path / "store"))
    with pytest.raises(NotFoundError, match=r"^bare:v1: no config.json among its files \(pass config=\)$"):
        shardstore.from_pretrained("bare:v1", store=str(tmp_path / "store"))
