"""Every registered codec round-trips its JSON config; unknown ids and names are errors."""

from __future__ import annotations

import numpy as np
import pytest

from shardstore.codecs import DEFAULT_CODEC_NAME, codec_from_name, codec_names, get_codec
from shardstore.codecs.base import PieceInfo
from shardstore.codecs.registry import codec_ids
from shardstore.errors import CodecError
from shardstore.testing.codecs import check_config_round_trip, check_lossless_round_trip, check_rejects_truncated


@pytest.mark.parametrize("codec_id", codec_ids())
def test_config_json_round_trip(codec_id: str) -> None:
    codec = get_codec({"id": codec_id})
    assert check_config_round_trip(codec)["id"] == codec_id


# xor-delta.v1 streams are made by push --base (the XOR needs the base piece), never by its encode.
@pytest.mark.parametrize("codec_id", [c for c in codec_ids() if get_codec({"id": c}).lossless and c != "xor-delta.v1"])
def test_lossless_codecs_pass_the_shipped_checks(codec_id: str) -> None:
    codec = get_codec({"id": codec_id})
    info = PieceInfo("F32", (16, 8))
    data = np.random.default_rng(7).standard_normal(128).astype("<f4").tobytes()
    encoded = check_lossless_round_trip(codec, data, info)
    check_rejects_truncated(codec, encoded, info)


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
