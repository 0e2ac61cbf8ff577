"""Graphviz drawings of an :class:`~lightning_oto.OTO`: trace graph, search space, redundant set, sub-network.

``visualize(oto, out_dir)`` writes, per drawing, ``<name>.dot`` (always) and ``<name>.svg`` /
``<name>.pdf`` (when the Graphviz ``dot`` program is installed), and returns ``{key: path}``.

Machine-readable marks (in the .dot source and, through Graphviz's ``class`` attribute, in the SVG):

* erase mode: one node per GeZIG with ``id="group_<id>"`` and ``class`` tokens ``groups g-<id>``;
  prune mode: an operator owning variables of channel groups has the token ``groups`` and lists
  the group ids (as ranges) in its tooltip;
* in the ``redundant`` drawing a node owning zero groups also has the token ``redundant`` and
  ``zg-<id>`` for each zero group id.

An operator's kind (stem / joint / accessory / shape / unknown) is the rule registry's
(:mod:`lightning_oto.space.rules`), the same knowledge prune and erase analysis use.
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Protocol, Sequence

import torch
from torch import nn

from ..graph.inputs import input_tensors
from ..graph.trace import OpGraph, op_name
from ..space.channels import UnionFind
from ..space.rules import canonical_op, kind_of, rule_for
from .dot import PALETTE, Dot, legend_table, render


class Drawable(Protocol):
    """What the drawings read from an :class:`~lightning_oto.OTO` (no import of it: the facade sits above)."""

    model: nn.Module
    mode: str
    graph: OpGraph
    groups: list
    example_inputs: tuple
    segment_graph: Any

    def zero_group_ids(self) -> list[int]: ...


log = logging.getLogger("lightning_oto")

DRAWINGS = ("trace", "space", "redundant", "subnet")

KIND_COLORS = {
    "input": "#ffffff", "output": "#ffffff", "stem": "#9ecae1", "joint": "#fdae6b",
    "accessory": "#c7e9c0", "shape": "#eeeeee", "unknown": "#fb9a99",
}
KIND_SHAPES = {"input": "oval", "output": "oval", "joint": "ellipse"}
GREY = "#e0e0e0"
RED = "#e31a1c"
ZERO_FILL = "#fb6a4a"


# --------------------------------------------------------------------------- plain node list
@dataclass
class VNode:
    """One operator, independent of where it came from (OpGraph or torch.fx GraphModule)."""

    key: str
    op: str
    kind: str
    module: str = ""
    shape: tuple[int, ...] | None = None
    inputs: list[str] = field(default_factory=list)
    params: list[str] = field(default_factory=list)


def nodes_from_opgraph(graph: OpGraph) -> list[VNode]:
    out = []
    for n in graph.nodes:
        kind = n.kind if n.kind in ("input", "output") else kind_of(n.fx_node.target)
        out.append(VNode(f"n{n.id}", n.op, kind, n.module, n.shape, [f"n{i}" for i in n.inputs], list(n.params)))
    return out


def _fx_module_path(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    if "]" in path and "self" in path:
        path = path.split("]", 1)[-1].lstrip(".")
    return path if isinstance(path, str) else ""


@torch.no_grad()
def fx_shapes(gm: torch.fx.GraphModule, inputs: Sequence[Any]) -> dict[str, tuple[int, ...]]:
    """Output shape of every fx node, by running ``gm`` once on ``inputs`` (eval mode, restored after).

    Surgery leaves stale shapes in ``node.meta`` (a concat that lost an input); this measures them.
    Nothing is written to the graph or the module.
    """
    shapes: dict[str, tuple[int, ...]] = {}

    class _Rec(torch.fx.Interpreter):
        def run_node(self, n: torch.fx.Node) -> Any:
            res = super().run_node(n)
            if isinstance(res, torch.Tensor):
                shapes[n.name] = tuple(res.shape)
            return res

    was = gm.training
    gm.eval()
    try:
        _Rec(gm).run(*input_tensors(inputs))  # the placeholders are the flattened inputs (keywords too)
    except Exception as e:  # noqa: BLE001 - drawing falls back to the traced shapes
        log.info("lightning_oto.viz: could not re-measure sub-network shapes (%s); using traced ones", e)
    finally:
        gm.train(was)
    return shapes


def nodes_from_fx(gm: torch.fx.GraphModule, inputs: Sequence[Any] | None = None) -> list[VNode]:
    """Operators of an fx GraphModule: placeholders, calls and the output (get_attr folded into params).

    With ``inputs`` the shapes are measured by running the module; otherwise they come from ``node.meta``.
    """
    measured = fx_shapes(gm, inputs) if inputs is not None else {}
    out: list[VNode] = []
    keys: dict[torch.fx.Node, str] = {}
    attrs: dict[torch.fx.Node, str] = {}
    modules = dict(gm.named_modules())
    for i, node in enumerate(gm.graph.nodes):
        if node.op == "get_attr":
            attrs[node] = str(node.target)
            continue
        if node.op != "output" and not node.users:
            continue  # dead side effects (shape guards, asserts)
        if node.op == "placeholder":
            op, kind = "input", "input"
        elif node.op == "output":
            op, kind = "output", "output"
        elif node.op == "call_module":
            mod = modules.get(str(node.target))
            typ = type(mod).__name__ if mod is not None else str(node.target)
            op = "batch_norm" if "BatchNorm" in typ else typ.lower()
            kind = kind_of(op)
        else:
            op = op_name(node.target)
            kind = kind_of(node.target)
        params: list[str] = []
        inputs: list[str] = []
        for a in node.all_input_nodes:
            if a in attrs:
                params.append(attrs[a])
            elif a in keys:
                inputs.append(keys[a])
        if node.op == "call_module":
            params += [f"{node.target}.{p}" for p, _ in modules[str(node.target)].named_parameters()] \
                if str(node.target) in modules else []
        val = node.meta.get("val")
        shape = measured.get(node.name) or (tuple(val.shape) if isinstance(val, torch.Tensor) else None)
        key = f"f{i}"
        keys[node] = key
        out.append(VNode(key, op, kind, _fx_module_path(node), shape, inputs, params))
    return out


# --------------------------------------------------------------------------- small helpers
def _shape(shape: Sequence[int] | None) -> str:
    if shape is None:
        return ""
    return "×".join(map(str, shape)) or "scalar"


def _ranges(ids: Iterable[int]) -> str:
    """[1,2,3,7,9,10] -> '1-3,7,9-10'."""
    xs = sorted(set(ids))
    parts: list[str] = []
    i = 0
    while i < len(xs):
        j = i
        while j + 1 < len(xs) and xs[j + 1] == xs[j] + 1:
            j += 1
        parts.append(str(xs[i]) if i == j else f"{xs[i]}-{xs[j]}")
        i = j + 1
    return ",".join(parts)


def _short(text: str, n: int = 44) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 1] + "…"


def _few(items: Sequence[str], n: int = 4) -> str:
    return ", ".join(items[:n]) + (f" (+{len(items) - n} more)" if len(items) > n else "")


def _module_of_param(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else ""


def _classes(*tokens: str) -> str | None:
    toks = [t for t in tokens if t]
    return " ".join(toks) if toks else None


def _base_label(v: VNode, with_module: bool = True) -> list[str]:
    lines = [v.op if not with_module or not v.module else f"{v.op} · {v.module}"]
    s = _shape(v.shape)
    if s and v.kind != "output":
        lines.append(s)
    return lines


def _new_dot(name: str, cluster_depth: int, n_nodes: int) -> Dot:
    graph: dict[str, object] = {"labelloc": "t"}
    if n_nodes > 400:
        # straight segments lay out much faster on very large graphs and stay legible
        graph.update({"splines": "line", "ranksep": "0.22", "nodesep": "0.12"})
    return Dot(name, graph=graph, cluster_depth=cluster_depth)


def _kind_legend(nodes: Sequence[VNode]) -> list[tuple[str, str, str]]:
    present = {v.kind for v in nodes}
    return [(k, KIND_COLORS[k], "") for k in ("stem", "joint", "accessory", "shape", "unknown") if k in present]


# --------------------------------------------------------------------------- trace
def trace_dot(nodes: Sequence[VNode], title: str, cluster_depth: int = 3,
              extra: dict[str, dict[str, Any]] | None = None, subtitle: str = "") -> Dot:
    """Operator graph coloured by kind; ``extra[key]`` may add label lines (``lines``) and attributes."""
    d = _new_dot(title, cluster_depth, len(nodes))
    d.graph_attrs["label"] = legend_table(title, _kind_legend(nodes), subtitle)
    for v in nodes:
        attrs: dict[str, Any] = {"fillcolor": KIND_COLORS.get(v.kind, "#ffffff"), "shape": KIND_SHAPES.get(v.kind)}
        lines = _base_label(v)
        tip = [f"{v.op} ({v.kind})", f"module: {v.module or '(forward)'}", f"shape: {_shape(v.shape) or '-'}"]
        if v.params:
            tip.append("params: " + ", ".join(v.params[:8]) + (" …" if len(v.params) > 8 else ""))
        ex = (extra or {}).get(v.key)
        if ex:
            lines += ex.get("lines", [])
            tip += ex.get("tip", [])
            attrs.update(ex.get("attrs", {}))
        if v.kind in ("input", "output"):
            attrs["style"] = "bold"
        attrs["label"] = "\n".join(lines)
        attrs["tooltip"] = "\n".join(tip)
        d.node(v.key, v.module, **attrs)
    for v in nodes:
        for i in v.inputs:
            d.edge(i, v.key)
    return d


# --------------------------------------------------------------------------- prune-mode space
@dataclass
class _CoupledSets:
    """Layers linked by shared channel groups, numbered S1, S2, ... in the order their first operator runs."""

    owner: dict[str, set[int]] = field(default_factory=dict)    # param -> groups owning some of its entries
    reader: dict[str, set[int]] = field(default_factory=dict)   # param -> groups whose channels it reads
    group_set: dict[int, int] = field(default_factory=dict)     # group id -> set number
    set_groups: dict[int, list[int]] = field(default_factory=dict)
    set_members: dict[int, list[str]] = field(default_factory=dict)


def _coupled_sets(groups: Sequence[Any], nodes: Sequence[VNode]) -> _CoupledSets:
    cs = _CoupledSets()
    uf, module_ids = UnionFind(), {}

    def mid(param: str) -> int:
        module = _module_of_param(param) or param
        if module not in module_ids:
            module_ids[module] = uf.add()
        return module_ids[module]

    for g in groups:
        mods = [mid(s.name) for s in g.slices]
        for s in g.slices:
            cs.owner.setdefault(s.name, set()).add(g.id)
        for m in mods[1:]:
            uf.union(mods[0], m)
        for s in g.dependents:
            cs.reader.setdefault(s.name, set()).add(g.id)
    set_index: dict[int, int] = {}
    for p in (p for v in nodes for p in v.params if p in cs.owner):
        set_index.setdefault(uf.find(mid(p)), len(set_index) + 1)
    for g in groups:
        if g.slices:
            k = set_index.setdefault(uf.find(mid(g.slices[0].name)), len(set_index) + 1)
            cs.group_set[g.id] = k
            cs.set_groups.setdefault(k, []).append(g.id)
    for m, i in module_ids.items():
        k = set_index.get(uf.find(i))
        if k is not None:
            cs.set_members.setdefault(k, []).append(m)
    return cs


def _owner_marks(gids: list[int], groups: Sequence[Any], cs: _CoupledSets, zero: set[int] | None,
                 lines: list[str], tip: list[str], attrs: dict[str, Any]) -> None:
    """Label, tooltip and colour of an operator owning variables of groups ``gids``."""
    sets = sorted({cs.group_set[g] for g in gids})
    pr = [g for g in gids if groups[g].prunable]
    lines.append(f"{'S' + ','.join(map(str, sets))}: {len(gids)} groups / {len(pr)} prunable")
    tip.append(f"coupled set(s) {', '.join('S%d' % s for s in sets)}: "
               + "; ".join(_few(sorted(cs.set_members.get(s, []))) for s in sets))
    tip.append(f"owns variables of groups {_ranges(gids)} ({len(pr)} prunable)")
    reasons = sorted({groups[g].reason for g in gids if not groups[g].prunable and groups[g].reason})
    if not pr:
        attrs.update(fillcolor=GREY, style="rounded,filled,dashed", color="#757575", fontcolor="#424242")
        lines.append("unprunable: " + _short(reasons[0] if reasons else "unknown", 40))
    else:
        attrs["fillcolor"] = PALETTE[(sets[0] - 1) % len(PALETTE)]
        if len(pr) < len(gids):
            lines.append(f"{len(gids) - len(pr)} unprunable")
    if reasons:
        tip.append("unprunable because: " + "; ".join(reasons))
    cls = ["groups"]
    zs = [g for g in gids if zero is not None and g in zero]
    if zs:
        cls += ["redundant"] + [f"zg-{g}" for g in zs]
        lines.append(f"ZERO {len(zs)}/{len(gids)}")
        tip.append(f"redundant (zero) groups: {_ranges(zs)}")
        if len(zs) == len(gids):
            attrs.update(fillcolor=ZERO_FILL, color=RED, penwidth="2")
        else:
            attrs.update(color=RED, penwidth="2.5")
    attrs["class"] = _classes(*cls)


def prune_space_dot(oto: "Drawable", zero: set[int] | None, cluster_depth: int = 3) -> Dot:
    """Operators coloured per coupled set of layers (modules linked by shared channel groups)."""
    groups = oto.groups
    nodes = nodes_from_opgraph(oto.graph)
    cs = _coupled_sets(groups, nodes)
    drawn: set[int] = set()
    extra: dict[str, dict[str, Any]] = {}
    for v in nodes:
        gids = sorted(set().union(*[cs.owner.get(p, set()) for p in v.params])) if v.params else []
        reads = sorted(set().union(*[cs.reader.get(p, set()) for p in v.params])) if v.params else []
        if not gids and not reads:
            if v.kind not in ("input", "output"):
                extra[v.key] = {"attrs": {"fillcolor": "white", "color": "#9e9e9e", "fontcolor": "#424242"}}
            continue
        lines: list[str] = []
        tip: list[str] = []
        attrs: dict[str, Any] = {}
        if gids:
            drawn.update(gids)
            _owner_marks(gids, groups, cs, zero, lines, tip, attrs)
        read_sets = sorted({cs.group_set[g] for g in reads if g in cs.group_set})
        if read_sets:
            lines.append("in ← " + ",".join(f"S{s}" for s in read_sets))
            tip.append(f"its input columns follow groups {_ranges(reads)}")
            if not gids:
                attrs.setdefault("fillcolor", "white")
        extra[v.key] = {"lines": lines, "tip": tip, "attrs": attrs}
    title, label = _prune_legend(oto, cs, zero)
    d = trace_dot(nodes, title, cluster_depth, extra)
    d.graph_attrs["label"] = label
    _add_undrawn(d, [g for g in groups if g.id not in drawn], zero)
    return d


def _prune_legend(oto: "Drawable", cs: _CoupledSets, zero: set[int] | None) -> tuple[str, Any]:
    groups = oto.groups
    prunable = sum(g.prunable for g in groups)
    title = f"{type(oto.model).__name__} · prune-mode search space"
    sub = (f"{len(groups)} channel groups ({prunable} prunable) in {len(cs.set_groups)} coupled sets of layers "
           "(colour = coupled set, Sk: groups / prunable owned by the operator; grey dashed = unprunable)")
    legend = [(f"S{k}", PALETTE[(k - 1) % len(PALETTE)], "") for k in sorted(cs.set_groups)
              if any(groups[g].prunable for g in cs.set_groups[k])]
    if len(legend) > 8:
        legend = [("coupled set Sk (one colour each)", PALETTE[0], "")]
    legend.append(("unprunable", GREY, "dashed"))
    if zero is not None:
        title = f"{type(oto.model).__name__} · redundant channel groups"
        sub = f"{len(zero)} of {prunable} prunable groups are zero (red border: some, red fill: all of a layer's)"
        legend.append(("ZERO", ZERO_FILL, ""))
    return title, legend_table(title, legend, sub)


def _add_undrawn(d: Dot, groups: list, zero: set[int] | None) -> None:
    """Groups owning no variable of a drawn operator (should not happen) still appear, in one note node."""
    if not groups:
        return
    ids = [g.id for g in groups]
    cls = ["groups"] + [f"g-{g}" for g in ids]
    zs = [g for g in ids if zero is not None and g in zero]
    if zs:
        cls += ["redundant"] + [f"zg-{g}" for g in zs]
    d.node("undrawn_groups", "", shape="note", fillcolor="#fff7bc",
           label=f"{len(ids)} groups outside the drawn operators" + (f"\nZERO {_ranges(zs)}" if zs else ""),
           tooltip="groups " + _ranges(ids), **{"class": _classes(*cls)})


# --------------------------------------------------------------------------- erase-mode space
def _common_prefix(paths: Iterable[str]) -> str:
    parts = [p.split(".") for p in paths if p]
    if not parts:
        return ""
    pre = parts[0]
    for p in parts[1:]:
        n = 0
        while n < min(len(pre), len(p)) and pre[n] == p[n]:
            n += 1
        pre = pre[:n]
    return ".".join(pre)


def _chain_text(ops: list[str], per_line: int = 3, limit: int = 9) -> list[str]:
    # collapse runs (conv2d, conv2d) -> conv2d×2 to keep long DARTS-style chains short
    runs: list[tuple[str, int]] = []
    for o in ops:
        if runs and runs[-1][0] == o:
            runs[-1] = (o, runs[-1][1] + 1)
        else:
            runs.append((o, 1))
    toks = [o if c == 1 else f"{o}×{c}" for o, c in runs]
    if len(toks) > limit:
        toks = toks[: limit - 1] + [f"… +{len(toks) - limit + 1}"]
    return [" → ".join(toks[i: i + per_line]) for i in range(0, len(toks), per_line)]


def _segment_lines(kind: str, ops: list, module: str, attrs: dict[str, Any]) -> list[str]:
    """Label lines of one segment: its boundary name, its joint op, or its chain of operators."""
    last = ops[-1]
    if kind in ("input", "output"):
        attrs.update(shape="oval", style="bold")
        return [kind, ""] if kind == "output" else [f"input {last.name}", _shape(last.shape)]
    if kind == "joint":
        attrs.update(shape="ellipse", fillcolor=KIND_COLORS["joint"], fontsize="8")
        return [last.op, _shape(last.shape)]
    lines = _chain_text([n.op for n in ops])
    mods = list(dict.fromkeys(n.module for n in ops if n.module))
    if module:
        lines.append(module)
    elif mods:
        lines.append(_few(mods, 3))
    if last.shape is not None:
        lines.append(_shape(last.shape))
    return lines


def _gezig_marks(grp: Any, zero: set[int] | None, lines: list[str], tip: list[str],
                 attrs: dict[str, Any]) -> list[str]:
    """Colour, label and class tokens of a segment that is a GeZIG; returns the class tokens."""
    lines.insert(0, f"G{grp.id}")
    tip.append(f"GeZIG {grp.id}: {grp.name} ({len(grp.slices)} variable slices"
               + (f", {len(grp.dependents)} dependent slices" if grp.dependents else "") + ")")
    cls = ["groups", f"g-{grp.id}"]
    attrs["id"] = f"group_{grp.id}"
    if grp.prunable:
        attrs["fillcolor"] = PALETTE[grp.id % len(PALETTE)]
    else:
        attrs.update(fillcolor=GREY, style="rounded,filled,dashed", color="#757575", fontcolor="#424242")
        lines.append("not erasable: " + _short(grp.reason or "unknown", 38))
        tip.append("not erasable because " + (grp.reason or "unknown"))
    if zero is not None and grp.id in zero:
        cls += ["redundant", f"zg-{grp.id}"]
        attrs.update(fillcolor=ZERO_FILL, color=RED, penwidth="2.5")
        lines[0] += " · ZERO"
        tip.append("redundant: all its variables are zero; erased in the sub-network")
    return cls


def erase_space_dot(oto: "Drawable", zero: set[int] | None, cluster_depth: int = 3) -> Dot:
    """Segment graph: one node per segment listing its operators, coloured per GeZIG."""
    sg = oto.segment_graph
    g = oto.graph
    by_vertex = {grp.vertex: grp for grp in oto.groups if grp.vertex is not None}
    dead: set[int] = set()
    if zero:
        dead = sg.dead_set({oto.groups[i].vertex for i in zero}) or set()
    title = f"{type(oto.model).__name__} · erase-mode segment graph"
    n_erasable = sum(grp.prunable for grp in oto.groups)
    sub = (f"{len(sg)} segments, {len(oto.groups)} GeZIGs ({n_erasable} erasable); colour = one GeZIG, "
           "white = kept structure, orange = joint, grey dashed = not erasable")
    if zero is not None:
        title = f"{type(oto.model).__name__} · redundant operators (erase mode)"
        sub = f"{len(zero)} of {n_erasable} erasable GeZIGs are zero (red, ZERO) and erased with what dies with them"
    d = _new_dot(title, cluster_depth, len(sg))
    for s in sg.segments:
        ops = [g.nodes[i] for i in s.nodes]
        module = _common_prefix(n.module for n in ops if n.module)
        attrs: dict[str, Any] = {}
        tip = [f"segment {s.id} ({s.kind}): " + ", ".join(f"{n.op}[{n.module or 'forward'}]" for n in ops[:40])]
        grp = by_vertex.get(s.id)
        lines = _segment_lines(s.kind, ops, module, attrs)
        cls: list[str] = []
        if grp is not None:
            cls = _gezig_marks(grp, zero, lines, tip, attrs)
        else:
            attrs["id"] = f"seg_{s.id}"
            if s.kind == "chain":
                attrs.update(fillcolor="white", color="#616161")
            if zero is not None and s.id in dead:
                attrs.update(color=RED, style="rounded,filled,dashed", penwidth="1.5")
                lines.append("dies (all inputs erased)")
                cls.append("dead")
        attrs["class"] = _classes(*cls)
        attrs["label"] = "\n".join(x for x in lines if x)
        attrs["tooltip"] = "\n".join(tip)
        d.node(f"s{s.id}", module, **attrs)
    for s in sg.segments:
        for t in s.outputs:
            style = {"color": RED, "style": "dashed"} if (s.id in dead) else {}
            d.edge(f"s{s.id}", f"s{t}", **style)
    legend = [("erasable GeZIG Gk (one colour each)", PALETTE[0], ""), ("joint", KIND_COLORS["joint"], ""),
              ("kept structure", "#ffffff", ""), ("not erasable", GREY, "dashed")]
    if zero is not None:
        legend.append(("ZERO", ZERO_FILL, ""))
    d.graph_attrs["label"] = legend_table(title, legend, sub)
    return d


# --------------------------------------------------------------------------- sub-network
def _channels(op: str, shape: Sequence[int]) -> tuple[int, int] | None:
    """(out, in) channel counts of a stem's weight, in the layout its rule gives (None: no such layout)."""
    layout = rule_for(op).weight_layout(canonical_op(op))
    if layout is None or len(shape) <= max(layout):
        return None
    return int(shape[layout[0]]), int(shape[layout[1]])


