"""Engine benchmarks (prune and erase search spaces), printed as ratios measured in one run.

1. Prune search-space build time on a ResNet-50-sized model and on plain conv stacks of depth N and
   10N: tracing (torch.export) and our analysis are timed separately; growth ratio vs graph size.
2. Erase: segment-graph construction and the hierarchical search (greedy acceptance in ascending
   saliency with the validity check, as H2SPG does) on DARTS-14 and on a 10x larger synthetic
   branchy graph; build should grow linearly, the search at most quadratically (appendix E).
3. H2SPG / DHSPG step time vs torch.optim.SGD(momentum) on the same parameters.
4. CPU inference latency of a prune-mode sub-network vs the full model next to the FLOPs ratio.

    python benchmarks/bench_engine.py [--quick]
"""
from __future__ import annotations

import argparse
import random
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from lightning_oto import OTO
from lightning_oto.graph.trace import build_graph, export_program
from lightning_oto.space.erase import build_erase_space
from lightning_oto.space.prune import build_prune_space


# ------------------------------------------------------------------ models
class Bottleneck(nn.Module):
    def __init__(self, cin: int, mid: int, stride: int) -> None:
        super().__init__()
        cout = mid * 4
        self.c1, self.b1 = nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid)
        self.c2, self.b2 = nn.Conv2d(mid, mid, 3, stride, 1, bias=False), nn.BatchNorm2d(mid)
        self.c3, self.b3 = nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.b1(self.c1(x)))
        y = F.relu(self.b2(self.c2(y)))
        y = self.b3(self.c3(y))
        return F.relu(y + (x if self.down is None else self.down(x)))


class ResNet50(nn.Module):
    """ResNet-50 layout (3-4-6-3 bottlenecks, 25.5M parameters), written by hand."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                                  nn.MaxPool2d(3, 2, 1))
        blocks, cin = [], 64
        for mid, n, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            for i in range(n):
                blocks.append(Bottleneck(cin, mid, stride if i == 0 else 1))
                cin = mid * 4
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1), 1))


def plain_stack(depth: int, width: int = 32) -> nn.Module:
    layers: list[nn.Module] = [nn.Conv2d(3, width, 3, padding=1)]
    for _ in range(depth):
        layers += [nn.BatchNorm2d(width), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1)]
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10)]
    return nn.Sequential(*layers)


class BranchyCell(nn.Module):
    """DARTS-like cell: 3 nodes, each summing two conv-bn ops per incoming state; output concat -> 1x1."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.ops = nn.ModuleList()
        for i in range(3):
            for _ in range(i + 1):
                self.ops.append(nn.ModuleList([nn.Sequential(nn.ReLU(), nn.Conv2d(c, c, k, padding=k // 2, bias=False),
                                                             nn.BatchNorm2d(c)) for k in (1, 3)]))
        self.out = nn.Sequential(nn.Conv2d(3 * c, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        states, k = [x], 0
        for i in range(3):
            acc = None
            for s in states:
                for op in self.ops[k]:
                    acc = op(s) if acc is None else acc + op(s)
                k += 1
            states.append(acc)
        return self.out(torch.cat(states[1:], 1)) + x


def branchy(cells: int, c: int = 8) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, c, 3, padding=1), *[BranchyCell(c) for _ in range(cells)],
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 10))


# ------------------------------------------------------------------ helpers
def best_of(fn, reps: int = 3) -> float:
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return min(ts)


def prune_build(model: nn.Module, x: torch.Tensor) -> tuple[float, float, int, int]:
    t = time.perf_counter()
    program = export_program(model, (x,))
    t_trace = time.perf_counter() - t
    graph_holder = {}

    def analyse() -> None:
        g = build_graph(program)
        graph_holder["g"] = g
        graph_holder["s"] = build_prune_space(g)

    t_space = best_of(analyse)
    g = graph_holder["g"]
    return t_trace, t_space, len(g) + g.num_edges, len(graph_holder["s"].groups)


def erase_build_and_search(model: nn.Module, x: torch.Tensor, target: float = 0.5) -> dict[str, float]:
    program = export_program(model, (x,))
    g = build_graph(program)
    holder = {}
    t_build = best_of(lambda: holder.__setitem__("s", build_erase_space(g)))
    space = holder["s"]
    sg = space.segment_graph
    cand = [gr for gr in space.groups if gr.prunable]
    k = round(target * len(cand))
    rng = random.Random(0)
    order = list(range(len(cand)))
    rng.shuffle(order)  # stands in for ascending saliency

    def search() -> None:
        accepted: set[int] = set()
        checks = 0
        for i in order:
            if len(accepted) >= k:
                break
            checks += 1
            if sg.removal_is_valid(accepted | {cand[i].vertex}):
                accepted.add(cand[i].vertex)
        holder["n"], holder["checks"] = len(accepted), checks

    search()  # warm caches once; then the median of 3 full searches
    times = []
    for _ in range(3):
        t = time.perf_counter()
        search()
        times.append(time.perf_counter() - t)
    t_search = statistics.median(times)
    return {"size": len(g) + g.num_edges, "segments": len(sg), "gezigs": len(cand), "build": t_build,
            "search": t_search, "accepted": holder["n"], "k": k, "per_check": t_search / max(1, holder["checks"])}


def step_time(opt: torch.optim.Optimizer, params: list[torch.Tensor], reps: int) -> float:
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    for _ in range(3):
        opt.step()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        opt.step()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def latency(model: nn.Module, x: torch.Tensor, reps: int) -> float:
    model.eval()
    with torch.no_grad():
        for _ in range(3):
            model(x)
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            model(x)
            ts.append(time.perf_counter() - t)
    return statistics.median(ts)


