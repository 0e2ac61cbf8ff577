"""Run one zoo model through the public API in one mode and record what happened, stage by stage.

Both the tests and ``benchmarks/realworld_table.py`` use :func:`run_case`, so the table in
``docs/realworld.md`` and the test verdicts come from the same measurements.  Exceptions are caught
per stage and recorded as text: one failing stage must not hide what the others would show.
"""
from __future__ import annotations

import contextlib
import copy
import math
import time
import traceback
import warnings
from dataclasses import dataclass, field
from unittest import mock

import torch
from torch import nn

import lightning_oto.oto as oto_facade
from lightning_oto import OTO
from lightning_oto.graph.trace import OpGraph, op_name
from lightning_oto.space.groups import Group
from lightning_oto.subnet.plan import plan_keeping_one
from lightning_oto.subnet.verify import allowed_error, output_difference, tensor_leaves

from .zoo import Entry

FRACTION = 0.5
SEED = 0


@dataclass
class Outcome:
    """Everything one (model, mode) run measured; ``None`` where a stage did not get that far."""

    name: str
    mode: str
    error: str | None = None  # first exception, with the stage it came from
    groups: int = 0
    removable: int = 0
    zeroed: int = 0
    removed: int = 0  # zero groups construction is expected to remove (prune keeps one where a tensor would empty)
    reasons: list[str] = field(default_factory=list)  # why groups are kept: unsupported ops, group reasons
    modified: list[str] = field(default_factory=list)  # state the engine changed in the user's model
    err: float | None = None
    allowed: float | None = None
    err2: float | None = None
    allowed2: float | None = None
    second_error: str | None = None
    params_full: int = 0
    params_unused: int = 0  # parameters no output depends on (an erased sub-network drops them too)
    params_expected: int | None = None
    kept: list[str] = field(default_factory=list)  # tensors the removed groups own that the sub-network still has
    dead: list[str] = field(default_factory=list)  # sub-network parameters no output depends on (and the full model's did)
    backward_error: str | None = None  # backward through the sub-network failed (it could not be fine-tuned)
    dead_ops: dict[str, int] = field(default_factory=dict)  # erased sub-network: operators whose result reaches no output
    flops_must_drop: bool = True  # False when the removed groups own only elementwise parameters
    params_sub: int | None = None
    flops_full: int | None = None
    flops_sub: int | None = None
    trace_s: float | None = None
    construct_s: float | None = None
    graph: OpGraph | None = field(default=None, repr=False, compare=False)  # the trace, for the other mode

    @property
    def exact(self) -> bool:
        return self.err is not None and self.err <= self.allowed

    @property
    def exact2(self) -> bool:
        return self.err2 is not None and self.err2 <= self.allowed2

    @property
    def accounting_holds(self) -> bool:
        """The sub-network's parameter count is the full count minus exactly what the removed groups own."""
        return self.params_sub is not None and self.params_sub == self.params_expected

    @property
    def lost_structures(self) -> bool:
        """Zero groups were removed, the accounting holds, and params (and FLOPs where they can) dropped.

        ``torch.utils.flop_counter`` counts matmuls and convolutions only: a removed group that owns only
        elementwise parameters (ConvNeXt-V2's GRN, a layer scale alone) cannot lower the count, so FLOPs
        must drop only when a removed group owns a matrix or kernel.
        """
        if not (self.removed > 0 and self.accounting_holds and self.params_sub < self.params_full):
            return False
        if self.flops_sub is None:
            return False
        return self.flops_sub < self.flops_full if self.flops_must_drop else self.flops_sub <= self.flops_full

    def failures(self) -> list[tuple[str, str]]:
        """(failure class, details) for each property the issue asks for that this run violates."""
        out: list[tuple[str, str]] = []
        if self.modified:
            out.append(("model modified", f"the user's model was changed: {', '.join(self.modified[:5])}"))
        if self.error:
            return out + [("crash", self.error)]
        if not self.exact:
            out.append(("inexact", f"example input: max diff {self.err:.3g} > {self.allowed:.3g}"))
        if self.second_error:
            out.append(("other shape rejected", self.second_error))
        elif not self.exact2:
            out.append(("inexact", f"second input: max diff {self.err2:.3g} > {self.allowed2:.3g}"))
        if self.removable:
            out += self._removal_failures()
        elif not self.reasons:
            out.append(("no reason", f"0 removable groups out of {self.groups} and no reason given"))
        if self.dead or self.dead_ops:
            out.append(("dead operators kept", self._dead_text()))
        if self.backward_error:
            out.append(("backward fails", f"the sub-network cannot be trained: {self.backward_error}"))
        return out

    def _dead_text(self) -> str:
        parts = []
        if self.dead:
            names = ", ".join(self.dead[:4]) + (" ..." if len(self.dead) > 4 else "")
            parts.append(f"{len(self.dead)} parameters reach no output ({names})")
        if self.dead_ops:
            ops = ", ".join(f"{op} x{n}" for op, n in sorted(self.dead_ops.items(), key=lambda kv: -kv[1]))
            parts.append(f"operators whose result reaches no output: {ops}")
        return "; ".join(parts)

    def _removal_failures(self) -> list[tuple[str, str]]:
        counts = (f"{self.removed} zero groups due for removal; params {self.params_full} -> {self.params_sub} "
                  f"(expected {self.params_expected}), FLOPs {self.flops_full} -> {self.flops_sub}")
        if self.removed == 0:
            return [("nothing removed", f"{self.removable} removable groups but none zeroed or removed")]
        if self.params_sub > self.params_expected:
            kept = ", ".join(self.kept[:4]) + (" ..." if len(self.kept) > 4 else "")
            return [("zeroed weights kept", counts + (f"; still there: {kept}" if kept else ""))]
        if self.params_sub < self.params_expected:
            return [("removed more than the groups own", counts)]
        if not self.lost_structures:
            return [("not smaller", counts)]
        return []


