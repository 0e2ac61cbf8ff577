"""Dynamic input dimensions: which ones the trace keeps symbolic, and why a requested one cannot stay.

``"auto"`` (the default) asks torch.export to keep every dimension of every input dynamic where the
model allows it (``Dim.AUTO``): batch, sequence length, image size of a fully convolutional model.
The dimensions the model pins (a linear over a flattened map, position embeddings of a fixed length)
quietly become static, exactly as the full model only accepts those sizes.  A user-given spec
(torch.export style) is strict: a dimension the model pins is an error naming the dimension, the
value it is pinned to, and the source line / operator that pins it.
"""
from __future__ import annotations

import inspect
import logging
import os
import re
import traceback
from typing import Any, Sequence

import torch
from torch.export import Dim
from torch.utils._pytree import tree_map_only

from .inputs import ModelInputs, args_and_kwargs, input_tensors, map_tensors

AUTO = "auto"
STATIC = "static"


def auto_spec(inputs: ModelInputs) -> Any:
    """Every dimension of every input may stay dynamic (torch.export decides); size-1 dimensions are static
    (torch specializes them anyway, with a warning). Same structure as ``inputs`` (a dict for keyword inputs)."""
    return tree_map_only(torch.Tensor, lambda t: {d: Dim.AUTO for d in range(t.dim()) if t.shape[d] != 1} or None
                         if t.dim() else None, inputs)


def batch_spec(inputs: ModelInputs) -> Any:
    return tree_map_only(torch.Tensor, lambda t: {0: Dim.AUTO} if t.dim() else None, inputs)


def widen_unit_batch(inputs: ModelInputs) -> ModelInputs:
    """A batch of 1 would be specialized (torch's 0/1 rule): trace a batch of 2 copies instead."""
    return map_tensors(lambda t: t.expand(2, *t.shape[1:]).contiguous() if t.dim() > 0 and t.shape[0] == 1 else t,
                       inputs)


def symbolic_dims(program: Any) -> list[list[int]]:
    """Per user input of ``program``: the dimensions that stayed symbolic."""
    sig = program.graph_signature
    user = set(sig.user_inputs)
    out: list[list[int]] = []
    for node in program.graph.nodes:
        if node.op != "placeholder" or node.name not in user:
            continue
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            out.append([])
            continue
        out.append([d for d, s in enumerate(val.shape) if isinstance(s, torch.SymInt) and s.node.expr.free_symbols])
    return out


def spec_for(dims: Sequence[Sequence[int]], names: Sequence[str] | None = None) -> Any:
    """torch.export ``dynamic_shapes`` keeping ``dims`` dynamic (e.g. to re-export a sub-network);
    with ``names`` (keyword inputs) a dict keyed by them."""
    spec = tuple({d: Dim.AUTO for d in ds} or None for ds in dims)
    return dict(zip(names, spec)) if names is not None else spec


def requested_dims(spec: Any, inputs: ModelInputs) -> list[list[int]]:
    """Per input tensor, the dimensions a torch.export-style spec (tuple/list of dicts, or a dict keyed by
    argument names) marks dynamic."""
    n_inputs = len(input_tensors(inputs))
    if isinstance(spec, dict) and spec and all(isinstance(k, str) for k in spec):
        if isinstance(inputs, dict):
            unknown = sorted(set(spec) - set(inputs))
            if unknown:
                raise ValueError(f"dynamic_shapes names {unknown}, which are not among the example inputs "
                                 f"{list(inputs)}.")
            spec = [spec.get(k) for k in inputs]
        else:
            spec = list(spec.values())
    if not isinstance(spec, (tuple, list)) or len(spec) != n_inputs:
        raise ValueError(f"dynamic_shapes must give one entry per example input ({n_inputs}), got {spec!r}.")
    out: list[list[int]] = []
    for entry in spec:
        if entry is None:
            out.append([])
        elif isinstance(entry, dict):
            out.append(sorted(int(d) for d, v in entry.items() if v is not None and v is not Dim.STATIC))
        elif isinstance(entry, (tuple, list)):
            out.append([d for d, v in enumerate(entry) if v is not None and v is not Dim.STATIC])
        else:
            raise ValueError(f"cannot read the dynamic_shapes entry {entry!r}: use {{dim: Dim(...)}} or None.")
    return out


