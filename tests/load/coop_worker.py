"""One rank of tests/load/test_cooperative.py: loads a model cooperatively over gloo, checks it, writes figures.

Run as ``python coop_worker.py RANK WORLD PORT RESULT_JSON ORIGINAL_SAFETENSORS PLAIN_URL TP_URL CACHE_DIR``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file

import shardstore
from shardstore.load.loader import LoadOptions

# A Megatron-like plan: attention weights split on rows, the MLP's first weight on columns, the rest whole.
TP_PLAN: dict[str, int | None] = {"*attention.self.*.weight": 0, "*intermediate.dense.weight": 1, "*": None}


def expected_part(name: str, tensor: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    from fnmatch import fnmatchcase

    dim = next(d for pattern, d in TP_PLAN.items() if fnmatchcase(name, pattern))
    if dim is None or dim >= tensor.dim():
        return tensor
    return torch.tensor_split(tensor, world, dim=dim)[rank]  # the cut computed here, not by shardstore


def main() -> None:
    rank, world, port = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    result_path, original, plain_url, tp_url, cache = Path(sys.argv[4]), sys.argv[5], sys.argv[6], sys.argv[7], \
        Path(sys.argv[8])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    originals = load_file(original)
    figures: dict[str, object] = {}
    with shardstore.open(plain_url, cache=cache / f"plain-{rank}") as view:
        loaded = view.load(LoadOptions(group=dist.group.WORLD), threads=1)
        figures["plain_equal"] = sorted(loaded.tensors) == sorted(originals) and all(
            torch.equal(loaded.tensors[n], originals[n]) for n in originals)
        figures["plain"] = loaded.to_json()["cooperative"]
        figures["plain_fetched_shards"] = view.source.fetched_shards  # type: ignore[attr-defined]
    with shardstore.open(tp_url, cache=cache / f"tp-{rank}") as view:
        state = view.state_dict(tp_rank=rank, tp_size=world, tp_plan=TP_PLAN, group=dist.group.WORLD, threads=1)
        figures["tp_equal"] = sorted(state) == sorted(originals) and all(
            torch.equal(state[n], expected_part(n, originals[n], rank, world)) for n in originals)
        figures["tp_split"] = sum(state[n].numel() < originals[n].numel() for n in originals)
        figures["tp_fetched_shards"] = view.source.fetched_shards  # type: ignore[attr-defined]
    dist.destroy_process_group()
    result_path.write_text(json.dumps(figures))


if __name__ == "__main__":
    main()
