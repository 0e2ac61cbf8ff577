"""Removal plan: which indices of which tensors a set of zero groups deletes, along which dimension."""
from __future__ import annotations

from typing import Iterable, Sequence

from ..space.groups import Group

Plan = dict[tuple[str, int], set[int]]


def removal_plan(groups: Iterable[Group], shapes: dict[str, tuple[int, ...]] | None = None) -> Plan:
    """(tensor name, dim) -> indices to delete: the groups' sliced variables and dependents.

    Whole-tensor slices (``indices=None``) are not in the plan: erase mode drops those tensors with
    the operators that read them.  With ``shapes``, names that are not in it are left out.
    """
    plan: Plan = {}
    for g in groups:
        for s in list(g.slices) + list(g.dependents):
            if s.indices is None or (shapes is not None and s.name not in shapes):
                continue
            plan.setdefault((s.name, s.dim), set()).update(s.indices)
    return plan


def plan_keeping_one(groups: Sequence[Group], shapes: dict[str, tuple[int, ...]]) -> tuple[Plan, list[Group]]:
    """The removal plan of ``groups``, minus the few groups needed so no tensor loses every index.

    A tensor that would lose all its channels keeps one zero group instead: exact (its entries are
    zero) and no zero-size tensors.  Returns (plan, groups actually removed).
    """
    chosen = list(groups)
    while True:
        plan = removal_plan(chosen, shapes)
        emptied = {key for key, idx in plan.items() if len(idx) >= shapes[key[0]][key[1]]}
        if not emptied:
            return plan, chosen
        keep = next(g for g in chosen if any((s.name, s.dim) in emptied for s in g.slices + g.dependents))
        chosen = [g for g in chosen if g is not keep]


__all__ = ["Plan", "removal_plan", "plan_keeping_one"]
