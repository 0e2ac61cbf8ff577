"""BatchNorm recalibration: re-estimate running statistics after structured sparsity changed the weights.

While the optimizer pushes redundant groups to zero the activations shift faster than the running
averages follow (momentum 0.1), so eval-mode accuracy dips although batch-statistics accuracy does
not.  A few forward passes in train mode for the norms only, with a cumulative average, fix it.
"""
from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any, Callable, Iterable

import torch
from torch import nn

from ..graph.inputs import ModelInputs, call_model, map_tensors


#: keys of a dict batch that are training targets, not model inputs (left out of the example input)
LABEL_KEYS = ("labels", "label", "targets", "target")


def batch_inputs(batch: Any, network: nn.Module | None = None) -> ModelInputs:
    """A loader batch -> what the network is called with: ``(x, y)`` / ``[x, y]`` -> ``(x,)``; a dict
    without its :data:`LABEL_KEYS` -> keyword inputs when ``network.forward`` takes those names (or
    ``**kwargs``), else ``(dict,)`` for a ``forward(self, batch)`` with one argument (a single tensor
    entry is passed as that argument unless it is annotated as a dict)."""
    if isinstance(batch, torch.Tensor):
        return (batch,)
    if isinstance(batch, (tuple, list)) and batch:
        return (batch[0],)
    if isinstance(batch, Mapping):
        return dict_batch_inputs(batch, network)
    raise TypeError(f"cannot tell the model input in a batch of type {type(batch).__name__}; pass inputs_of=.")


def dict_batch_inputs(batch: Mapping, network: nn.Module | None) -> ModelInputs:
    """See :func:`batch_inputs`; a clear error when the dict does not fit the forward's signature."""
    inputs = {k: v for k, v in batch.items() if k not in LABEL_KEYS}
    bad = [k for k, v in inputs.items() if not isinstance(v, torch.Tensor)]
    if bad or not inputs:
        what = f"non-tensor entries {bad}" if inputs else "no tensor besides its labels"
        raise TypeError(f"the dict batch has {what}; give the example input explicitly (a dict of keyword tensors).")
    params = _forward_parameters(network)
    if params is None or any(p.kind is p.VAR_KEYWORD for p in params):
        return inputs
    keywords = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    names = [p.name for p in params]
    if all(k in keywords for k in inputs):
        return inputs
    if any(k in keywords for k in inputs):
        raise TypeError(f"the dict batch has the keys {sorted(set(inputs) - keywords)}, which "
                        f"{type(network).__name__}.forward{tuple(names)} does not take; give the example input "
                        "explicitly as a dict of the forward's keyword arguments.")
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if positional and sum(p.default is p.empty for p in positional) <= 1:  # forward(self, batch)
        if len(inputs) == 1 and not _annotated_mapping(positional[0]):
            return (next(iter(inputs.values())),)
        return (inputs,)
    raise TypeError(f"the dict batch has the keys {sorted(inputs)} but {type(network).__name__}.forward takes "
                    f"{names}; give the example input explicitly as a dict of the forward's keyword arguments.")


def _forward_parameters(network: nn.Module | None) -> list[inspect.Parameter] | None:
    if network is None:
        return None
    try:
        return list(inspect.signature(network.forward).parameters.values())
    except (TypeError, ValueError):
        return None


def _annotated_mapping(param: inspect.Parameter) -> bool:
    ann = param.annotation
    text = ann if isinstance(ann, str) else getattr(ann, "__name__", str(ann))
    return any(w in str(text).lower() for w in ("dict", "mapping"))


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Iterable[Any], num_batches: int = 20,
                          inputs_of: Callable[[Any], Any] | None = None) -> int:
    """Reset and re-estimate every BatchNorm's running statistics on up to ``num_batches`` batches.

    Only the norms run in train mode (dropout and the rest stay in eval); parameters are not touched;
    modes and momenta are restored.  Returns the number of batches used (0: the model has no
    BatchNorm with running statistics, or ``batches`` was empty; nothing changed then).
    """
    norms = [m for m in model.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.running_mean is not None]
    if not norms or num_batches <= 0:
        return 0
    inputs_of = inputs_of or (lambda batch: batch_inputs(batch, model))
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
            inputs = inputs_of(batch)
            inputs = (inputs,) if isinstance(inputs, torch.Tensor) else dict(inputs) if isinstance(inputs, Mapping) \
                else tuple(inputs)
            call_model(model, map_tensors(lambda t: t.to(device), inputs))
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


__all__ = ["LABEL_KEYS", "batch_inputs", "dict_batch_inputs", "recalibrate_batchnorm"]
