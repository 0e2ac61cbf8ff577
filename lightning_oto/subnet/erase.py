"""Erase-mode construction: remove whole operators by graph surgery on the traced program.

Steps (Section 3.3 of the erasing paper): take the program traced once by ``OTO`` (with its
dynamic dimensions), give it the model's current weights, drop dead inputs from joints
(``add(a, removed) -> a``, ``cat`` without the input, in-place ``x += removed -> x``), slice the
affiliated structures (a concat consumer's input columns, per-channel norms in between), then
remove every operator that cannot reach an output (:mod:`.liveness`: dropout, attention and
in-place ops included).  Batch norms and dropouts become real modules again, at the paths they
had, so the result trains and evaluates like a normal module and keeps the user's parameter
names.  Finally :func:`check_erased` proves that nothing of the zero groups is left.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.fx
from torch import nn

from ..errors import IncompleteRemovalError, InvalidSubnetError
from ..graph.trace import OpGraph, op_name
from ..space.erase import SegmentGraph
from ..space.groups import Group
from .liveness import written_inputs, remove_dead
from .plan import Plan, removal_plan
from .verify import check_plan_applied


class ExportedBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm for any rank (the exported graph already knows the layout)."""

    def _check_input_dim(self, input: torch.Tensor) -> None:  # noqa: A002 - torch's signature
        return None


@dataclass(frozen=True)
class EraseInputs:
    """What erase construction needs: the trace (program + OpGraph), its segments, and the zero groups."""

    program: Any
    graph: OpGraph
    segments: SegmentGraph
    zero_groups: Sequence[Group]


def erase_subnet(spec: EraseInputs, state: dict[str, torch.Tensor], training: bool = False) -> torch.fx.GraphModule:
    """A new module computing the traced model without the zero groups' operators.

    ``state``: the model's current parameters and buffers by name (never modified: the sub-network
    gets copies).
    """
    dead, gone = _dead_segments(spec)
    gm = program_module(spec.program)  # a fresh graph each call; its tensors are the user's: replaced below
    _adopt_state(gm, state)
    by_name = {n.name: n for n in gm.graph.nodes}
    dead_tails = {_fx(by_name, spec.graph.nodes[spec.segments.segments[d].last].name) for d in dead}
    for s in spec.segments.segments:
        if s.id not in dead and s.kind == "joint" and any(i in dead for i in s.inputs):
            _drop_dead_inputs(gm.graph, _fx(by_name, spec.graph.nodes[s.nodes[0]].name), dead_tails)
    shapes = {n: tuple(t.shape) for n, t in list(gm.named_parameters()) + list(gm.named_buffers())}
    plan = removal_plan(spec.zero_groups, shapes)
    _slice(gm, plan)
    used_before = _read_attributes(gm)
    remove_dead(gm.graph)
    modularize(gm, used_before)
    check_erased(gm, spec, gone, shapes, plan)
    gm.train(training)
    return gm


def program_module(program: Any) -> torch.fx.GraphModule:
    """``program.module()`` without torch.export's refusal of ``train()``/``eval()``: after
    :func:`modularize` the mode switch is real (batch norms and dropouts are modules again)."""
    gm = program.module()
    for attr in ("train", "eval"):  # instance-level refusals set by ExportedProgram.module()
        vars(gm).pop(attr, None)
    return gm


def modularize(gm: torch.fx.GraphModule, used_before: set[str] | None = None) -> None:
    """Batch norms and dropouts as modules at their parameters' own paths, tensors that no operator
    reads any more (of those read in ``used_before``, default: now) dropped, graph recompiled."""
    used_before = _read_attributes(gm) if used_before is None else used_before
    _modularize(gm)
    _drop_unused_attributes(gm, used_before)
    gm.graph.lint()
    gm.recompile()


def _dead_segments(spec: EraseInputs) -> tuple[set[int], set[int]]:
    """(segments whose outputs vanish, every segment construction deletes: those plus the removed branches)."""
    sg = spec.segments
    removed = {g.vertex for g in spec.zero_groups}
    dead = sg.dead_set(removed)
    if dead is None or not sg.removal_is_valid(removed):
        names = ", ".join(g.name for g in list(spec.zero_groups)[:6])
        more = "..." if len(spec.zero_groups) > 6 else ""
        raise InvalidSubnetError(
            f"removing the zero groups ({len(spec.zero_groups)}: {names}{more}) would disconnect the network: some "
            "operator or output would lose its only input. This happens when the groups were chosen without the "
            "hierarchy check (e.g. DHSPG on an erase search space); use oto.h2spg().")
    return dead, sg.removed_with(removed)


