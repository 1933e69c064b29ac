"""Web view benchmark: how long each page of ``shardstore serve --http-port`` takes, end to end over HTTP.

    .venv/bin/python bench/bench_webview.py [--tensors 300] [--repeat 20]

Pushes a synthetic model of ``--tensors`` tensors (layers of 128x128 weights and 128-element
biases, F32, with a config.json) to a fresh local store twice, once lossless and once with
``--lossy '*.weight=int8'`` (so the tensor table carries quality columns), starts ``shardstore
serve --http-port 0`` in its own process and times each page with a fresh HTTP connection per
request, from the request's first byte sent to the response's last byte read:

* **cold**: the first request to a server just started (refs listed, manifests read, checked
  and parsed, shard headers read for a compare), best of ``--rounds`` fresh servers per page;
* **warm**: best and median of ``--repeat`` more per round (parsed manifests are kept; refs are
  listed each time).

Pages: the registry, the lossless and the lossy model pages (every tensor a table row), the lossy
page sorted by SNR, and the compare page of the two versions (its stream headers read once).
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

TENSORS_PER_LAYER = 12  # 6 weights and 6 biases, like a transformer block's linear layers


def make_model(folder: Path, tensors: int) -> Path:
    rng = np.random.default_rng(0)
    arrays: dict[str, np.ndarray] = {}
    for index in range(tensors):
        layer, slot = divmod(index, TENSORS_PER_LAYER)
        kind, part = divmod(slot, 2)
        name = f"model.layers.{layer}.linear{kind}.{'weight' if part == 0 else 'bias'}"
        shape = (128, 128) if part == 0 else (128,)
        arrays[name] = (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float32)
    folder.mkdir(parents=True)
    save_file(arrays, str(folder / "model.safetensors"), metadata={"format": "pt"})
    layers = -(-tensors // TENSORS_PER_LAYER)
    (folder / "config.json").write_text(json.dumps({"architectures": ["BenchModel"], "model_type": "bench",
                                                    "hidden_size": 128, "num_hidden_layers": layers,
                                                    "torch_dtype": "float32"}))
    return folder


def timed_get(host: str, port: int, path: str) -> tuple[float, int]:
    started = time.perf_counter()
    conn = http.client.HTTPConnection(host, port, timeout=60)
    conn.request("GET", path)
    response = conn.getresponse()
    body = response.read()
    elapsed = time.perf_counter() - started
    conn.close()
    if response.status != 200:
        raise SystemExit(f"GET {path}: HTTP {response.status}")
    return elapsed, len(body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tensors", type=int, default=300)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3, help="fresh servers; cold figures are the best of these")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-webview-") as scratch:
        root = Path(scratch)
        model = make_model(root / "model", args.tensors)
        store = root / "store"
        for ref, extra in (("bench/model:v1", []), ("bench/model:int8", ["--lossy", "*.weight=int8"])):
            subprocess.run([sys.executable, "-m", "shardstore", "push", str(model), ref, "--store", str(store),
                            "--quiet", *extra], check=True)
        pages = [
            ("registry", "/"),
            (f"model, {args.tensors} tensors", "/models/bench/model:v1"),
            (f"lossy model, {args.tensors} tensors", "/models/bench/model:int8"),
            ("lossy model, sorted by SNR", "/models/bench/model:int8?sort=snr&order=asc"),
            ("compare v1...int8", "/compare/bench/model:v1...bench/model:int8"),
        ]
        cold: dict[str, list[float]] = {label: [] for label, _ in pages}
        warm: dict[str, list[float]] = {label: [] for label, _ in pages}
        sizes: dict[str, int] = {}
        for _round in range(args.rounds):
            for label, path in pages:  # a fresh server per page: its first request reads everything itself
                proc = subprocess.Popen([sys.executable, "-m", "shardstore", "serve", "--store", str(store), "--port",
                                         "0", "--http-port", "0", "--json"], stdout=subprocess.PIPE, text=True)
                try:
                    assert proc.stdout is not None
                    host, port = json.loads(proc.stdout.readline())["http_address"].rsplit(":", 1)
                    first, sizes[label] = timed_get(host, int(port), path)
                    cold[label].append(first)
                    warm[label] += [timed_get(host, int(port), path)[0] for _ in range(args.repeat)]
                finally:
                    proc.terminate()
                    proc.wait(timeout=30)
        rows = [(label, min(cold[label]), min(warm[label]), statistics.median(warm[label]), sizes[label])
                for label, _ in pages]

    print(f"web view page loads over HTTP on 127.0.0.1, local store: cold = best first request of {args.rounds} "
          f"fresh servers, warm = best and median of {args.rounds} x {args.repeat}")
    print(f"{'page':<34} {'cold ms':>8} {'best ms':>8} {'median ms':>10} {'HTML KiB':>9}")
    for label, cold, best, median, size in rows:
        print(f"{label:<34} {cold * 1e3:>8.1f} {best * 1e3:>8.1f} {median * 1e3:>10.1f} {size / 1024:>9.1f}")


if __name__ == "__main__":
    main()
