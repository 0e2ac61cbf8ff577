"""Replacing the user's optimizer by the half-space one without breaking their LR schedulers."""
from __future__ import annotations

from typing import Any

import torch

from .compat import SCHEDULER_NON_GROUP_LISTS, child_schedulers, mark_step_as_scheduler_wrapped


def rebind_scheduler(sched: Any, old: torch.optim.Optimizer, new: torch.optim.Optimizer,
                     base_lr: float | None) -> None:
    """Point ``sched`` (and chained children) at ``new``; per-group lists keep the first group's entry.

    The half-space optimizer has one parameter group, so a scheduler built for ``old`` with several
    groups keeps the first group's schedule.  ``base_lr`` (when the callback overrides the lr)
    replaces the scheduler's base learning rate.
    """
    for child in child_schedulers(sched):
        rebind_scheduler(child, old, new, base_lr)
    if getattr(sched, "optimizer", None) is old:
        sched.optimizer = new
        mark_step_as_scheduler_wrapped(new)
    n_old = len(old.param_groups)
    for k, v in list(vars(sched).items()):
        if k in SCHEDULER_NON_GROUP_LISTS or not isinstance(v, list):
            continue
        if n_old > 1 and len(v) == n_old:
            setattr(sched, k, v[:1])
    if base_lr is not None and isinstance(getattr(sched, "base_lrs", None), list):
        sched.base_lrs = [base_lr]


def carry_scheduler_state(old: torch.optim.Optimizer | None, new: torch.optim.Optimizer, base_lr: float,
                          lr_overridden: bool) -> None:
    """Copy the per-group scheduler bookkeeping of ``old`` (initial_lr, max_lr, current lr ratio) into ``new``."""
    group = new.param_groups[0]
    if old is None or not getattr(old, "param_groups", None):
        return
    og = old.param_groups[0]
    for k, v in og.items():
        if k != "params" and k not in group:
            group[k] = v  # e.g. initial_lr / max_lr / min_lr / base_momentum set by a scheduler
    initial = og.get("initial_lr")
    if initial is not None:
        cur = float(og["lr"])
        ratio = cur / float(initial) if float(initial) else 1.0
        group["initial_lr"] = base_lr
        group["lr"] = base_lr * ratio if lr_overridden else cur
    mark_step_as_scheduler_wrapped(new)


def replace_optimizer(trainer: Any, old: torch.optim.Optimizer | None, new: torch.optim.Optimizer,
                      base_lr: float, lr_overridden: bool) -> None:
    """Install ``new`` in the trainer in place of ``old`` and rebind every LR scheduler to it."""
    carry_scheduler_state(old, new, base_lr, lr_overridden)
    if old is not None:
        for cfg in trainer.lr_scheduler_configs:
            rebind_scheduler(cfg.scheduler, old, new, base_lr if lr_overridden else None)
    trainer.strategy.optimizers = [new]


__all__ = ["carry_scheduler_state", "rebind_scheduler", "replace_optimizer"]
