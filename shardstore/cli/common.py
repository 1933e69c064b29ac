"""What every command shares: sizes, the --json/--quiet/--store options, and one way to print figures."""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from shardstore.errors import InvalidInputError
from shardstore.sizes import human_bytes as human_bytes  # re-exported: the commands print sizes through common
from shardstore.store import STORE_ENV

# grpc's C core logs TLS handshake failures and the like on stderr at INFO; the CLI already says
# what failed in its one line, so keep the core to real errors unless the user asks for more.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130

# The type argparse hands to each command module's ``register`` (generic only to the type checker).
if TYPE_CHECKING:
    Commands = argparse._SubParsersAction[argparse.ArgumentParser]
else:
    Commands = argparse._SubParsersAction


class CommandParser(argparse.ArgumentParser):
    """A subcommand's parser that takes options anywhere on the line: ``pull --only GLOB REF DEST``, ``rm A --json B``.

    argparse's intermixed parsing (options first, then positionals from what is left) for every
    subcommand; ``parse_known_intermixed_args`` itself calls ``parse_known_args``, hence the flag.
    Options that take a list are repeatable single values (``--include A --include B``), never
    ``nargs='+'``, which would swallow the positionals that follow them.
    """

    _intermixing = False

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        # A command with subcommands of its own (bench) cannot intermix; its subcommands do.
        nested = any(a.nargs in (argparse.PARSER, argparse.REMAINDER) for a in self._get_positional_actions())
        if self._intermixing or nested:
            return super().parse_known_args(args, namespace)
        self._intermixing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False



def parse_size(text: str) -> int:
    """``4MiB``, ``512KiB``, ``1048576`` for argparse (:func:`shardstore.sizes.parse_size`, which env vars use too)."""
    from shardstore.sizes import parse_size as parse

    try:
        return parse(text)
    except InvalidInputError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("size: ")) from None


def parse_port(text: str) -> int:
    """A TCP port for argparse, 0 (pick a free one) to 65535: beyond that, bind() would raise, not argparse."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 0 to 65535, not {value}")
    return value


def parse_seconds(text: str) -> float:
    """A duration for argparse, 0 or more. NaN and infinity are refused: every comparison with NaN is false,
    so ``--grace nan`` would let gc delete what any grace keeps, and neither is valid in ``--json`` output."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"not a finite number of seconds: {text!r}")
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {text!r}")
    return value


def parse_timeout(text: str) -> float:
    """A wait for argparse: more than 0 seconds (a deadline of 0 would fail every call as if the server were silent)."""
    value = parse_seconds(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds: {text!r}")
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


def add_client_options(parser: argparse.ArgumentParser, default_timeout: float = 60.0) -> None:
    """Credentials for grpc:// and grpcs:// servers (ignored for stores): the same on every client command."""
    parser.add_argument("--token", default=None,
                        help="bearer token for a server that requires one (default: $SHARDSTORE_TOKEN)")
    parser.add_argument("--tls-ca", metavar="FILE", default=None,
                        help="connect with TLS, trusting this PEM CA (grpcs:// alone trusts the system's roots)")
    parser.add_argument("--tls-cert", metavar="FILE", default=None, help="mutual TLS: this PEM client certificate")
    parser.add_argument("--tls-key", metavar="FILE", default=None, help="mutual TLS: the PEM key of --tls-cert")
    parser.add_argument("--timeout", type=parse_timeout, default=None, metavar="SECONDS",
                        help="give up on a server that sends no answer or no stream data for this long "
                             f"(default {default_timeout:g})")
    parser.add_argument("--mirror", metavar="URL", default=None,
                        help="read shard and blob bytes from this HTTP cache of the server's --http-port, each checked "
                             "against its id, falling back to the server (default: $SHARDSTORE_MIRROR)")


def client_options(args: argparse.Namespace) -> dict[str, Any]:
    """``token``, ``tls``, ``timeout``, ``mirror`` for :mod:`shardstore.api` from :func:`add_client_options`' flags."""
    tls = None
    if args.tls_ca or args.tls_cert or args.tls_key:
        from shardstore.rpc.tls import ClientTls

        tls = ClientTls(args.tls_ca, args.tls_cert, args.tls_key)
    return {"token": args.token, "tls": tls, "timeout": args.timeout, "mirror": args.mirror}
