"""Remove every operator whose result cannot reach an output, whatever fx thinks of its purity.

``Graph.eliminate_dead_code`` keeps nodes it deems impure: random ops (``dropout``,
``scaled_dot_product_attention``) and in-place ops (``add_``, ``relu_``).  For an erased branch
that keeps the whole branch alive.  Here liveness is computed from the outputs backwards, with
mutations handled through alias roots:

- an in-place op / view returns an alias of its input: both share one *root* (storage);
- a mutation matters only if its root is live (read by a live node) or visible outside the graph
  (a placeholder or a parameter/buffer): then the mutating node is live too;
- a non-tensor effect (a shape assertion) stays only while every tensor it checks is live.
"""
from __future__ import annotations

import operator
from typing import Iterable

import torch
import torch.fx


def _schema(node: torch.fx.Node):
    return getattr(node.target, "_schema", None) if node.op == "call_function" else None


def _aliased_input(node: torch.fx.Node) -> torch.fx.Node | None:
    """The input whose storage ``node``'s result shares (views, in-place ops, getitem of such), or None."""
    if node.op == "call_function" and node.target is operator.getitem:
        src = node.args[0]
        return src if isinstance(src, torch.fx.Node) else None
    schema = _schema(node)
    if schema is None or not schema.returns or schema.returns[0].alias_info is None:
        return None
    sets = schema.returns[0].alias_info.before_set
    for arg, value in zip(schema.arguments, _bound_args(node, schema)):
        if arg.alias_info is not None and arg.alias_info.before_set & sets and isinstance(value, torch.fx.Node):
            return value
    return None


def _bound_args(node: torch.fx.Node, schema) -> list:
    values = list(node.args)
    for arg in schema.arguments[len(values):]:
        values.append(node.kwargs.get(arg.name))
    return values


def written_inputs(node: torch.fx.Node) -> list[torch.fx.Node]:
    schema = _schema(node)
    if schema is None:
        return []
    return [v for a, v in zip(schema.arguments, _bound_args(node, schema))
            if a.alias_info is not None and a.alias_info.is_write and isinstance(v, torch.fx.Node)]


def alias_roots(graph: torch.fx.Graph) -> dict[torch.fx.Node, torch.fx.Node]:
    """node -> the node that owns its storage (itself unless it is a view / in-place result)."""
    root: dict[torch.fx.Node, torch.fx.Node] = {}
    for node in graph.nodes:
        src = _aliased_input(node)
        root[node] = root.get(src, src) if src is not None else node
    return root


def _is_effect(node: torch.fx.Node) -> bool:
    """A node kept for what it does, not what it returns (assertions, guard checks, unknown calls)."""
    if node.op == "call_module":
        return True
    if node.op != "call_function" or written_inputs(node):
        return False
    if _schema(node) is not None:
        return node.meta.get("val", 0) is None  # aten asserts return None; random ops return tensors
    return node.is_impure()


def live_nodes(graph: torch.fx.Graph) -> set[torch.fx.Node]:
    """Nodes that contribute to an output or to state visible outside the graph."""
    root = alias_roots(graph)
    mutators: dict[torch.fx.Node, list[torch.fx.Node]] = {}
    forced: list[torch.fx.Node] = []
    for node in graph.nodes:
        if node.op in ("output", "placeholder"):
            forced.append(node)
        for w in written_inputs(node):
            r = root[w]
            mutators.setdefault(r, []).append(node)
            if r.op in ("placeholder", "get_attr"):
                forced.append(node)  # a mutation of an input or a buffer is visible outside
    live: set[torch.fx.Node] = set()
    _close(forced, live, root, mutators)
    effects = [n for n in graph.nodes if _is_effect(n) and n not in live]
    for node in effects:
        if all(t in live for t in _tensor_sources(node)):
            _close([node], live, root, mutators)
    return live


def _close(start: Iterable[torch.fx.Node], live: set[torch.fx.Node], root: dict, mutators: dict) -> None:
    stack = list(start)
    while stack:
        node = stack.pop()
        if node in live:
            continue
        live.add(node)
        stack.extend(node.all_input_nodes)
        stack.extend(mutators.get(root.get(node, node), ()))


def _tensor_sources(node: torch.fx.Node) -> set[torch.fx.Node]:
    """The tensor-valued nodes an effect reads, looking through size arithmetic (sym_size, SymInt math)."""
    out: set[torch.fx.Node] = set()
    stack, seen = list(node.all_input_nodes), set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if isinstance(n.meta.get("val"), torch.Tensor) or n.op in ("placeholder", "get_attr"):
            out.add(n)
        else:
            stack.extend(n.all_input_nodes)
    return out


def remove_dead(graph: torch.fx.Graph) -> int:
    """Erase every call/get_attr node that is not live; returns how many were erased."""
    live = live_nodes(graph)
    dead = [n for n in graph.nodes if n not in live and n.op in ("call_function", "call_method", "call_module",
                                                                   "get_attr")]
    for node in reversed(dead):
        graph.erase_node(node)
    return len(dead)


__all__ = ["alias_roots", "live_nodes", "remove_dead", "written_inputs"]
