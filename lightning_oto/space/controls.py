"""The controls pruning users expect, applied to a search space as plain data.

- ``ignored_layers``: modules (instances or name patterns) whose variables must stay; every group
  holding one of their variables is kept (Torch-Pruning's ``ignored_layers``).
- ``max_group_sparsity``: ``{module or pattern: cap}``: at most ``floor(cap * n)`` of the ``n`` groups
  holding variables of that module may be removed (a ceiling, unlike a per-layer target).
- ``round_to=N`` (prune mode): the channel groups of one layer are bundled N at a time, so every
  removal takes a multiple of N channels and kept widths stay hardware-friendly; the remainder of
  a width that is not a multiple of N is kept.
"""
from __future__ import annotations

import fnmatch
import math
from dataclasses import replace
from typing import Any, Callable, Iterable, Mapping, Sequence

from torch import nn

from ..errors import ConfigError
from .groups import Group, ParamSlice


def module_names(model: nn.Module, spec: Iterable[Any], what: str) -> list[str]:
    """Module paths named by ``spec`` (module instances, exact names or fnmatch patterns); errors if one matches none."""
    by_id = {id(m): n for n, m in model.named_modules()}
    names = [n for n, _ in model.named_modules() if n]
    out: list[str] = []
    for item in spec:
        if isinstance(item, nn.Module):
            if id(item) not in by_id:
                raise ValueError(f"{what}: {type(item).__name__} instance is not a submodule of the model.")
            out.append(by_id[id(item)])
        elif isinstance(item, str):
            hits = [n for n in names if n == item or fnmatch.fnmatchcase(n, item)]
            if not hits:
                close = [n for n in names if item.split(".")[-1] in n][:5]
                hint = f" (did you mean {', '.join(close)}?)" if close else ""
                raise ConfigError(f"{what}: no module of the model is called {item!r}{hint}.")
            out += hits
        else:
            raise TypeError(f"{what} takes modules or module-name patterns, got {type(item).__name__}.")
    return out


def _owner_module(param: str) -> str:
    return param.rpartition(".")[0]


def _touches(group: Group, module: str) -> bool:
    return any(_owner_module(s.name) == module or s.name.startswith(module + ".") for s in group.slices)


def apply_ignored(groups: Sequence[Group], modules: Sequence[str]) -> None:
    """Keep every group that holds a variable of an ignored module (the reason names the module)."""
    for g in groups:
        if not g.prunable:
            continue
        hit = next((m for m in modules if _touches(g, m)), None)
        if hit is not None:
            g.prunable = False
            g.reason = f"{hit or 'the model'} is in ignored_layers"


def cap_filter(model: nn.Module, groups: Sequence[Group],
               caps: Mapping[Any, float]) -> Callable[[frozenset[int], int], bool] | None:
    """``candidate_filter(accepted, candidate)``: False when taking ``candidate`` would exceed a module's cap."""
    if not caps:
        return None
    limits: list[tuple[set[int], int]] = []
    for key, cap in caps.items():
        if not isinstance(cap, (int, float)) or not 0.0 <= float(cap) <= 1.0:
            raise ConfigError(f"max_group_sparsity[{key!r}] must be a number in [0, 1], got {cap!r}.")
        for name in module_names(model, [key], "max_group_sparsity"):
            members = {g.id for g in groups if g.prunable and _touches(g, name)}
            if members:
                limits.append((members, math.floor(float(cap) * len(members) + 1e-9)))

    def allowed(accepted: frozenset[int], candidate: int) -> bool:
        return all(len(members & accepted) < limit for members, limit in limits if candidate in members)

    return allowed


def bundle(groups: Sequence[Group], round_to: int) -> list[Group]:
    """Merge the prunable channel groups of each layer N at a time (see the module docstring)."""
    if round_to < 1 or int(round_to) != round_to:
        raise ValueError(f"round_to must be an integer >= 1, got {round_to!r}.")
    if round_to == 1:
        return list(groups)
    layers: dict[tuple, list[Group]] = {}
    out: list[Group] = []
    for g in groups:
        if g.prunable and all(s.indices is not None for s in list(g.slices) + list(g.dependents)):
            layers.setdefault(tuple(sorted((s.name, s.dim) for s in g.slices)), []).append(g)
        else:
            out.append(g)
    for members in layers.values():
        members.sort(key=lambda g: min(g.slices[0].indices))
        full = len(members) - len(members) % round_to
        for i in range(0, full, round_to):
            out.append(_merge(members[i:i + round_to]))
        for g in members[full:]:
            out.append(replace(g, prunable=False, reason=f"round_to={round_to}: the layer's {len(members)} channels "
                                                          f"leave {len(members) - full} over"))
    out.sort(key=lambda g: g.id)
    return [replace(g, id=i) for i, g in enumerate(out)]


def _merge(members: Sequence[Group]) -> Group:
    def union(slices: Iterable[ParamSlice]) -> list[ParamSlice]:
        acc: dict[tuple[str, int], set[int]] = {}
        for s in slices:
            acc.setdefault((s.name, s.dim), set()).update(s.indices or ())
        return [ParamSlice(n, d, tuple(sorted(ix))) for (n, d), ix in sorted(acc.items())]

    first = members[0]
    return replace(first, name=f"{first.name}(x{len(members)})",
                   slices=union(s for g in members for s in g.slices),
                   dependents=union(s for g in members for s in g.dependents))


__all__ = ["module_names", "apply_ignored", "cap_filter", "bundle"]
