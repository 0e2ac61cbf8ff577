"""Latency-constrained evolutionary search (OFA/CompOFA style) and Pareto fronts.

The search operates on genomes of a :class:`~lightning_oto.compofa.space.DesignSpace` (for CompOFA:
one compound index per stage), so mutation and crossover keep the depth-width coupling by
construction.  Candidates are accepted only if ``latency(cfg) <= target``; latency comes from any
``config -> ms`` callable, normally a memoizing :class:`~lightning_oto.compofa.latency.LatencyTable`
(measured once per architecture + resolution), and accuracy from any ``config -> float`` callable,
normally the BN-recalibrated validation accuracy.
"""
from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

from .space import DesignSpace, SubnetConfig


@dataclass
class EvolutionConfig:
    """Evolution hyper-parameters (OFA: P=100, N=500; CompOFA fixed kernel converges by N=50).

    Defaults are scaled down for a 243-network space on a small CPU.
    """

    population_size: int = 20
    num_iterations: int = 10
    parent_ratio: float = 0.25
    mutation_ratio: float = 0.5
    mutate_prob: float = 0.1
    max_tries: int = 500
    seed: int = 0


@dataclass
class SearchResult:
    """Best feasible architecture for one latency target, plus the search trace."""

    target_ms: float
    feasible: bool
    config: SubnetConfig | None = None
    accuracy: float = float("nan")
    latency_ms: float = float("nan")
    history: list[float] = field(default_factory=list)  # best accuracy after each iteration
    candidates_checked: int = 0
    search_time_s: float = 0.0

    def row(self) -> dict[str, Any]:
        return {
            "target_ms": round(self.target_ms, 4),
            "feasible": self.feasible,
            "arch": self.config.short() if self.config else "",
            "key": self.config.key() if self.config else "",
            "latency_ms": round(self.latency_ms, 4),
            "accuracy": round(self.accuracy, 4),
            "candidates_checked": self.candidates_checked,
            "search_time_s": round(self.search_time_s, 3),
        }


def mutate(space: DesignSpace, genes: Sequence[int], prob: float, rng: random.Random) -> list[int]:
    """Resample each gene with probability ``prob`` (within its own range)."""
    sizes = space.gene_sizes()
    return [rng.randrange(s) if rng.random() < prob else int(g) for g, s in zip(genes, sizes)]


def crossover(a: Sequence[int], b: Sequence[int], rng: random.Random) -> list[int]:
    """Uniform crossover: each gene from either parent."""
    return [int(x) if rng.random() < 0.5 else int(y) for x, y in zip(a, b)]


class InfeasibleTarget(RuntimeError):
    pass


Member = tuple[float, list[int], SubnetConfig, float]  # (accuracy, genes, config, latency)


def _children(space: DesignSpace, parents: Sequence[list[int]], n_mut: int, ecfg: EvolutionConfig,
              rng: random.Random, draw: Callable[[Callable[[], list[int]]], tuple[list[int], SubnetConfig, float]],
              accuracy_fn: Callable[[SubnetConfig], float]) -> list[Member]:
    """One generation's offspring: ``n_mut`` mutated parents, then crossovers up to the population size."""
    children: list[Member] = []
    for _ in range(n_mut):
        par = rng.choice(parents)
        g, cfg, lat = draw(lambda: mutate(space, par, ecfg.mutate_prob, rng))
        children.append((accuracy_fn(cfg), g, cfg, lat))
    for _ in range(ecfg.population_size - len(parents) - n_mut):
        pa, pb = rng.choice(parents), rng.choice(parents)
        g, cfg, lat = draw(lambda: crossover(pa, pb, rng))
        children.append((accuracy_fn(cfg), g, cfg, lat))
    return children


