"""Parameters sharded by FSDP2 (``fully_shard``): which rows a rank holds and how its partial sums add up.

FSDP2 turns every parameter into a ``DTensor`` sharded on dim 0 (``Shard(0)``, chunks of
``ceil(N / shards)`` rows) over the data-parallel mesh, replicated over a replicate mesh dimension
(HSDP) if there is one.  The optimizers work on each rank's local shard and never gather a
parameter: a per-group quantity (squared norm, inner product) is the SUM of the ranks' partial sums.
Every rank weighs its partials by ``shards / world`` (its :attr:`ShardLayout.weight`), so one SUM
all-reduce over the world gives the sum over shards and the mean over replicas in one collective:
a plain (replicated) tensor under DDP gets ``1 / world``, i.e. today's DDP mean.

Anything else (tensor parallelism, a shard on another dim, a ``Partial`` placement) raises: the
reductions here would not cover it.
"""
from __future__ import annotations

import math
from collections.abc import MutableMapping
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist

__all__ = ["LocalState", "ShardLayout", "all_reduce_sum_", "from_rank0", "mean_over_ranks", "is_sharded", "local_view", "shard_layout", "world_size"]


def world_size() -> int:
    """Ranks of the default process group (1 outside ``torch.distributed``)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _dtensor_class() -> type | None:
    if not dist.is_available():
        return None
    from torch.distributed.tensor import DTensor

    return DTensor


def is_sharded(t: torch.Tensor) -> bool:
    """``t`` is a ``DTensor`` (an FSDP2 parameter or gradient)."""
    cls = _dtensor_class()
    return cls is not None and isinstance(t, cls)


def local_view(t: torch.Tensor) -> torch.Tensor:
    """The tensor this rank holds: a ``DTensor``'s local shard (same storage, in-place ops reach the parameter),
    any other tensor itself."""
    return t._local_tensor if is_sharded(t) else t  # type: ignore[attr-defined]


@dataclass(frozen=True)
class ShardLayout:
    """This rank's part of one parameter along dim 0, and its weight in the SUM over all ranks."""

    start: int
    rows: int
    weight: float


def shard_layout(name: str, t: torch.Tensor) -> ShardLayout:
    """Rows ``[start, start + rows)`` of dim 0 that this rank holds; the whole tensor when it is not a ``DTensor``.

    Raises ``ValueError`` naming the parameter for a placement the reductions do not cover.
    """
    world = world_size()
    full_rows = t.shape[0] if t.dim() else 1
    if not is_sharded(t):
        return ShardLayout(0, full_rows, 1.0 / world)
    from torch.distributed.tensor import Replicate, Shard

    mesh, placements = t.device_mesh, t.placements  # type: ignore[attr-defined]
    shard_dims = [m for m, pl in enumerate(placements) if isinstance(pl, Shard)]
    bad = [pl for pl in placements if not isinstance(pl, (Shard, Replicate))]
    if bad or len(shard_dims) > 1 or any(type(placements[m]) is not Shard or placements[m].dim != 0
                                         for m in shard_dims):
        raise ValueError(
            f"parameter {name!r} is a DTensor with placements {tuple(placements)} on mesh {tuple(mesh.shape)}: the "
            "half-space optimizers support FSDP2 sharding on dim 0 only (fully_shard over a data-parallel mesh, "
            "optionally replicated: HSDP). Tensor parallelism (tensor_parallel_size > 1) splits a group in a way "
            "their reductions do not cover.")
    local = t._local_tensor  # type: ignore[attr-defined]
    shards = mesh.size(shard_dims[0]) if shard_dims else 1
    if world % shards:
        raise ValueError(f"parameter {name!r}: {shards} shards do not divide the world of {world} ranks evenly.")
    start = 0
    if shard_dims:  # torch.chunk semantics, as FSDP2 and DTensor shard dim 0
        chunk = math.ceil(full_rows / shards)
        start = min(mesh.get_local_rank(shard_dims[0]) * chunk, full_rows)
    rows = local.shape[0] if local.dim() else 1
    if start + rows > full_rows:
        raise ValueError(f"parameter {name!r}: local shard of {rows} rows at row {start} exceeds {full_rows} rows.")
    return ShardLayout(start, rows, shards / world)


def all_reduce_sum_(t: torch.Tensor) -> torch.Tensor:
    """One SUM all-reduce over the default group (nothing outside ``torch.distributed``)."""
    if t.numel() and world_size() > 1:
        dist.all_reduce(t)
    return t


def from_rank0(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank of the default group (``obj`` itself outside ``torch.distributed``)."""
    if world_size() == 1:
        return obj
    box = [obj if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def mean_over_ranks(value: float, device: torch.device) -> float:
    """``value`` averaged over the default group; ``device`` is where the backend reduces (the model's)."""
    n = world_size()
    if n == 1:
        return value
    return float(all_reduce_sum_(torch.tensor([value], dtype=torch.float64, device=device)).item()) / n


class LocalState(MutableMapping):
    """An FSDP2 parameter's optimizer state seen through its local shard.

    The variants read and write plain tensors; the state keeps ``DTensor``s laid out like the parameter,
    so a distributed checkpoint (``get_optimizer_state_dict``) saves and reshards them like any FSDP2
    optimizer state.
    """

    def __init__(self, state: dict[str, Any], param: torch.Tensor) -> None:
        self._state, self._param = state, param

    def __getitem__(self, key: str) -> Any:
        v = self._state[key]
        return local_view(v) if is_sharded(v) else v

    def __setitem__(self, key: str, value: Any) -> None:
        p = self._param
        if isinstance(value, torch.Tensor) and not is_sharded(value) and value.shape == local_view(p).shape \
                and value.dim() > 0:
            from torch.distributed.tensor import DTensor

            value = DTensor.from_local(value, p.device_mesh, p.placements, run_check=False,  # type: ignore[attr-defined]
                                       shape=p.shape, stride=p.stride())
        self._state[key] = value

    def __delitem__(self, key: str) -> None:
        del self._state[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._state)

    def __len__(self) -> int:
        return len(self._state)