class _GuardLog(logging.Handler):
    """Records where the symbolic-shape engine created symbols and pinned them (user source line)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.sources: dict[str, str] = {}     # symbol -> "L['x'].size()[1]"
        self.pins: list[tuple[str, str, str]] = []  # (guard expression, framework location, user line)

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if msg.startswith("create_symbol "):
            parts = msg.split()
            if len(parts) >= 6 and parts[4] == "for":  # create_symbol s27 = 16 for L['ids'].size()[1] ...
                self.sources[parts[1]] = parts[5]
        elif "[guard added]" in msg and "Eq(" in msg:
            expr = msg.split("[guard added]")[0].replace("eval", "", 1).strip()
            where = msg.split("[guard added]")[1].split(", for more info")[0].strip()
            self.pins.append((expr, where, _user_line()))


def _user_line() -> str:
    """The innermost stack frame outside torch and lightning_oto: the model code that pinned a size."""
    skip = (os.sep + "torch" + os.sep, os.sep + "lightning_oto" + os.sep + "graph", "logging" + os.sep)
    for frame in reversed(traceback.extract_stack()):
        if not any(s in frame.filename for s in skip) and not frame.filename.startswith("<"):
            return f"{frame.filename}:{frame.lineno} in {frame.name}: {(frame.line or '').strip()}"
    return "unknown location"


def explain_pins(model: torch.nn.Module, inputs: ModelInputs, requested: list[list[int]]) -> list[str]:
    """Re-trace with ``Dim.AUTO`` on the requested dims and say, per pinned dim, what pinned it."""
    keywords = list(inputs) if isinstance(inputs, dict) else None
    spec = spec_for(requested, keywords)
    args, kwargs = args_and_kwargs(inputs)
    logger = logging.getLogger("torch.fx.experimental.symbolic_shapes")
    handler = _GuardLog()
    old = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        program = torch.export.export(model, args, kwargs=kwargs or None, dynamic_shapes=spec, strict=False)
    except Exception as e:  # noqa: BLE001 - the explanation is best effort; the caller raises anyway
        return [f"torch.export could not trace it with these dimensions dynamic: {str(e).splitlines()[0]}"]
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)
    kept = symbolic_dims(program)
    tensors = input_tensors(inputs)
    names = keywords or _argument_names(model, len(tensors))
    out = []
    for i, dims in enumerate(requested):
        for d in dims:
            if d in kept[i]:
                continue
            suffixes = (f"['{names[i]}'].size()[{d}]", f"[{i}].size()[{d}]")
            syms = [s for s, src in handler.sources.items() if src.endswith(suffixes)]
            pin = next((p for p in handler.pins if any(_mentions(p[0], s) for s in syms)), None)
            size = int(tensors[i].shape[d])
            which = f"input {names[i]!r}" if keywords else f"input {i}"
            if pin is None:
                out.append(f"{which} dimension {d} is fixed to {size} by the model")
            else:
                op = pin[1].strip("()").split(" in ")[-1].removeprefix("meta_")
                out.append(f"{which} dimension {d} is fixed to {size} by the operator {op} at {pin[2]}")
    return out


def _argument_names(model: torch.nn.Module, n: int) -> list[str]:
    try:
        params = [p for p in inspect.signature(model.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        params = []
    names = [p.name for p in params[:n]]
    return names + [f"arg{i}" for i in range(len(names), n)]


def _mentions(expr: str, symbol: str) -> bool:
    return re.search(rf"\b{re.escape(symbol)}\b", expr) is not None


__all__ = ["AUTO", "STATIC", "auto_spec", "batch_spec", "widen_unit_batch", "symbolic_dims", "spec_for",
           "requested_dims", "explain_pins"]
