"""Removal structures: the contract between the search space, the optimizers and construction.

A :class:`Group` owns a disjoint set of variables (``slices``): setting exactly those to zero
makes its structure contribute nothing.  Optimizers only ever see groups, never the graph.
``dependents`` are variables that become dead once the group is zero (a consumer's input
columns) — construction removes them, the optimizer leaves them alone.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch


@dataclass(frozen=True)
class ParamSlice:
    """Entries ``indices`` of parameter ``name`` along ``dim`` (``indices=None``: the whole tensor)."""

    name: str
    dim: int = 0
    indices: tuple[int, ...] | None = None

    def numel(self, shape: Sequence[int]) -> int:
        if self.indices is None:
            n = 1
            for s in shape:
                n *= s
            return n
        other = 1
        for d, s in enumerate(shape):
            if d != self.dim:
                other *= s
        return other * len(self.indices)


@dataclass
class Group:
    """One removal structure (a ZIG in prune mode, a GeZIG in erase mode)."""

    id: int
    name: str
    slices: list[ParamSlice]
    dependents: list[ParamSlice] = field(default_factory=list)
    prunable: bool = True
    reason: str | None = None  # why not prunable/erasable
    # erase mode: the segment-graph vertex this group removes
    vertex: int | None = None

    def param_names(self) -> list[str]:
        return sorted({s.name for s in self.slices})

    def __str__(self) -> str:
        """A readable table: what the group zeroes, what construction removes with it, and its status."""
        status = "removable" if self.prunable else f"kept: {self.reason}"
        lines = [f"Group {self.id} {self.name!r} ({status})"]
        for kind, slices in (("zeroes", self.slices), ("removes", self.dependents)):
            for s in slices:
                where = "whole tensor" if s.indices is None else f"dim {s.dim}, indices {_ranges(s.indices)}"
                lines.append(f"  {kind:<8} {s.name:<40} {where}")
        return "\n".join(lines)


def _ranges(indices: Sequence[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5' (channel lists stay one line)."""
    out: list[str] = []
    start = prev = None
    for i in sorted(indices):
        if start is None:
            start = prev = i
        elif i == prev + 1:
            prev = i
        else:
            out.append(f"{start}-{prev}" if prev != start else f"{start}")
            start = prev = i
    if start is not None:
        out.append(f"{start}-{prev}" if prev != start else f"{start}")
    return ", ".join(out)


def group_values(group: Group, params: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """The group's variables as a list of tensors (views where possible)."""
    out = []
    for s in group.slices:
        p = params[s.name]
        if s.indices is None:
            out.append(p.reshape(-1))
        else:
            idx = torch.as_tensor(s.indices, device=p.device)
            out.append(p.index_select(s.dim, idx).reshape(-1))
    return out


@torch.no_grad()
def group_norm(group: Group, params: dict[str, torch.Tensor]) -> float:
    vals = group_values(group, params)
    if not vals:
        return 0.0
    return float(torch.sqrt(sum((v.double() ** 2).sum() for v in vals)))


@torch.no_grad()
def group_is_zero(group: Group, params: dict[str, torch.Tensor]) -> bool:
    """Every variable of the group is exactly zero (no norm computed: one pass, no float64 copies)."""
    for s in group.slices:
        p = params[s.name]
        if s.indices is not None:
            p = p.index_select(s.dim, torch.as_tensor(s.indices, device=p.device))
        if bool(p.any()):
            return False
    return True


@torch.no_grad()
def zero_group(group: Group, params: dict[str, torch.Tensor]) -> None:
    for s in group.slices:
        p = params[s.name]
        if s.indices is None:
            p.zero_()
        else:
            idx = torch.as_tensor(s.indices, device=p.device)
            p.index_fill_(s.dim, idx, 0.0)
