"""Refs: ``name:tag`` → manifest id, the only mutable objects in a store.

Names follow the OCI distribution spec's repository grammar (lowercase
components separated by ``/``, ``.``, ``_``, ``-``), tags its tag grammar, so a
name that works here works in any registry-shaped tool.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from shardstore.errors import InvalidInputError

DEFAULT_TAG = "latest"
_NAME = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*$")
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
MAX_NAME_LENGTH = 255
# A tag's key part starts with this: neither names nor tags may contain it, so ``a:t`` (refs/a/@t) and
# ``a/t:v1`` (refs/a/t/@v1) never collide. Stores written before it hold refs/<name>/<tag>: still read.
TAG_MARK = "@"


@dataclass(frozen=True)
class Ref:
    name: str
    tag: str

    def __str__(self) -> str:
        return f"{self.name}:{self.tag}"

    @property
    def key(self) -> str:
        """Where the ref is written: ``refs/<name>/@<tag>``."""
        return f"refs/{self.name}/{TAG_MARK}{self.tag}"

    @property
    def legacy_key(self) -> str:
        """Where stores written before the ``@`` layout keep it: ``refs/<name>/<tag>`` (read, then migrated)."""
        return f"refs/{self.name}/{self.tag}"


def parse_ref(text: str) -> Ref:
    """``name[:tag]`` with the tag defaulting to ``latest``; a one-line error otherwise."""
    name, sep, tag = text.rpartition(":")
    if not sep or "/" in tag:
        name, tag = text, DEFAULT_TAG
    if not name or len(name) > MAX_NAME_LENGTH or not _NAME.match(name):
        raise InvalidInputError(
            f"bad ref {text!r}: the name must be lowercase letters, digits and . _ - / separators (like 'org/model:v1')"
        )
    if not _TAG.match(tag):
        raise InvalidInputError(f"bad ref {text!r}: the tag must be letters, digits, . _ - (at most 128)")
    return Ref(name, tag)


def ref_from_key(key: str) -> Ref | None:
    """The ref a store key under ``refs/`` stands for, or None for a stray key."""
    if not key.startswith("refs/"):
        return None
    name, _, tag = key[len("refs/") :].rpartition("/")
    tag = tag.removeprefix(TAG_MARK)  # the current layout; without it, a ref of an older store
    try:
        return parse_ref(f"{name}:{tag}")
    except InvalidInputError:
        return None
