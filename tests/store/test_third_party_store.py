"""A store written the way a third party would write one (over sqlite3), proving itself with the shipped suite.

Nothing here is shardstore's own: the backend is a small :class:`Store` subclass over one
sqlite3 table, and the test class only subclasses :class:`shardstore.testing.store.StoreTests`,
supplies the store and reads and writes the table directly as the "raw" side, as
``docs/testing.md`` tells third parties to do.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from rpc.grpc_helpers import SMALL_CHUNK, write_small_model

import shardstore
from shardstore.errors import NotFoundError
from shardstore.store import Store, StoreCapabilities, check_key
from shardstore.testing.store import StoreTests

_SCHEMA = "CREATE TABLE IF NOT EXISTS objects (key TEXT PRIMARY KEY, data BLOB NOT NULL, modified REAL NOT NULL)"


class SqliteStore(Store):
    """Every object a row; a transaction makes compare-and-set atomic."""

    capabilities = StoreCapabilities(atomic_compare_and_set=True, shared=True)

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute(_SCHEMA)
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"sqlite://{self.path}"

    def _row(self, key: str, column: str) -> Any:
        with self._lock:
            row = self._db.execute(f"SELECT {column} FROM objects WHERE key = ?", (check_key(key),)).fetchone()
        if row is None:
            raise NotFoundError(f"{key}: not in store {self.url}")
        return row[0]

    def get(self, key: str) -> bytes:
        return bytes(self._row(key, "data"))

    def get_range(self, key: str, start: int, end: int) -> bytes:
        return self.get(key)[start:end]

    def put(self, key: str, data: bytes | memoryview) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO objects VALUES (?, ?, ?)",
                             (check_key(key), bytes(data), time.time()))

    def exists(self, key: str) -> bool:
        try:
            self._row(key, "1")
        except NotFoundError:
            return False
        return True

    def size(self, key: str) -> int:
        return int(self._row(key, "length(data)"))

    def modified(self, key: str) -> float | None:
        return float(self._row(key, "modified"))

    def list(self, prefix: str = "") -> Iterator[str]:
        head = f"{prefix}/" if prefix else ""
        with self._lock:
            rows = self._db.execute("SELECT key FROM objects WHERE substr(key, 1, ?) = ?", (len(head), head)).fetchall()
        yield from (row[0] for row in rows)

    def delete(self, key: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM objects WHERE key = ?", (check_key(key),))

    def compare_and_set(self, key: str, expected: bytes | None, new: bytes) -> bool:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute("SELECT data FROM objects WHERE key = ?", (check_key(key),)).fetchone()
                if (None if row is None else bytes(row[0])) != expected:
                    return False
                self._db.execute("INSERT OR REPLACE INTO objects VALUES (?, ?, ?)", (key, bytes(new), time.time()))
                return True
            finally:
                self._db.execute("COMMIT")

    def close(self) -> None:
        self._db.close()


class TestSqliteStore(StoreTests):
    @pytest.fixture
    def store(self, tmp_path: Path) -> Iterator[Store]:
        store = SqliteStore(tmp_path / "objects.db")
        yield store
        store.close()

    def _raw(self, store: Store) -> contextlib.closing[sqlite3.Connection]:
        assert isinstance(store, SqliteStore)
        # A second connection, closed after each use: what another process would see and do.
        return contextlib.closing(sqlite3.connect(store.path, isolation_level=None))

    def get_raw(self, store: Store, key: str) -> bytes:
        with self._raw(store) as db:
            row = db.execute("SELECT data FROM objects WHERE key = ?", (key,)).fetchone()
        if row is None:
            raise KeyError(key)
        return bytes(row[0])

    def set_raw(self, store: Store, key: str, value: bytes) -> None:
        with self._raw(store) as db:
            db.execute("INSERT OR REPLACE INTO objects VALUES (?, ?, ?)", (key, value, time.time()))

    def delete_raw(self, store: Store, key: str) -> None:
        with self._raw(store) as db:
            db.execute("DELETE FROM objects WHERE key = ?", (key,))

    def reopen(self, store: Store) -> Store:
        assert isinstance(store, SqliteStore)
        return SqliteStore(store.path)  # open_store knows no sqlite:// URLs: the one hook a new scheme needs


def test_a_model_pushed_into_the_third_party_store_pulls_back_bit_exact(tmp_path: Path) -> None:
    model = write_small_model(tmp_path / "model")
    store = SqliteStore(tmp_path / "objects.db")
    try:
        pushed = shardstore.push(model, "small:v1", store=store, chunk_bytes=SMALL_CHUNK)
        assert pushed.shards_total > 1 and store.exists("config")
        shardstore.pull("small:v1", tmp_path / "out", store=store)
    finally:
        store.close()
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "out" / name).read_bytes() == (model / name).read_bytes()
