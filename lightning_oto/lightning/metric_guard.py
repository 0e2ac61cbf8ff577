"""The accuracy guard: say plainly when compression lost more of the monitored metric than allowed.

The dense reference is the last validation before the first projection step (end of warm-up).  Every
later validation of the fit is compared with it; the last one of each phase is kept.  A drop beyond
``max_metric_drop`` is announced once (one line, rank 0) and the run is ``degraded`` when the final
validation is still beyond it (a drop that recovered by the end is kept as ``dropped``).

Which way is worse, and how a drop is measured, follows the metric's name (as ``ModelCheckpoint``
users name them): ``*acc*`` is higher-is-better and its drop is absolute (default 0.05: five points
of accuracy); ``*loss*`` / ``*err*`` are lower-is-better and their drop is relative (default 0.10: 10%
higher than the reference); any other name is higher-is-better with a relative drop.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

#: the metrics tried, in order, when ``monitor`` is not given
DEFAULT_MONITORS = ("val_acc", "val_accuracy", "val/acc", "val/accuracy", "val_loss", "val/loss")
DEFAULT_ACC_DROP = 0.05
DEFAULT_RELATIVE_DROP = 0.10


def metric_kind(name: str) -> tuple[bool, bool]:
    """``(higher_is_better, absolute_drop)`` for a metric name (module docstring)."""
    low = name.lower()
    if "loss" in low or "err" in low:
        return False, False
    return True, "acc" in low


def check_max_metric_drop(value: Any) -> float | None:
    """``None`` (the default for the metric) or a number > 0."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or math.isnan(value):
        raise ValueError(f"max_metric_drop must be a number > 0 (or None for the metric's default), got {value!r}.")
    return float(value)


@dataclass
class MetricGuard:
    """Follows one monitored validation metric through the phases of a fit (plain data, no Lightning)."""

    monitor: str | None = None
    max_drop: float | None = None
    name: str | None = None
    reference: dict[str, Any] | None = None
    last: dict[str, Any] | None = None
    phases: dict[str, dict[str, Any]] = field(default_factory=dict)
    first_drop: dict[str, Any] | None = None
    missing_said: bool = False  # a ``monitor`` that is not logged is said once

    def pick(self, metrics: Mapping[str, float]) -> str | None:
        """The monitored metric's name in ``metrics`` (``monitor``, else the first default found)."""
        if self.name is None:
            names = (self.monitor,) if self.monitor else DEFAULT_MONITORS
            self.name = next((n for n in names if n in metrics), None)
        return self.name

    @property
    def threshold(self) -> float:
        higher, absolute = metric_kind(self.name or "")
        default = DEFAULT_ACC_DROP if absolute else DEFAULT_RELATIVE_DROP
        return default if self.max_drop is None else self.max_drop

    def drop(self, value: float) -> float:
        """How much worse ``value`` is than the reference (absolute or relative, by the metric's kind)."""
        assert self.reference is not None and self.name is not None
        higher, absolute = metric_kind(self.name)
        ref = float(self.reference["value"])
        worse = (ref - value) if higher else (value - ref)
        return worse if absolute else worse / max(abs(ref), 1e-12)

    def observe(self, value: float, phase: str, dense: bool, epoch: int, step: int) -> str | None:
        """Record one validation; returns the one-line announcement the first time the drop exceeds the
        threshold (``None`` otherwise).  ``dense``: no projection step has been taken yet."""
        point = {"value": float(value), "phase": phase, "epoch": int(epoch), "step": int(step)}
        if dense or self.reference is None:
            if dense:
                self.reference = dict(point, phase="warmup")
                return None
            self.reference = dict(point, note="no validation before the projection: first one used")
            return None
        self.last = point
        self.phases[phase] = point
        if self.first_drop is None and self.drop(value) > self.threshold:
            self.first_drop = dict(point, drop=self.drop(value))
            return self.message(point)
        return None

    def message(self, point: Mapping[str, Any]) -> str:
        higher, absolute = metric_kind(self.name or "")
        amount = f"{self.drop(point['value']):.3g}" + ("" if absolute else f" ({100 * self.drop(point['value']):.1f}%)")
        return (f"OTO accuracy guard: {self.name} went from {self.reference['value']:.4g} (dense, end of warm-up) to "
                f"{point['value']:.4g} in the {point['phase']} phase (epoch {point['epoch']}, step {point['step']}): "
                f"a drop of {amount}, more than max_metric_drop={self.threshold:g}.")

    @property
    def degraded(self) -> bool:
        """The final validation is still worse than the reference by more than the threshold."""
        return self.reference is not None and self.last is not None and self.drop(self.last["value"]) > self.threshold

    def to_dict(self) -> dict[str, Any]:
        """The report's ``metric_guard`` entry."""
        higher, absolute = metric_kind(self.name or "")
        active = self.name is not None and self.reference is not None
        return {
            "monitor": self.name, "active": active,
            "higher_is_better": higher if self.name else None,
            "drop_is": ("absolute" if absolute else "relative") if self.name else None,
            "max_metric_drop": self.threshold if self.name else self.max_drop,
            "reference": self.reference, "after_phase": dict(self.phases), "final": self.last,
            "final_drop": self.drop(self.last["value"]) if active and self.last else None,
            "dropped": self.first_drop is not None, "first_drop": self.first_drop,
            "degraded": self.degraded,
        }

    def report(self) -> dict[str, Any]:
        """The report's guard entries: ``metric_guard`` (the record) and ``degraded``."""
        rec = self.to_dict()
        return {"metric_guard": rec, "degraded": rec["degraded"]}

    def state(self) -> dict[str, Any]:
        """What a checkpoint carries so a resumed fit keeps its dense reference."""
        return {"name": self.name, "reference": self.reference, "last": self.last, "phases": self.phases,
                "first_drop": self.first_drop}

    def restore(self, saved: Mapping[str, Any] | None) -> None:
        """Take back a :meth:`state` (nothing when ``saved`` is empty)."""
        for key, value in (saved or {}).items():
            setattr(self, key, value)


