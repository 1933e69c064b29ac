"""``shardstore bench codecs``: our lossless codecs against their peers, side by side, in one run.

Every tensor of a safetensors file is cut into row-aligned pieces of the size
the repo uses, and each codec or peer encodes and decodes every piece with one
thread and with all threads (workers each taking the next piece). Every
round trip is compared bit for bit; a peer that fails one is reported, not
hidden. Dtype variants: the file as stored, plus BF16 and F16 copies of its
float tensors (made with torch).

Throughput is raw tensor bytes per second (GB = 1e9 bytes); ratio is stored
bytes over raw tensor bytes. Each runner's figure is its best of ``repeats`` runs, and the runs
are interleaved (round r of every runner, then round r + 1): on a shared, noisy machine the
best runs of a codec and of its peer come from the same stretches of time. The 1-thread column
is checked, not assumed: "1t cores" is the process's CPU time over the wall time of those runs,
the cores it kept busy on average (at most 1.00 for one thread; below it when other work on the
machine takes turns with it). ZipNN gets ``threads=1``; its core then does the work on one
worker thread that it starts per call while the caller waits, so the process's CPU time, not the
calling thread's, is the measure. The entropy limit is the order-0 entropy, per
tensor, of the whole element values for 1- and 2-byte dtypes; for wider
dtypes, of each 16-bit half separately (a 32-bit alphabet has no meaningful
order-0 estimate at these sizes).
"""

from __future__ import annotations

import functools
import itertools
import os
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from shardstore.codecs.base import Codec, PieceInfo
from shardstore.codecs.byteplanes import BytePlanesZstdCodec
from shardstore.codecs.entropy import FloatEntropyCodec
from shardstore.codecs.raw import RawCodec
from shardstore.errors import InvalidInputError
from shardstore.format.dtypes import itemsize

ZSTD_LEVELS = (1, 3, 9)
_ZIPNN_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}


@dataclass(frozen=True)
class Piece:
    data: bytes
    info: PieceInfo


def iter_pieces(data: bytes, dtype: str, shape: Sequence[int], piece_bytes: int) -> Iterator[Piece]:
    """Row ranges of about ``piece_bytes`` (at least one row), as the repo cuts them."""
    shape = tuple(shape)
    if not shape or shape[0] == 0:
        yield Piece(data, PieceInfo(dtype, shape))
        return
    row_bytes = len(data) // shape[0]
    rows = max(1, piece_bytes // row_bytes) if row_bytes else shape[0]
    for r0 in range(0, shape[0], rows):
        r1 = min(shape[0], r0 + rows)
        yield Piece(data[r0 * row_bytes : r1 * row_bytes], PieceInfo(dtype, (r1 - r0, *shape[1:])))


def load_variants(path: str) -> dict[str, list[tuple[str, str, tuple[int, ...], bytes]]]:
    """{variant: [(name, dtype, shape, bytes)]}: the file as stored, and BF16 / F16 copies."""
    import torch
    from safetensors.torch import load_file

    tensors = load_file(path)
    names = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}

    def as_record(name: str, t: torch.Tensor) -> tuple[str, str, tuple[int, ...], bytes]:
        dtype = names.get(t.dtype) or _int_name(t.dtype)
        # reshape(-1) first: torch cannot view a 0-d tensor (BatchNorm's num_batches_tracked) as bytes.
        raw = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        return name, dtype, tuple(t.shape), raw

    file_dtypes = sorted({as_record("", t[:0])[1] for t in tensors.values() if t.is_floating_point()})
    variants = {f"{'/'.join(file_dtypes)} (file)": [as_record(n, t) for n, t in tensors.items()]}
    for target, label in ((torch.bfloat16, "BF16"), (torch.float16, "F16")):
        if [label] == file_dtypes:
            continue
        variants[label] = [as_record(n, t.to(target) if t.is_floating_point() else t) for n, t in tensors.items()]
    return variants


def _int_name(dtype: Any) -> str:
    import torch

    table = {
        torch.int64: "I64",
        torch.int32: "I32",
        torch.int16: "I16",
        torch.int8: "I8",
        torch.uint8: "U8",
        torch.bool: "BOOL",
    }
    return table[dtype]


