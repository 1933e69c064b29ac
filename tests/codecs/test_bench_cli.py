"""``shardstore bench codecs``: a 0-d int64 tensor (BatchNorm's counter) is benched, --only and --repeats work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from shardstore.cli import main


def test_bench_codecs_takes_a_0d_int64_tensor_and_only_and_repeats(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bn.safetensors"
    save_file({"bn.num_batches_tracked": torch.tensor(7), "bn.weight": torch.randn(256, 64)}, str(path))
    assert main(["bench", "codecs", str(path), "--only", "raw.v1,zstd -3", "--repeats", "2", "--threads", "1",
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["repeats"] == 2
    # The file's F32 variant and the BF16 and F16 copies; each with just the two runners asked for.
    assert [[row["name"] for row in v["rows"]] for v in result["variants"]] == [["raw.v1", "zstd -3"]] * 3
    assert all(row["roundtrip_ok"] for v in result["variants"] for row in v["rows"])
    assert result["variants"][0]["raw_bytes"] == 8 + 256 * 64 * 4  # the 0-d counter's 8 bytes are in


def test_bench_codecs_refuses_an_unknown_name_and_zero_repeats(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.randn(8, 8)}, str(path))
    assert main(["bench", "codecs", str(path), "--only", "nope"]) == 1
    assert "no codec or peer named nope" in capsys.readouterr().err
    assert main(["bench", "codecs", str(path), "--repeats", "0"]) == 1
    assert "--repeats must be at least 1" in capsys.readouterr().err
