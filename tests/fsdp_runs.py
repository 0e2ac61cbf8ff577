"""Runs shared by tests/test_fsdp.py: the same tiny search single-process and on FSDP2 shards (2 CPU processes, gloo).

Workers are started with ``torch.multiprocessing.spawn`` and write what they saw to a file the test reads.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

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
    """One FSDP2 rank: the optimizer alone on shards, then OTOCallback under ModelParallelStrategy."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_RANK=str(rank), NODE_RANK="0")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.save(optimizer_on_shards(rank, world), Path(out_dir) / f"rank{rank}.pt")
        torch.save(callback_on_shards(rank, world, out_dir), Path(out_dir) / f"lit{rank}.pt")
        torch.save(construction_fails_on_rank0(rank, world, out_dir), Path(out_dir) / f"fail{rank}.pt")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def optimizer_on_shards(rank: int, world: int) -> dict[str, Any]:
    """Trace the full model, shard it, search on the shards, gather the state once (rank 0)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard

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
    return out


# ---------------------------------------------------------------------------- OTOCallback under ModelParallelStrategy
class LitMLP(L.LightningModule):
    """Shards its network in configure_model when a device mesh is there (ModelParallelStrategy)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = TinyMLP()
        self.example_input_array = torch.randn(2, 6)
        self.losses: list[float] = []

    def configure_model(self) -> None:
        if self.device_mesh is None:
            return
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for m in (self.net.l1, self.net.l2, self.net.l3):
            fully_shard(m, mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.losses.append(float(loss.detach()))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=0.05)


def loader(rank: int, world: int) -> DataLoader:
    """The same 56 samples in 7 batches of 8 (an epoch: 7 steps); rank r of ``world`` reads samples r, r + world,
    ... of each."""
    x = torch.cat([b[0] for b in batches()[:7]])
    y = torch.cat([b[1] for b in batches()[:7]])
    mine = list(range(rank, x.shape[0], world))
    return DataLoader(TensorDataset(x[mine], y[mine]), batch_size=8 // world, shuffle=False)


def fit(strategy: Any, devices: int, export_dir: str, formats: tuple[str, ...], swap: bool,
        rank: int = 0, callback_class: type | None = None, checkpoint_dir: str | None = None,
        ckpt_path: str | None = None) -> tuple[Any, Any]:
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_oto import OTOCallback

    cb = (callback_class or OTOCallback)(mode="prune", target_group_sparsity=0.4, warmup_steps=4, projection_steps=6,
                     network_attr="net", export_dir=export_dir, export_formats=formats, swap_subnet=swap,
                     bn_recalibration_batches=0, destroy_process_group=False)
    lit = LitMLP()
    extra = [ModelCheckpoint(dirpath=checkpoint_dir, every_n_epochs=1, save_top_k=-1)] if checkpoint_dir else []
    tr = L.Trainer(strategy=strategy, accelerator="cpu", devices=devices, max_steps=STEPS, callbacks=[cb, *extra],
                   logger=False, enable_checkpointing=bool(extra), enable_progress_bar=False,
                   enable_model_summary=False, default_root_dir=export_dir, use_distributed_sampler=False)
    tr.fit(lit, loader(rank, devices), ckpt_path=ckpt_path)
    return cb, lit


def probe() -> torch.Tensor:
    return torch.randn(5, 6, generator=torch.Generator().manual_seed(3))


def callback_single(export_dir: str) -> dict[str, Any]:
    ckpt_dir = Path(export_dir) / "ckpt"
    cb, lit = fit("auto", 1, export_dir, (), swap=True, checkpoint_dir=str(ckpt_dir))
    return {"zero": cb.optimizer.zero_group_ids(), "redundant": cb.optimizer.redundant_group_ids,
            "sub_state": {k: v.detach().clone() for k, v in lit.net.state_dict().items()}, "losses": lit.losses,
            "resumed": resume(ckpt_dir, "auto", 1, 0, str(Path(export_dir) / "resumed"))}


def resume(ckpt_dir: Path, strategy: Any, world: int, rank: int, export_dir: str) -> dict[str, Any]:
    """Resume from the end of epoch 0 (step 7: mid-projection) and finish the same 14 steps."""
    first = sorted(p for p in ckpt_dir.iterdir() if p.name.startswith("epoch=0"))[0]
    cb, lit = fit(strategy, world, export_dir, (), swap=True, rank=rank, ckpt_path=str(first))
    return {"zero": cb.optimizer.zero_group_ids(), "losses": lit.losses, "checkpoint": first.name,
            "num_steps": cb.optimizer.num_steps,
            "sub_state": {k: v.detach().clone() for k, v in lit.net.state_dict().items()}}


def callback_on_shards(rank: int, world: int, out_dir: str) -> dict[str, Any]:
    """OTOCallback in prune mode under ModelParallelStrategy(data_parallel_size=2), the sub-network swapped in."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    strategy = ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1)
    ckpt_dir = Path(out_dir) / "ckpt"
    cb, lit = fit(strategy, world, str(Path(out_dir) / "export"), ("torch",), swap=True, rank=rank,
                  checkpoint_dir=str(ckpt_dir))
    sub, full = lit.net, cb.oto.model  # the swapped-in sub-network and the gathered full network
    x = probe()
    with torch.no_grad():
        sub_out, full_out = sub.eval()(x), full.eval()(x)
    strategy = ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1)
    resumed = resume(ckpt_dir, strategy, world, rank, str(Path(out_dir) / "resumed"))
    return {"resumed": resumed, "zero": cb.optimizer.zero_group_ids(), "redundant": cb.optimizer.redundant_group_ids,
            "sub_type": type(sub).__name__, "full_sharded_type": type(cb.full_network).__name__,
            "sub_state": {k: v.detach().clone() for k, v in sub.state_dict().items()},
            "sub_out": sub_out, "full_out": full_out, "report": cb.report, "losses": lit.losses}


def construction_fails_on_rank0(rank: int, world: int, out_dir: str) -> dict[str, Any]:
    """Construction raises on rank 0 only: every rank must raise, and no rank swaps its network."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    from lightning_oto import OTOCallback
    from lightning_oto.errors import SubnetMismatchError

    class FailsOnRank0(OTOCallback):
        def _construct_verified(self):  # type: ignore[override]
            if dist.get_rank() == 0:
                raise SubnetMismatchError("simulated construction failure on rank 0")
            return super()._construct_verified()

    strategy = ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1)
    holder: dict[str, Any] = {}

    class Keep(FailsOnRank0):
        def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
            holder["lit"] = pl_module
            super().on_fit_start(trainer, pl_module)

    try:
        fit(strategy, world, str(Path(out_dir) / "fail"), (), swap=True, rank=rank, callback_class=Keep)
        raised = None
    except Exception as e:  # noqa: BLE001 - recorded for the test
        raised = f"{type(e).__name__}: {e}"
    return {"raised": raised, "net_type": type(holder["lit"].net).__name__}
