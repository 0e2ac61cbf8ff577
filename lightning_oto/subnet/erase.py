"""Erase-mode construction: remove whole operators by torch.fx surgery on the exported program.

Steps (Section 3.3 of the erasing paper): drop the vertices of zero GeZIGs, drop the affiliated
structures (a concat consumer's input columns, per-channel norms in between), collapse joints left
with one input, eliminate dead code and unused parameters.  Batch norms become real
``nn.BatchNorm`` modules again so the result trains and evaluates like a normal module.
"""
from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any, Sequence

import torch
import torch.fx
from torch import nn

from ..graph.trace import export_program, op_name
from ..errors import InvalidSubnetError
from .plan import removal_plan

if TYPE_CHECKING:
    from ..oto import OTO


class ExportedBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm for any rank (the exported graph already knows the layout)."""

    def _check_input_dim(self, input: torch.Tensor) -> None:  # noqa: A002 - torch's signature
        return None


def erase_subnet(oto: "OTO", zero_ids: Sequence[int]) -> nn.Module:
    sg = oto.segment_graph
    groups = [oto.groups[i] for i in zero_ids]
    removed = {g.vertex for g in groups}
    dead = sg.dead_set(removed)
    if dead is None or not sg.removal_is_valid(removed):
        names = ", ".join(g.name for g in groups[:6])
        raise InvalidSubnetError(
            f"removing the zero groups ({len(groups)}: {names}{'...' if len(groups) > 6 else ''}) would disconnect "
            "the network: some operator or output would lose its only input. This happens when the groups were "
            "chosen without the hierarchy check (e.g. DHSPG on an erase search space); use oto.h2spg().")
    program = export_program(oto.model, oto.example_inputs, dynamic_batch=True)
    gm = copy.deepcopy(program.module())
    graph = gm.graph
    by_name = {n.name: n for n in graph.nodes}
    g = oto.graph
    dead_last = {by_name[g.nodes[sg.segments[d].last].name] for d in dead if g.nodes[sg.segments[d].last].name in by_name}

    for s in sg.segments:
        if s.id in dead or s.kind != "joint" or not any(i in dead for i in s.inputs):
            continue
        _drop_dead_inputs(graph, by_name[g.nodes[s.nodes[0]].name], dead_last)

    shapes = {n: tuple(t.shape) for n, t in list(gm.named_parameters()) + list(gm.named_buffers())}
    plan = removal_plan(groups, shapes)  # whole-tensor slices are skipped: DCE drops them
    plan = {k: v for k, v in plan.items() if k[0] in shapes}
    with torch.no_grad():
        for (name, dim), idx in plan.items():
            owner, attr = _owner(gm, name)
            t = getattr(owner, attr)
            keep = torch.as_tensor([i for i in range(t.shape[dim]) if i not in idx], dtype=torch.long)
            new = t.detach().index_select(dim, keep).clone()
            if isinstance(t, nn.Parameter):
                setattr(owner, attr, nn.Parameter(new, requires_grad=t.requires_grad))
            else:
                owner._buffers[attr] = new
    graph.eliminate_dead_code()
    _modularize_batch_norm(gm)
    _drop_unused_attributes(gm)
    graph.lint()
    gm.recompile()
    gm.train(oto.model.training)
    return gm


def _drop_dead_inputs(graph: torch.fx.Graph, node: torch.fx.Node, dead: set[torch.fx.Node]) -> None:
    op = op_name(node.target)
    if op in ("cat", "concat"):
        tensors = [t for t in node.args[0] if t not in dead]
        if len(tensors) == 1:
            node.replace_all_uses_with(tensors[0])
        else:
            node.args = (tensors,) + tuple(node.args[1:])
        return
    a, b = node.args[0], node.args[1]
    alive = b if a in dead else a
    if op.startswith("sub") and a in dead:
        with graph.inserting_after(node):
            neg = graph.call_function(torch.ops.aten.neg.default, (b,))
        node.replace_all_uses_with(neg)
        return
    alpha = node.kwargs.get("alpha", 1)
    if a in dead and alpha != 1:
        with graph.inserting_after(node):
            scaled = graph.call_function(torch.ops.aten.mul.Tensor, (b, alpha))
        node.replace_all_uses_with(scaled)
        return
    node.replace_all_uses_with(alive)


def _owner(root: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, attr = name.rpartition(".")
    return (root.get_submodule(path) if path else root), attr


def _get(root: nn.Module, target: str) -> Any:
    owner, attr = _owner(root, target)
    return getattr(owner, attr)


def _modularize_batch_norm(gm: torch.fx.GraphModule) -> None:
    """aten.batch_norm(..., training=False, ...) calls -> call_module of ExportedBatchNorm."""
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or op_name(node.target) != "batch_norm":
            continue
        x, w, b, rm, rv = node.args[:5]
        momentum, eps = node.args[6], node.args[7]
        if not all(getattr(a, "op", None) == "get_attr" for a in (w, b, rm, rv)):
            continue
        weight, bias = _get(gm, w.target), _get(gm, b.target)
        bn = ExportedBatchNorm(weight.shape[0], eps=eps, momentum=momentum)
        bn.weight, bn.bias = weight, bias
        bn.running_mean, bn.running_var = _get(gm, rm.target), _get(gm, rv.target)
        name = f"erased_bn_{count}"
        count += 1
        gm.add_module(name, bn)
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module(name, (x,))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()


def _drop_unused_attributes(gm: torch.fx.GraphModule) -> None:
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    mod_used = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    for node in list(gm.graph.nodes):
        if node.op == "get_attr" and not node.users:
            gm.graph.erase_node(node)
            used.discard(node.target)
    for name, _ in list(gm.named_parameters()) + list(gm.named_buffers()):
        if name in used or any(name.startswith(m + ".") for m in mod_used):
            continue
        owner, attr = _owner(gm, name)
        owner._parameters.pop(attr, None)
        owner._buffers.pop(attr, None)