def scalar_metrics(logged: Mapping[str, Any]) -> dict[str, float]:
    """The one-number entries of Lightning's ``callback_metrics`` (tensors of one element), as floats."""
    return {k: float(v) for k, v in logged.items() if isinstance(v, torch.Tensor) and v.numel() == 1}


def guard_validation(guard: MetricGuard, trainer: Any, optimizer: Any, stop_on_drop: bool, who: str) -> bool:
    """One validation of a fit, as :class:`OTOCallback` and :class:`OTOMixin` both watch it: compare the
    monitored metric with the dense reference, print the first drop beyond the allowance (one line, rank 0)
    and, with ``stop_on_drop``, ask the trainer to stop (every rank takes part in that decision).
    ``optimizer``: the half-space optimizer (its phase and step count place the validation).
    Returns whether the fit was asked to stop."""
    metrics = scalar_metrics(trainer.callback_metrics)
    name = guard.pick(metrics)
    if name is None:
        if guard.monitor is not None and not guard.missing_said:
            from lightning.pytorch.utilities import rank_zero_warn  # here: settings load without Lightning

            guard.missing_said = True
            rank_zero_warn(f"{who}: monitor={guard.monitor!r} is not among the logged metrics "
                           f"{sorted(metrics)}; the accuracy guard is off.")
        return False
    dense = optimizer.num_steps <= optimizer.warmup_steps  # no projection step taken yet
    msg = guard.observe(metrics[name], optimizer.phase, dense, trainer.current_epoch, trainer.global_step)
    if msg is not None and trainer.is_global_zero:
        print(msg, flush=True)
    if stop_on_drop and trainer.strategy.reduce_boolean_decision(msg is not None, all=False):
        trainer.should_stop = True
        return True
    return False


__all__ = ["DEFAULT_MONITORS", "MetricGuard", "check_max_metric_drop", "guard_validation", "metric_kind",
           "scalar_metrics"]
