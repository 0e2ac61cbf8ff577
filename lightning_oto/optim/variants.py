"""Base variants of the half-space optimizers: the processed direction of SGD / Adam / AdamW.

Every variant is split in two halves so the half-space optimizers can put their own per-row
coefficients between them:

1. :func:`directions` updates the optimizer state (momentum, Adam moments) and returns, per
   parameter, the processed direction ``d`` *per unit learning rate* as ``scale * tensor``.
   Plain SGD and every important group then take ``x <- x - lr * d``.
2. :func:`apply_update` performs ``x <- A * x - lr * C * d`` following an :class:`UpdatePlan`:
   ``A`` and ``C`` are Python floats for plain parameters and per-row tensors (see
   :class:`~.group_index.RowFactors`) for parameters that hold redundant rows, so the
   redundant-group projection rides on the update every parameter takes anyway.

The SGD momentum update is one fused kernel (``buf = g + m*buf`` written into ``buf``), where
``torch.optim.SGD`` uses two; the result equals torch's up to rounding.  Adam follows
``torch.optim.Adam`` (bias corrections, ``eps`` outside the square root); AdamW decouples the
weight decay, which :func:`decoupled_decay` reports so the caller folds it into ``A``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

__all__ = ["Direction", "UpdatePlan", "directions", "apply_update", "decoupled_decay"]


@dataclass
class Direction:
    """``d = scale * tensor``, or for Adam ``scale * tensor / (sqrt(sq) / c2 + eps)`` (``sq`` set).

    Adam's denominator is computed only where it is used: plain parameters write it into a reused
    scratch buffer right before their ``addcdiv_`` (no large allocation per step), parameters
    with redundant rows get the whole direction once (:meth:`materialize`).
    """

    tensor: torch.Tensor
    scale: float = 1.0
    sq: torch.Tensor | None = None
    c2: float = 1.0
    eps: float = 0.0

    def denominator(self, out: torch.Tensor | None = None) -> torch.Tensor:
        den = torch.sqrt(self.sq) if out is None else torch.sqrt(self.sq, out=out)
        return den.div_(self.c2).add_(self.eps)

    def in_buffer(self, plan: "UpdatePlan") -> torch.Tensor:
        """The direction as one tensor, Adam's computed into ``plan``'s reused scratch (not kept)."""
        if self.sq is None:
            return self.tensor
        den = self.denominator(out=plan.scratch_like(self.sq))
        return torch.div(self.tensor, den, out=den)

    def materialize(self) -> torch.Tensor:
        """The direction as one tensor (Adam: ``tensor / denominator``, computed once); idempotent."""
        if self.sq is not None:
            den = self.denominator()
            self.tensor = torch.div(self.tensor, den, out=den)
            self.sq = None
        return self.tensor


def _state_tensor(state: dict[str, Any], key: str, like: torch.Tensor) -> torch.Tensor:
    t = state.get(key)
    if t is None:
        t = torch.zeros_like(like, memory_format=torch.preserve_format)
        state[key] = t
    return t


def decoupled_decay(hp: dict[str, Any]) -> float:
    """``lr * weight_decay`` for AdamW (applied to ``x`` through ``A``), else 0."""
    return float(hp["lr"]) * float(hp["weight_decay"]) if hp["variant"] == "adamw" else 0.0


@torch.no_grad()
def directions(params: Sequence[torch.Tensor], states: Sequence[dict[str, Any]], hp: dict[str, Any],
               step: int) -> list[Direction]:
    """Update the variant's state with ``p.grad`` and return each parameter's direction per unit lr.

    ``step`` is the 1-based step number (Adam's bias correction).
    """
    if hp["variant"] == "sgd":
        return _sgd(params, states, float(hp["momentum"]), bool(hp["nesterov"]), float(hp["weight_decay"]))
    return _adam(params, states, hp, step)


def _sgd(params: Sequence[torch.Tensor], states: Sequence[dict[str, Any]], m: float, nesterov: bool,
         wd: float) -> list[Direction]:
    grads = [p.grad for p in params]
    if not m:
        return [Direction(d) for d in (torch._foreach_add(grads, list(params), alpha=wd) if wd else grads)]
    # a zero first buffer gives buf = g on the first step, exactly torch.optim.SGD's clone of the gradient
    bufs = [_state_tensor(st, "momentum_buffer", p) for p, st in zip(params, states)]
    if params[0].device.type == "cpu":  # one pass per tensor beats two foreach passes on CPU
        for g, buf in zip(grads, bufs):
            torch.add(g, buf, alpha=m, out=buf)
    else:  # accelerators: two multi-tensor kernels beat one launch per tensor
        torch._foreach_mul_(bufs, m)
        torch._foreach_add_(bufs, grads)
    if wd:
        torch._foreach_add_(bufs, list(params), alpha=wd)
    if not nesterov:
        return [Direction(b) for b in bufs]
    d = torch._foreach_add(grads, bufs, alpha=m)
    if wd:
        torch._foreach_add_(d, list(params), alpha=wd)
    return [Direction(t) for t in d]


def _adam(params: Sequence[torch.Tensor], states: Sequence[dict[str, Any]], hp: dict[str, Any],
          step: int) -> list[Direction]:
    b1, b2 = (float(b) for b in hp["betas"])
    eps, wd = float(hp["eps"]), float(hp["weight_decay"])
    grads = [p.grad for p in params]
    if wd and hp["variant"] == "adam":
        grads = torch._foreach_add(grads, list(params), alpha=wd)
    exp_avg = [_state_tensor(st, "exp_avg", p) for p, st in zip(params, states)]
    exp_avg_sq = [_state_tensor(st, "exp_avg_sq", p) for p, st in zip(params, states)]
    torch._foreach_lerp_(exp_avg, grads, 1.0 - b1)
    torch._foreach_mul_(exp_avg_sq, b2)
    torch._foreach_addcmul_(exp_avg_sq, grads, grads, 1.0 - b2)
    scale, c2 = 1.0 / (1.0 - b1**step), math.sqrt(1.0 - b2**step)
    return [Direction(a, scale, sq, c2, eps) for a, sq in zip(exp_avg, exp_avg_sq)]


@dataclass
class UpdatePlan:
    """Which parameters take which update; built once per change of the redundant set.

    ``plain``: ``x <- a x - lr d`` with a scalar ``a``.  ``active``: parameters holding active
    redundant rows, ``x <- A x - lr C d`` with per-row ``A``, ``C``.  ``frozen``: parameters whose
    redundant rows are all zero already, ``x <- a x - lr C d`` (zero rows stay zero under a scalar
    ``a`` and ``C = 0``).  Indices refer to the step's parameter list.
    """

    plain: list[int]
    active: list[int]
    active_a: list[torch.Tensor]
    active_c: list[torch.Tensor]
    frozen: list[int]
    frozen_c: list[torch.Tensor]
    scratch: dict = field(default_factory=dict)  # (device, dtype) -> reused buffer for Adam denominators

    def scratch_like(self, t: torch.Tensor) -> torch.Tensor:
        """A reused buffer shaped like ``t`` (grown on demand; one per device and dtype)."""
        key = (t.device, t.dtype)
        buf = self.scratch.get(key)
        if buf is None or buf.numel() < t.numel():
            buf = torch.empty(t.numel(), dtype=t.dtype, device=t.device)
            self.scratch[key] = buf
        return buf[: t.numel()].view(t.shape)


@torch.no_grad()
def apply_update(params: Sequence[torch.Tensor], dirs: Sequence[Direction], plan: UpdatePlan, lr: float,
                 a_plain: float, rows_a: bool) -> None:
    """``x <- a * x - lr * c * d`` for every parameter, in a handful of foreach calls.

    Plain SGD parameters cost one ``add_`` per tensor, plain Adam ones one ``addcdiv_`` (as torch),
    parameters with redundant rows one ``addcmul_``; ``rows_a`` adds the per-row ``mul_`` on the
    parameters with active redundant rows (otherwise they take the scalar ``a_plain`` like the rest).
    """
    if not params:
        return
    scale = dirs[0].scale
    if plan.plain:
        ps = [params[i] for i in plan.plain]
        if a_plain != 1.0:
            torch._foreach_mul_(ps, a_plain)
        ds = [dirs[i] for i in plan.plain]
        if ds[0].sq is None:
            torch._foreach_add_(ps, [d.tensor for d in ds], alpha=-lr * scale)
        elif ps[0].device.type == "cpu":  # one reused buffer: no page faults from fresh allocations
            for p, d in zip(ps, ds):
                p.addcdiv_(d.tensor, d.denominator(out=plan.scratch_like(d.sq)), value=-lr * scale)
        else:
            dens = torch._foreach_sqrt([d.sq for d in ds])
            torch._foreach_div_(dens, ds[0].c2)
            torch._foreach_add_(dens, ds[0].eps)
            torch._foreach_addcdiv_(ps, [d.tensor for d in ds], dens, value=-lr * scale)
    for idx, a_rows, c_rows in ((plan.active, plan.active_a, plan.active_c), (plan.frozen, None, plan.frozen_c)):
        if not idx:
            continue
        ps = [params[i] for i in idx]
        if rows_a and a_rows is not None:
            torch._foreach_mul_(ps, a_rows)
        elif a_plain != 1.0:
            torch._foreach_mul_(ps, a_plain)
        if ps[0].device.type == "cpu":  # Adam: one reused buffer for the directions, as above
            for p, i, c in zip(ps, idx, c_rows):
                p.addcmul_(dirs[i].in_buffer(plan), c, value=-lr * scale)
        else:
            torch._foreach_addcmul_(ps, [dirs[i].materialize() for i in idx], c_rows, value=-lr * scale)
