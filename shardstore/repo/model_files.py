"""Reading a model from disk: one ``.safetensors`` file, or a Hugging Face style folder.

A folder's ``*.safetensors`` files (at any depth) hold the tensors; every other
file (config.json, tokenizer files, ``model.safetensors.index.json``...) is kept
byte for byte as a blob. Pickle checkpoints are never stored: loading one runs
arbitrary code, and a registry must never pass them on. A Hub folder often holds
both ``model.safetensors`` and ``pytorch_model.bin``: there the pickles (and their
``*.bin.index.json``) are skipped and reported, as transformers itself loads the
safetensors first; a folder with only pickles is refused.

``include``/``exclude`` globs pick files by their path inside the folder (like
``hf upload``): with includes only matching files are read, excludes drop files.
"""

from __future__ import annotations

import contextlib
import fnmatch
import mmap
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from shardstore.errors import InvalidInputError
from shardstore.format import canonical_json
from shardstore.format.safetensors_io import SafetensorsHeader, read_file_header

try:
    from shardstore.repo import _mapguard  # type: ignore[attr-defined]
except ImportError:  # built without its C extension (no compiler, not POSIX): unguarded, as before
    _mapguard = None

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
PICKLE_INDEX_SUFFIX = ".bin.index.json"  # pytorch_model.bin.index.json: maps tensors to the pickle files
SKIPPED_FOLDERS = {".git", ".cache", "__pycache__"}
INDEX_SUFFIX = ".safetensors.index.json"


@dataclass(frozen=True)
class TensorFile:
    path: Path
    rel: str  # path inside the model, '/'-separated; what pull recreates
    header: SafetensorsHeader


@dataclass(frozen=True)
class ModelFiles:
    tensor_files: tuple[TensorFile, ...]
    other_files: tuple[tuple[str, Path], ...]
    # Files of the folder left out, with why: (path inside the model, reason).
    skipped: tuple[tuple[str, str], ...] = ()

    def tensor_count(self) -> int:
        return sum(len(f.header.tensors) for f in self.tensor_files)


def _walk(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIPPED_FOLDERS)
        for name in sorted(filenames):
            yield Path(dirpath) / name


SKIPPED_PICKLE = "pickle weights: the .safetensors weights are pushed instead (transformers prefers them too)"
SKIPPED_BY_GLOB = "left out by --include/--exclude"


def _matches(rel: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(rel, p) or fnmatch.fnmatchcase(rel.rsplit("/", 1)[-1], p) for p in patterns)


def scan_model(src: str | os.PathLike[str], include: Sequence[str] = (), exclude: Sequence[str] = ()) -> ModelFiles:
    """Find and validate every file of a model; nothing is read past the safetensors headers.

    A glob matches a file's path inside the folder (``onnx/*``) or its name (``*.bin``).
    """
    root = Path(src)
    if not root.exists():
        raise InvalidInputError(f"{src}: no such file or folder")
    if not root.is_file() and not root.is_dir():
        raise InvalidInputError(f"{src}: not a regular file or a folder (a FIFO, socket or device)")
    if root.is_file():
        if not root.name.endswith(".safetensors"):
            raise InvalidInputError(f"{src}: not a .safetensors file (or a model folder)")
        files = [TensorFile(root, root.name, read_file_header(str(root)))]
        return ModelFiles(tuple(files), ())
    tensor_files: list[TensorFile] = []
    others: list[tuple[str, Path]] = []
    pickles: list[tuple[str, Path]] = []
    skipped: list[tuple[str, str]] = []
    for path in _walk(root):
        rel = path.relative_to(root).as_posix()
        if (include and not _matches(rel, include)) or _matches(rel, exclude):
            skipped.append((rel, SKIPPED_BY_GLOB))
        elif not path.is_file():
            # A FIFO would block the read forever, a device never end; symlinks to regular files are
            # followed (is_file follows them): Hugging Face cache folders are made of them.
            raise InvalidInputError(f"{path}: not a regular file (a FIFO, socket, device or broken link); "
                                    "push reads regular files and symlinks to them")
        elif path.name.endswith(PICKLE_SUFFIXES) or path.name.endswith(PICKLE_INDEX_SUFFIX):
            pickles.append((rel, path))
        elif path.name.endswith(".safetensors"):
            tensor_files.append(TensorFile(path, rel, read_file_header(str(path))))
        elif path.is_file():
            others.append((rel, path))
    weights = [path for rel, path in pickles if not rel.endswith(PICKLE_INDEX_SUFFIX)]
    if not tensor_files:
        if weights:
            raise InvalidInputError(f"{weights[0]}: refusing a pickle checkpoint (loading it can run code); "
                                    "convert it to safetensors")
        raise InvalidInputError(f"{src}: no .safetensors files in this folder")
    skipped += [(rel, SKIPPED_PICKLE) for rel, _path in pickles]
    owner: dict[str, str] = {}
    for tensor_file in tensor_files:
        for entry in tensor_file.header.tensors:
            if entry.name in owner:
                raise InvalidInputError(
                    f"{tensor_file.path}: tensor {entry.name!r} is also in {owner[entry.name]}"
                )
            owner[entry.name] = tensor_file.rel
    for rel, path in others:
        if rel.endswith(INDEX_SUFFIX):
            _check_index(path, rel, owner, root)
    return ModelFiles(tuple(tensor_files), tuple(others), tuple(sorted(skipped)))


