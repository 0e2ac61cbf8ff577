"""The models people use, through the public API, in both modes (issues 11 and 12).

For every zoo model and mode: ``OTO(model, x, mode)``, ``random_set_zero_groups(0.5)``,
``construct_subnet()``, then

- no crash, and the user's model is changed only by ``random_set_zero_groups``;
- the sub-network equals the full model (``atol + rtol * max|full|``) on the example input and on
  a second input with another batch size (and sequence length / image size where the model allows);
- with removable groups: the sub-network's parameter count is the full count minus exactly what the
  removed zero groups own (slices and dependents; prune mode keeps one group where a tensor would
  empty, as ``plan_keeping_one`` says), no parameter of it is dead, and params and FLOPs drop;
- without removable groups: the OTO object says why.

Both modes run in one test per model on one trace: erase mode traces, prune mode reads the same
trace (torch.export is ~80% of a case; the trace does not depend on the mode), which halves the
zoo's share of CI.  Every violated property of both runs is listed in one assertion message, so one
failing stage or mode does not hide the others.  ``benchmarks/realworld_table.py`` turns the same measurements into
``docs/realworld.md``.
"""
from __future__ import annotations

import os

import pytest

from .harness import run_case
from .zoo import ZOO, Entry

SOAK = bool(os.environ.get("LOTO_SOAK"))


def _marks(entry: Entry) -> list:
    marks = [pytest.mark.slow] if entry.slow else []
    if entry.opt_in:
        marks += [pytest.mark.soak, pytest.mark.skipif(not SOAK, reason=f"set LOTO_SOAK=1: {entry.opt_in}")]
    return marks


CASES = [pytest.param(name, id=name, marks=_marks(entry)) for name, entry in ZOO.items()]


@pytest.mark.parametrize("name", CASES)
def test_realworld_model(name: str) -> None:
    erase = run_case(ZOO[name], "erase")
    prune = run_case(ZOO[name], "prune", trace=erase.graph)  # erase's trace, unless erase failed before it
    problems = [f"  {out.mode}: [{cls}] {what}" for out in (prune, erase) for cls, what in out.failures()]
    if problems:
        pytest.fail(f"{name}:\n" + "\n".join(problems), pytrace=False)
