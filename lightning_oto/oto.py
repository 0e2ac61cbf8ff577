"""`OTO`: the one object users hold — trace once, search space, optimizers, construction, export."""
from __future__ import annotations

import copy
import logging
import random
from collections import Counter
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from .errors import InvalidSubnetError, SubnetMismatchError  # noqa: F401 - re-exported
from .graph import dynamic
from .graph.inputs import map_tensors
from .graph.trace import OpGraph, normalize_inputs, trace
from .modes import make_mode
from .optim.factory import DEFAULT_TARGET_SPARSITY
from .optim.shards import from_rank0, mean_over_ranks
from .space import controls
from .space.costs import BUDGET_TOLERANCE, CostModel, check_budget, measure_costs
from .space.groups import Group, group_is_zero, zero_group
from .subnet.timing import dense_stand_in, interleaved_times
from .subnet.verify import DEFAULT_ATOL, DEFAULT_RTOL, check_outputs, output_difference

log = logging.getLogger("lightning_oto")

MODES = ("prune", "erase")


class OTO:
    """Search space of ``model`` for ``mode`` ("prune": channel ZIGs; "erase": operator GeZIGs).

    The model is traced once on ``example_inputs``: a tensor or tuple (``model(*x)``; an element may be a
    dict, for a ``forward(self, batch)``), or a dict of keyword inputs (``model(**x)``, e.g.
    ``{"input_ids": ids, "attention_mask": mask}``; see :mod:`lightning_oto.graph.inputs`). It is never
    modified except by the methods that say so (``random_set_zero_groups``,
    ``recalibrate_batchnorm`` and the optimizers, which write its parameters).

    ``dynamic_shapes``: which input dimensions the trace (and so an erased sub-network) keeps
    dynamic — ``"auto"`` (every dimension the model allows: batch, sequence length, image size of
    a fully convolutional net), ``"static"``, or a torch.export-style spec, which is strict.

    The controls pruning users expect (:mod:`lightning_oto.space.controls`): ``ignored_layers``
    (modules or name patterns whose variables stay), ``max_group_sparsity`` (``{module or pattern:
    cap in [0, 1]}`` on the fraction of its groups that may go) and, in prune mode, ``round_to=N``
    (channels go N at a time per layer).  ``min_width`` (prune mode, default 0.1): every layer keeps at
    least that fraction of its channels and at least one group (one ``round_to`` bundle, one attention
    head), whatever the selection asks; 0 turns the floors off.
    """

    def __init__(self, model: nn.Module, example_inputs: Any = None, mode: str = "prune", *,
                 ignored_layers: Iterable[Any] | None = None, max_group_sparsity: dict[Any, float] | None = None,
                 round_to: int = 1, dynamic_shapes: Any = dynamic.AUTO,
                 min_width: float = controls.DEFAULT_MIN_WIDTH) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
        if not any(p.requires_grad for p in model.parameters()):
            raise ValueError(f"{type(model).__name__} has no trainable parameters: there is nothing to compress.")
        if not isinstance(round_to, int) or round_to < 1:
            raise ValueError(f"round_to must be an integer >= 1, got {round_to!r}.")
        if round_to > 1 and mode != "prune":
            raise ValueError("round_to counts channels: it applies to mode='prune' only.")
        self.min_width = controls.check_min_width(min_width)
        ignored = controls.module_names(model, ignored_layers or (), "ignored_layers")
        self.model = model
        self.mode = mode
        self.example_inputs = normalize_inputs(model, example_inputs)
        self.graph: OpGraph = trace(model, self.example_inputs, dynamic_shapes=dynamic_shapes)
        self._mode = make_mode(mode, self.graph, model, self.example_inputs)
        self.groups: list[Group] = controls.bundle(self._mode.groups, round_to)
        self._mode.groups = self.groups
        controls.apply_ignored(self.groups, ignored)
        shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
        self.floors = controls.layer_floors(self.groups, shapes, self.min_width) if mode == "prune" else []
        self.candidate_filter = controls.all_of(controls.cap_filter(model, self.groups, max_group_sparsity or {}),
                                                controls.floor_filter(self.floors))
        self._costs: dict[bool, Any] = {}
        self.unsupported_ops: dict[str, str] = self._mode.unsupported
        self._explain_search_space()

    def _explain_search_space(self) -> None:
        word = "prunable" if self.mode == "prune" else "erasable"
        if not self.prunable_groups:
            reasons = Counter(g.reason for g in self.groups if g.reason)
            reasons.update(r for r in self.unsupported_ops.values() if r not in reasons)
            why = "; ".join(f"{r} ({n} groups)" if n > 1 else r for r, n in reasons.most_common(5))
            why = why or "no operator owns removable variables"
            log.warning("lightning_oto: %s has no %s group (%d groups found): %s.", type(self.model).__name__, word,
                        len(self.groups), why)
        elif self.unsupported_ops:
            kinds = ", ".join(sorted(self.unsupported_ops)[:5])
            more = "" if len(self.unsupported_ops) <= 5 else f" (+{len(self.unsupported_ops) - 5} more)"
            log.warning("lightning_oto: groups touching %s%s are kept (not %s).", kinds, more, word)

    # ------------------------------------------------------------------ groups
    @property
    def prunable_groups(self) -> list[Group]:
        return [g for g in self.groups if g.prunable]

    @property
    def segment_graph(self) -> Any:
        """Erase mode: the segment graph the hierarchy check runs on (None in prune mode)."""
        return getattr(self._mode, "segment_graph", None)

    @property
    def dynamic_dims(self) -> list[list[int]]:
        """Per example input, the dimensions the trace kept dynamic."""
        return self.graph.dynamic_dims

    def _params(self) -> dict[str, torch.Tensor]:
        return dict(self.model.named_parameters())

    def zero_group_ids(self) -> list[int]:
        """Prunable groups whose variables are all exactly zero in the model right now."""
        params = self._params()
        return [g.id for g in self.prunable_groups if group_is_zero(g, params)]

    def hierarchy_check(self, accepted: frozenset[int], candidate: int) -> bool:
        """True when ``candidate`` may be removed on top of ``accepted`` (erase: nothing gets disconnected)."""
        return self._mode.hierarchy_check(accepted, candidate)

    def can_remove(self, accepted: frozenset[int], candidate: int) -> bool:
        """The hierarchy check and the per-module caps together."""
        if self.candidate_filter is not None and not self.candidate_filter(accepted, candidate):
            return False
        return self.hierarchy_check(accepted, candidate)

    def random_set_zero_groups(self, fraction: float = 0.5, seed: int = 0) -> list[int]:
        """Zero a random valid set of round(fraction * #prunable) groups in the model; returns their ids."""
        if not (0.0 <= fraction <= 1.0):
            raise ValueError(f"fraction must be in [0, 1], got {fraction!r}.")
        rng = random.Random(seed)
        cand = [g.id for g in self.prunable_groups]
        rng.shuffle(cand)
        k = round(fraction * len(cand))
        chosen: list[int] = []
        for gid in cand:
            if len(chosen) >= k:
                break
            if self.can_remove(frozenset(chosen), gid):
                chosen.append(gid)
        params = self._params()
        for gid in chosen:
            zero_group(self.groups[gid], params)
        return sorted(chosen)

    # ------------------------------------------------------------------ optimizers
    def dhspg(self, lr: float = 0.1, target_group_sparsity: float | None = None,
              budget: dict[str, float] | None = None, **kwargs: Any) -> torch.optim.Optimizer:
        """DHSPG over this search space (prune mode; in erase mode only for the paper's Table 4 ablation,
        with ``erase_ablation=True``).  How much goes: ``target_group_sparsity`` (default 0.5) or
        ``budget={"flops" | "params" | "latency": fraction kept}``, not both."""
        return self.build_optimizer("dhspg", lr=lr, target_group_sparsity=target_group_sparsity, budget=budget,
                                    **kwargs)

    def h2spg(self, lr: float = 0.1, target_group_sparsity: float | None = None,
              budget: dict[str, float] | None = None, **kwargs: Any) -> torch.optim.Optimizer:
        """H2SPG: hierarchical search over the erase-mode GeZIGs, then hybrid training (``budget`` as dhspg)."""
        return self.build_optimizer("h2spg", lr=lr, target_group_sparsity=target_group_sparsity, budget=budget,
                                    **kwargs)

    def hesso(self, lr: float = 0.1, target_group_sparsity: float | None = None,
              budget: dict[str, float] | None = None, **kwargs: Any) -> torch.optim.Optimizer:
        """HESSO-style progressive shrinking (prune mode; ``budget`` as dhspg)."""
        return self.build_optimizer("hesso", lr=lr, target_group_sparsity=target_group_sparsity, budget=budget,
                                    **kwargs)

    def build_optimizer(self, name: str | None = None, named_params: Iterable[tuple[str, nn.Parameter]] | None = None,
                        *, erase_ablation: bool = False, target_group_sparsity: float | None = None,
                        budget: Mapping[str, float] | None = None, **hyperparams: Any) -> torch.optim.Optimizer:
        """The one construction path for an optimizer over this search space (``OTO.dhspg/h2spg/hesso``,
        :class:`OTOCallback` and :class:`OTOMixin` all come here), so what the search space carries
        besides its groups (the hierarchy check, the per-module caps and layer floors as the optimizer's
        ``candidate_filter``, a budget's costs as its ``cost_model``) can never be left out by one caller.

        ``name``: ``"dhspg"`` / ``"h2spg"`` / ``"hesso"`` (None: the mode's default); ``named_params``:
        the parameters to train, named as in the trace (default: the model's trainable ones); how much goes:
        ``target_group_sparsity`` or ``budget`` (:meth:`selection_kwargs`, where every refusal happens, before
        a step and without touching the model); ``hyperparams`` go to
        :func:`lightning_oto.optim.factory.build_optimizer` (a ``candidate_filter`` there replaces the caps).
        """
        from .optim.factory import build_optimizer

        selection = self.selection_kwargs(target_group_sparsity, budget)
        selection.update(hyperparams)
        if named_params is None:
            named_params = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        return build_optimizer(name, named_params, self.groups, mode=self.mode, hierarchy_check=self.hierarchy_check,
                               erase_ablation=erase_ablation, **selection)

    # ------------------------------------------------------------------ budgets
    def selection_kwargs(self, target_group_sparsity: float | None = None,
                         budget: Mapping[str, float] | None = None) -> dict[str, Any]:
        """How an optimizer chooses what goes, as its keyword arguments: ``target_group_sparsity`` (default
        0.5) or a checked ``budget`` with its ``cost_model``, plus the caps and floors as ``candidate_filter``.

        The one path for ``dhspg/h2spg/hesso``, :class:`OTOCallback` and :class:`OTOMixin`; every refusal
        (unknown key, fraction outside (0, 1], both given, a model that cannot run for a latency budget,
        a budget below the floors) happens here, before a step and without touching the model.
        """
        checked = check_budget(budget)
        if checked and target_group_sparsity is not None:
            raise ValueError(f"give budget ({checked}) or target_group_sparsity ({target_group_sparsity}), not both: "
                             "they are two ways to say how much goes.")
        out: dict[str, Any] = {}
        if self.candidate_filter is not None:
            out["candidate_filter"] = self.candidate_filter
        if not checked:
            target = DEFAULT_TARGET_SPARSITY if target_group_sparsity is None else target_group_sparsity
            return {**out, "target_group_sparsity": target}
        costs = self.cost_model(latency="latency" in checked)
        self._check_reachable(checked, costs)
        return {**out, "budget": checked, "cost_model": costs}

    def cost_model(self, latency: bool = False) -> CostModel:
        """What removing each group saves (params, FLOPs; with ``latency`` also the measured time on the
        model's device at the example input's batch size).  Measured once and cached."""
        if latency not in self._costs:
            costs = measure_costs(self.model, self.example_inputs, self.groups, latency=latency)
            if latency:  # per-operator times differ by rank: under DDP every rank selects on rank 0's
                costs = from_rank0(costs)
                costs.measure_latency = self.measured_latency_fraction
                self._calibrate_latency(costs)
            self._costs[latency] = costs
        return self._costs[latency]

    def _smallest(self, keys: Iterable[str], costs: CostModel) -> Any:
        """Tracker of (about) the smallest sub-network the acceptance rules allow: greedy, largest saving first."""
        tracker = costs.tracker()
        order = sorted((g.id for g in self.prunable_groups),
                       key=lambda gid: -sum(tracker.saving(gid)[k] for k in keys))
        for gid in order:
            if self.can_remove(frozenset(tracker.ids), gid):
                tracker.add(gid)
        return tracker

    def _calibrate_latency(self, costs: CostModel) -> None:
        """Fit ``measured = a + b * modelled`` through the full model and the smallest sub-network (the
        selection's first guess; it then closes the loop on :meth:`measured_latency_fraction`)."""
        smallest = self._smallest(["latency"], costs)
        raw = smallest.raw_fractions()["latency"]
        if not smallest.ids or raw >= 0.999:
            return
        measured = self.measured_latency_fraction(smallest.ids)
        b = max((1.0 - measured) / (1.0 - raw), 1e-3)  # a smallest network that is not faster: nothing to gain
        costs.calibration["latency"] = (1.0 - b, b)

    @torch.no_grad()
    def measured_latency_fraction(self, removed: Iterable[int], runs: int = 21) -> float:
        """Measured time of the sub-network without the groups ``removed`` over the full model's: built on
        a copy (the model is not touched), both timed in turn on the model's device at the example input's
        batch size (median of ``runs``).  Under DDP every rank measures and the mean is returned, so
        every rank makes the same selection."""
        ids = sorted(set(removed))
        if not ids:
            return 1.0
        copy_ = copy.deepcopy(self.model)
        params = dict(copy_.named_parameters())
        for gid in ids:
            zero_group(self.groups[gid], params)
        sub = self._mode.construct(copy_, [self.groups[i] for i in ids])
        device = next((p.device for p in self.model.parameters()), torch.device("cpu"))
        return mean_over_ranks(self._latency_ratio(sub, runs), device)

    def _latency_ratio(self, sub: nn.Module, runs: int = 21) -> float:
        """Time of ``sub`` over the full model's: interleaved eval forwards of the example input on the model's
        device (median of ``runs``; this process only).  The full model is timed as the dense model it stands
        for (:func:`~lightning_oto.subnet.timing.dense_stand_in`: its zero groups refilled)."""
        device = next((p.device for p in self.model.parameters()), torch.device("cpu"))
        inputs = map_tensors(lambda t: t.to(device), self.example_inputs)
        t = interleaved_times({"full": dense_stand_in(self.model), "sub": sub}, inputs, runs=runs, warmup=3)
        return t["sub"] / max(t["full"], 1e-12)

    def _check_reachable(self, budget: dict[str, float], costs: CostModel) -> None:
        """Refuse a budget that the floors (or caps, kept groups, the hierarchy check) make unreachable.

        Greedily removes every group the acceptance rules allow, largest saving first: what is left is
        (about) the smallest sub-network the search space allows.
        """
        tracker = self._smallest(budget, costs)
        least = tracker.fractions()
        short = {k: least[k] for k, b in budget.items() if least[k] > b + BUDGET_TOLERANCE / 2}
        if not short:
            return
        what = ", ".join(f"{k} {budget[k]:g} (the smallest sub-network keeps {v:.3f})" for k, v in short.items())
        held = [f for f in self.floors if f.holds_at(tracker.ids)]
        if held:
            names = ", ".join(f"{f.layer} keeps {f.keep}/{f.width}" for f in held[:6])
            more = f" and {len(held) - 6} more" if len(held) > 6 else ""
            why = (f"the layer floors hold (min_width={self.min_width:g}: every layer keeps at least "
                   f"{self.min_width:.0%} of its channels and one group): {names}{more}. Lower min_width "
                   f"(OTO(..., min_width=0) turns the floors off) or raise the budget")
        else:
            why = ("the groups that may go are all gone by then (the rest are kept: unprunable structures, "
                   "ignored_layers, max_group_sparsity caps or, in erase mode, the hierarchy check); raise the budget")
        raise ValueError(f"budget below what the search space allows: {what}; {why}.")

    def budget_report(self, sub: nn.Module, budget: dict[str, float]) -> dict[str, dict[str, float]]:
        """Per budget key: what was asked and what the constructed ``sub`` keeps (flops/params counted,
        latency timed on the model's device at the example input's batch size)."""
        budget = check_budget(budget)
        rep = self.compression_report(sub)
        reached = {"flops": rep["flop_ratio"], "params": rep["param_ratio"]}
        if "latency" in budget:  # rank 0 alone writes the report: no collective here
            reached["latency"] = self._latency_ratio(sub)
        return {k: {"asked": b, "reached": float(reached[k])} for k, b in budget.items()}

    def recalibrate_batchnorm(self, batches: Iterable[Any], num_batches: int = 20,
                              inputs_of: Callable[[Any], tuple] | None = None) -> int:
        """Re-estimate the model's BatchNorm running statistics on ``num_batches`` batches (see
        :func:`lightning_oto.subnet.recalibrate.recalibrate_batchnorm`); call it before construction."""
        from .subnet.recalibrate import recalibrate_batchnorm

        return recalibrate_batchnorm(self.model, batches, num_batches=num_batches, inputs_of=inputs_of)

    # ------------------------------------------------------------------ construction
    def construct_subnet(self, verify: bool = True, atol: float = DEFAULT_ATOL, rtol: float = DEFAULT_RTOL,
                         verify_inputs: Sequence[Any] = ()) -> nn.Module:
        """A new, physically smaller module without the zero groups; the original model is untouched.

        Construction itself proves that every zero group is gone (:class:`IncompleteRemovalError`
        otherwise).  With ``verify`` the sub-network's outputs are compared with the full model's in
        eval mode on the example input and each of ``verify_inputs`` (e.g. another batch size or
        sequence length) and :class:`SubnetMismatchError` is raised if they differ by more than
        ``atol + rtol * max|full(x)|`` (the relative part absorbs float32 rounding on large outputs).
        """
        zero = self.zero_group_ids()
        if not zero:
            warnings.warn("construct_subnet: no group is zero yet; returning an equal-size copy.", stacklevel=2)
        zero_groups = [self.groups[i] for i in zero]
        sub = self._mode.construct(self.model, zero_groups)
        if verify:
            try:
                err = check_outputs(self.model, sub, self.example_inputs, atol, rtol)
                for i, extra in enumerate(verify_inputs):
                    inputs = self._like_example(extra, f"verify_inputs[{i}]")
                    err = max(err, check_outputs(self.model, sub, inputs, atol, rtol, context=f"verify_inputs[{i}]"))
            except Exception as e:  # noqa: BLE001 - name the user rules the removed channels went through
                hint = getattr(self._mode, "mismatch_hint", lambda groups: "")(zero_groups)
                if not hint:
                    raise
                raise SubnetMismatchError(f"{e}{hint}") from e
            sub.oto_verification_error = err  # type: ignore[attr-defined]
        return sub

    def verify(self, sub: nn.Module, inputs: Any = None, return_scale: bool = False) -> Any:
        """Max |sub(x) - full(x)| over all outputs, both models in eval mode (modes restored).

        With ``return_scale`` also max |full(x)|, to judge the error relative to the outputs.
        """
        inputs = self.example_inputs if inputs is None else self._like_example(inputs, "inputs")
        err, scale = output_difference(self.model, sub, inputs)
        return (err, scale) if return_scale else err

    def _like_example(self, inputs: Any, what: str) -> Any:
        """Inputs of the example's form: keyword inputs with the example's keys, or positional ones."""
        inputs = normalize_inputs(self.model, inputs)
        want = self.example_inputs
        if isinstance(want, dict) != isinstance(inputs, dict) or \
                (isinstance(want, dict) and set(want) != set(inputs)):
            form = f"a dict with the keys {sorted(want)}" if isinstance(want, dict) else "positional (a tensor or tuple)"
            raise ValueError(f"{what} must have the example input's form: {form}.")
        return inputs

    # ------------------------------------------------------------------ reporting / export
    def compression_report(self, sub: nn.Module | None = None,
                           speed: bool | Sequence[int] = False) -> dict[str, Any]:
        """Parameters and FLOPs (torch.utils.flop_counter) of the full model vs ``sub``.

        ``speed``: also time ``sub`` against the full model on the device they sit on (median of
        interleaved runs, :mod:`lightning_oto.subnet.timing`): ``True`` at batch 1 and at the example
        input's batch size, or the given batch sizes.  Off by default: timing costs forwards.
        """
        from .subnet.report import compression_report

        batches: Sequence[int] = ()
        if speed is True:
            first = next((t for t in self.example_inputs if isinstance(t, torch.Tensor) and t.dim() > 0), None)
            batches = (1,) if first is None else (1, int(first.shape[0]))
        elif speed is not False:
            batches = tuple(speed)
            if not batches or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in batches):
                raise ValueError(f"speed must be True/False or batch sizes (integers >= 1), got {speed!r}")
        if batches and sub is None:
            raise ValueError("speed needs the sub-network: compression_report(sub, speed=...)")
        rep = compression_report(self._mode.reference(self.model), sub, self.example_inputs, self.groups,
                                 self.zero_group_ids(), speed_batch_sizes=batches,
                                 speed_of=dense_stand_in(self.model) if batches else None)
        rep["params_full"] = sum(p.numel() for p in self.model.parameters())
        if sub is not None:
            rep["param_ratio"] = rep["params_sub"] / max(1, rep["params_full"])
        return rep

    def export(self, sub: nn.Module, out_dir: str | Path, formats: Iterable[str] = ("torch", "onnx"),
               check: bool = True, metadata: dict[str, Any] | None = None,
               dynamic_shapes: Any = None) -> dict[str, str]:
        """Write ``sub`` as torch (state_dict + torch.export program) and/or ONNX, and check each reloads;
        ``lightning_oto.load(out_dir)`` gives it back.  ``metadata``: what inference needs (e.g.
        :func:`lightning_oto.data.inference.inference_metadata`).  The exported files keep dynamic every
        input dimension the sub-network allows (``dynamic_shapes="auto"``; a torch.export spec overrides)."""
        from .subnet.export import export_subnet

        dynamic_shapes = dynamic.AUTO if dynamic_shapes is None else dynamic_shapes
        return export_subnet(sub, self.example_inputs, out_dir, formats=formats, check=check, metadata=metadata,
                             dynamic_shapes=dynamic_shapes)

    def visualize(self, out_dir: str | Path, what: Sequence[str] = ("trace", "space", "redundant", "subnet"),
                  sub: nn.Module | None = None) -> dict[str, str]:
        """Draw the trace graph, search space, redundant structures and sub-network (Graphviz); the
        sub-network is constructed for the "subnet" drawing when not given."""
        from .viz.graphviz import visualize

        what = (what,) if isinstance(what, str) else tuple(what)
        if "subnet" in what and sub is None and self.zero_group_ids():
            sub = self.construct_subnet()
        return visualize(self, out_dir, what=what, sub=sub)

    def summary(self, zero_ids: Sequence[int] | None = None) -> str:
        """Per module: channels (prune) or operators (erase) before -> after for the zero groups (default:
        those zero now), and why the groups that stay were kept."""
        from .subnet.summary import erase_summary, format_summary, prune_summary

        zero = self.zero_group_ids() if zero_ids is None else list(zero_ids)
        if self.mode == "prune":
            table = format_summary(prune_summary(self.model, self.groups, zero), "channels")
            held = [f for f in self.floors if f.holds_at(set(zero))]
            if held:
                table += (f"\nfloor held (min_width={self.min_width:g}) in {len(held)} layer(s): "
                          + ", ".join(f"{f.layer} keeps >= {f.keep}/{f.width}" for f in held))
            return table
        return format_summary(erase_summary(self.groups, zero), "operators")

    def __repr__(self) -> str:
        return (f"OTO(mode={self.mode!r}, model={type(self.model).__name__}, ops={len(self.graph)}, "
                f"groups={len(self.groups)}, prunable={len(self.prunable_groups)})")
