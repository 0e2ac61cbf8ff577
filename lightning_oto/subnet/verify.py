"""The one place that decides whether a sub-network computes what the full model computes.

Tolerance: ``max|sub(x) - full(x)| <= atol + rtol * max|full(x)|``.  The relative part absorbs
float32 rounding on networks whose untrained outputs are huge (an untrained DARTS super-network
in eval mode reaches ~1e12); tests on small models hold the absolute part alone.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from ..errors import SubnetMismatchError
from ..graph.inputs import ModelInputs, call_model

DEFAULT_ATOL = 1e-4
DEFAULT_RTOL = 1e-5


def _set_mode(module: nn.Module, training: bool) -> None:
    try:
        module.train(training)
    except NotImplementedError:  # a torch.export program's module is fixed in the mode it was traced in
        pass


def tensor_leaves(out: Any) -> list[torch.Tensor]:
    """The tensors of a model output (tuple, dict, dataclass-like ModelOutput, ...), in pytree order."""
    if hasattr(out, "to_tuple") and callable(out.to_tuple):  # transformers' ModelOutput
        out = out.to_tuple()
    return [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]


@torch.no_grad()
def output_difference(full: nn.Module, sub: nn.Module, inputs: ModelInputs) -> tuple[float, float]:
    """(max |sub(x) - full(x)|, max |full(x)|) over every output tensor, both in eval mode (modes restored).

    A different number of outputs or a shape mismatch is an infinite difference.  NaN on both sides
    at the same place counts as equal (a model that already computes NaN is not the sub-network's fault).
    """
    modes = (full.training, sub.training)
    _set_mode(full, False)
    _set_mode(sub, False)
    try:
        a = tensor_leaves(call_model(full, inputs))
        b = tensor_leaves(call_model(sub, inputs))
    finally:
        _set_mode(full, modes[0])
        _set_mode(sub, modes[1])
    scale = 0.0
    for x in a:
        if x.numel() and x.is_floating_point():
            finite = x[torch.isfinite(x)]
            if finite.numel():
                scale = max(scale, float(finite.float().abs().max()))
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
        return float("inf"), scale
    err = 0.0
    for x, y in zip(a, b):
        if not x.numel():
            continue
        if not x.is_floating_point():
            err = max(err, 0.0 if torch.equal(x, y) else float("inf"))
            continue
        both_nan = torch.isnan(x) & torch.isnan(y)
        d = (x.double() - y.double()).abs().masked_fill(both_nan, 0.0)
        d = torch.where(torch.isinf(x) & (x == y), torch.zeros_like(d), d)
        err = max(err, float(d.max()))
    return err, scale


def allowed_error(scale: float, atol: float = DEFAULT_ATOL, rtol: float = DEFAULT_RTOL) -> float:
    return atol + rtol * scale


def check_outputs(full: nn.Module, sub: nn.Module, inputs: ModelInputs, atol: float = DEFAULT_ATOL,
                  rtol: float = DEFAULT_RTOL, context: str = "") -> float:
    """Raise :class:`SubnetMismatchError` unless ``sub`` matches ``full`` on ``inputs``; returns the error."""
    err, scale = output_difference(full, sub, inputs)
    allowed = allowed_error(scale, atol, rtol)
    if not err <= allowed:
        where = f" ({context})" if context else ""
        raise SubnetMismatchError(
            f"sub-network outputs differ from the full model by {err:.3g}{where} (outputs up to {scale:.3g}; "
            f"allowed atol + rtol x scale = {allowed:.3g}); this is a bug or an operator the engine mis-handles "
            "- please report it with the model.")
    return err


def check_plan_applied(after: dict[str, tuple[int, ...]], before: dict[str, tuple[int, ...]],
                       plan: dict[tuple[str, int], set[int]], what: str = "sub-network") -> None:
    """Every planned (tensor, dim) lost exactly its planned indices: what was zeroed is really gone."""
    from ..errors import IncompleteRemovalError

    wrong = [f"{name}[dim {dim}]: {after[name][dim]} != {before[name][dim]} - {len(idx)}"
             for (name, dim), idx in plan.items()
             if name in after and name in before and after[name][dim] != before[name][dim] - len(idx)]
    if wrong:
        raise IncompleteRemovalError(f"the {what} still holds zeroed entries: {'; '.join(wrong[:6])}. This is an "
                                     "engine bug - please report it with the model.")


__all__ = ["check_plan_applied", "DEFAULT_ATOL", "DEFAULT_RTOL", "output_difference", "allowed_error", "check_outputs", "tensor_leaves"]