def _short(e: BaseException) -> str:
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    where = traceback.extract_tb(e.__traceback__)[-1]
    head = " | ".join(lines[:3])[:400]
    return f"{type(e).__name__}: {head} [at {where.filename.rsplit('/', 1)[-1]}:{where.lineno} {where.name}]"


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _changed(model: nn.Module, before: dict[str, torch.Tensor], stage: str) -> list[str]:
    after = model.state_dict()
    keys = [k for k, v in before.items() if k not in after or after[k].shape != v.shape or not torch.equal(after[k], v)]
    return [f"{k} ({stage})" for k in keys]


def expected_shapes(model: nn.Module, removed: list[Group]) -> dict[str, tuple[int, ...] | None]:
    """Shape of every parameter of ``model`` once ``removed`` are gone (``None``: the whole tensor goes).

    A slice with indices deletes those indices along its dimension (slices and dependents alike); a
    whole-tensor slice deletes the tensor.  Computed from the groups alone, independent of construction.
    """
    params = dict(model.named_parameters())
    gone: dict[tuple[str, int], set[int]] = {}
    whole: set[str] = set()
    for g in removed:
        for s in list(g.slices) + list(g.dependents):
            if s.name not in params:
                continue
            if s.indices is None:
                whole.add(s.name)
            else:
                gone.setdefault((s.name, s.dim), set()).update(s.indices)
    shapes: dict[str, tuple[int, ...] | None] = {}
    for name, p in params.items():
        shape = list(p.shape)
        for (n, dim), idx in gone.items():
            if n == name:
                shape[dim] -= len(idx)
        shapes[name] = None if name in whole else tuple(shape)
    return shapes


