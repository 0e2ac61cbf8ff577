"""What removing a group saves: parameters, FLOPs and (approximate) latency, as plain data.

A budget (``{"flops": 0.5}``: the sub-network may keep half the full model's FLOPs) is met by
choosing groups whose removal saves enough.  The optimizers see the costs only through
:class:`CostModel` / :class:`KeptTracker` (numbers per tensor, never the graph).

How a cost is attributed (one forward pass of the model on its example input, under a dispatch
mode that sees every ATen operator):

* **params**: one per tensor entry.
* **FLOPs** (``torch.utils.flop_counter``'s formulas, so totals equal :func:`count_flops`): an
  operator that reads a parameter of two or more dimensions (conv, linear, matmul with a weight)
  charges its FLOPs to that weight's *entries* - exact, since a conv's or linear's FLOPs are
  ``2 * positions * kept weight entries`` however rows (its channels) and columns (a producer's
  channels) are removed.  An operator without a parameter (attention's ``q @ k^T``, SDPA) charges
  the *rows* of the weight that produced its first input (it scales with the kept output width of
  that producer: attention heads).  What no parameter explains stays.
* **latency** (an estimate, the selection's first guess): each operator is timed (median of a few
  runs) on the model's device at the example input's batch size; the time is charged the same
  way, and operators without a parameter (relu, pooling, add) charge the rows of the parameter
  that produced their input (a BatchNorm's affine or a conv's weight), so they shrink with the kept
  width.  Time is not linear in width (fixed per-call overheads, kernels that do not shrink), so
  ``OTO`` calibrates the modelled fraction with two measured points - the full model and the
  smallest sub-network the search space allows - as ``a + b * modelled``
  (:attr:`CostModel.calibration`), and gives :attr:`CostModel.measure_latency`, which builds and times
  a sub-network: the selection closes its loop on that, not on the estimate.

Removing a set of groups keeps, per tensor, ``prod_d (size_d - removed_d)`` entries (rows of one
group, columns of another: the overlap is counted once) and ``(size_r - removed_r) / size_r`` of its
row-charged cost; whole-tensor slices (erase mode) keep nothing.  :class:`KeptTracker` updates this
incrementally, so a greedy selection knows the exact kept fraction after every accepted group.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode  # the documented home of dispatch modes
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import flop_registry

from ..graph.inputs import args_and_kwargs, as_model_inputs
from .groups import Group

BUDGET_KEYS = ("flops", "params", "latency")
#: the constructed sub-network meets a flops/params budget within this many points of the fraction
BUDGET_TOLERANCE = 0.02
#: a measured latency fraction counts as reached within this share of the asked one (5%: 0.5 -> 0.475..0.525)
LATENCY_TOLERANCE = 0.05


def check_budget(budget: Any) -> dict[str, float]:
    """``budget`` as ``{key: fraction}``: keys in :data:`BUDGET_KEYS`, fractions in (0, 1]; None values dropped.

    An empty result (``{}``) means "no budget" (a Hydra config that leaves every key null).
    """
    if budget is None:
        return {}
    if not isinstance(budget, Mapping):
        raise ValueError(f"budget must be a mapping such as {{'flops': 0.5}}, got {type(budget).__name__}.")
    out: dict[str, float] = {}
    for key, value in budget.items():
        if key not in BUDGET_KEYS:
            raise ValueError(f"unknown budget key {key!r}; valid keys: {', '.join(BUDGET_KEYS)} (each the fraction "
                             "of the full model the sub-network may keep).")
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < float(value) <= 1.0:
            raise ValueError(f"budget[{key!r}] must be a fraction in (0, 1] of the full model, got {value!r}.")
        out[key] = float(value)
    return out


@dataclass
class TensorCost:
    """A parameter's share of the model's cost: per entry, and per row along ``row_dim``."""

    shape: tuple[int, ...]
    row_dim: int = 0
    per_entry: dict[str, float] = field(default_factory=dict)
    rows: dict[str, float] = field(default_factory=dict)

    def kept(self, removed: Mapping[int, int], whole: bool) -> dict[str, float]:
        """Absolute cost kept when ``removed[d]`` indices of dimension ``d`` are gone."""
        if whole:
            return {k: 0.0 for k in set(self.per_entry) | set(self.rows) | {"params"}}
        left = [size - removed.get(d, 0) for d, size in enumerate(self.shape)]
        entries = float(math.prod(left))
        out = {"params": entries}
        for k, w in self.per_entry.items():
            out[k] = out.get(k, 0.0) + w * entries
        row_frac = left[self.row_dim] / self.shape[self.row_dim] if self.shape else 1.0
        for k, w in self.rows.items():
            out[k] = out.get(k, 0.0) + w * row_frac
        return out


@dataclass
class CostModel:
    """Per-tensor costs, the full model's totals and each group's (tensor, dim, indices) footprint."""

    tensors: dict[str, TensorCost]
    totals: dict[str, float]
    footprints: dict[int, list[tuple[str, int, tuple[int, ...] | None]]]
    #: key -> (a, b): the reported fraction is ``a + b * modelled`` (latency: fitted to two measured
    #: points, the full model and the smallest sub-network, so fixed per-operator overheads count)
    calibration: dict[str, tuple[float, float]] = field(default_factory=dict)
    #: removed group ids -> the measured latency fraction of that sub-network (built and timed on the
    #: model's device; identical on every rank). Set by ``OTO`` for a latency budget: the selection
    #: closes its loop on it, since the modelled fraction above is only an estimate.
    measure_latency: Callable[[frozenset[int]], float] | None = field(default=None, repr=False, compare=False)

    def calibrated(self, key: str, raw: float) -> float:
        a, b = self.calibration.get(key, (0.0, 1.0))
        return a + b * raw

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(self.totals)

    def tracker(self, removed: Iterable[int] = ()) -> "KeptTracker":
        t = KeptTracker(self)
        for gid in removed:
            t.add(gid)
        return t

    def kept_fraction(self, removed: Iterable[int]) -> dict[str, float]:
        """The fraction of each cost kept after removing the groups ``removed`` (exact per the model above)."""
        return self.tracker(removed).fractions()


class KeptTracker:
    """Incremental kept cost while groups are added one by one (the greedy selection's bookkeeping)."""

    def __init__(self, model: CostModel) -> None:
        self.model = model
        self._removed: dict[str, dict[int, set[int]]] = {}
        self._whole: set[str] = set()
        self._kept_abs = dict(model.totals)
        self._tensor_kept = {n: t.kept({}, False) for n, t in model.tensors.items()}
        self.ids: set[int] = set()

    def _after(self, gid: int) -> dict[str, dict[str, float]]:
        """New kept cost of each tensor ``gid`` touches, if it were added."""
        touched: dict[str, tuple[dict[int, set[int]], bool]] = {}
        for name, dim, idx in self.model.footprints.get(gid, ()):
            if name not in self.model.tensors:
                continue
            dims, whole = touched.get(name, ({d: set(s) for d, s in self._removed.get(name, {}).items()},
                                             name in self._whole))
            if idx is None:
                whole = True
            else:
                dims.setdefault(dim, set()).update(idx)
            touched[name] = (dims, whole)
        return {n: self.model.tensors[n].kept({d: len(s) for d, s in dims.items()}, whole)
                for n, (dims, whole) in touched.items()}

    def saving(self, gid: int) -> dict[str, float]:
        """Fraction of each total that adding ``gid`` would save now (interactions with added groups included)."""
        out = {k: 0.0 for k in self.model.totals}
        for name, new in self._after(gid).items():
            old = self._tensor_kept[name]
            for k in out:
                out[k] += (old.get(k, 0.0) - new.get(k, 0.0)) / max(self.model.totals[k], 1e-30)
        for k, (_, b) in self.model.calibration.items():
            out[k] *= b
        return out

    def add(self, gid: int) -> None:
        for name, new in self._after(gid).items():
            old = self._tensor_kept[name]
            for k in self._kept_abs:
                self._kept_abs[k] -= old.get(k, 0.0) - new.get(k, 0.0)
            self._tensor_kept[name] = new
        for name, dim, idx in self.model.footprints.get(gid, ()):
            if name not in self.model.tensors:
                continue
            if idx is None:
                self._whole.add(name)
            else:
                self._removed.setdefault(name, {}).setdefault(dim, set()).update(idx)
        self.ids.add(gid)

    def raw_fractions(self) -> dict[str, float]:
        """The modelled fractions before calibration."""
        return {k: max(0.0, v) / max(self.model.totals[k], 1e-30) for k, v in self._kept_abs.items()}

    def fractions(self) -> dict[str, float]:
        return {k: self.model.calibrated(k, v) for k, v in self.raw_fractions().items()}


# ---------------------------------------------------------------------------------------------- measuring
class _Attribution(TorchDispatchMode):
    """Charges each ATen operator's FLOPs (and time) to the parameters it reads (see the module docstring)."""

    def __init__(self, storages: dict[int, str], ndims: dict[str, int], time_ops: bool) -> None:
        super().__init__()
        self.storages, self.ndims, self.time_ops = storages, ndims, time_ops
        self.owner: dict[int, str] = {}  # activation storage -> the parameter whose rows it scales with
        self.entry: dict[str, dict[str, float]] = {}
        self.rows: dict[str, dict[str, float]] = {}
        self.total: dict[str, float] = {"flops": 0.0, "latency": 0.0}
        self.sync = None

    def _charge(self, table: dict[str, dict[str, float]], name: str, key: str, value: float) -> None:
        table.setdefault(name, {})
        table[name][key] = table[name].get(key, 0.0) + value

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - torch's protocol
        kwargs = kwargs or {}
        start = time.perf_counter() if self.time_ops else 0.0
        out = func(*args, **kwargs)
        if self.time_ops:
            if self.sync is not None:
                self.sync()
            elapsed = time.perf_counter() - start
        flat = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        params = [self.storages[_ptr(t)] for t in flat if _ptr(t) in self.storages]
        packet = func._overloadpacket
        flops = float(flop_registry[packet](*args, **kwargs, out_val=out)) if packet in flop_registry else 0.0
        self.total["flops"] += flops
        costs = {"flops": flops}
        if self.time_ops:
            self.total["latency"] += elapsed
            costs["latency"] = elapsed
        if params:
            top = max(self.ndims[p] for p in params)
            weights = sorted({p for p in params if self.ndims[p] == top})
            owner = weights[0]
            for key, value in costs.items():
                table = self.entry if top >= 2 or key == "latency" else self.rows
                for p in weights:
                    self._charge(table, p, key, value / len(weights))
        else:
            owner = next((self.owner[_ptr(t)] for t in flat if _ptr(t) in self.owner), None)
            if owner is not None:
                for key, value in costs.items():
                    self._charge(self.rows, owner, key, value)
        if owner is not None:
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    self.owner[_ptr(t)] = owner
        return out


def _ptr(t: torch.Tensor) -> int:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # meta / fake tensors have no storage
        return -id(t)


@torch.no_grad()
def _attribute(model: nn.Module, args: tuple, kwargs: dict, time_ops: bool) -> _Attribution:
    named = dict(model.named_parameters())
    storages = {_ptr(p): n for n, p in named.items()}
    mode = _Attribution(storages, {n: p.dim() for n, p in named.items()}, time_ops)
    device = next(iter(named.values())).device
    if device.type == "cuda":
        mode.sync = torch.cuda.synchronize
    with mode:
        model(*args, **kwargs)
    return mode


def measure_costs(model: nn.Module, example_inputs: tuple, groups: Sequence[Group],
                  latency: bool = False, repeats: int = 5) -> CostModel:
    """The :class:`CostModel` of ``model`` (eval mode, no gradients; the model is not modified).

    ``example_inputs``: the positional inputs (a trailing dict is taken as keyword inputs).
    With ``latency`` every operator is timed ``repeats`` times after one warm-up pass (median).
    A model that cannot run on its device raises ``ValueError`` naming the device.
    """
    args, kwargs = _split_inputs(example_inputs)
    named = dict(model.named_parameters())
    if not named:
        raise ValueError("the model has no parameters: there is no cost to save.")
    device = next(iter(named.values())).device
    was = model.training
    fast = torch.backends.mha.get_fastpath_enabled()
    model.eval()
    torch.backends.mha.set_fastpath_enabled(False)  # the fused kernel has no FLOP formula (as count_flops)
    try:
        runs = [_attribute(model, args, kwargs, False)]
        if latency:
            runs = [_attribute(model, args, kwargs, True) for _ in range(repeats + 1)][1:]
    except Exception as e:  # noqa: BLE001 - the reason is the user's: say which device
        what = "a latency budget is measured on the device the model sits on" if latency else "costs are measured"
        raise ValueError(f"{what} ({device}), but the model cannot run there on its example input: "
                         f"{type(e).__name__}: {e}") from e
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)
        model.train(was)
    return _cost_model(named, runs, groups, latency)


