"""Example inputs: positional (a tensor, a tuple) or keyword (a dict), the one home for how a model is called.

Two forms, as ``torch.export`` takes them:

- a tensor or a tuple: ``model(*inputs)``. An element may itself be a dict / list / tuple of tensors
  (``forward(self, batch)`` taking a dict is ``OTO(model, (batch,))``);
- a dict (also a ``transformers`` ``BatchEncoding``): keyword inputs, ``model(**inputs)``, as Hugging
  Face models take ``{"input_ids": ..., "attention_mask": ...}``.

Every leaf must be a tensor: a constant argument (``None``, a flag) is not an input of the traced
program, so it belongs in the model (its config) or in a small wrapper module; the error says so.
Normalised inputs are plain data: a ``tuple`` or a ``dict[str, Tensor]``.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Union

import torch
from torch import nn
from torch.utils._pytree import MappingKey, SequenceKey, tree_flatten, tree_map, tree_unflatten, tree_flatten_with_path

#: normalised example inputs: positional (tuple) or keyword (dict name -> tensor)
ModelInputs = Union[tuple, dict]


def as_model_inputs(example_inputs: Any) -> ModelInputs:
    """A tensor / tuple / list -> tuple; a mapping -> dict of keyword inputs; anything else a clear error."""
    if example_inputs is None:
        raise ValueError(
            "example_inputs is required: pass a tensor (or a tuple of tensors) shaped like one batch of real "
            "input, e.g. OTO(model, torch.randn(1, 3, 32, 32)), or a dict of keyword inputs, e.g. "
            "OTO(model, {'input_ids': ids, 'attention_mask': mask}).")
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, Mapping):
        return _keyword_inputs(example_inputs)
    if isinstance(example_inputs, list):
        example_inputs = tuple(example_inputs)
    if not isinstance(example_inputs, tuple) or not example_inputs:
        raise TypeError(f"example_inputs must be a tensor or a non-empty tuple of tensors, or a dict of keyword "
                        f"inputs, got {type(example_inputs).__name__}.")
    return tuple(_nested(v, f"example_inputs[{i}]") for i, v in enumerate(example_inputs))


def _keyword_inputs(mapping: Mapping) -> dict[str, torch.Tensor]:
    if not mapping:
        raise ValueError("example_inputs is an empty dict: give the model's keyword inputs, e.g. "
                         "{'input_ids': ids, 'attention_mask': mask}.")
    out: dict[str, torch.Tensor] = {}
    for key, value in mapping.items():
        if not isinstance(key, str) or not key.isidentifier():
            raise TypeError(f"example_inputs has the key {key!r}: a dict of example inputs means model(**inputs), so "
                            "every key must be the name of a keyword argument of forward().")
        if not isinstance(value, torch.Tensor):
            raise TypeError(_not_a_tensor(f"example_inputs[{key!r}]", value))
        out[key] = value
    return out


def _nested(value: Any, where: str) -> Any:
    """A positional input: a tensor, or a dict / list / tuple of tensors (``forward(self, batch)``)."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, Mapping):
        if not value:
            raise ValueError(f"{where} is an empty dict.")
        return {k: _nested(v, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(value, (list, tuple)) and value:
        return type(value)(_nested(v, f"{where}[{i}]") for i, v in enumerate(value))
    raise TypeError(_not_a_tensor(where, value))


def _not_a_tensor(where: str, value: Any) -> str:
    return (f"{where} is a {type(value).__name__} ({value!r:.40}); every example input must be a torch.Tensor. A "
            "constant argument (None, a flag, a number) is not an input of the traced network: leave it out (the "
            "forward's default applies), set it in the model's config, or wrap the model in a module whose forward "
            "passes it.")


def call_model(model: Callable[..., Any], inputs: ModelInputs) -> Any:
    """``model(**inputs)`` for keyword inputs, ``model(*inputs)`` for positional ones."""
    return model(**inputs) if isinstance(inputs, Mapping) else model(*inputs)


def args_and_kwargs(inputs: ModelInputs) -> tuple[tuple, dict[str, Any]]:
    """(args, kwargs) as ``torch.export.export`` and ``torch.onnx.export`` take them."""
    return ((), dict(inputs)) if isinstance(inputs, dict) else (tuple(inputs), {})


def input_tensors(inputs: ModelInputs) -> list[torch.Tensor]:
    """Every input tensor, in the order the traced program's user inputs have (pytree order)."""
    return [t for t in tree_flatten(inputs)[0] if isinstance(t, torch.Tensor)]


def map_tensors(fn: Callable[[torch.Tensor], Any], inputs: ModelInputs) -> ModelInputs:
    """``inputs`` with ``fn`` applied to every tensor (same structure): moving, slicing, widening."""
    return tree_map(lambda t: fn(t) if isinstance(t, torch.Tensor) else t, inputs)


def describe(inputs: ModelInputs) -> str:
    """Shapes for messages: ``input_ids (2, 8), attention_mask (2, 8)`` or ``(2, 3, 32, 32)``."""
    if isinstance(inputs, dict):
        return ", ".join(f"{k} {tuple(v.shape)}" for k, v in inputs.items())
    return ", ".join(str(tuple(t.shape)) for t in input_tensors(inputs))


def program_input_names(program: Any) -> list[str]:
    """One name per user input of a ``torch.export`` program, in its order: a keyword input's name, the
    key path inside a positional dict (``input_ids``), else ``input_<i>`` for the i-th positional tensor."""
    spec = program.call_spec.in_spec
    paths = [path for path, _ in tree_flatten_with_path(tree_unflatten(list(range(spec.num_leaves)), spec))[0]]
    names = [_leaf_name(path) for path in paths]
    if len(set(names)) < len(names):  # the same key in two positional dicts: keep the position
        names = [_leaf_name(path, qualified=True) for path in paths]
    return names


def _leaf_name(path: tuple, qualified: bool = False) -> str:
    """``(args|kwargs, key, *inner)`` -> a name; the first key is the position or the keyword."""
    where, first, *inner = path
    is_kwarg = isinstance(where, SequenceKey) and where.idx == 1
    head = str(first.key) if is_kwarg and isinstance(first, MappingKey) else f"input_{getattr(first, 'idx', 0)}"
    tail = [str(k.key) if isinstance(k, MappingKey) else str(getattr(k, "idx", k)) for k in inner]
    if not tail:
        return head
    return "_".join(([head] if qualified or is_kwarg else []) + tail)


def check_devices(model: nn.Module, inputs: ModelInputs) -> None:
    """The model's parameters on one device, and the example inputs there too."""
    devs = {p.device for p in model.parameters()} | {b.device for b in model.buffers()}
    in_devs = {t.device for t in input_tensors(inputs)}
    if len(devs) > 1:
        raise ValueError(f"The model's parameters live on several devices ({sorted(map(str, devs))}); "
                         "move the whole model to one device first (model.to(device)).")
    if devs and in_devs and devs != in_devs:
        raise ValueError(
            f"The model's parameters are on {next(iter(devs))} but the example input is on "
            f"{sorted(map(str, in_devs))}: move the example input with x.to({str(next(iter(devs)))!r}).")


__all__ = ["ModelInputs", "as_model_inputs", "call_model", "args_and_kwargs", "input_tensors", "map_tensors",
           "describe", "program_input_names", "check_devices"]