def _fx(by_name: dict[str, torch.fx.Node], name: str) -> torch.fx.Node:
    try:
        return by_name[name]
    except KeyError:
        raise RuntimeError(f"lightning_oto: operator {name!r} of the trace is missing from the program's module; "
                           "this is an engine bug - please report it with the model.") from None


def _adopt_state(gm: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Give ``gm`` private copies of the current tensors (``program.module()`` shares the user's).

    A tensor held under several names (tied embeddings) stays one tensor.
    """
    copies: dict[int, torch.Tensor] = {}
    for name, t in list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False)):
        if name not in state:
            raise RuntimeError(f"lightning_oto: the traced program holds {name!r}, which the model does not have.")
        owner, attr = _owner(gm, name)
        if id(t) not in copies:
            new = state[name].detach().clone()
            copies[id(t)] = nn.Parameter(new, requires_grad=t.requires_grad) if attr in owner._parameters else new
        if attr in owner._parameters:
            owner._parameters[attr] = copies[id(t)]
        else:
            owner._buffers[attr] = copies[id(t)]


def _drop_dead_inputs(graph: torch.fx.Graph, node: torch.fx.Node, dead: set[torch.fx.Node]) -> None:
    """Rewrite a joint without its removed (hence zero) inputs; in-place joints are rewritten too."""
    op = op_name(node.target)
    if op in ("cat", "concat"):
        tensors = [t for t in node.args[0] if t not in dead]
        if len(tensors) > 1:
            node.args = (tensors,) + tuple(node.args[1:])
            return
        _replace_joint(graph, node, tensors[0], aliases_result=False)
        return
    a, b = node.args[0], node.args[1]
    alpha = node.kwargs.get("alpha", 1)
    if a in dead and b in dead:
        raise RuntimeError(f"lightning_oto: joint {node.name} lost every input but is still alive (engine bug).")
    if a in dead and (op.startswith("sub") or alpha != 1):
        factor = -alpha if op.startswith("sub") else alpha
        with graph.inserting_before(node):
            scaled = graph.call_function(torch.ops.aten.mul.Tensor, (b, factor))
        _replace_joint(graph, node, scaled, aliases_result=True)
        return
    # an in-place joint (``a += b``) returns ``a`` itself: keeping ``a`` keeps exactly that tensor
    _replace_joint(graph, node, b if a in dead else a, aliases_result=b in dead and op.endswith("_"))


def _replace_joint(graph: torch.fx.Graph, node: torch.fx.Node, value: torch.fx.Node, aliases_result: bool) -> None:
    """Use ``value`` where the joint's result was read, then drop the joint (an in-place one would keep adding).

    The joint made a new tensor; if a reader mutates that result in place (``relu_`` after ``out +=``)
    and ``value`` is another live tensor, the reader gets a copy so ``value`` itself is not overwritten.
    """
    if not aliases_result and any(node in written_inputs(u) for u in node.users):
        with graph.inserting_before(node):
            value = graph.call_function(torch.ops.aten.clone.default, (value,))
    node.replace_all_uses_with(value)
    graph.erase_node(node)


def _slice(gm: nn.Module, plan: Plan) -> None:
    with torch.no_grad():
        for (name, dim), idx in plan.items():
            owner, attr = _owner(gm, name)
            t = getattr(owner, attr)
            keep = torch.as_tensor([i for i in range(t.shape[dim]) if i not in idx], dtype=torch.long)
            new = t.detach().index_select(dim, keep).clone()
            if isinstance(t, nn.Parameter):
                owner._parameters[attr] = nn.Parameter(new, requires_grad=t.requires_grad)
            else:
                owner._buffers[attr] = new


def _owner(root: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, attr = name.rpartition(".")
    return (root.get_submodule(path) if path else root), attr


def _get(root: nn.Module, target: str) -> Any:
    owner, attr = _owner(root, target)
    return getattr(owner, attr)


def _modularize(gm: torch.fx.GraphModule) -> None:
    """``aten.batch_norm`` / ``aten.dropout`` calls -> modules, so the sub-network trains like the model did."""
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        op = op_name(node.target)
        if op == "batch_norm":
            _batch_norm_module(gm, node)
        elif op == "dropout" and isinstance(node.args[1], float):
            _replace_by_module(gm, node, nn.Dropout(node.args[1]), "dropout", node.args[0])


def _batch_norm_module(gm: torch.fx.GraphModule, node: torch.fx.Node) -> None:
    x, w, b, rm, rv = node.args[:5]
    if not all(getattr(a, "op", None) == "get_attr" for a in (w, b, rm, rv)):
        return
    momentum, eps = node.args[6], node.args[7]
    weight = _get(gm, w.target)
    bn = ExportedBatchNorm(weight.shape[0], eps=eps, momentum=momentum)
    bn.weight, bn.bias = weight, _get(gm, b.target)
    bn.running_mean, bn.running_var = _get(gm, rm.target), _get(gm, rv.target)
    parent = w.target.rpartition(".")[0]
    sibling = f"{parent}.num_batches_tracked" if parent else "num_batches_tracked"
    try:
        bn.num_batches_tracked = _get(gm, sibling)
    except AttributeError:
        pass
    same_parent = parent and all(a.target.rpartition(".")[0] == parent for a in (b, rm, rv))
    path = parent if same_parent and _only_tensors(gm.get_submodule(parent)) else None
    _replace_by_module(gm, node, bn, "bn", x, path)


def _only_tensors(module: nn.Module) -> bool:
    return not list(module.children())


def _replace_by_module(gm: torch.fx.GraphModule, node: torch.fx.Node, module: nn.Module, stem: str, x: Any,
                       path: str | None = None) -> None:
    """Swap ``node`` for a call of ``module`` registered at ``path`` (the user's name) or a fresh name."""
    if path is None:
        i = 0
        while hasattr(gm, f"erased_{stem}_{i}"):
            i += 1
        path = f"erased_{stem}_{i}"
    parent, _, attr = path.rpartition(".")
    (gm.get_submodule(parent) if parent else gm).add_module(attr, module)
    with gm.graph.inserting_before(node):
        new = gm.graph.call_module(path, (x,))
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)


def _read_attributes(gm: torch.fx.GraphModule) -> set[str]:
    return {n.target for n in gm.graph.nodes if n.op == "get_attr"}


def _drop_unused_attributes(gm: torch.fx.GraphModule, used_before: set[str]) -> None:
    """Drop the tensors that only removed operators read (tensors the model never read stay, as in the model)."""
    for node in list(gm.graph.nodes):
        if node.op == "get_attr" and not node.users:
            gm.graph.erase_node(node)
    used = _read_attributes(gm)
    mods = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    for name, _ in list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False)):
        if name in used or name not in used_before or any(name.startswith(m + ".") for m in mods):
            continue
        owner, attr = _owner(gm, name)
        owner._parameters.pop(attr, None)
        owner._buffers.pop(attr, None)