def evolutionary_search(
    space: DesignSpace,
    accuracy_fn: Callable[[SubnetConfig], float],
    latency_fn: Callable[[SubnetConfig], float],
    target_ms: float,
    ecfg: EvolutionConfig | None = None,
) -> SearchResult:
    """Maximize ``accuracy_fn`` subject to ``latency_fn(cfg) <= target_ms`` (regularized-free GA).

    Population initialized with random feasible members; each iteration keeps the top
    ``parent_ratio`` as parents, adds ``mutation_ratio`` mutated parents and fills up with
    crossovers, every child re-drawn until feasible (``max_tries``).  If even the smallest network
    misses the target the result is ``feasible=False``.
    """
    ecfg = ecfg or EvolutionConfig()
    rng = random.Random(ecfg.seed)
    t0 = time.perf_counter()
    checked = 0

    def feasible(genes: Sequence[int]) -> tuple[bool, SubnetConfig, float]:
        nonlocal checked
        checked += 1
        cfg = space.decode(genes)
        lat = latency_fn(cfg)
        return lat <= target_ms, cfg, lat

    smallest = space.encode(space.min_config())
    ok, cfg_min, lat_min = feasible(smallest)
    if not ok:
        return SearchResult(target_ms, False, None, float("nan"), lat_min, [], checked, time.perf_counter() - t0)

    def draw(make: Callable[[], list[int]]) -> tuple[list[int], SubnetConfig, float]:
        for _ in range(ecfg.max_tries):
            g = make()
            good, cfg, lat = feasible(g)
            if good:
                return g, cfg, lat
        return smallest, cfg_min, lat_min  # always feasible (checked above)

    pop: list[tuple[float, list[int], SubnetConfig, float]] = []
    for _ in range(ecfg.population_size):
        g, cfg, lat = draw(lambda: space.random_genes(rng))
        pop.append((accuracy_fn(cfg), g, cfg, lat))
    n_parents = max(1, int(round(ecfg.parent_ratio * ecfg.population_size)))
    n_mut = int(round(ecfg.mutation_ratio * ecfg.population_size))
    history: list[float] = []
    best = max(pop, key=lambda t: t[0])
    for _ in range(ecfg.num_iterations):
        pop.sort(key=lambda t: -t[0])
        parents = pop[:n_parents]
        if parents[0][0] > best[0]:
            best = parents[0]
        history.append(best[0])
        pop = parents + _children(space, [p[1] for p in parents], n_mut, ecfg, rng, draw, accuracy_fn)
    top = max(pop, key=lambda t: t[0])
    if top[0] > best[0]:
        best = top
    history.append(best[0])
    return SearchResult(target_ms, True, best[2], best[0], best[3], history, checked, time.perf_counter() - t0)


def exhaustive_evaluation(
    space: DesignSpace,
    accuracy_fn: Callable[[SubnetConfig], float],
    latency_fn: Callable[[SubnetConfig], float],
) -> list[dict[str, Any]]:
    """Accuracy and latency of every member (affordable for CompOFA's 243 networks)."""
    rows = []
    for cfg in space.enumerate():
        rows.append({"config": cfg, "accuracy": accuracy_fn(cfg), "latency_ms": latency_fn(cfg)})
    return rows


def best_under(rows: Sequence[dict[str, Any]], target_ms: float) -> dict[str, Any] | None:
    """Most accurate row with ``latency_ms <= target_ms`` (ties: lower latency)."""
    ok = [r for r in rows if r["latency_ms"] <= target_ms]
    return max(ok, key=lambda r: (r["accuracy"], -r["latency_ms"])) if ok else None


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of non-dominated ``(latency, accuracy)`` points (lower latency, higher accuracy)."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best_acc = [], float("-inf")
    for i in order:
        if points[i][1] > best_acc:
            front.append(i)
            best_acc = points[i][1]
    return front


def default_targets(lat_min: float, lat_max: float, n: int) -> list[float]:
    """``n`` targets spread between the smallest and largest network's latency (inclusive of max)."""
    if n <= 1:
        return [lat_max]
    return [lat_min + (lat_max - lat_min) * (i + 1) / n for i in range(n)]


def search_pareto(
    space: DesignSpace,
    accuracy_fn: Callable[[SubnetConfig], float],
    latency_fn: Callable[[SubnetConfig], float],
    targets: Sequence[float],
    ecfg: EvolutionConfig | None = None,
) -> list[SearchResult]:
    """One evolutionary search per latency target (memos shared across targets)."""
    ecfg = ecfg or EvolutionConfig()
    out = []
    for i, t in enumerate(targets):
        c = EvolutionConfig(**{**asdict(ecfg), "seed": ecfg.seed + i})
        out.append(evolutionary_search(space, accuracy_fn, latency_fn, float(t), c))
    return out
