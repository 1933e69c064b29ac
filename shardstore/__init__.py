"""shardstore: a registry and delivery system for compressed, content-addressed model weights."""

from shardstore.api import load_into, open, pull, push
from shardstore.errors import ShardstoreError

__version__ = "0.1.0"

__all__ = ["ShardstoreError", "__version__", "load_into", "open", "pull", "push"]
