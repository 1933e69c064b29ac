"""What changed between two versions of a model, and what an upgrade from one to the other costs.

The one computation behind ``shardstore diff A B`` and the web view's compare page:

* **Tensors** are unchanged, changed, added or removed. A tensor is *unchanged* when B holds the
  same values as A: dtype, shape and row pieces agree and every piece is the same stream, or a
  stream whose decoded bytes have the same checksum (read from the shard headers, never by
  decoding). So a tensor that sits in a re-packed shard because a neighbour changed, or was
  re-encoded with another lossless codec, counts as unchanged. A delta piece (``push --base``)
  is the same only as a delta of the same bytes against the same base piece; pieces cut at other
  rows (another ``--chunk-size``) compare as changed, since no piece checksum covers the same bytes.
* **Bytes to fetch**: a client holding A has every shard and file of A (they are named by
  content), so getting B costs B's shards that A lacks plus B's non-tensor files whose content A
  lacks. The manifest and the safetensors header blobs (a few KiB) are not counted.
* **Shards shared**: shards both manifests list, with their bytes (a delta lists its base's shards).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from shardstore.format.manifest import Manifest, PieceBase, PieceRef, TensorRecord
from shardstore.format.shard import StreamHeader
from shardstore.repo.pool import ordered_map
from shardstore.repo.repository import Repository, resolve_ref_text

# Stream headers of the shards asked for: shard id → stream key → header.
HeadReader = Callable[[dict[str, int]], dict[str, dict[str, StreamHeader]]]


@dataclass(frozen=True)
class TensorChange:
    """A tensor both versions hold, with different values: how it was stored in A and how in B."""

    name: str
    dtype: tuple[str, str]
    shape: tuple[tuple[int, ...], tuple[int, ...]]
    codec: tuple[str, str]
    raw_bytes: tuple[int, int]
    stored_bytes: tuple[int, int]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": list(self.dtype), "shape": [list(s) for s in self.shape],
                "codec": list(self.codec), "raw_bytes": list(self.raw_bytes), "stored_bytes": list(self.stored_bytes)}


@dataclass(frozen=True)
class ModelDiff:
    a: str  # the refs as given (name:tag), or manifest ids
    b: str
    a_manifest: str
    b_manifest: str
    unchanged: tuple[str, ...]
    changed: tuple[TensorChange, ...]
    added: tuple[str, ...]  # in B's file order
    removed: tuple[str, ...]  # in A's file order
    fetch_shards: int  # B's shards that A lacks
    fetch_shard_bytes: int
    fetch_files: tuple[str, ...]  # B's non-tensor files whose content A lacks
    fetch_file_bytes: int
    shared_shards: int
    shared_bytes: int
    full_bytes: int  # what a client with nothing fetches for B: all its shards and files
    files: dict[str, tuple[str, ...]] = field(default_factory=dict)  # non-tensor files: unchanged/changed/...

    @property
    def fetch_bytes(self) -> int:
        return self.fetch_shard_bytes + self.fetch_file_bytes

    def to_json(self) -> dict[str, Any]:
        return {
            "a": self.a, "b": self.b, "a_manifest": self.a_manifest, "b_manifest": self.b_manifest,
            "tensors": {"unchanged": len(self.unchanged), "changed": len(self.changed), "added": len(self.added),
                        "removed": len(self.removed)},
            "changed": [c.to_json() for c in self.changed],
            "added": list(self.added),
            "removed": list(self.removed),
            "unchanged": list(self.unchanged),
            "fetch_bytes": self.fetch_bytes,
            "fetch_shards": self.fetch_shards,
            "fetch_shard_bytes": self.fetch_shard_bytes,
            "fetch_file_bytes": self.fetch_file_bytes,
            "shards_shared": self.shared_shards,
            "shared_bytes": self.shared_bytes,
            "full_bytes": self.full_bytes,
            "files": {kind: list(paths) for kind, paths in self.files.items()},
        }


def codec_text(record: TensorRecord) -> str:
    return "+".join(str(c["id"]) for c in record.codec)


def _piece_refs(record: TensorRecord) -> list[tuple[str, str, tuple[int, int], PieceBase | None]]:
    return [(p.shard, p.stream, p.rows, p.base) for p in record.pieces]


def _shards_of(record: TensorRecord) -> set[str]:
    found: set[str] = set()
    for piece in record.pieces:
        found.add(piece.shard)
        base = piece.base
        while base is not None:
            found.add(base.shard)
            base = base.base
    return found


def _content_key(heads: dict[str, dict[str, StreamHeader]], shard: str, stream: str,
                 base: PieceBase | None) -> tuple[Any, ...]:
    """What a piece decodes to, as far as headers tell: its stream's checksum of decoded bytes, and its base's."""
    header = heads.get(shard, {}).get(stream)
    mine: tuple[Any, ...] = (shard, stream) if header is None else (header.dtype, header.shape, header.checksum)
    return mine if base is None else (*mine, _content_key(heads, base.shard, base.stream, base.base))


def _piece_key(heads: dict[str, dict[str, StreamHeader]], piece: PieceRef) -> tuple[Any, ...]:
    return (piece.rows, _content_key(heads, piece.shard, piece.stream, piece.base))


def diff_manifests(a: Manifest, b: Manifest, read_heads: HeadReader, *, a_name: str = "", b_name: str = "",
                   a_id: str = "", b_id: str = "") -> ModelDiff:
    """Compare two manifests; ``read_heads`` supplies the stream headers of shards the comparison needs."""
    a_names, b_names = a.select(None), b.select(None)
    common = [n for n in b_names if n in a.tensors]
    # Tensors whose pieces name the same streams are unchanged without reading anything; others whose
    # dtype, shape and row cuts agree need their shards' stream checksums.
    undecided: list[str] = []
    unchanged: list[str] = []
    changed_names: set[str] = set()
    for name in common:
        ta, tb = a.tensors[name], b.tensors[name]
        if _piece_refs(ta) == _piece_refs(tb):
            unchanged.append(name)
        elif ta.dtype != tb.dtype or ta.shape != tb.shape or [p.rows for p in ta.pieces] != [p.rows for p in tb.pieces]:
            changed_names.add(name)
        else:
            undecided.append(name)
    wanted: dict[str, int] = {}
    for name in undecided:
        for manifest in (a, b):
            for shard in _shards_of(manifest.tensors[name]):
                wanted[shard] = manifest.shards[shard]
    heads = read_heads(wanted) if wanted else {}
    for name in undecided:
        ta, tb = a.tensors[name], b.tensors[name]
        if [_piece_key(heads, p) for p in ta.pieces] == [_piece_key(heads, p) for p in tb.pieces]:
            unchanged.append(name)
        else:
            changed_names.add(name)
    order = {name: i for i, name in enumerate(b_names)}
    unchanged.sort(key=order.__getitem__)
    changed = tuple(
        TensorChange(name, (a.tensors[name].dtype, b.tensors[name].dtype),
                     (a.tensors[name].shape, b.tensors[name].shape),
                     (codec_text(a.tensors[name]), codec_text(b.tensors[name])),
                     (a.tensors[name].raw_bytes, b.tensors[name].raw_bytes),
                     (a.tensors[name].stored_bytes, b.tensors[name].stored_bytes))
        for name in b_names if name in changed_names
    )
    new_shards = {s: size for s, size in b.shards.items() if s not in a.shards}
    shared = {s: size for s, size in b.shards.items() if s in a.shards}
    a_blob_ids = {blob.id for blob in a.blobs.values()}
    new_files = {path: blob.size for path, blob in b.blobs.items() if blob.id not in a_blob_ids}
    files = {
        "unchanged": tuple(p for p in b.blobs if p in a.blobs and a.blobs[p].id == b.blobs[p].id),
        "changed": tuple(p for p in b.blobs if p in a.blobs and a.blobs[p].id != b.blobs[p].id),
        "added": tuple(p for p in b.blobs if p not in a.blobs),
        "removed": tuple(p for p in a.blobs if p not in b.blobs),
    }
    return ModelDiff(
        a=a_name, b=b_name, a_manifest=a_id, b_manifest=b_id,
        unchanged=tuple(unchanged), changed=changed,
        added=tuple(n for n in b_names if n not in a.tensors),
        removed=tuple(n for n in a_names if n not in b.tensors),
        fetch_shards=len(new_shards), fetch_shard_bytes=sum(new_shards.values()),
        fetch_files=tuple(new_files), fetch_file_bytes=sum(new_files.values()),
        shared_shards=len(shared), shared_bytes=sum(shared.values()),
        full_bytes=sum(b.shards.values()) + sum(blob.size for blob in b.blobs.values()),
        files=files,
    )


def repository_heads(repo: Repository) -> HeadReader:
    """A :data:`HeadReader` over a repository: range reads of each shard's header, several in flight."""

    def read(sizes: dict[str, int]) -> dict[str, dict[str, StreamHeader]]:
        items: Iterable[tuple[str, int]] = sizes.items()
        pairs = ordered_map(lambda item: (item[0], repo.get_shard_head(*item)), items, max(4, repo.concurrency))
        return dict(pairs)

    return read


def diff_refs(repo: Repository, a: str, b: str) -> ModelDiff:
    """``diff_manifests`` of two refs (``name:tag``) of one repository."""
    ref_a, id_a, manifest_a = resolve_ref_text(repo, a)
    ref_b, id_b, manifest_b = resolve_ref_text(repo, b)
    return diff_manifests(manifest_a, manifest_b, repository_heads(repo), a_name=str(ref_a), b_name=str(ref_b),
                          a_id=id_a, b_id=id_b)