def unused_parameters(model: nn.Module, inputs: tuple) -> set[str]:
    """Parameters no output depends on (no gradient reaches them), found on a copy of ``model``."""
    m = copy.deepcopy(model)
    try:
        m.eval()
    except NotImplementedError:  # a torch.export program's module is fixed in the mode it was traced in
        pass
    for p in m.parameters():
        p.requires_grad_(True)
        p.grad = None
    outs = [t for t in tensor_leaves(m(*inputs)) if t.is_floating_point() and t.requires_grad]
    if outs:
        sum(t.float().sum() for t in outs).backward()
    return {n for n, p in m.named_parameters() if p.grad is None}


def _owns_kernel(model: nn.Module, removed: list[Group]) -> bool:
    """True when a removed group owns a matrix or kernel (at least two dimensions larger than one)."""
    params = dict(model.named_parameters())
    return any(s.name in params and sum(d > 1 for d in params[s.name].shape) >= 2
               for g in removed for s in g.slices)


def _account(out: Outcome, model: nn.Module, removed: list[Group], unused: set[str],
             mode: str) -> dict[str, tuple[int, ...] | None]:
    """Set the expected parameter count of the sub-network; returns the expected shapes.

    Prune mode slims a copy of the model's own class, which keeps parameters no output uses; an erased
    sub-network is a graph from which every operator that cannot reach an output must be gone, so
    those parameters are expected gone as well.
    """
    shapes = expected_shapes(model, removed)
    if mode == "erase":
        shapes.update({n: None for n in unused})
    out.params_expected = sum(math.prod(s) for s in shapes.values() if s is not None)
    out.flops_must_drop = _owns_kernel(model, removed)
    return shapes


def _still_there(model: nn.Module, expected: dict[str, tuple[int, ...] | None], sub: nn.Module) -> list[str]:
    """Tensors the removed groups own that the sub-network still has at full size (found by name)."""
    full = {n: tuple(p.shape) for n, p in model.named_parameters()}
    have = {n: tuple(p.shape) for n, p in sub.named_parameters()}
    return sorted(n for n, s in expected.items() if s != full[n] and have.get(n) == full[n])


def _reasons(oto: OTO) -> list[str]:
    out = [f"{op}: {why}" for op, why in oto.unsupported_ops.items()]
    seen: set[str] = set()
    for g in oto.groups:
        if not g.prunable and g.reason and g.reason not in seen:
            seen.add(g.reason)
            out.append(g.reason)
    return out


def _removed_groups(oto: OTO, model: nn.Module) -> list[Group]:
    zero = [oto.groups[i] for i in oto.zero_group_ids()]
    if oto.mode == "erase":
        return zero
    shapes = {n: tuple(t.shape) for n, t in list(model.named_parameters()) + list(model.named_buffers())}
    return plan_keeping_one(zero, shapes)[1]


def _compare(out: Outcome, model: nn.Module, sub: nn.Module, example: tuple, second: tuple) -> None:
    err, scale = output_difference(model, sub, example)
    out.err, out.allowed = err, allowed_error(scale)
    try:
        err2, scale2 = output_difference(model, sub, second)
        out.err2, out.allowed2 = err2, allowed_error(scale2)
    except Exception as e:  # noqa: BLE001 - recorded: the sub-network refuses the other shape
        out.second_error = _short(e)


def _construct(out: Outcome, oto: OTO, model: nn.Module) -> nn.Module:
    """construct_subnet, timed, checking that it leaves the user's model as it was."""
    before = _snapshot(model)
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no group is zero yet" is expected where nothing is removable
        sub = oto.construct_subnet(verify=False)
    out.construct_s = time.perf_counter() - t
    out.modified += _changed(model, before, "construct_subnet")
    out.params_sub = sum(p.numel() for p in sub.parameters())
    return sub


def _mutates(node: torch.fx.Node, target: torch.fx.Node) -> bool:
    """True for an in-place ATen op (``add_``, ``relu_``) writing into ``target``: live if ``target`` is."""
    return (node.op == "call_function" and op_name(node.target).endswith("_") and bool(node.args)
            and node.args[0] is target)


