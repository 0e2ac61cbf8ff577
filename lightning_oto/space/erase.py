"""Erase-mode search space: segment graph (Algorithm 2) and generalized zero-invariant groups.

The trace graph is compressed into *segments*: maximal chains of operators where every inner
operator has one input and one consumer.  *Joint* vertices (add / sub / concat with several
inputs) are segments of their own: dropping one of their inputs is exact when that input is
zero.  A segment is a removal structure (GeZIG) when it owns trainable variables, all of its
consumers are joint vertices, zeroing its variables makes its output exactly zero, and its
variables are used nowhere else.  A segment that feeds a concat additionally needs the concat's
consumers to be separable per channel, so their input columns can be dropped (Figure 4b).

Validity (the hierarchy check of Algorithm 3) is ``SegmentGraph.removal_is_valid``: after removing
a set of segments, every joint left without inputs is dead too, no non-joint vertex may read a
dead one, no output may be dead, and every graph input must still reach an output.  O(V_s + E_s).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Iterable

import torch.fx

from ..graph.trace import OpGraph, OpNode
from . import rules
from .channels import merge_slots
from .groups import Group, ParamSlice
from .prune import ChannelAnalysis, TInfo

# operator families, as the rule registry defines them (every spelling: add, add_, concat, ...)
JOINTS = rules.names_where(lambda r: r.joint)                # may drop an input that is zero
STEMS = rules.names_where(lambda r: r.kind == "stem")        # consumers whose input columns are sliced
PASSTHROUGH = rules.names_where(lambda r: r.keeps_channels)  # channels flow through unchanged


@dataclass
class Segment:
    id: int
    kind: str                    # "input" | "output" | "joint" | "chain"
    nodes: list[int]             # OpNode ids, in order
    inputs: list[int] = field(default_factory=list)    # segment ids
    outputs: list[int] = field(default_factory=list)
    params: list[str] = field(default_factory=list)
    concat: bool = False         # a joint that concatenates (dropping an input needs affiliated slicing)
    param_nodes: list[int] = field(default_factory=list)  # folded parameter expressions (gamma.reshape(-1, 1, 1))

    @property
    def last(self) -> int:
        return self.nodes[-1]


@dataclass
class SegmentGraph:
    segments: list[Segment]
    node_segment: list[int]       # OpNode id -> segment id
    input_segments: list[int]
    output_segments: list[int]
    # removable segment -> the segments that only feed it (its branch: attention Q/K/V before an output
    # projection, a norm before the first conv); they die with it and are removed at construction
    branch: dict[int, set[int]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.segments)

    def dead_set(self, removed: Iterable[int]) -> set[int] | None:
        """Segments that vanish with ``removed`` (removed + joints left without inputs); None if invalid.

        A concat may only lose removed segments themselves: their groups carry the concat's affiliated
        slices (norm channels after it, consumer columns).  A joint that died because all of its inputs
        went has no such slices, so dropping it from a concat would not be exact.
        """
        removed = set(removed)
        dead = set(removed)
        for s in self.segments:  # ids follow a topological order
            if s.id in dead or not s.inputs:
                continue
            n_dead = sum(1 for i in s.inputs if i in dead)
            if n_dead == 0:
                continue
            if s.kind != "joint":
                return None  # an operator would read a removed tensor
            if s.concat and any(i in dead and i not in removed for i in s.inputs):
                return None  # a concat would lose a dead joint's channels without their affiliates
            if n_dead == len(s.inputs):
                dead.add(s.id)
        return dead

    def removal_is_valid(self, removed: Iterable[int]) -> bool:
        """True when removing the ``removed`` segments leaves a working network with nothing orphaned.

        Every segment that contributes to an output in the full network (graph inputs included) must
        still reach an output through live segments, unless it belongs to the branch of a removed
        segment (it only fed that segment; construction removes it with it).  Otherwise the removal
        would silently take structures with it that are not zero.  O(V_s + E_s).
        """
        removed = {r for r in removed if r is not None}
        dead = self.dead_set(removed)
        if dead is None or any(o in dead for o in self.output_segments):
            return False
        allowed = set().union(*(self.branch.get(r, ()) for r in removed)) if removed else set()
        return self.orphans(dead) <= allowed

    def orphans(self, dead: set[int]) -> set[int]:
        """Segments that contributed to an output but no longer do once ``dead`` is gone."""
        return self._useful() - dead - self._reaching_outputs(dead)

    def removed_with(self, removed: Iterable[int]) -> set[int]:
        """Every segment construction deletes for ``removed``: dead joints and the removed branches too."""
        removed = set(removed)
        dead = self.dead_set(removed) or set(removed)
        return dead.union(*(self.branch.get(r, ()) for r in removed)) if removed else dead

    def _useful(self) -> set[int]:
        cached = getattr(self, "_useful_cache", None)
        if cached is None:
            cached = self._reaching_outputs(set())
            self._useful_cache = cached
        return cached

    def _reaching_outputs(self, dead: set[int]) -> set[int]:
        """Segments not in ``dead`` with a path of live segments to an output (backward BFS)."""
        seen = {o for o in self.output_segments if o not in dead}
        q = deque(seen)
        while q:
            s = q.popleft()
            for t in self.segments[s].inputs:
                if t not in dead and t not in seen:
                    seen.add(t)
                    q.append(t)
        return seen


@dataclass
class EraseSpace:
    groups: list[Group]
    segment_graph: SegmentGraph
    unerasable: dict[str, str]
    analysis: ChannelAnalysis | None = None


def is_joint(node: OpNode, graph: OpGraph | None = None) -> bool:
    """A vertex that may lose an input: add / sub / concat of two or more distinct tensors.

    An add or sub qualifies only without broadcasting (every input already has the output's shape):
    otherwise the input left over (e.g. a (C, 1, 1) bias) would not be the tensor the add produced.
    """
    if node.op not in JOINTS or len(set(node.inputs)) < 2:
        return False
    if graph is not None and node.op not in ("cat", "concat"):
        if node.shape is None or any(graph.nodes[i].shape != node.shape for i in node.inputs):
            return False
    return True


def build_segment_graph(graph: OpGraph) -> SegmentGraph:
    """Algorithm 2, first phase: one pass in topological order grows chains and cuts at joints/forks.

    Parameter expressions (nodes computed from parameters and constants only, e.g. a layer scale
    ``gamma.reshape(-1, 1, 1)``) are not operators of their own: they fold into their consumer's
    segment, which then owns their parameters.
    """
    exprs = _parameter_expressions(graph)
    segs: list[Segment] = []
    node_seg = [-1] * len(graph.nodes)
    for node in graph.nodes:
        if node.id in exprs:
            continue
        inputs = [i for i in _value_inputs(graph, node) if i not in exprs]
        folded = _folded(graph, node, exprs)
        params = list(dict.fromkeys(node.params + [x for e in folded for x in graph.nodes[e].params]))
        if node.kind in ("input", "output"):
            kind = node.kind
        elif is_joint(node, graph):
            kind = "joint"
        else:
            kind = "chain"
        if kind == "chain" and len(inputs) == 1:
            p = graph.nodes[inputs[0]]
            ps = segs[node_seg[p.id]] if node_seg[p.id] >= 0 else None
            if ps is not None and ps.kind == "chain" and len(p.outputs) == 1 and ps.last == p.id:
                ps.nodes.append(node.id)
                ps.params += [x for x in params if x not in ps.params]
                ps.param_nodes += [e for e in folded if e not in ps.param_nodes]
                node_seg[node.id] = ps.id
                continue
        s = Segment(len(segs), kind, [node.id], params=params, concat=kind == "joint" and node.op in ("cat", "concat"),
                    param_nodes=folded)
        segs.append(s)
        node_seg[node.id] = s.id
    for e in exprs:  # a folded expression belongs to its consumers' segment; one shared by several to none
        owners = {node_seg[c] for c in _consumers(graph, e, exprs)}
        node_seg[e] = owners.pop() if len(owners) == 1 else -1
    for seg in segs:
        seg.param_nodes = [e for e in seg.param_nodes if node_seg[e] == seg.id]
    for node in graph.nodes:
        t = node_seg[node.id]
        for i in _value_inputs(graph, node):
            if i in exprs or node.id in exprs:
                continue
            s = node_seg[i]
            if s != t and t not in segs[s].outputs:
                segs[s].outputs.append(t)
                segs[t].inputs.append(s)
    ins = [node_seg[i] for i in graph.input_ids]
    outs = [node_seg[i] for i in graph.output_ids]
    return SegmentGraph(segs, node_seg, ins, outs)


def _value_inputs(graph: OpGraph, node: OpNode) -> list[int]:
    """The producers whose *values* the node reads (not those its rule says it only reads the shape of)."""
    fx = node.fx_node
    if fx is None or fx.op != "call_function" or not rules.rule_for(fx.target).shape_only:
        return node.inputs
    skip = rules.rule_for(fx.target).shape_only
    bound = rules.bind(fx.target, fx.args, fx.kwargs)
    template = {v.name for k, v in bound.items() if k in skip and isinstance(v, torch.fx.Node)}
    values = {v.name for k, v in bound.items() if k not in skip and isinstance(v, torch.fx.Node)}
    return [i for i in node.inputs if graph.nodes[i].name not in template - values]


def _parameter_expressions(graph: OpGraph) -> set[int]:
    """Operators whose value depends on no graph input: only on parameters, buffers and constants.

    An expression that carries parameters and feeds several operators (T5's relative position bias,
    shared by every layer) stays an operator of its own: folded into all its readers, removing all of
    them would silently take its parameters along.
    """
    blocked: set[int] = set()
    while True:
        exprs: set[int] = set()
        for node in graph.nodes:  # topological order
            if node.kind not in ("input", "output") and node.id not in blocked and node.outputs and \
                    all(i in exprs for i in node.inputs):
                exprs.add(node.id)
        shared = {e for e in exprs if len(_consumers(graph, e, exprs)) > 1 and _carries_params(graph, e, exprs)}
        if not shared:
            return exprs
        blocked |= shared


def _carries_params(graph: OpGraph, e: int, exprs: set[int]) -> bool:
    return bool(graph.nodes[e].params) or any(graph.nodes[x].params for x in _folded(graph, graph.nodes[e], exprs))


def _folded(graph: OpGraph, node: OpNode, exprs: set[int]) -> list[int]:
    """The parameter expressions ``node`` reads, transitively (in topological order)."""
    out: set[int] = set()
    stack = [i for i in node.inputs if i in exprs]
    while stack:
        e = stack.pop()
        if e not in out:
            out.add(e)
            stack += [i for i in graph.nodes[e].inputs if i in exprs]
    return sorted(out)


def _consumers(graph: OpGraph, e: int, exprs: set[int]) -> list[int]:
    """The non-expression operators that read expression ``e`` (directly or through other expressions)."""
    out, stack, seen = [], list(graph.nodes[e].outputs), set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n in exprs:
            stack += graph.nodes[n].outputs
        else:
            out.append(n)
    return sorted(out)


def _output_is_zero(graph: OpGraph, seg: Segment) -> bool:
    """Does zeroing the segment's own parameters make its output exactly zero? (each rule says, per op)"""
    own = set(seg.params)
    zero: dict[torch.fx.Node, bool] = {}

    def is_zero(a: object) -> bool:
        if isinstance(a, torch.fx.Node):
            if a.op == "placeholder":
                return graph.placeholder_to_param.get(a.name) in own
            return zero.get(a, False)
        if isinstance(a, (list, tuple)):
            return bool(a) and all(is_zero(x) for x in a)
        return isinstance(a, (int, float)) and not isinstance(a, bool) and a == 0

    for nid in sorted(set(seg.nodes) | set(seg.param_nodes)):  # folded parameter expressions first
        fx = graph.nodes[nid].fx_node
        rule = rules.rule_for(fx.target)
        call = rules.Call.of(graph.nodes[nid])
        if rule.poisons(call, is_zero):
            return False  # e.g. a division by a zeroed parameter: NaN, not zero, whatever follows
        zero[fx] = rule.zero_output(call, is_zero)
    return zero[graph.nodes[seg.last].fx_node]


def build_erase_space(graph: OpGraph) -> EraseSpace:
    """GeZIGs of ``graph``: Algorithm 2 plus the exactness conditions in the module docstring."""
    sg = build_segment_graph(graph)
    analysis = ChannelAnalysis(graph)
    analysis.walk()
    param_segments: dict[str, set[int]] = {}
    for s in sg.segments:
        for p in s.params:
            param_segments.setdefault(p, set()).add(s.id)
    groups: list[Group] = []
    unerasable: dict[str, str] = {}
    for s in sg.segments:
        if s.kind != "chain" or not s.params:
            continue
        reason = None
        if not s.outputs or any(sg.segments[o].kind != "joint" for o in s.outputs):
            continue  # not a removal structure: part of the complement G_s^C
        if any(len(param_segments[p]) > 1 for p in s.params):
            reason = "its parameters are shared with another operator"
        elif not _output_is_zero(graph, s):
            reason = "zeroing its variables does not make its output zero"
        deps: list[ParamSlice] = []
        extra: list[ParamSlice] = []
        if reason is None:
            reason, extra, deps = _concat_dependents(graph, sg, analysis, s)
        if reason is None:
            reason, branch_deps = _branch(graph, sg, s, param_segments)
            deps += branch_deps
        name = _segment_name(graph, s)
        if reason:
            unerasable[name] = reason
        groups.append(Group(
            id=len(groups), name=name, slices=[ParamSlice(p) for p in s.params] + extra, dependents=deps,
            prunable=reason is None, reason=reason, vertex=s.id,
        ))
    _share_affiliated_tensors(groups, graph, unerasable)
    return EraseSpace(groups, sg, unerasable, analysis)


def _branch(graph: OpGraph, sg: SegmentGraph, s: Segment,
            param_segments: dict[str, set[int]]) -> tuple[str | None, list[ParamSlice]]:
    """The segments that only feed ``s`` die with it: record them and the parameters only they read.

    Returns (reason it cannot be erased, the branch's parameters as whole-tensor dependents).
    """
    dead = sg.dead_set({s.id}) or {s.id}
    branch = sg.orphans(dead)
    cut = [i for i in sg.input_segments if i in branch]
    if cut:
        return f"removing it would disconnect the input {graph.nodes[sg.segments[cut[0]].nodes[0]].name}", []
    sg.branch[s.id] = branch
    gone = dead | branch
    names = {p for b in branch for p in sg.segments[b].params}
    return None, [ParamSlice(p) for p in sorted(names) if param_segments[p] <= gone]


def _share_affiliated_tensors(groups: list[Group], graph: OpGraph, unerasable: dict[str, str]) -> None:
    """Dense connectivity: a norm after a concat belongs to the layer that reads it, but its channels of an
    earlier layer's output are that layer's concat affiliates.  The reading layer keeps the other
    channels as variables and the whole tensor as a dependent (it dies with the layer); groups stay
    disjoint, and zeroing either still zeroes its output.  A claim the split cannot honour (two
    dimensions, or two claimants of one channel) leaves the claimant unerasable, as before.
    """
    claims: dict[str, dict[int, dict[int, Group]]] = {}  # tensor -> dim -> index -> claiming group
    for g in groups:
        if g.prunable:
            for sl in g.slices:
                if sl.indices is not None:
                    taken = claims.setdefault(sl.name, {}).setdefault(sl.dim, {})
                    for i in sl.indices:
                        if taken.setdefault(i, g) is not g:
                            _refuse(g, f"its concat affiliates overlap those of {taken[i].name}", unerasable)
    for g in groups:
        if not g.prunable:
            continue
        for k, sl in enumerate(list(g.slices)):
            dims = claims.get(sl.name, {}) if sl.indices is None else {}
            other = {d: {i for i, c in ix.items() if c is not g} for d, ix in dims.items()}
            other = {d: ix for d, ix in other.items() if ix}
            if not other:
                continue
            if len(other) > 1:
                for d in other:
                    for c in {dims[d][i] for i in other[d]}:
                        _refuse(c, f"its concat affiliates are a variable of {g.name}", unerasable)
                continue
            (dim, taken), = other.items()
            size = (graph.param_shapes.get(sl.name) or graph.buffer_shapes[sl.name])[dim]
            rest = tuple(i for i in range(size) if i not in taken)
            g.slices[k] = ParamSlice(sl.name, dim, rest)
            g.dependents.append(ParamSlice(sl.name))
        g.slices = [sl for sl in g.slices if sl.indices is None or sl.indices]


def _refuse(g: Group, reason: str, unerasable: dict[str, str]) -> None:
    if g.prunable:
        g.prunable = False
        g.reason = reason
        unerasable[g.name] = reason


def _concat_dependents(graph: OpGraph, sg: SegmentGraph, an: ChannelAnalysis,
                       s: Segment) -> tuple[str | None, list[ParamSlice], list[ParamSlice]]:
    """For a segment feeding a concat: the affiliated slices that go with it (or why it can't go).

    Returns (reason, extra variables, dependents): per-channel norm parameters after the concat
    are zeroed with the group (so the channel stays zero up to the consumer); the consumer's input
    columns and running statistics are only removed at construction.
    """
    last = graph.nodes[s.last]
    cat_users = [sg.segments[o] for o in s.outputs if graph.nodes[sg.segments[o].nodes[0]].op in ("cat", "concat")]
    if not cat_users:
        return None, [], []
    info = an.info.get(last.name)
    if not isinstance(info, TInfo):
        return "its output channels are not tracked", [], []
    downstream: set[int] = set()
    for cs in cat_users:
        cat = graph.nodes[cs.nodes[0]]
        cinfo = an.info.get(cat.name)
        dim = rules.Call.of(cat).get("dim", 0)
        if not isinstance(cinfo, TInfo) or cinfo.cdim != dim % len(cat.shape):
            return "it is concatenated along a non-channel dimension", [], []
        bad = _unsafe_downstream(graph, cat, downstream)
        if bad:
            return f"channels of {cat.name} flow through {bad}", [], []
    el = an.el
    members = {el.root(e): el.component(e) for e in info.elems}
    mine = set(info.elems)
    own_params = set(s.params)
    extra: list[tuple[str, int, int]] = []
    deps: list[tuple[str, int, int]] = []
    for r, elems in members.items():
        for e in elems:
            if e not in mine and any(sl[0] not in own_params for sl in el.variables(e)):
                return "its channels are coupled with another structure", [], []
            why = el.reason(e)
            if why:
                return why, [], []
            extra += [sl for sl in el.variables(e) if sl[0] not in own_params]
            deps += [sl for sl in el.dependents(e) if sl[0] not in own_params]
    # affiliated slices live after the concat: a tensor also read before it (the segment passes
    # channels through from an upstream producer, e.g. a norm or activation segment) cannot go along
    readers = _readers(graph)
    allowed = downstream | set(s.nodes)
    for name, _, _ in extra + deps:
        if not readers.get(name, set()) <= allowed:
            return f"its channels come from {name} upstream of the concat", [], []
    return None, merge_slots(extra), merge_slots(deps)


def _readers(graph: OpGraph) -> dict[str, set[int]]:
    """Parameter / buffer name -> ids of the nodes that read it (computed once per graph)."""
    cached = getattr(graph, "_readers_cache", None)
    if cached is None:
        cached = {}
        for n in graph.nodes:
            for name in n.params + n.buffers:
                cached.setdefault(name, set()).add(n.id)
        graph._readers_cache = cached  # type: ignore[attr-defined]
    return cached


def _unsafe_downstream(graph: OpGraph, start: OpNode, seen: set[int] | None = None) -> str | None:
    """Walk from a concat to its consumers; report an op that could not be re-sized (e.g. a hard-coded view).

    ``seen`` collects the ids of the nodes walked (the consumers included).
    """
    stack = list(start.outputs)
    seen = set() if seen is None else seen
    while stack:
        nid = stack.pop()
        if nid in seen:
            continue
        seen.add(nid)
        n = graph.nodes[nid]
        if n.kind == "output":
            return "the model output"
        if n.op in STEMS:
            continue  # consumer: its input columns are sliced
        if n.op in ("cat", "concat") or n.op in PASSTHROUGH:
            stack += n.outputs
            continue
        return f"{n.op} ({n.module or 'forward'})"
    return None


def _segment_name(graph: OpGraph, s: Segment) -> str:
    mods = []
    for nid in s.nodes:
        m = graph.nodes[nid].module
        if m and graph.nodes[nid].params and m not in mods:
            mods.append(m)
    return "-".join(mods) if mods else graph.nodes[s.nodes[0]].name
