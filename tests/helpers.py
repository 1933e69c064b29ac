"""Small helpers shared by tests (importable as ``helpers``: pytest puts tests/ on the path)."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


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


@contextmanager
def serve_from_env(env: dict[str, str], log: Path) -> Iterator[dict[str, Any]]:
    """``shardstore serve --json`` set up by ``env`` alone (as a container is); yields its ready line's figures.

    Its stderr goes to ``log``. Stopped with SIGTERM on exit, and checked to exit 0.
    """
    with log.open("w") as stderr:
        process = subprocess.Popen([sys.executable, "-m", "shardstore", "serve", "--json"], stdout=subprocess.PIPE,
                                   stderr=stderr, text=True, env=env)
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line, f"server did not start: {log.read_text()}"
        ready = json.loads(line)
        assert isinstance(ready, dict)
        yield ready
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0, log.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
