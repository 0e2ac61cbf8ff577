"""Measured speed of a sub-network against the full model (the one home for forward timing).

FLOPs removed are not time saved: small or odd widths run slower per FLOP.  The report therefore
times both networks on the device they sit on, at batch 1 and at the training batch size: after
``warmup`` untimed forwards, ``runs`` rounds time one forward of each network in turn
(interleaved, so a busy machine slows both alike) and the median per network is kept.

The full model is timed as the dense model it stands for (:func:`dense_stand_in`): after training its
removed groups are exactly zero, and on CPU that alone made DemoNet's forward 6% faster than the same
network with dense weights, which understated every speed-up and overstated a latency kept.
"""
from __future__ import annotations

import copy
import statistics
import time
from typing import Any, Sequence

import torch
from torch import nn

from ..graph.inputs import ModelInputs, as_model_inputs, call_model, input_tensors, map_tensors


def batch_of(inputs: ModelInputs, batch: int) -> ModelInputs:
    """The example inputs at another batch size: rows repeated (or cut) along dim 0 of every tensor
    (positional or keyword inputs keep their form)."""
    if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
        raise ValueError(f"batch sizes must be integers >= 1, got {batch!r}")

    def rows(t: torch.Tensor) -> torch.Tensor:
        if t.dim() > 0 and t.shape[0] > 0:
            return t[torch.arange(batch, device=t.device) % t.shape[0]]
        return t

    return map_tensors(rows, inputs)


@torch.no_grad()
def dense_stand_in(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose exactly-zero parameter entries are refilled with small seeded noise (the global
    RNG is untouched), to be timed in place of the dense model; ``model`` itself when nothing is zero or its
    parameters are not plain tensors (sharded: copying them is not this function's business)."""
    params = list(model.parameters())
    if not any(bool((p == 0).any()) for p in params) or any(type(p.data) is not torch.Tensor for p in params):
        return model
    stand_in = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(0)
    for p in stand_in.parameters():
        zero = p == 0
        if bool(zero.any()):
            scale = float(p[~zero].abs().mean()) if bool((~zero).any()) else 1e-2
            noise = torch.randn(int(zero.sum()), generator=gen, dtype=torch.float32) * scale
            p[zero] = noise.to(device=p.device, dtype=p.dtype)
    return stand_in


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device_of(model: nn.Module, inputs: ModelInputs) -> torch.device:
    p = next(iter(model.parameters()), None)
    if p is not None:
        return p.device
    return next((t.device for t in input_tensors(inputs)), torch.device("cpu"))


@torch.inference_mode()
def interleaved_times(models: dict[str, nn.Module], inputs: ModelInputs, runs: int = 7,
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
                call_model(m, inputs)
        for _ in range(runs):
            for name, m in models.items():
                _sync(device)
                t0 = time.perf_counter()
                call_model(m, inputs)
                _sync(device)
                times[name].append(time.perf_counter() - t0)
    finally:
        for k, m in models.items():
            m.train(modes[k])
    return {k: statistics.median(v) for k, v in times.items()}


def measure_speedup(full: nn.Module, sub: nn.Module, inputs: Any, batch_sizes: Sequence[int] = (1,),
                    runs: int = 7, warmup: int = 2) -> dict[str, Any]:
    """``{"device", "runs", "batches": {str(b): {"full_ms", "sub_ms", "speedup"}}}`` (speed-up = full / sub)."""
    inputs = as_model_inputs(inputs)
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


def loader_batch_size(loader: Any) -> int | None:
    """The batch size a DataLoader yields (its ``batch_size``, else its batch sampler's); None when it does not say."""
    size = getattr(loader, "batch_size", None) or getattr(getattr(loader, "batch_sampler", None), "batch_size", None)
    return size if isinstance(size, int) and not isinstance(size, bool) and size >= 1 else None


def run_speed_report(full: nn.Module, sub: nn.Module, inputs: Any, train_batch: int | None,
                     flops_full: int | None, flops_sub: int | None) -> dict[str, Any]:
    """The report's ``speed`` entry, the same for OTOCallback and OTOMixin: ``sub`` timed against ``full`` at
    batch 1 and at the training batch size (when known), next to the FLOP reduction."""
    batches = (1,) if train_batch is None else (1, train_batch)
    return speed_vs_flops(measure_speedup(dense_stand_in(full), sub, inputs, batches), flops_full, flops_sub)


__all__ = ["batch_of", "dense_stand_in", "interleaved_times", "loader_batch_size", "measure_speedup", "run_speed_report",
           "speed_vs_flops"]
