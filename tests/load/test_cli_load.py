"""``shardstore load``: figures as one JSON object, bounded host memory, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from load.load_helpers import REF, Pushed
from shardstore.cli import main
from shardstore.rpc.background import BackgroundServer

# What loading may hold beyond the model itself: shards in flight, decode scratch, allocator slack.
HOST_SLACK = 48 << 20


def _load_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, object]:
    assert main(["load", *argv, "--json"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1  # one JSON object, nothing else
    figures: dict[str, object] = json.loads(out)
    return figures


def test_load_reports_bytes_per_device_and_fetched(minilm_fine: Pushed, capsys: pytest.CaptureFixture[str]) -> None:
    figures = _load_json(capsys, REF, "--store", str(minilm_fine.path))
    assert figures["bytes"] == figures["model_raw_bytes"] == minilm_fine.raw_bytes
    assert figures["bytes_by_device"] == {"cpu": minilm_fine.raw_bytes}
    assert figures["tensors"] == len(minilm_fine.originals)
    assert figures["fetched_bytes"] == minilm_fine.stored_bytes
    assert isinstance(figures["seconds"], float) and figures["seconds"] > 0
    assert figures["peak_rss_bytes"] >= figures["baseline_rss_bytes"] > 0  # type: ignore[operator]


def test_a_device_name_is_a_device_map(minilm_fine: Pushed, capsys: pytest.CaptureFixture[str]) -> None:
    """``--device-map cpu`` means everything on cpu, as transformers reads ``device_map="cpu"``."""
    figures = _load_json(capsys, REF, "--store", str(minilm_fine.path), "--device-map", "cpu")
    assert figures["device_map"] == {"": "cpu"}
    assert figures["bytes_by_device"] == {"cpu": minilm_fine.raw_bytes}


def test_load_with_auto_and_max_memory(minilm_fine: Pushed, capsys: pytest.CaptureFixture[str]) -> None:
    budget = minilm_fine.raw_bytes * 3 // 4
    figures = _load_json(capsys, REF, "--store", str(minilm_fine.path), "--device-map", "auto",
                         "--max-memory", f"cpu={budget}", "--max-memory", "meta=1GiB")
    per_device = figures["bytes_by_device"]
    assert isinstance(per_device, dict) and 0 < per_device["cpu"] <= budget
    assert per_device["cpu"] + per_device["meta"] == minilm_fine.raw_bytes
    device_map = figures["device_map"]
    assert isinstance(device_map, dict) and device_map["embeddings.word_embeddings"] == "cpu"
    assert device_map["pooler.dense"] == "meta"


def test_load_with_a_device_map_file_and_a_tp_plan(minilm_fine: Pushed, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "map.json").write_text(json.dumps({"": "cpu", "encoder.layer.5": "meta"}))
    figures = _load_json(capsys, REF, "--store", str(minilm_fine.path), "--device-map", str(tmp_path / "map.json"),
                         "--tp-rank", "1", "--tp-size", "2", "--tp-plan", '{"*.bias": null, "*": 0}')
    per_device = figures["bytes_by_device"]
    assert isinstance(per_device, dict) and set(per_device) == {"cpu", "meta"}
    assert per_device["cpu"] + per_device["meta"] < 0.6 * minilm_fine.raw_bytes  # about half: rank 1 of 2


def test_load_over_grpc(minilm_fine: Pushed, fine_server: BackgroundServer,
                        capsys: pytest.CaptureFixture[str]) -> None:
    figures = _load_json(capsys, f"grpc://{fine_server.address}/{REF}", "--tp-rank", "0", "--tp-size", "3")
    assert figures["bytes"] == pytest.approx(minilm_fine.raw_bytes / 3, rel=0.01)
    assert 0.3 * minilm_fine.stored_bytes < figures["fetched_bytes"] < 0.4 * minilm_fine.stored_bytes  # type: ignore[operator]


def test_peak_host_memory_is_the_model_once(minilm_fine: Pushed) -> None:
    """In a fresh process, so that nothing another test freed can hide what loading allocates."""
    run = subprocess.run([sys.executable, "-m", "shardstore", "load", REF, "--store", str(minilm_fine.path),
                          "--json"], capture_output=True, text=True, check=True)
    figures = json.loads(run.stdout)
    assert run.stderr == ""
    assert minilm_fine.raw_bytes <= figures["peak_rss_growth_bytes"] <= minilm_fine.raw_bytes + HOST_SLACK


@pytest.mark.parametrize(("argv", "message"), [
    (["--device", "cuda:3"], "device cuda:3 does not exist"),
    (["--device-map", "{not json"], "--device-map"),
    (["--device-map", "balanced", "--max-memory", "cpu=1MiB"], "do not fit"),
    (["--device-map", '{"encoder": "cpu"}'], "no entry for tensor"),
    (["--tp-rank", "2", "--tp-size", "2"], "tp_rank"),
])
def test_mistakes_are_one_line_errors(minilm_fine: Pushed, capsys: pytest.CaptureFixture[str], argv: list[str],
                                      message: str) -> None:
    if "cuda:3" in argv:
        import torch

        if torch.cuda.device_count() > 3:
            pytest.skip("this machine has a cuda:3")
    assert main(["load", REF, "--store", str(minilm_fine.path), *argv, "--json"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and captured.err.startswith("shardstore load: error: ")
    assert message in captured.err


def test_without_json_it_shows_progress_and_a_summary(minilm_fine: Pushed,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["load", REF, "--store", str(minilm_fine.path), "--device-map", '{"": "cpu"}']) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith(f"loaded {REF} (") and "cpu 86.6 MiB" in captured.out
    assert "load: 100%" in captured.err  # the progress bar, on stderr
    assert main(["load", REF, "--store", str(minilm_fine.path), "--quiet"]) == 0
    assert capsys.readouterr() == ("", "")