def check_erased(gm: torch.fx.GraphModule, spec: EraseInputs, dead: set[int], shapes: dict[str, tuple[int, ...]],
                 plan: Plan) -> None:
    """Raise :class:`IncompleteRemovalError` if an operator of a removed segment, a whole variable of a zero
    group, or an un-sliced affiliate is still in the sub-network."""
    names = {n.name for n in gm.graph.nodes}
    segs = spec.segments.segments
    left_ops = [spec.graph.nodes[nid].name for d in dead for nid in segs[d].nodes + segs[d].param_nodes
                if spec.graph.nodes[nid].name in names]
    tensors = {n: tuple(t.shape) for n, t in list(gm.named_parameters()) + list(gm.named_buffers())}
    left_vars = sorted({s.name for g in spec.zero_groups for s in list(g.slices) + list(g.dependents)
                        if s.indices is None and s.name in tensors})
    problems = []
    if left_ops:
        problems.append(f"operators of removed segments: {', '.join(left_ops[:8])}")
    if left_vars:
        problems.append(f"variables of zero groups: {', '.join(left_vars[:8])}")
    if problems:
        raise IncompleteRemovalError("the erased sub-network still holds " + "; ".join(problems)
                                     + ". This is an engine bug - please report it with the model.")
    check_plan_applied(tensors, shapes, plan, what="erased sub-network")


__all__ = ["EraseInputs", "ExportedBatchNorm", "erase_subnet", "check_erased", "modularize", "program_module"]
