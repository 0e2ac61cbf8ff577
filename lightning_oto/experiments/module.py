"""A plain image-classification LightningModule around any ``nn.Module`` (the network OTO compresses)."""
from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy


class ClassifierModule(L.LightningModule):
    """Cross-entropy training with SGD + cosine schedule; the network lives in ``self.net``.

    ``OTOCallback(network_attr="net")`` compresses ``self.net``; with ``swap_subnet=True`` the test
    after fit runs on the sub-network.
    """

    def __init__(self, net: nn.Module, num_classes: int, example_input: torch.Tensor | None = None,
                 lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 1e-4, nesterov: bool = False,
                 scheduler: str = "cosine", label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["net", "example_input"])
        self.net = net
        self.example_input_array = example_input
        self.train_acc = MulticlassAccuracy(num_classes=num_classes)
        self.val_acc = MulticlassAccuracy(num_classes=num_classes)
        self.test_acc = MulticlassAccuracy(num_classes=num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def configure_model(self) -> None:
        """Under ModelParallelStrategy (``trainer=fsdp`` / ``fsdp_sim``): FSDP2, one unit per child of the network
        that holds parameters, then the network itself, once; parameter names stay what OTOCallback traced."""
        mesh = self.device_mesh
        if mesh is None or getattr(self, "_sharded_for_fit", False):
            # validate / test after fit: the network is sharded already, or OTOCallback swapped in the
            # sub-network (a plain module, the same on every rank), which evaluates as it is
            return
        self._sharded_for_fit = True
        from torch.distributed.fsdp import fully_shard

        dp = mesh["data_parallel"]
        for child in self.net.children():
            if any(True for _ in child.parameters()):
                fully_shard(child, mesh=dp)
        fully_shard(self.net, mesh=dp)

    def _step(self, batch: Any, metric: MulticlassAccuracy, stage: str) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y, label_smoothing=self.hparams.label_smoothing if stage == "train" else 0.0)
        metric(logits, y)
        # DDP: the epoch loss is averaged over ranks (sync_dist; a no-op in one process); the accuracy metric
        # object syncs its own counts, so every rank logs the same epoch values
        self.log(f"{stage}_loss", loss, prog_bar=stage != "train", on_step=stage == "train", on_epoch=True,
                 sync_dist=True)
        self.log(f"{stage}_acc", metric, prog_bar=True, on_step=False, on_epoch=True)
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._step(batch, self.train_acc, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._step(batch, self.val_acc, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._step(batch, self.test_acc, "test")

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        opt = torch.optim.SGD(self.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay,
                              nesterov=hp.nesterov)
        if hp.scheduler != "cosine":
            return opt
        total = max(1, int(self.trainer.estimated_stepping_batches))
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
