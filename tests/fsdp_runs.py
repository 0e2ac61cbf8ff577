"""Runs shared by tests/test_fsdp.py: the same tiny search single-process and on FSDP2 shards (2 CPU processes, gloo).

Workers are started with ``torch.multiprocessing.spawn`` and write what they saw to a file the test reads.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from lightning_oto import OTO

STEPS = 14
OPT = dict(lr=0.05, target_group_sparsity=0.4, warmup_steps=4, projection_steps=6, variant="adam")


class TinyMLP(nn.Module):
    """Hidden widths 10 and 7: FSDP2 splits them 5/5 and 4/3 over 2 ranks (uneven shards)."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2, self.l3 = nn.Linear(6, 10), nn.Linear(10, 7), nn.Linear(7, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l3(F.relu(self.l2(F.relu(self.l1(x)))))


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(STEPS)]


def search(model: nn.Module, oto: OTO, rank: int = 0, world: int = 1) -> dict[str, Any]:
    """Train ``model`` with DHSPG for ``STEPS`` steps; rank ``r`` of ``world`` takes its share of each batch."""
    opt = oto.dhspg(**OPT)
    losses = []
    for x, y in batches():
        n = x.shape[0] // world
        loss = F.cross_entropy(model(x[rank * n:(rank + 1) * n]), y[rank * n:(rank + 1) * n])
        opt.zero_grad()
        loss.backward()
        opt.step()
        mean = loss.detach().clone()
        if world > 1:
            dist.all_reduce(mean)
            mean /= world
        losses.append(float(mean))
    return {"redundant": opt.redundant_group_ids, "zero": opt.zero_group_ids(), "losses": losses,
            "saliency": opt.saliency_scores.tolist(), "optimizer_state": opt.state_dict()}


def single_process() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = TinyMLP()
    oto = OTO(model, torch.randn(2, 6), mode="prune")
    out = search(model, oto)
    return out, {k: v.detach().clone() for k, v in model.state_dict().items()}


def sharded_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """One FSDP2 rank: trace the full model, shard it, search on the shards, save the gathered state (rank 0)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = TinyMLP()
        oto = OTO(model, torch.randn(2, 6), mode="prune")  # traced before sharding: the full module
        for m in (model.l1, model.l2, model.l3):
            fully_shard(m)
        fully_shard(model)
        local_rows = {n: tuple(p.to_local().shape) for n, p in model.named_parameters()}
        out = search(model, oto, rank, world)
        out.pop("optimizer_state")
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        out.update(local_rows=local_rows, state=state)
        torch.save(out, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()
