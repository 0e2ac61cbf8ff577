"""Does time follow FLOPs?  Measured CPU speed-up of pruned sub-networks next to their FLOP reduction.

A random half (``--fraction``) of the prunable groups of a ResNet-50-layout net and of a MobileNetV2-layout net
(both handwritten, random weights) is zeroed with ``round_to`` in {1, 8, 16, 32}; each sub-network is
timed against the full model (as the dense model it stands for: :func:`~lightning_oto.subnet.timing.dense_stand_in`
refills the zeroed groups, as the compression report does) with the report's own measurement
(:func:`lightning_oto.subnet.timing.measure_speedup`: median of interleaved runs after warm-up,
``torch.inference_mode``) at batch 1 and 8.  Printed: FLOP reduction (full / sub), measured speed-up,
and the speed-up as a fraction of the FLOP reduction (1.0 = time follows FLOPs).

    python benchmarks/bench_speedup.py [--size 112] [--threads 1] [--runs 5] [--round-to 1 8 16 32]
"""
from __future__ import annotations

import argparse
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from bench_engine import ResNet50
from lightning_oto import OTO
from lightning_oto.subnet.report import count_flops
from lightning_oto.subnet.timing import dense_stand_in, measure_speedup, speed_vs_flops


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = cin * expand
        self.use_res = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU6()]
        layers += [nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False), nn.BatchNorm2d(mid), nn.ReLU6(),
                   nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 layout (width 1.0, the paper's 17 inverted residuals), written by hand."""

    SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                (6, 320, 1, 1))

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU6()]
        cin = 32
        for t, c, n, s in self.SETTINGS:
            for i in range(n):
                layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        layers += [nn.Conv2d(cin, 1280, 1, bias=False), nn.BatchNorm2d(1280), nn.ReLU6()]
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(1280, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


def sub_network(make: type, round_to: int, x: torch.Tensor, seed: int,
                fraction: float) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    model = make().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        oto = OTO(model, x[:2], mode="prune", round_to=round_to)
        oto.random_set_zero_groups(fraction, seed=seed)
        sub = oto.construct_subnet().eval()
    return model, sub


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=112)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--round-to", type=int, nargs="*", default=[1, 8, 16, 32])
    ap.add_argument("--models", nargs="*", default=["resnet", "mobilenetv2"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fraction", type=float, default=0.5, help="fraction of the prunable groups zeroed")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    x = torch.randn(8, 3, args.size, args.size)
    print(f"CPU, {torch.get_num_threads()} thread(s), {args.size}x{args.size} images, {args.fraction:.0%} random groups (seed "
          f"{args.seed}), median of {args.runs} interleaved runs")
    print("| model | round_to | FLOP reduction | speed-up b1 | of FLOPs b1 | speed-up b8 | of FLOPs b8 |")
    print("|---|---|---|---|---|---|---|")
    makes = {"resnet": ResNet50, "mobilenetv2": MobileNetV2}
    for name in args.models:
        for r in args.round_to:
            full, sub = sub_network(makes[name], r, x, args.seed, args.fraction)
            speed = measure_speedup(dense_stand_in(full), sub, (x,), batch_sizes=(1, 8), runs=args.runs)
            speed = speed_vs_flops(speed, count_flops(full, (x[:1],)), count_flops(sub, (x[:1],)))
            b1, b8 = speed["batches"]["1"], speed["batches"]["8"]
            print(f"| {name} | {r} | {speed['flop_reduction']:.2f}x | {b1['speedup']:.2f}x | "
                  f"{b1['of_flop_reduction']:.2f} | {b8['speedup']:.2f}x | {b8['of_flop_reduction']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
