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
  those in ``LoadResult.still_meta`` instead). With ``strict=False`` only the
  names the module has are fetched.
* Non-persistent buffers (``position_ids``, RoPE's ``inv_freq``) are in no
  ``state_dict``. A transformers model built on meta gets them, and any tensor
  the checkpoint lacks, from transformers' own initialisation, as its
  ``from_pretrained`` does (``shardstore.load.hf``). Any other module gets them
  from the checkpoint when it holds a copy; else, built on meta, it cannot be
  completed, which ``strict`` says before fetching anything: build it with
  only its parameters on meta.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from itertools import chain

import torch

from shardstore.errors import InvalidInputError
from shardstore.format.manifest import Manifest
from shardstore.load.loader import LoadOptions, LoadResult, load_model
from shardstore.repo.pieces import ShardLookup
from shardstore.repo.registry import ModelSource

_SHOWN = 5  # names listed in a one-line error before "and N more"


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:_SHOWN])
    return shown + (f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else "")


def non_persistent_buffers(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The module's buffers that ``state_dict()`` leaves out (BERT's ``position_ids``, RoPE's ``inv_freq``)."""
    found: dict[str, torch.Tensor] = {}
    for prefix, owner in module.named_modules():
        for name in owner._non_persistent_buffers_set:
            buffer = owner._buffers.get(name)
            if buffer is not None:
                found[f"{prefix}.{name}" if prefix else name] = buffer
    return found


def load_module(source: ModelSource, manifest: Manifest, lookup: ShardLookup, ref: str, module: torch.nn.Module,
                options: LoadOptions, *, strict: bool = True, threads: int | None = None,
                progress: Callable[[int], None] | None = None, cast: bool = False) -> LoadResult:
    own = module.state_dict(keep_vars=True)
    extra = non_persistent_buffers(module)
    # A transformers model makes the tensors no checkpoint holds itself, as its from_pretrained does.
    completer = transformers_completer(module)
    names = [n for n in own if n in manifest.tensors]
    missing = [n for n in own if n not in manifest.tensors]
    # A checkpoint's copy of a non-persistent buffer (old BERT checkpoints saved position_ids) is not
    # unexpected; it fills that buffer when the buffer is on meta and the model cannot make it itself.
    fills = [n for n, t in extra.items() if t.is_meta and n in manifest.tensors and completer is None]
    unexpected = [n for n in manifest.select(None) if n not in own and n not in extra]
    what = f"{ref} into {type(module).__name__}"
    if strict and (missing or unexpected):
        parts = ([f"missing in the model: {_listing(missing)}"] if missing else []) + (
            [f"not in the module: {_listing(unexpected)}"] if unexpected else [])
        raise InvalidInputError(f"{what}: tensor names differ ({'; '.join(parts)})")
    unmade = [n for n, t in extra.items() if t.is_meta and n not in manifest.tensors and completer is None]
    if strict and unmade:  # said before anything is fetched: a meta buffer would make the output garbage
        raise InvalidInputError(
            f"{what}: {_listing(unmade)} on the meta device and in no checkpoint (non-persistent buffers): "
            f"build the module with only its parameters on meta, or load a transformers model with "
            f"shardstore.from_pretrained"
        )
    wanted = names + fills
    if options.device_map is None and options.device is None:
        # Where the module's tensors are now, so a module on a GPU is loaded straight onto it.
        tensors = {**extra, **own}
        here = {n: "cpu" if tensors[n].is_meta else str(tensors[n].device) for n in wanted}
        options = dataclasses.replace(options, device_map=here)
    result = load_model(source, manifest, lookup, options, names=wanted, threads=threads, progress=progress)
    if cast:
        _cast_to_module_dtypes(result.tensors, {**extra, **own})
    try:
        module.load_state_dict({n: result.tensors[n] for n in names}, strict=strict, assign=True)
    except RuntimeError as exc:  # torch lists size mismatches over several lines: keep it to one
        lines = [line.strip() for line in str(exc).splitlines()[1:] if line.strip()]
        raise InvalidInputError(f"{what}: {'; '.join(lines) or exc}") from None
    for name in fills:
        owner_name, _dot, attr = name.rpartition(".")
        module.get_submodule(owner_name)._buffers[attr] = result.tensors[name]
    if completer is not None:
        completer(set(names), _device_of(result.device_map, module))
    left = [n for n, t in chain(module.named_parameters(), module.named_buffers())
            if t.is_meta and n not in result.tensors]  # a tensor mapped to meta stays meta on purpose
    if strict and left:
        raise InvalidInputError(f"{what}: still on the meta device after loading: {_listing(left)}")
    result.missing, result.unexpected, result.still_meta = missing, unexpected, left
    return result


def _cast_to_module_dtypes(tensors: dict[str, torch.Tensor], own: dict[str, torch.Tensor]) -> None:
    """Floating tensors take the dtype of the module tensor they replace (from_pretrained's ``dtype=``)."""
    for name, tensor in tensors.items():
        target = own[name].dtype
        if tensor.dtype != target and tensor.is_floating_point() and target.is_floating_point:
            tensors[name] = tensor.to(target)  # one tensor at a time: the old one is freed as the dict lets go


def _device_of(device_map: dict[str, str], module: torch.nn.Module) -> Callable[[str], str]:
    """Where a tensor the checkpoint lacks goes: its entry in the device map, else where its neighbours went."""
    fallback = next((str(t.device) for t in chain(module.parameters(), module.buffers()) if not t.is_meta), "cpu")

    def device_for(name: str) -> str:
        parts = name.split(".")
        for end in range(len(parts), -1, -1):
            device = device_map.get(".".join(parts[:end]))
            if device is not None:
                return "cpu" if device == "meta" else device
        return fallback

    return device_for


def transformers_completer(module: torch.nn.Module) -> Callable[[set[str], Callable[[str], str]], None] | None:
    """transformers' own initialisation of what a checkpoint lacks, when ``module`` is a transformers model."""
    if "transformers" not in sys.modules:  # a transformers model means transformers is imported already
        return None
    from shardstore.load.hf import completer_for

    return completer_for(module)
