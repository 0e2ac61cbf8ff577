"""Compress a small CNN on real 8x8 handwritten digits (scikit-learn's ``load_digits``, offline).

The only OTO-specific line is the callback in ``L.Trainer(callbacks=[...])``: it traces the network
at fit start, swaps the SGD optimizer below for DHSPG (prune) or H2SPG (erase) with the same
hyper-parameters (the cosine LR schedule keeps working), and at fit end builds the physically smaller
sub-network, checks it computes the same outputs, exports it (torch.export ``.pt2`` + ONNX) and writes
a JSON report.

    python examples/compress_digits.py                  # prune channels, 50% of the groups
    python examples/compress_digits.py --mode erase     # erase whole residual blocks
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from lightning_oto import OTOCallback
from lightning_oto import load
from lightning_oto.lightning.terminal import quiet_terminal


def conv_bn(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class Residual(nn.Module):
    """x + f(x): erase mode can remove f entirely; prune mode removes channels shared with x."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.f = conv_bn(c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.f(x)


class DigitsCNN(nn.Module):
    def __init__(self, width: int = 16, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = conv_bn(1, width)
        self.stage1 = nn.Sequential(Residual(width), Residual(width))
        self.down = nn.Sequential(conv_bn(width, 2 * width), nn.MaxPool2d(2))  # 8x8 -> 4x4
        self.stage2 = nn.Sequential(Residual(2 * width), Residual(2 * width))
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage2(self.down(self.stage1(self.stem(x))))
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


class DigitsClassifier(L.LightningModule):
    def __init__(self, lr: float = 0.1, width: int = 16) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = DigitsCNN(width)
        self.example_input_array = torch.zeros(2, 1, 8, 8)  # what OTO traces (batch > 1: exports keep a dynamic batch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def _step(self, batch, stage: str) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.log(f"{stage}_loss", loss, prog_bar=stage != "train", batch_size=len(x))
        self.log(f"{stage}_acc", (logits.argmax(1) == y).float().mean(), prog_bar=True, batch_size=len(x))
        return loss

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._step(batch, "test")

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.trainer.max_epochs)
        return {"optimizer": opt, "lr_scheduler": sched}


def digits_datamodule(batch_size: int, seed: int) -> L.LightningDataModule:
    """The project's shared datamodule when present; a minimal stand-in otherwise."""
    try:
        from lightning_oto.data import build_datamodule

        return build_datamodule("digits", batch_size=batch_size, seed=seed)
    except ImportError:
        from sklearn.datasets import load_digits
        from torch.utils.data import TensorDataset, random_split

        d = load_digits()
        x = torch.tensor(d.images[:, None] / 16.0, dtype=torch.float32)
        ds = TensorDataset((x - x.mean()) / x.std(), torch.tensor(d.target))
        n_test = n_val = len(ds) // 8
        train, val, test = random_split(ds, [len(ds) - n_val - n_test, n_val, n_test],
                                        generator=torch.Generator().manual_seed(seed))
        return L.LightningDataModule.from_datasets(train, val, test, batch_size=batch_size)


def main() -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=("prune", "erase"), default="prune")
    p.add_argument("--sparsity", type=float, default=0.5, help="target group sparsity in [0, 1)")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--out", default="runs/compress_digits")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    quiet_terminal()
    t0 = time.perf_counter()
    L.seed_everything(args.seed, verbose=False)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    out = Path(args.out) / args.mode
    dm = digits_datamodule(batch_size=64, seed=args.seed)
    model = DigitsClassifier(width=args.width)
    oto = OTOCallback(mode=args.mode, target_group_sparsity=args.sparsity, warmup_epochs=2, projection_epochs=2,
                      export_dir=out / "export", network_attr="net")
    trainer = L.Trainer(max_epochs=args.epochs, accelerator="cpu", devices=1, default_root_dir=str(out),
                        enable_model_summary=False, callbacks=[oto])
    trainer.fit(model, datamodule=dm)

    # the full model (its removed groups are exactly zero) and the exported sub-network agree on test data;
    # the test metrics also go into the callback's report
    full_acc = trainer.test(model, datamodule=dm, verbose=False)[0]["test_acc"]
    exported = load(out / "export")  # torch.export program: no pickled code
    correct = total = 0
    with torch.no_grad():
        for x, y in dm.test_dataloader():
            correct += int((exported(x).argmax(1) == y).sum())
            total += len(y)
    rep = oto.report
    print(f"\n{rep['mode']} mode, {rep['optimizer']}: {rep['num_zero_groups']}/{rep['num_prunable_groups']} groups "
          f"removed (group sparsity {rep['group_sparsity']:.3f}, target {rep['target_group_sparsity']}), "
          f"max |sub - full| = {rep['verification_max_abs_error']:.2g}")
    print(f"test accuracy: full model {full_acc:.4f} | exported sub-network {correct / total:.4f}")
    print(f"params {rep['params_full']:,} -> {rep['params_sub']:,} ({100 * rep['params_removed_fraction']:.1f}% "
          f"removed), FLOPs {rep['flops_full']:,} -> {rep['flops_sub']:,} "
          f"({100 * rep['flops_removed_fraction']:.1f}% removed)")
    print(f"files: {', '.join(sorted(Path(v).name for k, v in rep['exports'].items() if not k.endswith('error')))}"
          f" + oto_report.json in {out / 'export'}   ({time.perf_counter() - t0:.0f}s)")
    return rep


if __name__ == "__main__":
    main()
