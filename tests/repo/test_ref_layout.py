"""Refs live at refs/<name>/@<tag>: ``a:t`` and ``a/t:v1`` coexist; older stores' refs/<name>/<tag> still read."""

from __future__ import annotations

from pathlib import Path

import pytest
from rpc.grpc_helpers import SMALL_CHUNK, write_small_model

import shardstore
from shardstore.repo.refs import parse_ref
from shardstore.repo.repository import Repository
from shardstore.store import LocalStore


@pytest.fixture
def store_and_model(tmp_path: Path) -> tuple[LocalStore, Path]:
    return LocalStore(tmp_path / "store"), write_small_model(tmp_path / "m")


def test_a_name_and_a_name_under_it_coexist(store_and_model: tuple[LocalStore, Path], tmp_path: Path) -> None:
    store, model = store_and_model
    first = shardstore.push(model, "a:t", store=store, chunk_bytes=SMALL_CHUNK)
    second = shardstore.push(model, "a/t:v1", store=store, chunk_bytes=SMALL_CHUNK)
    repo = Repository(store)
    assert {str(ref): mid for ref, mid in repo.list_refs()} == {"a:t": first.manifest_id,
                                                               "a/t:v1": second.manifest_id}
    assert sorted(store.list("refs")) == ["refs/a/@t", "refs/a/t/@v1"]
    for ref in ("a:t", "a/t:v1"):
        shardstore.pull(ref, tmp_path / ref.replace("/", "_"), store=store)
        assert (tmp_path / ref.replace("/", "_") / "model.safetensors").read_bytes() == \
            (model / "model.safetensors").read_bytes()


def test_a_ref_of_an_older_store_is_read_and_moves_on_its_next_write(store_and_model: tuple[LocalStore, Path]
                                                                     ) -> None:
    store, model = store_and_model
    pushed = shardstore.push(model, "org/m:v1", store=store, chunk_bytes=SMALL_CHUNK)
    # Rewrite the store as an older version kept it: refs/<name>/<tag>.
    store.delete("refs/org/m/@v1")
    store.put("refs/org/m/v1", pushed.manifest_id.encode() + b"\n")
    repo = Repository(store)
    assert repo.resolve(parse_ref("org/m:v1")) == pushed.manifest_id
    assert repo.list_refs() == [(parse_ref("org/m:v1"), pushed.manifest_id)]
    assert repo.tags("org/m") == ["v1"]
    # A compare-and-set against the old value works, and leaves the ref in the current layout only.
    repo.compare_and_set_ref(parse_ref("org/m:v1"), pushed.manifest_id, pushed.manifest_id)
    assert sorted(store.list("refs")) == ["refs/org/m/@v1"]
    store.delete("refs/org/m/@v1")
    store.put("refs/org/m/v1", pushed.manifest_id.encode() + b"\n")
    repo.delete_ref(parse_ref("org/m:v1"))
    assert list(store.list("refs")) == []


def test_a_store_whose_config_predates_tag_keys_keeps_its_layout(store_and_model: tuple[LocalStore, Path]) -> None:
    """Programs that wrote it look only at refs/<name>/<tag>: new refs go there too, so they still see them."""
    store, model = store_and_model
    store.put("config", b'{"features":{"read":[],"write":["leases"]},"format":"shardstore.store","hash":"blake3",'
                        b'"version":1}')
    pushed = shardstore.push(model, "org/m:v1", store=store, chunk_bytes=SMALL_CHUNK)
    assert sorted(store.list("refs")) == ["refs/org/m/v1"]
    assert Repository(store).resolve(parse_ref("org/m:v1")) == pushed.manifest_id
