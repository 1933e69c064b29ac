"""The error hierarchy.

One root, :class:`ShardstoreError`, so that callers (and the CLI) can catch
everything this package raises on purpose. Leaves also subclass the builtin
they resemble, so ``except KeyError`` or ``except ValueError`` keeps working
for users who do not know our types.
"""

from __future__ import annotations


class ShardstoreError(Exception):
    """Root of every error shardstore raises deliberately."""


class NotFoundError(ShardstoreError, KeyError):
    """A key, ref, tensor or object does not exist."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain.
        return str(self.args[0]) if self.args else "not found"


class StoreMissingError(NotFoundError):
    """The store itself (folder, bucket) does not exist: reading it is a mistake, not an empty registry."""


class InvalidInputError(ShardstoreError, ValueError):
    """A user-supplied file, argument or name is malformed."""


class FormatError(ShardstoreError, ValueError):
    """A shard, manifest or safetensors file violates its format."""


class UnsupportedFormatError(FormatError):
    """A store, manifest or shard is of a version or uses a feature this shardstore does not know."""


class IntegrityError(ShardstoreError):
    """Stored or transferred bytes do not match their digest or checksum."""


class CodecError(ShardstoreError, ValueError):
    """A codec is unknown, misconfigured, or its stream cannot be decoded."""


class StoreError(ShardstoreError, OSError):
    """A store backend failed (permission, network, full disk...)."""


class ConflictError(ShardstoreError):
    """A compare-and-set on a ref lost the race."""


class MissingDependencyError(ShardstoreError, ImportError):
    """An optional dependency (torch, transformers) a feature needs is not installed."""
