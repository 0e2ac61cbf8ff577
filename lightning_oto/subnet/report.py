"""Parameter and FLOP counting (the one home for it), and the compression report built on it."""
from __future__ import annotations

import copy
import math
from typing import Any, Iterable, Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..space.groups import Group
from .plan import removal_plan


def count_flops(model: nn.Module, inputs: torch.Tensor | Sequence[torch.Tensor], on_meta: bool = False) -> int:
    """FLOPs of one forward pass in eval mode (torch.utils.flop_counter: a multiply-add counts 2).

    FLOPs depend only on shapes: ``on_meta`` counts on a ``meta``-device copy (no arithmetic, no
    memory; large networks in about the time of a trace) and falls back to a real forward for
    models that cannot run on ``meta``.  The caller's model is never modified.
    """
    args = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    if on_meta:
        try:
            meta_model = copy.deepcopy(model).to("meta")
            return _flops(meta_model, tuple(t.to("meta") if isinstance(t, torch.Tensor) else t for t in args))
        except Exception:  # noqa: BLE001 - any meta failure just means "count for real"
            pass
    return _flops(model, args)


@torch.no_grad()
def _flops(model: nn.Module, args: tuple) -> int:
    was = model.training
    fast = torch.backends.mha.get_fastpath_enabled()
    _set_mode(model, False)
    # nn.MultiheadAttention's fused eval kernel has no FLOP formula: count its projections and matmuls
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with FlopCounterMode(display=False) as fc:
            model(*args)
        return int(fc.get_total_flops())
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)
        _set_mode(model, was)


def count_macs(model: nn.Module, inputs: torch.Tensor | Sequence[torch.Tensor], on_meta: bool = True) -> int:
    """Multiply-accumulates of one forward pass: the papers' "FLOPs" column (use a batch of 1 per image)."""
    return count_flops(model, inputs, on_meta=on_meta) // 2


def _set_mode(model: nn.Module, training: bool) -> None:
    try:
        model.train(training)
    except NotImplementedError:  # exported-program modules refuse train()/eval(); they are fixed in eval
        pass


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (shared ones once); ``trainable_only`` counts those with ``requires_grad``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def count_params_removed(groups: Sequence[Group], zero_ids: Iterable[int],
                         param_shapes: dict[str, tuple[int, ...]]) -> int:
    """Parameters that removing the groups ``zero_ids`` deletes, without building the sub-network.

    Counted per tensor and dimension from the removal plan (the same indices slimming deletes), so
    a weight that loses rows (its group) and columns (another group's dependents) is not counted
    twice; whole-tensor slices (erase mode) remove the whole tensor.
    """
    chosen = [groups[i] for i in zero_ids]
    plan = removal_plan(chosen, param_shapes)
    whole = {s.name for g in chosen for s in list(g.slices) + list(g.dependents)
             if s.indices is None and s.name in param_shapes}
    cut: dict[str, dict[int, int]] = {}
    for (name, dim), idx in plan.items():
        if name not in whole:
            cut.setdefault(name, {})[dim] = len(idx)
    removed = sum(math.prod(param_shapes[n]) for n in whole)
    for name, dims in cut.items():
        shape = param_shapes[name]
        left = math.prod(max(size - dims.get(d, 0), 1) if dims.get(d) else size for d, size in enumerate(shape))
        removed += math.prod(shape) - left
    return removed


def compression_report(full: nn.Module, sub: nn.Module | None, inputs: Sequence[torch.Tensor],
                       groups: Sequence[Group], zero_ids: Sequence[int],
                       speed_batch_sizes: Sequence[int] = (), speed_of: nn.Module | None = None,
                       speed_runs: int = 7) -> dict[str, Any]:
    """Parameters, FLOPs and group counts of ``full`` vs ``sub``; with ``speed_batch_sizes`` also the
    measured speed-up of ``sub`` over ``speed_of`` (default ``full``) at those batch sizes
    (:mod:`.timing`), next to the FLOP reduction."""
    prunable = sum(1 for g in groups if g.prunable)
    rep: dict[str, Any] = {
        "params_full": count_params(full),
        "flops_full": count_flops(full, inputs),
        "groups": len(groups),
        "prunable_groups": prunable,
        "zero_groups": len(zero_ids),
        "group_sparsity": (len(zero_ids) / prunable) if prunable else 0.0,
    }
    if sub is not None:
        rep["params_sub"] = count_params(sub)
        rep["flops_sub"] = count_flops(sub, inputs)
        rep["param_ratio"] = rep["params_sub"] / max(1, rep["params_full"])
        rep["flop_ratio"] = rep["flops_sub"] / max(1, rep["flops_full"])
        if speed_batch_sizes:
            from .timing import measure_speedup, speed_vs_flops

            speed = measure_speedup(full if speed_of is None else speed_of, sub, inputs, speed_batch_sizes,
                                    runs=speed_runs)
            rep["speed"] = speed_vs_flops(speed, rep["flops_full"], rep["flops_sub"])
    return rep