# ------------------------------------------------------------------ main
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="smaller sizes (CI smoke run)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    depth = 10 if args.quick else 30
    reps = 5 if args.quick else 20

    print("== 1. prune search space: build time vs graph size ==")
    rows = []
    for name, model, x in [
        ("ResNet-50", ResNet50(), torch.randn(1, 3, 64, 64)),
        (f"plain stack depth {depth}", plain_stack(depth), torch.randn(1, 3, 16, 16)),
        (f"plain stack depth {10 * depth}", plain_stack(10 * depth), torch.randn(1, 3, 16, 16)),
    ]:
        t_trace, t_space, size, n_groups = prune_build(model, x)
        rows.append((name, size, t_trace, t_space, n_groups))
        print(f"{name:26s} V+E={size:6d} groups={n_groups:6d} trace={t_trace:7.3f}s analysis={t_space:7.4f}s")
    (_, s1, tr1, sp1, _), (_, s2, tr2, sp2, _) = rows[1], rows[2]
    print(f"growth plain x10 depth: graph size x{s2 / s1:.2f}, analysis time x{sp2 / sp1:.2f}, "
          f"trace time x{tr2 / tr1:.2f} (linear = same ratio as graph size)")

    print("\n== 2. erase: segment graph build and hierarchical search ==")
    try:
        from lightning_oto.models import build_model

        darts = build_model("darts14", num_classes=10)
        dx = darts.example_input(1) if hasattr(darts, "example_input") else torch.randn(1, 3, 32, 32)
    except Exception as e:  # noqa: BLE001 - the zoo is optional for this benchmark
        print(f"(DARTS-14 unavailable: {e}); using the synthetic branchy graph only")
        darts, dx = None, None
    cells = 6 if args.quick else 14
    cases = [(f"synthetic {cells} cells", branchy(cells), torch.randn(1, 3, 8, 8)),
             (f"synthetic {10 * cells} cells", branchy(10 * cells), torch.randn(1, 3, 8, 8))]
    if darts is not None:
        cases.insert(0, ("DARTS-14", darts, dx))
    res = []
    for name, model, x in cases:
        r = erase_build_and_search(model, x)
        res.append(r)
        print(f"{name:24s} V+E={r['size']:6d} segments={r['segments']:5d} GeZIGs={r['gezigs']:4d} "
              f"build={r['build']:.4f}s search={r['search']:.4f}s ({r['per_check'] * 1e6:.0f} us per validity "
              f"check) accepted={r['accepted']}/{r['k']}")
    a, b = res[-2], res[-1]
    print(f"growth x10 cells: size x{b['size'] / a['size']:.2f}, build x{b['build'] / a['build']:.2f}, "
          f"search x{b['search'] / a['search']:.2f} (quadratic bound x{(b['size'] / a['size']) ** 2:.0f}), "
          f"one check x{b['per_check'] / a['per_check']:.2f} (linear bound x{b['size'] / a['size']:.1f})")

    print("\n== 3. optimizer step time vs SGD(momentum) ==")
    for mode, model, x in [("prune", ResNet50(num_classes=100), torch.randn(1, 3, 32, 32)),
                           ("erase", branchy(cells, c=64), torch.randn(1, 3, 8, 8))]:
        oto = OTO(model, x, mode=mode)
        params = [p for p in model.parameters()]
        sgd = torch.optim.SGD(params, lr=0.01, momentum=0.9)
        t_sgd = step_time(sgd, params, reps)
        make = oto.dhspg if mode == "prune" else oto.h2spg
        opt = make(lr=0.01, target_group_sparsity=0.5, warmup_steps=2, projection_steps=2)
        for p in params:
            p.grad = torch.randn_like(p) * 1e-3
        for _ in range(6):  # through warm-up and projection into the hybrid phase
            opt.step()
        opt2 = make(lr=0.01, target_group_sparsity=0.5, warmup_steps=reps + 10, projection_steps=2)
        t_warm = step_time(opt2, params, reps)
        t_hybrid = step_time(opt, params, reps)
        name = "DHSPG" if mode == "prune" else "H2SPG"
        print(f"{name} ({mode}, {sum(p.numel() for p in params) / 1e6:.1f}M params, {len(oto.groups)} groups): "
              f"SGD {t_sgd * 1e3:.2f} ms | warm-up {t_warm * 1e3:.2f} ms (x{t_warm / t_sgd:.2f}) | "
              f"hybrid {t_hybrid * 1e3:.2f} ms (x{t_hybrid / t_sgd:.2f}) phase={getattr(opt, 'phase', '?')}")

    print("\n== 4. CPU inference latency: sub-network vs full (prune, 50% random zero groups) ==")
    for bs in (1, 8):
        model = ResNet50(num_classes=10)
        x = torch.randn(bs, 3, 64, 64)
        oto = OTO(model, x)
        oto.random_set_zero_groups(0.5, seed=0)
        sub = oto.construct_subnet()
        rep = oto.compression_report(sub)
        lf, ls = latency(model, x, reps), latency(sub, x, reps)
        print(f"batch {bs}: full {lf * 1e3:.1f} ms, sub {ls * 1e3:.1f} ms, latency ratio {ls / lf:.2f}, "
              f"FLOPs ratio {rep['flop_ratio']:.2f}, params ratio {rep['param_ratio']:.2f}")


if __name__ == "__main__":
    main()
