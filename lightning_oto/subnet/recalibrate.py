"""BatchNorm recalibration: re-estimate running statistics after structured sparsity changed the weights.

While the optimizer pushes redundant groups to zero the activations shift faster than the running
averages follow (momentum 0.1), so eval-mode accuracy dips although batch-statistics accuracy does
not.  A few forward passes in train mode for the norms only, with a cumulative average, fix it.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import nn


def batch_inputs(batch: Any) -> tuple:
    """A loader batch -> forward arguments: ``(x, y)`` / ``[x, y]`` -> ``(x,)``, a dict -> its tensors' first."""
    if isinstance(batch, torch.Tensor):
        return (batch,)
    if isinstance(batch, (tuple, list)) and batch:
        return (batch[0],)
    if isinstance(batch, dict):
        for key in ("input_ids", "pixel_values", "x", "input", "inputs"):
            if key in batch:
                return (batch[key],)
    raise TypeError(f"cannot tell the model input in a batch of type {type(batch).__name__}; pass inputs_of=.")


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Iterable[Any], num_batches: int = 20,
                          inputs_of: Callable[[Any], tuple] | None = None) -> int:
    """Reset and re-estimate every BatchNorm's running statistics on up to ``num_batches`` batches.

    Only the norms run in train mode (dropout and the rest stay in eval); parameters are not touched;
    modes and momenta are restored.  Returns the number of batches used (0: the model has no
    BatchNorm with running statistics, or ``batches`` was empty; nothing changed then).
    """
    norms = [m for m in model.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.running_mean is not None]
    if not norms or num_batches <= 0:
        return 0
    inputs_of = inputs_of or batch_inputs
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    modes = {m: m.training for m in model.modules()}
    saved = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()
              if m.num_batches_tracked is not None else None, m.momentum) for m in norms]
    used = 0
    try:
        model.eval()
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative moving average over the recalibration batches
            m.train()
        for batch in batches:
            if used >= num_batches:
                break
            args = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in inputs_of(batch))
            model(*args)
            used += 1
    finally:
        for m, (mean, var, n, momentum) in zip(norms, saved):
            m.momentum = momentum
            if used == 0:
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                if n is not None:
                    m.num_batches_tracked.copy_(n)
        for m, training in modes.items():
            m.training = training
    return used


__all__ = ["batch_inputs", "recalibrate_batchnorm"]
