"""The store's ``config`` object: which format version a store holds and which features it uses.

One small canonical-JSON object at ``<root>/config``, written by the first push
(restic's ``config`` file, with ext4's feature classes)::

    {"format": "shardstore.store", "version": 1, "hash": "blake3",
     "features": {"read": [], "write": ["leases"]}}

The rules (``docs/formats.md`` has them in prose):

* ``version`` is the major version of the store's layout and object formats. A
  program refuses to read or write a store whose version it does not know: an
  older program cannot tell what it would misread or destroy.
* ``features.read`` names features a program must understand to *read* the
  store correctly; one it does not know refuses reads and writes.
* ``features.write`` names features a program must understand to *write* (push,
  gc, repair) without breaking the store for others; one it does not know still
  reads, but refuses to write.
* Any other key is informational: readers ignore keys they do not know, so a
  newer version can add them without locking anyone out.

A store written before ``config`` existed has no such object; it is read as
version 1 with no features, and its next push writes the config.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from shardstore.errors import FormatError, UnsupportedFormatError
from shardstore.format import canonical_json
from shardstore.format.digest import HASH_NAME

CONFIG_KEY = "config"
STORE_FORMAT = "shardstore.store"
# The versions this program reads and writes, and the one it writes into a new store.
STORE_VERSION = 1
KNOWN_VERSIONS = frozenset({1})
# Features of version 1 this program understands, by class.
# ``leases``: writers take a lease under ``leases/`` so that gc never deletes what a push in
# flight will name (DESIGN invariant 6); a writer that did not would race gc.
# ``tag-keys``: refs are kept at ``refs/<name>/@<tag>`` (so ``a:t`` and ``a/t:v1`` coexist); a program
# that looks only at ``refs/<name>/<tag>`` would see no refs, so it must refuse to read such a store.
TAG_KEYS = "tag-keys"
KNOWN_READ_FEATURES: frozenset[str] = frozenset({TAG_KEYS})
KNOWN_WRITE_FEATURES = frozenset({"leases"})
# What this program uses, and so records in a config it writes.
READ_FEATURES: tuple[str, ...] = (TAG_KEYS,)
WRITE_FEATURES: tuple[str, ...] = ("leases",)
MAX_CONFIG_BYTES = 1 << 16


@dataclass(frozen=True)
class StoreConfig:
    version: int
    hash: str
    read_features: tuple[str, ...]
    write_features: tuple[str, ...]
    # True for a store made before ``config`` existed: nothing was read, version 1 is assumed.
    legacy: bool = False

    def to_bytes(self) -> bytes:
        doc: dict[str, Any] = {
            "format": STORE_FORMAT,
            "version": self.version,
            "hash": self.hash,
            "features": {"read": sorted(self.read_features), "write": sorted(self.write_features)},
        }
        return canonical_json.dumps(doc) + b"\n"

    def check_readable(self, where: str) -> None:
        """Raise :class:`UnsupportedFormatError` (one line) unless this program can read the store."""
        if self.version not in KNOWN_VERSIONS:
            newest = max(KNOWN_VERSIONS)
            raise UnsupportedFormatError(
                f"store {where} has format version {self.version}; this shardstore knows versions up to "
                f"{newest}: upgrade shardstore to use this store")
        if self.hash != HASH_NAME:
            raise UnsupportedFormatError(f"store {where} names objects by {self.hash!r}; this shardstore uses "
                                         f"{HASH_NAME!r}")
        unknown = sorted(set(self.read_features) - KNOWN_READ_FEATURES)
        if unknown:
            raise UnsupportedFormatError(
                f"store {where} uses feature(s) {', '.join(unknown)} that this shardstore cannot read: "
                "upgrade shardstore to use this store")

    def check_writable(self, where: str) -> None:
        """Like :meth:`check_readable`, and also refuses a store with write features this program lacks."""
        self.check_readable(where)
        unknown = sorted(set(self.write_features) - KNOWN_WRITE_FEATURES)
        if unknown:
            raise UnsupportedFormatError(
                f"store {where} uses feature(s) {', '.join(unknown)} that this shardstore cannot write: "
                "it may read the store, but upgrade shardstore to push, gc or repair")


def new_store_config() -> StoreConfig:
    """The config this program writes into a store that has none."""
    return StoreConfig(STORE_VERSION, HASH_NAME, READ_FEATURES, WRITE_FEATURES)


def legacy_store_config() -> StoreConfig:
    """What a store made before ``config`` existed is read as."""
    return StoreConfig(1, HASH_NAME, (), (), legacy=True)


def _features(doc: dict[str, Any], kind: str, what: str) -> tuple[str, ...]:
    features = doc.get("features", {})
    if not isinstance(features, dict):
        raise FormatError(f"{what}: 'features' must be an object")
    names = features.get(kind, [])
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise FormatError(f"{what}: 'features.{kind}' must be a list of names")
    return tuple(names)


def parse_store_config(data: bytes, where: str) -> StoreConfig:
    """Parse a store's config object. Unknown keys are ignored (informational, by the rules above)."""
    what = f"store {where}: config"
    if len(data) > MAX_CONFIG_BYTES:
        raise FormatError(f"{what}: larger than {MAX_CONFIG_BYTES} bytes")
    doc = canonical_json.loads(data, what)
    if not isinstance(doc, dict) or doc.get("format") != STORE_FORMAT:
        raise FormatError(f"{what}: not a {STORE_FORMAT} config object")
    version = doc.get("version")
    if type(version) is not int or version < 1:
        raise FormatError(f"{what}: 'version' must be a positive integer")
    if version not in KNOWN_VERSIONS:
        # The rest of a newer version's config may mean anything: refuse by its version alone.
        return StoreConfig(version, HASH_NAME, (), ())
    hash_name = doc.get("hash", HASH_NAME)
    if not isinstance(hash_name, str):
        raise FormatError(f"{what}: 'hash' must be a string")
    return StoreConfig(version, hash_name, _features(doc, "read", what), _features(doc, "write", what))
