"""`OTOCallback`: OTOv3 pruning / erasing driven from Lightning Trainer hooks.

Lifecycle (hooks in Lightning's order)::

    setup               validate the network (fail before any work)
    (Lightning restores model weights and this callback's state_dict from ckpt_path)
    (strategy.setup: the user's configure_optimizers runs, model is wrapped for DDP)
    on_fit_start        trace the network, build OTO, replace the user's optimizer by DHSPG/H2SPG over
                        the same parameters (hyper-parameters carried over), rebind LR schedulers
    (Lightning restores optimizer + scheduler state into the half-space optimizer: a resumed run
     continues mid-search)
    on_train_start      fresh run: plan the phase lengths from the planned steps (not earlier: see _plan_phases);
                        resumed run: check the restored state against this callback's saved state
    on_train_batch_end  log oto/phase, oto/redundant_groups, oto/group_sparsity, oto/params(_ratio)
    on_train_epoch_end  log oto/flops(_ratio), oto/zeroed_by_half_space, oto/forced_at_deadline
    on_train_end        DDP: assert every rank chose the same redundant set
    on_fit_end          recalibrate BatchNorm, construct + verify the sub-network, export it (rank 0),
                        JSON report and summary, optionally swap it into the LightningModule
    on_validation_end / on_test_end (trainer.validate / test after fit): the metrics go into the report
    on_save_checkpoint  after a swap: what rebuilds the sub-network on load (lightning_oto.load_checkpoint)
    teardown(fit)       ddp_spawn / fork workers: destroy the process group (strategy="ddp" keeps it for test)

FSDP2 (``ModelParallelStrategy``, see ``docs/distributed.md``): ``setup`` traces the full network before
``configure_model`` shards it, ``on_fit_start`` maps the groups to the sharded parameters by name, and
``on_fit_end`` gathers the full state once before constructing (:mod:`.sharded`).

``oto/phase`` is logged as a number: 0 = warm-up (saliency statistics), 1 = projection (redundant
groups pushed to zero), 2 = hybrid (redundant groups stay zero, the rest trains).
"""
from __future__ import annotations

import dataclasses
import inspect
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch import nn

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from ..graph.inputs import describe
from ..errors import SubnetMismatchError
from ..optim import HalfSpaceOptimizer
from ..optim.factory import hparams_from_torch_optimizer, trainable_named_params
from ..oto import OTO
from ..subnet.recalibrate import recalibrate_batchnorm
from ..subnet.timing import loader_batch_size, run_speed_report
from ..subnet.report import count_flops, count_params, count_params_removed
from ..subnet.verify import allowed_error
from . import run_report
from .checkpointing import CHECKPOINT_KEY, apply_subnet_payload, space_hash, subnet_payload
from .compat import real_optimizers, strategy_start_method
from .network import install_subnet, resolve_example_inputs, resolve_network, to_device, training_loader
from .optimizer_swap import replace_optimizer
from .metric_guard import MetricGuard, guard_validation
from .run_report import PHASE_CODES
from .settings import OTOSettings, planned_steps, steps_per_epoch
from .sharded import ShardedTrace, check_strategy, gather_full, is_model_parallel

__all__ = ["OTOCallback", "PHASE_CODES"]

_STATE_VERSION = 2


def _dist_ready() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _gather(obj: Any) -> list[Any]:
    if not _dist_ready():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _spawned_workers(trainer: "pl.Trainer") -> bool:
    """DDP whose ranks are processes the launcher started and discards (ddp_spawn / fork), not the launcher itself."""
    return strategy_start_method(trainer.strategy) in ("spawn", "fork", "forkserver") and trainer.world_size > 1


def _average_bn_statistics(model: nn.Module) -> None:
    """DDP: every rank recalibrated on its own shard; pool the statistics so all ranks hold the same ones."""
    for m in model.modules():
        mean, var = getattr(m, "running_mean", None), getattr(m, "running_var", None)
        if not isinstance(mean, torch.Tensor) or not isinstance(var, torch.Tensor):
            continue
        second = var + mean * mean  # E[x^2] per rank; pooled var = mean(E[x^2]) - mean(E[x])^2
        for t in (mean, second):
            dist.all_reduce(t)
            t /= dist.get_world_size()
        var.copy_(second - mean * mean)


