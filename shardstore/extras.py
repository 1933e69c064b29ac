"""Optional dependencies: torch is an extra, so each feature that needs it asks for it here, in one line.

``pip install shardstore`` gives the CLI, push, pull, ls, inspect, verify, gc and
serve, none of which import torch; ``pip install 'shardstore[torch]'`` adds
``open``, ``load``/``load_into`` and ``from_pretrained`` (with ``[transformers]``).
"""

from __future__ import annotations

from shardstore.errors import MissingDependencyError


def require_torch(feature: str) -> None:
    """Raise one line naming ``feature`` and the extra to install when torch cannot be imported."""
    try:
        import torch  # noqa: F401
    except ImportError:
        raise MissingDependencyError(f"{feature} needs torch: pip install 'shardstore[torch]'") from None
