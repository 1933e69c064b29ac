"""``shardstore load``: load a model onto devices as a program would, and report time, bytes and peak memory."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from shardstore.cli.common import (
    Commands,
    add_client_options,
    add_common_options,
    client_options,
    emit,
    human_bytes,
    parse_size,
)
from shardstore.errors import InvalidInputError


def _json_option(text: str, option: str) -> Any:
    """A JSON value given inline or as the path of a JSON file (accelerate saves device maps as files)."""
    path = Path(text)
    try:
        return json.loads(path.read_text()) if path.is_file() else json.loads(text)
    except ValueError as exc:
        raise InvalidInputError(f"{option} {text!r}: not JSON nor a JSON file ({exc})") from None


def _is_plain_name(text: str) -> bool:
    """``auto``, ``balanced`` or a device (``cpu``, ``cuda:1``), as opposed to JSON or a file of it."""
    return not Path(text).is_file() and text[:1].isalpha() and not text.lstrip().startswith(("{", "["))


def _device_key(text: str) -> str | int:
    return int(text) if text.isdigit() else text


def parse_memory(text: str) -> tuple[str | int, int]:
    """``cpu=8GiB``, ``0=20GiB``, ``cuda:1=20GiB``."""
    device, sep, size = text.partition("=")
    if not sep or not device:
        raise argparse.ArgumentTypeError(f"expected DEVICE=SIZE, got {text!r}")
    return _device_key(device), parse_size(size)


def cmd_load(args: argparse.Namespace) -> None:
    from shardstore.extras import require_torch

    require_torch("shardstore load")  # before the imports below, which need it
    from shardstore.api import open as open_model
    from shardstore.cli.progress import ProgressBars
    from shardstore.load.loader import LoadOptions, plan_placements
    from shardstore.load.memory import PeakRss
    from shardstore.progress import progress_task

    device_map: Any = None
    if args.device_map is not None:
        device_map = args.device_map if _is_plain_name(args.device_map) else _json_option(
            args.device_map, "--device-map")
        if not isinstance(device_map, (str, dict)):
            raise InvalidInputError("--device-map must be auto, balanced, a device, or a JSON object {prefix: device}")
    tp_plan = _json_option(args.tp_plan, "--tp-plan") if args.tp_plan is not None else None
    if tp_plan is not None and not isinstance(tp_plan, dict):
        raise InvalidInputError("--tp-plan must be a JSON object {pattern: 0 | 1 | null}")
    options = LoadOptions(
        device=_device_key(args.device) if args.device is not None else None,
        device_map=device_map,
        max_memory=dict(args.max_memory) if args.max_memory else None,
        tp_rank=args.tp_rank, tp_size=args.tp_size, tp_plan=tp_plan,
    )
    started = time.perf_counter()
    with PeakRss() as rss:
        with open_model(args.ref, store=args.store, cache=args.cache, **client_options(args)) as view:
            placements, _map = plan_placements(view.manifest, list(view.manifest.tensors), options)
            total = sum(p.nbytes for p in placements if p.device != "meta")
            with ProgressBars() as bars:
                advance = progress_task(bars if args.progress else None, "load", total)
                result = view.load(options, threads=args.threads, progress=advance)
            ref, manifest_id, raw_model = view.ref, view.manifest_id, view.manifest.raw_bytes
        seconds = time.perf_counter() - started
        figures = result.to_json()
        result.tensors.clear()  # a program would keep them; here only the figures matter
    figures |= {
        "ref": ref, "manifest_id": manifest_id, "model_raw_bytes": raw_model,
        "seconds": round(seconds, 6), "load_seconds": round(result.stats.seconds, 6),
        "baseline_rss_bytes": rss.baseline, "peak_rss_bytes": rss.peak, "peak_rss_growth_bytes": rss.growth,
    }

    def human() -> str:
        per_device = ", ".join(f"{d} {human_bytes(b)}" for d, b in figures["bytes_by_device"].items())
        return (
            f"loaded {ref} ({figures['tensors']} tensors, {human_bytes(figures['bytes'])}) in {seconds:.2f} s: "
            f"{per_device}\n"
            f"  fetched {human_bytes(figures['fetched_bytes'])} in {figures['shards']} shards; peak memory "
            f"+{human_bytes(rss.growth)} over {human_bytes(rss.baseline)} (model {human_bytes(raw_model)} raw)"
        )

    emit(args, figures, human)


def register(commands: Commands) -> None:
    p = commands.add_parser("load", help="load NAME:TAG (or grpc://HOST:PORT/NAME:TAG) onto devices; report time "
                                         "and memory")
    p.add_argument("ref", metavar="NAME:TAG")
    p.add_argument("--device", default=None, help="one device for every tensor: cpu, meta, cuda:N (default cpu)")
    p.add_argument("--device-map", default=None, metavar="MAP",
                   help="auto, balanced, a device (cpu, cuda:1), or a JSON object / file "
                        "{module prefix: device} as accelerate writes")
    p.add_argument("--max-memory", type=parse_memory, action="append", default=[], metavar="DEVICE=SIZE",
                   help="budget of a device for auto/balanced, e.g. 0=20GiB cpu=64GiB (repeatable)")
    p.add_argument("--tp-rank", type=int, default=None, help="tensor-parallel rank to load")
    p.add_argument("--tp-size", type=int, default=None, help="number of tensor-parallel ranks")
    p.add_argument("--tp-plan", default=None, metavar="PLAN",
                   help='JSON object / file {name pattern: 0 | 1 | null}, first match wins (default {"*": 0})')
    p.add_argument("--threads", type=int, default=None, help="decoding threads (default: all cores)")
    p.add_argument("--cache", metavar="DIR", default=None,
                   help="shard cache for grpc:// loads (default: $SHARDSTORE_CACHE, else ~/.cache/shardstore)")
    add_common_options(p)
    add_client_options(p)
    p.set_defaults(func=cmd_load)
