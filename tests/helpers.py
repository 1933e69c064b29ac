"""Small helpers shared by tests (importable as ``helpers``: pytest puts tests/ on the path)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path


def tree_snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` with its bytes: to prove a failed command changed nothing."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for servers that cannot bind port 0 themselves: nginx, gloo)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_cli(*args: str | Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``shardstore ARGS`` in a child process with ``env``: exit code, stdout and stderr as a user sees them."""
    return subprocess.run([sys.executable, "-m", "shardstore", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=300)


def cli_json(*args: str | Path, env: dict[str, str]) -> dict[str, object]:
    """The one JSON object ``shardstore ARGS --json`` prints; fails the test on a non-zero exit."""
    result = run_cli(*args, "--json", env=env)
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout)
    assert isinstance(figures, dict)
    return figures
