"""A quiet terminal for entry points (``lightning_oto.train``, the examples): each line once, no known noise."""
from __future__ import annotations

import logging
import warnings


def quiet_terminal() -> None:
    """Call once at the start of an entry point (it changes process-wide logging and warning filters).

    Under Hydra the root logger prints, and the ``lightning`` package adds its own console handler at
    import: every Lightning line would print twice, so that handler goes when the root has one.  The
    ONNX exporter's passes log at INFO, and torch's pytree ``LeafSpec`` deprecation (raised inside
    Lightning) is not the user's to fix.
    """
    import lightning  # noqa: F401 - its import adds the handler removed below

    if logging.getLogger().handlers:
        pkg = logging.getLogger("lightning")
        for handler in list(pkg.handlers):
            pkg.removeHandler(handler)
    for name in ("onnx_ir", "onnxscript", "torch.onnx"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*is deprecated")


__all__ = ["quiet_terminal"]
