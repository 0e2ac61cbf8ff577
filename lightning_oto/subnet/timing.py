"""Measured speed of a sub-network against the full model (the one home for forward timing).

FLOPs removed are not time saved: small or odd widths run slower per FLOP.  The report therefore
times both networks on the device they sit on, at batch 1 and at the training batch size: after
``warmup`` untimed forwards, ``runs`` rounds time one forward of each network in turn
(interleaved, so a busy machine slows both alike) and the median per network is kept.
"""
from __future__ import annotations

import statistics
import time
from typing import Any, Sequence

import torch
from torch import nn


def batch_of(inputs: Sequence[Any], batch: int) -> tuple[Any, ...]:
    """The example inputs at another batch size: rows repeated (or cut) along dim 0 of every tensor."""
    if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
        raise ValueError(f"batch sizes must be integers >= 1, got {batch!r}")
    out = []
    for t in inputs:
        if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] > 0:
            t = t[torch.arange(batch, device=t.device) % t.shape[0]]
        out.append(t)
    return tuple(out)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device_of(model: nn.Module, inputs: Sequence[Any]) -> torch.device:
    p = next(iter(model.parameters()), None)
    if p is not None:
        return p.device
    return next((t.device for t in inputs if isinstance(t, torch.Tensor)), torch.device("cpu"))


@torch.inference_mode()
def interleaved_times(models: dict[str, nn.Module], inputs: Sequence[Any], runs: int = 7,
                      warmup: int = 2) -> dict[str, float]:
    """Median seconds of one forward per model (eval mode; each model's mode is restored)."""
    if runs < 1 or warmup < 0:
        raise ValueError(f"runs must be >= 1 and warmup >= 0, got runs={runs}, warmup={warmup}")
    modes = {k: m.training for k, m in models.items()}
    device = _device_of(next(iter(models.values())), inputs)
    times: dict[str, list[float]] = {k: [] for k in models}
    try:
        for m in models.values():
            m.eval()
            for _ in range(warmup):
                m(*inputs)
        for _ in range(runs):
            for name, m in models.items():
                _sync(device)
                t0 = time.perf_counter()
                m(*inputs)
                _sync(device)
                times[name].append(time.perf_counter() - t0)
    finally:
        for k, m in models.items():
            m.train(modes[k])
    return {k: statistics.median(v) for k, v in times.items()}


def measure_speedup(full: nn.Module, sub: nn.Module, inputs: Sequence[Any], batch_sizes: Sequence[int] = (1,),
                    runs: int = 7, warmup: int = 2) -> dict[str, Any]:
    """``{"device", "runs", "batches": {str(b): {"full_ms", "sub_ms", "speedup"}}}`` (speed-up = full / sub)."""
    inputs = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    out: dict[str, Any] = {"device": str(_device_of(full, inputs)), "runs": runs, "warmup": warmup, "batches": {}}
    for b in dict.fromkeys(batch_sizes):  # unique, in order
        t = interleaved_times({"full": full, "sub": sub}, batch_of(inputs, b), runs=runs, warmup=warmup)
        out["batches"][str(b)] = {"full_ms": 1e3 * t["full"], "sub_ms": 1e3 * t["sub"],
                                  "speedup": t["full"] / max(t["sub"], 1e-12)}
    return out


def speed_vs_flops(speed: dict[str, Any], flops_full: int | None, flops_sub: int | None) -> dict[str, Any]:
    """Adds the FLOP reduction (``flops_full / flops_sub``) and, per batch, how much of it the measured
    speed-up reaches (``speedup / flop_reduction``; 1 = time follows FLOPs)."""
    if not flops_full or not flops_sub:
        return speed
    reduction = flops_full / flops_sub
    speed["flop_reduction"] = reduction
    for row in speed["batches"].values():
        row["of_flop_reduction"] = row["speedup"] / reduction
    return speed


__all__ = ["batch_of", "interleaved_times", "measure_speedup", "speed_vs_flops"]
