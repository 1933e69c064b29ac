"""A second version of MiniLM with known edits, for the diff and web view tests.

Three tensors get new values, one is dropped and one is added; everything else (config,
tokenizer, the other 100 tensors) is byte for byte the original. The edited tensors share
shards with untouched neighbours, so a diff must look past shard ids to call those unchanged.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

MODEL_FILE = "model.safetensors"
EDITED = ("encoder.layer.2.attention.self.query.weight", "encoder.layer.4.output.LayerNorm.bias",
          "pooler.dense.weight")
REMOVED = "embeddings.position_ids"
ADDED = "classifier.weight"


def make_edited_minilm(source: Path, dest: Path) -> Path:
    shutil.copytree(source, dest, ignore=shutil.ignore_patterns(MODEL_FILE))
    tensors = load_file(str(source / MODEL_FILE))
    for name in EDITED:
        tensors[name] = (tensors[name] * np.float32(1.01) + np.float32(1e-3)).astype(np.float32)
    del tensors[REMOVED]
    tensors[ADDED] = np.random.default_rng(17).standard_normal((2, 384), dtype=np.float32)
    save_file(tensors, str(dest / MODEL_FILE), metadata={"format": "pt"})
    return dest
