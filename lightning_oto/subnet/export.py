"""Export a sub-network: state_dict + torch.export program (no pickled code) and ONNX, each reload-checked."""
from __future__ import annotations

import contextlib
import io
import json
import logging
import warnings
from pathlib import Path
from typing import Iterable, Sequence

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from ..graph.trace import export_program

FORMATS = ("torch", "onnx")


@contextlib.contextmanager
def _quiet_onnx():
    """The ONNX exporter logs every step (and missing torchvision ops) at WARNING; keep user logs readable."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.onnx._internal.exporter._registration",
                                              "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def _onnx_export(sub: nn.Module, inputs: tuple, path: Path) -> None:
    """ONNX via the dynamo exporter with a dynamic batch dimension (static shapes if that fails)."""
    names = [f"input_{i}" for i in range(len(inputs))]
    with warnings.catch_warnings(), _quiet_onnx():
        warnings.simplefilter("ignore")
        try:
            program = export_program(sub, inputs, dynamic_batch=True)
            torch.onnx.export(program, inputs, str(path), dynamo=True, verbose=False, input_names=names)
            return
        except Exception:  # noqa: BLE001 - fall back to the example's static shapes
            pass
        torch.onnx.export(sub, inputs, str(path), dynamo=True, verbose=False, input_names=names)


def _outputs(fn, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [t for t in tree_leaves(fn(*inputs)) if isinstance(t, torch.Tensor)]


def _max_diff(a: list[torch.Tensor], b: list) -> float:
    return max(float((torch.as_tensor(x).float() - torch.as_tensor(y).float()).abs().max()) for x, y in zip(a, b))


def export_subnet(sub: nn.Module, example_inputs: Sequence[torch.Tensor], out_dir: str | Path,
                  formats: Iterable[str] = FORMATS, check: bool = True, atol: float = 1e-4) -> dict[str, str]:
    """Write ``sub`` to ``out_dir``; returns {kind: path}. With ``check`` every file is reloaded and compared."""
    formats = tuple(formats)
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        raise ValueError(f"unknown export format(s) {bad}; choose from {FORMATS}.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    inputs = tuple(example_inputs)
    was = sub.training
    sub.eval()
    paths: dict[str, str] = {}
    try:
        ref = _outputs(sub, inputs)
        if "torch" in formats:
            sd_path = out / "subnet_state_dict.pt"
            torch.save(sub.state_dict(), sd_path)
            paths["state_dict"] = str(sd_path)
            program = export_program(sub, inputs, dynamic_batch=True)
            pt2 = out / "subnet.pt2"
            torch.export.save(program, pt2)
            paths["program"] = str(pt2)
            if check:
                loaded = torch.export.load(pt2).module()
                err = _max_diff(ref, _outputs(loaded, inputs))
                if err > atol:
                    raise RuntimeError(f"reloaded torch.export program differs from the sub-network by {err:.3g}")
                paths["program_check_error"] = f"{err:.3g}"
        if "onnx" in formats:
            onnx_path = out / "subnet.onnx"
            _onnx_export(sub, inputs, onnx_path)
            paths["onnx"] = str(onnx_path)
            if check:
                import onnxruntime as ort

                sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
                feed = {i.name: t.detach().cpu().numpy() for i, t in zip(sess.get_inputs(), inputs)}
                got = sess.run(None, feed)
                err = _max_diff(ref, got)
                if err > atol:
                    raise RuntimeError(f"onnxruntime output differs from the sub-network by {err:.3g}")
                paths["onnx_check_error"] = f"{err:.3g}"
    finally:
        sub.train(was)
    (out / "export_manifest.json").write_text(json.dumps(paths, indent=2))
    return paths


def load_exported_program(path: str | Path) -> nn.Module:
    """Load a ``subnet.pt2`` written by :func:`export_subnet` as a callable module (no pickle)."""
    return torch.export.load(str(path)).module()
