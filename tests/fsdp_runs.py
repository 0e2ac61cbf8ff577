"""Runs shared by tests/test_fsdp.py: the same tiny search single-process and on FSDP2 shards (2 CPU processes, gloo).

Prune mode on a tiny MLP; erase mode (H2SPG) on a tiny Llama-style decoder. Workers are started with
``torch.multiprocessing.spawn`` and write what they saw to a file the test reads.
"""
from __future__ import annotations

import os
import re
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
PRUNE_SEARCH = dict(mode="prune", target_group_sparsity=0.4, warmup_steps=4, projection_steps=6)


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
        torch.save(erase_on_shards(rank, world, out_dir), Path(out_dir) / f"erase{rank}.pt")
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
        ckpt_path: str | None = None, erase: bool = False) -> tuple[Any, Any]:
    """One Trainer.fit with OTOCallback: prune mode on the MLP, or (``erase``) erase mode on the tiny decoder."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_oto import OTOCallback

    search = ERASE_SEARCH if erase else PRUNE_SEARCH
    cb = (callback_class or OTOCallback)(**search, network_attr="net", export_dir=export_dir, export_formats=formats,
                                         swap_subnet=swap, bn_recalibration_batches=0, destroy_process_group=False)
    lit = LitDecoder() if erase else LitMLP()
    data = decoder_loader(rank, devices) if erase else loader(rank, devices)
    extra = [ModelCheckpoint(dirpath=checkpoint_dir, every_n_epochs=1, save_top_k=-1)] if checkpoint_dir else []
    # prune runs stop by epochs (2 x 7 steps): under max_steps Lightning replays a batch when resuming from an
    # end-of-epoch checkpoint (docs/distributed.md), so only max_epochs can reproduce the uninterrupted run
    stop = dict(max_steps=ERASE_STEPS) if erase else dict(max_epochs=STEPS // 7)
    tr = L.Trainer(strategy=strategy, accelerator="cpu", devices=devices, **stop,
                   callbacks=[cb, *extra], logger=False, enable_checkpointing=bool(extra), enable_progress_bar=False,
                   enable_model_summary=False, default_root_dir=export_dir, use_distributed_sampler=False)
    tr.fit(lit, data, ckpt_path=ckpt_path)
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


# ---------------------------------------------------------------------------- erase mode on a Llama-style decoder
LAYERS, VOCAB, SEQ = 4, 32, 8
ERASE_STEPS = 8
DATA_SEED = 7  # the search erases layers 0 and 2 whole and the attention of layers 1 and 3
# 8 groups (each layer's attention and MLP branch); erasing 6 leaves at least two layers with neither: whole blocks go.
# A static trace: a dynamic one costs seconds more per process, and the decision does not depend on it.
ERASE_SEARCH = dict(mode="erase", target_group_sparsity=0.75, warmup_steps=3, projection_steps=3,
                    dynamic_shapes="static", measure_speed=False)


class TinyDecoder(nn.Module):
    """``LlamaForCausalLM`` from a config (4 layers, width 16, random weights, no download) returning plain logits."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=LAYERS,
                          num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=SEQ, use_cache=False,
                          attn_implementation="sdpa")
        self.lm = LlamaForCausalLM(cfg)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm(ids).logits


class LitDecoder(L.LightningModule):
    """Next-token loss; shards each decoder layer, then the whole network, in configure_model (FSDP2)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = TinyDecoder()
        self.example_input_array = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(4))
        self.losses: list[float] = []

    def configure_model(self) -> None:
        if self.device_mesh is None:
            return
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in self.net.lm.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        (ids,) = batch
        logits = self.net(ids[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
        self.losses.append(float(loss.detach()))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=0.01)


def decoder_probe() -> torch.Tensor:
    """Not the traced example; the example's shape (a static trace)."""
    return torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(3))


def decoder_loader(rank: int, world: int) -> DataLoader:
    """8 batches of 4 token sequences; rank r of ``world`` reads sequences r, r + world, ... (equal halves, so the
    mean of the ranks' losses is the full batch's loss)."""
    ids = torch.randint(0, VOCAB, (4 * ERASE_STEPS, SEQ + 1), generator=torch.Generator().manual_seed(DATA_SEED))
    return DataLoader(TensorDataset(ids[rank::world]), batch_size=4 // world, shuffle=False)


def erased_layers(report: dict[str, Any]) -> dict[str, list[int]]:
    """Decoder layers whose attention / MLP / both the report lists as removed (from the removed groups' names)."""
    parts: dict[str, set[int]] = {"self_attn": set(), "mlp": set()}
    for g in report["removed_groups"]:
        m = re.search(r"layers\.(\d+)\.(self_attn|mlp)\.", g["name"])
        if m:
            parts[m.group(2)].add(int(m.group(1)))
    return {"attention": sorted(parts["self_attn"]), "mlp": sorted(parts["mlp"]),
            "blocks": sorted(parts["self_attn"] & parts["mlp"])}


def erase_record(cb: Any, lit: Any) -> dict[str, Any]:
    """What an erase run decided, and on rank 0 the sub-network (state, outputs) and the report."""
    out: dict[str, Any] = {"zero": cb.optimizer.zero_group_ids(), "redundant": cb.optimizer.redundant_group_ids,
                           "losses": lit.losses, "report": cb.report,
                           "saliency": cb.optimizer.saliency_scores.tolist()}
    if cb.subnet is not None:
        x = decoder_probe()
        with torch.no_grad():
            out.update(sub_state={k: v.detach().clone() for k, v in cb.subnet.state_dict().items()},
                       sub_out=cb.subnet(x), full_out=cb.oto.model.eval()(x))
    return out


def erase_single(export_dir: str) -> dict[str, Any]:
    return erase_record(*fit("auto", 1, export_dir, (), swap=False, erase=True))


def erase_on_shards(rank: int, world: int, out_dir: str) -> dict[str, Any]:
    """OTOCallback in erase mode (H2SPG) under ModelParallelStrategy: rank 0 gathers, constructs and reports."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    strategy = ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1)
    return erase_record(*fit(strategy, world, str(Path(out_dir) / "erase"), (), swap=False, rank=rank, erase=True))
