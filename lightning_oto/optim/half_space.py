"""Half-space projected gradient optimizers: DHSPG (pruning), H2SPG (erasing), HESSO.

They see only removal groups (:class:`~lightning_oto.space.groups.Group`), never the graph.

Phases (``optimizer.phase``), counted in optimizer steps:

``"warmup"``
    Steps ``0 .. warmup_steps-1``: the base variant (SGD / Adam / AdamW) updates every variable
    while the per-group saliency (smaller = more redundant, see :mod:`.saliency`) is
    exponentially averaged, sampled every few steps (``saliency_interval``; always on the last one).
    At the end of step ``warmup_steps-1`` (at the start of the first step when
    ``warmup_steps == 0``) the redundant set is chosen by :meth:`HalfSpaceOptimizer._choose`:
    ``K = floor(target_group_sparsity * #prunable groups + 0.5)`` groups in ascending saliency,
    skipping candidates that ``candidate_filter`` (and, for H2SPG, ``hierarchy_check``) reject.
    Under DDP the EMA is averaged over ranks first, so every rank picks the same set.
``"projection"``
    The next ``projection_steps`` steps.  Important groups and ungrouped variables take the base
    step ``x <- x - lr*d`` with the variant's processed direction ``d`` (momentum buffer, Adam
    ``m_hat / (sqrt(v_hat) + eps)``).  Redundant groups take the same step damped by
    ``rho_g = |x_g| / |x_g at selection|`` plus an adaptive group-sparsity push that fades them
    geometrically to ``fade_ratio`` of their selection norm by their schedule target; the
    half-space projection sets a group exactly to zero once it is at most ``cut_ratio`` of its
    selection norm and its trial point leaves the half-space ``{z: <z, x_g> > epsilon |x_g|^2}``.
    Zero groups stay zero.  Groups still non-zero at the end of the window (the deadline) are
    forced to zero; the counters :attr:`~HalfSpaceOptimizer.zeroed_by_half_space` and
    :attr:`~HalfSpaceOptimizer.forced_at_deadline` say how many took which way, and
    :meth:`~HalfSpaceOptimizer.cut_norm_ratios` how small each group was when it was cut.
``"hybrid"``
    Afterwards: the redundant groups stay exactly zero and every other variable trains with the
    base variant.

Redundant-group step of DHSPG / H2SPG (``d`` the processed direction per unit ``lr``, ``g`` the
gradient of the objective, ``R_g`` the steps left until the group's schedule target, a fraction
``schedule_fraction`` into its window)::

    rho_g   = |x_g| / |x_g at selection|
    d_g    <- min(rho_g, 1) d_g                      # the step fades with the group
    lo_g    = max(0, -<d_g, x_g> / |x_g|)            # least lambda with which the step does not grow |x_g|
    s_g     = <g_g, x_g> / |x_g|                     # objective slope along x_g: the push costs if s_g < 0
    up_g    = (1 - descent_margin) <g_g, d_g> / -s_g # if s_g < 0: the push costs at most (1-m) of
                                                     # the decrease the base step buys
    r_g     = 1 - (fade_ratio / rho_g)^(1 / R_g)     # per-step shrink reaching fade_ratio by the target
    r_g     = max(r_g, 1 - epsilon) if rho_g <= cut_ratio
    base_g  = lambda_scale * r_g |x_g| / lr
    lam_g   = clip(lambda_amplify * lo_g, base_g, lambda_max * base_g)
    lam_g   = max(base_g, (lo_g + up_g) / 2)  if lam_g > up_g   # DHSPG's bound, never below the schedule
    y_g     = x_g - lr * (d_g + lam_g x_g / |x_g|)
    x_g    <- 0 if rho_g <= cut_ratio and <y_g, x_g> <= epsilon |x_g|^2 else y_g

This is DHSPG's angle-based adaptive lambda (OTOv2; the official code clips ``amplify * lo`` to
``[lambda, hat * lambda]`` and falls back to the midpoint of ``(lo, up)``), with choices of ours so
that a group is small when it is cut (issue 18).  The base lambda is scale free: it is set from
each group's own magnitude, its magnitude at selection and the learning rate, so one default works
for SGD and Adam and for layers of any scale; it shrinks the group geometrically, so the push per
step stays a bounded fraction of the group instead of growing to all of it at the target (the
linear schedule of before crossed the ``1 - epsilon`` threshold about 20 steps before the target,
at about a quarter of the group's size).  The descent bound trims only the amplification: with it
able to undercut the schedule, AdamW groups whose gradient resisted kept most of their size until
the deadline.  The variant's step is damped by ``rho``: Adam's step has the same size whatever
the weight's, so undamped it holds a fading group near ``lr / |w|`` of its size.  The descent bound
``up`` measures the objective's first-order change with its gradient ``g`` (for plain SGD
``d = g`` and it is the paper's bound); measured along the processed direction instead, Adam's
redundant groups end up aligned with ``-d`` and the bound pins lambda to ``|d|``.

Cost relative to a ``torch.optim.SGD(momentum=0.9)`` / ``torch.optim.Adam`` step depends on the projection window.  Lambda and the
half-space test run every ``projection_interval`` steps, by default ``window // 25`` clipped to 1..16
(``window`` = projection steps per pruning period), so short windows pay more per step.
``benchmarks/bench_optim_step.py`` times every phase and interval against SGD (Adam with ``--adam``) in the
same rounds.
Measured 2026-12-03 (CPU, 2 torch threads, 6.6M parameters, 3,520 channel groups, every parameter
holding redundant rows, interleaved blocks of 80 steps; median of the per-round ratios).  "x SGD": the
SGD variant against ``SGD(momentum=0.9)``, 20 rounds (other jobs shared the 2 cores for part of the
run); "x Adam": the Adam variant against ``torch.optim.Adam`` (``--adam``), 10 rounds on a quiet machine:

=================================  ==========================  =========  ==========
phase (projection interval)        default at windows (steps)  x SGD      x Adam
=================================  ==========================  =========  ==========
warm-up                            any                         1.09       1.21
projection, interval 16            400 and more                1.12       1.23
projection, interval 8             200 - 224                   1.26       1.41
projection, interval 4             100 - 124                   1.52       1.62
projection, interval 2             50 - 74                     2.08       2.03
projection, interval 1             under 50                    3.22       2.63
hybrid                             after projection            0.92       1.21
H2SPG projection (interval 16)     400 and more                1.06       1.24
=================================  ==========================  =========  ==========

Run the benchmark on your machine before quoting a figure.

How: the update is one ``x <- A x - lr C d`` (:mod:`.variants`)
whose per-row factors carry the projection (``C = 0`` on zero rows, so they stay zero at no
cost).  Lambda and the half-space test are evaluated every ``k`` steps (``projection_interval``)
on the parameters that hold active redundant rows only; the push of those ``k`` steps is applied
at the evaluation (``A = (1 - lr*lam/|x|)^k``, the only extra pass), while the test judges the
single-step trial point.  Saliency is sampled every few warm-up steps (``saliency_interval``).
Both intervals default to 1 for short phases (the papers' per-step rule) and grow with the
phase length.  Nothing in the step path waits for the device (no ``.item()``, no
``bool(tensor)``), except on the few steps where the redundant set changes (selection, deadline).

Everything (step counter, saliency EMA, redundant/zero sets, targets, deadlines, lambdas, push
rates, counters, momentum / Adam moments) is in ``state_dict()``; a resumed run reproduces an
uninterrupted one bit for bit.  Optimizer-state rows of zero groups are never used (their update is
masked), so they are not kept at zero.  One parameter group only (learning-rate schedulers work on
it as usual).
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
import torch.distributed as dist

from lightning_oto.optim.group_index import GroupIndex, GroupStats, RowFactors
from lightning_oto.optim.saliency import SaliencyFn, get_saliency
from lightning_oto.optim.shards import LocalState, is_sharded, local_view
from lightning_oto.optim.variants import Direction, UpdatePlan, apply_update, decoupled_decay, directions
from lightning_oto.space.costs import BUDGET_TOLERANCE, LATENCY_TOLERANCE, CostModel, check_budget
from lightning_oto.space.groups import Group

#: a budget selection may undershoot its target by at most this much (half the reported tolerance)
BUDGET_SLACK = BUDGET_TOLERANCE / 2
_LATENCY_ROUNDS = 6  # sub-networks built and timed per selection to meet a latency budget as measured
#: at most this many groups are tried for giving back after an overshoot (each try recounts the set)
_MAX_GIVE_BACK = 128
#: when the greedy selection misses a budget, up to this many candidates are searched exhaustively
#: (erase mode's few whole operators); more are improved by add / drop / swap moves
_EXHAUSTIVE_CANDIDATES = 12
_SWAP_ROUNDS = 20
_MOVE_CANDIDATES = 64  # beyond this the groups are fine-grained (prune mode): the greedy result stands

__all__ = ["HalfSpaceOptimizer", "DHSPG", "H2SPG", "HESSO", "VARIANTS", "CandidateFilter", "cut_ratio_summary"]

VARIANTS = ("sgd", "adam", "adamw")
_STATE_VERSION = 2
#: how a group became zero (``_zero_how``)
_NOT_ZERO, _BY_HALF_SPACE, _AT_DEADLINE = 0, 1, 2

#: ``(accepted_ids, candidate_id) -> bool``: may the candidate join the redundant set?
CandidateFilter = Callable[[frozenset, int], bool]


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce_mean_(t: torch.Tensor) -> torch.Tensor:
    if t.numel() and _distributed():
        dist.all_reduce(t)
        t.div_(dist.get_world_size())
    return t


def cut_ratio_summary(ratios: Sequence[float], by_half_space: int = 0,
                      at_deadline: int = 0) -> dict[str, float | int | None]:
    """Plain-data distribution of cut-norm ratios (shared by the optimizer, the report and the logs)."""
    r = sorted(ratios)

    def quantile(q: float) -> float | None:
        return None if not r else r[min(len(r) - 1, int(math.floor(q * (len(r) - 1) + 0.5)))]

    return {"cut": len(r), "median": quantile(0.5), "p90": quantile(0.9), "max": r[-1] if r else None,
            "above_0.1": sum(x > 0.1 for x in r), "zeroed_by_half_space": by_half_space,
            "forced_at_deadline": at_deadline}


def _positive(scores: torch.Tensor) -> list[float]:
    """Saliencies shifted to start just above zero (a ratio or a sum of them then means the same for any
    score scale)."""
    s = scores.tolist()
    lo, hi = (min(s), max(s)) if s else (0.0, 0.0)
    return [v - lo + 1e-3 * ((hi - lo) or 1.0) for v in s]


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_int(name: str, v: Any, low: int) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")


def _check_unit(name: str, v: Any, what: str = "[0, 1)") -> None:
    if not _finite(v) or not 0.0 <= v < 1.0:
        raise ValueError(f"{name} must be in {what}, got {v!r}")


def _check_phases(warmup_steps: Any, projection_steps: Any, pruning_periods: Any) -> None:
    _check_int("warmup_steps", warmup_steps, 0)
    _check_int("projection_steps", projection_steps, 0)
    _check_int("pruning_periods", pruning_periods, 1)
    if pruning_periods > max(projection_steps, 1):
        raise ValueError(f"pruning_periods ({pruning_periods}) cannot exceed projection_steps ({projection_steps})")


class HalfSpaceOptimizer(torch.optim.Optimizer):
    """Base class of the half-space projected gradient family (see the module docstring).

    Args:
        named_params: ``(name, parameter)`` pairs, e.g. ``model.named_parameters()``.  Every
            parameter is optimized; group slices refer to these names.
        groups: removal structures; only ``prunable`` groups with variables are candidates.
        lr, variant, momentum, nesterov, betas, eps, weight_decay: the base optimizer
            (``variant`` in ``"sgd"``, ``"adam"``, ``"adamw"``; ``momentum``/``nesterov`` for SGD,
            ``betas``/``eps`` for Adam(W); AdamW decouples the weight decay).
        target_group_sparsity: fraction of prunable groups to zero, in ``[0, 1)``.
        warmup_steps, projection_steps: phase lengths in optimizer steps.
        pruning_periods: split the projection window in this many periods; period ``i`` adds
            redundant groups up to ``round(K*(i+1)/pruning_periods)`` and zeroes them by its end.
        epsilon: half-space threshold in ``[0, 1)``; larger projects earlier (default 0.95, as the
            official OTOv2 tutorials).
        schedule_fraction: in ``(0, 1]``: the base lambda alone brings a group to zero this far into
            its window (default 0.5); the rest is slack for groups whose gradient resists the push.
        lambda_scale: multiplier of the base lambda (``> 0``).
        lambda_amplify, lambda_max: ``lam = clip(lambda_amplify * lo, base, lambda_max * base)``
            (DHSPG's amplification of the least non-growing lambda, and its upper bound).
        descent_margin: ``m`` in ``[0, 1)`` of the descent bound ``up`` on lambda.
        projection_interval: lambda and the half-space test are evaluated every this many steps
            (1 = every step, as in the papers); in between a group keeps its last push rate.
            ``None`` (default): ``projection_steps / pruning_periods / 25`` clamped to ``[1, 16]``
            (about 25 evaluations per window): windows under 50 steps are evaluated every step,
            long ones cost almost nothing extra.
        saliency: registered name or callable ``GroupStats -> [G]`` (smaller = more redundant).
        saliency_ema: EMA coefficient ``beta`` in ``[0, 1)`` (``ema = beta*ema + (1-beta)*score``)
            per sample.
        saliency_interval: score every this many warm-up steps (the last one before a selection
            always counts).  ``None`` (default): ``warmup_steps / 50`` clamped to ``[1, 10]``.
        saliency_steps: ``None``: score over the whole warm-up.  An integer ``N`` scores only
            within the last ``N`` steps before each selection.
        candidate_filter: ``(accepted_ids, candidate_id) -> bool``; candidates it rejects are
            skipped (e.g. per-module caps, layer floors).  ``None`` accepts every candidate.
        fade_ratio: in ``(0, 1)``: the base lambda shrinks a redundant group geometrically to this
            fraction of its norm at selection by its schedule target (default 1e-3).
        cut_ratio: in ``[fade_ratio, 1)``: the half-space test may cut a group only once it is at most
            this fraction of its norm at selection (default 1e-2), so nothing is cut at full size
            before the deadline.
        budget: ``{"flops" | "params" | "latency": fraction}`` instead of ``target_group_sparsity``:
            the redundant set is chosen so that the sub-network keeps at most that fraction of the
            full model's cost (see :meth:`_choose_budget`); needs ``cost_model``.
        cost_model: :class:`~lightning_oto.space.costs.CostModel` of the groups (plain numbers per
            tensor, built by ``OTO``): what removing each group saves.
        cost_weight: in ``[0, 1]``: a budget ranks candidates by ``saliency / saving**cost_weight``;
            1 is the knapsack ratio (cheapest saliency per unit cost: it strips the costliest layers to
            their floors first), 0 (the default) ranks by saliency alone and the cost only says when to
            stop.  Measured at equal FLOPs on three CNN tasks (``benchmarks/bench_cost_weight.py``),
            weighing by cost lost accuracy: it strips the high-resolution layers whose channels cost
            the most, which the networks need (``docs/quality.md``).
    """

    def __init__(
        self,
        named_params: Iterable[tuple[str, torch.nn.Parameter]],
        groups: Sequence[Group],
        lr: float = 0.1,
        variant: str = "sgd",
        momentum: float = 0.9,
        nesterov: bool = False,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        target_group_sparsity: float = 0.5,
        warmup_steps: int = 1000,
        projection_steps: int = 1000,
        pruning_periods: int = 1,
        epsilon: float = 0.95,
        lambda_scale: float = 1.0,
        descent_margin: float = 0.1,
        saliency: str | SaliencyFn = "default",
        saliency_ema: float = 0.9,
        saliency_steps: int | None = None,
        *,
        schedule_fraction: float = 0.5,
        lambda_amplify: float = 2.0,
        lambda_max: float = 10.0,
        projection_interval: int | None = None,
        saliency_interval: int | None = None,
        candidate_filter: CandidateFilter | None = None,
        fade_ratio: float = 1e-3,
        cut_ratio: float = 1e-2,
        budget: Mapping[str, float] | None = None,
        cost_model: CostModel | None = None,
        cost_weight: float = 0.0,
    ) -> None:
        named = self._check_named_params(named_params)
        self._set_budget(budget, cost_model, cost_weight)
        base = dict(lr=lr, variant=variant, momentum=momentum, nesterov=nesterov, betas=betas, eps=eps,
                    weight_decay=weight_decay)
        search = dict(
            target_group_sparsity=target_group_sparsity, warmup_steps=warmup_steps,
            projection_steps=projection_steps, pruning_periods=pruning_periods, epsilon=epsilon,
            schedule_fraction=schedule_fraction, lambda_scale=lambda_scale, lambda_amplify=lambda_amplify,
            lambda_max=lambda_max, descent_margin=descent_margin, projection_interval=projection_interval,
            saliency_ema=saliency_ema, saliency_interval=saliency_interval, saliency_steps=saliency_steps,
            candidate_filter=candidate_filter, fade_ratio=fade_ratio, cut_ratio=cut_ratio,
        )
        self._check_args(**base, **search)
        self._saliency_fn = get_saliency(saliency)
        candidates = self._candidates(groups)
        params = list({id(p): p for _, p in named}.values())  # unique, in the given order
        if not params:
            raise ValueError("optimizer got an empty parameter list")
        self._init_done = False
        super().__init__(params, dict(base, betas=tuple(betas)))
        self._init_done = True
        self._index = GroupIndex(named, candidates, replica_mean=True)
        # the search settings are plain attributes (validated above); the two intervals are properties
        # that fill in their defaults, so their arguments are kept under private names
        self._projection_interval = search.pop("projection_interval")
        self._saliency_interval = search.pop("saliency_interval")
        self.__dict__.update(search)
        self.num_prunable = self._index.num_groups
        self.num_redundant_target = _round_half_up(self.target_group_sparsity * self.num_prunable)
        if self.budget:  # the budget decides how many at selection; the schedule only needs the periods
            self.num_redundant_target = self.num_prunable
        self._reset_search_state()

    def _reset_search_state(self) -> None:
        G, dev = self.num_prunable, self._index.device
        self._num_steps = 0
        self._selections_done = 0
        self._warned_short = False
        # no candidates: nothing to score, the (empty) partition can happen on schedule
        self._ema: torch.Tensor | None = torch.zeros(0, device=dev) if G == 0 else None
        self._redundant = torch.zeros(G, dtype=torch.bool, device=dev)
        self._frozen = torch.zeros(G, dtype=torch.bool, device=dev)
        self._deadline = torch.zeros(G, dtype=torch.long, device=dev)
        self._target = torch.zeros(G, dtype=torch.long, device=dev)
        self._lambdas = torch.zeros(G, dtype=torch.float32, device=dev)
        self._push = torch.zeros(G, dtype=torch.float32, device=dev)
        self._zero_how = torch.zeros(G, dtype=torch.long, device=dev)
        self._zero_step = torch.full((G,), -1, dtype=torch.long, device=dev)
        # norm at selection and just before the group was cut (-1: not yet): how small it was when cut
        self._selected_norm = torch.full((G,), -1.0, dtype=torch.float32, device=dev)
        self._cut_norm = torch.full((G,), -1.0, dtype=torch.float32, device=dev)
        # factor of the variant's step on an active redundant group: its norm / its norm at selection
        self._damp = torch.ones(G, dtype=torch.float32, device=dev)
        self._schedule = self._build_schedule()
        self._redundant_ids: list[int] = []
        self._next_deadline: float = math.inf  # host copy: finding the due step never syncs
        self._needs_refresh = True

    # ------------------------------------------------------------------ validation
    @staticmethod
    def _candidates(groups: Sequence[Group]) -> list[Group]:
        out = []
        for g in groups:
            if not isinstance(g, Group):
                raise ValueError(f"groups must be lightning_oto.space.groups.Group objects, got {type(g).__name__}")
            if not g.prunable:
                continue
            if not g.slices:
                warnings.warn(f"prunable group {g.id} ({g.name!r}) has no variables; it is not a candidate")
                continue
            out.append(g)
        return out

    @staticmethod
    def _check_named_params(named_params: Any) -> list[tuple[str, torch.Tensor]]:
        if isinstance(named_params, torch.nn.Module):
            named_params = named_params.named_parameters()
        if isinstance(named_params, torch.Tensor):
            raise ValueError("named_params must be (name, parameter) pairs, e.g. model.named_parameters()")
        named = list(named_params)
        for item in named:
            if (
                not isinstance(item, (tuple, list))
                or len(item) != 2
                or not isinstance(item[0], str)
                or not isinstance(item[1], torch.Tensor)
            ):
                raise ValueError(
                    "named_params must be (name, parameter) pairs, e.g. model.named_parameters(); "
                    f"got an element of type {type(item).__name__}"
                )
        return named

    @staticmethod
    def _check_args(**a: Any) -> None:
        """One place for the argument checks (clear messages, nothing silently clamped)."""
        if not _finite(a["lr"]) or a["lr"] <= 0:
            raise ValueError(f"lr must be a finite number > 0, got {a['lr']!r}")
        if a["variant"] not in VARIANTS:
            raise ValueError(f"unknown variant {a['variant']!r}; valid variants: {', '.join(VARIANTS)}")
        _check_unit("momentum", a["momentum"])
        if a["nesterov"] and (a["variant"] != "sgd" or a["momentum"] <= 0):
            raise ValueError("nesterov=True requires variant='sgd' and momentum > 0")
        b = a["betas"]
        if not isinstance(b, (tuple, list)) or len(b) != 2 or not all(_finite(x) and 0.0 <= x < 1.0 for x in b):
            raise ValueError(f"betas must be two numbers in [0, 1), got {b!r}")
        for k in ("eps", "weight_decay"):
            if not _finite(a[k]) or a[k] < 0:
                raise ValueError(f"{k} must be >= 0, got {a[k]!r}")
        _check_unit("target_group_sparsity", a["target_group_sparsity"])
        _check_phases(a["warmup_steps"], a["projection_steps"], a["pruning_periods"])
        _check_unit("epsilon (half-space threshold)", a["epsilon"])
        _check_unit("descent_margin", a["descent_margin"])
        _check_unit("saliency_ema", a["saliency_ema"])
        sf = a["schedule_fraction"]
        if not _finite(sf) or not 0.0 < sf <= 1.0:
            raise ValueError(f"schedule_fraction must be in (0, 1], got {sf!r}")
        for k in ("lambda_scale", "lambda_amplify"):
            if not _finite(a[k]) or a[k] <= 0:
                raise ValueError(f"{k} must be > 0, got {a[k]!r}")
        if not _finite(a["lambda_max"]) or a["lambda_max"] < 1:
            raise ValueError(f"lambda_max must be >= 1 (a multiple of the base lambda), got {a['lambda_max']!r}")
        if a["projection_interval"] is not None:
            _check_int("projection_interval", a["projection_interval"], 1)
        if a["saliency_interval"] is not None:
            _check_int("saliency_interval", a["saliency_interval"], 1)
        if a["saliency_steps"] is not None:
            _check_int("saliency_steps", a["saliency_steps"], 1)
        for k in ("fade_ratio", "cut_ratio"):
            if not _finite(a[k]) or not 0.0 < a[k] < 1.0:
                raise ValueError(f"{k} must be in (0, 1) (a fraction of the group's norm at selection), got {a[k]!r}")
        if a["fade_ratio"] > a["cut_ratio"]:
            raise ValueError(f"fade_ratio ({a['fade_ratio']}) must not exceed cut_ratio ({a['cut_ratio']}): "
                             "the schedule must bring a group below the size at which it may be cut")
        if a["candidate_filter"] is not None and not callable(a["candidate_filter"]):
            raise ValueError("candidate_filter must be callable (accepted_ids: frozenset[int], candidate_id: int) -> bool")

    def _set_budget(self, budget: Mapping[str, float] | None, cost_model: CostModel | None,
                    cost_weight: float) -> None:
        """Validate and keep the budget settings (the selection reads them at :meth:`_choose_budget`)."""
        self.budget = check_budget(budget)
        if self.budget and not isinstance(cost_model, CostModel):
            raise ValueError("a budget needs cost_model (a lightning_oto.space.costs.CostModel): build the optimizer "
                             "with OTO(...).dhspg/h2spg/hesso(budget=...), which measures it.")
        missing = [k for k in self.budget if cost_model is not None and k not in cost_model.totals]
        if missing:
            raise ValueError(f"budget key(s) {missing} were not measured by cost_model (it has "
                             f"{sorted(cost_model.totals)}).")
        if not _finite(cost_weight) or not 0.0 <= cost_weight <= 1.0:
            raise ValueError(f"cost_weight must be in [0, 1], got {cost_weight!r}")
        self.cost_model = cost_model
        self.cost_weight = float(cost_weight)
        self.budget_reached: dict[str, float] = {}

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if getattr(self, "_init_done", False):
            raise NotImplementedError(
                f"{type(self).__name__} indexes its parameters at construction; add_param_group is not supported"
            )
        super().add_param_group(param_group)

    def set_phases(self, warmup_steps: int, projection_steps: int) -> None:
        """Set the warm-up and projection lengths before the first step.

        ``OTOCallback`` builds the optimizer before Lightning restores a checkpoint and knows the run's
        length only afterwards (asking earlier would load the training dataloader too early, see
        ``docs/distributed.md``); a restored state brings its own lengths instead.
        """
        if self._num_steps or self._selections_done:
            raise RuntimeError(f"{type(self).__name__}.set_phases: the search has started (step {self._num_steps}); "
                               "the phase lengths can only change before the first step.")
        _check_phases(warmup_steps, projection_steps, self.pruning_periods)
        self.warmup_steps, self.projection_steps = int(warmup_steps), int(projection_steps)
        self._reset_search_state()

    # ------------------------------------------------------------------ public read-only API
    @property
    def phase(self) -> str:
        """``"warmup"``, ``"projection"`` or ``"hybrid"`` (see the module docstring)."""
        if self._selections_done == 0:
            return "warmup"
        if self._num_steps < self.warmup_steps + self.projection_steps:
            return "projection"
        return "hybrid"

    @property
    def num_steps(self) -> int:
        return self._num_steps

    @property
    def index(self) -> GroupIndex:
        return self._index

    @property
    def prunable_group_ids(self) -> list[int]:
        """Ids of the candidate groups, in the order of :attr:`saliency_scores`."""
        return list(self._index.group_ids)

    @property
    def redundant_group_ids(self) -> list[int]:
        """Sorted ids of the redundant set (a host-side copy: reading it never waits for the device)."""
        return list(self._redundant_ids)

    @property
    def saliency_scores(self) -> torch.Tensor | None:
        """EMA saliency per candidate group (order of :attr:`prunable_group_ids`), or ``None``."""
        return None if self._ema is None else self._ema.detach().clone()

    @property
    def lambdas(self) -> torch.Tensor:
        """Lambda of the last projection evaluation per candidate group (0 for the others)."""
        return self._lambdas.detach().clone()

    @property
    def zeroed_by_half_space(self) -> int:
        """Redundant groups the half-space test set to zero (before their deadline)."""
        return int((self._zero_how == _BY_HALF_SPACE).sum())

    @property
    def forced_at_deadline(self) -> int:
        """Redundant groups still non-zero at their deadline and therefore set to zero there."""
        return int((self._zero_how == _AT_DEADLINE).sum())

    def cut_norm_ratios(self) -> dict[int, float]:
        """``{group id: |x_g| just before its cut / |x_g| at its selection}`` for the cut redundant groups.

        The measure of "nothing was destroyed": a group removed at full size (ratio near 1) takes
        whatever it still contributed with it; one removed at 1e-3 of its size costs nothing.
        """
        cut = (self._cut_norm >= 0).tolist()
        ratio = (self._cut_norm / self._selected_norm.clamp_min(torch.finfo(torch.float32).tiny)).tolist()
        return {gid: r for gid, c, r in zip(self._index.group_ids, cut, ratio) if c}

    def cut_norm_summary(self) -> dict[str, float | int | None]:
        """Distribution of :meth:`cut_norm_ratios` (count, median, p90, max, how many above 0.1) and how
        the groups were cut; ``None`` statistics while nothing is cut."""
        return cut_ratio_summary(list(self.cut_norm_ratios().values()), self.zeroed_by_half_space,
                                 self.forced_at_deadline)

    @property
    def zero_steps(self) -> dict[int, int]:
        """``{group id: step at which it became zero}`` for the redundant groups that are zero."""
        steps = self._zero_step.tolist()
        return {gid: s for gid, s in zip(self._index.group_ids, steps) if s >= 0}

    def zero_group_ids(self) -> list[int]:
        """Prunable groups whose variables are all exactly zero (sorted ids)."""
        if self.num_prunable == 0:
            return []
        return self._index.ids_from_mask(self._index.is_zero())

    def group_sparsity(self) -> float:
        """Fraction of prunable groups that are exactly zero."""
        if self.num_prunable == 0:
            return 0.0
        return len(self.zero_group_ids()) / self.num_prunable

    # ------------------------------------------------------------------ schedule / selection
    def _build_schedule(self) -> list[tuple[int, int, int]]:
        """``(at_step, cumulative_k, deadline)`` per selection."""
        W, P, n, K = self.warmup_steps, self.projection_steps, self.pruning_periods, self.num_redundant_target
        bounds = [W + (i * P) // n for i in range(n + 1)]
        return [(bounds[i], _round_half_up(K * (i + 1) / n), bounds[i + 1]) for i in range(n)]

    def _acceptance_rules(self) -> list[CandidateFilter]:
        """Predicates a candidate must pass to join the redundant set (H2SPG adds its hierarchy check)."""
        return [] if self.candidate_filter is None else [self.candidate_filter]

    def _choose(self, scores: torch.Tensor, k: int, exclude: torch.Tensor) -> list[int]:
        """Positions of up to ``k`` new redundant groups: the one place the redundant set is chosen.

        Candidates are visited in ascending saliency (stable order); every acceptance rule gets the
        ids accepted so far (earlier periods included) and the candidate id.  If fewer than ``k``
        pass, the ones that do are used and a warning (once per optimizer) says how many.
        """
        order = torch.sort(scores, stable=True).indices.tolist()
        ex = exclude.tolist()
        rules = self._acceptance_rules()
        if not rules:
            return [i for i in order if not ex[i]][:k]
        ids = self._index.group_ids
        accepted = set(self._redundant_ids)
        chosen: list[int] = []
        for pos in order:
            if len(chosen) >= k:
                break
            if ex[pos]:
                continue
            if all(rule(frozenset(accepted), ids[pos]) for rule in rules):
                chosen.append(pos)
                accepted.add(ids[pos])
        if len(chosen) < k and not self._warned_short:
            self._warned_short = True
            total = len(accepted)
            warnings.warn(
                f"{type(self).__name__}: only {len(chosen)} of the requested {k} redundant groups pass "
                f"{self._rules_name()}; using {len(chosen)} (group sparsity "
                f"{total / max(self.num_prunable, 1):.3f} instead of {self.target_group_sparsity:.3f})",
                stacklevel=4,
            )
        return chosen

    def _rules_name(self) -> str:
        return "the candidate filter"

    def _period_budget(self, period: int) -> dict[str, float]:
        """Period ``i`` of ``n`` keeps ``1 - (1 - b) (i + 1) / n`` of each budgeted cost (the last keeps ``b``)."""
        n = max(self.pruning_periods, 1)
        return {k: 1.0 - (1.0 - b) * (period + 1) / n for k, b in self.budget.items()}

    def _choose_budget(self, scores: torch.Tensor, targets: dict[str, float]) -> list[int]:
        """Positions of the new redundant groups that bring every budgeted cost down to ``targets``
        (:meth:`_choose_to_modelled_costs`); a latency target is then met as measured
        (:meth:`_meet_measured_latency`)."""
        chosen = self._choose_to_modelled_costs(scores, targets)
        measured: dict[str, float] = {}
        if "latency" in targets and self.cost_model.measure_latency is not None:
            chosen, measured["latency"] = self._meet_measured_latency(scores, targets, chosen)
        ids = self._index.group_ids
        tracker = self.cost_model.tracker(set(self._redundant_ids) | {ids[p] for p in chosen})
        self.budget_reached = {**tracker.fractions(), **measured}
        self.num_redundant_target = len(self._redundant_ids) + len(chosen)
        self._warn_if_off(targets)
        return chosen

    def _meet_measured_latency(self, scores: torch.Tensor, targets: dict[str, float],
                               chosen: list[int]) -> tuple[list[int], float]:
        """Close the loop on measured time, as Torch-Pruning loops until a speed-up is met: the sub-network
        of ``chosen`` is built and timed (``cost_model.measure_latency``); while it misses the asked
        fraction by more than ``LATENCY_TOLERANCE`` of it, the modelled latency target moves along the
        secant of the last two tries (by the miss after the first) and the selection is redone.  At most
        ``_LATENCY_ROUNDS`` sub-networks are timed; the best try is kept (one within budget first).

        A try that one timing puts within the tolerance is timed again and counts with the mean of the two:
        a small model's timing moves by a few percent from call to call, and keeping the first lucky one
        of several tries reported 0.300 for a sub-network that re-measures 0.325."""
        asked, ids, base = targets["latency"], self._index.group_ids, set(self._redundant_ids)
        tries: list[tuple[float, float, list[int]]] = []  # (modelled target, measured, chosen)
        target = asked

        def within(m: float) -> bool:
            return abs(m - asked) <= LATENCY_TOLERANCE * asked

        for _ in range(_LATENCY_ROUNDS):
            removed = frozenset(base | {ids[p] for p in chosen})
            measured = self.cost_model.measure_latency(removed)
            if within(measured):
                measured = (measured + self.cost_model.measure_latency(removed)) / 2
            tries.append((target, measured, chosen))
            if within(measured):
                break
            (t1, m1, _), slope = tries[-1], 1.0
            if len(tries) > 1 and abs(m1 - tries[-2][1]) > 1e-6:
                slope = (t1 - tries[-2][0]) / (m1 - tries[-2][1])
            target = min(max(t1 + (asked - m1) * min(max(slope, 0.2), 5.0), 0.0), 1.0)
            again = self._choose_to_modelled_costs(scores, {**targets, "latency": target})
            if again == chosen:
                break
            chosen = again
        within = [t for t in tries if t[1] <= asked * (1 + LATENCY_TOLERANCE)]
        best = min(within or tries, key=lambda t: abs(t[1] - asked))
        return best[2], best[1]

    def _choose_to_modelled_costs(self, scores: torch.Tensor, targets: dict[str, float]) -> list[int]:
        """Positions of the new redundant groups that bring every budgeted cost, as the cost model counts
        it, down to ``targets`` (no state changes).

        Knapsack-style greedy: candidates are ranked by saliency per unit of cost saved, the saving
        raised to ``cost_weight`` (saliency shifted to start just above zero, so the ratio is meaningful
        for any score scale; a group that saves nothing is never taken) and accepted while a budgeted cost is above its target.  The
        kept fractions are exact after each acceptance (:class:`~lightning_oto.space.costs.KeptTracker`:
        a weight losing rows and columns counts once).  A candidate that would undershoot a target by
        more than ``BUDGET_SLACK`` is skipped while smaller ones may still fit; the acceptance rules
        (caps, floors, H2SPG's hierarchy check) apply as in :meth:`_choose`.
        """
        ids = self._index.group_ids
        tracker = self.cost_model.tracker(self._redundant_ids)
        ex = self._redundant.tolist()
        weight = _positive(scores)
        ranked = []
        for pos, gid in enumerate(ids):
            gain = sum(tracker.saving(gid)[k] for k in targets) if not ex[pos] else 0.0
            if gain > 0:
                ranked.append((weight[pos] / gain ** self.cost_weight, pos))
        ranked.sort()
        rules = self._acceptance_rules()
        accepted, chosen, skipped = set(self._redundant_ids), [], []
        fr = tracker.fractions()
        for _, pos in ranked:
            need = [k for k, t in targets.items() if fr[k] > t]
            if not need:
                break
            gid = ids[pos]
            if not all(rule(frozenset(accepted), gid) for rule in rules):
                continue
            after = {k: fr[k] - v for k, v in tracker.saving(gid).items()}
            if any(after[k] < targets[k] - BUDGET_SLACK for k in need):
                skipped.append(pos)
                continue
            tracker.add(gid)
            accepted.add(gid)
            chosen.append(pos)
            fr = tracker.fractions()
        closing = self._close_the_gap(tracker, targets, skipped, accepted, rules)
        if closing:  # a large group closed the gap: the small ones before it may be surplus now
            chosen = self._drop_surplus(chosen + closing, targets)
        return self._search_combinations(scores, targets, chosen)

    @staticmethod
    def _budget_key(fractions: Mapping[str, float], targets: Mapping[str, float],
                    cost: float) -> tuple[float, float, bool, float]:
        """Order of preference between two selections: within ``BUDGET_TOLERANCE`` of every target (over it
        first, then under it), then at or below the targets (``BUDGET_SLACK`` allowed), then the least
        saliency removed."""
        over = max(fractions[k] - t for k, t in targets.items())
        under = max(t - fractions[k] for k, t in targets.items())
        return (round(max(0.0, over - BUDGET_TOLERANCE), 9), round(max(0.0, under - BUDGET_TOLERANCE), 9),
                over > BUDGET_SLACK, cost)

    def _search_combinations(self, scores: torch.Tensor, targets: dict[str, float], chosen: list[int]) -> list[int]:
        """Whole operators are coarse: the greedy order can land far from a budget that another combination
        meets (a 2-layer BERT asked to keep 50% of its FLOPs kept 27%; attention of one layer plus the MLP of
        another keeps 50.2%).  When the greedy result misses a target by more than the tolerance, look for
        the combination that meets every target with the least saliency removed: every valid subset of up
        to ``_EXHAUSTIVE_CANDIDATES`` candidates, else add / drop / swap moves from the greedy result.  The
        search counts savings as additive; the winner replaces the greedy result only if its exact count
        is better."""
        ids, base = self._index.group_ids, set(self._redundant_ids)
        weight = _positive(scores)

        def exact_key(positions: Iterable[int]) -> tuple[float, float, bool, float]:
            positions = list(positions)
            fr = self.cost_model.kept_fraction(base | {ids[p] for p in positions})
            return self._budget_key(fr, targets, sum(weight[p] for p in positions))

        greedy_key = exact_key(chosen)
        if greedy_key[:3] == (0.0, 0.0, False):
            return chosen
        tracker = self.cost_model.tracker(base)
        start, rules, ex = tracker.fractions(), self._acceptance_rules(), self._redundant.tolist()
        cands = [p for p in range(len(ids)) if not ex[p] and any(tracker.saving(ids[p])[k] > 0 for k in targets)]
        save = {p: tracker.saving(ids[p]) for p in cands}

        def key(sel: Iterable[int]) -> tuple[float, float, bool, float]:
            sel = list(sel)
            fr = {k: start[k] - sum(save[p][k] for p in sel) for k in targets}
            return self._budget_key(fr, targets, sum(weight[p] for p in sel))

        def valid(sel: Sequence[int]) -> bool:
            acc = set(base)
            for p in sel:
                if not all(rule(frozenset(acc), ids[p]) for rule in rules):
                    return False
                acc.add(ids[p])
            return True

        if len(cands) <= _EXHAUSTIVE_CANDIDATES:
            best = min(self._valid_subsets(cands, base, rules), key=key)
        elif len(cands) > _MOVE_CANDIDATES:
            return chosen
        else:
            best = self._improve_by_moves(chosen, cands, key, valid)
        return best if exact_key(best) < greedy_key else chosen

    def _valid_subsets(self, cands: list[int], base: set[int], rules: list[CandidateFilter]) -> list[list[int]]:
        """Every subset of ``cands`` whose members pass the acceptance rules when added in order."""
        ids, out = self._index.group_ids, []

        def grow(i: int, sel: list[int], acc: frozenset) -> None:
            out.append(list(sel))
            for j in range(i, len(cands)):
                gid = ids[cands[j]]
                if all(rule(acc, gid) for rule in rules):
                    grow(j + 1, sel + [cands[j]], acc | {gid})

        grow(0, [], frozenset(base))
        return out

    @staticmethod
    def _improve_by_moves(chosen: list[int], cands: list[int], key: Callable[[Iterable[int]], tuple],
                          valid: Callable[[Sequence[int]], bool]) -> list[int]:
        """Best-improvement local search: drop one, add one or swap one chosen for one candidate."""
        current = list(chosen)
        for _ in range(_SWAP_ROUNDS):
            out = [p for p in cands if p not in current]
            moves = ([[q for q in current if q != p] for p in current] + [current + [p] for p in out]
                     + [[q for q in current if q != a] + [b] for a in current for b in out])
            here = key(current)
            better = sorted((m for m in moves if key(m) < here), key=key)
            step = next((m for m in better if valid(m)), None)
            if step is None:
                break
            current = step
        return current

    def _close_the_gap(self, tracker: Any, targets: dict[str, float], skipped: list[int], accepted: set[int],
                       rules: list[CandidateFilter]) -> list[int]:
        """When only large groups are left (erase mode), take the ones that land closest to the targets."""
        ids, chosen = self._index.group_ids, []
        while skipped:
            fr = tracker.fractions()
            need = [k for k, t in targets.items() if fr[k] > t]
            if not need:
                break
            fits = [pos for pos in skipped if all(rule(frozenset(accepted), ids[pos]) for rule in rules)]
            if not fits:
                break
            miss = {pos: max(abs(fr[k] - tracker.saving(ids[pos])[k] - targets[k]) for k in need) for pos in fits}
            best = min(fits, key=miss.__getitem__)
            skipped.remove(best)
            tracker.add(ids[best])
            accepted.add(ids[best])
            chosen.append(best)
        return chosen

    def _drop_surplus(self, chosen: list[int], targets: dict[str, float]) -> list[int]:
        """After a large last group overshot a target, give back the groups (last taken first) that are
        no longer needed: removing fewer groups keeps every acceptance rule satisfied."""
        ids = self._index.group_ids
        base = set(self._redundant_ids)

        def fractions(positions: list[int]) -> dict[str, float]:
            return self.cost_model.kept_fraction(base | {ids[p] for p in positions})

        if not any(fractions(chosen)[k] < t - BUDGET_SLACK for k, t in targets.items()):
            return chosen
        for pos in list(reversed(chosen))[:_MAX_GIVE_BACK]:
            trial = [p for p in chosen if p != pos]
            if all(v <= targets[k] for k, v in fractions(trial).items() if k in targets):
                chosen = trial
        return chosen

    def _warn_if_off(self, targets: dict[str, float]) -> None:
        fr = self.budget_reached
        tol = {k: LATENCY_TOLERANCE * t if k == "latency" and self.cost_model.measure_latency else BUDGET_TOLERANCE
               for k, t in targets.items()}
        short = {k: round(fr[k], 4) for k, t in targets.items() if fr[k] > t + tol[k]}
        over = {k: round(fr[k], 4) for k, t in targets.items() if fr[k] < t - tol[k]}
        if (short or over) and not self._warned_short:
            self._warned_short = True
            why = (f"cannot be met by groups that pass {self._rules_name()}; the sub-network keeps {short}" if short
                   else "falls between the sizes its groups can reach (whole operators are coarse); the closest "
                        f"valid combination keeps {over}")
            asked = {k: round(t, 4) for k, t in targets.items()}
            warnings.warn(f"{type(self).__name__}: the budget {asked} {why}.", stacklevel=5)

    def _score(self, stats: GroupStats) -> torch.Tensor:
        s = self._saliency_fn(stats)
        if not isinstance(s, torch.Tensor) or s.shape != (self.num_prunable,):
            got = tuple(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__
            raise ValueError(f"saliency function must return a tensor of shape [{self.num_prunable}], got {got}")
        return s.detach().to(device=self._index.device, dtype=torch.float32)

    def _update_ema(self, stats: GroupStats) -> None:
        s = self._score(stats)
        if self._ema is None:
            self._ema = s.clone()
        else:
            self._ema.mul_(self.saliency_ema).add_(s, alpha=1.0 - self.saliency_ema)

    def _score_due(self) -> bool:
        """Is this step a saliency sample?  Samples are aligned to end on the step before a selection."""
        if not self.num_prunable or self._selections_done >= len(self._schedule):
            return False
        at = self._schedule[self._selections_done][0]
        t = self._num_steps
        if at <= t:  # warmup_steps == 0: the first step's statistics decide
            return self._ema is None
        if self.saliency_steps is not None and t < at - self.saliency_steps:
            return False
        return (at - 1 - t) % self.saliency_interval == 0

    @property
    def saliency_interval(self) -> int:
        """Warm-up steps between two saliency samples (the ``saliency_interval`` argument, or its default)."""
        if self._saliency_interval is not None:
            return self._saliency_interval
        return min(10, max(1, self.warmup_steps // 50))

    def _maybe_select(self) -> None:
        while self._selections_done < len(self._schedule):
            at, k_cum, deadline = self._schedule[self._selections_done]
            if self._num_steps < at or self._ema is None:
                break
            _all_reduce_mean_(self._ema)  # identical decision on every rank
            if self.budget:
                chosen = self._choose_budget(self._ema, self._period_budget(self._selections_done))
            else:
                k_new = max(0, k_cum - len(self._redundant_ids))
                chosen = self._choose(self._ema, k_new, self._redundant.clone()) if k_new else []
            if chosen:
                idx = torch.tensor(chosen, dtype=torch.long, device=self._redundant.device)
                self._redundant[idx] = True
                self._selected_norm[idx] = self._index.norms()[idx]
                self._deadline[idx] = deadline
                span = max(deadline - at, 1)
                self._target[idx] = at + max(1, math.ceil(self.schedule_fraction * span))
                self._redundant_ids = self._index.ids_from_mask(self._redundant)
                self._next_deadline = min(self._next_deadline, deadline)
                self._needs_refresh = True
            self._selections_done += 1

    def _finalize_due(self) -> None:
        """Force-zero redundant groups whose deadline has passed (a host-known step: syncing is fine)."""
        if self._num_steps < self._next_deadline:
            return
        due = self._redundant & ~self._frozen & (self._deadline <= self._num_steps)
        self._freeze(due)
        self._next_deadline = self._compute_next_deadline()
        self._needs_refresh = True

    def _compute_next_deadline(self) -> float:
        active = self._redundant & ~self._frozen
        return int(self._deadline[active].min()) if bool(active.any()) else math.inf

    @torch.no_grad()
    def _freeze(self, mask: torch.Tensor) -> None:
        self._record_cut(mask, self._index.norms())
        for e, r in zip(self._index.entries, self._index.rows_for(mask)):
            if r is not None:
                e.view(e.x.data).index_fill_(e.dim, r[0], 0.0)
        self._mark_zero(mask, _AT_DEADLINE, self._num_steps)

    def _record_cut(self, mask: torch.Tensor, norms: torch.Tensor) -> None:
        """Keep the norm each group in ``mask`` had just before it was cut (first cut wins; device ops only)."""
        first = mask & (self._cut_norm < 0)
        self._cut_norm = torch.where(first, norms.to(self._cut_norm.dtype), self._cut_norm)

    def _mark_zero(self, mask: torch.Tensor, how: int, after_steps: int) -> None:
        """Record that the groups in ``mask`` are zero from step ``after_steps`` on (device ops only)."""
        self._frozen |= mask
        self._zero_how.masked_fill_(mask, how)
        self._zero_step.masked_fill_(mask, after_steps)
        self._push.masked_fill_(mask, 0.0)

    # ------------------------------------------------------------------ caches (rebuilt at selections)
    def _refresh(self) -> None:
        """Which parameters hold redundant / active redundant rows, and their row-factor buffers.

        Runs only when the redundant set changed (selection, deadline, load, device move), so the
        host synchronisation it needs never happens on an ordinary step.
        """
        ext = self._index._ext
        red = ext(self._redundant, False)
        act = ext(self._redundant & ~self._frozen, False)
        factored, active = [], []
        for i, e in enumerate(self._index.entries if self._redundant_ids else ()):
            if bool(red[e.owner].any()):
                factored.append(i)
                if bool(act[e.owner].any()):
                    active.append(i)
        self._factored = {id(self._index.entries[i].param): k for k, i in enumerate(factored)}
        self._active_params = {id(self._index.entries[i].param) for i in active}
        self._active_entries = active
        self._rows_a = RowFactors(self._index, factored)
        self._rows_c = RowFactors(self._index, factored)
        keep = (~self._frozen).to(torch.float32)  # zero rows take no step, fading ones a damped one
        self._rows_c.fill(torch.where(self._redundant & ~self._frozen, self._damp, keep), 1.0)
        self._plan_key: tuple[int, ...] | None = None
        self._needs_refresh = False

    @staticmethod
    def _release_local_grads(keys: list[torch.Tensor], params: list[torch.Tensor]) -> None:
        """Drop the gradients attached to local shards in :meth:`_live` (the DTensor keeps its own)."""
        for k, p in zip(keys, params):
            if p is not k:
                p.grad = None

    def _plan_for(self, params: list[torch.Tensor]) -> UpdatePlan:
        """The update plan for this list of live parameters (rebuilt only when the list changes)."""
        key = tuple(id(p) for p in params)
        if key != self._plan_key:
            plan = UpdatePlan([], [], [], [], [], [])
            slot = {}
            for i, p in enumerate(params):
                slot[id(p)] = i
                k = self._factored.get(id(p))
                if k is None:
                    plan.plain.append(i)
                elif id(p) in self._active_params:
                    plan.active.append(i)
                    plan.active_a.append(self._rows_a.views[k])
                    plan.active_c.append(self._rows_c.views[k])
                else:
                    plan.frozen.append(i)
                    plan.frozen_c.append(self._rows_c.views[k])
            self._plan, self._plan_key = plan, key
            self._entry_slots = [slot.get(id(self._index.entries[i].param)) for i in self._active_entries]
        return self._plan

    # ------------------------------------------------------------------ the redundant-group projection
    @torch.no_grad()
    def _project(self, hp: dict[str, Any], params: list[torch.Tensor], dirs: list[Direction]) -> bool:
        """Lambda, the half-space test and this evaluation's row factors (no host sync).

        The push of the ``k = projection_interval`` steps until the next evaluation is applied now,
        in the one ``mul_`` of this step (``A = 1 - decay - k*lr*push``), so the steps in between
        cost what a hybrid step costs.  The half-space test judges the single-step trial point, as
        in the papers.  Returns ``True``: this step multiplies by the per-row ``A``.
        """
        slots = self._entry_slots
        ds = [None if k is None else dirs[k].materialize() for k in slots]
        gs = [None if k is None else params[k].grad for k in slots]
        pairs = (("x", "x"), ("d", "x"), ("g", "x"), ("g", "d"))
        sums = self._index.products({"d": ds, "g": gs}, pairs, self._active_entries)  # all-reduced: one collective
        scale = dirs[0].scale if dirs else 1.0
        xsq, dx, gx, gd = sums[0], sums[1] * scale, sums[2], sums[3] * scale
        wd = float(hp["weight_decay"]) if hp["variant"] != "adamw" else 0.0
        if wd:  # the objective is f + wd/2 |x|^2: its gradient is g + wd x
            gx, gd = gx + wd * xsq, gd + wd * dx
        active = self._redundant & ~self._frozen
        ratio = self._norm_ratio(xsq)
        damp = torch.where(active, ratio.clamp(max=1.0), torch.ones_like(ratio))
        dx, gd = dx * damp, gd * damp  # the step an active redundant group takes is damped (docstring)
        lam, push, zero_now = self._half_space(xsq, dx, gx, gd, hp, active, ratio)
        self._lambdas = lam
        self._push = push
        self._record_cut(zero_now, xsq.clamp_min(0).sqrt())
        self._mark_zero(zero_now, _BY_HALF_SPACE, self._num_steps + 1)
        self._damp = damp
        decay = decoupled_decay(hp)
        plain = torch.full_like(push, 1.0 - decay)
        # the push of k steps at once, compounded as k single steps would
        shrink = ((1.0 - float(hp["lr"]) * push).clamp_min(0.0) ** self.projection_interval - decay).clamp_min(0.0)
        a = torch.where(active, shrink, plain).masked_fill_(self._frozen, 0.0)
        self._rows_a.fill(a, 1.0 - decay)
        keep = (~self._frozen).to(a.dtype)
        self._rows_c.fill(torch.where(self._redundant & ~self._frozen, damp, keep), 1.0)
        return True

    def _norm_ratio(self, xsq: torch.Tensor) -> torch.Tensor:
        """``|x_g| / |x_g at selection|`` per group (1 where the selection norm is zero or unknown)."""
        sel = self._selected_norm
        xn = xsq.clamp_min(0).sqrt()
        return torch.where(sel > 0, xn / sel.clamp_min(torch.finfo(sel.dtype).tiny), torch.ones_like(xn))

    def _half_space(self, xsq: torch.Tensor, dx: torch.Tensor, gx: torch.Tensor, gd: torch.Tensor,
                    hp: dict[str, Any], active: torch.Tensor,
                    ratio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """DHSPG's adaptive lambda and the half-space test (formulas in the module docstring).

        ``dx = <d, x>``, ``gx = <g, x>``, ``gd = <g, d>`` per group (``d`` the processed direction,
        ``g`` the gradient of the objective; ``ratio = |x| / |x at selection|``).
        """
        lr, decay = float(hp["lr"]), decoupled_decay(hp)
        tiny = torch.finfo(xsq.dtype).tiny
        xn = xsq.clamp_min(0).sqrt()
        inv = torch.where(xn > 0, 1.0 / xn.clamp_min(tiny), torch.zeros_like(xn))
        lo = (-dx * inv).clamp_min(0)  # least lambda with which the step does not grow |x|
        left = (self._target - self._num_steps).clamp_min(1).to(xsq.dtype)
        # geometric: the push alone takes |x| to fade_ratio of its selection norm in `left` steps
        goal = (self.fade_ratio / ratio.clamp_min(tiny)).clamp(max=1.0)
        rate = 1.0 - goal ** (1.0 / left)
        faded = ratio <= self.cut_ratio  # may be cut now: keep pushing at least by the half-space margin
        rate = torch.where(faded, rate.clamp_min(1.0 - self.epsilon), rate)
        base = self.lambda_scale * rate * xn / lr
        lam = torch.minimum(torch.maximum(self.lambda_amplify * lo, base), self.lambda_max * base)
        rg = gx * inv  # the objective's slope along x/|x|: < 0 means the push costs objective
        up = torch.where(rg < 0, (1.0 - self.descent_margin) * gd.clamp_min(0) / (-rg).clamp_min(tiny),
                         torch.full_like(rg, math.inf))
        mid = torch.where(up > lo, 0.5 * (lo + up), up)
        lam = torch.where(lam > up, torch.maximum(mid, base), lam)  # the bound never undercuts the schedule
        lam = torch.where(active, lam, torch.zeros_like(lam))
        push = lam * inv
        a = (1.0 - decay - lr * push).clamp_min(0.0)
        inner = a * xsq - lr * dx  # <y, x> with y = a x - lr d
        zero_now = active & (((inner <= self.epsilon * xsq) & faded) | (xn == 0))
        return lam, push, zero_now

    # ------------------------------------------------------------------ step
    def _follow_device(self) -> None:
        """Move the bookkeeping tensors if the parameters moved (``model.to(device)`` after construction)."""
        self._index._sync_device()
        dev = self._index.device
        if self._redundant.device != dev:
            for name in ("_redundant", "_frozen", "_deadline", "_target", "_lambdas", "_push", "_zero_how",
                         "_zero_step", "_ema", "_selected_norm", "_cut_norm", "_damp"):
                t = getattr(self, name)
                if t is not None:
                    setattr(self, name, t.to(dev))
            self._needs_refresh = True

    def _live(self) -> tuple[list[torch.Tensor], list[torch.Tensor], list[Any]]:
        """The parameters with a gradient: as keys, as the tensors this rank updates (an FSDP2 parameter's
        local shard, its gradient attached), and their optimizer states (local views of ``DTensor`` states)."""
        keys, params, states = [], [], []
        for p in self.param_groups[0]["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            keys.append(p)
            if is_sharded(p):
                local = local_view(p)
                local.grad = local_view(p.grad)
                params.append(local)
                states.append(LocalState(self.state[p], p))
            else:
                params.append(p)
                states.append(self.state[p])
        return keys, params, states

    def _stats(self) -> GroupStats:
        """Per-group statistics; distributed, one all-reduce (shards summed, replicas averaged)."""
        return self._index.stats()

    @property
    def projection_interval(self) -> int:
        """Steps between two evaluations of lambda and the half-space test (the ``projection_interval``
        argument, or its default)."""
        if self._projection_interval is not None:
            return self._projection_interval
        return min(16, max(1, self.projection_steps // max(self.pruning_periods, 1) // 25))

    def _projection_due(self) -> bool:
        """An evaluation step of the open projection window (host-known: same answer after a resume)."""
        if not self._selections_done:
            return False
        origin, _, deadline = self._schedule[self._selections_done - 1]
        return self._num_steps < deadline and (self._num_steps - origin) % self.projection_interval == 0

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One optimizer step (phase logic in the module docstring)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        hp = self.param_groups[0]
        if self.__dict__.get("_awaiting_search_state"):
            raise ValueError(
                f"{type(self).__name__}: this sharded optimizer state was loaded without its search state (step, "
                "saliency, redundant and zero sets): resume through OTOCallback, which carries it in its own state, "
                "or call expect_search_state(saved['oto']) before stepping.")
        self._follow_device()
        if self._score_due():
            self._update_ema(self._stats())
        self._maybe_select()  # warmup_steps == 0: select before the first update
        if self._needs_refresh:
            self._refresh()
        keys, params, states = self._live()
        plan = self._plan_for(keys)
        dirs = directions(params, states, hp, self._num_steps + 1)
        rows_a = self._projection_due() and self._project(hp, params, dirs)
        apply_update(params, dirs, plan, float(hp["lr"]), 1.0 - decoupled_decay(hp), rows_a)
        self._release_local_grads(keys, params)
        self._num_steps += 1
        self._maybe_select()
        self._finalize_due()
        if self._needs_refresh:  # on the step that changed the sets, so the next one need not sync
            self._refresh()
        return loss

    # ------------------------------------------------------------------ checkpointing
    _TENSORS = ("deadline", "target", "lambdas", "push", "zero_how", "zero_step", "selected_norm", "cut_norm", "damp")

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["oto"] = self.search_state()
        return sd

    def search_state(self) -> dict[str, Any]:
        """The search's own state (the ``"oto"`` entry of :meth:`state_dict`): the same on every rank.

        FSDP2 checkpoints (torch's ``get_optimizer_state_dict``) keep only ``state`` and ``param_groups``, so
        the Lightning callback carries this part itself and hands it back through :meth:`expect_search_state`.
        """
        oto = {
            "version": _STATE_VERSION,
            "class": type(self).__name__,
            "group_ids": list(self._index.group_ids),
            "num_steps": self._num_steps,
            "selections_done": self._selections_done,
            "saliency_ema": None if self._ema is None else self._ema.detach().clone(),
            "redundant": self.redundant_group_ids,
            "frozen": self._index.ids_from_mask(self._frozen),
            "zeroed_by_half_space": self.zeroed_by_half_space,
            "forced_at_deadline": self.forced_at_deadline,
            "warned_short": self._warned_short,
            "schedule": list(self._schedule),
            "warmup_steps": self.warmup_steps,
            "projection_steps": self.projection_steps,
            "pruning_periods": self.pruning_periods,
            "target_group_sparsity": self.target_group_sparsity,
            "num_redundant_target": self.num_redundant_target,
            "budget": dict(self.budget),
            "budget_reached": dict(self.budget_reached),
        }
        for name in self._TENSORS:
            oto[name] = getattr(self, f"_{name}").detach().clone()
        return oto

    def expect_search_state(self, oto: dict[str, Any]) -> None:
        """Restore this search state now if a sharded load is waiting for it, else at the next
        :meth:`load_state_dict` without an ``"oto"`` entry."""
        if self.__dict__.pop("_awaiting_search_state", False):
            self._load_search_state(oto)
        else:
            self._pending_search_state = oto

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        oto = state_dict.pop("oto", None)
        if oto is None:
            oto = self.__dict__.pop("_pending_search_state", None)
        if oto is None and state_dict.get("state") and self._index.sharded:
            # FSDP2: torch's sharded optimizer state dict has no room for it; the callback restores it next
            # (expect_search_state), and a step before that raises
            super().load_state_dict(state_dict)
            self._awaiting_search_state = True
            return
        if oto is None and state_dict.get("state"):
            raise ValueError(
                f"this optimizer state was not saved by a {type(self).__name__} (no 'oto' entry): it probably comes "
                "from the plain optimizer of an earlier run. Resume from a checkpoint written while the OTO optimizer "
                "was installed, or start the search fresh.")
        if oto is not None and list(oto["group_ids"]) != list(self._index.group_ids):
            raise ValueError(
                "optimizer state was saved for different groups "
                f"({len(oto['group_ids'])} candidate groups vs {self.num_prunable} now); "
                "rebuild the optimizer with the same search space before loading"
            )
        super().load_state_dict(state_dict)
        if oto is not None:
            self._load_search_state(oto)

    def _load_search_state(self, oto: dict[str, Any]) -> None:
        dev = self._index.device
        # the checkpoint's schedule wins (like the param-group hyper-parameters torch restores)
        for key in ("warmup_steps", "projection_steps", "pruning_periods", "target_group_sparsity",
                    "num_redundant_target"):
            if key in oto:
                setattr(self, key, oto[key])
        self._reset_search_state()
        self.budget_reached = dict(oto.get("budget_reached", {}))
        self._num_steps = int(oto["num_steps"])
        self._selections_done = int(oto["selections_done"])
        self._warned_short = bool(oto.get("warned_short", False))
        ema = oto["saliency_ema"]
        self._ema = None if ema is None else ema.detach().clone().to(device=dev, dtype=torch.float32)
        self._redundant = self._index.mask_from_ids(oto["redundant"])
        self._frozen = self._index.mask_from_ids(oto["frozen"])
        self._redundant_ids = self._index.ids_from_mask(self._redundant)
        for name in self._TENSORS:
            if name in oto:  # version-1 checkpoints lack the newer entries: keep the fresh defaults
                cur = getattr(self, f"_{name}")
                setattr(self, f"_{name}", oto[name].detach().clone().to(device=dev, dtype=cur.dtype))
        if "zero_how" not in oto:  # version 1: every zero group was forced at its deadline
            self._zero_how.masked_fill_(self._frozen, _AT_DEADLINE)
        self._schedule = [tuple(s) for s in oto.get("schedule", self._schedule)]
        self._next_deadline = self._compute_next_deadline()
        self._needs_refresh = True


class DHSPG(HalfSpaceOptimizer):
    """Dual half-space projected gradient (OTOv2/OTOv3 pruning mode).

    The redundant set is the ``K`` candidate groups with the smallest saliency EMA (skipping those
    ``candidate_filter`` rejects).  Used on erase-mode groups it works the same way (validity is
    checked elsewhere).
    """


class H2SPG(HalfSpaceOptimizer):
    """Hierarchical half-space projected gradient (OTOv3 erasing mode, Algorithm 3).

    Args:
        hierarchy_check: ``check(accepted_ids, candidate_id) -> bool``: ``True`` when removing the
            candidate in addition to the already accepted groups keeps the network valid.
            Candidates are visited in ascending saliency; rejected ones are skipped.  ``None``
            accepts every candidate (then H2SPG behaves like DHSPG).  Combined with
            ``candidate_filter``: a candidate must pass both.
        **kwargs: see :class:`HalfSpaceOptimizer`.

    If fewer than ``K`` candidates can be accepted, the valid maximum is used and a warning says
    how many.
    """

    def __init__(
        self,
        named_params: Iterable[tuple[str, torch.nn.Parameter]],
        groups: Sequence[Group],
        hierarchy_check: Callable[[frozenset[int], int], bool] | None = None,
        **kwargs: Any,
    ) -> None:
        if hierarchy_check is not None and not callable(hierarchy_check):
            raise ValueError("hierarchy_check must be callable (accepted_ids: frozenset[int], candidate_id: int) -> bool")
        self.hierarchy_check = hierarchy_check
        super().__init__(named_params, groups, **kwargs)

    def _acceptance_rules(self) -> list[CandidateFilter]:
        rules = super()._acceptance_rules()  # the cheap filter first: the hierarchy check walks the graph
        return rules if self.hierarchy_check is None else rules + [self.hierarchy_check]

    def _rules_name(self) -> str:
        if self.hierarchy_check is None:
            return super()._rules_name()
        return "the hierarchy check (keep the network valid)" + (
            " and the candidate filter" if self.candidate_filter is not None else "")


class HESSO(HalfSpaceOptimizer):
    """Hybrid efficient structured sparse optimizer: progressive shrink instead of half-space.

    Same phases and selection as DHSPG (use ``pruning_periods > 1`` to add redundant groups
    progressively).  A redundant group takes the variant's step and is then scaled by ``(R-1)/R``
    (``R`` = steps left before its deadline), so it decays linearly in magnitude and is exactly
    zero at its deadline — no lambda, no half-space test (``forced_at_deadline`` counts them all).
    """

    def _projection_due(self) -> bool:
        if not self._selections_done:
            return False
        return self._num_steps < self._schedule[self._selections_done - 1][2]  # the shrink changes every step

    def _project(self, hp: dict[str, Any], params: list[torch.Tensor], dirs: list[Direction]) -> bool:
        """``x <- s (x - lr d)`` with ``s = (R-1)/R`` on the active redundant rows (no statistics)."""
        decay = decoupled_decay(hp)
        left = (self._deadline - self._num_steps).clamp_min(1).to(torch.float32)
        shrink = (left - 1.0) / left
        active = self._redundant & ~self._frozen
        if self._num_steps + 1 == self._schedule[self._selections_done - 1][2]:  # the step that zeroes them
            self._record_cut(active & (left <= 1), self._index.norms())
        keep = (~self._frozen).to(torch.float32)
        self._rows_a.fill(torch.where(active, (1.0 - decay) * shrink, keep * (1.0 - decay)), 1.0 - decay)
        self._rows_c.fill(torch.where(active, shrink, keep), 1.0)
        return True
