"""Small helpers shared by tests (importable as ``helpers``: pytest puts tests/ on the path)."""

from __future__ import annotations

import socket
from pathlib import Path


def tree_snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` with its bytes: to prove a failed command changed nothing."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for servers that cannot bind port 0 themselves: nginx, gloo)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
