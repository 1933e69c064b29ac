"""verify (--read-data, --repair, --cache) and gc (mark and sweep, grace period, leases) on real stores."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from rpc.grpc_helpers import SMALL_CHUNK, write_small_model

import shardstore
from shardstore.cli import main
from shardstore.errors import IntegrityError
from shardstore.format.digest import digest
from shardstore.format.manifest import Manifest
from shardstore.repo.gc import collect, manifest_references
from shardstore.repo.leases import Lease, list_leases
from shardstore.repo.refs import parse_ref
from shardstore.repo.repository import Repository, blob_key, manifest_key, shard_key
from shardstore.repo.verify import verify
from shardstore.rpc.background import BackgroundServer
from shardstore.store import LocalStore, Store, open_store
from shardstore.store.cache import ShardCache

OLD = time.time() - 7 * 86400  # a week ago: past any grace period


@pytest.fixture
def two_models(tmp_path: Path) -> tuple[LocalStore, Path, Path]:
    """A store holding ``a:v1`` and ``b:v1`` (two different small models, several shards each)."""
    store = LocalStore(tmp_path / "store")
    a, b = write_small_model(tmp_path / "a", seed=0), write_small_model(tmp_path / "b", seed=1)
    shardstore.push(a, "a:v1", store=store, chunk_bytes=SMALL_CHUNK)
    shardstore.push(b, "b:v1", store=store, chunk_bytes=SMALL_CHUNK)
    return store, a, b


def manifest_of(store: Store, ref: str) -> tuple[str, Manifest]:
    repo = Repository(store)
    manifest_id = repo.resolve(parse_ref(ref))
    return manifest_id, repo.get_manifest(manifest_id)


def age_everything(store: LocalStore, when: float = OLD) -> None:
    for path in store.root.rglob("*"):
        if path.is_file():
            os.utime(path, (when, when))


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def cli_json(*argv: str, code: int = 0) -> dict[str, object]:
    result = subprocess.run([sys.executable, "-m", "shardstore", *argv, "--json"], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == code, result.stderr
    figures: dict[str, object] = json.loads(result.stdout)  # exactly one JSON object, nothing else
    return figures


# -- gc -------------------------------------------------------------------------------------------

def test_gc_deletes_only_what_no_ref_reaches_and_only_past_the_grace_period(
    two_models: tuple[LocalStore, Path, Path], tmp_path: Path
) -> None:
    store, a, _b = two_models
    b_id, b_manifest = manifest_of(store, "b:v1")
    _a_id, a_manifest = manifest_of(store, "a:v1")
    only_b = set(b_manifest.shards) - set(a_manifest.shards)
    store.delete(parse_ref("b:v1").key)

    young = collect(Repository(store))  # b's objects were written seconds ago: within the grace period
    assert young.deleted == 0 and store.exists(manifest_key(b_id))

    age_everything(store)
    dry = collect(Repository(store), dry_run=True)
    assert (dry.deleted_manifests, dry.deleted_shards) == (1, len(only_b)) and store.exists(manifest_key(b_id))

    report = collect(Repository(store))
    assert (report.deleted_manifests, report.deleted_shards, report.deleted_blobs) == (1, len(only_b), 0)
    assert report.bytes_freed == dry.bytes_freed == sum(b_manifest.shards[s] for s in only_b) + len(
        b_manifest.to_bytes())
    assert not any(store.exists(shard_key(s)) for s in only_b)
    assert verify(Repository(store), read_data=True).healthy
    shardstore.pull("a:v1", tmp_path / "out", store=store)
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (a / "model.safetensors").read_bytes()
    assert collect(Repository(store)).deleted == 0  # nothing left to collect


def test_gc_keeps_a_delta_manifests_base_and_its_shards(two_models: tuple[LocalStore, Path, Path]) -> None:
    store, _a, _b = two_models
    a_id, a_manifest = manifest_of(store, "a:v1")
    _b_id, b_manifest = manifest_of(store, "b:v1")
    repo = Repository(store)
    delta = dataclasses.replace(b_manifest, base=a_id, _bytes=b"")
    delta_id, _written = repo.put_manifest(delta)
    repo.set_ref(parse_ref("delta:v1"), delta_id)
    for ref in ("a:v1", "b:v1"):
        store.delete(parse_ref(ref).key)
    age_everything(store)
    report = collect(repo)
    assert report.deleted_manifests == 1  # b's manifest: nothing reaches it
    assert store.exists(manifest_key(a_id)) and all(store.exists(shard_key(s)) for s in a_manifest.shards)
    assert verify(repo, read_data=True).healthy


def test_piece_level_base_shards_count_as_referenced() -> None:
    @dataclasses.dataclass(frozen=True)
    class Base:  # the shape a delta piece's base takes: a shard, a stream, and maybe its own base
        shard: str
        stream: str
        base: Base | None = None

    @dataclasses.dataclass(frozen=True)
    class Piece:
        shard: str
        base: Base | None

    inner, outer, own = "1" * 64, "2" * 64, "3" * 64

    @dataclasses.dataclass(frozen=True)
    class Record:
        pieces: tuple[Piece, ...]

    manifest = Manifest({"t": Record((Piece(own, Base(outer, "0", Base(inner, "1"))),))},  # type: ignore[dict-item]
                        (), {}, {own: 1})
    shards, _blobs, _bases = manifest_references(manifest)
    assert shards == {own, outer, inner}


def test_gc_deletes_nothing_while_a_push_holds_a_lease(two_models: tuple[LocalStore, Path, Path]) -> None:
    store, _a, _b = two_models
    store.delete(parse_ref("b:v1").key)
    age_everything(store)
    with Lease(store, "push", note="test push"):
        blocked = collect(Repository(store))
        assert blocked.pushes_in_flight == 1 and blocked.deleted == 0
        assert cli_json("gc", "--store", str(store.root))["pushes_in_flight"] == 1
    # A lease whose holder was killed (never renewed, expired) blocks nothing and is cleared.
    store.put("leases/push-dead.json", json.dumps({"kind": "push", "created": OLD, "expires": OLD + 300,
                                                   "holder": "killed"}).encode())
    report = collect(Repository(store))
    assert report.pushes_in_flight == 0 and report.deleted > 0 and report.expired_leases_removed == 1
    assert list_leases(store) == []


def test_push_waits_while_gc_runs(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    model = write_small_model(tmp_path / "m")
    gc_lease = Lease(store, "gc", note="test gc").acquire()
    pushed = threading.Event()
    thread = threading.Thread(target=lambda: (shardstore.push(model, "m:v1", store=store), pushed.set()))
    thread.start()
    try:
        # The push has taken its lease (so a gc starting now would delete nothing) and waits for ours to go.
        deadline = time.monotonic() + 30
        while not [lease for lease in list_leases(store) if lease.kind == "push"] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert [lease.kind for lease in list_leases(store)].count("push") == 1
        assert not pushed.wait(1.0) and not store.exists(parse_ref("m:v1").key)
        assert not list(store.list("shards"))  # nothing uploaded while gc holds its lease
    finally:
        gc_lease.release()
        thread.join(timeout=60)
    assert pushed.is_set() and store.exists(parse_ref("m:v1").key)
    assert list_leases(store) == []  # the push released its lease


def test_repush_after_gc_uploads_again_local_and_grpc(two_models: tuple[LocalStore, Path, Path]) -> None:
    store, _a, b = two_models
    _b_id, b_manifest = manifest_of(store, "b:v1")
    store.delete(parse_ref("b:v1").key)
    age_everything(store)
    assert collect(Repository(store)).deleted_shards > 0
    # The server's "already have it" answers come from the store now, not from anything it remembers.
    with BackgroundServer(store) as server:
        again = shardstore.push(b, f"grpc://{server.address}/b:v1", chunk_bytes=SMALL_CHUNK)
    assert again.shards_uploaded == len(set(b_manifest.shards) - set(manifest_of(store, "a:v1")[1].shards))
    assert verify(Repository(store), read_data=True).healthy
    assert list_leases(store) == []  # the server released its write lease when it stopped


def test_grpc_writes_hold_a_lease_that_keeps_gc_away(two_models: tuple[LocalStore, Path, Path],
                                                     tmp_path: Path) -> None:
    store, _a, _b = two_models
    with BackgroundServer(store) as server:
        shardstore.push(write_small_model(tmp_path / "c", seed=2), f"grpc://{server.address}/c:v1",
                        chunk_bytes=SMALL_CHUNK)
        store.delete(parse_ref("b:v1").key)
        age_everything(store)
        report = collect(Repository(store))
        assert report.pushes_in_flight == 1 and report.deleted == 0


def test_gc_stops_before_deleting_anything_when_a_reachable_manifest_is_corrupt(
    two_models: tuple[LocalStore, Path, Path]
) -> None:
    store, _a, _b = two_models
    a_id, _ = manifest_of(store, "a:v1")
    flip_byte(store.root / manifest_key(a_id))
    age_everything(store)
    before = sorted(store.list(""))
    with pytest.raises(IntegrityError, match=f"reachable manifest {a_id} cannot be read"):
        collect(Repository(store))
    assert sorted(k for k in store.list("") if not k.startswith("leases/")) == before
    assert main(["gc", "--store", str(store.root), "--quiet"]) == 1


def test_gc_on_s3_after_another_process_listed(minilm_fp16_dir: Path, s3_bucket: str, s3_endpoint: str) -> None:
    url = f"s3://{s3_bucket}/registry"
    store = open_store(url, endpoint_url=s3_endpoint)
    first = shardstore.push(minilm_fp16_dir, "minilm:v1", store=store)
    assert len(list(store.list("shards"))) == first.shards_total  # this process has listed the shards
    store.delete(parse_ref("minilm:v1").key)
    figures = cli_json("gc", "--store", url, "-o", f"endpoint_url={s3_endpoint}", "--grace", "0")
    assert figures["deleted_shards"] == first.shards_total and figures["bytes_freed"] == first.uploaded_bytes
    again = shardstore.push(minilm_fp16_dir, "minilm:v1", store=store)  # same process, same listing cache
    assert again.shards_uploaded == first.shards_total
    assert verify(Repository(store), read_data=True).healthy


# -- verify ---------------------------------------------------------------------------------------

def test_flipped_byte_is_named_by_verify_and_pull_and_never_cached(
    two_models: tuple[LocalStore, Path, Path], tmp_path: Path
) -> None:
    store, _a, _b = two_models
    _a_id, a_manifest = manifest_of(store, "a:v1")
    victim = sorted(a_manifest.shards)[0]
    flip_byte(store.root / shard_key(victim))
    assert verify(Repository(store)).healthy  # sizes alone cannot see a flipped byte
    report = verify(Repository(store), read_data=True)
    assert report.problems == [f"{shard_key(victim)}: shard {victim}: content does not match its id "
                               "(corrupt or truncated)"]
    figures = cli_json("verify", "--store", str(store.root), "--read-data", code=1)
    assert figures["healthy"] is False and victim in str(figures["problems"])
    with pytest.raises(IntegrityError, match=victim):
        shardstore.pull("a:v1", tmp_path / "out", store=store)
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_repair_never_deletes_a_referenced_object_but_restores_it_from_the_cache(
    two_models: tuple[LocalStore, Path, Path], tmp_path: Path
) -> None:
    store, _a, _b = two_models
    _a_id, a_manifest = manifest_of(store, "a:v1")
    victim = sorted(a_manifest.shards)[0]
    path = store.root / shard_key(victim)
    intact = path.read_bytes()
    flip_byte(path)
    empty_cache = ShardCache(tmp_path / "empty-cache")
    report = verify(Repository(store), read_data=True, repair=True, cache=empty_cache)
    assert not report.healthy and path.exists() and "referenced, so not deleted" in report.problems[0]

    cache = ShardCache(tmp_path / "cache")
    cache.put(victim, intact)  # a client pulled this shard before the disk went bad
    figures = cli_json("verify", "--store", str(store.root), "--read-data", "--repair", "--cache", str(cache.root))
    assert figures["healthy"] is True and "rewritten from an intact copy" in str(figures["repaired"])
    assert path.read_bytes() == intact


def test_repair_deletes_corrupt_unreferenced_objects_and_cache_entries(
    two_models: tuple[LocalStore, Path, Path], tmp_path: Path
) -> None:
    store, _a, _b = two_models
    stray = b"left by a killed writer, garbled"
    corrupt_id = digest(b"what it should have been")
    store.put(shard_key(corrupt_id), stray)  # unreferenced and not what its name says
    healthy_orphan = b"an orphan blob, intact"
    store.put(blob_key(digest(healthy_orphan)), healthy_orphan)
    store.put("manifests/not-an-id.json", b"{}")
    cache = ShardCache(tmp_path / "cache")
    good = b"cached shard"
    cache.put(digest(good), good)
    cache.put(digest(b"other"), b"other")
    flip_byte(cache._path(digest(b"other")))

    checked = verify(Repository(store), read_data=True, cache=cache)
    assert len(checked.problems) == 3 and all("--repair deletes it" in p for p in checked.problems)
    assert checked.unreferenced == 3 and checked.cache_entries == 2

    repaired = verify(Repository(store), repair=True, cache=cache)
    assert repaired.healthy and len(repaired.repaired) == 3
    assert not store.exists(shard_key(corrupt_id)) and not store.exists("manifests/not-an-id.json")
    assert store.exists(blob_key(digest(healthy_orphan)))  # healthy garbage is gc's business
    assert cache.get(digest(good)) == good and digest(b"other") not in cache
    assert verify(Repository(store), read_data=True).healthy


def test_verify_reports_a_missing_shard_and_a_missing_base(two_models: tuple[LocalStore, Path, Path]) -> None:
    store, _a, _b = two_models
    _b_id, b_manifest = manifest_of(store, "b:v1")
    gone = sorted(b_manifest.shards)[-1]
    store.delete(shard_key(gone))
    orphan_base = "f" * 64
    delta_id, _ = Repository(store).put_manifest(dataclasses.replace(b_manifest, base=orphan_base, _bytes=b""))
    report = verify(Repository(store))
    assert any(p.startswith(f"{shard_key(gone)}: ") for p in report.problems)
    assert f"{manifest_key(delta_id)}: base manifest {orphan_base} is not readable in the store" in report.problems


def test_verify_shows_progress_in_bytes_and_refuses_a_cache_that_is_not_there(
    two_models: tuple[LocalStore, Path, Path], tmp_path: Path
) -> None:
    store, _a, _b = two_models
    stored = sum(path.stat().st_size for kind in ("shards", "blobs") for path in (store.root / kind).rglob("*")
                 if path.is_file())
    shown = subprocess.run([sys.executable, "-m", "shardstore", "verify", "--store", str(store.root), "--read-data"],
                           capture_output=True, text=True, timeout=300)
    assert shown.returncode == 0, shown.stderr
    final = shown.stderr.replace("\r", "\n").strip().splitlines()[-1]
    # One bar over every referenced shard and blob, in bytes, ending at their total: "586k/586k" (1024-based,
    # three significant figures), so the sizes on disk must agree within the rounding.
    assert final.startswith("verify: reading and decoding: 100%"), shown.stderr
    done, total = re.search(r"\| ([0-9.]+[kMG]?)/([0-9.]+[kMG]?) ", final).groups()  # type: ignore[union-attr]
    scale = {"k": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    shown_bytes = [float(v.rstrip("kMG")) * scale.get(v[-1], 1) for v in (done, total)]
    assert shown_bytes[0] == shown_bytes[1] and abs(shown_bytes[1] - stored) <= 0.01 * stored, (stored, final)
    quiet = subprocess.run([sys.executable, "-m", "shardstore", "verify", "--store", str(store.root), "--json"],
                           capture_output=True, text=True, timeout=300)
    assert quiet.returncode == 0 and quiet.stderr == "" and json.loads(quiet.stdout)["healthy"] is True
    missing = subprocess.run([sys.executable, "-m", "shardstore", "verify", "--store", str(store.root),
                              "--cache", str(tmp_path / "no-such-cache")], capture_output=True, text=True, timeout=300)
    assert missing.returncode == 1 and missing.stdout == ""
    assert missing.stderr.strip().splitlines() == [
        f"shardstore verify: error: --cache {tmp_path / 'no-such-cache'}: no such shard cache folder"]
