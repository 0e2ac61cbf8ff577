"""Export a sub-network into a self-contained directory that :func:`lightning_oto.load` reads back.

One ``torch.export`` program is traced per export and serves both files: ``subnet.pt2`` and the ONNX
model (one file, weights embedded, below protobuf's 2 GB limit). Both carry the metadata inference
needs (input shape and dtype, normalisation, class names), and every file is reloaded through
:func:`lightning_oto.load` and compared with the sub-network. The files and what each is for are
listed in :mod:`lightning_oto.subnet.load`.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import time
import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch import nn
from torch.utils._pytree import TreeSpec

from ..graph.inputs import ModelInputs, args_and_kwargs, as_model_inputs, input_tensors, program_input_names
from ..graph.trace import concrete_size, export_program
from .load import (FILE_ROLES, MANIFEST_FILE, METADATA_FILE, METADATA_KEY, ONNX_FILE, PROGRAM_FILE,
                       STATE_DICT_FILE, OnnxModule, load_program)
from .verify import DEFAULT_ATOL, DEFAULT_RTOL, check_outputs

FORMATS = ("torch", "onnx")
METADATA_VERSION = 2  # 2: inputs by name (keyword inputs), example_shape beside the dynamic shape, call
_RESERVED = ("inputs", "call", "metadata_version")

# loggers that narrate the ONNX export step by step ("Removed 38 unused nodes", every registered op)
_CHATTY_LOGGERS = {"onnx_ir": logging.WARNING, "onnxscript": logging.WARNING, "torch.onnx": logging.ERROR}


@contextlib.contextmanager
def _quiet_onnx():
    """Keep the exporter's narration and prints off the user's terminal; real errors still raise."""
    loggers = {logging.getLogger(name): level for name, level in _CHATTY_LOGGERS.items()}
    before = {lg: lg.level for lg in loggers}
    for lg, level in loggers.items():
        lg.setLevel(level)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            # exporter-internal deprecation notices; the result is checked with onnxruntime instead
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        for lg, level in before.items():
            lg.setLevel(level)


# ---- metadata --------------------------------------------------------------------------------------
def _input_specs(program: Any, inputs: ModelInputs | None = None) -> list[dict[str, Any]]:
    """Per user input: its name (the keyword for dict inputs, else ``input_<i>``; the ONNX input names),
    ``shape`` (``None`` where the program keeps a dimension dynamic), ``example_shape`` (the example's
    sizes: a shape that runs, e.g. ``torch.rand(*example_shape)``) and dtype."""
    names = list(program.graph_signature.user_inputs)
    by_name = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    input_names = program_input_names(program)
    examples = input_tensors(inputs) if inputs is not None else []
    if isinstance(inputs, dict) and set(inputs) == set(input_names):  # by name: the program may order them
        examples = [inputs[n] for n in input_names]
    specs = []
    for i, name in enumerate(names):
        val = by_name[name].meta.get("val") if name in by_name else None
        if not isinstance(val, torch.Tensor):
            continue
        shape = [int(d) if isinstance(d, int) else None for d in val.shape]
        example = list(examples[i].shape) if i < len(examples) else [concrete_size(d) for d in val.shape]
        specs.append({"name": input_names[i], "shape": shape, "example_shape": [int(d) for d in example],
                      "dtype": str(val.dtype).replace("torch.", "")})
    return specs


def _build_metadata(user: Mapping[str, Any] | None, program: Any, inputs: ModelInputs | None = None) -> dict[str, Any]:
    meta = dict(user or {})  # a copy: the caller's dict is not touched
    clash = [k for k in _RESERVED if k in meta]
    if clash:
        raise ValueError(f"metadata keys {clash} are reserved: the input shapes and dtypes are recorded from the "
                         "example inputs.")
    meta["inputs"] = _input_specs(program, inputs)
    meta["call"] = "keywords" if isinstance(inputs, dict) else "positional"
    meta["metadata_version"] = METADATA_VERSION
    try:
        json.dumps(meta)
    except (TypeError, ValueError) as e:
        raise ValueError(f"metadata must be JSON-serialisable (numbers, strings, lists, dicts): {e}") from e
    return meta


# ---- tracing ---------------------------------------------------------------------------------------
def _program(sub: nn.Module, inputs: ModelInputs, dynamic_shapes: Any) -> Any:
    """The one program both files are written from.

    ``None``: a dynamic batch, as exports always had. ``"auto"`` or a torch.export spec: passed to
    :func:`export_program`, where a spec is strict (a dimension the model pins raises
    ``DynamicShapeError`` naming it).
    """
    if dynamic_shapes is not None:
        return export_program(sub, inputs, dynamic_shapes=dynamic_shapes)
    program = export_program(sub, inputs, dynamic_batch=True)
    if any(s["shape"] and s["shape"][0] is not None for s in _input_specs(program)):
        warnings.warn(f"torch.export could not keep the batch dimension of {type(sub).__name__} dynamic: "
                      f"{PROGRAM_FILE} accepts the example's batch size only (the ONNX model runs other batch "
                      "sizes in chunks).", stacklevel=3)
    return program


def plain_output_spec(spec: TreeSpec) -> TreeSpec:
    """The same leaves in builtin containers: a mapping (``transformers``' ``ModelOutput``, an OrderedDict)
    becomes a dict with its keys, any other container type a tuple. A file whose output structure names
    a class needs that class's code to load; the plain one loads in any Python process."""
    if spec.is_leaf():
        return spec
    children = [plain_output_spec(c) for c in spec.children_specs]
    if spec.type in (tuple, list, dict):
        return TreeSpec(spec.type, spec.context, children)
    keys = spec.context
    if isinstance(spec.type, type) and issubclass(spec.type, Mapping) and isinstance(keys, (list, tuple)) \
            and len(keys) == len(children):
        return TreeSpec(dict, list(keys), children)
    return TreeSpec(tuple, None, children)


def _plain_outputs(program: Any) -> None:
    """Give the program plain output containers (see :func:`plain_output_spec`); the computation is unchanged."""
    signature = program.module_call_graph[0].signature
    if signature is not None and signature.out_spec is not None:
        signature.out_spec = plain_output_spec(signature.out_spec)


# ---- writers ---------------------------------------------------------------------------------------
def _write_onnx(program: Any, inputs: ModelInputs, path: Path, meta: dict[str, Any]) -> None:
    """ONNX from the program; weights embedded unless the model is over 2 GB (the exporter decides). The
    input names are the program's, in its order (a dict's keys for keyword inputs)."""
    names = program_input_names(program)
    args, kwargs = args_and_kwargs(inputs)
    stale = path.with_name(path.name + ".data")  # a previous export's external weights
    if stale.exists():
        stale.unlink()
    with _quiet_onnx():
        onnx_program = torch.onnx.export(program, args, kwargs=kwargs or None, dynamo=True, verbose=False,
                                         input_names=names)
        onnx_program.model.metadata_props[METADATA_KEY] = json.dumps(meta)
        onnx_program.save(str(path), external_data=None)


def _remove_stale(out: Path, formats: tuple[str, ...]) -> None:
    """Drop a previous export's files of formats not written now: ``load(dir)`` must not find an old network."""
    stale = {"torch": (PROGRAM_FILE, STATE_DICT_FILE), "onnx": (ONNX_FILE, ONNX_FILE + ".data")}
    for fmt, names in stale.items():
        if fmt not in formats:
            for name in names:
                (out / name).unlink(missing_ok=True)


def _check(sub: nn.Module, loaded: nn.Module, inputs: ModelInputs, what: str, atol: float) -> str:
    err = check_outputs(sub, loaded, inputs, atol=atol, rtol=DEFAULT_RTOL, context=f"reloaded {what}")
    return f"{err:.3g}"


def export_subnet(sub: nn.Module, example_inputs: Any, out_dir: str | Path,
                  formats: Iterable[str] = FORMATS, check: bool = True, metadata: Mapping[str, Any] | None = None,
                  dynamic_shapes: Any = None, atol: float = DEFAULT_ATOL) -> dict[str, str]:
    """Write ``sub`` into ``out_dir`` so that ``lightning_oto.load(out_dir)`` gives it back; returns {kind: path}.

    ``example_inputs``: a tensor, a tuple, or a dict of keyword inputs (the files then take the same
    keywords; the ONNX inputs are named after them). ``formats``: ``"torch"`` (state dict +
    ``subnet.pt2``) and/or ``"onnx"``. ``metadata``: a JSON-able
    dict of what inference needs (see :func:`lightning_oto.data.inference.inference_metadata`); the input shapes and dtypes are
    added from the example inputs. ``dynamic_shapes``: a ``torch.export`` spec; default, a dynamic
    batch. With ``check``, every file is reloaded and compared with ``sub`` (``SubnetMismatchError``).
    Files of an earlier export into ``out_dir`` that this one does not rewrite are removed.
    """
    formats = tuple(formats)
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        raise ValueError(f"unknown export format(s) {bad}; choose from {FORMATS}.")
    inputs = as_model_inputs(example_inputs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _remove_stale(out, formats)
    t0 = time.perf_counter()
    was = sub.training
    sub.eval()
    try:
        program = _program(sub, inputs, dynamic_shapes)
        _plain_outputs(program)
        meta = _build_metadata(metadata, program, inputs)
        (out / METADATA_FILE).write_text(json.dumps(meta, indent=2))
        paths = {"metadata": str(out / METADATA_FILE)}
        if "torch" in formats:
            torch.save(sub.state_dict(), out / STATE_DICT_FILE)
            torch.export.save(program, out / PROGRAM_FILE, extra_files={METADATA_KEY: json.dumps(meta)})
            paths.update(state_dict=str(out / STATE_DICT_FILE), program=str(out / PROGRAM_FILE))
            if check:
                paths["program_check_error"] = _check(sub, load_program(out / PROGRAM_FILE), inputs, PROGRAM_FILE, atol)
        if "onnx" in formats:
            _write_onnx(program, inputs, out / ONNX_FILE, meta)
            paths["onnx"] = str(out / ONNX_FILE)
            if check:
                paths["onnx_check_error"] = _check(sub, OnnxModule(out / ONNX_FILE), inputs, ONNX_FILE, atol)
    finally:
        sub.train(was)
    paths["export_seconds"] = f"{time.perf_counter() - t0:.2f}"
    written = {name: role for name, role in FILE_ROLES.items() if (out / name).exists() or name == MANIFEST_FILE}
    (out / MANIFEST_FILE).write_text(json.dumps({**paths, "files": written}, indent=2))
    return paths
