"""``shardstore bench``: benchmarks that print a table side by side with the peers."""

from __future__ import annotations

import argparse

from shardstore.cli.common import Commands, add_common_options, emit, parse_size
from shardstore.errors import InvalidInputError
from shardstore.repo.chunking import DEFAULT_CHUNK_BYTES


def cmd_bench_codecs(args: argparse.Namespace) -> None:
    from shardstore.codecs.benchmark import format_codec_table, run_codec_benchmark
    from shardstore.format.safetensors_io import read_file_header

    read_file_header(args.file)  # a bad file is a one-line error before any work starts
    if args.repeats < 1:
        raise InvalidInputError(f"--repeats must be at least 1, not {args.repeats}")
    only = [name.strip() for name in args.only.split(",") if name.strip()] if args.only else None
    result = run_codec_benchmark(args.file, threads=args.threads, piece_bytes=args.piece_size, repeats=args.repeats,
                                 only=only)
    emit(args, result, lambda: format_codec_table(result))


def register(commands: Commands) -> None:
    p = commands.add_parser("bench", help="benchmarks that print a table side by side with the peers")
    benches = p.add_subparsers(dest="bench", required=True, metavar="BENCH")
    b = benches.add_parser("codecs", help="ratio and GB/s of every codec and peer on FILE, per dtype")
    b.add_argument("file", metavar="FILE", help="a .safetensors file (BF16 and FP16 copies are made from it)")
    b.add_argument("--threads", type=int, default=None, help="the 'all threads' column (default: all cores)")
    b.add_argument("--piece-size", type=parse_size, default=DEFAULT_CHUNK_BYTES, metavar="SIZE",
                   help="raw size of the pieces coded independently, as push cuts them (default 4MiB)")
    b.add_argument("--repeats", type=int, default=3, metavar="N",
                   help="runs of each codec and peer, interleaved; the best is shown (default 3)")
    b.add_argument("--only", default=None, metavar="NAMES",
                   help="comma-separated codecs and peers to run, e.g. float-entropy.v1,zipnn (default: all)")
    add_common_options(b, store=False)
    b.set_defaults(func=cmd_bench_codecs)