def _weight(v: VNode) -> str | None:
    for p in v.params:
        if p.endswith("weight"):
            return p
    return v.params[0] if v.params else None


def subnet_dot(oto: "Drawable", sub: nn.Module | None, cluster_depth: int = 3) -> Dot:
    """What remains: erase mode the erased fx graph, prune mode the full trace with the slimmed widths
    (a slimmed copy has the same operators; no second trace is needed).

    ``sub=None`` means nothing is removed yet: the full model's trace is drawn as the sub-network.
    """
    full_shapes = dict(oto.graph.param_shapes)
    if sub is None:
        nodes = nodes_from_opgraph(oto.graph)
        kind = "no group is zero yet: the full model"
        sub = oto.model
    elif isinstance(sub, torch.fx.GraphModule):
        nodes = nodes_from_fx(sub, oto.example_inputs)
        kind = "erased fx graph"
    else:
        nodes = nodes_from_opgraph(oto.graph)
        kind = "slimmed copy"
    sub_shapes = {n: tuple(p.shape) for n, p in sub.named_parameters()}
    extra: dict[str, dict[str, Any]] = {}
    changed = 0
    for v in nodes:
        if v.kind != "stem":
            continue
        w = _weight(v)
        if w is None or w not in sub_shapes or w not in full_shapes:
            continue
        before, after = _channels(v.op, full_shapes[w]), _channels(v.op, sub_shapes[w])
        if before is None or after is None:
            continue
        (o0, i0), (o1, i1) = before, after
        line = f"out {o0}→{o1} · in {i0}→{i1}"
        attrs: dict[str, Any] = {}
        if (o0, i0) != (o1, i1):
            changed += 1
            attrs = {"penwidth": "2", "color": "#08519c", "class": "slimmed"}
        extra[v.key] = {"lines": [line], "tip": [f"{w}: {list(full_shapes[w])} → {list(sub_shapes[w])}"],
                        "attrs": attrs}
    p_full = sum(p.numel() for p in oto.model.parameters())
    p_sub = sum(p.numel() for p in sub.parameters())
    n_full = sum(1 for n in oto.graph.nodes if n.kind not in ("input", "output"))
    n_sub = sum(1 for v in nodes if v.kind not in ("input", "output"))
    title = f"{type(oto.model).__name__} · sub-network ({oto.mode} mode, {kind})"
    subtitle = (f"{n_sub} operators (full: {n_full}), parameters {p_full:,} → {p_sub:,} "
                f"({100.0 * p_sub / max(1, p_full):.1f}%); {changed} conv/linear layers resized (blue border)")
    return trace_dot(nodes, title, cluster_depth, extra, subtitle)


