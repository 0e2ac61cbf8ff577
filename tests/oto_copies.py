"""One trace per model for tests that each need their own copy of it (torch.export is most of ``OTO(...)``)."""
from __future__ import annotations

import copy
from typing import Any, Callable, Hashable

from torch import nn

from lightning_oto import OTO

_TRACED: dict[Hashable, OTO] = {}


def on_copy(oto: OTO) -> OTO:
    """The same prune-mode search space over a deep copy of ``oto.model``, with its own cost cache.

    Prune mode only: it slims the model it is given and never reads the trace's own tensors, whereas
    erase mode builds its sub-network (and its reference) from the program, whose tensors are the traced model's.
    """
    if oto.mode != "prune":
        raise ValueError(f"on_copy shares a prune-mode trace only, got mode={oto.mode!r}")
    twin = OTO.__new__(OTO)
    twin.__dict__.update(oto.__dict__)
    twin.model, twin._costs = copy.deepcopy(oto.model), {}
    return twin


def traced_copy(key: Hashable, build: Callable[[], tuple[nn.Module, Any]]) -> OTO:
    """:func:`on_copy` of ``OTO(*build(), mode="prune")``, traced the first time this process asks for ``key``."""
    if key not in _TRACED:
        _TRACED[key] = OTO(*build(), mode="prune")
    return on_copy(_TRACED[key])
