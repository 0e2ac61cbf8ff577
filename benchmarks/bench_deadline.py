"""Are redundant groups small when they are cut?  The issue-18 BERT case (and DemoNet on digits).

A 2-layer BERT (``hidden_size=64``, 4 heads, ``intermediate_size=128``) classifies random token
sequences by one planted word (token 5: positive, token 6: negative, at a random position);
AdamW (lr 1e-3, weight decay 0.01), prune mode, target group sparsity 0.5, DHSPG, batch 32.
``--model demonet`` runs DemoNet on scikit-learn's digits instead (``--variant sgd`` / ``adamw``).

Printed per run: how the redundant groups were cut (half-space test / forced at the deadline),
the distribution of ``|x_g| just before the cut / |x_g| at selection`` (measured here by following
the groups' norms every step, and as the optimizer records it, ``opt.cut_norm_ratios()``, when it
has that method), and validation accuracy at the end of warm-up, at the end of projection and at
the end of training, plus the accuracy of the constructed sub-network.

    python benchmarks/bench_deadline.py                          # BERT, AdamW lr 1e-3
    python benchmarks/bench_deadline.py --model demonet --variant sgd --lr 0.1
    python benchmarks/bench_deadline.py --model demonet --variant adamw --lr 1e-3
"""
from __future__ import annotations

import argparse
import statistics
import warnings
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from lightning_oto import OTO

VOCAB, SEQ, POS_WORD, NEG_WORD = 200, 16, 5, 6


class BertClassifier(nn.Module):
    """BertModel + a linear head on the first token (what a user of ``transformers`` writes)."""

    def __init__(self) -> None:
        super().__init__()
        import transformers as hf

        cfg = hf.BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=128, max_position_embeddings=SEQ, attn_implementation="eager")
        self.bert = hf.BertModel(cfg, add_pooling_layer=False)
        self.head = nn.Linear(64, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.bert(ids).last_hidden_state[:, 0])


def planted_words(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random tokens (>= 10) with exactly one planted sentiment word; the label says which."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, VOCAB, (n, SEQ), generator=g)
    y = torch.randint(0, 2, (n,), generator=g)
    pos = torch.randint(1, SEQ, (n,), generator=g)  # position 0 is the [CLS]-like slot
    ids[torch.arange(n), pos] = torch.where(y == 1, POS_WORD, NEG_WORD)
    ids[:, 0] = 1
    return ids, y


def digits(seed: int) -> tuple[torch.Tensor, ...]:
    from lightning_oto.data.datamodules import DigitsDataModule

    dm = DigitsDataModule(seed=seed)
    dm.setup()
    return dm.train_set.images, dm.train_set.labels, dm.test_set.images, dm.test_set.labels


def build(args: argparse.Namespace) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    torch.manual_seed(args.seed)
    if args.model == "bert":
        xtr, ytr = planted_words(2000, args.seed)
        xva, yva = planted_words(500, args.seed + 1000)
        return BertClassifier(), (xtr, ytr, xva, yva)
    from lightning_oto.models.demonet import DemoNet

    data = digits(args.seed)
    return DemoNet(num_classes=10, in_channels=1, image_size=data[0].shape[-1], width_mult=0.25, hidden=32), data


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    was = model.training
    model.eval()
    acc = float((model(x).argmax(1) == y).float().mean())
    model.train(was)
    return acc


class CutTracker:
    """Norms of the redundant groups every step: at selection and just before they became zero."""

    def __init__(self, opt: Any) -> None:
        self.opt, self.selected, self.last = opt, {}, {}
        self.cut: dict[int, float] = {}

    def after_step(self) -> None:
        ids = self.opt.redundant_group_ids
        if not ids:
            return
        norms = self.opt.index.norms()
        pos = {g: i for i, g in enumerate(self.opt.prunable_group_ids)}
        for g in ids:
            n = float(norms[pos[g]])
            if g not in self.selected:  # selected on this step: the norm after it is the reference
                self.selected[g] = self.last[g] = n
            elif n == 0.0 and g not in self.cut:
                self.cut[g] = self.last[g] / max(self.selected[g], 1e-30)
            else:
                self.last[g] = n


def summary(ratios: list[float]) -> str:
    if not ratios:
        return "none cut"
    r = sorted(ratios)
    return (f"n={len(r)} median={statistics.median(r):.2e} p90={r[int(0.9 * (len(r) - 1))]:.2e} "
            f"max={r[-1]:.2e} above 0.1: {sum(x > 0.1 for x in r)}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=("bert", "demonet"), default="bert")
    ap.add_argument("--variant", default="adamw")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--steps", type=int, nargs=3, default=(150, 300, 150), help="warm-up projection hybrid")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, (xtr, ytr, xva, yva) = build(args)
    oto = OTO(model, xtr[:2], mode="prune")
    W, P, H = args.steps
    wd = 0.01 if args.variant == "adamw" else 0.0
    opt = oto.dhspg(lr=args.lr, variant=args.variant, weight_decay=wd, warmup_steps=W, projection_steps=P,
                    target_group_sparsity=0.5)
    tracker, gen, acc = CutTracker(opt), torch.Generator().manual_seed(args.seed), {}
    for step in range(W + P + H):
        idx = torch.randint(0, len(ytr), (args.batch,), generator=gen)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(xtr[idx]), ytr[idx]).backward()
        opt.step()
        tracker.after_step()
        if step + 1 in (W, W + P, W + P + H):
            acc[{W: "warm-up", W + P: "projection", W + P + H: "end"}[step + 1]] = accuracy(model, xva, yva)
    print(f"{args.model} {args.variant} lr {args.lr} steps {W}/{P}/{H}: {len(opt.redundant_group_ids)} redundant "
          f"of {opt.num_prunable}; zeroed by half-space {opt.zeroed_by_half_space}, "
          f"forced at deadline {opt.forced_at_deadline}")
    print(f"  cut norm / selection norm (tracked):   {summary(list(tracker.cut.values()))}")
    if hasattr(opt, "cut_norm_ratios"):
        print(f"  cut norm / selection norm (optimizer): {summary(list(opt.cut_norm_ratios().values()))}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sub = oto.construct_subnet()
    print("  val accuracy: " + ", ".join(f"{k} {v:.3f}" for k, v in acc.items())
          + f"; sub-network {accuracy(sub, xva, yva):.3f}")


if __name__ == "__main__":
    main()
