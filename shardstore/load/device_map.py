"""Device maps: which device each tensor goes to.

A device map is what accelerate writes: module prefix → device, e.g.
``{"embeddings": 0, "encoder.layer.0": 0, "encoder.layer.1": "cpu"}``. A tensor
goes to the device of the longest prefix that is its name or a dotted parent of
it (``""`` matches everything). ``"auto"`` and ``"balanced"`` make such a map
from the tensors' sizes and a ``max_memory`` per device, filling devices in
layer order, so consecutive layers share a device and activations cross few
device boundaries.

Decisions where accelerate leaves room (docs/loading.md has the prose):

* The unit that is never split across devices is the *layer*: the name up to
  its first numeric component (``encoder.layer.3``), else the module path, the
  same grouping push uses to pack shards (:func:`shardstore.repo.chunking.layer_of`).
* Layer order is the module's registration order when loading into a module,
  else the natural order of names (``layer.2`` before ``layer.10``).
* ``max_memory`` values are bytes (ints). Devices fill in the order: CUDA by
  index, then ``cpu``, then ``meta``. Without ``max_memory``: every visible CUDA
  device at 90 % of its free memory, then the available host memory.
* ``"auto"`` fills each device up to its ``max_memory`` before the next one;
  ``"balanced"`` gives each device an equal share of the model (still capped by
  ``max_memory``), a layer going where most of it fits.
* ``"disk"`` (accelerate's offload) is refused: a shardstore model *is* the
  offload; read it lazily with :meth:`ModelView.get_tensor` instead.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Literal

import torch

from shardstore.errors import InvalidInputError
from shardstore.repo.chunking import layer_of

DeviceLike = str | int | torch.device
DeviceMap = Mapping[str, DeviceLike]
Strategy = Literal["auto", "balanced"]
STRATEGIES: tuple[str, ...] = ("auto", "balanced")

# Headroom left on a GPU when max_memory is not given: the CUDA context, activations, fragmentation.
CUDA_DEFAULT_FRACTION = 0.9

_NUMBER = re.compile(r"(\d+)")


def normalize_device(value: DeviceLike) -> str:
    """``0`` → ``cuda:0``, ``"cuda"`` → ``cuda:0``; checks that the device exists on this machine."""
    if isinstance(value, bool):
        raise InvalidInputError(f"not a device: {value!r}")
    if isinstance(value, int):
        value = f"cuda:{value}"
    text = str(value).strip()
    if text == "disk":
        raise InvalidInputError("device 'disk' (offload) is not supported: the stored model is already the offload; "
                                "read tensors lazily with get_tensor()")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise InvalidInputError(f"not a device: {text!r}") from None
    if device.type == "cuda":
        index = 0 if device.index is None else device.index
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if index >= count:
            raise InvalidInputError(f"device cuda:{index} does not exist (this machine has {count} CUDA devices)")
        return f"cuda:{index}"
    if device.type in ("cpu", "meta"):
        return device.type
    raise InvalidInputError(f"device {text!r}: only cpu, meta and cuda:N are supported")


def _device_order(device: str) -> tuple[int, int]:
    if device.startswith("cuda:"):
        return 0, int(device.partition(":")[2])
    return (1, 0) if device == "cpu" else (2, 0)


def default_max_memory() -> dict[str, int]:
    """Every visible CUDA device at 90 % of its free memory, then the host's available memory."""
    budget: dict[str, int] = {}
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            free, _total = torch.cuda.mem_get_info(index)
            budget[f"cuda:{index}"] = int(free * CUDA_DEFAULT_FRACTION)
    budget["cpu"] = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return budget


def normalize_max_memory(max_memory: Mapping[DeviceLike, int] | None) -> dict[str, int]:
    """Device → bytes, in fill order (CUDA by index, cpu, meta)."""
    if max_memory is None:
        return default_max_memory()
    budget: dict[str, int] = {}
    for key, value in max_memory.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise InvalidInputError(f"max_memory[{key!r}] must be a number of bytes (int >= 0), not {value!r}")
        budget[normalize_device(key)] = value
    if not budget:
        raise InvalidInputError("max_memory names no device")
    return dict(sorted(budget.items(), key=lambda item: _device_order(item[0])))


