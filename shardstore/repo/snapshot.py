"""Snapshots: a stored model as a Hugging Face style folder, written once per manifest and reused.

``<cache>/snapshots/<manifest id>/`` holds the model's ``*.safetensors`` files, its
index when sharded, config and tokenizer files, byte for byte as pushed, so any
tool that takes a folder (transformers, sentence-transformers, vLLM) can read it.

Decisions (docs/loading.md, "Snapshots"):

* Named by the manifest id, not the ref: a manifest is immutable, so a folder
  that exists is complete and current for every ref that resolves to it, and a
  tag that moves gets a new folder instead of a half-rewritten one. Only the ref
  is asked of the source each time (tags move); a folder already there costs no
  manifest, blob or shard transfer and no write.
* Atomic: the folder is written under ``.tmp-<id>-<pid>-<random>`` beside its
  final name and renamed once every file is fsynced. A crash leaves only a
  temporary folder, which the next snapshot removes when its writer is gone; a
  reader never sees a half-written snapshot. Two processes racing on one model
  both write, the first rename wins, and the second discards its copy.
* The snapshot is a copy for tools, not the source of truth: it is not checked
  again when reused (as Hugging Face's cache is not); delete the folder to have
  it written afresh.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from shardstore.progress import ProgressCallback
from shardstore.repo.pull import write_model
from shardstore.repo.refs import parse_ref
from shardstore.repo.registry import ModelSource

SNAPSHOTS_FOLDER = "snapshots"
_TMP_PREFIX = ".tmp-"


@dataclass(frozen=True)
class SnapshotReport:
    ref: str
    manifest_id: str
    path: str
    reused: bool  # the folder was there already: nothing fetched or written but the ref's answer
    transferred_bytes: int  # bytes received from the source, the ref's answer included
    written_bytes: int  # bytes written to disk (weights and other files)
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def snapshot_path(root: str | os.PathLike[str], manifest_id: str) -> Path:
    return Path(root) / SNAPSHOTS_FOLDER / manifest_id


def snapshot(source: ModelSource, ref_text: str, root: str | os.PathLike[str], *, threads: int | None = None,
             progress: ProgressCallback | None = None) -> SnapshotReport:
    """The folder of ``ref_text`` under ``root/snapshots``, written only if no snapshot of its manifest exists."""
    started = time.perf_counter()
    received_before = source.transferred_bytes
    ref = parse_ref(ref_text)
    # Most calls find the snapshot on disk: the manifest is asked for only when it is not.
    manifest_id = source.resolve(ref, with_manifest=False)
    final = snapshot_path(root, manifest_id)
    if final.is_dir():
        return SnapshotReport(str(ref), manifest_id, str(final), True, source.transferred_bytes - received_before,
                              0, round(time.perf_counter() - started, 3))
    parent = final.parent
    parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(parent)
    temporary = parent / f"{_TMP_PREFIX}{manifest_id}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        manifest = source.get_manifest(manifest_id)
        report = write_model(source, str(ref), manifest_id, manifest, temporary, threads=threads, progress=progress,
                             started=started, received_before=received_before)
        written = _fsync_tree(temporary)  # the small files and the folders too, before the rename
        try:
            os.rename(temporary, final)
        except OSError:
            if not final.is_dir():
                raise
            shutil.rmtree(temporary, ignore_errors=True)  # another process finished the same snapshot first
        _fsync_dir(parent)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return SnapshotReport(str(ref), manifest_id, str(final), False, report.transferred_bytes, written,
                          round(time.perf_counter() - started, 3))


def _remove_abandoned(parent: Path) -> None:
    """Delete temporary snapshot folders whose writer process no longer runs (it crashed or was killed)."""
    for entry in parent.iterdir():
        if not entry.name.startswith(_TMP_PREFIX):
            continue
        try:
            pid = int(entry.name.split("-")[-2])
        except (IndexError, ValueError):
            continue
        if pid != os.getpid() and not _alive(pid):
            shutil.rmtree(entry, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive
    return True


def _fsync_tree(root: Path) -> int:
    """fsync every file and folder under ``root``; returns the bytes the files hold."""
    total = 0
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
                total += os.fstat(fd).st_size
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))
    return total


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # some filesystems cannot fsync a folder; the rename is still atomic
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
