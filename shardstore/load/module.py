"""Loading a model's tensors into a ``torch.nn.Module``, with ``load_state_dict(assign=True)`` semantics.

The loaded tensors *become* the module's parameters and buffers (no copy into
tensors that were already there), so a module built on the meta device
(``with torch.device("meta"):`` or accelerate's ``init_empty_weights()``) never
holds its weights twice.

Decisions (docs/loading.md):

* Without ``device`` or ``device_map``, each tensor goes to the device its
  module tensor is on now (``cpu`` for a meta tensor): loading into a module
  already on ``cuda:0`` sends the weights straight there.
* Devices fill in the module's registration order (``module.state_dict()``).
* ``strict`` (default) checks names before anything is fetched, and after the
  load checks that nothing is left on the meta device (``strict=False`` lists
  those in ``LoadResult.still_meta`` instead): a non-persistent buffer
  (``position_ids``) is in no checkpoint, so a module built entirely under
  ``torch.device("meta")`` cannot be completed from one; build it with
  parameters on meta but buffers real (``init_empty_weights()``'s default).
  With ``strict=False`` only the names the module has are fetched.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from itertools import chain

import torch

from shardstore.errors import InvalidInputError
from shardstore.format.manifest import Manifest
from shardstore.load.loader import LoadOptions, LoadResult, load_model
from shardstore.repo.pieces import ShardLookup
from shardstore.repo.repository import ModelSource

_SHOWN = 5  # names listed in a one-line error before "and N more"


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:_SHOWN])
    return shown + (f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else "")


def load_module(source: ModelSource, manifest: Manifest, lookup: ShardLookup, ref: str, module: torch.nn.Module,
                options: LoadOptions, *, strict: bool = True, threads: int | None = None,
                progress: Callable[[int], None] | None = None) -> LoadResult:
    own = module.state_dict(keep_vars=True)
    names = [n for n in own if n in manifest.tensors]
    missing = [n for n in own if n not in manifest.tensors]
    unexpected = [n for n in manifest.select(None) if n not in own]
    what = f"{ref} into {type(module).__name__}"
    if strict and (missing or unexpected):
        parts = ([f"missing in the model: {_listing(missing)}"] if missing else []) + (
            [f"not in the module: {_listing(unexpected)}"] if unexpected else [])
        raise InvalidInputError(f"{what}: tensor names differ ({'; '.join(parts)})")
    if options.device_map is None and options.device is None:
        # Where the module's tensors are now, so a module on a GPU is loaded straight onto it.
        here = {n: "cpu" if own[n].is_meta else str(own[n].device) for n in names}
        options = dataclasses.replace(options, device_map=here)
    result = load_model(source, manifest, lookup, options, names=names, threads=threads, progress=progress)
    try:
        module.load_state_dict(result.tensors, strict=strict, assign=True)
    except RuntimeError as exc:  # torch lists size mismatches over several lines: keep it to one
        lines = [line.strip() for line in str(exc).splitlines()[1:] if line.strip()]
        raise InvalidInputError(f"{what}: {'; '.join(lines) or exc}") from None
    left = [n for n, t in chain(module.named_parameters(), module.named_buffers())
            if t.is_meta and n not in result.tensors]  # a tensor mapped to meta stays meta on purpose
    if strict and left:
        raise InvalidInputError(
            f"{what}: still on the meta device after loading: {_listing(left)} (in no checkpoint, e.g. "
            f"non-persistent buffers: build the module with only parameters on meta)"
        )
    result.missing, result.unexpected, result.still_meta = missing, unexpected, left
    return result
