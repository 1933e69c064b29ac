"""What a stored model holds: per tensor dtype, shape, raw and stored bytes, codec and shards."""

from __future__ import annotations

from typing import Any

from shardstore.format.manifest import Manifest


def _ratio(stored: int, raw: int) -> float:
    return round(stored / raw, 6) if raw else 1.0


def describe(manifest: Manifest, ref: str, manifest_id: str) -> dict[str, Any]:
    tensors = {
        name: {
            "dtype": t.dtype,
            "shape": list(t.shape),
            "raw_bytes": t.raw_bytes,
            "stored_bytes": t.stored_bytes,
            "ratio": _ratio(t.stored_bytes, t.raw_bytes),
            "codec": t.codec[-1]["id"],
            "shards": list(dict.fromkeys(p.shard for p in t.pieces)),
        }
        for name in manifest.select(None)
        for t in [manifest.tensors[name]]
    }
    return {
        "ref": ref,
        "manifest_id": manifest_id,
        "raw_bytes": manifest.raw_bytes,
        "stored_bytes": manifest.stored_bytes,
        "ratio": _ratio(manifest.stored_bytes, manifest.raw_bytes),
        "blob_bytes": sum(b.size for b in manifest.blobs.values()),
        "shards": len(manifest.shards),
        "files": [f.path for f in manifest.files] + list(manifest.blobs),
        "tensors": tensors,
    }
