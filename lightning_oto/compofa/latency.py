"""Measured latency with a memo table.

CompOFA's space is small enough (243 architectures per resolution) to *measure* every candidate
on the target machine instead of training a latency predictor; memoizing measurements by the full
architecture key (which includes the input resolution) means an evolutionary search measures each
architecture at most once.  The table persists to JSON so later searches on the same machine
start warm.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from typing import Any, Callable

import torch
from torch import nn

from .space import SubnetConfig


def measure_latency_ms(
    module: nn.Module,
    input_shape: tuple[int, ...],
    num_threads: int = 1,
    warmup: int = 5,
    runs: int = 20,
) -> float:
    """Median wall time (ms) of ``module`` on one zero input of ``input_shape`` (batch 1 usually).

    Threads are pinned with ``torch.set_num_threads`` during the measurement (and restored), runs
    are preceded by ``warmup`` untimed calls, and the median of ``runs`` timed calls is returned
    (median: robust to the occasional scheduler hiccup).
    """
    prev_threads = torch.get_num_threads()
    was_training = module.training
    module.eval()
    x = torch.zeros(input_shape)
    try:
        torch.set_num_threads(int(num_threads))
        with torch.inference_mode():
            for _ in range(max(0, warmup)):
                module(x)
            times = []
            for _ in range(max(1, runs)):
                t0 = time.perf_counter()
                module(x)
                times.append((time.perf_counter() - t0) * 1e3)
    finally:
        torch.set_num_threads(prev_threads)
        module.train(was_training)
    return float(statistics.median(times))


def supernet_latency_fn(
    supernet: nn.Module,
    in_channels: int | None = None,
    batch_size: int = 1,
    num_threads: int = 1,
    warmup: int = 5,
    runs: int = 20,
) -> Callable[[SubnetConfig], float]:
    """``config -> ms``: extract the static sub-network (what gets deployed) and time it."""
    from .extract import extract_subnet

    ch = in_channels if in_channels is not None else supernet.cfg.in_channels  # type: ignore[attr-defined]

    def measure(cfg: SubnetConfig) -> float:
        sub = extract_subnet(supernet, cfg)  # type: ignore[arg-type]
        return measure_latency_ms(sub, (batch_size, ch, cfg.resolution, cfg.resolution), num_threads, warmup, runs)

    return measure


class LatencyTable:
    """Memo of ``config.key() -> latency (ms)`` in front of a measuring function.

    ``enabled=False`` turns the memo off (every lookup measures) for the with/without comparison.
    Counters: ``hits`` (answered from the table), ``misses`` (had to measure), ``measurements``
    (total calls to the measuring function).  ``meta`` records how values were measured so a table
    from another machine/thread count is not reused silently.
    """

    def __init__(
        self,
        measure: Callable[[SubnetConfig], float] | None = None,
        enabled: bool = True,
        meta: dict[str, Any] | None = None,
    ) -> None:
        self.measure = measure
        self.enabled = enabled
        self.table: dict[str, float] = {}
        self.hits = 0
        self.misses = 0
        self.measurements = 0
        self.measure_time_s = 0.0
        self.meta = {"machine": platform.machine(), "processor": platform.processor(), **(meta or {})}

    def __call__(self, cfg: SubnetConfig) -> float:
        return self.get(cfg)

    def get(self, cfg: SubnetConfig) -> float:
        """Latency of ``cfg`` in ms, measured only if not memoized (or memo disabled)."""
        key = cfg.key()
        if self.enabled and key in self.table:
            self.hits += 1
            return self.table[key]
        if self.measure is None:
            raise KeyError(f"{key} not in latency table and no measuring function given")
        self.misses += 1
        t0 = time.perf_counter()
        value = float(self.measure(cfg))
        self.measure_time_s += time.perf_counter() - t0
        self.measurements += 1
        # with the memo disabled the value is still recorded (for reporting) but never reused
        self.table[key] = value
        return value

    def __contains__(self, cfg: SubnetConfig) -> bool:
        return cfg.key() in self.table

    def __len__(self) -> int:
        return len(self.table)

    def distinct_per_resolution(self) -> dict[int, int]:
        """Distinct architectures held, per resolution (<= 243 each for CompOFA)."""
        out: dict[int, int] = {}
        for k in self.table:
            r = int(k.split("|", 1)[0][1:])
            out[r] = out.get(r, 0) + 1
        return out

    def stats(self) -> dict[str, Any]:
        return {
            "enabled": self.enabled,
            "hits": self.hits,
            "misses": self.misses,
            "measurements": self.measurements,
            "distinct": len(self.table),
            "distinct_per_resolution": self.distinct_per_resolution(),
            "measure_time_s": round(self.measure_time_s, 4),
        }

    def reset_counters(self) -> None:
        self.hits = self.misses = self.measurements = 0
        self.measure_time_s = 0.0

    def save(self, path: str) -> None:
        """Write the table and its measurement metadata as JSON."""
        d = os.path.dirname(path)
        if d:
            os.makedirs(d, exist_ok=True)
        with open(path, "w") as f:
            json.dump({"meta": self.meta, "latency_ms": self.table}, f, indent=1, sort_keys=True)

    @classmethod
    def load(
        cls, path: str, measure: Callable[[SubnetConfig], float] | None = None, **kw: Any
    ) -> "LatencyTable":
        """Read a table written by :meth:`save` (missing keys are measured with ``measure``)."""
        with open(path) as f:
            d = json.load(f)
        t = cls(measure, meta=d.get("meta"), **kw)
        t.table = {str(k): float(v) for k, v in d["latency_ms"].items()}
        return t
