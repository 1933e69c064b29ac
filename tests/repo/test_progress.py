"""Progress is reported through callbacks: the library prints nothing unasked, the CLI draws the bars."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

import shardstore
from shardstore.repo.policy import build_policy


def _model(folder: Path) -> Path:
    folder.mkdir()
    rng = np.random.default_rng(7)
    save_file({f"layers.{i}.weight": rng.standard_normal((256, 128)).astype(np.float32) for i in range(3)},
              str(folder / "model.safetensors"))
    return folder


def test_library_calls_print_nothing_and_callbacks_see_every_byte(tmp_path: Path,
                                                                  capfd: pytest.CaptureFixture[str]) -> None:
    model = _model(tmp_path / "model")
    raw = 3 * 256 * 128 * 4
    policy = build_policy(["auto"], min_snr_db=30)
    shardstore.push(model, "m:v1", store=str(tmp_path / "store"), chunk_bytes=64 << 10, policy=policy)
    shardstore.pull("m:v1", tmp_path / "out", store=str(tmp_path / "store"))
    assert capfd.readouterr() == ("", "")  # no bars, no lines: nothing a library caller did not ask for

    events: list[tuple[str, int, int]] = []
    shardstore.push(model, "m:v2", store=str(tmp_path / "store"), chunk_bytes=64 << 10, policy=policy,
                    progress=lambda task, advance, total: events.append((task, advance, total)))
    shardstore.pull("m:v2", tmp_path / "out2", store=str(tmp_path / "store"),
                    progress=lambda task, advance, total: events.append((task, advance, total)))
    assert capfd.readouterr() == ("", "")
    done: dict[str, int] = {}
    totals: dict[str, int] = {}
    for task, advance, total in events:
        if task not in done:
            assert advance == 0  # the first call announces the task
        done[task] = done.get(task, 0) + advance
        totals[task] = total
    assert done == totals  # every task reports exactly its total
    assert totals["push m:v2"] == totals["push: hashing"] == totals["pull m:v2"] == raw
    assert totals["auto: trying codecs"] == raw * 17  # 16 lossy candidates and lossless, on each weight


def test_cli_draws_bars_on_stderr_unless_json(tmp_path: Path) -> None:
    model = _model(tmp_path / "model")
    command = [sys.executable, "-m", "shardstore", "push", str(model), "m:v1", "--store", str(tmp_path / "store")]
    shown = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    assert "push m:v1" in shown.stderr and "100%" in shown.stderr  # tqdm's bar, rendered by the CLI
    quiet = subprocess.run([*command, "--json"], capture_output=True, text=True, timeout=120)
    assert quiet.returncode == 0 and quiet.stderr == ""
