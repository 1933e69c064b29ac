"""What every command shares: sizes, the --json/--quiet/--store options, and one way to print figures."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from shardstore.store import STORE_ENV

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130

# The type argparse hands to each command module's ``register`` (generic only to the type checker).
if TYPE_CHECKING:
    Commands = argparse._SubParsersAction[argparse.ArgumentParser]
else:
    Commands = argparse._SubParsersAction


def human_bytes(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def parse_size(text: str) -> int:
    """``4MiB``, ``512KiB``, ``1048576``."""
    units = {"kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "kb": 10**3, "mb": 10**6, "gb": 10**9, "b": 1}
    lowered = text.strip().lower()
    number, factor = lowered, 1
    for suffix, unit in units.items():
        if lowered.endswith(suffix):
            number, factor = lowered[: -len(suffix)].strip(), unit
            break
    try:
        value = int(float(number) * factor)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive: {text!r}")
    return value


def emit(args: argparse.Namespace, figures: dict[str, Any], human: Callable[[], str]) -> None:
    if args.json:
        print(json.dumps(figures, sort_keys=True))
    elif not args.quiet:
        print(human())


def parse_storage_option(text: str) -> tuple[str, Any]:
    """``key=value``; the value is JSON when it parses as JSON (numbers, booleans, objects), else a string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


def add_common_options(parser: argparse.ArgumentParser, store: bool = True) -> None:
    if store:
        parser.add_argument("--store", metavar="URL", default=None,
                            help=f"store URL or folder (default: ${STORE_ENV}, else ~/.local/share/shardstore)")
        parser.add_argument("--storage-option", "-o", type=parse_storage_option, action="append", default=[],
                            metavar="KEY=VALUE", dest="storage_options",
                            help="passed to the store backend, e.g. endpoint_url=http://127.0.0.1:9000 (repeatable)")
    parser.add_argument("--json", action="store_true", help="print one JSON object of figures on stdout, nothing else")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bars, no summary")