def entropy_bytes(raw: bytes, dtype: str) -> float:
    """Order-0 entropy in bytes (see the module docstring for wide dtypes)."""
    k = itemsize(dtype)
    if not raw:
        return 0.0
    words: list[npt.NDArray[np.int64]]
    if k == 1:
        words = [np.frombuffer(raw, dtype=np.uint8).astype(np.int64)]
    else:
        halves = np.frombuffer(raw, dtype="<u2").reshape(-1, k // 2)
        words = [halves[:, j].astype(np.int64) for j in range(k // 2)]
    total = 0.0
    for w in words:
        counts = np.bincount(w).astype(np.float64)
        counts = counts[counts > 0]
        total += float(-(counts * np.log2(counts / len(w))).sum())
    return total / 8


# A "runner" encodes one piece and decodes it into a preallocated buffer.
Encode = Callable[[Piece], bytes]
Decode = Callable[[bytes, Piece, bytearray], None]


def _codec_runner(codec: Codec) -> tuple[Encode, Decode]:
    def encode(piece: Piece) -> bytes:
        return codec.encode(piece.data, piece.info)

    def decode(blob: bytes, piece: Piece, out: bytearray) -> None:
        codec.decode(blob, piece.info, memoryview(out))

    return encode, decode


def _zstd_runner(level: int) -> tuple[Encode, Decode]:
    import threading

    import zstandard

    local = threading.local()

    def ctx() -> tuple[Any, Any]:
        if not hasattr(local, "c"):
            local.c = zstandard.ZstdCompressor(level=level)
            local.d = zstandard.ZstdDecompressor()
        return local.c, local.d

    def encode(piece: Piece) -> bytes:
        return bytes(ctx()[0].compress(piece.data))

    def decode(blob: bytes, piece: Piece, out: bytearray) -> None:
        out[:] = ctx()[1].decompress(blob, max_output_size=len(out))

    return encode, decode


def _lz4_runner() -> tuple[Encode, Decode] | None:
    try:
        import lz4.frame
    except ImportError:
        return None

    def encode(piece: Piece) -> bytes:
        return bytes(lz4.frame.compress(piece.data))

    def decode(blob: bytes, piece: Piece, out: bytearray) -> None:
        out[:] = lz4.frame.decompress(blob)

    return encode, decode


def _zipnn_runner(threads: int) -> tuple[Encode, Decode] | None:
    """ZipNN with its own thread count (how it is meant to be used); floats only, others raw.

    ZipNN 0.5.4 reorders the bits of BF16 and F32 input *in place* while compressing, even in a
    ``bytes`` object; it must get a private copy, or the "original" it is checked against is the
    scrambled one (that, not its decoder, is why earlier runs showed its round trip failing).
    The copy is made by :func:`_zipnn_prepare`, before the clock starts.
    """
    try:
        from zipnn import ZipNN
    except ImportError:
        return None
    import threading

    local = threading.local()

    def get(dtype: str) -> Any:
        cache = local.__dict__.setdefault("z", {})
        if dtype not in cache:
            cache[dtype] = ZipNN(input_format="byte", bytearray_dtype=_ZIPNN_DTYPES[dtype], threads=threads)
        return cache[dtype]

    def encode(piece: Piece) -> bytes:
        if piece.info.dtype not in _ZIPNN_DTYPES or not piece.data:
            return bytes(piece.data)
        return bytes(get(piece.info.dtype).compress(piece.data))

    def decode(blob: bytes, piece: Piece, out: bytearray) -> None:
        if piece.info.dtype not in _ZIPNN_DTYPES or not piece.data:
            out[:] = blob
            return
        out[:] = get(piece.info.dtype).decompress(blob)

    return encode, decode


def _zipnn_prepare(piece: Piece) -> Piece:
    """A private, writable copy for ZipNN to scramble (see :func:`_zipnn_runner`)."""
    return Piece(bytearray(piece.data), piece.info)  # type: ignore[arg-type]


def _for_codec(codec: Codec, _threads: int) -> tuple[Encode, Decode]:
    return _codec_runner(codec)


def _for_zstd(level: int, _threads: int) -> tuple[Encode, Decode]:
    return _zstd_runner(level)


def _for_lz4(_threads: int) -> tuple[Encode, Decode] | None:
    return _lz4_runner()


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def _spread(fn: Callable[[Any], Any], items: list[Any], threads: int, pool: ThreadPoolExecutor | None) -> list[Any]:
    """``fn`` over ``items`` on ``threads`` workers, each taking the next item as it finishes one.

    One pool task per worker, not per item: a task costs about 13 µs of hand-off, a tenth of
    what decoding a 0.4 MB piece takes, and that would be measured as the codec not scaling.
    (The repo's pool hands out whole shards of several pieces, where the hand-off is negligible.)
    """
    if pool is None or threads == 1:
        return [fn(item) for item in items]
    results: list[Any] = [None] * len(items)
    order = itertools.count()  # next() of a C iterator is atomic under the GIL

    def worker() -> None:
        while (i := next(order)) < len(items):
            results[i] = fn(items[i])

    for future in [pool.submit(worker) for _ in range(threads)]:
        future.result()
    return results


def _run_encode(
    encode: Encode, inputs: list[Piece], threads: int, pool: ThreadPoolExecutor | None
) -> list[bytes]:
    return _spread(encode, inputs, threads, pool)


def _run_decode(
    dec: Callable[[tuple[bytes, Piece, bytearray]], None],
    jobs: list[tuple[bytes, Piece, bytearray]],
    threads: int,
    pool: ThreadPoolExecutor | None,
) -> None:
    _spread(dec, jobs, threads, pool)


@dataclass
class _Run:
    """One (runner, thread count): its best times so far, and what its runs showed."""

    name: str
    threads: int
    runner: tuple[Encode, Decode]
    pool: ThreadPoolExecutor | None
    prepare: Callable[[Piece], Piece] | None
    t_enc: float = float("inf")
    t_dec: float = float("inf")
    stored: int = 0
    ok: bool = True
    process_cpu: float = 0.0  # CPU seconds of the whole process in these runs, and their wall time
    wall: float = 0.0


def _measure_once(run: _Run, pieces: list[Piece], outs: list[bytearray]) -> None:
    """Encode then decode every piece once; keep the best times, check every round trip
    against ``pieces`` (never against what the encoder was handed, which ``prepare`` may have
    copied)."""
    encode, decode = run.runner

    def dec(args: tuple[bytes, Piece, bytearray]) -> None:
        decode(*args)

    inputs = [run.prepare(p) for p in pieces] if run.prepare else pieces
    process0 = time.process_time()
    te, blobs = _timed(functools.partial(_run_encode, encode, inputs, run.threads, run.pool))
    jobs = list(zip(blobs, pieces, outs, strict=True))
    td, _ = _timed(functools.partial(_run_decode, dec, jobs, run.threads, run.pool))
    run.process_cpu += time.process_time() - process0
    run.wall += te + td
    run.t_enc, run.t_dec = min(run.t_enc, te), min(run.t_dec, td)
    run.stored = sum(len(b) for b in blobs)
    run.ok = run.ok and all(o == p.data for o, p in zip(outs, pieces, strict=True))
    for o in outs:
        o[:] = bytes(len(o))  # a decoder that writes nothing must not pass on the last run's bytes


def _memcpy_gbps(size: int = 256 << 20) -> float:
    src = np.ones(size, dtype=np.uint8)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    best = min(_timed(lambda: np.copyto(dst, src))[0] for _ in range(3))
    return size / best / 1e9


def run_codec_benchmark(
    path: str,
    *,
    threads: int | None = None,
    piece_bytes: int = 4 << 20,
    repeats: int = 3,
    only: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Benchmark every codec and available peer (or those named in ``only``) on every dtype
    variant of ``path``.

    Each (runner, thread count) encodes and decodes everything ``repeats`` times, the runners
    taking turns round by round; the best time of each is reported (the machine's noise only
    ever slows a run down)."""
    threads = threads or os.cpu_count() or 1
    result: dict[str, Any] = {
        "file": os.path.basename(path),
        "threads": threads,
        "piece_bytes": piece_bytes,
        "repeats": repeats,
        "memcpy_gbps": round(_memcpy_gbps(), 3),
        "variants": [],
    }
    with ThreadPoolExecutor(threads) as pool:
        for variant, records in load_variants(path).items():
            pieces = [p for _, dtype, shape, raw in records for p in iter_pieces(raw, dtype, shape, piece_bytes)]
            raw_bytes = sum(len(p.data) for p in pieces)
            entropy = sum(entropy_bytes(raw, dtype) for _, dtype, _, raw in records)
            runners: list[tuple[str, str, Callable[[int], tuple[Encode, Decode] | None]]] = [
                (c.codec_id, "codec", functools.partial(_for_codec, c))
                for c in (RawCodec(), BytePlanesZstdCodec(), FloatEntropyCodec())
            ]
            runners += [(f"zstd -{lv}", "peer", functools.partial(_for_zstd, lv)) for lv in ZSTD_LEVELS]
            runners += [("lz4", "peer", _for_lz4), ("zipnn", "peer", _zipnn_runner)]
            unknown = sorted(set(only or ()) - {r[0] for r in runners})
            if unknown:
                raise InvalidInputError(f"no codec or peer named {', '.join(unknown)} "
                                        f"(there are {', '.join(r[0] for r in runners)})")
            runners = [r for r in runners if only is None or r[0] in only]
            runs: list[tuple[str, str, list[_Run]]] = []
            for name, kind, make in runners:
                per_threads = []
                for n in sorted({1, threads}):
                    runner = make(n)
                    if runner is None:
                        break  # not installed
                    # ZipNN threads internally; every other runner is spread over pieces by our pool.
                    use_pool = None if name == "zipnn" else pool
                    per_threads.append(_Run(name, n, runner, use_pool, _zipnn_prepare if name == "zipnn" else None))
                else:
                    runs.append((name, kind, per_threads))
            outs = [bytearray(len(p.data)) for p in pieces]  # destinations exist before the clock starts
            for _ in range(repeats):
                for _name, _kind, per_threads in runs:
                    for run in per_threads:
                        _measure_once(run, pieces, outs)
            rows = []
            for name, kind, per_threads in runs:
                single = next(r for r in per_threads if r.threads == 1)
                rows.append(
                    {
                        "name": name,
                        "kind": kind,
                        "ratio": round(per_threads[0].stored / raw_bytes, 5),
                        "encode_gbps": {str(r.threads): round(raw_bytes / r.t_enc / 1e9, 3) for r in per_threads},
                        "decode_gbps": {str(r.threads): round(raw_bytes / r.t_dec / 1e9, 3) for r in per_threads},
                        "cores_busy_1t": round(single.process_cpu / max(single.wall, 1e-9), 3),
                        "roundtrip_ok": all(r.ok for r in per_threads),
                    }
                )
            result["variants"].append(
                {
                    "dtype": variant,
                    "raw_bytes": raw_bytes,
                    "pieces": len(pieces),
                    "entropy_ratio": round(entropy / raw_bytes, 5),
                    "rows": rows,
                }
            )
    return result


def format_codec_table(result: dict[str, Any]) -> str:
    """The benchmark as text tables, one per dtype variant, codecs and peers side by side."""
    n = str(result["threads"])
    lines = [
        f"file {result['file']}; pieces of {result['piece_bytes']} B; {n} threads; "
        f"best of {result.get('repeats', 1)} interleaved runs; "
        f"memcpy {result['memcpy_gbps']:.2f} GB/s; GB/s are raw tensor bytes per second",
    ]
    for variant in result["variants"]:
        lines += [
            "",
            f"{variant['dtype']}: {variant['raw_bytes']} raw bytes in {variant['pieces']} pieces; "
            f"order-0 entropy limit {variant['entropy_ratio']:.4f}",
            f"{'codec / peer':22} {'ratio':>7} {'enc 1t':>7} {'enc ' + n + 't':>7} "
            f"{'dec 1t':>7} {'dec ' + n + 't':>7} {'1t cores':>8}  round trip",
        ]
        for row in variant["rows"]:
            enc, dec = row["encode_gbps"], row["decode_gbps"]
            label = row["name"] + (" (peer)" if row["kind"] == "peer" else "")
            cores = row.get("cores_busy_1t")
            cpu_text = f"{cores:8.2f}" if cores is not None else f"{'-':>8}"
            lines.append(
                f"{label:22} {row['ratio']:7.4f} {enc['1']:7.2f} {enc[n]:7.2f} "
                f"{dec['1']:7.2f} {dec[n]:7.2f} {cpu_text}  ok"
                if row["roundtrip_ok"]
                # A peer that loses bits gets no speed: it would be the speed of doing less work.
                else f"{label:22} {row['ratio']:7.4f} {'-':>7} {'-':>7} {'-':>7} {'-':>7} {cpu_text}  FAILED"
            )
    return "\n".join(lines)
