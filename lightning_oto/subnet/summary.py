"""``oto.summary()``: per module, what a set of zero groups removes and why the rest stays."""
from __future__ import annotations

import re
from collections import Counter
from typing import Sequence

from torch import nn

from ..space.groups import Group
from .plan import plan_keeping_one


def _module_of(param: str) -> str:
    return param.rpartition(".")[0] or "(model)"


def _kept_reasons(groups: Sequence[Group]) -> dict[str, Counter]:
    why: dict[str, Counter] = {}
    for g in groups:
        if not g.prunable and g.reason:
            for m in {_module_of(s.name) for s in g.slices}:
                why.setdefault(m, Counter())[g.reason] += 1
    return why


def prune_summary(model: nn.Module, groups: Sequence[Group], zero_ids: Sequence[int]) -> list[dict]:
    """One row per module that owns output channels: channels before -> after, and why groups were kept."""
    params = dict(model.named_parameters())
    shapes = {n: tuple(p.shape) for n, p in params.items()} | {n: tuple(b.shape) for n, b in model.named_buffers()}
    plan, _ = plan_keeping_one([groups[i] for i in zero_ids], shapes)
    owners: dict[str, str] = {}  # module -> its weight, sliced along the channel (output) dim
    for g in groups:
        for s in g.slices:
            if s.indices is not None and s.name.endswith("weight"):
                owners.setdefault(_module_of(s.name), s.name)
    why = _kept_reasons(groups)
    modules = dict(model.named_modules())
    rows = []
    for mod, weight in owners.items():
        dim = next(s.dim for g in groups for s in g.slices if s.name == weight and s.indices is not None)
        before = shapes[weight][dim]
        after = before - len(plan.get((weight, dim), ()))
        reasons = why.get(mod, Counter())
        rows.append({"module": mod, "type": type(modules.get(mod)).__name__ if mod in modules else "",
                     "before": before, "after": after,
                     "kept_because": "; ".join(f"{n} x {r}" for r, n in reasons.most_common(2))})
    return rows


def erase_summary(groups: Sequence[Group], zero_ids: Sequence[int]) -> list[dict]:
    """One row per removal structure: erased or kept, and why."""
    zero = set(zero_ids)
    return [{"module": g.name, "type": "operator", "before": 1, "after": 0 if g.id in zero else 1,
             "kept_because": "" if g.id in zero else (g.reason or "not selected")} for g in groups]


#: the module column's widest width; longer names wrap (after a "." where they can), never lose a part
NAME_WIDTH = 48
#: continuation lines of a wrapped name start with this
WRAP_INDENT = "  "


def wrap_name(name: str, width: int) -> list[str]:
    """``name`` in lines of at most ``width`` characters, broken after "." (else "+" or ","), the later
    lines indented by :data:`WRAP_INDENT`; joining the lines without the indent gives ``name`` back."""
    pieces = re.findall(r"[^.+,]*[.+,]|[^.+,]+$", name) or [name]
    lines: list[str] = []
    current = ""
    for piece in pieces:
        room = width - (len(WRAP_INDENT) if lines else 0)
        if current and len(current) + len(piece) > room:
            lines.append(current)
            current = ""
            room = width - len(WRAP_INDENT)
        while len(current) + len(piece) > room:  # one piece longer than a line: cut it
            cut = room - len(current)
            lines.append(current + piece[:cut])
            current, piece, room = "", piece[cut:], width - len(WRAP_INDENT)
        current += piece
    lines.append(current)
    return [line if i == 0 else WRAP_INDENT + line for i, line in enumerate(lines)]


def format_summary(rows: Sequence[dict], unit: str) -> str:
    """A plain-text table (module, type, before -> after, removed %, why kept); long module names wrap."""
    if not rows:
        return f"(no {unit} to remove)"
    width = min(NAME_WIDTH, max(len(r["module"]) for r in rows))
    lines = [f"{'module':<{width}}  {'type':<14} {unit:>13}  {'removed':>7}  kept because"]
    for r in rows:
        frac = 1 - r["after"] / r["before"] if r["before"] else 0.0
        first, *rest = wrap_name(r["module"], width)
        lines.append(f"{first:<{width}}  {r['type'][:14]:<14} {r['before']:>6} -> {r['after']:<4}  {frac:>6.0%}  "
                     f"{r['kept_because']}")
        lines.extend(rest)
    total_b = sum(r["before"] for r in rows)
    total_a = sum(r["after"] for r in rows)
    lines.append(f"{'total':<{width}}  {'':<14} {total_b:>6} -> {total_a:<4}  {1 - total_a / max(1, total_b):>6.0%}")
    return "\n".join(lines)


__all__ = ["erase_summary", "format_summary", "prune_summary", "wrap_name"]
