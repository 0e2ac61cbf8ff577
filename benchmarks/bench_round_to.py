"""CPU speed-up of a pruned sub-network with and without ``round_to=8``, next to its FLOP ratio.

A random half of the prunable channel groups of a ResNet-50-layout network is zeroed (the same
fraction with ``round_to=1`` and ``round_to=8``); both sub-networks and the full model are timed
interleaved in one run (median of rounds), so machine load hits all three alike; the full model with its
zeroed groups refilled (``dense_stand_in``), as the dense model it stands for.

    python benchmarks/bench_round_to.py [--quick]
"""
from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

from bench_engine import ResNet50
from lightning_oto import OTO
from lightning_oto.subnet.report import count_flops
from lightning_oto.subnet.timing import dense_stand_in


def pruned(round_to: int, x: torch.Tensor, seed: int) -> tuple[torch.nn.Module, torch.nn.Module, dict[str, int]]:
    torch.manual_seed(0)
    model = ResNet50().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        oto = OTO(model, x, mode="prune", round_to=round_to)
    oto.random_set_zero_groups(0.5, seed=seed)
    sub = oto.construct_subnet().eval()
    widths = [m.out_channels for m in sub.modules() if isinstance(m, torch.nn.Conv2d)]
    info = {"odd_widths": sum(w % 8 != 0 for w in widths), "convs": len(widths)}
    return model, sub, info


@torch.no_grad()
def interleaved(models: dict[str, torch.nn.Module], x: torch.Tensor, rounds: int, reps: int) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in models}
    for m in models.values():
        m(x)  # warm-up
    for _ in range(rounds):
        for name, m in models.items():
            t0 = time.perf_counter()
            for _ in range(reps):
                m(x)
            times[name].append((time.perf_counter() - t0) / reps)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()
    size = 96 if args.quick else 160
    x = torch.randn(args.batch, 3, size, size)
    full, sub1, info1 = pruned(1, x[:2], seed=0)
    _, sub8, info8 = pruned(8, x[:2], seed=0)
    lat = interleaved({"full": dense_stand_in(full), "round_to=1": sub1, "round_to=8": sub8}, x,
                      rounds=3 if args.quick else 7, reps=1 if args.quick else 3)
    f_full = count_flops(full, (x,))
    print(f"ResNet-50 layout, batch {args.batch}, {size}x{size}, {torch.get_num_threads()} threads; 50% of groups zeroed")
    print(f"{'sub-network':<12} {'FLOPs ratio':>12} {'latency ratio':>14} {'speed-up':>9} {'convs not /8':>13}")
    for name, sub, info in (("round_to=1", sub1, info1), ("round_to=8", sub8, info8)):
        fr = count_flops(sub, (x,)) / f_full
        lr = lat[name] / lat["full"]
        print(f"{name:<12} {fr:>12.3f} {lr:>14.3f} {1 / lr:>8.2f}x {info['odd_widths']:>6}/{info['convs']}")
    print(f"full model: {lat['full'] * 1e3:.1f} ms per batch")


if __name__ == "__main__":
    main()