class OTOCallback(Callback):
    """Compress the LightningModule's network while it trains; export the sub-network at the end.

    Pass an :class:`OTOSettings` (``OTOCallback(settings=OTOSettings(...))``) or its fields as keyword
    arguments (``OTOCallback(mode="erase", target_group_sparsity=0.5)``):

    * ``mode``: ``"prune"`` (channel groups, DHSPG) or ``"erase"`` (whole operators, H2SPG);
      ``optimizer``: ``"dhspg"`` / ``"hesso"`` (prune) or ``"h2spg"`` (erase), default by mode;
      ``erase_ablation``: admit DHSPG/HESSO in erase mode (Table 4 ablation, see ``optim.factory``).
    * how much goes: ``target_group_sparsity`` in ``[0, 1)`` (default 0.5) or ``budget={"flops" |
      "params" | "latency": fraction the sub-network may keep}`` (not both); ``min_width``: each layer's
      floor (see ``OTO``); ``warmup_steps`` / ``warmup_epochs`` and
      ``projection_steps`` / ``projection_epochs`` (default 20% / 30% of the planned steps; lengths
      in epochs that do not fit the run are scaled to fit, with one warning); ``pruning_periods``.
    * ``lr, variant, momentum, nesterov, betas, eps, weight_decay``: base optimizer; ``None`` carries the
      value over from the optimizer returned by ``configure_optimizers``.
    * ``saliency, saliency_ema, epsilon, lambda_scale, descent_margin``: half-space optimizer settings.
    * ``ignored_layers, max_group_sparsity, round_to, min_width, dynamic_shapes``: passed to ``OTO(...)`` when set.
    * ``network_attr``: dotted attribute of the module to compress (default: the LightningModule);
      ``example_inputs``: a tensor, a tuple, or a dict of keyword inputs; default
      ``pl_module.example_input_array``, else 2 samples of the first training batch (said once; a dict
      batch without its labels, as keywords or as one dict argument, by the network's forward signature).
    * ``bn_recalibration_batches`` (20; 0 disables): re-estimate BatchNorm statistics on that many
      training batches before verification and export.
    * ``verify_atol, verify_rtol``: largest accepted |sub(x) - full(x)| is ``atol + rtol * max|full(x)|``;
      above it fit end raises ``SubnetMismatchError`` (nothing is exported).
    * ``export_dir`` (default ``<log_dir>/oto``), ``export_formats`` (subset of ``("torch", "onnx")``),
      ``swap_subnet``: after fit, the LightningModule runs the sub-network (and checkpoints saved then
      reload with ``lightning_oto.load_checkpoint``).
    * ``verbose``: 0 warnings only, 1 a start line and the summary table, 2 also drawings, timings and
      per-module channel counts; ``progress_bar_metrics``: show ``oto/*`` on the progress bar (they
      always go to the logger); ``visualize`` (Graphviz drawings), ``plot_curves`` (PNG from a CSVLogger);
      ``destroy_process_group`` (ddp_spawn / fork workers destroy their process group at teardown).
    * ``monitor`` (default: the first of ``val_acc`` / ``val_loss`` logged), ``max_metric_drop`` (default
      0.05 absolute for ``*acc*`` metrics, 10% relative for losses), ``stop_on_metric_drop``: the
      accuracy guard (:mod:`~lightning_oto.lightning.metric_guard`). The validation at the end of warm-up
      is the dense reference; a drop beyond ``max_metric_drop`` is printed once (one line, rank 0), and
      the report says ``degraded`` when the final validation is still beyond it.
    * ``measure_speed`` (True): the report times the sub-network against the full model on the run's
      device at batch 1 and at the training batch size (``report["speed"]``, next to the FLOP reduction).

    After ``fit``: ``oto``, ``optimizer``, ``subnet``, ``report`` (dict), ``export_paths``, ``full_network``.
    """

    def __init__(self, settings: OTOSettings | None = None, **kwargs: Any) -> None:
        super().__init__()
        if settings is not None and kwargs:
            raise TypeError("pass settings=OTOSettings(...) or keyword arguments, not both.")
        if settings is not None and not isinstance(settings, OTOSettings):
            raise TypeError(f"settings must be an OTOSettings, got {type(settings).__name__}.")
        self.settings: OTOSettings = settings if settings is not None else OTOSettings.from_kwargs(**kwargs)
        self.oto: OTO | None = None
        self.optimizer: HalfSpaceOptimizer | None = None
        self.optimizer_settings: dict[str, Any] = {}
        self.network: nn.Module | None = None
        self.full_network: nn.Module | None = None
        self.subnet: nn.Module | None = None
        self.report: dict[str, Any] | None = None
        self.export_paths: dict[str, str] = {}
        self.drawings: dict[str, str] = {}
        self.space_id: str | None = None
        self.subnet_payload: dict[str, Any] | None = None
        self._loaded_state: dict[str, Any] | None = None
        self._sharded: ShardedTrace | None = None  # FSDP2: the trace taken in setup, before configure_model
        self._reset_run()

    def _reset_run(self) -> None:
        self.subnet, self.report, self.export_paths, self.full_network = None, None, {}, None
        self._param_shapes: dict[str, tuple[int, ...]] = {}
        self._params_full = 0
        self._flops_full: int | None = None
        self._flops_cache: tuple[tuple[int, ...], int] | None = None
        self._last_stats_step = -1
        self._last_phase: str | None = None
        self._rank_redundant: list[list[int]] | None = None
        self._stats: tuple[float, int] | None = None
        self._val_before: dict[str, float] = {}
        self._passive = False
        self._guard = MetricGuard(self.settings.monitor, self.settings.max_metric_drop)
        self._phases_pending = False  # on_train_start plans the phase lengths (fresh runs of our own optimizer)
        self._build_seconds = 0.0

    # ------------------------------------------------------------------ small helpers
    @property
    def mode(self) -> str:
        return self.settings.mode

    @property
    def network_attr(self) -> str | None:
        return self.settings.network_attr

    @property
    def state_key(self) -> str:
        return self._generate_state_key(mode=self.mode, network_attr=self.network_attr)

    def _who(self) -> str:
        return f"OTOCallback(mode={self.mode!r})"

    def _say(self, level: int, msg: str) -> None:
        if self.settings.verbose >= level:
            rank_zero_info(f"[lightning_oto] {msg}")

    # ------------------------------------------------------------------ hooks: start
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        """Validate the network before Lightning does any work; let a swapped checkpoint rebuild the sub-network."""
        self._install_restore_hook(pl_module)
        if stage != "fit":
            return
        net = resolve_network(pl_module, self.network_attr)
        if not any(p.requires_grad for p in net.parameters()):
            raise ValueError(f"{self._who()}: {type(net).__name__} has no trainable parameters: there is nothing "
                             "to compress.")
        self._setup_sharded(trainer, pl_module, net)

    def _setup_sharded(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", net: nn.Module) -> None:
        """FSDP2 (ModelParallelStrategy): trace the full network now, before configure_model shards it."""
        self._sharded = None
        if not check_strategy(trainer.strategy, self._who()) or self.subnet_payload is not None:
            return
        x, _ = self._example_inputs(trainer, pl_module, None)
        t0 = time.perf_counter()
        oto = OTO(net, to_device(x, net), mode=self.mode, **self.settings.oto_kwargs())
        self._sharded = ShardedTrace.of(oto, net)
        self._say(2, f"FSDP2: traced the full network before configure_model ({time.perf_counter() - t0:.1f}s).")

    def _example_inputs(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule",
                        network: nn.Module | None) -> tuple[Any, str]:
        """The trace's example inputs; a training batch is read without touching torch's global RNG.

        Each DataLoader iterator draws its seed from the global RNG (a shuffled sampler its order too), so this extra
        read would reshuffle the user's epochs, and a run that restores its RNG state from a checkpoint would no
        longer resume exactly (the checkpoint's state is restored before ``on_fit_start``).  Lightning's own loading
        of the dataloader (and its draw) happens outside the fork, as it would without this callback.
        """
        if self.settings.example_inputs is None and getattr(pl_module, "example_input_array", None) is None:
            try:
                training_loader(trainer)
            except (TypeError, ValueError):
                pass  # resolve_example_inputs says what is missing
        with torch.random.fork_rng(devices=[]):
            return resolve_example_inputs(pl_module, self.settings.example_inputs, self._who(), trainer, network)

    def _install_restore_hook(self, pl_module: "pl.LightningModule") -> None:
        """Lightning restores the weights (ckpt_path) before any callback hook sees the checkpoint, so the
        module's own ``on_load_checkpoint`` is wrapped for that one call: it rebuilds the sub-network of a
        checkpoint saved after the swap.  OTOMixin modules do this themselves."""
        from .mixin import OTOMixin

        if isinstance(pl_module, OTOMixin) or "on_load_checkpoint" in vars(pl_module):
            return
        user_hook = pl_module.on_load_checkpoint

        def on_load_checkpoint(checkpoint: dict[str, Any]) -> None:
            del pl_module.on_load_checkpoint  # one call only: back to the class's hook
            payload = checkpoint.get(CHECKPOINT_KEY)
            if payload is not None:
                apply_subnet_payload(pl_module, payload, checkpoint.get("state_dict"))
            user_hook(checkpoint)

        pl_module.on_load_checkpoint = on_load_checkpoint  # type: ignore[method-assign]

    def _remove_restore_hook(self, pl_module: "pl.LightningModule") -> None:
        if "on_load_checkpoint" in vars(pl_module):
            del pl_module.on_load_checkpoint

    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """Trace the network, build the search space and install the half-space optimizer."""
        self._remove_restore_hook(pl_module)
        self._reset_run()
        if self.subnet_payload is not None or (self._loaded_state or {}).get("compressed"):
            self._passive = True  # resumed from a checkpoint of the sub-network: the search is over
            self.oto, self.optimizer = None, None
            self._say(1, "the checkpoint holds a compressed sub-network; training it further without a new search.")
            return
        self._guard.restore((self._loaded_state or {}).get("metric_guard"))  # a resumed fit keeps its reference
        net = resolve_network(pl_module, self.network_attr)
        self.network = net
        self._warn_spawned(trainer)
        user_opt = self._user_optimizer(trainer)
        reuse = isinstance(user_opt, HalfSpaceOptimizer) and isinstance(getattr(pl_module, "_oto", None), OTO)
        t0 = time.perf_counter()
        if reuse:  # OTOMixin already built the search space and the optimizer
            self.oto = pl_module._oto  # type: ignore[attr-defined]
            if self.oto.mode != self.mode:
                raise ValueError(f"{self._who()}: the LightningModule's OTOMixin uses mode {self.oto.mode!r}.")
        elif self._sharded is not None:
            self.oto = self._sharded.bind(net, self._who())
        else:
            x, source = self._example_inputs(trainer, pl_module, net)
            if source == "a training batch":
                self._say(1, f"no example_input_array: tracing with {source}, input shape(s) {describe(x)}.")
            self.oto = OTO(net, to_device(x, net), mode=self.mode, **self.settings.oto_kwargs())
        self._check_space()
        self._param_shapes = dict(self.oto.graph.param_shapes)
        self._params_full = count_params(net)
        if reuse:
            self.optimizer = user_opt  # type: ignore[assignment]
            self.optimizer_settings = {"reused_from": "OTOMixin.configure_optimizers"}
        else:
            self.optimizer = self._make_optimizer(trainer, net, user_opt)
        self._build_seconds = time.perf_counter() - t0
        if self.settings.visualize and trainer.is_global_zero:
            self._draw(self._export_dir(trainer) / "graphs_fit_start", ("trace", "space"))

    def _say_start(self) -> None:
        opt = self.optimizer
        assert self.oto is not None and opt is not None
        self._say(1, f"{self.mode} mode: {len(self.oto.prunable_groups)} of {len(self.oto.groups)} groups removable, "
                     f"{self._asked()}; "
                     f"{type(opt).__name__} warm-up {opt.warmup_steps} + projection {opt.projection_steps} steps "
                     f"(search space built in {self._build_seconds:.1f}s).")

    def _asked(self) -> str:
        if self.settings.budget:
            return "budget " + ", ".join(f"{k} {v:g}" for k, v in self.settings.budget.items())
        return f"target sparsity {self.settings.target_group_sparsity} -> {self.optimizer.num_redundant_target} groups"

    def _warn_spawned(self, trainer: "pl.Trainer") -> None:
        """ddp_spawn / fork: this callback works in copies of itself; the launching process gets nothing back."""
        if _spawned_workers(trainer):
            rank_zero_warn("OTO: with ddp_spawn/fork the launching process gets neither the report nor the "
                           "sub-network back (cb.report stays None there; rank 0 writes them to the export "
                           "directory, oto_report.json). strategy='ddp' keeps them in the launching process.")

    def _user_optimizer(self, trainer: "pl.Trainer") -> torch.optim.Optimizer | None:
        user_opts = real_optimizers(trainer.strategy.optimizers)
        if len(user_opts) > 1:
            raise ValueError(f"{self._who()} supports one optimizer; configure_optimizers returned {len(user_opts)}.")
        return user_opts[0] if user_opts else None

    def _check_space(self) -> None:
        """Every rank, and a resumed run, must see the same search space."""
        assert self.oto is not None
        self.space_id = space_hash(self.oto.groups, self.mode)
        ids = _gather(self.space_id)
        if len(set(ids)) > 1:
            raise RuntimeError(f"{self._who()}: the ranks built different search spaces ({ids}); every rank must "
                               "trace the same network on the same example input shape.")
        saved = (self._loaded_state or {}).get("space_hash")
        if saved not in (None, self.space_id):
            raise RuntimeError(
                f"{self._who()}: the checkpoint was written for a different search space (hash {saved} vs "
                f"{self.space_id} now: the network, example input shape or mode changed). Resume with the same "
                "model and callback settings.")

    def _make_optimizer(self, trainer: "pl.Trainer", net: nn.Module,
                        user_opt: torch.optim.Optimizer | None) -> HalfSpaceOptimizer:
        """The half-space optimizer over the user's parameters, with their settings, installed in the trainer."""
        assert self.oto is not None
        s = self.settings
        carried = hparams_from_torch_optimizer(user_opt)
        explicit = {k: v for k, v in s.base_hparams().items() if v is not None}
        base = {**carried, **explicit}
        if "lr" not in base:
            raise ValueError(f"{self._who()}: configure_optimizers returned no optimizer, so pass lr=... to the "
                             "callback (and optionally variant/momentum/weight_decay).")
        # provisional lengths: on_train_start plans the real ones (see _plan_phases)
        provisional = {"warmup_steps": s.warmup_steps or 0,
                       "projection_steps": s.projection_steps or max(s.pruning_periods, 1)}
        hparams = {**base, **s.search_hparams(), "target_group_sparsity": s.target_group_sparsity,
                   "budget": s.budget, **provisional}
        extra = [p for pg in user_opt.param_groups for p in pg["params"]] if user_opt is not None else []
        named = trainable_named_params(net, extra, warn_missing_from=user_opt)
        opt = self.oto.build_optimizer(s.optimizer, named, erase_ablation=s.erase_ablation, **hparams)
        replace_optimizer(trainer, user_opt, opt, float(base["lr"]), s.lr is not None)
        self.optimizer_settings = {k: (list(v) if isinstance(v, tuple) else v) for k, v in hparams.items()
                                   if not callable(v)}
        self.optimizer_settings["carried_over"] = sorted(k for k in carried if k not in explicit)
        self._phases_pending = True
        return opt

    def _plan_phases(self, trainer: "pl.Trainer") -> None:
        """Warm-up and projection lengths for this run's planned steps (a resumed run keeps its checkpoint's).

        Planned here rather than in ``on_fit_start``: the planned steps need the training dataloader, and having
        Lightning load it before a checkpoint is restored (which a strategy such as FSDP2's does after
        ``on_fit_start``; the loop state always comes after it) creates the first iterator, and its draw from the
        global RNG, before the restored RNG state, and drops a stateful dataloader's restored position.
        """
        assert self.optimizer is not None
        s = self.settings
        need_epochs = s.warmup_epochs is not None or s.projection_epochs is not None
        phases = s.phase_lengths(steps_per_epoch(trainer) if need_epochs else None, planned_steps(trainer))
        if phases.note:
            rank_zero_warn(f"OTO: {phases.note}")
        self.optimizer.set_phases(phases.warmup_steps, phases.projection_steps)
        self.optimizer_settings.update(warmup_steps=phases.warmup_steps, projection_steps=phases.projection_steps,
                                       phases_scaled_to_fit=bool(phases.note and phases.fits))

    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """After Lightning restored the optimizer: plan the phases of a fresh search, or check a restored one agrees
        with this callback's saved state."""
        opt = self.optimizer
        if opt is None:
            return
        group = opt.param_groups[0]
        for k, v in opt.defaults.items():  # a foreign optimizer state may have dropped our keys
            group.setdefault(k, v)
        st = self._loaded_state
        resumed = st is not None and "redundant" in st
        if self._phases_pending and not resumed and opt.num_steps == 0:
            self._plan_phases(trainer)
        elif self._phases_pending:  # restored: the checkpoint's lengths
            self.optimizer_settings.update(warmup_steps=opt.warmup_steps, projection_steps=opt.projection_steps)
            self.optimizer_settings.setdefault("phases_scaled_to_fit", False)
        self._phases_pending = False
        self._say_start()
        if resumed:
            if (list(opt.redundant_group_ids) != list(st["redundant"])
                    or int(opt.num_steps) != int(st.get("num_steps", opt.num_steps))):
                raise RuntimeError(
                    f"{self._who()}: the restored optimizer state (step {opt.num_steps}, "
                    f"{len(opt.redundant_group_ids)} redundant groups) does not match the callback state saved in the "
                    f"checkpoint (step {st.get('num_steps')}, {len(st['redundant'])} redundant groups). The "
                    "checkpoint's optimizer state was not restored into the half-space optimizer (weights-only "
                    "checkpoint?).")
        self._loaded_state = None  # checked; a later fit without ckpt_path starts fresh
        self._last_phase = opt.phase

    # ------------------------------------------------------------------ hooks: progress
    def _log(self, pl_module: "pl.LightningModule", name: str, value: float, on_step: bool, bar: bool = False) -> None:
        """``oto/*`` metrics go to the logger; onto the progress bar only with progress_bar_metrics."""
        pl_module.log(f"oto/{name}", float(value), on_step=on_step, on_epoch=not on_step, batch_size=1,
                      prog_bar=bar and self.settings.progress_bar_metrics,
                      sync_dist=(not on_step) and _dist_ready())

    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        """Log phase and redundant count every step; sparsity and params when it is cheap to (log interval)."""
        opt = self.optimizer
        if opt is None or self.oto is None:
            return
        self._log(pl_module, "phase", PHASE_CODES[opt.phase], True, bar=True)
        self._log(pl_module, "redundant_groups", len(opt.redundant_group_ids), True)
        step = opt.num_steps
        last_batch = batch_idx + 1 >= trainer.num_training_batches
        due = step % max(1, trainer.log_every_n_steps) == 0 or opt.phase != self._last_phase or last_batch
        if step != self._last_stats_step and due:
            self._last_stats_step = step
            self._last_phase = opt.phase
            zero = opt.zero_group_ids()
            sparsity = len(zero) / opt.num_prunable if opt.num_prunable else 0.0
            self._stats = (sparsity, self._params_full - count_params_removed(self.oto.groups, zero,
                                                                              self._param_shapes))
        if self._stats is not None:
            sparsity, params = self._stats
            self._log(pl_module, "group_sparsity", sparsity, True, bar=True)
            self._log(pl_module, "params", params, True)
            self._log(pl_module, "params_ratio", params / max(1, self._params_full), True)

    def on_train_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """FLOPs of the current sub-network (only when the zero set changed) and the optimizer's counters."""
        if self.oto is None or self.optimizer is None:
            return
        for name in ("zeroed_by_half_space", "forced_at_deadline"):
            value = getattr(self.optimizer, name, None)  # counters of the half-space optimizers, where present
            if value is not None:
                self._log(pl_module, name, float(value), False)
        self._log_cut_ratios(pl_module)
        flops = self._current_flops()
        if flops is not None:
            self._log(pl_module, "flops", flops, False)
            self._log(pl_module, "flops_ratio", flops / max(1, self._flops_full or 1), False, bar=True)

    def _log_cut_ratios(self, pl_module: "pl.LightningModule") -> None:
        """``oto/cut_ratio_median`` / ``oto/cut_ratio_max``: how small the cut groups were (once some are cut)."""
        summary = getattr(self.optimizer, "cut_norm_summary", None)
        cut = summary() if callable(summary) else None
        if cut and cut["cut"]:
            self._log(pl_module, "cut_ratio_median", cut["median"], False)
            self._log(pl_module, "cut_ratio_max", cut["max"], False)

    def _current_flops(self) -> int | None:
        assert self.oto is not None and self.optimizer is not None
        if self._sharded is not None:  # a sharded network cannot be copied and sliced mid-run
            return None
        inputs = to_device(self.oto.example_inputs, self.oto.model)
        if self._flops_full is None:
            self._flops_full = count_flops(self.oto.model, inputs)
        zero = tuple(self.optimizer.zero_group_ids())
        if not zero:
            return self._flops_full
        if self._flops_cache is not None and self._flops_cache[0] == zero:
            return self._flops_cache[1]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                sub = self.oto.construct_subnet(verify=False)
            flops = count_flops(sub, inputs)
        except Exception as e:  # noqa: BLE001 - an estimate must never stop training
            self._say(2, f"FLOPs estimate skipped: {e}")
            return None
        self._flops_cache = (zero, flops)
        return flops

    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """DDP: every rank must have chosen the same redundant set (the saliency was all-reduced)."""
        if self.optimizer is None:
            return
        sets = _gather(list(self.optimizer.redundant_group_ids))
        self._rank_redundant = sets
        if any(s != sets[0] for s in sets[1:]):
            raise RuntimeError(
                f"{self._who()}: the ranks disagree on the redundant groups "
                f"({[len(s) for s in sets]} groups per rank; first difference on rank "
                f"{next(i for i, s in enumerate(sets) if s != sets[0])}). The saliency statistics must be "
                "all-reduced; is torch.distributed initialized in every rank?")

    # ------------------------------------------------------------------ hooks: end
    def on_fit_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """Recalibrate BatchNorm, construct, verify, export (rank 0), report, and optionally swap in the sub-network."""
        if self.oto is None or self.optimizer is None:
            return
        if trainer.interrupted:
            rank_zero_warn("OTO: training was interrupted; not exporting a sub-network.")
            return
        opt = self.optimizer
        if opt.phase != "hybrid":
            rank_zero_warn(f"OTO: fit ended in the {opt.phase} phase (step {opt.num_steps} of "
                           f"{opt.warmup_steps + opt.projection_steps}); exporting the groups that are zero now.")
        self._val_before = self._stage_metrics(trainer, "val")
        recalibrated = self._recalibrate(trainer)
        swap = self.settings.swap_subnet and self._can_swap(trainer)
        if self._sharded is not None:
            self._fit_end_sharded(trainer, pl_module, swap, recalibrated)
            return
        if not trainer.is_global_zero and not swap:
            return  # only rank 0 builds and writes the export
        t0 = time.perf_counter()
        sub, err = self._construct_verified()
        self.subnet = sub
        if trainer.is_global_zero:
            self._export_and_report(trainer, sub, err, time.perf_counter() - t0, recalibrated)
        if swap:
            self._swap(pl_module, sub)

    def _fit_end_sharded(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", swap: bool,
                         recalibrated: int | None) -> None:
        """FSDP2: gather the full state once (rank 0; every rank when swapping), then construct, verify, export
        and swap as in a single-process run.  Every rank learns whether construction worked: if it failed
        anywhere, every rank raises and nothing is swapped."""
        assert self.oto is not None and self._sharded is not None
        sharded_net = self.oto.model
        full = gather_full(sharded_net, self._sharded.skeleton, to_all_ranks=swap)
        t0 = time.perf_counter()
        sub, err, failure = None, 0.0, None
        if full is not None:
            self._sharded.adopt(full)
            try:
                sub, err = self._construct_verified()
            except Exception as e:  # noqa: BLE001 - re-raised below, after every rank heard of it
                failure = e
        failures = [f for f in _gather(None if failure is None else f"{type(failure).__name__}: {failure}") if f]
        if failures:
            self.oto.model = sharded_net
            if failure is not None:
                raise failure
            raise SubnetMismatchError(f"{self._who()}: constructing the sub-network failed on another rank, so no "
                                      f"rank swaps or exports it: {failures[0]}")
        if sub is None:  # not rank 0 and not swapping: nothing more to do here
            return
        self.subnet = sub
        if trainer.is_global_zero:
            self._export_and_report(trainer, sub, err, time.perf_counter() - t0, recalibrated)
        if swap:
            self._swap(pl_module, sub)

    def _recalibrate(self, trainer: "pl.Trainer") -> int | None:
        """Re-estimate BatchNorm statistics on training batches (the search moved the weights under them)."""
        assert self.oto is not None
        n = self.settings.bn_recalibration_batches
        if n == 0:
            return 0
        try:
            loader = training_loader(trainer)
            with torch.random.fork_rng(devices=[]):  # reading batches draws from the user's RNG (see _example_inputs)
                used = recalibrate_batchnorm(self.oto.model, loader, num_batches=n)
        except (TypeError, ValueError) as e:
            rank_zero_warn(f"OTO: BatchNorm recalibration skipped ({e}); set bn_recalibration_batches=0 to silence.")
            return None
        if used and _dist_ready():
            _average_bn_statistics(self.oto.model)
        return used

    def _construct_verified(self) -> tuple[nn.Module, float]:
        assert self.oto is not None
        oto = self.oto
        oto.example_inputs = to_device(oto.example_inputs, oto.model)  # the strategy may have moved the model
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="construct_subnet: no group is zero yet")
            sub = oto.construct_subnet(verify=False)
        err, scale = oto.verify(sub, return_scale=True)
        allowed = allowed_error(scale, self.settings.verify_atol, self.settings.verify_rtol)
        if not err <= allowed:
            raise SubnetMismatchError(
                f"{self._who()}: the constructed sub-network's outputs differ from the trained full model by "
                f"{err:.3g} (outputs up to {scale:.3g}; allowed verify_atol + verify_rtol x scale = {allowed:.3g}). "
                "This is an engine bug or an operator it mis-handles; nothing was exported. Please report it "
                "with the model.")
        return sub, float(err)

    def _export_and_report(self, trainer: "pl.Trainer", sub: nn.Module, err: float, construct_s: float,
                           recalibrated: int | None) -> None:
        assert self.oto is not None
        out_dir = self._export_dir(trainer)
        t1 = time.perf_counter()
        if self.settings.export_formats:
            self.export_paths = self._export(trainer, sub, out_dir)
        export_s = time.perf_counter() - t1
        if self.settings.visualize:
            self._draw(out_dir / "graphs_fit_end", ("redundant", "subnet"), sub=sub)
        if self.settings.plot_curves:
            self._plot_curves(trainer, out_dir)
        self.report = self._build_report(trainer, sub, err, out_dir)
        self.report.update(construct_seconds=round(construct_s, 3), export_seconds=round(export_s, 3),
                           bn_recalibration_batches_used=recalibrated)
        self._write_report(out_dir)
        self._say(1, "\n" + run_report.summary_table(self.report))
        if self.report.get("module_summary"):
            self._say(2, "per module (before -> after):\n" + self.report["module_summary"])
        finals = {f"oto_final/{k}": float(self.report[k]) for k in (
            "group_sparsity", "params_sub", "flops_sub", "param_ratio", "flop_ratio", "verification_max_abs_error")
            if isinstance(self.report.get(k), (int, float))}
        for lg in trainer.loggers:
            lg.log_metrics(finals, step=trainer.global_step)

    def _export(self, trainer: "pl.Trainer", sub: nn.Module, out_dir: Path) -> dict[str, str]:
        """Export ``sub`` with what inference needs (the datamodule's input normalisation, class names)."""
        assert self.oto is not None
        from ..data.inference import inference_metadata

        meta = inference_metadata(getattr(trainer, "datamodule", None))
        return self.oto.export(sub, out_dir, formats=self.settings.export_formats, metadata=meta,
                               dynamic_shapes=self.settings.dynamic_shapes)

    def _write_report(self, out_dir: Path) -> None:
        assert self.report is not None
        files = self.report.setdefault("files", {})
        files.update(report=str(out_dir / run_report.REPORT_FILE), summary=str(out_dir / run_report.SUMMARY_FILE))
        run_report.write_report(self.report, out_dir)

    def _build_report(self, trainer: "pl.Trainer", sub: nn.Module, err: float, out_dir: Path) -> dict[str, Any]:
        assert self.oto is not None and self.optimizer is not None
        oto, opt = self.oto, self.optimizer
        zero = oto.zero_group_ids()
        rep: dict[str, Any] = {
            "mode": self.mode, "optimizer": type(opt).__name__,
            "target_group_sparsity": self.settings.target_group_sparsity,
            "budget": oto.budget_report(sub, self.settings.budget) if self.settings.budget else None,
            "floors_held": [f.layer for f in getattr(oto, "floors", []) if f.holds_at(set(zero))],
            "num_groups": len(oto.groups), "num_prunable_groups": len(oto.prunable_groups),
            "num_redundant_target": opt.num_redundant_target, "num_zero_groups": len(zero),
            "removed_nothing": not zero,
            "removed_groups": run_report.removed_groups(oto.groups, zero),
            "redundant_group_ids": list(opt.redundant_group_ids),
            **run_report.search_outcome(opt),
            **run_report.size_fields(oto.compression_report(sub)),
            "metrics": {"val_before_recalibration": dict(self._val_before)},
            "verification_max_abs_error": err,
            "verify_atol": self.settings.verify_atol, "verify_rtol": self.settings.verify_rtol,
            "network": type(oto.model).__name__, "network_attr": self.network_attr, "space_hash": self.space_id,
            "settings": self.settings.to_dict(),
            "optimizer_settings": {k: v for k, v in self.optimizer_settings.items()
                                   if isinstance(v, (int, float, str, bool, list)) or v is None},
            "exports": dict(self.export_paths), "export_dir": str(out_dir),
            "files": {"curves": self.drawings.get("training_curves"),
                      **{k: v for k, v in self.export_paths.items() if not k.endswith("_error")}},
            "drawings": dict(self.drawings), "module_summary": self._module_summary(),
            "world_size": trainer.world_size, "global_step": trainer.global_step, "epoch": trainer.current_epoch,
        }
        rep["phase"] = rep["phase_reached"]  # older name
        rep.update(self._guard.report())
        rep["speed"] = self._speed_report(trainer, sub, rep.get("flops_full"), rep.get("flops_sub"))
        if self._rank_redundant is not None and len(self._rank_redundant) > 1:
            rep["redundant_group_ids_per_rank"] = self._rank_redundant
        if oto.unsupported_ops:
            rep["unsupported_ops"] = dict(oto.unsupported_ops)
        return rep

    def _module_summary(self) -> str | None:
        """``oto.summary()`` (per-module channels / operators before -> after) where the engine provides it."""
        summary = getattr(self.oto, "summary", None)
        if not callable(summary):
            return None
        try:
            return str(summary())
        except Exception as e:  # noqa: BLE001 - a description must not fail a finished training
            self._say(2, f"per-module summary skipped: {e}")
            return None

    @staticmethod
    def _stage_metrics(trainer: "pl.Trainer", stage: str) -> dict[str, float]:
        return {k: float(v) for k, v in trainer.callback_metrics.items()
                if k.startswith(stage) and isinstance(v, torch.Tensor) and v.numel() == 1}

    def _record_metrics(self, trainer: "pl.Trainer", stage: str) -> None:
        """Metrics of a validate/test run after fit: those of the exported sub-network (its outputs equal it)."""
        if self.report is None or not trainer.is_global_zero:
            return
        metrics = self._stage_metrics(trainer, stage)
        if metrics:
            self.report.setdefault("metrics", {})[stage] = metrics
            self._write_report(Path(self.report["export_dir"]))

    def on_validation_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if trainer.state.fn == "validate":
            self._record_metrics(trainer, "val")
        elif trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._guard_validation(trainer)

    # ------------------------------------------------------------------ measured speed
    def _speed_report(self, trainer: "pl.Trainer", sub: nn.Module, flops_full: int | None,
                      flops_sub: int | None) -> dict[str, Any] | None:
        """Sub-network vs full model on the run's device at batch 1 and the training batch size (never fatal)."""
        if not self.settings.measure_speed or self.oto is None:
            return None
        try:
            full = self.oto.model  # the report is built before any swap: the full network
            return run_speed_report(full, sub, to_device(self.oto.example_inputs, full),
                                    loader_batch_size(trainer.train_dataloader), flops_full, flops_sub)
        except Exception as e:  # noqa: BLE001 - a timing must not fail a finished training
            self._say(1, f"speed measurement skipped: {e}")
            return None

    # ------------------------------------------------------------------ the accuracy guard
    def _guard_validation(self, trainer: "pl.Trainer") -> None:
        """Compare this validation with the dense reference; say so once when the drop is too large."""
        if self.optimizer is None or self._passive:
            return
        if guard_validation(self._guard, trainer, self.optimizer, self.settings.stop_on_metric_drop, self._who()):
            self._say(1, "stop_on_metric_drop: stopping the fit.")

    @property
    def metric_guard(self) -> MetricGuard:
        """The accuracy guard of this fit (dense reference, every phase's metric, the first drop); an
        :class:`OTOMixin` module on the same trainer reports this one instead of its own."""
        return self._guard

    def on_test_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._record_metrics(trainer, "test")

    # ------------------------------------------------------------------ drawings and curves
    def _draw(self, out: Path, what: Sequence[str], sub: nn.Module | None = None) -> None:
        """Graphviz drawings (never fatal: a missing `dot` leaves the .dot sources and a hint)."""
        assert self.oto is not None
        try:
            paths = self.oto.visualize(out, what=what, sub=sub)
        except Exception as e:  # noqa: BLE001 - pictures must not fail a finished training
            rank_zero_warn(f"OTO: could not draw {what}: {e}")
            return
        for name in what:
            if name in paths:
                self.drawings[f"{out.name}/{name}"] = paths[name]
        self._say(2, f"drawings written to {out}: " + ", ".join(Path(p).name for p in paths.values() if "." in p))

    def _plot_curves(self, trainer: "pl.Trainer", out_dir: Path) -> None:
        """The run's one curves PNG, from the first CSVLogger's metrics.csv."""
        from lightning.pytorch.loggers import CSVLogger

        from ..viz.curves import plot_training_curves

        for lg in trainer.loggers:
            if not isinstance(lg, CSVLogger):
                continue
            try:
                lg.save()
                csv = Path(lg.log_dir) / "metrics.csv"
                if csv.exists():
                    out_dir.mkdir(parents=True, exist_ok=True)
                    png = plot_training_curves(str(csv), str(out_dir / "training_curves.png"))
                    self.drawings["training_curves"] = str(png)
            except Exception as e:  # noqa: BLE001 - a plot must not fail a finished training
                rank_zero_warn(f"OTO: could not plot the training curves: {e}")
            return

    def _export_dir(self, trainer: "pl.Trainer") -> Path:
        if self.settings.export_dir is not None:
            return Path(self.settings.export_dir)
        base = trainer.log_dir or trainer.default_root_dir
        return Path(base) / "oto"

    # ------------------------------------------------------------------ swap
    def _can_swap(self, trainer: "pl.Trainer") -> bool:
        if _spawned_workers(trainer):
            rank_zero_warn("OTO: swap_subnet is ignored with ddp_spawn/fork: the main process only gets the full "
                           "model's weights back. Use strategy='ddp', or load the export with "
                           "lightning_oto.load(export_dir).")
            return False
        return True

    def _swap(self, pl_module: "pl.LightningModule", sub: nn.Module) -> None:
        assert self.oto is not None
        try:
            self.subnet_payload = subnet_payload(self.oto, self.oto.zero_group_ids(), self.network_attr, sub)
        except RuntimeError as e:
            rank_zero_warn(f"OTO: checkpoints saved after the swap will not reload: {e}")
            self.subnet_payload = None
        self.full_network = install_subnet(pl_module, self.network_attr, sub)
        mark = getattr(pl_module, "oto_mark_compressed", None)  # OTOMixin: its own checkpoints carry it too
        if callable(mark) and self.subnet_payload is not None:
            mark(self.subnet_payload)

    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        """Destroy the process group of spawned DDP workers (ddp_spawn / fork: a clean exit of processes that end
        here).  With the subprocess launcher (strategy="ddp") the ranks live on: ``trainer.test`` and a later fit
        reuse the group (re-creating it in the same processes hangs in gloo's rendezvous) and Lightning destroys
        it at exit."""
        self._remove_restore_hook(pl_module)
        if stage != "fit":
            return
        self._loaded_state = None
        self._sharded = None
        # only spawned / forked DDP workers destroy their group: with strategy="ddp" and ModelParallelStrategy the
        # processes go on to validate / test with it (re-initialising one there hangs), and Lightning destroys it
        if self.settings.destroy_process_group and _spawned_workers(trainer) and not is_model_parallel(trainer.strategy) \
                and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()

    # ------------------------------------------------------------------ checkpointing
    def on_save_checkpoint(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule",
                           checkpoint: dict[str, Any]) -> None:
        """After the swap: store what rebuilds the sub-network, and drop the search's optimizer state (it
        belongs to the full network's tensors)."""
        if self.subnet_payload is None:
            return
        checkpoint[CHECKPOINT_KEY] = self.subnet_payload
        if self.optimizer is not None and any(o is self.optimizer for o in trainer.optimizers):
            checkpoint["optimizer_states"] = []

    def on_load_checkpoint(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule",
                           checkpoint: dict[str, Any]) -> None:
        self.subnet_payload = checkpoint.get(CHECKPOINT_KEY)

    def state_dict(self) -> dict[str, Any]:
        """Search-space identity, phase and redundant set (the optimizer state itself is Lightning's)."""
        if self.optimizer is None:
            state = dict(self._loaded_state or {})
            if self.subnet_payload is not None:
                state["compressed"] = True
            return state
        opt = self.optimizer
        return {
            "version": _STATE_VERSION, "mode": self.mode, "optimizer": type(opt).__name__,
            "space_hash": self.space_id, "num_groups": len(self.oto.groups) if self.oto is not None else None,
            "phase": opt.phase, "phase_code": PHASE_CODES[opt.phase], "num_steps": int(opt.num_steps),
            "redundant": list(opt.redundant_group_ids), "target_group_sparsity": self.settings.target_group_sparsity,
            "compressed": self.subnet_payload is not None, "metric_guard": self._guard.state(),
            **self._sharded_search_state(),
        }

    def _sharded_search_state(self) -> dict[str, Any]:
        """FSDP2: the optimizer's search state rides in the callback state (torch's sharded optimizer state dict
        drops it); it is the same on every rank."""
        if self._sharded is None or self.optimizer is None:
            return {}
        return {"search_state": self.optimizer.search_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep the saved state; it is checked against the rebuilt search space and restored optimizer."""
        if state_dict.get("mode") not in (None, self.mode):
            raise RuntimeError(f"{self._who()}: the checkpoint was written in {state_dict.get('mode')!r} mode.")
        self._loaded_state = dict(state_dict)
        if self.optimizer is not None and "search_state" in state_dict:  # FSDP2: restored after on_fit_start
            self.optimizer.expect_search_state(state_dict["search_state"])

    # ------------------------------------------------------------------ kept for existing callers
    summary_table = staticmethod(run_report.summary_table)


def _callback_signature() -> inspect.Signature:
    """``OTOCallback(settings=None, **kwargs)`` as what it accepts: ``settings``, or each :class:`OTOSettings`
    field by keyword.  help(), IDEs and ``inspect.signature`` then list every argument, and the table in
    docs/callback.md is checked against this list."""
    kind = inspect.Parameter.KEYWORD_ONLY
    params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD),
              inspect.Parameter("settings", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None,
                                annotation="OTOSettings | None")]
    for f in dataclasses.fields(OTOSettings):
        if f.init and f.name != "explicit":  # explicit: filled in by OTOSettings.from_kwargs
            params.append(inspect.Parameter(f.name, kind, default=f.default, annotation=f.type))
    return inspect.Signature(params, return_annotation="None")


OTOCallback.__init__.__signature__ = _callback_signature()  # type: ignore[attr-defined]
