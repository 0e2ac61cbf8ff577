"""Trace a model once into an :class:`OpGraph` (ATen-level, via non-strict ``torch.export``).

The graph keeps adjacency lists and, per node, the parameters it reads by their names in
``model.named_parameters()``, so every later pass is a plain O(V+E) walk that never touches
torch internals again.
"""
from __future__ import annotations


import logging
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
import torch.fx
from torch import nn

from ..errors import DynamicShapeError, TraceError
from . import dynamic
from .inputs import ModelInputs, args_and_kwargs, as_model_inputs, check_devices, input_tensors


def op_name(target: Any) -> str:
    """Short operator name: ``aten.conv2d.default`` -> ``conv2d``; ``operator.getitem`` -> ``getitem``."""
    if isinstance(target, str):
        return target
    name = getattr(target, "__name__", str(target))
    if hasattr(target, "_schema"):
        name = target._schema.name.split("::")[-1]
    return name.split(".")[0]


log = logging.getLogger("lightning_oto")


@dataclass
class OpNode:
    """One operator of the traced forward pass."""

    id: int
    name: str          # fx node name (unique)
    op: str            # short operator name, e.g. "conv2d"; "input" / "output" for graph boundaries
    kind: str          # input | output | op (what an op means is the rule registry's: space/rules)
    inputs: list[int] = field(default_factory=list)    # producer node ids (tensor args only)
    outputs: list[int] = field(default_factory=list)   # consumer node ids
    params: list[str] = field(default_factory=list)    # parameter names read directly
    buffers: list[str] = field(default_factory=list)   # buffer names read directly
    shape: tuple[int, ...] | None = None
    module: str = ""     # innermost module path that called the op ("" = top-level forward)
    module_type: str = ""
    fx_node: torch.fx.Node | None = field(default=None, repr=False, compare=False)


