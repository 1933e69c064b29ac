"""The figures behind each page of the web view, read from a repository (blocking: callers run them in a thread).

Nothing here knows HTML or tokens: :mod:`shardstore.http.webview` decides who may see which
name and renders these figures. Manifests are immutable, so parsed ones are kept (a few, by id)
and a page load after the first reads only the refs.
"""

from __future__ import annotations

import json
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from shardstore.errors import NotFoundError, ShardstoreError
from shardstore.format.manifest import Manifest
from shardstore.repo.chunking import layer_of
from shardstore.repo.diff import ModelDiff, diff_manifests, repository_heads
from shardstore.repo.inspect import tensor_figures
from shardstore.repo.refs import Ref
from shardstore.repo.repository import Repository, manifest_key

# config.json keys shown on the model page, in this order, with their labels.
CONFIG_FIELDS = (
    ("architectures", "architecture"),
    ("model_type", "model type"),
    ("hidden_size", "hidden size"),
    ("num_hidden_layers", "layers"),
    ("num_attention_heads", "attention heads"),
    ("intermediate_size", "intermediate size"),
    ("vocab_size", "vocabulary"),
    ("max_position_embeddings", "max positions"),
    ("torch_dtype", "dtype"),
)
MAX_CONFIG_BYTES = 1 << 20  # a config.json past this is not a config; the page skips it


class MissingModel(NotFoundError):
    """No such ref: says which, and nothing of where the store is (a page shows this)."""

    def __init__(self, ref: Ref) -> None:
        super().__init__(f"no model {ref} here")
        self.ref = ref


@dataclass(frozen=True)
class Summary:
    """What the registry shows of one manifest: a few numbers, kept for thousands of versions at little cost."""

    raw_bytes: int
    stored_bytes: int
    tensors: int
    shards: int
    base: str | None
    created: datetime | None
    # Tensors per leading codec (the quantizer of a lossy tensor, else its lossless coder), most first.
    codec_mix: tuple[tuple[str, int], ...]

    @property
    def ratio(self) -> float:
        return self.stored_bytes / self.raw_bytes if self.raw_bytes else 1.0


@dataclass(frozen=True)
class Version:
    """One ref with the figures of the registry page."""

    ref: Ref
    manifest_id: str
    summary: Summary


@dataclass(frozen=True)
class LayerBar:
    layer: str
    tensors: int
    raw_bytes: int
    stored_bytes: int


@dataclass
class ModelPage:
    version: Version
    base_refs: list[str]  # refs (readable by the viewer) whose manifest is this one's base
    config: list[tuple[str, str]]
    dtypes: list[tuple[str, int]]
    layers: list[LayerBar]
    tensors: list[dict[str, Any]]
    files: list[dict[str, Any]]
    siblings: list[str]  # other tags of the same name, for the compare form
    lossy: bool = field(default=False)


