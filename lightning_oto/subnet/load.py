"""Load an exported sub-network back as a plain ``nn.Module``: ``lightning_oto.load(path)``.

What an export directory (written by :func:`lightning_oto.subnet.export.export_subnet`) holds and what
each file is for:

- ``subnet.pt2``: the ``torch.export`` program. Self-contained (architecture + weights, no pickled
  code) in both modes; ``load(dir)`` uses it first.
- ``subnet.onnx``: the same network for ONNX runtimes, one file (weights embedded) below protobuf's
  2 GB limit.
- ``subnet_state_dict.pt``: the weights alone. In prune mode the sub-network is your own class with
  fewer channels: ``load(state_dict, model=YourNet())`` shrinks a fresh instance to the saved shapes
  and loads it. In erase mode it matches the module ``load(dir)`` returns (same keys).
- ``metadata.json``: what inference needs (per input its name, dynamic ``shape`` with ``null`` for a
  dynamic dimension, ``example_shape`` and dtype; ``call``: positional or keywords; normalisation,
  class names); the
  program and the ONNX file carry a copy, so a single file loads with its metadata too.
- ``export_manifest.json``: the paths, the reload checks' errors and these descriptions.

Neither ``.pt2`` nor ``.onnx`` contains pickled Python; the state dict is read with
``torch.load(weights_only=True)``. So loading a downloaded export does not execute its code.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.fx
from torch import nn

from ..graph.inputs import input_tensors
from .erase import modularize, program_module
from .slim import slim_copy

PROGRAM_FILE = "subnet.pt2"
ONNX_FILE = "subnet.onnx"
STATE_DICT_FILE = "subnet_state_dict.pt"
METADATA_FILE = "metadata.json"
MANIFEST_FILE = "export_manifest.json"
METADATA_KEY = "lightning_oto_metadata.json"  # name of the metadata inside .pt2 extra files / ONNX metadata_props

FILE_ROLES = {
    PROGRAM_FILE: "torch.export program: architecture + weights, no pickled code; lightning_oto.load(dir) "
                  "uses it (both modes).",
    ONNX_FILE: "ONNX model for onnxruntime and other runtimes, weights embedded (one file below 2 GB).",
    STATE_DICT_FILE: "weights only. prune mode: lightning_oto.load(this, model=YourNet()) shrinks a fresh "
                     "instance of your class to these shapes; erase mode: same keys as lightning_oto.load(dir).",
    METADATA_FILE: "what inference needs: input shape/dtype, normalisation, class names (also inside the "
                   ".pt2 and .onnx files).",
    MANIFEST_FILE: "this list, the file paths and the reload checks' max |difference| to the sub-network.",
}

_STATE_DICT_SUFFIXES = (".pt", ".pth", ".bin")


# ---- public entry point ---------------------------------------------------------------------------
def load(path: str | Path, model: nn.Module | None = None) -> nn.Module:
    """Load an exported sub-network as a plain ``nn.Module`` (``eval()``, ``train()``, ``to()`` work).

    ``path``: an export directory (its ``subnet.pt2``, else ``subnet.onnx``), a ``.pt2`` program, a
    ``.onnx`` file, or a state dict (``.pt``/``.pth``) together with ``model``, the architecture to
    load it into (not modified: a resized copy is returned). The module comes back in eval mode and
    carries ``oto_metadata`` (dict) when the export recorded metadata.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist; pass an export directory (the OTOCallback's export_dir, "
                                f"e.g. outputs/<date>/<time>/oto), a {PROGRAM_FILE} or a {ONNX_FILE} file.")
    if p.is_dir():
        p = _pick_file(p, model)
    suffix = p.suffix.lower()
    if suffix == ".pt2":
        module = load_program(p)
    elif suffix == ".onnx":
        module = OnnxModule(p)
    elif suffix in _STATE_DICT_SUFFIXES:
        module = load_state_dict_into(p, model)
    else:
        raise ValueError(f"{p}: cannot load a {suffix or 'suffix-less'} file; use an export directory, a .pt2 "
                         "(torch.export program), a .onnx file, or a state dict (.pt/.pth) with model=YourNet().")
    if getattr(module, "oto_metadata", None) is None:
        meta = _read_metadata_file(p.parent)
        if meta is not None:
            module.oto_metadata = meta
    return module.eval()


