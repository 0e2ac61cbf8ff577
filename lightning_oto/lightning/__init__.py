"""Lightning integration: :class:`OTOCallback` (Trainer hooks), :class:`OTOMixin` (LightningModule), their
shared :class:`OTOSettings`, and :func:`load_checkpoint` for checkpoints saved after ``swap_subnet``.

Loaded on first use: importing Lightning takes seconds, and checking a run's settings (``OTOSettings``)
does not need it, so a bad value on the command line is refused before Lightning loads."""
from __future__ import annotations

import importlib
from typing import Any

_HOMES = {"OTOCallback": ".callback", "load_checkpoint": ".checkpointing", "OnnxModule": "..subnet.load",
          "OTOMixin": ".mixin", "PHASE_CODES": ".run_report", "OTOSettings": ".settings"}

__all__ = ["OTOCallback", "OTOMixin", "OTOSettings", "PHASE_CODES", "load_checkpoint", "OnnxModule"]


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
