"""Loading an exported sub-network: ``load_compressed`` and the onnxruntime-backed ``OnnxModule``.

Kept for existing code; ``lightning_oto.load(path)`` (with the export's input metadata) supersedes
it once merged.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ..subnet.export import load_exported_program


def load_compressed(path_or_dir: str | Path) -> nn.Module:
    """Load an exported sub-network: the torch.export program (``subnet.pt2``), else ONNX via onnxruntime.

    Neither format contains pickled Python code, so loading an export from elsewhere is safe.
    """
    p = Path(path_or_dir)
    if p.is_dir():
        for cand in ("subnet.pt2", "subnet.onnx"):
            if (p / cand).exists():
                p = p / cand
                break
        else:
            raise FileNotFoundError(f"{path_or_dir}: no subnet.pt2 or subnet.onnx in this directory (is it an "
                                    "OTOCallback export_dir?).")
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist.")
    if p.suffix == ".pt2":
        return load_exported_program(p)
    if p.suffix == ".onnx":
        return OnnxModule(p)
    raise ValueError(f"{p}: cannot load a compressed network from a {p.suffix!r} file; use the export's "
                     "subnet.pt2 (torch.export program) or subnet.onnx. A state_dict alone has no structure.")


class OnnxModule(nn.Module):
    """An ONNX file run by onnxruntime behind an ``nn.Module`` interface (CPU tensors in and out).

    A graph exported with a fixed batch size ``B`` is run on other batch sizes in chunks of ``B`` (the last
    one zero-padded): exported networks are in eval mode, where samples do not interact.
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

    def _run(self, arrays: Sequence[Any]) -> list[torch.Tensor]:
        return [torch.from_numpy(o) for o in self.session.run(None, dict(zip(self.input_names, arrays)))]

    def forward(self, *inputs: torch.Tensor) -> Any:
        arrays = [t.detach().cpu().numpy() for t in inputs]
        n = arrays[0].shape[0] if arrays and arrays[0].ndim else None
        B = self.fixed_batch
        if B is None or n is None or n == B or any(a.ndim == 0 or a.shape[0] != n for a in arrays):
            outs = self._run(arrays)
        else:
            parts: list[list[torch.Tensor]] = []
            for s in range(0, n, B):
                chunk = [a[s:s + B] for a in arrays]
                m = chunk[0].shape[0]
                if m < B:
                    import numpy as np

                    chunk = [np.concatenate([c, np.zeros((B - m,) + c.shape[1:], c.dtype)]) for c in chunk]
                parts.append([o[:m] if o.dim() and o.shape[0] == B else o for o in self._run(chunk)])
            outs = [torch.cat(ps) if ps[0].dim() and ps[0].shape[0] != 0 else ps[0] for ps in zip(*parts)]
        return outs[0] if len(outs) == 1 else tuple(outs)


__all__ = ["OnnxModule", "load_compressed"]
