#!/usr/bin/env python3
"""Demo: serve a local store over gRPC, read one layer lazily, show the bytes moved, stop the server.

    python scripts/demo_grpc.py [--store DIR] [--ref minilm:v1] [--layer encoder.layer.3.]

The model must already be in the store (``shardstore push MODEL_DIR minilm:v1 --store DIR``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile

import shardstore
from shardstore.rpc.background import BackgroundServer
from shardstore.store import open_store


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default=None, help="store URL or folder (default: the local store)")
    parser.add_argument("--ref", default="minilm:v1")
    parser.add_argument("--layer", default="encoder.layer.3.", help="tensor name prefix to read")
    args = parser.parse_args()
    with BackgroundServer(open_store(args.store)) as server, tempfile.TemporaryDirectory() as cache:
        print(f"serving {args.store or 'the local store'} on grpc://{server.address}")
        with shardstore.open(f"grpc://{server.address}/{args.ref}", cache=cache) as view:
            names = [n for n in view.manifest.tensors if n.startswith(args.layer)]
            tensors = {n: view.get_tensor(n) for n in names}
            moved = view.source.transferred_bytes
            stored = view.manifest.stored_bytes
        raw = sum(t.numel() * t.element_size() for t in tensors.values())
        print(f"read {len(tensors)} tensors of {args.layer}* ({raw / 1e6:.1f} MB decoded): moved {moved / 1e6:.2f} MB "
              f"of a {stored / 1e6:.1f} MB stored model ({100 * moved / stored:.1f} %)")
    print("server stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