class Pages:
    """Page figures over one repository, with caches of what never changes for a manifest id.

    Parsed manifests are large, so only a few are kept (``keep``); their registry summaries are
    small, so many are (``keep_summaries``): a registry of thousands of versions lists refs and
    reads only manifests it has not seen.
    """

    def __init__(self, repo: Repository, keep: int = 16, keep_summaries: int = 4096) -> None:
        self.repo = repo
        self._lock = threading.Lock()
        self._manifests: OrderedDict[str, Manifest] = OrderedDict()
        self._summaries: OrderedDict[str, Summary] = OrderedDict()
        self._diffs: OrderedDict[tuple[str, str], ModelDiff] = OrderedDict()
        self._limits = {id(self._manifests): keep, id(self._summaries): keep_summaries, id(self._diffs): keep}

    def _remember(self, cache: OrderedDict[Any, Any], key: Any, make: Callable[[], Any]) -> Any:
        with self._lock:
            if key in cache:
                cache.move_to_end(key)
                return cache[key]
        value = make()  # outside the lock: two first requests may both read; both get the same immutable answer
        with self._lock:
            cache[key] = value
            while len(cache) > self._limits[id(cache)]:
                cache.popitem(last=False)
        return value

    def manifest(self, manifest_id: str) -> Manifest:
        result: Manifest = self._remember(self._manifests, manifest_id, lambda: self.repo.get_manifest(manifest_id))
        return result

    def _created(self, manifest_id: str, manifest: Manifest) -> datetime | None:
        if manifest.created is not None:
            return datetime.strptime(manifest.created, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
        # Older manifests carry no time. They are written once (put_if_absent), so the object's is the push's.
        try:
            stamp = self.repo.store.modified(manifest_key(manifest_id))
        except ShardstoreError:
            return None
        return datetime.fromtimestamp(stamp, UTC) if stamp is not None else None

    def summary(self, manifest_id: str) -> Summary:
        def read() -> Summary:
            m = self.manifest(manifest_id)
            counts = Counter(str(t.codec[0]["id"]) for t in m.tensors.values())
            return Summary(m.raw_bytes, m.stored_bytes, len(m.tensors), len(m.shards), m.base,
                           self._created(manifest_id, m),
                           tuple(sorted(counts.items(), key=lambda item: (-item[1], item[0]))))

        result: Summary = self._remember(self._summaries, manifest_id, read)
        return result

    def versions(self, readable: Callable[[str], bool]) -> list[Version]:
        """Every ref the viewer may read, sorted by name then tag."""
        found: list[Version] = []
        for ref, manifest_id in self.repo.list_refs():
            if not readable(ref.name):
                continue
            try:
                summary = self.summary(manifest_id)
            except ShardstoreError:
                continue  # a manifest gone or damaged since the listing: verify reports it, the page skips it
            found.append(Version(ref, manifest_id, summary))
        return sorted(found, key=lambda v: (v.ref.name, v.ref.tag))

    def resolve(self, ref: Ref) -> str:
        """The ref's manifest id; :class:`MissingModel` (naming only the ref, not the store) when there is none."""
        try:
            return self.repo.resolve(ref)
        except NotFoundError:
            raise MissingModel(ref) from None

    def version(self, ref: Ref) -> Version:
        manifest_id = self.resolve(ref)
        return Version(ref, manifest_id, self.summary(manifest_id))

    def base_names(self, versions: list[Version]) -> dict[str, list[str]]:
        """Manifest id → the refs (among ``versions``) that point at it, to name a delta's base."""
        names: dict[str, list[str]] = {}
        for v in versions:
            names.setdefault(v.manifest_id, []).append(str(v.ref))
        return names

    def model(self, ref: Ref, readable: Callable[[str], bool]) -> ModelPage:
        version = self.version(ref)
        manifest = self.manifest(version.manifest_id)
        others = self.versions(readable)
        bases = self.base_names(others).get(manifest.base, []) if manifest.base else []
        layers: dict[str, LayerBar] = {}
        tensors: list[dict[str, Any]] = []
        for name in manifest.select(None):
            record = manifest.tensors[name]
            figures = tensor_figures(manifest, name)
            quality = figures.get("quality") or {}
            tensors.append({"name": name, "dtype": record.dtype, "shape": list(record.shape),
                            "codec": figures["codec"], "raw": record.raw_bytes, "stored": record.stored_bytes,
                            "ratio": figures["ratio"], "lossy": "quality" in figures,
                            "snr": quality.get("snr_db"), "max_error": quality.get("max_abs_error")})
            layer = layer_of(name) or name
            bar = layers.get(layer, LayerBar(layer, 0, 0, 0))
            layers[layer] = LayerBar(layer, bar.tensors + 1, bar.raw_bytes + record.raw_bytes,
                                     bar.stored_bytes + record.stored_bytes)
        files = [{"path": f.path, "kind": "weights", "size": sum(manifest.tensors[n].raw_bytes for n in f.tensors),
                  "tensors": len(f.tensors)} for f in manifest.files]
        files += [{"path": path, "kind": "file", "size": blob.size, "tensors": 0}
                  for path, blob in sorted(manifest.blobs.items())]
        dtypes = Counter(t.dtype for t in manifest.tensors.values())
        return ModelPage(
            version=version, base_refs=bases, config=self._config(manifest), layers=list(layers.values()),
            dtypes=sorted(dtypes.items(), key=lambda item: -item[1]), tensors=tensors, files=files,
            siblings=[str(v.ref) for v in others if v.ref.name == ref.name and v.ref != ref],
            lossy=any(t["lossy"] for t in tensors),
        )

    def _config(self, manifest: Manifest) -> list[tuple[str, str]]:
        """The config.json summary; empty when the model has none or it is not a JSON object."""
        blob = manifest.blobs.get("config.json")
        if blob is None or blob.size > MAX_CONFIG_BYTES:
            return []
        try:
            doc = json.loads(self.repo.get_blob(blob.id))
        except (ShardstoreError, ValueError):
            return []
        if not isinstance(doc, dict):
            return []
        summary: list[tuple[str, str]] = []
        for key, label in CONFIG_FIELDS:
            value = doc.get(key)
            if isinstance(value, list):
                value = ", ".join(str(v) for v in value)
            if value is not None and not isinstance(value, dict):
                summary.append((label, str(value)))
        return summary

    def compare(self, a: Ref, b: Ref) -> ModelDiff:
        """The diff of two refs; cached by manifest ids, since the answer for two manifests never changes."""
        a_id, b_id = self.resolve(a), self.resolve(b)

        def compute() -> ModelDiff:
            return diff_manifests(self.manifest(a_id), self.manifest(b_id), repository_heads(self.repo),
                                  a_name=str(a), b_name=str(b), a_id=a_id, b_id=b_id)

        cached: ModelDiff = self._remember(self._diffs, (a_id, b_id), compute)
        if (cached.a, cached.b) != (str(a), str(b)):  # same manifests under other names: same figures, these names
            cached = replace(cached, a=str(a), b=str(b))
        return cached

