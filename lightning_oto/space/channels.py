"""Channels as union-find elements: the one home of the union-find and of component queries.

Prune mode gives every channel of every tracked tensor an *element*.  An element owns *variable
slots* (``(tensor name, dim, index)`` entries the optimizer pushes to zero, e.g. a conv's output
row) and *dependent slots* (entries that become dead when the element is zero, e.g. the next conv's
input column).  Operators couple elements by union; one removal structure is one component.  Erase
mode asks the same components which channel slices go along with a removed segment.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

from .groups import ParamSlice

Slot = tuple[str, int, int]  # (parameter or buffer name, dim, index)


class UnionFind:
    """Integer union-find with path halving; ``components()`` is cached until the next union."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self._components: dict[int, list[int]] | None = None

    def __len__(self) -> int:
        return len(self.parent)

    def add(self) -> int:
        self.parent.append(len(self.parent))
        self._components = None
        return len(self.parent) - 1

    def find(self, a: int) -> int:
        p = self.parent
        while p[a] != a:
            p[a] = p[p[a]]
            a = p[a]
        return a

    def union(self, a: int, b: int) -> int:
        """Join the sets of ``a`` and ``b``; the smaller root id stays the root (a stable order)."""
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        self._components = None
        if ra < rb:
            self.parent[rb] = ra
            return ra
        self.parent[ra] = rb
        return rb

    def components(self) -> dict[int, list[int]]:
        """Root -> members in increasing order, O(elements) once, then cached."""
        if self._components is None:
            comps: dict[int, list[int]] = {}
            for e in range(len(self.parent)):
                comps.setdefault(self.find(e), []).append(e)
            self._components = comps
        return self._components

    def members(self, a: int) -> list[int]:
        return self.components()[self.find(a)]


@dataclass
class TensorChannels:
    """Channel structure of one tensor: the element sitting at each index of dimension ``cdim``.

    ``zi[i]`` says whether channel ``i`` is exactly zero once its element's group is zero (it is not
    after ``sigmoid``, ``+ constant``, a norm without affine parameters, ...); ``taint`` is the first
    reason why some channel is not.
    """

    cdim: int
    elems: list[int]
    zi: list[bool]
    taint: str = ""

    def moved(self, cdim: int) -> "TensorChannels":
        """The same channels, now along dimension ``cdim``."""
        return TensorChannels(cdim, list(self.elems), list(self.zi), self.taint)

    def not_zero(self, why: str) -> "TensorChannels":
        """The same channels after an operator that maps zero to something else."""
        return TensorChannels(self.cdim, list(self.elems), [False] * len(self.elems), self.taint or why)


@dataclass(frozen=True)
class ParamRef:
    """A tensor that is a view of one parameter (or buffer): ``dims[d]`` is the parameter dimension
    found at tensor dimension ``d`` (None: a dimension the view inserted or broadcast)."""

    name: str
    dims: tuple[int | None, ...]
    buffer: bool = False


@dataclass
class ChannelElements:
    """All channel elements of one analysis with their slots, reasons and coupling."""

    uf: UnionFind = field(default_factory=UnionFind)
    reasons: dict[int, str] = field(default_factory=dict)
    vars: dict[int, list[Slot]] = field(default_factory=dict)
    deps: dict[int, list[Slot]] = field(default_factory=dict)
    via_rules: dict[int, set[str]] = field(default_factory=dict)   # user rules the element passed through
    claim_var: dict[Slot, int] = field(default_factory=dict)
    claim_dep: dict[Slot, int] = field(default_factory=dict)
    var_dim: dict[str, int] = field(default_factory=dict)
    by_tensor: dict[str, set[int]] = field(default_factory=dict)   # tensor name -> elements with slots in it

    def __len__(self) -> int:
        return len(self.uf)

    def new(self, reason: str | None = None) -> int:
        e = self.uf.add()
        if reason:
            self.reasons[e] = reason
        return e

    def union(self, a: int, b: int) -> None:
        self.uf.union(a, b)

    def union_all(self, elems: Iterable[int]) -> None:
        it = iter(elems)
        first = next(it, None)
        for e in it:
            self.uf.union(first, e)

    def mark(self, elems: Iterable[int], reason: str) -> None:
        """The groups of ``elems`` must be kept; the first reason given is the one reported."""
        for e in elems:
            self.reasons.setdefault(e, reason)

    def passed(self, elems: Iterable[int], rule: str) -> None:
        for e in elems:
            self.via_rules.setdefault(e, set()).add(rule)

    def add_var(self, e: int, name: str, dim: int, idx: int) -> None:
        """Entry ``idx`` of ``name`` along ``dim`` is zeroed with ``e`` (a second claimant is coupled)."""
        key = (name, dim, idx)
        if key in self.claim_var:
            self.uf.union(self.claim_var[key], e)
            return
        self.claim_var[key] = e
        if self.var_dim.setdefault(name, dim) != dim:
            self.mark([e], f"parameter {name} is sliced along two dimensions")
        self.vars.setdefault(e, []).append(key)
        self.by_tensor.setdefault(name, set()).add(e)

    def add_dep(self, e: int, name: str, dim: int, idx: int) -> None:
        """Entry ``idx`` of ``name`` along ``dim`` is removed (never zeroed) with ``e``."""
        key = (name, dim, idx)
        if key in self.claim_dep:
            self.uf.union(self.claim_dep[key], e)
            return
        self.claim_dep[key] = e
        self.deps.setdefault(e, []).append(key)
        self.by_tensor.setdefault(name, set()).add(e)

    def pin(self, name: str, dim: int, n: int, reason: str) -> None:
        """Entries 0..n-1 of ``name`` along ``dim`` must stay: whoever else claims them is kept."""
        for i in range(n):
            self.add_dep(self.new(reason), name, dim, i)

    # ------------------------------------------------------------------ component queries
    def component(self, e: int) -> list[int]:
        """Every element coupled with ``e`` (its removal structure)."""
        return self.uf.members(e)

    def root(self, e: int) -> int:
        return self.uf.find(e)

    def variables(self, e: int) -> list[Slot]:
        return self.vars.get(e, [])

    def dependents(self, e: int) -> list[Slot]:
        return self.deps.get(e, [])

    def reason(self, e: int) -> str | None:
        return self.reasons.get(e)


def merge_slots(slots: Iterable[Slot]) -> list[ParamSlice]:
    """(name, dim, index) entries -> one :class:`ParamSlice` per (name, dim) with sorted indices."""
    acc: dict[tuple[str, int], set[int]] = {}
    for name, dim, idx in slots:
        acc.setdefault((name, dim), set()).add(idx)
    return [ParamSlice(n, d, tuple(sorted(ix))) for (n, d), ix in sorted(acc.items())]


__all__ = ["UnionFind", "TensorChannels", "ParamRef", "ChannelElements", "Slot", "merge_slots"]
