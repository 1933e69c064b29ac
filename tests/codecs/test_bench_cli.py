"""``shardstore bench codecs``: a 0-d int64 tensor (BatchNorm's counter) is benched, --only and --repeats work;
and the decode kernel bench runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from shardstore.cli import main
from shardstore.codecs import entropy as E


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


@pytest.mark.skipif(E.C_KERNELS is None, reason="no C extension")
def test_decode_kernel_bench_checks_every_row_and_prints_one_json_object() -> None:
    """bench/bench_decode_kernel.py: every level the CPU has, the fresh-output row and ZipNN, each
    checked against the piece before it is timed; --json prints one object and nothing else."""
    script = Path(__file__).resolve().parents[2] / "bench" / "bench_decode_kernel.py"
    done = subprocess.run([sys.executable, str(script), "--repeats", "1", "--json"], capture_output=True,
                          text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    best = {"none": 0, "avx2": 1, "avx512": 2}[E._entropy.simd()]
    assert len(result["pieces"]) == 4
    for rows in result["pieces"].values():
        assert [name for name in rows if name.startswith("ours, level")] == [
            f"ours, level {level} ({name})" for level, name in enumerate(["portable", "avx2", "avx512"][: best + 1])
        ]
        assert {"ours, fresh output", "zipnn"} <= set(rows)
        assert all(row["gb_per_s"] > 0 for row in rows.values())