def natural_key(name: str) -> tuple[tuple[int, int, str], ...]:
    """Sort key that puts ``layer.2`` before ``layer.10``."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in _NUMBER.split(name) if part)


def layer_blocks(names: Iterable[str], sizes: Mapping[str, int]) -> dict[str, int]:
    """Layer → bytes, in the order the names come (first appearance of each layer)."""
    blocks: dict[str, int] = {}
    for name in names:
        block = layer_of(name)
        blocks[block] = blocks.get(block, 0) + sizes[name]
    return blocks


def plan_device_map(names: Sequence[str], sizes: Mapping[str, int], strategy: str,
                    max_memory: Mapping[DeviceLike, int] | None = None) -> dict[str, str]:
    """An accelerate-style map (layer → device) for tensors ``names`` (in layer order) of ``sizes`` bytes."""
    if strategy not in STRATEGIES:
        raise InvalidInputError(f"device map {strategy!r}: expected a mapping or one of {', '.join(STRATEGIES)}")
    budget = normalize_max_memory(max_memory)
    blocks = layer_blocks(names, sizes)
    devices = list(budget)
    plan: dict[str, str] = {}
    pending = list(blocks.items())
    remaining = sum(blocks.values())
    for position, device in enumerate(devices):
        last = position == len(devices) - 1
        cap = budget[device] if device != "meta" else remaining
        share = cap if strategy == "auto" or last else min(cap, -(-remaining // (len(devices) - position)))
        used = 0
        while pending:
            block, size = pending[0]
            fits = used + size <= cap
            # Balanced: a layer goes where most of it falls inside this device's share, and a
            # device whose share is smaller than one layer still takes that layer.
            within_share = used + size <= share or (strategy == "balanced" and (used == 0 or used + size / 2 <= share))
            if not (fits and within_share):
                break
            plan[block] = device
            used += size
            remaining -= size
            pending.pop(0)
    if pending:
        block, size = pending[0]
        raise InvalidInputError(
            f"device map {strategy!r}: layer {block} ({size} bytes) and {len(pending) - 1} more do not fit in "
            f"max_memory {dict(budget)}"
        )
    return plan


def resolve_device_map(device_map: DeviceMap, names: Iterable[str]) -> dict[str, str]:
    """Tensor → device for a prefix map: the longest key that is the name or a dotted parent of it."""
    devices = {prefix: normalize_device(device) for prefix, device in device_map.items()}
    placed: dict[str, str] = {}
    for name in names:
        for prefix in _prefixes(name):
            if prefix in devices:
                placed[name] = devices[prefix]
                break
        else:
            raise InvalidInputError(f"device map has no entry for tensor {name!r} (nor for any module holding it)")
    return placed


def _prefixes(name: str) -> Iterator[str]:
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        yield ".".join(parts[:end])
    yield ""


def place(names: Sequence[str], sizes: Mapping[str, int], *, device: DeviceLike | None = None,
          device_map: DeviceMap | str | None = None,
          max_memory: Mapping[DeviceLike, int] | None = None) -> tuple[dict[str, str], dict[str, str]]:
    """(tensor → device, the device map used) for ``names`` in layer order.

    ``device_map`` is a prefix map, ``"auto"``/``"balanced"``, a device name (``"cuda:0"``: everything
    there, as transformers accepts it), or None for every tensor on ``device`` (cpu).
    """
    if isinstance(device_map, str) and device_map not in STRATEGIES:
        device_map = {"": device_map}
    if device_map is not None and device is not None:
        raise InvalidInputError("give a device or a device_map, not both")
    if device_map is None:
        if max_memory is not None:
            raise InvalidInputError("max_memory applies only with device_map='auto' or 'balanced'")
        target = normalize_device("cpu" if device is None else device)
        return dict.fromkeys(names, target), {"": target}
    if isinstance(device_map, str):
        plan = plan_device_map(names, sizes, device_map, max_memory)
    else:
        if max_memory is not None:
            raise InvalidInputError("max_memory applies only with device_map='auto' or 'balanced'")
        plan = {prefix: normalize_device(value) for prefix, value in device_map.items()}
    return resolve_device_map(plan, names), plan
