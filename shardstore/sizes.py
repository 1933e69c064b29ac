"""Sizes as people write them (``4MiB``, ``1GiB``, ``512k``, ``1048576``) and read them: one parser, one printer.

Binary units (``KiB``, ``MiB``, ``GiB``, ``TiB``, also Kubernetes' ``Ki``..``Ti``) are powers of
1024; decimal ones (``kB``, ``MB``, ``GB``, ``TB``, ``k``, ``M``, ``G``, ``T``) powers of 1000;
case is ignored, so is a space before the unit. A leaf module (no shardstore imports beyond
errors), so that the store layer can read ``$SHARDSTORE_CACHE_SIZE`` with the CLI's parser.
"""

from __future__ import annotations

import re

from shardstore.errors import InvalidInputError

_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12, "tb": 10**12,
    "ki": 1 << 10, "kib": 1 << 10, "mi": 1 << 20, "mib": 1 << 20, "gi": 1 << 30, "gib": 1 << 30,
    "ti": 1 << 40, "tib": 1 << 40,
}
_SIZE = re.compile(r"(\d+(?:\.\d+)?|\.\d+)\s*([a-z]*)")


def parse_size(text: str, what: str = "size") -> int:
    """A positive number of bytes; :class:`InvalidInputError` naming ``what`` when ``text`` is not a size."""
    match = _SIZE.fullmatch(text.strip().lower())
    if match is None or match.group(2) not in _UNITS:
        raise InvalidInputError(f"{what}: not a size: {text!r} (e.g. 512MiB, 20GiB, 1048576)")
    value = int(float(match.group(1)) * _UNITS[match.group(2)])
    if value <= 0:
        raise InvalidInputError(f"{what}: must be positive: {text!r}")
    return value


def human_bytes(size: float) -> str:
    """``size`` bytes in binary units for people (``1.5 MiB``): the CLI's tables and the web view's pages."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")
