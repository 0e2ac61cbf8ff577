"""Compression report: parameters and FLOPs of the full model vs the sub-network."""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..space.groups import Group


@torch.no_grad()
def count_flops(model: nn.Module, inputs: Sequence[torch.Tensor]) -> int:
    """FLOPs of one forward pass in eval mode (torch.utils.flop_counter: a multiply-add counts 2)."""
    was = model.training
    fast = torch.backends.mha.get_fastpath_enabled()
    _set_mode(model, False)
    # nn.MultiheadAttention's fused eval kernel has no FLOP formula: count its projections and matmuls
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with FlopCounterMode(display=False) as fc:
            model(*inputs)
        return int(fc.get_total_flops())
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)
        _set_mode(model, was)


def _set_mode(model: nn.Module, training: bool) -> None:
    try:
        model.train(training)
    except NotImplementedError:  # exported-program modules refuse train()/eval(); they are fixed in eval
        pass


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def compression_report(full: nn.Module, sub: nn.Module | None, inputs: Sequence[torch.Tensor],
                       groups: Sequence[Group], zero_ids: Sequence[int]) -> dict[str, Any]:
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
    return rep
