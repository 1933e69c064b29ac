"""Crashes with real processes and real signals: a push SIGKILLed at every step, a server SIGKILLed mid-stream.

A push runs as ``python -m shardstore push`` in a child process; this file is
also the child's entry point (``python test_crash.py POINT push ...``): it
pauses the push at POINT and says so on stdout, and the test kills it there
with SIGKILL. Afterwards ``verify --read-data`` must call the store healthy, a
re-run must upload only the shards that are missing, and the model must pull
back bit-identical. The pause is the only thing the child adds to the product.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import shardstore
from shardstore.format.digest import digest
from shardstore.repo.leases import DEFAULT_TTL_S, list_leases
from shardstore.repo.refs import parse_ref
from shardstore.repo.repository import Repository
from shardstore.rpc.client import GrpcClient
from shardstore.store import Store, open_store

HERE = Path(__file__).resolve()
POINTS = ["first-shard", "shard:3", "blobs", "manifest-write", "ref", "lease-release"]


# -- the child: a push that stops at a chosen point ------------------------------------------------------------

def _install_pause(point: str) -> None:
    from shardstore.repo.repository import Repository
    from shardstore.store.s3 import S3Store

    paused = threading.Event()
    lock = threading.Lock()
    calls: dict[str, int] = {}

    def pause_here(where: str) -> None:
        with lock:
            first = not paused.is_set()
            paused.set()
        if first:
            print(f"PAUSED {where}", flush=True)
        threading.Event().wait()  # until SIGKILL

    def before(name: str, original: Callable[..., Any], should_pause: Callable[[tuple[Any, ...]], bool]
               ) -> Callable[..., Any]:
        def hooked(*args: Any, **kwargs: Any) -> Any:
            with lock:
                calls[name] = calls.get(name, 0) + 1
            if paused.is_set() or should_pause(args):
                pause_here(point)
            return original(*args, **kwargs)

        return hooked

    kind, _, number = point.partition(":")
    if kind in ("first-shard", "shard"):
        nth = int(number or 1)
        Repository.put_shard = before(  # type: ignore[method-assign]
            "shard", Repository.put_shard, lambda _args: calls["shard"] >= nth)
    elif kind == "blobs":
        Repository.put_blob = before("blob", Repository.put_blob, lambda _args: True)  # type: ignore[method-assign]
    elif kind == "ref":
        Repository.set_ref = before("ref", Repository.set_ref, lambda _args: True)  # type: ignore[method-assign]
    elif kind == "lease-release":
        set_ref = Repository.set_ref

        def set_ref_then_pause(*args: Any) -> None:
            set_ref(*args)
            pause_here(point)  # the ref is set; the lease is not yet released

        Repository.set_ref = set_ref_then_pause  # type: ignore[method-assign]
    elif kind == "manifest-write":
        # Local store: the manifest's bytes are in a temporary file, not yet renamed into place.
        replace = os.replace

        def replace_or_pause(src: Any, dst: Any, **kwargs: Any) -> None:
            if "/manifests/" in str(dst):
                pause_here(point)
            replace(src, dst, **kwargs)

        os.replace = replace_or_pause
        # S3: the manifest's PUT is about to go out (an S3 PUT itself is all or nothing).
        S3Store._put_object = before(  # type: ignore[method-assign]
            "s3-put", S3Store._put_object, lambda args: str(args[1]).startswith("manifests/"))
    else:
        raise SystemExit(f"unknown pause point {point}")


# -- the tests ----------------------------------------------------------------------------------------


def _read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    return proc.stdout.readline().strip() if ready else ""


def _cli(*argv: str, code: int = 0) -> dict[str, Any]:
    result = subprocess.run([sys.executable, "-m", "shardstore", *argv, "--json"], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == code, result.stderr
    figures: dict[str, Any] = json.loads(result.stdout)
    return figures


def _small_chunk() -> int:
    # tests/rpc is on the path under pytest, not in the child: imported where the tests need it.
    from rpc.grpc_helpers import SMALL_CHUNK

    return SMALL_CHUNK


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from rpc.grpc_helpers import write_small_model

    return write_small_model(tmp_path_factory.mktemp("crash") / "small")


def _kill_push_at(point: str, model: Path, store_args: list[str]) -> None:
    proc = subprocess.Popen(
        [sys.executable, str(HERE), point, "push", str(model), "small:v1", *store_args,
         "--chunk-size", str(_small_chunk()), "--threads", "2", "--quiet"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        line = _read_line(proc, timeout=120)
        if line != f"PAUSED {point}":
            proc.kill()
            pytest.fail(f"the push did not pause at {point}: {line!r} {proc.communicate()[1][-2000:]}")
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _check_recovery(point: str, model: Path, store: Store, store_args: list[str], tmp_path: Path) -> None:
    present = len(list(store.list("shards")))
    figures = _cli("verify", *store_args, "--read-data")
    assert figures["healthy"] is True and figures["problems"] == []
    ref_set = point == "lease-release"
    assert store.exists(parse_ref("small:v1").key) == ref_set  # the ref is the last write, never early
    again = _cli("push", str(model), "small:v1", *store_args, "--chunk-size", str(_small_chunk()))
    assert again["shards_uploaded"] == again["shards_total"] - present  # only what is missing
    if point in ("ref", "lease-release", "manifest-write"):
        assert again["shards_uploaded"] == 0
    assert _cli("verify", *store_args, "--read-data")["healthy"] is True
    shardstore.pull("small:v1", tmp_path / "out", store=store)
    assert digest((tmp_path / "out" / "model.safetensors").read_bytes()) == digest(
        (model / "model.safetensors").read_bytes())
    # The killed push never released its lease; nobody renews it any more, so it lapses within one TTL.
    (lease,) = list_leases(store)
    assert lease.kind == "push" and lease.expires <= time.time() + DEFAULT_TTL_S


@pytest.mark.parametrize("point", POINTS)
def test_push_killed_on_a_local_store(point: str, model: Path, tmp_path: Path) -> None:
    root = tmp_path / "store"
    _kill_push_at(point, model, ["--store", str(root)])
    store = open_store(str(root))
    if point == "manifest-write":
        # The killed write left its temporary file, which no listing shows and gc removes.
        assert len(list(root.rglob(".tmp-*"))) == 1 and not list(store.list("manifests"))
    _check_recovery(point, model, store, ["--store", str(root)], tmp_path)
    if point == "manifest-write":
        blocked = _cli("gc", "--store", str(root), "--grace", "0")  # the dead push's lease has not lapsed yet
        assert blocked["pushes_in_flight"] == 1 and blocked["deleted"] == blocked["temporaries_removed"] == 0
        (lease,) = list_leases(store)
        store.put(lease.key, json.dumps({"kind": "push", "created": lease.created, "expires": time.time() - 1,
                                         "holder": lease.holder}).encode())  # one TTL later
        figures = _cli("gc", "--store", str(root), "--grace", "0")
        assert figures["temporaries_removed"] == 1 and figures["expired_leases_removed"] == 1
        assert figures["deleted"] == 0 and not list(root.rglob(".tmp-*"))


@pytest.mark.parametrize("point", ["shard:3", "manifest-write", "lease-release"])
def test_push_killed_on_s3(point: str, model: Path, s3_bucket: str, s3_endpoint: str, tmp_path: Path) -> None:
    url = f"s3://{s3_bucket}/registry"
    store_args = ["--store", url, "-o", f"endpoint_url={s3_endpoint}"]
    _kill_push_at(point, model, store_args)
    _check_recovery(point, model, open_store(url, endpoint_url=s3_endpoint), store_args, tmp_path)


# -- a server killed mid-stream ---------------------------------------------------------------------------

@pytest.fixture
def served_store(model: Path, tmp_path: Path) -> tuple[Path, list[str]]:
    root = tmp_path / "store"
    report = shardstore.push(model, "small:v1", store=str(root), chunk_bytes=_small_chunk())
    manifest = Repository(open_store(str(root))).get_manifest(report.manifest_id)
    return root, list(manifest.shards)


def _serve(root: Path, port: int, env: dict[str, str]) -> tuple[subprocess.Popen[str], str]:
    # Paced, so that a stream of the small model lasts long enough to be killed in the middle.
    proc = subprocess.Popen(
        [sys.executable, "-m", "shardstore", "serve", "--store", str(root), "--port", str(port),
         "--max-rate", "128KiB", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
    )
    line = _read_line(proc, timeout=60)
    assert line, "server did not start"
    return proc, str(json.loads(line)["address"])


@pytest.fixture
def kill_list() -> Iterator[list[subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_server_killed_mid_stream_client_resumes_from_next_unverified_shard(
    served_store: tuple[Path, list[str]], tmp_path: Path, kill_list: list[subprocess.Popen[str]]
) -> None:
    root, shard_ids = served_store
    env = {**os.environ, "SHARDSTORE_CACHE": str(tmp_path / "server-cache")}
    first, address = _serve(root, 0, env)
    kill_list.append(first)
    port = int(address.rsplit(":", 1)[1])
    sizes = {s: (root / "shards" / s[:2] / s).stat().st_size for s in shard_ids}
    received: list[str] = []
    with GrpcClient(address, use_cache=False, retries=10, backoff=0.2, prefetch_shards=1) as client:
        for shard_id, data in client.fetch_shards(shard_ids):
            assert digest(data) == shard_id
            received.append(shard_id)
            if len(received) == 2:
                first.send_signal(signal.SIGKILL)  # mid-stream: the other shards are still to come
                assert first.wait(timeout=30) == -signal.SIGKILL
                second, _ = _serve(root, port, env)  # back on the same address, as a restarted pod would be
                kill_list.append(second)
        assert client.retried >= 1
    assert received == shard_ids  # every shard once, in order
    # Resumed, not restarted: every shard came over the wire once (each is one message here, so a kill
    # loses no partial shard), plus message framing; a restart would have sent the first shard again.
    total = sum(sizes.values())
    assert sizes[shard_ids[0]] > 4096
    assert total <= client.transferred_bytes < total + sizes[shard_ids[0]]


if __name__ == "__main__":
    _install_pause(sys.argv[1])
    from shardstore.cli import main as cli_main

    sys.exit(cli_main(sys.argv[2:]))
