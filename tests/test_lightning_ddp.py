"""OTOCallback under DDP on CPU with 2 processes (gloo).

ddp_spawn: identical search space and redundant set on every rank, only rank 0 writes the export, the workers'
process groups are gone so a second fit in the same process works.  ddp (subprocess launcher, what the Hydra
configs use): the launching process is rank 0 and holds the real report, and ``trainer.test`` after fit runs the
swapped-in sub-network (``tests/ddp_script.py``, run as a script because Lightning starts rank 1 by re-running it)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, TensorDataset

from lightning_oto import OTOCallback, load
from ddp_script import Net  # the one tiny conv net of the DDP tests (the script runs it under strategy='ddp')

warnings.filterwarnings("ignore", category=FutureWarning)

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


class LitDDP(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = Net()
        self.example_input_array = torch.randn(2, 1, 8, 8)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


class RankRecorder(Callback):
    """Each rank writes what it saw (redundant set, saliency, world size) to its own file."""

    def __init__(self, out: str) -> None:
        self.out = out

    def on_train_end(self, trainer, pl_module):
        cb = next(c for c in trainer.callbacks if isinstance(c, OTOCallback))
        rec = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "dist_initialized": dist.is_initialized(),
            "space_hash": cb.space_id,
            "redundant": cb.optimizer.redundant_group_ids,
            "zero": cb.optimizer.zero_group_ids(),
            "saliency": cb.optimizer.saliency_scores.tolist(),
            "optimizer": type(trainer.optimizers[0]).__name__,
        }
        Path(self.out, f"rank{trainer.global_rank}.json").write_text(json.dumps(rec))


def _data() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1, 8, 8, generator=g)
    y = (x.flatten(1) @ torch.randn(64, 4, generator=g)).argmax(1)
    return DataLoader(TensorDataset(x, y), batch_size=8, shuffle=False)


def _fit(root: Path, export: Path, formats=("torch",)) -> L.Trainer:
    cb = OTOCallback(mode="prune", target_group_sparsity=0.5, warmup_steps=2, projection_steps=2,
                     export_dir=export, export_formats=formats)
    tr = L.Trainer(strategy="ddp_spawn", accelerator="cpu", devices=2, max_epochs=2,
                   callbacks=[cb, RankRecorder(str(root))], default_root_dir=str(root), logger=False,
                   enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    tr.fit(LitDDP(), _data())
    return tr


def test_ddp_spawn_same_redundant_set_rank0_exports(tmp_path):
    export = tmp_path / "export"
    _fit(tmp_path, export)

    recs = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world_size"] == 2 and r["dist_initialized"] for r in recs)
    assert all(r["optimizer"] == "DHSPG" for r in recs)
    assert recs[0]["space_hash"] == recs[1]["space_hash"]
    assert recs[0]["redundant"] == recs[1]["redundant"] and len(recs[0]["redundant"]) > 0
    assert recs[0]["zero"] == recs[1]["zero"] == sorted(recs[0]["redundant"])
    assert recs[0]["saliency"] == recs[1]["saliency"]  # all-reduced: bit-identical on every rank

    # rank 0 (inside its spawned process) wrote the export and the report, once
    rep = json.loads((export / "oto_report.json").read_text())
    assert rep["world_size"] == 2
    assert rep["redundant_group_ids_per_rank"] == [recs[0]["redundant"]] * 2
    assert sorted(g["id"] for g in rep["removed_groups"]) == recs[0]["zero"]
    assert rep["params_sub"] < rep["params_full"] and rep["verification_max_abs_error"] <= 1e-4
    sub = load(export)
    x = torch.randn(3, 1, 8, 8)
    assert sub(x).shape == (3, 4)
    assert sum(p.numel() for p in sub.parameters()) == rep["params_sub"]

    # the process groups were destroyed in the workers; the main process never had one, and a second fit
    # (single process here, to keep the test short) in the same process runs normally
    assert not dist.is_initialized()
    cb = OTOCallback(mode="prune", warmup_steps=1, projection_steps=1, export_formats=(),
                     export_dir=tmp_path / "second")
    tr = L.Trainer(accelerator="cpu", devices=1, max_steps=3, callbacks=[cb], logger=False,
                   enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                   default_root_dir=str(tmp_path))
    tr.fit(LitDDP(), _data())
    assert cb.report is not None and cb.report["world_size"] == 1


def test_ddp_launching_process_holds_report_and_tests_subnet(tmp_path):
    script = Path(__file__).with_name("ddp_script.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for var in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_PORT", "MASTER_ADDR"):
        env.pop(var, None)  # a fresh launch, whatever ran before in this process
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads((tmp_path / "launcher.json").read_text())
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]

    # every rank decided the same; the launching process (rank 0) holds the report with the real counts
    assert ranks[0]["world_size"] == ranks[1]["world_size"] == 2
    assert ranks[0]["space_hash"] == ranks[1]["space_hash"] and ranks[0]["saliency"] == ranks[1]["saliency"]
    assert ranks[0]["zero"] == ranks[1]["zero"] and len(ranks[0]["zero"]) > 0
    rep = got["report"]
    assert rep["world_size"] == 2 and rep["removed_nothing"] is False
    assert rep["params_full"] == 732 and 0 < rep["params_sub"] < rep["params_full"]
    assert got["removed_ids"] == ranks[0]["zero"] and rep["redundant_group_ids_per_rank"] == [ranks[0]["redundant"]] * 2
    assert rep["verification_max_abs_error"] <= 1e-4

    # trainer.test after fit ran the swapped-in sub-network, and its metrics went into the report
    assert got["tested_params"] == [rep["params_sub"]] == [got["net_params_now"]]
    assert got["test_metrics"] and "test_loss" in got["test_metrics"]
    assert got["group_kept_after_fit"] is True  # destroyed, the test stage would hang re-creating it
    # a second fit in the same processes works and reports its own run
    assert got["second_world_size"] == 2 and got["second_report_params"] is not None
    second = [json.loads((tmp_path / "second" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert second[0]["redundant"] == second[1]["redundant"] and second[0]["redundant"]  # latency budget: one choice