def _pick_file(directory: Path, model: nn.Module | None) -> Path:
    """The file ``load(dir)`` reads: the state dict when a model is given, else the program, else ONNX."""
    if model is not None:
        if (directory / STATE_DICT_FILE).exists():
            return directory / STATE_DICT_FILE
        raise FileNotFoundError(f"{directory}: model= was given but there is no {STATE_DICT_FILE} to load into it.")
    for name in (PROGRAM_FILE, ONNX_FILE):
        if (directory / name).exists():
            return directory / name
    hint = (f" It holds {STATE_DICT_FILE} only: load it into your architecture with "
            f"lightning_oto.load(path, model=YourNet()).") if (directory / STATE_DICT_FILE).exists() else ""
    raise FileNotFoundError(f"{directory}: no {PROGRAM_FILE} or {ONNX_FILE} in this directory (is it an export "
                            f"directory, e.g. the OTOCallback's export_dir?).{hint}")


# ---- metadata ---------------------------------------------------------------------------------------
def _read_metadata_file(directory: Path) -> dict[str, Any] | None:
    f = directory / METADATA_FILE
    return json.loads(f.read_text()) if f.is_file() else None


def _parse_metadata(text: Any) -> dict[str, Any] | None:
    if isinstance(text, bytes):
        text = text.decode()
    return json.loads(text) if text else None


# ---- torch.export program -----------------------------------------------------------------------------
def load_program(path: str | Path) -> nn.Module:
    """A ``.pt2`` program as a trainable ``torch.fx.GraphModule`` whose state-dict keys match the original.

    ``ExportedProgram.module()`` refuses ``eval()``/``train()`` because the program was traced in one
    mode. Batch norms and dropouts are turned back into modules here, so the mode switch is real and
    the refusal can go: ``eval()`` computes what the program computes, ``train()`` what the network
    computed in training mode (e.g. for fine-tuning).
    """
    extra = {METADATA_KEY: ""}
    program = torch.export.load(str(path), extra_files=extra)
    gm = program_module(program)
    modularize(gm)  # the same step erase construction ends with: modules at the parameters' own paths
    gm.eval()
    meta = _parse_metadata(extra.get(METADATA_KEY))
    if meta is not None:
        gm.oto_metadata = meta
    return gm


