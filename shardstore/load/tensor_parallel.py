"""Tensor-parallel plans: which part of each tensor one rank loads.

A plan maps tensor-name patterns (fnmatch, case-sensitive, first match wins)
to the dim that is split across ranks, ``0`` (rows) or ``1`` (columns), or to
``None`` for a tensor every rank loads whole. ``{"*": 0}`` splits everything on
rows; it is the default plan.

Decisions (docs/loading.md):

* A dim of size ``n`` is cut as ``numpy.array_split`` / ``torch.tensor_split``
  cut it: the first ``n % tp_size`` ranks get one more; the ranks' slices,
  concatenated in rank order, are the tensor.
* A tensor with no such dim (a 0-d scalar for dim 0, a 1-D bias for dim 1) is
  replicated: a Megatron row-parallel layer splits its weight on columns and
  keeps its bias whole, and ``{"*": 1}`` should mean just that.
* A tensor that matches no pattern is replicated.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping

from shardstore.errors import InvalidInputError
from shardstore.repo.read_path import Cut as Cut  # a rank's part of a tensor; the read path cuts it

TPPlan = Mapping[str, int | None]
DEFAULT_TP_PLAN: dict[str, int | None] = {"*": 0}


def check_plan(tp_rank: int | None, tp_size: int | None, tp_plan: TPPlan | None) -> TPPlan | None:
    """The plan to apply (None: no tensor parallelism), after checking rank, size and plan."""
    if tp_size is None and tp_rank is None:
        if tp_plan is not None:
            raise InvalidInputError("tp_plan needs tp_rank and tp_size")
        return None
    if tp_size is None or tp_rank is None:
        raise InvalidInputError("tensor parallelism needs both tp_rank and tp_size")
    if isinstance(tp_size, bool) or not isinstance(tp_size, int) or tp_size < 1:
        raise InvalidInputError(f"tp_size must be a positive int, not {tp_size!r}")
    if isinstance(tp_rank, bool) or not isinstance(tp_rank, int) or not 0 <= tp_rank < tp_size:
        raise InvalidInputError(f"tp_rank must be in [0, {tp_size}), not {tp_rank!r}")
    plan = DEFAULT_TP_PLAN if tp_plan is None else tp_plan
    for pattern, dim in plan.items():
        if not isinstance(pattern, str) or (dim is not None and (isinstance(dim, bool) or dim not in (0, 1))):
            raise InvalidInputError(f"tp_plan entry {pattern!r}: {dim!r} (the split dim must be 0, 1 or None)")
    return plan


def split_dim(name: str, plan: TPPlan) -> int | None:
    for pattern, dim in plan.items():
        if fnmatch.fnmatchcase(name, pattern):
            return dim
    return None


def rank_range(size: int, tp_rank: int, tp_size: int) -> tuple[int, int]:
    """Rank ``tp_rank``'s ``[start, stop)`` of ``size`` items, cut as ``torch.tensor_split`` cuts."""
    base, extra = divmod(size, tp_size)
    start = tp_rank * base + min(tp_rank, extra)
    return start, start + base + (1 if tp_rank < extra else 0)


def cut_for(name: str, shape: tuple[int, ...], plan: TPPlan, tp_rank: int, tp_size: int) -> Cut | None:
    """The part of tensor ``name`` that rank ``tp_rank`` loads; None for the whole tensor."""
    dim = split_dim(name, plan)
    if dim is None or dim >= len(shape) or tp_size == 1:
        return None
    return Cut(dim, *rank_range(shape[dim], tp_rank, tp_size))
