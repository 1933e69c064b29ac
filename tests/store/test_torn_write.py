"""A write torn by SIGKILL on the local store: never visible as the object, healed by the next write, swept by gc."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from shardstore.repo.gc import collect
from shardstore.repo.repository import Repository
from shardstore.store import LocalStore

_WRITER = """
import sys, time
from shardstore.store import LocalStore
store = LocalStore(sys.argv[1])
writer = store.writer("blobs/ab/ab")
writer.write(b"x" * 100_000)  # half of the object...
print("half", flush=True)
time.sleep(60)                # ...and killed here
"""


def test_a_write_killed_half_way_is_never_the_object(tmp_path: Path) -> None:
    root = tmp_path / "store"
    store = LocalStore(root)
    child = subprocess.Popen([sys.executable, "-c", _WRITER, str(root)], stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None and child.stdout.readline().strip() == "half"
    os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=30)
    torn = [p for p in root.rglob("*") if p.is_file()]
    assert len(torn) == 1 and torn[0].stat().st_size == 100_000  # the torn bytes are on disk...
    assert not store.exists("blobs/ab/ab") and store.stored_size("blobs/ab/ab") is None  # ...but not the object
    assert list(store.list()) == []
    assert store.put_if_absent("blobs/ab/ab", b"y" * 200_000) is True
    assert store.get("blobs/ab/ab") == b"y" * 200_000
    # gc sweeps the torn temporary once it is older than the grace period, and keeps it before.
    assert collect(Repository(store), grace=3600).temporaries_removed == 0 and torn[0].exists()
    old = time.time() - 7200
    os.utime(torn[0], (old, old))
    assert collect(Repository(store), grace=3600).temporaries_removed == 1 and not torn[0].exists()
