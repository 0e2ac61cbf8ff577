"""Cost of ``optimizer.step()`` of DHSPG / H2SPG per phase, relative to ``torch.optim.SGD`` (momentum).

Model: a ResNet-ish stack of 20 conv3x3 (no bias) + BatchNorm layers (6.6M parameters) with one
channel group per output channel (conv row along dim 0 + BN weight/bias entry), 3520 groups;
target sparsity 0.5 with a fixed random saliency, so redundant channels sit in every layer (the
worst case: every parameter holds redundant rows).  Gradients are fixed random tensors: only the
optimizer step is timed.

Timing is interleaved: every round runs a block of ``--block`` consecutive steps of each optimizer
in turn (SGD first), so load fluctuations hit all alike; the block is a multiple of the projection
and saliency intervals, so the steps that evaluate lambda / score saliency are counted at their true
rate.  Printed: milliseconds per step (mean over blocks; median and min over rounds) and the ratio to
SGD(momentum) measured in the same rounds.

    python benchmarks/bench_optim_step.py [--rounds 20] [--threads 1] [--device cuda] [--adam]
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
import torch.nn as nn

from lightning_oto.optim import DHSPG, H2SPG
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
        p.grad = (torch.randn(p.shape, generator=g) * 1e-2).to(p.device)


def make_optimizers(device: str, variant: str) -> dict[str, torch.optim.Optimizer]:
    """The baseline and one optimizer per phase (long phases keep each in its phase while timed)."""
    torch.manual_seed(0)
    model, groups = build()
    state = {k: v.clone() for k, v in model.state_dict().items()}

    def fresh() -> nn.Module:
        m, _ = build()
        m.load_state_dict(state)
        m.to(device)
        set_grads(m)
        return m

    big = 10**9
    # Random (fixed) saliency spreads the redundant channels over all layers, like a trained net.
    scores = torch.rand(len(groups), generator=torch.Generator().manual_seed(1)).to(device)
    if variant == "sgd":
        base_name = "SGD(momentum=0.9)"
        base: Callable[..., torch.optim.Optimizer] = lambda ps: torch.optim.SGD(ps, lr=1e-3, momentum=0.9)
        kw = dict(lr=1e-3, momentum=0.9)
    else:
        base_name = "Adam"
        base = lambda ps: torch.optim.Adam(ps, lr=1e-3)
        kw = dict(lr=1e-3, variant="adam")
    kw.update(target_group_sparsity=0.5, saliency=lambda st: scores)
    h2 = dict(hierarchy_check=lambda accepted, cand: True)
    opts: dict[str, torch.optim.Optimizer] = {
        base_name: base(fresh().parameters()),
        "DHSPG warmup": DHSPG(fresh().named_parameters(), groups, warmup_steps=big, projection_steps=big, **kw),
        "DHSPG projection": DHSPG(fresh().named_parameters(), groups, warmup_steps=1, projection_steps=big, **kw),
        "DHSPG projection, interval 8": DHSPG(fresh().named_parameters(), groups, warmup_steps=1,
                                              projection_steps=big, projection_interval=8, **kw),
        "DHSPG projection, interval 4": DHSPG(fresh().named_parameters(), groups, warmup_steps=1,
                                              projection_steps=big, projection_interval=4, **kw),
        "DHSPG projection, interval 2": DHSPG(fresh().named_parameters(), groups, warmup_steps=1,
                                              projection_steps=big, projection_interval=2, **kw),
        "DHSPG projection, interval 1": DHSPG(fresh().named_parameters(), groups, warmup_steps=1,
                                              projection_steps=big, projection_interval=1, **kw),
        "DHSPG hybrid": DHSPG(fresh().named_parameters(), groups, warmup_steps=1, projection_steps=1, **kw),
        "H2SPG projection": H2SPG(fresh().named_parameters(), groups, warmup_steps=1, projection_steps=big, **h2, **kw),
    }
    for o in opts.values():  # moves the half-space optimizers into their phases
        for _ in range(3):
            o.step()
    for name, o in opts.items():
        if isinstance(o, DHSPG | H2SPG):
            want = name.split(",")[0].split()[-1]
            assert o.phase == want, (name, o.phase)
    hybrid = opts["DHSPG hybrid"]
    assert len(hybrid.zero_group_ids()) == len(groups) // 2 == hybrid.forced_at_deadline + hybrid.zeroed_by_half_space
    return opts


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--block", type=int, default=80, help="steps per optimizer per round (multiple of 16 and 10)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave default)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--adam", action="store_true", help="Adam variant against torch.optim.Adam")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    opts = make_optimizers(args.device, "adam" if args.adam else "sgd")
    n_params = sum(p.numel() for p in next(iter(opts.values())).param_groups[0]["params"])
    print(f"params {n_params / 1e6:.2f}M, groups 3520, torch {torch.__version__}, device {args.device}, "
          f"threads {torch.get_num_threads()}, {args.rounds} rounds x {args.block} steps, interleaved")
    per_round: dict[str, list[float]] = {k: [] for k in opts}
    for _ in range(args.rounds):
        for k, o in opts.items():
            sync(args.device)
            t = time.perf_counter()
            for _ in range(args.block):
                o.step()
            sync(args.device)
            per_round[k].append((time.perf_counter() - t) / args.block)
    base_name = next(iter(opts))
    ratios = {k: [a / b for a, b in zip(v, per_round[base_name])] for k, v in per_round.items()}
    print(f"| optimizer | ms/step (median) | ms/step (min) | x {base_name} (median of per-round ratios) |")
    print("|---|---|---|---|")
    for k, v in per_round.items():
        print(f"| {k} | {statistics.median(v) * 1e3:.2f} | {min(v) * 1e3:.2f} | {statistics.median(ratios[k]):.2f} |")


if __name__ == "__main__":
    main()