def dead_operators(gm: torch.fx.GraphModule) -> dict[str, int]:
    """Operators of a graph module whose result cannot reach the output, counted by name.

    Liveness follows data edges back from the output, plus in-place ops that write into a live
    tensor.  Guards and shape asserts compute nothing and are not counted.
    """
    live: set[torch.fx.Node] = set()
    todo = [n for n in gm.graph.nodes if n.op == "output"]
    while todo:
        n = todo.pop()
        if n in live:
            continue
        live.add(n)
        todo.extend(n.all_input_nodes)
        todo.extend(u for u in n.users if _mutates(u, n))
    dead: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n in live or n.op not in ("call_function", "call_module", "call_method"):
            continue
        name = op_name(n.target) if n.op == "call_function" else str(n.target)
        if not name.startswith(("_assert", "_guards_fn")):
            dead[name] = dead.get(name, 0) + 1
    return dead


def _dead_in(out: Outcome, sub: nn.Module, example: tuple, unused: set[str]) -> None:
    """Parameters and operators of the sub-network no output depends on; a failing backward pass is recorded."""
    if isinstance(sub, torch.fx.GraphModule):
        out.dead_ops = dead_operators(sub)
    try:
        out.dead = sorted(unused_parameters(sub, example) - (unused if out.mode == "prune" else set()))
    except Exception as e:  # noqa: BLE001 - recorded: the sub-network cannot be fine-tuned
        out.backward_error = _short(e)


def _reusing(graph: OpGraph | None) -> contextlib.AbstractContextManager:
    """``OTO(...)`` reads ``graph`` instead of tracing again (``None``: it traces as usual).

    The trace does not depend on the mode, and torch.export is most of a case's time.  Prune mode never
    reads the program's tensors (it slims the user's own model), so a trace of another instance of the
    same seeded model serves it; erase mode builds its sub-network from the program: it must trace itself.
    """
    if graph is None:
        return contextlib.nullcontext()
    return mock.patch.object(oto_facade, "trace", lambda model, example_inputs, dynamic_shapes=None: graph)


def run_case(entry: Entry, mode: str, trace: OpGraph | None = None) -> Outcome:
    """Build, zero half the removable groups, construct, and measure; never raises for the model's sake.

    ``trace``: a prune-mode case may reuse the trace of an earlier case of the same entry (``Outcome.graph``).
    """
    if trace is not None and mode != "prune":
        raise ValueError("only prune mode can reuse another case's trace: erase builds on the program's tensors")
    out = Outcome(entry.name, mode)
    model, example, second = entry.make()
    out.params_full = sum(p.numel() for p in model.parameters())
    stage = "finding unused parameters"
    try:
        unused = unused_parameters(model, example)
        out.params_unused = sum(p.numel() for n, p in model.named_parameters() if n in unused)
        stage = "OTO(...)"
        before = _snapshot(model)
        t = time.perf_counter()
        with _reusing(trace):
            oto = OTO(model, example, mode=mode, dynamic_shapes=entry.dynamic_shapes)
        out.trace_s = time.perf_counter() - t
        out.graph = oto.graph
        out.modified += _changed(model, before, "OTO(...)")
        out.groups, out.removable, out.reasons = len(oto.groups), len(oto.prunable_groups), _reasons(oto)
        stage = "random_set_zero_groups"
        out.zeroed = len(oto.random_set_zero_groups(FRACTION if out.removable > 1 else 1.0, seed=SEED))
        removed = _removed_groups(oto, model)
        out.removed = len(removed)
        expected = _account(out, model, removed, unused, mode)
        stage = "construct_subnet"
        sub = _construct(out, oto, model)
        out.kept = _still_there(model, expected, sub)
        stage = "comparing outputs"
        _compare(out, model, sub, example, second)
        stage = "compression_report"
        rep = oto.compression_report(sub)
        out.flops_full, out.flops_sub = rep["flops_full"], rep["flops_sub"]
    except Exception as e:  # noqa: BLE001 - recorded with its stage; the caller decides
        out.error = f"in {stage}: {_short(e)}"
        return out
    _dead_in(out, sub, example, unused)
    return out