# ---- ONNX ------------------------------------------------------------------------------------------
class OnnxModule(nn.Module):
    """An ONNX file run by onnxruntime (CPU) behind an ``nn.Module`` interface.

    Outputs come back on the inputs' device. A graph exported with a fixed batch size ``B`` runs other
    batch sizes in chunks of ``B`` (the last one zero-padded): an exported network is in eval mode,
    where samples do not interact. ``train()`` changes nothing: the ONNX graph is an inference graph.
    """

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        import onnxruntime as ort

        self.path = str(path)
        self.session = ort.InferenceSession(self.path, providers=["CPUExecutionProvider"])
        ins = self.session.get_inputs()
        self.input_names = [i.name for i in ins]
        dims = [i.shape[0] if i.shape else None for i in ins]
        self.fixed_batch = dims[0] if dims and all(isinstance(d, int) and d == dims[0] for d in dims) else None
        props = self.session.get_modelmeta().custom_metadata_map
        meta = _parse_metadata(props.get(METADATA_KEY))
        if meta is not None:
            self.oto_metadata = meta
        self.eval()

    def _run(self, arrays: Sequence[Any]) -> list[torch.Tensor]:
        return [torch.from_numpy(o) for o in self.session.run(None, dict(zip(self.input_names, arrays)))]

    def forward(self, *args: Any, **kwargs: torch.Tensor) -> Any:
        """Positional tensors (a dict argument counts as its values, in order), or the export's keyword
        inputs by name (``model(input_ids=..., attention_mask=...)``)."""
        inputs = self._ordered(args, kwargs)
        device = inputs[0].device if inputs else torch.device("cpu")
        arrays = [t.detach().cpu().numpy() for t in inputs]
        n = arrays[0].shape[0] if arrays and arrays[0].ndim else None
        B = self.fixed_batch
        if B is None or n is None or n == B or any(a.ndim == 0 or a.shape[0] != n for a in arrays):
            outs = self._run(arrays)
        else:
            outs = self._run_in_chunks(arrays, n, B)
        outs = [o.to(device) for o in outs]
        return outs[0] if len(outs) == 1 else tuple(outs)

    def _ordered(self, args: tuple, kwargs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        if len(args) == 1 and isinstance(args[0], dict) and not kwargs:  # forward(self, batch): by its keys
            args, kwargs = (), args[0]
        if not kwargs:
            return input_tensors(args)
        missing = [n for n in self.input_names if n not in kwargs]
        unknown = sorted(set(kwargs) - set(self.input_names))
        if args or missing or unknown:
            raise TypeError(f"{Path(self.path).name} takes the inputs {self.input_names} (all by keyword, or all "
                            f"in this order); got {len(args)} positional and the keywords {sorted(kwargs)}.")
        return [kwargs[n] for n in self.input_names]

    def _run_in_chunks(self, arrays: list[Any], n: int, B: int) -> list[torch.Tensor]:
        import numpy as np

        parts: list[list[torch.Tensor]] = []
        for s in range(0, n, B):
            chunk = [a[s:s + B] for a in arrays]
            m = chunk[0].shape[0]
            if m < B:
                chunk = [np.concatenate([c, np.zeros((B - m,) + c.shape[1:], c.dtype)]) for c in chunk]
            parts.append([o[:m] if o.dim() and o.shape[0] == B else o for o in self._run(chunk)])
        return [torch.cat(ps) if ps[0].dim() and ps[0].shape[0] != 0 else ps[0] for ps in zip(*parts)]

    def extra_repr(self) -> str:
        return f"path={self.path!r}"


# ---- state dict + architecture --------------------------------------------------------------------------
def load_state_dict_into(path: str | Path, model: nn.Module | None) -> nn.Module:
    """A copy of ``model`` shrunk to the state dict's shapes, with the state dict loaded (``model`` is untouched).

    A prune-mode sub-network is the user's class with fewer channels: which indices were removed does not
    matter once the saved values are loaded, only how many remain, so each tensor keeps its first ``k``
    entries along every dimension that shrank, and the layers' size attributes follow (the same slimming
    the sub-network's construction used).
    """
    p = Path(path)
    if model is None:
        program = p.parent / PROGRAM_FILE
        hint = f" or load {program}, which holds the architecture too" if program.exists() else ""
        raise ValueError(f"{p} holds weights only: pass the architecture, lightning_oto.load({str(p)!r}, "
                         f"model=YourNet()){hint}.")
    state = torch.load(str(p), map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{p} is not a state dict (found {type(state).__name__}).")
    resized = shrink_to_state_dict(model, state)
    result = resized.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"{p} does not fit {type(model).__name__}: missing keys {result.missing_keys[:5]}, "
                         f"unexpected keys {result.unexpected_keys[:5]}. Is it the same architecture?")
    return resized


def shrink_to_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """A slimmed copy of ``model`` whose tensors have the shapes in ``state`` (values not loaded)."""
    own = dict(model.named_parameters())
    own.update(dict(model.named_buffers()))
    plan: dict[tuple[str, int], set[int]] = {}
    for name, saved in state.items():
        t = own.get(name)
        if t is None or not isinstance(saved, torch.Tensor) or t.shape == saved.shape:
            continue
        if t.dim() != saved.dim() or any(s > c for s, c in zip(saved.shape, t.shape)):
            raise ValueError(f"{name}: saved shape {tuple(saved.shape)} cannot come from this model's "
                             f"{tuple(t.shape)} by removing channels; is it the same architecture?")
        for dim, (s, c) in enumerate(zip(saved.shape, t.shape)):
            if s < c:
                plan[(name, dim)] = set(range(s, c))
    return slim_copy(model, plan)


__all__ = ["load", "load_program", "load_state_dict_into", "shrink_to_state_dict", "OnnxModule", "FILE_ROLES", "PROGRAM_FILE", "ONNX_FILE",
           "STATE_DICT_FILE", "METADATA_FILE", "MANIFEST_FILE", "METADATA_KEY"]
