"""Budget benchmark: what the constructed sub-network keeps vs what the budget asked.

For each model (DemoNet and a ResNet-style CNN, both 1x28x28 / 3x32x32 images, batch 8), mode and
budget, a short search (warm-up 2, projection 3 steps on random data: the selection, not accuracy, is
measured) chooses the redundant set, the sub-network is constructed and measured:

* FLOPs / params: ``oto.compression_report(sub)`` (torch.utils.flop_counter, per forward at batch 8;
  the fractions do not depend on the batch size).
* latency: what the selection measured while choosing (it builds and times candidate sub-networks
  until one is within 5% of the budget, see ``HalfSpaceOptimizer._meet_measured_latency``) next to a
  re-measurement of the constructed sub-network (median of 31 interleaved eval forwards of sub and
  full on this machine's device at batch 8).

Writes a markdown table (``--out``, default ``docs/budgets_table.md``).  About 2 minutes on 2 CPU cores.
    python benchmarks/bench_budget.py [--device cpu] [--out docs/budgets_table.md]
"""
from __future__ import annotations

import argparse
import platform
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from lightning_oto import OTO  # noqa: E402
from lightning_oto.models.demonet import DemoNet  # noqa: E402
from lightning_oto.subnet.timing import dense_stand_in, interleaved_times  # noqa: E402


def _block(cin: int, cout: int, stride: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class ResBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.a, self.b = _block(c, c, 1), nn.Sequential(nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.b(self.a(x)))


class ResNetSmall(nn.Module):
    """ResNet-style: stem, three stages (32/64/128 channels, two residual blocks each), linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = _block(3, 32, 1)
        stages = []
        for cin, c, s in ((32, 32, 1), (32, 64, 2), (64, 128, 2)):
            stages += [_block(cin, c, s), ResBlock(c), ResBlock(c)]
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)).mean((2, 3)))


MODELS = {"DemoNet": (lambda: DemoNet(), (8, 1, 28, 28)), "ResNetSmall": (ResNetSmall, (8, 3, 32, 32))}
CASES = [("prune", {"flops": 0.3}), ("prune", {"flops": 0.5}), ("prune", {"flops": 0.7}),
         ("prune", {"params": 0.5}),
         ("prune", {"latency": 0.3}), ("prune", {"latency": 0.5}), ("prune", {"latency": 0.7}),
         ("erase", {"flops": 0.3}), ("erase", {"flops": 0.5}), ("erase", {"flops": 0.7}), ("erase", {"params": 0.5})]


def run_case(name: str, mode: str, budget: dict[str, float], device: str) -> dict[str, object]:
    torch.manual_seed(0)
    factory, shape = MODELS[name]
    model = factory().to(device)
    x = torch.randn(*shape, device=device)
    oto = OTO(model, x, mode=mode)
    make = oto.dhspg if mode == "prune" else oto.h2spg
    opt = make(lr=0.01, budget=budget, warmup_steps=2, projection_steps=3)
    for _ in range(6):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    sub = oto.construct_subnet()
    rep = oto.compression_report(sub)
    row = {"model": name, "mode": mode, "asked": budget, "flops": rep["flop_ratio"], "params": rep["param_ratio"],
           "modelled": opt.budget_reached}
    if "latency" in budget or mode == "prune":
        repeats = 5 if "latency" in budget else 1  # a latency budget's re-measurement is repeated to show its noise
        full = dense_stand_in(model)  # as the selection times it: zero groups alone make the full model faster
        fracs = sorted(t["sub"] / t["full"] for t in (interleaved_times({"full": full, "sub": sub}, oto.example_inputs,
                                                                         runs=31) for _ in range(repeats)))
        row["latency"], row["latency_range"] = fracs[len(fracs) // 2], (fracs[0], fracs[-1])
    return row


def noise_sentence(rows: list[dict[str, object]]) -> str:
    """How far the re-measurements of this run moved, computed from the rows (not a fixed claim)."""
    lat = [r for r in rows if "latency" in r["asked"]]
    if not lat:
        return ""
    spread = max(r["latency_range"][1] - r["latency_range"][0] for r in lat)
    gap = max(abs(r["latency"] - r["modelled"]["latency"]) for r in lat)
    return (f" Noise, in this run: the 5 re-measurements of one latency-budget sub-network spread over up to {spread:.3f} "
            f"(the range is shown), and their median differs from what the selection measured by up to {gap:.3f}.")


def table(rows: list[dict[str, object]], device: str) -> str:
    lines = [f"Budget asked vs kept by the constructed sub-network ({device}, {platform.processor() or 'cpu'}, "
             f"torch threads {torch.get_num_threads()}; "
             "FLOPs/params per forward at batch 8, fractions batch-independent; latency = median of 31 interleaved eval "
             "forwards of sub / full at batch 8 (the full model with its zero groups refilled, as the dense model it "
             "stands for: `dense_stand_in`), re-measured after construction, for a latency budget 5 times: median "
             "(min-max); `benchmarks/bench_budget.py`). The last "
             "column is what the selection counted for the budgeted key: FLOPs/params from the cost model, latency as "
             "the selection measured it on the sub-networks it built (within 5% of the asked fraction, or the best of "
             "6 tries). Erase mode removes whole operators: the selection searches their combinations, and a budget "
             "that no combination meets within 2 points lands on the closest one at or below it, with a warning."
             + noise_sentence(rows), "",
             "| model | mode | budget | FLOPs kept | params kept | latency kept (measured) | "
             "budgeted key as the selection counted it |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        asked = ", ".join(f"{k} {v:g}" for k, v in r["asked"].items())
        modelled = ", ".join(f"{k} {r['modelled'][k]:.3f}" for k in r["asked"])
        lat = f"{r['latency']:.3f}" if "latency" in r else "–"
        if "latency" in r["asked"]:
            lat += " ({:.3f}-{:.3f})".format(*r["latency_range"])
        lines.append(f"| {r['model']} | {r['mode']} | {asked} | {r['flops']:.3f} | {r['params']:.3f} | {lat} | "
                     f"{modelled} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="docs/budgets_table.md")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in MODELS:
            for mode, budget in CASES:
                rows.append(run_case(name, mode, budget, args.device))
                print(rows[-1], flush=True)
    text = table(rows, args.device)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