def _train(model: nn.Module, training: bool) -> None:
    try:
        model.train(training)
    except NotImplementedError:  # exported-program modules are fixed in eval
        pass


def _split_inputs(example_inputs: Any) -> tuple[tuple, dict]:
    """(args, kwargs) by the one convention of :mod:`lightning_oto.graph.inputs`: a dict is keyword inputs,
    a dict inside a tuple is one positional argument (``forward(self, batch)``)."""
    return args_and_kwargs(as_model_inputs(example_inputs))


def _cost_model(named: Mapping[str, torch.Tensor], runs: Sequence[_Attribution], groups: Sequence[Group],
                latency: bool) -> CostModel:
    row_dims: dict[str, int] = {}
    for g in groups:
        for s in g.slices:
            if s.indices is not None:
                row_dims.setdefault(s.name, s.dim)
    unique = {id(p): n for n, p in named.items()}
    keys = ("params", "flops") + (("latency",) if latency else ())

    def med(table: str, name: str, key: str) -> float:
        return statistics.median(getattr(r, table).get(name, {}).get(key, 0.0) for r in runs)

    tensors: dict[str, TensorCost] = {}
    for name in unique.values():
        p = named[name]
        shape = tuple(p.shape)
        n = max(1, p.numel())
        per_entry = {k: med("entry", name, k) / n for k in keys[1:]}
        rows = {k: med("rows", name, k) for k in keys[1:]}
        tensors[name] = TensorCost(shape, row_dims.get(name, 0) if shape else 0,
                                   {k: v for k, v in per_entry.items() if v}, {k: v for k, v in rows.items() if v})
    totals = {"params": float(sum(named[n].numel() for n in unique.values())),
              "flops": runs[0].total["flops"]}
    if latency:
        totals["latency"] = statistics.median(r.total["latency"] for r in runs)
    footprints = {g.id: [(s.name, s.dim, s.indices) for s in list(g.slices) + list(g.dependents)]
                  for g in groups if g.prunable}
    return CostModel(tensors, totals, footprints)




__all__ = ["BUDGET_KEYS", "BUDGET_TOLERANCE", "LATENCY_TOLERANCE", "CostModel", "KeptTracker", "TensorCost", "check_budget",
           "measure_costs"]
