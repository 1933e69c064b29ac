"""What a stored model holds: per tensor dtype, shape, raw and stored bytes, codec and shards."""

from __future__ import annotations

from typing import Any

from shardstore.format.manifest import Manifest


def _ratio(stored: int, raw: int) -> float:
    return round(stored / raw, 6) if raw else 1.0


def tensor_figures(manifest: Manifest, name: str) -> dict[str, Any]:
    """How one tensor is stored: codec, sizes, ratio; for a push with --base, what came from the base.

    ``codec`` is the tensor's pipeline joined by ``+`` (a quantizer before its lossless coder,
    ``sparse-bitmap.v1`` for sparse tensors) behind
    ``delta+`` when its pieces are XOR deltas against the base, or ``base`` when the base
    already stores every piece unchanged. ``new_bytes`` counts only shards the base lacks.
    """
    t = manifest.tensors[name]
    delta = sum(1 for p in t.pieces if p.base is not None)
    from_base = sum(1 for p in t.pieces if p.shard in manifest.base_shards)
    # The whole pipeline: a quantizer or pruner shows in front of its lossless coder.
    codec = "+".join(c["id"] for c in t.codec)
    if t.pieces and from_base == len(t.pieces):
        codec = "base"
    elif delta:
        codec = f"delta+{codec}" if delta == len(t.pieces) else f"delta({delta}/{len(t.pieces)})+{codec}"
    new_bytes = sum(p.stored_bytes for p in t.pieces if p.shard not in manifest.base_shards)
    pruned = [c.get("fraction") for c in t.codec if c["id"] == "prune-magnitude.v1"]
    return {
        "codec": codec,
        "raw_bytes": t.raw_bytes,
        "stored_bytes": t.stored_bytes,
        "ratio": _ratio(t.stored_bytes, t.raw_bytes),
        "new_bytes": new_bytes,
        # A lossy tensor's error against the original (rel_rmse, snr_db, max_abs_error).
        **({"quality": t.quality} if t.quality is not None else {}),
        # A pruned tensor's share of elements zeroed by magnitude (``prune-magnitude.v1``).
        **({"pruned": pruned[0]} if pruned else {}),
    }


def describe(manifest: Manifest, ref: str, manifest_id: str) -> dict[str, Any]:
    tensors = {
        name: {
            "dtype": t.dtype,
            "shape": list(t.shape),
            **tensor_figures(manifest, name),
            "shards": list(dict.fromkeys(p.shard for p in t.pieces)),
        }
        for name in manifest.select(None)
        for t in [manifest.tensors[name]]
    }
    return {
        "ref": ref,
        "manifest_id": manifest_id,
        "created": manifest.created,
        "raw_bytes": manifest.raw_bytes,
        "stored_bytes": manifest.stored_bytes,
        "ratio": _ratio(manifest.stored_bytes, manifest.raw_bytes),
        "base": manifest.base,
        "blob_bytes": sum(b.size for b in manifest.blobs.values()),
        "shards": len(manifest.shards),
        "files": [f.path for f in manifest.files] + list(manifest.blobs),
        "tensors": tensors,
    }