def _check_index(path: Path, rel: str, owner: dict[str, str], root: Path) -> None:
    """An index that disagrees with the files would make the pulled model unloadable."""
    doc = canonical_json.loads(path.read_bytes(), str(path))
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict):
        raise InvalidInputError(f"{path}: no weight_map")
    folder = Path(rel).parent
    for name, file_name in weight_map.items():
        expected = (folder / str(file_name)).as_posix()
        if owner.get(name) != expected:
            raise InvalidInputError(f"{path}: maps tensor {name!r} to {file_name}, which does not hold it")


def _identity(stat: os.stat_result) -> tuple[int, int, int, int]:
    """What changes when a file is rewritten, truncated or replaced: device, inode, size, modification time.

    Not the change time: a chmod or a new hard link changes it, and neither changes a byte.
    """
    return stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns


class MappedFiles:
    """Memory-maps tensor files read-only and hands out one view per tensor.

    Views must be released before their map can close; any still exported
    (a slice a caller kept) leave the map to the garbage collector instead.

    A file another program rewrites while it is mapped: reads past a new, shorter end would raise
    SIGBUS and kill the process. ``_mapguard`` (a C extension; without it, that is what happens)
    turns such reads into zeros and counts them, and :meth:`check_unchanged` then refuses the
    whole read in one line naming the file. Callers check before they record anything.
    """

    def __init__(self, model: ModelFiles) -> None:
        self._model = model
        self._maps: list[mmap.mmap] = []
        self._views: list[memoryview] = []
        self._watched: list[tuple[Path, int, tuple[int, int, int, int]]] = []  # path, guard slot, identity

    def __enter__(self) -> dict[str, memoryview]:
        try:
            return self._map_all()
        except BaseException:
            # __exit__ does not run when __enter__ raises: without this, the files mapped so far
            # would stay guarded after their maps close, and a later mapping at the same address
            # would read zeros where it should fault.
            self.__exit__()
            raise

    def _map_all(self) -> dict[str, memoryview]:
        views: dict[str, memoryview] = {}
        for tensor_file in self._model.tensor_files:
            with tensor_file.path.open("rb") as handle:
                identity = _identity(os.fstat(handle.fileno()))
                if identity[2] == 0:
                    continue
                mm = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
            self._maps.append(mm)
            self._watched.append((tensor_file.path, _mapguard.watch(mm) if _mapguard else -1, identity))
            whole = memoryview(mm)
            self._views.append(whole)
            base = tensor_file.header.data_offset
            for entry in tensor_file.header.tensors:
                views[entry.name] = whole[base + entry.begin : base + entry.end]
                self._views.append(views[entry.name])
        return views

    def check_unchanged(self) -> None:
        """Raise, naming the file, if any mapped file changed since it was mapped (so what was read may be wrong)."""
        for path, slot, identity in self._watched:
            zeroed = _mapguard.faults(slot) if _mapguard else 0
            try:
                now = _identity(os.stat(path))
            except OSError:
                now = None
            if zeroed or now != identity:
                what = f"it shrank under {zeroed} pages read" if zeroed else "its size or times changed"
                raise InvalidInputError(f"{path}: changed while it was being read ({what}); nothing was recorded: "
                                        "push it again once whatever writes it is done")

    def __exit__(self, *exc: object) -> None:
        for _path, slot, _identity in self._watched:
            if _mapguard:
                _mapguard.unwatch(slot)
        self._watched.clear()
        for view in self._views:
            view.release()
        self._views.clear()
        for mm in self._maps:
            with contextlib.suppress(BufferError):
                mm.close()
        self._maps.clear()
