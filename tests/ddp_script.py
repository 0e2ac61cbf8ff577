"""Run by tests/test_lightning_ddp.py as ``python tests/ddp_script.py OUT_DIR``: a 2-process CPU DDP fit with the
subprocess launcher (``strategy="ddp"``: this process is rank 0, Lightning starts rank 1 by running this file again),
then ``trainer.test`` on the swapped-in sub-network, then a second fit in the same processes.  Rank 0 writes what the
launching process holds to ``OUT_DIR/launcher.json``; every rank writes ``OUT_DIR/rank<r>.json``."""
from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_oto import OTOCallback


class Net(nn.Module):
    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.f = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                               nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.fc = nn.Linear(width, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.adaptive_avg_pool2d(self.f(x), 1).flatten(1))


class LitDDP(L.LightningModule):
    """Counts the parameters of the network each test step really ran."""

    def __init__(self, width: int = 8, example_shape: tuple[int, ...] = (2, 1, 8, 8)) -> None:
        super().__init__()
        self.net = Net(width)
        self.example_input_array = torch.randn(*example_shape)
        self.tested_params: set[int] = set()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, on_step=False, on_epoch=True, sync_dist=True)
        return loss

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.tested_params.add(sum(p.numel() for p in self.net.parameters()))
        self.log("test_loss", F.cross_entropy(self(x), y), sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


class RankRecorder(Callback):
    """Each rank: what its search decided (must be the same on every rank)."""

    def __init__(self, out: Path) -> None:
        self.out = out
        out.mkdir(parents=True, exist_ok=True)

    def on_train_end(self, trainer, pl_module):
        cb = next(c for c in trainer.callbacks if isinstance(c, OTOCallback))
        rec = {"rank": trainer.global_rank, "world_size": trainer.world_size, "space_hash": cb.space_id,
               "redundant": cb.optimizer.redundant_group_ids, "zero": cb.optimizer.zero_group_ids(),
               "saliency": cb.optimizer.saliency_scores.tolist()}
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(rec))


def data() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1, 8, 8, generator=g)
    y = (x.flatten(1) @ torch.randn(64, 4, generator=g)).argmax(1)
    return DataLoader(TensorDataset(x, y), batch_size=8, shuffle=False)


def trainer(out: Path, callbacks: list[Callback], **kw) -> L.Trainer:
    return L.Trainer(strategy="ddp", accelerator="cpu", devices=2, callbacks=callbacks, default_root_dir=str(out),
                     logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, **kw)


def main(out: Path) -> None:
    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.set_num_threads(1)
    cb = OTOCallback(mode="prune", target_group_sparsity=0.5, warmup_steps=2, projection_steps=2,
                     export_dir=out / "export", export_formats=("torch",), swap_subnet=True, verbose=0)
    tr = trainer(out, [cb, RankRecorder(out)], max_epochs=2)
    lit = LitDDP()
    tr.fit(lit, data())
    group_kept = dist.is_initialized()  # strategy='ddp': trainer.test reuses it
    tr.test(lit, data(), verbose=False)
    # a second fit in the same processes reuses the process group; its latency budget is timed on every rank
    # (rank 0's per-operator costs, the mean of the ranks' sub-network timings): the ranks must still agree
    # (wide enough that time follows width: on the 8-channel net per-call overheads are most of it)
    cb2 = OTOCallback(mode="prune", budget={"latency": 0.6}, warmup_steps=1, projection_steps=1,
                      export_dir=out / "second", export_formats=(), verbose=0)
    tr2 = trainer(out, [cb2, RankRecorder(out / "second")], max_steps=3)
    tr2.fit(LitDDP(width=64, example_shape=(8, 1, 16, 16)), data())
    if tr.global_rank != 0:
        return
    rep = cb.report or {}
    (out / "launcher.json").write_text(json.dumps({
        "report": {k: rep.get(k) for k in ("params_full", "params_sub", "world_size", "removed_nothing",
                                           "redundant_group_ids_per_rank", "verification_max_abs_error")},
        "removed_ids": sorted(g["id"] for g in rep.get("removed_groups", [])),
        "test_metrics": (rep.get("metrics") or {}).get("test"),
        "net_params_now": sum(p.numel() for p in lit.net.parameters()),
        "tested_params": sorted(lit.tested_params),
        "group_kept_after_fit": group_kept,
        "second_report_params": (cb2.report or {}).get("params_sub"),
        "second_world_size": (cb2.report or {}).get("world_size"),
    }))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