# --------------------------------------------------------------------------- entry point
def build_source(oto: "Drawable", name: str, sub: nn.Module | None = None, cluster_depth: int = 3,
                 zero: Sequence[int] | None = None) -> str:
    """DOT source of one drawing (``name`` in :data:`DRAWINGS`)."""
    if name == "trace":
        nodes = nodes_from_opgraph(oto.graph)
        summ = ", ".join(f"{k} {v}" for k, v in sorted(Counter(v.kind for v in nodes).items()))
        return trace_dot(nodes, f"{type(oto.model).__name__} · traced operator graph", cluster_depth,
                         subtitle=f"{len(oto.graph)} nodes ({summ}), {oto.graph.num_edges} edges").source()
    if name in ("space", "redundant"):
        zs = None
        if name == "redundant":
            zs = set(oto.zero_group_ids() if zero is None else zero)
        if oto.mode == "erase" and oto.segment_graph is not None:
            return erase_space_dot(oto, zs, cluster_depth).source()
        return prune_space_dot(oto, zs, cluster_depth).source()
    if name == "subnet":
        return subnet_dot(oto, sub, cluster_depth).source()
    raise ValueError(f"unknown drawing {name!r}; choose from {DRAWINGS}")


def visualize(oto: "Drawable", out_dir: str | Path, what: Sequence[str] | str = DRAWINGS, sub: nn.Module | None = None,
              formats: Sequence[str] = ("svg", "pdf"), cluster_depth: int = 3, prefix: str = "",
              timeout: float = 120.0) -> dict[str, str]:
    """Draw ``what`` (any of "trace", "space", "redundant", "subnet") of ``oto`` into ``out_dir``.

    Each drawing ``name`` is written as ``<prefix><name>.dot`` and, when Graphviz's ``dot`` is
    installed, rendered to each of ``formats`` (one layout per drawing).  Without ``dot`` only the
    sources are written and a warning says how to install Graphviz.  ``sub`` is the sub-network for
    "subnet" (required once a group is zero; while none is, e.g. at the start of training, the full
    model is drawn instead).  Returns ``{name: path}`` with the
    first rendered format of each drawing (the .dot source when nothing was rendered) plus
    ``{"<name>.<ext>": path}`` for every file written.
    """
    if isinstance(what, str):
        what = (what,)
    bad = [w for w in what if w not in DRAWINGS]
    if bad:
        raise ValueError(f"unknown drawing(s) {bad}; choose from {DRAWINGS}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    zero = oto.zero_group_ids() if ("redundant" in what or ("subnet" in what and sub is None)) else None
    if "subnet" in what and sub is None and zero:
        raise ValueError("the 'subnet' drawing needs the sub-network: pass sub=oto.construct_subnet() "
                         "(oto.visualize does it for you).")
    result: dict[str, str] = {}
    warned = False
    for name in dict.fromkeys(what):
        src = build_source(oto, name, sub=sub, cluster_depth=cluster_depth, zero=zero)
        dot_path = out / f"{prefix}{name}.dot"
        dot_path.write_text(src, encoding="utf-8")
        files = render(dot_path, formats, timeout=timeout, warn=not warned)
        if not files and formats:
            warned = True
        result[name] = next(iter(files.values()), str(dot_path))
        result[f"{name}.dot"] = str(dot_path)
        for fmt, p in files.items():
            result[f"{name}.{fmt}"] = p
    return result


__all__ = ["visualize", "build_source", "trace_dot", "prune_space_dot", "erase_space_dot",
           "subnet_dot", "nodes_from_fx", "nodes_from_opgraph", "DRAWINGS"]
