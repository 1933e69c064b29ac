"""Every registered codec round-trips its JSON config; unknown ids and names are errors."""

from __future__ import annotations

import json

import pytest

from shardstore.codecs import DEFAULT_CODEC_NAME, codec_from_name, codec_names, get_codec
from shardstore.codecs.registry import codec_ids
from shardstore.errors import CodecError


@pytest.mark.parametrize("codec_id", codec_ids())
def test_config_json_round_trip(codec_id: str) -> None:
    codec = get_codec({"id": codec_id})
    config = json.loads(json.dumps(codec.get_config()))
    assert config["id"] == codec_id
    assert get_codec(config) == codec


@pytest.mark.parametrize("name", codec_names())
def test_names_resolve(name: str) -> None:
    codec = codec_from_name(name)
    assert get_codec(codec.get_config()) == codec


def test_default_is_the_float_entropy_codec() -> None:
    assert DEFAULT_CODEC_NAME == "lossless"
    assert codec_from_name(DEFAULT_CODEC_NAME).codec_id == "float-entropy.v1"


@pytest.mark.parametrize("config", [{"id": "nope.v9"}, {}, {"id": 3}, "raw.v1", {"id": "raw.v1", "extra": 1}])
def test_bad_configs(config: object) -> None:
    with pytest.raises(CodecError):
        get_codec(config)  # type: ignore[arg-type]


def test_unknown_name() -> None:
    with pytest.raises(CodecError):
        codec_from_name("no-such-codec")
