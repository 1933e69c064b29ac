"""Canonical JSON: one byte string per value, so equal documents get equal digests."""

from __future__ import annotations

import json
from typing import Any

from shardstore.errors import FormatError


def dumps(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise FormatError(f"duplicate key {key!r}")
        result[key] = value
    return result


def _no_constant(name: str) -> Any:
    raise FormatError(f"non-standard JSON constant {name}")


def loads(data: bytes | str, what: str) -> Any:
    """Parse strictly: duplicate keys, NaN/Infinity and bad UTF-8 are errors naming ``what``."""
    try:
        text = data.decode("utf-8") if isinstance(data, bytes | bytearray) else data
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except FormatError as exc:
        raise FormatError(f"{what}: {exc}") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise FormatError(f"{what}: not valid JSON ({exc})") from None
