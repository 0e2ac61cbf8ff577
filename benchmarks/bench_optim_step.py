"""Time ``optimizer.step()`` of DHSPG (warm-up / projection / hybrid) vs ``torch.optim.SGD``.

Model: a ResNet-ish stack of 20 conv3x3(no bias)+BatchNorm layers (~5.8M parameters) with one
channel group per output channel (conv row along dim 0 + BN weight/bias entry), 3520 groups.
Gradients are fixed random tensors: only the optimizer step is timed.

    python benchmarks/bench_optim_step.py [--reps 60] [--threads N]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn as nn

from lightning_oto.optim import DHSPG
from lightning_oto.space.groups import Group, ParamSlice

WIDTHS = (64, 128, 192, 320)
PER_STAGE = 5


def build() -> tuple[nn.Module, list[Group]]:
    layers: list[nn.Module] = []
    groups: list[Group] = []
    cin = 3
    for w in WIDTHS:
        for _ in range(PER_STAGE):
            layers += [nn.Conv2d(cin, w, 3, padding=1, bias=False), nn.BatchNorm2d(w)]
            cin = w
    model = nn.Sequential(*layers)
    gid = 0
    for i in range(0, len(layers), 2):
        conv, bn = f"{i}.weight", f"{i + 1}"
        for c in range(layers[i].out_channels):
            groups.append(Group(gid, f"conv{i}[{c}]", [
                ParamSlice(conv, 0, (c,)), ParamSlice(f"{bn}.weight", 0, (c,)), ParamSlice(f"{bn}.bias", 0, (c,)),
            ]))
            gid += 1
    return model, groups


def set_grads(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g) * 1e-2


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=60)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, groups = build()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"params {n_params / 1e6:.2f}M, groups {len(groups)}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, reps {args.reps} (round-robin so load "
          "fluctuations hit every optimizer alike)")
    state = {k: v.clone() for k, v in model.state_dict().items()}

    def fresh() -> nn.Module:
        m, _ = build()
        m.load_state_dict(state)
        set_grads(m)
        return m

    big = 10**9
    # Random (fixed) saliency spreads the redundant channels over all layers, like a trained net.
    scores = torch.rand(len(groups), generator=torch.Generator().manual_seed(1))
    kw = dict(lr=1e-3, momentum=0.9, target_group_sparsity=0.5, saliency=lambda st: scores)
    opts: dict[str, torch.optim.Optimizer] = {
        "SGD(momentum=0.9)": torch.optim.SGD(fresh().parameters(), lr=1e-3, momentum=0.9),
        "SGD(momentum=0.9, foreach)": torch.optim.SGD(fresh().parameters(), lr=1e-3, momentum=0.9, foreach=True),
        "DHSPG warmup": DHSPG(fresh().named_parameters(), groups, warmup_steps=big, projection_steps=big, **kw),
        "DHSPG projection": DHSPG(fresh().named_parameters(), groups, warmup_steps=1, projection_steps=big, **kw),
        "DHSPG hybrid": DHSPG(fresh().named_parameters(), groups, warmup_steps=1, projection_steps=1, **kw),
    }
    for _ in range(3):  # warm-up; moves the DHSPG instances into their phases
        for o in opts.values():
            o.step()
    assert opts["DHSPG warmup"].phase == "warmup"
    assert opts["DHSPG projection"].phase == "projection"
    assert opts["DHSPG hybrid"].phase == "hybrid"
    assert len(opts["DHSPG hybrid"].zero_group_ids()) == len(groups) // 2
    times: dict[str, list[float]] = {k: [] for k in opts}
    for _ in range(args.reps):
        for k, o in opts.items():
            t = time.perf_counter()
            o.step()
            times[k].append(time.perf_counter() - t)
    for label, agg in (("median", statistics.median), ("min (least disturbed)", min)):
        results = {k: agg(v) * 1e3 for k, v in times.items()}
        base = results["SGD(momentum=0.9)"]
        base_fe = results["SGD(momentum=0.9, foreach)"]
        print(f"-- {label}")
        for k, v in results.items():
            print(f"{k:30s} {v:8.2f} ms   x{v / base:5.2f} vs SGD   x{v / base_fe:5.2f} vs SGD(foreach)")


if __name__ == "__main__":
    main()
