"""Which module of a LightningModule is compressed, on what example input, and how a sub-network takes its place."""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from ..graph.inputs import ModelInputs, as_model_inputs, map_tensors
from ..subnet.recalibrate import batch_inputs
from .compat import load_train_dataloader, module_stores

#: samples of a training batch used as the example input when none is given (2: export keeps the batch dynamic)
EXAMPLE_BATCH = 2


def get_attr_path(obj: Any, path: str) -> Any:
    """``getattr`` over a dotted path (``"model.backbone"``) with an error naming the missing part."""
    cur = obj
    for part in path.split("."):
        if not hasattr(cur, part):
            raise AttributeError(
                f"network_attr={path!r}: {type(cur).__name__} has no attribute {part!r}; network_attr must name "
                "the nn.Module to compress inside the LightningModule (e.g. network_attr='net').")
        cur = getattr(cur, part)
    return cur


def set_attr_path(obj: Any, path: str, value: Any) -> None:
    """``obj.<dotted path> = value``."""
    *parents, last = path.split(".")
    for part in parents:
        obj = getattr(obj, part)
    setattr(obj, last, value)


def resolve_network(pl_module: nn.Module, network_attr: str | None) -> nn.Module:
    """The module to compress: ``pl_module.<network_attr>`` or the LightningModule itself."""
    net = pl_module if network_attr is None else get_attr_path(pl_module, network_attr)
    if not isinstance(net, nn.Module):
        raise TypeError(f"network_attr={network_attr!r} is a {type(net).__name__}, not a torch.nn.Module.")
    return net


def as_example_inputs(x: Any, who: str) -> ModelInputs:
    """A tensor / list / tuple (positional) or a dict (keyword inputs), or a TypeError naming what was given."""
    try:
        return as_model_inputs(x)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{who}: {e}") from e


def training_loader(trainer: Any) -> Any:
    """The trainer's training dataloader (the first one of a collection), loaded through the public API if needed."""
    if trainer.train_dataloader is None:
        _ = trainer.estimated_stepping_batches  # loads the train dataloader ...
    if trainer.train_dataloader is None:  # ... except for a max_steps-only run, which returns before loading
        load_train_dataloader(trainer)
    loader = trainer.train_dataloader
    if isinstance(loader, dict):
        loader = next(iter(loader.values()), None)
    elif isinstance(loader, (list, tuple)):
        loader = loader[0] if loader else None
    if loader is None:
        raise ValueError("the trainer has no training dataloader")
    return loader


def first_train_batch(trainer: Any) -> Any:
    """The first batch of the trainer's training dataloader."""
    return next(iter(training_loader(trainer)))


def resolve_example_inputs(pl_module: Any, example_inputs: Any, who: str, trainer: Any = None,
                           network: nn.Module | None = None) -> tuple[ModelInputs, str]:
    """Example inputs and where they came from: the argument, ``example_input_array`` or a training batch.

    A dict is keyword inputs (``network(**x)``), as for Lightning's ``example_input_array``. Without either
    of the first two, the first ``EXAMPLE_BATCH`` samples of the first training batch are used: its input
    part (``batch[0]`` for ``(x, y)`` batches; a dict batch without its labels, see
    :func:`~lightning_oto.subnet.recalibrate.batch_inputs`, which reads ``network``'s forward signature).
    """
    if example_inputs is not None:
        return as_example_inputs(example_inputs, who), "argument"
    x = getattr(pl_module, "example_input_array", None)
    if x is not None:
        return as_example_inputs(x, who), "example_input_array"
    if trainer is not None:
        try:
            inputs = as_example_inputs(batch_inputs(first_train_batch(trainer), network), who)
        except (TypeError, ValueError, StopIteration) as e:
            raise ValueError(f"{who} needs an example input to trace the network and could not take one from the "
                             f"training data ({e}): set `self.example_input_array` in your LightningModule (a "
                             "tensor, a tuple, or a dict of keyword inputs such as {'input_ids': ids, "
                             "'attention_mask': mask}), or pass OTOCallback(example_inputs=...).") from e
        return map_tensors(lambda t: t[:EXAMPLE_BATCH] if t.dim() else t, inputs), "a training batch"
    raise ValueError(
        f"{who} needs an example input to trace the network: set `self.example_input_array = "
        f"torch.randn(2, C, H, W)` (or a dict of keyword inputs) in your LightningModule's __init__, or pass "
        "example_inputs=... .")


def to_device(inputs: ModelInputs, module: nn.Module) -> ModelInputs:
    """Move example inputs to where ``module``'s parameters are (Lightning moves modules around)."""
    dev = next((p.device for p in module.parameters()), None)
    if dev is None:
        dev = next((b.device for b in module.buffers()), torch.device("cpu"))
    return map_tensors(lambda t: t.to(dev), inputs)


def install_subnet(pl_module: nn.Module, network_attr: str | None, sub: nn.Module) -> nn.Module:
    """Put ``sub`` where the compressed network was; returns a module holding the replaced (full) network.

    With ``network_attr`` the attribute is reassigned.  When the LightningModule itself was compressed
    (prune mode: ``sub`` has the same class), its children, parameters and buffers are moved over
    and the old ones stay in a shallow shell that is returned; no tensor is copied.
    """
    if network_attr is not None:
        full = get_attr_path(pl_module, network_attr)
        set_attr_path(pl_module, network_attr, sub)
        return full
    shell = copy.copy(pl_module)
    live = module_stores(pl_module)
    for store, entries in live.items():
        setattr(shell, store, dict(entries))
    for store, entries in module_stores(sub).items():
        dst = live[store]
        for k in list(dst.keys()):
            if k in entries:
                dst[k] = entries[k]
    return shell


__all__ = ["EXAMPLE_BATCH", "as_example_inputs", "batch_inputs", "first_train_batch", "get_attr_path",
           "install_subnet", "resolve_example_inputs", "resolve_network", "set_attr_path", "to_device",
           "training_loader"]
