"""shardstore: a registry and delivery system for compressed, content-addressed model weights."""

from shardstore.api import from_pretrained, load_into, open, pull, push, snapshot
from shardstore.errors import ShardstoreError

__version__ = "0.1.0"

__all__ = ["ShardstoreError", "__version__", "from_pretrained", "load_into", "open", "pull", "push", "snapshot"]
