"""`OTOSettings`: what :class:`OTOCallback` and :class:`OTOMixin` are asked to do, validated once.

Also the one place for the default phase lengths and for turning epochs into optimizer steps
(:meth:`OTOSettings.phase_lengths`), including fitting a search that is longer than the run.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..optim.factory import DEFAULT_TARGET_SPARSITY, check_target_sparsity, resolve_optimizer
from ..space.controls import check_min_width
from ..space.costs import check_budget
from ..subnet.verify import DEFAULT_ATOL, DEFAULT_RTOL
from .compat import load_train_dataloader
from .metric_guard import check_max_metric_drop

#: fractions of the planned optimizer steps used when no warm-up / projection length is given
DEFAULT_WARMUP_FRACTION = 0.2
DEFAULT_PROJECTION_FRACTION = 0.3
#: a search (warm-up + projection) that does not fit the run is scaled to this fraction of it, so the
#: rest of the run still trains the kept groups (the hybrid phase)
FIT_SEARCH_FRACTION = DEFAULT_WARMUP_FRACTION + DEFAULT_PROJECTION_FRACTION

EXPORT_FORMATS = ("torch", "onnx")
VERBOSE_LEVELS = (0, 1, 2)


@dataclass(frozen=True)
class PhasePlan:
    """Warm-up and projection lengths in optimizer steps, and how they were obtained."""

    warmup_steps: int
    projection_steps: int
    planned_steps: float
    #: set when the lengths were changed to fit the run, or when they do not fit (explicit steps)
    note: str | None = None

    @property
    def fits(self) -> bool:
        return not math.isfinite(self.planned_steps) or self.warmup_steps + self.projection_steps <= self.planned_steps


@dataclass
class OTOSettings:
    """Every setting of the Lightning integration (see :class:`OTOCallback` for what each one does).

    Validated on construction; ``optimizer`` is resolved to a name (the mode's default when None).
    ``ignored_layers``, ``max_group_sparsity``, ``round_to`` and ``dynamic_shapes`` go to ``OTO(...)``
    only when set (None means "OTO's default").
    """

    mode: str = "prune"
    optimizer: str | None = None
    #: None: 0.5 without a budget (resolved on construction)
    target_group_sparsity: float | None = None
    #: {"flops" | "params" | "latency": fraction the sub-network may keep}; instead of target_group_sparsity
    budget: Mapping[str, float] | None = None
    warmup_steps: int | None = None
    warmup_epochs: float | None = None
    projection_steps: int | None = None
    projection_epochs: float | None = None
    pruning_periods: int = 1
    # base optimizer; None: carried over from configure_optimizers' optimizer (callback) or the
    # half-space optimizer's default (mixin)
    lr: float | None = None
    variant: str | None = None
    momentum: float | None = None
    nesterov: bool | None = None
    betas: tuple[float, float] | None = None
    eps: float | None = None
    weight_decay: float | None = None
    # search; None: the optimizer's own default (one place: lightning_oto.optim.half_space)
    saliency: Any = "default"
    saliency_ema: float | None = None
    epsilon: float | None = None
    lambda_scale: float | None = None
    descent_margin: float | None = None
    cost_weight: float | None = None  # a budget's ranking: saliency / saving**cost_weight (optimizer default 0: saliency alone)
    erase_ablation: bool = False
    # search space, forwarded to OTO(...)
    ignored_layers: Sequence[Any] | None = None
    max_group_sparsity: Mapping[Any, float] | None = None
    round_to: int | None = None
    min_width: float | None = None
    dynamic_shapes: Any = None
    # what is compressed
    network_attr: str | None = None
    example_inputs: Any = None
    # the end of fit
    bn_recalibration_batches: int = 20
    verify_atol: float = DEFAULT_ATOL
    verify_rtol: float = DEFAULT_RTOL
    export_dir: str | Path | None = None
    export_formats: Sequence[str] = EXPORT_FORMATS
    swap_subnet: bool = False
    destroy_process_group: bool = True
    # what the user sees
    verbose: int = 1
    progress_bar_metrics: bool = False
    visualize: bool = False
    plot_curves: bool = True
    # the accuracy guard (lightning_oto.lightning.metric_guard): validation metric watched against the
    # dense reference; None: the first of val_acc / val_loss found, and the metric's default drop
    monitor: str | None = None
    max_metric_drop: float | None = None
    stop_on_metric_drop: bool = False
    # the report times the sub-network against the full model (batch 1 and the training batch size)
    measure_speed: bool = True
    #: keys the caller set explicitly (filled in by ``from_kwargs``; informational)
    explicit: frozenset[str] = field(default=frozenset(), repr=False, compare=False)

    def __post_init__(self) -> None:
        self.optimizer = resolve_optimizer(self.mode, self.optimizer, self.erase_ablation)
        self.budget = check_budget(self.budget) or None
        if self.budget and self.target_group_sparsity is not None:
            raise ValueError(f"give budget ({self.budget}) or target_group_sparsity ({self.target_group_sparsity}), "
                             "not both: they are two ways to say how much goes.")
        if not self.budget:
            target = DEFAULT_TARGET_SPARSITY if self.target_group_sparsity is None else self.target_group_sparsity
            self.target_group_sparsity = check_target_sparsity(target)
        if self.min_width is not None:
            self.min_width = check_min_width(self.min_width)
        self._check_lengths()
        self._check_numbers()
        self._check_guard()
        self.export_formats = tuple(self.export_formats)
        bad = [f for f in self.export_formats if f not in EXPORT_FORMATS]
        if bad:
            raise ValueError(f"export_formats must be a subset of {EXPORT_FORMATS}, got {bad}.")
        self.export_dir = None if self.export_dir is None else Path(self.export_dir)
        if self.betas is not None:
            self.betas = tuple(self.betas)  # type: ignore[assignment]
        if self.network_attr is not None and (not isinstance(self.network_attr, str) or not self.network_attr):
            raise ValueError(f"network_attr must be an attribute name (str), got {self.network_attr!r}.")
        if self.swap_subnet and self.mode == "erase" and self.network_attr is None:
            raise ValueError(
                "swap_subnet=True in erase mode needs network_attr: the erased sub-network is a torch.fx "
                "GraphModule that replaces a submodule of the LightningModule (the LightningModule itself "
                "cannot be replaced).")

    def _check_lengths(self) -> None:
        if self.warmup_steps is not None and self.warmup_epochs is not None:
            raise ValueError("give warmup_steps or warmup_epochs, not both.")
        if self.projection_steps is not None and self.projection_epochs is not None:
            raise ValueError("give projection_steps or projection_epochs, not both.")
        for name in ("warmup_steps", "warmup_epochs", "projection_steps", "projection_epochs"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or not math.isfinite(value):
                raise ValueError(f"{name} must be a number >= 0, got {value!r}.")
            if name.endswith("_steps") and int(value) != value:
                raise ValueError(f"{name} must be an integer, got {value!r}.")

    def _check_numbers(self) -> None:
        pp = self.pruning_periods
        if isinstance(pp, bool) or not isinstance(pp, int) or pp < 1:
            raise ValueError(f"pruning_periods must be an integer >= 1, got {pp!r}.")
        if self.lr is not None and (isinstance(self.lr, bool) or not isinstance(self.lr, (int, float))
                                    or not self.lr > 0):
            raise ValueError(f"lr must be > 0, got {self.lr!r}.")
        n = self.bn_recalibration_batches
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"bn_recalibration_batches must be an integer >= 0 (0 disables), got {n!r}.")
        if self.verbose not in VERBOSE_LEVELS or isinstance(self.verbose, bool):
            raise ValueError(f"verbose must be 0, 1 or 2, got {self.verbose!r}.")
        if self.round_to is not None and (isinstance(self.round_to, bool) or not isinstance(self.round_to, int)
                                          or self.round_to < 1):
            raise ValueError(f"round_to must be an integer >= 1, got {self.round_to!r}.")

    def _check_guard(self) -> None:
        if self.monitor is not None and (not isinstance(self.monitor, str) or not self.monitor):
            raise ValueError(f"monitor must be the name of a logged validation metric, got {self.monitor!r}.")
        self.max_metric_drop = check_max_metric_drop(self.max_metric_drop)
        if not isinstance(self.measure_speed, bool):
            raise ValueError(f"measure_speed must be True or False, got {self.measure_speed!r}.")
        if not isinstance(self.stop_on_metric_drop, bool):
            raise ValueError(f"stop_on_metric_drop must be True or False, got {self.stop_on_metric_drop!r}.")

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> "OTOSettings":
        """Settings from keyword arguments, rejecting unknown names with the list of valid ones."""
        names = {f.name for f in dataclasses.fields(cls)} - {"explicit"}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise TypeError(f"unknown OTO setting(s) {unknown}; valid: {sorted(names)}.")
        return cls(**kwargs, explicit=frozenset(kwargs))

    # ------------------------------------------------------------------ views used by the callback / mixin
    def oto_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``OTO(...)`` beyond model/inputs/mode: only those that were set."""
        out = {"ignored_layers": self.ignored_layers, "max_group_sparsity": self.max_group_sparsity,
               "round_to": self.round_to, "dynamic_shapes": self.dynamic_shapes, "min_width": self.min_width}
        return {k: v for k, v in out.items() if v is not None}

    def base_hparams(self) -> dict[str, Any]:
        """The base-optimizer settings given explicitly (None: not given)."""
        return {k: getattr(self, k) for k in ("lr", "variant", "momentum", "nesterov", "betas", "eps",
                                              "weight_decay")}

    def search_hparams(self) -> dict[str, Any]:
        """Half-space settings that do not depend on the trainer (phase lengths come from phase_lengths; what
        goes - target or budget - from ``OTO.selection_kwargs(target_group_sparsity, budget)``)."""
        return {"pruning_periods": self.pruning_periods,
                "saliency": self.saliency, "saliency_ema": self.saliency_ema, "epsilon": self.epsilon,
                "lambda_scale": self.lambda_scale, "descent_margin": self.descent_margin,
                "cost_weight": self.cost_weight}

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly view (for the report): objects are shown by their repr."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name in ("explicit", "example_inputs"):
                continue
            v = getattr(self, f.name)
            if isinstance(v, (tuple, list)):
                v = [x if isinstance(x, (int, float, str, bool)) or x is None else repr(x) for x in v]
            elif isinstance(v, Path):
                v = str(v)
            elif isinstance(v, Mapping):
                v = {str(k): x for k, x in v.items()}
            elif not (isinstance(v, (int, float, str, bool)) or v is None):
                v = repr(v)
            out[f.name] = v
        return out

    # ------------------------------------------------------------------ epochs -> steps
    def phase_lengths(self, steps_per_epoch: float | None, planned_steps: float) -> PhasePlan:
        """Warm-up and projection in optimizer steps for a run of ``planned_steps``.

        Lengths given in steps are kept as given.  Lengths given in epochs (or left to the default
        fractions of the run) that together exceed the run are scaled down, keeping their ratio, to
        ``FIT_SEARCH_FRACTION`` of the run: a run that ends in warm-up compresses nothing.
        """
        warm, warm_fixed = self._length("warmup", steps_per_epoch, planned_steps, DEFAULT_WARMUP_FRACTION)
        proj, proj_fixed = self._length("projection", steps_per_epoch, planned_steps, DEFAULT_PROJECTION_FRACTION)
        if not math.isfinite(planned_steps) or warm + proj <= planned_steps:
            return PhasePlan(warm, proj, planned_steps)
        wanted = warm + proj
        fixed = (warm if warm_fixed else 0) + (proj if proj_fixed else 0)
        budget = FIT_SEARCH_FRACTION * planned_steps - fixed
        flexible = wanted - fixed
        if flexible <= 0 or budget <= 0:
            return PhasePlan(warm, proj, planned_steps, note=(
                f"warm-up + projection = {wanted} steps but training plans only {int(planned_steps)}; the search "
                "will not finish (the export keeps the groups that are zero by then)."))
        scale = budget / flexible
        if not warm_fixed:
            warm = int(round(warm * scale))
        if not proj_fixed:
            proj = max(self.pruning_periods, 1, int(round(proj * scale)))
        return PhasePlan(warm, proj, planned_steps, note=(
            f"warm-up + projection = {wanted} steps do not fit the {int(planned_steps)} planned steps; scaled to "
            f"{warm} + {proj} so the search finishes (give warmup_steps/projection_steps to fix them)."))

    def _length(self, what: str, steps_per_epoch: float | None, planned: float, fraction: float) -> tuple[int, bool]:
        """(steps, given in steps?) for ``what`` in {"warmup", "projection"}."""
        steps, epochs = getattr(self, f"{what}_steps"), getattr(self, f"{what}_epochs")
        if steps is not None:
            return int(steps), True
        if epochs is not None:
            if steps_per_epoch is None or not math.isfinite(steps_per_epoch):
                raise ValueError(f"{what}_epochs needs a sized training dataloader to convert epochs into optimizer "
                                 f"steps; pass {what}_steps instead.")
            return int(round(float(epochs) * steps_per_epoch)), False
        if not math.isfinite(planned) or planned <= 0:
            raise ValueError(f"cannot plan the search without a known number of training steps; pass {what}_steps "
                             "(or set max_steps / a sized dataloader).")
        return max(1 if what == "projection" else 0, int(round(fraction * planned))), False


def steps_per_epoch(trainer: Any) -> float:
    """Optimizer steps per epoch (gradient accumulation included); inf for an unsized dataloader."""
    if trainer.train_dataloader is None:
        _ = trainer.estimated_stepping_batches  # public API; loads the train dataloader if needed
    if trainer.train_dataloader is None:
        load_train_dataloader(trainer)
    n = trainer.num_training_batches
    if not math.isfinite(n):
        return float("inf")
    return float(math.ceil(n / max(1, trainer.accumulate_grad_batches)))


def planned_steps(trainer: Any) -> float:
    """The optimizer steps this fit will take (nan when unknown, e.g. no trainer attached)."""
    if trainer is None:
        return float("nan")
    try:
        return float(trainer.estimated_stepping_batches)
    except Exception:  # noqa: BLE001 - only defaults are derived from it
        return float("nan")


__all__ = ["DEFAULT_PROJECTION_FRACTION", "DEFAULT_WARMUP_FRACTION", "FIT_SEARCH_FRACTION", "OTOSettings",
           "PhasePlan", "planned_steps", "steps_per_epoch"]
