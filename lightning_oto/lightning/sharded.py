"""OTOCallback under FSDP2 (Lightning's ``ModelParallelStrategy``): trace before sharding, gather once at the end.

* ``setup`` (before ``configure_model`` shards the network): the strategy is checked, the full module is traced
  (its real weights, on the host) and a parameter-free copy of it is kept (parameters and persistent buffers on
  the ``meta`` device, non-persistent buffers real: they are not in a state dict).
* ``on_fit_start``: ``fully_shard`` keeps parameter names, so the groups map to the sharded parameters by name;
  a ``configure_model`` that renamed, added or removed parameters is refused.  The optimizers then search on
  the local shards (:mod:`lightning_oto.optim.shards`).
* ``on_fit_end``: the full state is gathered once (``get_model_state_dict(full_state_dict=True)``: to rank 0
  only, or to every rank when the sub-network is swapped in) and loaded into the copy, which becomes the model
  that construction, verification, export and ``load`` see, exactly as in a single-process run.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

FSDP2_HINT = ("use lightning.pytorch.strategies.ModelParallelStrategy(data_parallel_size=N, tensor_parallel_size=1) "
              "and call torch.distributed.fsdp.fully_shard on the network's layers in configure_model")


def is_model_parallel(strategy: Any) -> bool:
    """``strategy`` is Lightning's ``ModelParallelStrategy`` (FSDP2 / tensor parallelism)."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    return isinstance(strategy, ModelParallelStrategy)


def check_strategy(strategy: Any, who: str) -> bool:
    """``True`` for a supported ``ModelParallelStrategy``; raises for FSDP1 and for tensor parallelism."""
    from lightning.pytorch.strategies import FSDPStrategy

    if isinstance(strategy, FSDPStrategy):
        raise ValueError(
            f"{who} does not support FSDPStrategy (FSDP1): its flattened parameters hide the layout the groups "
            f"refer to, and it refuses CPU. For sharded training {FSDP2_HINT}.")
    if not is_model_parallel(strategy):
        return False
    mesh = strategy.device_mesh
    tp = mesh["tensor_parallel"].size() if "tensor_parallel" in (mesh.mesh_dim_names or ()) else 1
    if tp > 1:
        raise ValueError(
            f"{who} does not support tensor parallelism (ModelParallelStrategy with tensor_parallel_size={tp}): a "
            "channel group would be split across the tensor-parallel ranks in a way the group reductions do not "
            "cover. Use tensor_parallel_size=1 (FSDP2 over data_parallel_size ranks).")
    return True


def meta_copy(net: nn.Module) -> nn.Module:
    """``net`` without its weights: parameters and persistent buffers become ``meta`` tensors (no memory)."""
    memo: dict[int, Any] = {}
    for p in net.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for mod in net.modules():
        skip = getattr(mod, "_non_persistent_buffers_set", set())
        for name, b in mod.named_buffers(recurse=False):
            if name not in skip:
                memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(net, memo)


def parameter_shapes(net: nn.Module) -> dict[str, tuple[int, ...]]:
    """Global shapes by name (a ``DTensor`` reports its unsharded shape)."""
    return {n: tuple(p.shape) for n, p in net.named_parameters()}


def check_names(traced: dict[str, tuple[int, ...]], net: nn.Module, who: str) -> None:
    """The sharded network has the traced parameters, by name and shape (``fully_shard`` keeps both)."""
    now = parameter_shapes(net)
    if now == traced:
        return
    gone, new = sorted(set(traced) - set(now)), sorted(set(now) - set(traced))
    reshaped = sorted(n for n in set(now) & set(traced) if now[n] != traced[n])
    raise ValueError(
        f"{who}: configure_model changed the network's parameters after the trace (traced in setup, before "
        f"configure_model): missing {gone[:5]}, new {new[:5]}, reshaped {reshaped[:5]}. Build every layer in "
        "__init__ and only shard it in configure_model (fully_shard keeps the names); wrappers that rename "
        "parameters (activation checkpointing, torch.compile) must come after the names are final.")


def gather_full(net: nn.Module, skeleton: nn.Module, to_all_ranks: bool) -> nn.Module | None:
    """The whole network with its trained weights, on the host: on every rank, or on rank 0 only (others get None).

    One collective (all ranks call it).  The copy is fresh each time, so the sharded network stays untouched.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from ..optim.shards import from_rank0

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, broadcast_from_rank0=False)
    state = get_model_state_dict(net, options=options)
    if to_all_ranks:
        state = from_rank0(state)
    if not state:
        return None
    full = copy.deepcopy(skeleton)
    full.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=True, assign=True)
    return full.eval() if not net.training else full.train()


@dataclass
class ShardedTrace:
    """What ``setup`` keeps for an FSDP2 run: the search space traced on the full network, its parameter shapes,
    and the weight-free copy the gathered state is loaded into at the end."""

    oto: Any
    shapes: dict[str, tuple[int, ...]]
    skeleton: nn.Module

    @classmethod
    def of(cls, oto: Any, net: nn.Module) -> "ShardedTrace":
        return cls(oto, parameter_shapes(net), meta_copy(net))

    def bind(self, net: nn.Module, who: str) -> Any:
        """The traced OTO, now driving the sharded ``net`` (same names and shapes, checked).  The traced program
        let go of the full-size weights it referenced (they would stay alive on every rank next to the shards)."""
        check_names(self.shapes, net, who)
        self.oto.model = net
        state = _program_state(self.oto)
        for k, v in state.items():
            state[k] = _meta_like(v)
        return self.oto

    def adopt(self, full: nn.Module) -> None:
        """Fit end: the gathered ``full`` network becomes the model, and the program's weights are its tensors."""
        self.oto.model = full
        named = dict(full.named_parameters(remove_duplicate=False)) | dict(full.named_buffers(remove_duplicate=False))
        state = _program_state(self.oto)
        for k in state:
            if k in named:
                state[k] = named[k]


def _program_state(oto: Any) -> dict[str, Any]:
    """The traced program's own weight dict (``ExportedProgram.state_dict`` is that dict, not a copy)."""
    program = getattr(oto.graph, "program", None)
    return program.state_dict if program is not None else {}


def _meta_like(t: torch.Tensor) -> torch.Tensor:
    meta = torch.empty_like(t, device="meta")
    return nn.Parameter(meta, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else meta