@dataclass
class OpGraph:
    """DAG of operators; ``nodes[i].inputs/outputs`` are the adjacency lists."""

    nodes: list[OpNode]
    input_ids: list[int]
    output_ids: list[int]
    param_shapes: dict[str, tuple[int, ...]]
    buffer_shapes: dict[str, tuple[int, ...]]
    program: Any = field(default=None, repr=False)  # the ExportedProgram
    placeholder_to_param: dict[str, str] = field(default_factory=dict, repr=False)
    placeholder_to_buffer: dict[str, str] = field(default_factory=dict, repr=False)
    dynamic_dims: list[list[int]] = field(default_factory=list)  # per input: dims kept symbolic in the trace

    def __len__(self) -> int:
        return len(self.nodes)

    @property
    def num_edges(self) -> int:
        return sum(len(n.outputs) for n in self.nodes)

    def topo_order(self) -> list[int]:
        # fx graphs are already topologically ordered; ids follow that order
        return list(range(len(self.nodes)))

    def summary(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for n in self.nodes:
            out[n.kind] = out.get(n.kind, 0) + 1
        return out


def normalize_inputs(model: nn.Module, example_inputs: Any) -> ModelInputs:
    """Validated example inputs (:mod:`lightning_oto.graph.inputs`) on the model's device."""
    inputs = as_model_inputs(example_inputs)
    check_devices(model, inputs)
    return inputs


def export_program(model: nn.Module, inputs: ModelInputs, dynamic_batch: bool = False,
                   dynamic_shapes: Any = None) -> Any:
    """Non-strict torch.export in eval mode; the model's mode is restored afterwards.

    ``dynamic_shapes``: ``None`` (static, or a dynamic batch with ``dynamic_batch``), ``"auto"``
    (every dimension the model allows stays dynamic; falls back to a dynamic batch, then static
    shapes, when export cannot), or a torch.export-style spec, which is strict: a dimension the model
    pins raises :class:`DynamicShapeError` naming it and what pins it.
    """
    was_training = model.training
    model.eval()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _export_with_shapes(model, inputs, dynamic_batch, dynamic_shapes)
    except DynamicShapeError:
        raise
    except Exception as e:  # noqa: BLE001 - re-raised with the tracer's reason
        raise TraceError(
            f"Could not trace {type(model).__name__} with torch.export (non-strict). The tracer said:\n"
            f"  {type(e).__name__}: {_first_lines(e)}\n"
            "Make the forward pass traceable (no data-dependent Python control flow on tensor values), "
            "or check that example_inputs match what forward() expects."
        ) from e
    finally:
        model.train(was_training)


def _first_lines(e: BaseException, n: int = 12) -> str:
    return "\n".join(str(e).strip().splitlines()[:n])


def _export(model: nn.Module, inputs: ModelInputs, spec: Any = None) -> Any:
    args, kwargs = args_and_kwargs(inputs)
    return torch.export.export(model, args, kwargs=kwargs or None, dynamic_shapes=spec, strict=False)


def _export_with_shapes(model: nn.Module, inputs: ModelInputs, dynamic_batch: bool, dynamic_shapes: Any) -> Any:
    if dynamic_shapes in (None, dynamic.STATIC) and not dynamic_batch:
        return _export(model, inputs)
    if dynamic_shapes in (None, dynamic.STATIC, dynamic.AUTO):
        wide = dynamic.widen_unit_batch(inputs)
        specs = [dynamic.auto_spec(wide)] if dynamic_shapes == dynamic.AUTO else []
        specs.append(dynamic.batch_spec(wide))
        for spec in specs:
            try:
                return _export(model, wide, spec)
            except Exception as e:  # noqa: BLE001 - fewer dynamic dimensions still give a correct program
                log.debug("lightning_oto: export with dynamic shapes %s failed (%s); trying fewer", spec,
                          str(e).splitlines()[0] if str(e) else type(e).__name__)
        return _export(model, inputs)
    wanted = dynamic.requested_dims(dynamic_shapes, inputs)
    try:
        return _export(model, inputs, dynamic_shapes)
    except Exception as e:  # noqa: BLE001 - say which dimension is pinned, and by what
        if "onstraint" not in str(e) and "specialized" not in str(e):
            raise
        why = dynamic.explain_pins(model, inputs, wanted)
        raise DynamicShapeError(
            "dynamic_shapes asks for dimensions the model does not allow to vary:\n  - " + "\n  - ".join(why)
            + "\nLeave them static (drop them from dynamic_shapes), or use dynamic_shapes='auto'.") from e


def _module_of(node: torch.fx.Node) -> tuple[str, str]:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return "", ""
    path, typ = list(stack.values())[-1]
    typ = typ if isinstance(typ, str) else getattr(typ, "__name__", str(typ))
    # export prefixes paths like "L['self'].layer1" in some versions; keep the dotted tail
    if "self" in path and "]" in path:
        path = path.split("]", 1)[-1].lstrip(".")
    return path, typ.split(".")[-1]


def concrete_size(s: Any) -> int:
    """A size as an int; a symbolic size reads as the example's value *without* adding a guard
    (``int(symint)`` would specialize the trace's dynamic dimension)."""
    if isinstance(s, torch.SymInt):
        hint = s.node.hint
        return int(hint) if hint is not None else int(s.node.shape_env.size_hint(s.node.expr))
    return int(s)


def concrete_shape(val: Any) -> tuple[int, ...] | None:
    """A tensor's shape as ints: symbolic sizes (a dynamic trace) read as the example's sizes."""
    if not isinstance(val, torch.Tensor):
        return None
    return tuple(concrete_size(s) for s in val.shape)


def _is_size_arithmetic(fx: torch.fx.Node) -> bool:
    """Nodes of a dynamic trace that compute sizes, not tensors (sym_size, SymInt math, shape asserts)."""
    if fx.op != "call_function":
        return False
    val = fx.meta.get("val")
    if isinstance(val, (torch.SymInt, torch.SymFloat, torch.SymBool)) or val is None:
        # a value read from tensor *contents* (item) is a real dependency: only metadata reads qualify
        return all(not isinstance(a.meta.get("val"), torch.Tensor) for a in fx.all_input_nodes) or \
            op_name(fx.target) in ("sym_size", "sym_numel", "sym_stride", "sym_storage_offset")
    return False


def _tensor_args(node: torch.fx.Node) -> list[torch.fx.Node]:
    out: list[torch.fx.Node] = []

    def visit(a: Any) -> None:
        if isinstance(a, torch.fx.Node):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            for b in a:
                visit(b)
        elif isinstance(a, dict):
            for b in a.values():
                visit(b)

    visit(node.args)
    visit(node.kwargs)
    return out


def _state_shapes(program: Any, params: Iterable[str], buffers: Iterable[str]
                  ) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
    """Shapes of the parameters and buffers the program reads (buffers may live in its constants)."""
    state = program.state_dict
    consts = getattr(program, "constants", {}) or {}
    param_shapes = {n: tuple(int(d) for d in state[n].shape) for n in params if n in state}
    buffer_shapes = {n: tuple(int(d) for d in (state.get(n) if n in state else consts[n]).shape)
                     for n in buffers if n in state or n in consts}
    return param_shapes, buffer_shapes


def _op_node(nid: int, fx: torch.fx.Node, index: dict[torch.fx.Node, int], ph_param: dict[str, str],
             ph_buffer: dict[str, str]) -> OpNode:
    """One call of the trace: its operator, shape, module, and what it reads (parameters, buffers, tensors)."""
    mod, mtyp = _module_of(fx)
    node = OpNode(nid, fx.name, op_name(fx.target), "op", shape=concrete_shape(fx.meta.get("val")), module=mod,
                  module_type=mtyp, fx_node=fx)
    for a in _tensor_args(fx):
        if a.op == "placeholder" and a.name in ph_param:
            node.params.append(ph_param[a.name])
        elif a.op == "placeholder" and a.name in ph_buffer:
            node.buffers.append(ph_buffer[a.name])
        elif a in index:
            node.inputs.append(index[a])
    return node


def _canonical_names(ph_param: dict[str, str], state: dict[str, Any]) -> dict[str, str]:
    """A tied parameter (an LM head sharing the embedding) reaches the program as one placeholder per name; each
    is named as ``model.named_parameters()`` names it, by its first name, so the groups and every lookup agree."""
    first: dict[int, str] = {}
    for name, t in state.items():
        first.setdefault(id(t), name)
    return {ph: first.get(id(state[name]), name) if name in state else name for ph, name in ph_param.items()}


def build_graph(program: Any) -> OpGraph:
    """Convert an ExportedProgram into an OpGraph in one pass over its fx nodes."""
    dynamic_dims = dynamic.symbolic_dims(program)
    sig = program.graph_signature
    ph_param = _canonical_names(dict(sig.inputs_to_parameters), program.state_dict)
    ph_buffer = dict(sig.inputs_to_buffers)
    ph_const = set(getattr(sig, "inputs_to_lifted_tensor_constants", {}) or {})
    param_shapes, buffer_shapes = _state_shapes(program, ph_param.values(), ph_buffer.values())
    nodes: list[OpNode] = []
    index: dict[torch.fx.Node, int] = {}
    input_ids: list[int] = []
    output_ids: list[int] = []
    for fx in program.graph.nodes:
        if fx.op == "placeholder":
            if fx.name in ph_param or fx.name in ph_buffer or fx.name in ph_const:
                continue
            val = fx.meta.get("val")
            if not isinstance(val, torch.Tensor):
                continue
            nid = len(nodes)
            nodes.append(OpNode(nid, fx.name, "input", "input", shape=concrete_shape(val), fx_node=fx))
            index[fx] = nid
            input_ids.append(nid)
            continue
        if fx.op == "output":
            nid = len(nodes)
            node = OpNode(nid, "output", "output", "output", fx_node=fx)
            nodes.append(node)
            for a in _tensor_args(fx):
                if a in index:
                    node.inputs.append(index[a])
            output_ids.append(nid)
            continue
        if fx.op != "call_function" or _is_size_arithmetic(fx):
            continue
        node = _op_node(len(nodes), fx, index, ph_param, ph_buffer)
        nodes.append(node)
        index[fx] = node.id
    for n in nodes:
        for i in n.inputs:
            nodes[i].outputs.append(n.id)
    return OpGraph(nodes, input_ids, output_ids, param_shapes, buffer_shapes, program, ph_param, ph_buffer,
                   dynamic_dims)


def trace(model: nn.Module, example_inputs: Any, dynamic_shapes: Any = None) -> OpGraph:
    """Trace ``model`` on ``example_inputs`` (tensor, tuple or dict of keyword inputs) into an OpGraph; the model is not modified.

    ``dynamic_shapes``: see :func:`export_program` (``"auto"`` keeps every dimension the model
    allows dynamic; the OpGraph's shapes are always the example's sizes).
    """
    inputs = normalize_inputs(model, example_inputs)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    program = export_program(model, inputs, dynamic_shapes=dynamic_shapes)
    # non-strict export runs forward on fake tensors; make sure nothing leaked into the user's state
    after = model.state_dict()
    for k, v in before.items():
        if k in after and not torch.equal(after[k], v):
            with torch.no_grad():
                after[k].copy_(v)
    return build_graph(program)


__all__ = ["OpGraph", "OpNode", "TraceError", "trace", "build_graph", "normalize_inputs", "op_name",
           "export_program", "check_devices", "input_tensors"]
