"""The private attributes and internals of Lightning, torch schedulers and ``nn.Module`` this package relies on.

One small function per attribute, each with a test in ``tests/test_lightning_compat.py`` that fails
loudly when a new Lightning or torch release renames it.  Nothing else in the package touches an
underscore attribute of another library.
"""
from __future__ import annotations

import functools
import weakref
from typing import Any, Iterable

import torch
from torch import nn

#: torch's LRScheduler marks the ``optimizer.step`` it wrapped with this attribute ...
SCHEDULER_WRAPPED_ATTR = "_wrapped_by_lr_sched"
#: ... and the wrapper sets this flag on the optimizer once ``step`` ran (else scheduler.step() warns)
OPTIMIZER_CALLED_ATTR = "_opt_called"
#: ChainedScheduler / SequentialLR keep their children here
CHILD_SCHEDULERS_ATTR = "_schedulers"
#: list-valued scheduler attributes that are not per parameter group
SCHEDULER_NON_GROUP_LISTS = frozenset({CHILD_SCHEDULERS_ATTR, "_milestones", "milestones"})
#: Lightning puts an instance of this class in ``strategy.optimizers`` when configure_optimizers returns None
MOCK_OPTIMIZER_CLASS = "_MockOptimizer"
#: nn.Module's registries of children, parameters and buffers
MODULE_STORES = ("_modules", "_parameters", "_buffers")


def strategy_start_method(strategy: Any) -> str | None:
    """How a DDP strategy starts its workers ("popen", "spawn", "fork", "forkserver"); None if not DDP."""
    return getattr(strategy, "_start_method", None)


def load_train_dataloader(trainer: Any) -> None:
    """Have Lightning build the training dataloader now (before its own fit loop would), through the fit
    loop's ``setup_data``: loop internals, not public Trainer API."""
    trainer.fit_loop.setup_data()


def real_optimizers(optimizers: Iterable[Any]) -> list[Any]:
    """``trainer.strategy.optimizers`` without Lightning's placeholder for "no optimizer"."""
    return [o for o in optimizers if type(o).__name__ != MOCK_OPTIMIZER_CLASS]


def child_schedulers(scheduler: Any) -> list[Any]:
    """The schedulers a ChainedScheduler / SequentialLR drives (empty for a plain scheduler)."""
    return list(getattr(scheduler, CHILD_SCHEDULERS_ATTR, None) or [])


def mark_step_as_scheduler_wrapped(opt: torch.optim.Optimizer) -> None:
    """Make ``opt.step`` look like one an LR scheduler wrapped, so a scheduler rebound to ``opt`` does not warn
    "lr_scheduler.step() before optimizer.step()" on its first step."""
    step = opt.step
    if hasattr(step, SCHEDULER_WRAPPED_ATTR):
        return
    ref = weakref.ref(opt)
    func = step.__func__  # type: ignore[attr-defined]

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        o = ref()
        setattr(o, OPTIMIZER_CALLED_ATTR, True)
        return func(o, *args, **kwargs)

    setattr(wrapper, SCHEDULER_WRAPPED_ATTR, True)
    opt.step = wrapper  # type: ignore[method-assign]


def module_stores(module: nn.Module) -> dict[str, dict[str, Any]]:
    """``{"_modules": ..., "_parameters": ..., "_buffers": ...}``: the live dicts, for moving parts between modules
    without copying tensors."""
    return {store: getattr(module, store) for store in MODULE_STORES}


__all__ = [
    "CHILD_SCHEDULERS_ATTR",
    "MOCK_OPTIMIZER_CLASS",
    "MODULE_STORES",
    "OPTIMIZER_CALLED_ATTR",
    "SCHEDULER_NON_GROUP_LISTS",
    "SCHEDULER_WRAPPED_ATTR",
    "child_schedulers",
    "load_train_dataloader",
    "mark_step_as_scheduler_wrapped",
    "module_stores",
    "real_optimizers",
    "strategy_start_method",
]
