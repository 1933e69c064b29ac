"""One registry from codec id to class, and short names for the CLI."""

from __future__ import annotations

from typing import Any

from shardstore.codecs.base import Codec
from shardstore.errors import CodecError

_CODECS: dict[str, type[Codec]] = {}
# CLI names (``--codec NAME``) to the config they stand for; the config is what
# gets recorded, so a name can later point at a better codec without breaking
# anything already stored.
_NAMED_CONFIGS: dict[str, dict[str, Any]] = {}


def register_codec(cls: type[Codec], *names: str, config: dict[str, Any] | None = None) -> None:
    existing = _CODECS.get(cls.codec_id)
    if existing is not None and existing is not cls:
        raise CodecError(f"codec id {cls.codec_id!r} registered twice")
    _CODECS[cls.codec_id] = cls
    for name in names:
        _NAMED_CONFIGS[name] = {"id": cls.codec_id, **(config or {})}


def get_codec(config: dict[str, Any]) -> Codec:
    """Build a codec from its JSON config (the inverse of ``Codec.get_config``)."""
    if not isinstance(config, dict) or not isinstance(config.get("id"), str):
        raise CodecError(f"codec config must be an object with an 'id': {config!r}")
    try:
        cls = _CODECS[config["id"]]
    except KeyError:
        known = ", ".join(sorted(_CODECS))
        raise CodecError(f"unknown codec id {config['id']!r} (known: {known})") from None
    return cls.from_config(config)


def codec_from_name(name: str) -> Codec:
    """A codec from a CLI name (``raw``, ``zstd``, ``lossless``...) or a codec id."""
    if name in _NAMED_CONFIGS:
        return get_codec(dict(_NAMED_CONFIGS[name]))
    if name in _CODECS:
        return get_codec({"id": name})
    known = ", ".join(sorted(_NAMED_CONFIGS))
    raise CodecError(f"unknown codec {name!r} (known: {known})")


def codec_names(*, lossless: bool | None = None) -> list[str]:
    """CLI names; only the lossless (or only the lossy) ones when ``lossless`` is given."""
    return sorted(name for name, config in _NAMED_CONFIGS.items()
                  if lossless is None or _CODECS[config["id"]].lossless == lossless)


def codec_ids() -> list[str]:
    return sorted(_CODECS)
