"""``shardstore bench codecs``: our lossless codecs against their peers, side by side, in one run.

Every tensor of a safetensors file is cut into row-aligned pieces of the size
the repo uses, and each codec or peer encodes and decodes every piece with one
thread and with all threads (a pool over pieces, as the repo runs them). Every
round trip is compared bit for bit; a peer that fails one is reported, not
hidden. Dtype variants: the file as stored, plus BF16 and F16 copies of its
float tensors (made with torch).

Throughput is raw tensor bytes per second (GB = 1e9 bytes); ratio is stored
bytes over raw tensor bytes. The entropy limit is the order-0 entropy, per
tensor, of the whole element values for 1- and 2-byte dtypes; for wider
dtypes, of each 16-bit half separately (a 32-bit alphabet has no meaningful
order-0 estimate at these sizes).
"""

from __future__ import annotations

import functools
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
        raw = t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""
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


def _run_encode(
    encode: Encode, inputs: list[Piece], threads: int, pool: ThreadPoolExecutor | None
) -> list[bytes]:
    if pool is None or threads == 1:
        return [encode(p) for p in inputs]
    return list(pool.map(encode, inputs))


def _run_decode(
    dec: Callable[[tuple[bytes, Piece, bytearray]], None],
    jobs: list[tuple[bytes, Piece, bytearray]],
    threads: int,
    pool: ThreadPoolExecutor | None,
) -> None:
    if pool is None or threads == 1:
        for job in jobs:
            dec(job)
    else:
        list(pool.map(dec, jobs))


def _measure(
    pieces: list[Piece],
    runner: tuple[Encode, Decode],
    threads: int,
    pool: ThreadPoolExecutor | None,
    repeats: int = 1,
    prepare: Callable[[Piece], Piece] | None = None,
) -> tuple[list[bytes], float, float, bool]:
    """Encode then decode every piece ``repeats`` times; the best time of each, and whether every
    round trip gave back the original bytes (checked against ``pieces``, never against what the
    encoder was handed, which ``prepare`` may have copied)."""
    encode, decode = runner
    outs = [bytearray(len(p.data)) for p in pieces]  # destinations exist before the clock starts
    t_enc = t_dec = float("inf")
    blobs: list[bytes] = []
    ok = True

    def dec(args: tuple[bytes, Piece, bytearray]) -> None:
        decode(*args)

    for _ in range(repeats):
        inputs = [prepare(p) for p in pieces] if prepare else pieces
        te, blobs = _timed(functools.partial(_run_encode, encode, inputs, threads, pool))
        td, _ = _timed(functools.partial(_run_decode, dec, list(zip(blobs, pieces, outs, strict=True)), threads, pool))
        t_enc, t_dec = min(t_enc, te), min(t_dec, td)
        ok = ok and all(o == p.data for o, p in zip(outs, pieces, strict=True))
        for o in outs:
            o[:] = bytes(len(o))  # a decoder that writes nothing must not pass on the last run's bytes
    return blobs, t_enc, t_dec, ok


def _memcpy_gbps(size: int = 256 << 20) -> float:
    src = np.ones(size, dtype=np.uint8)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    best = min(_timed(lambda: np.copyto(dst, src))[0] for _ in range(3))
    return size / best / 1e9


def run_codec_benchmark(
    path: str, *, threads: int | None = None, piece_bytes: int = 4 << 20, repeats: int = 3
) -> dict[str, Any]:
    """Benchmark every codec and available peer on every dtype variant of ``path``.

    Each (runner, thread count) encodes and decodes everything ``repeats`` times; the best time
    of each is reported (the machine's noise only ever slows a run down)."""
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
            rows = []
            for name, kind, make in runners:
                row: dict[str, Any] = {"name": name, "kind": kind, "encode_gbps": {}, "decode_gbps": {}}
                ok_all = True
                for n in sorted({1, threads}):
                    runner = make(n)
                    if runner is None:
                        break
                    # ZipNN threads internally; every other runner is spread over pieces by our pool.
                    use_pool = None if name == "zipnn" else pool
                    prepare = _zipnn_prepare if name == "zipnn" else None
                    blobs, t_enc, t_dec, ok = _measure(pieces, runner, n, use_pool, repeats, prepare)
                    row["ratio"] = round(sum(len(b) for b in blobs) / raw_bytes, 5)
                    row["encode_gbps"][str(n)] = round(raw_bytes / t_enc / 1e9, 3)
                    row["decode_gbps"][str(n)] = round(raw_bytes / t_dec / 1e9, 3)
                    ok_all = ok_all and ok
                else:
                    row["roundtrip_ok"] = ok_all
                    rows.append(row)
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
        f"best of {result.get('repeats', 1)} runs; "
        f"memcpy {result['memcpy_gbps']:.2f} GB/s; GB/s are raw tensor bytes per second",
    ]
    for variant in result["variants"]:
        lines += [
            "",
            f"{variant['dtype']}: {variant['raw_bytes']} raw bytes in {variant['pieces']} pieces; "
            f"order-0 entropy limit {variant['entropy_ratio']:.4f}",
            f"{'codec / peer':22} {'ratio':>7} {'enc 1t':>7} {'enc ' + n + 't':>7} "
            f"{'dec 1t':>7} {'dec ' + n + 't':>7}  round trip",
        ]
        for row in variant["rows"]:
            enc, dec = row["encode_gbps"], row["decode_gbps"]
            label = row["name"] + (" (peer)" if row["kind"] == "peer" else "")
            lines.append(
                f"{label:22} {row['ratio']:7.4f} {enc['1']:7.2f} {enc[n]:7.2f} "
                f"{dec['1']:7.2f} {dec[n]:7.2f}  ok"
                if row["roundtrip_ok"]
                # A peer that loses bits gets no speed: it would be the speed of doing less work.
                else f"{label:22} {row['ratio']:7.4f} {'-':>7} {'-':>7} {'-':>7} {'-':>7}  FAILED"
            )
    return "\n".join(lines)
