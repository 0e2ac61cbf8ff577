"""`OTOCallback`: OTOv3 pruning / erasing driven from Lightning Trainer hooks.

Lifecycle (hooks in Lightning's order)::

    setup(fit)          validate arguments, network and example input (fail before any work)
    (Lightning restores model weights and this callback's state_dict from ckpt_path)
    (strategy.setup: the user's configure_optimizers runs, model is wrapped for DDP)
    on_fit_start        trace the network, build OTO, replace the user's optimizer by DHSPG/H2SPG over
                        the same parameters (hyper-parameters carried over), rebind LR schedulers
    (Lightning restores optimizer + scheduler state: it now loads into the half-space optimizer, so a
     resumed run continues mid-search)
    on_train_start      check the restored state against this callback's saved state
    on_train_batch_end  log oto/phase, oto/redundant_groups, oto/group_sparsity, oto/params(_ratio)
    on_train_epoch_end  log oto/flops(_ratio) (at most once per epoch)
    on_train_end        DDP: assert every rank chose the same redundant set
    on_fit_end          construct + verify the sub-network, export it (rank 0), JSON report, summary,
                        optionally swap it into the LightningModule
    teardown(fit)       destroy the process group (DDP), so a later fit in the same process works

``oto/phase`` is logged as a number: 0 = warm-up (saliency statistics), 1 = projection (redundant
groups pushed to zero), 2 = hybrid (redundant groups stay zero, the rest trains).
"""
from __future__ import annotations

import copy
import json
import logging
import math
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

from ..errors import SubnetMismatchError
from ..oto import OTO
from ..subnet.verify import DEFAULT_ATOL, DEFAULT_RTOL, allowed_error
from ..optim import HalfSpaceOptimizer
from ..subnet.report import count_flops
from . import _common as C

log = logging.getLogger("lightning_oto")

__all__ = ["OTOCallback", "PHASE_CODES"]

PHASE_CODES = C.PHASE_CODES
_STATE_VERSION = 1


def _dist_ready() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _gather(obj: Any) -> list[Any]:
    if not _dist_ready():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


class OTOCallback(Callback):
    """Compress the LightningModule's network while it trains; export the sub-network at the end.

    Args:
        mode: ``"prune"`` (channel groups, DHSPG) or ``"erase"`` (whole operators, H2SPG).
        optimizer: ``"dhspg"`` / ``"hesso"`` (prune) or ``"h2spg"`` (erase); default by mode.
        target_group_sparsity: fraction of prunable groups to remove, in ``[0, 1)``.
        warmup_steps / warmup_epochs: warm-up length (one of them; epochs are converted with the number of
            optimizer steps per epoch, gradient accumulation included). Default: 20% of the planned steps.
        projection_steps / projection_epochs: projection length. Default: 30% of the planned steps.
        pruning_periods: split the projection into this many periods (progressive selection).
        lr, variant, momentum, nesterov, betas, eps, weight_decay: base optimizer; ``None`` carries the value
            over from the optimizer returned by ``configure_optimizers`` (SGD -> "sgd", Adam -> "adam",
            AdamW -> "adamw").
        saliency, saliency_ema, epsilon, lambda_scale, descent_margin: half-space optimizer settings.
        export_dir: where the sub-network, report and summary go (default ``<log_dir>/oto``).
        export_formats: subset of ``("torch", "onnx")``; empty: construct, verify and report only.
        swap_subnet: after fit, replace the network in the LightningModule by the sub-network, so
            ``trainer.validate/test`` run on the compressed module.
        example_inputs: tensor or tuple; default ``pl_module.example_input_array``.
        network_attr: dotted attribute of the module to compress (default: the LightningModule itself).
        verify_atol, verify_rtol: largest accepted |sub(x) - full(x)| is ``atol + rtol * max|full(x)|``; above
            it fit end raises ``SubnetMismatchError`` (nothing is exported).
        destroy_process_group: destroy the default process group in ``teardown`` (DDP).
        visualize: write Graphviz drawings into the export dir: trace + search space at fit start, redundant
            structures + sub-network at fit end (paths are logged and listed in the report).
        plot_curves: at fit end, plot loss / accuracy / group sparsity vs step with the phases marked
            (``training_curves.png`` beside the report) when a CSVLogger is attached.
        erase_ablation: allow ``optimizer="dhspg"`` in erase mode (the erasing paper's Table 4 ablation: no
            hierarchy check, so fit end may raise ``InvalidSubnetError`` instead of exporting).

    After ``fit``: ``oto``, ``optimizer``, ``subnet``, ``report`` (dict) and ``export_paths``.
    """

    def __init__(
        self,
        mode: str = "prune",
        optimizer: str | None = None,
        target_group_sparsity: float = 0.5,
        warmup_steps: int | None = None,
        warmup_epochs: float | None = None,
        projection_steps: int | None = None,
        projection_epochs: float | None = None,
        pruning_periods: int = 1,
        lr: float | None = None,
        variant: str | None = None,
        momentum: float | None = None,
        nesterov: bool | None = None,
        betas: tuple[float, float] | None = None,
        eps: float | None = None,
        weight_decay: float | None = None,
        saliency: Any = "default",
        saliency_ema: float = 0.9,
        epsilon: float = 0.0,
        lambda_scale: float = 1.0,
        descent_margin: float = 0.1,
        export_dir: str | Path | None = None,
        export_formats: Sequence[str] = ("torch", "onnx"),
        swap_subnet: bool = False,
        example_inputs: Any = None,
        network_attr: str | None = None,
        verify_atol: float = DEFAULT_ATOL,
        verify_rtol: float = DEFAULT_RTOL,
        destroy_process_group: bool = True,
        erase_ablation: bool = False,
        visualize: bool = False,
        plot_curves: bool = True,
    ) -> None:
        super().__init__()
        self.mode = mode
        self.optimizer_name = C.check_mode_optimizer(mode, optimizer, erase_ablation)
        self.visualize = bool(visualize)
        self.plot_curves = bool(plot_curves)
        self.drawings: dict[str, str] = {}
        self.target_group_sparsity = C.check_target(target_group_sparsity)
        if warmup_steps is not None and warmup_epochs is not None:
            raise ValueError("give warmup_steps or warmup_epochs, not both.")
        if projection_steps is not None and projection_epochs is not None:
            raise ValueError("give projection_steps or projection_epochs, not both.")
        for name, v in (("warmup_steps", warmup_steps), ("warmup_epochs", warmup_epochs),
                        ("projection_steps", projection_steps), ("projection_epochs", projection_epochs)):
            C.check_length(v, name)
        if isinstance(pruning_periods, bool) or not isinstance(pruning_periods, int) or pruning_periods < 1:
            raise ValueError(f"pruning_periods must be an integer >= 1, got {pruning_periods!r}.")
        if lr is not None and (not isinstance(lr, (int, float)) or not lr > 0):
            raise ValueError(f"lr must be > 0, got {lr!r}.")
        formats = tuple(export_formats)
        bad = [f for f in formats if f not in ("torch", "onnx")]
        if bad:
            raise ValueError(f"export_formats must be a subset of ('torch', 'onnx'), got {bad}.")
        if network_attr is not None and (not isinstance(network_attr, str) or not network_attr):
            raise ValueError(f"network_attr must be an attribute name (str), got {network_attr!r}.")
        if swap_subnet and mode == "erase" and network_attr is None:
            raise ValueError(
                "swap_subnet=True in erase mode needs network_attr: the erased sub-network is a torch.fx "
                "GraphModule that replaces a submodule of the LightningModule (the LightningModule itself "
                "cannot be replaced).")
        self.warmup_steps, self.warmup_epochs = warmup_steps, warmup_epochs
        self.projection_steps, self.projection_epochs = projection_steps, projection_epochs
        self.pruning_periods = pruning_periods
        self.explicit = {"lr": lr, "variant": variant, "momentum": momentum, "nesterov": nesterov,
                         "betas": betas, "eps": eps, "weight_decay": weight_decay}
        self.search_settings = {"saliency": saliency, "saliency_ema": saliency_ema, "epsilon": epsilon,
                                "lambda_scale": lambda_scale, "descent_margin": descent_margin}
        self.export_dir = None if export_dir is None else Path(export_dir)
        self.export_formats = formats
        self.swap_subnet = bool(swap_subnet)
        self.example_inputs = example_inputs
        self.network_attr = network_attr
        self.verify_atol = float(verify_atol)
        self.verify_rtol = float(verify_rtol)
        self.destroy_process_group = bool(destroy_process_group)

        self.oto: OTO | None = None
        self.optimizer: HalfSpaceOptimizer | None = None
        self.network: nn.Module | None = None
        self.full_network: nn.Module | None = None
        self.subnet: nn.Module | None = None
        self.report: dict[str, Any] | None = None
        self.export_paths: dict[str, str] = {}
        self.settings: dict[str, Any] = {}
        self.space_id: str | None = None
        self._loaded_state: dict[str, Any] | None = None
        self._param_shapes: dict[str, tuple[int, ...]] = {}
        self._params_full = 0
        self._flops_full: int | None = None
        self._flops_cache: tuple[tuple[int, ...], int] | None = None
        self._last_stats_step = -1
        self._last_phase: str | None = None
        self._rank_redundant: list[list[int]] | None = None
        self._stats: tuple[float, int] | None = None

    # ------------------------------------------------------------------ helpers
    @property
    def state_key(self) -> str:
        return self._generate_state_key(mode=self.mode, network_attr=self.network_attr)

    def _who(self) -> str:
        return f"OTOCallback(mode={self.mode!r})"

    def _resolve(self, pl_module: "pl.LightningModule") -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
        net = C.resolve_network(pl_module, self.network_attr)
        x = C.resolve_example_inputs(pl_module, self.example_inputs, self._who())
        return net, x

    def _phase_code(self) -> int:
        assert self.optimizer is not None
        return PHASE_CODES[self.optimizer.phase]

    # ------------------------------------------------------------------ hooks: start
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        """Validate the network and example input before Lightning does any work."""
        if stage != "fit":
            return
        net, _ = self._resolve(pl_module)
        if not any(p.requires_grad for p in net.parameters()):
            raise ValueError(f"{self._who()}: {type(net).__name__} has no trainable parameters: there is nothing "
                             "to compress.")

    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """Trace the network, build the search space and install the half-space optimizer."""
        net, x = self._resolve(pl_module)
        self.network = net
        self.full_network = None
        self.subnet, self.report, self.export_paths = None, None, {}
        self._flops_full, self._flops_cache, self._last_stats_step, self._last_phase = None, None, -1, None
        self._rank_redundant, self._stats = None, None
        user_opts = C.iter_optimizers(trainer.strategy.optimizers)
        if len(user_opts) > 1:
            raise ValueError(f"{self._who()} supports one optimizer; configure_optimizers returned {len(user_opts)}.")
        user_opt = user_opts[0] if user_opts else None

        reuse = isinstance(user_opt, HalfSpaceOptimizer) and isinstance(getattr(pl_module, "_oto", None), OTO)
        t0 = time.perf_counter()
        if reuse:  # OTOMixin already built the search space and the optimizer
            self.oto = pl_module._oto  # type: ignore[attr-defined]
            if self.oto.mode != self.mode:
                raise ValueError(f"{self._who()}: the LightningModule's OTOMixin uses mode {self.oto.mode!r}.")
        else:
            self.oto = OTO(net, C.to_device(x, net), mode=self.mode)
        if "torch" in self.export_formats and all(t.dim() and t.shape[0] == 1 for t in self.oto.example_inputs):
            rank_zero_warn("OTO: the example input has batch size 1, which torch.export specializes: the exported "
                           "program will only accept batch size 1. Use an example input with a batch of 2 or more.")
        self.space_id = C.space_hash(self.oto.groups, self.mode)
        ids = _gather(self.space_id)
        if len(set(ids)) > 1:
            raise RuntimeError(f"{self._who()}: the ranks built different search spaces ({ids}); every rank must "
                               "trace the same network on the same example input shape.")
        if self._loaded_state is not None and self._loaded_state.get("space_hash") not in (None, self.space_id):
            raise RuntimeError(
                f"{self._who()}: the checkpoint was written for a different search space "
                f"(hash {self._loaded_state.get('space_hash')} vs {self.space_id} now: the network, example input "
                "shape or mode changed). Resume with the same model and callback settings.")
        self._param_shapes = dict(self.oto.graph.param_shapes)
        self._params_full = sum(p.numel() for p in net.parameters())

        if reuse:
            self.optimizer = user_opt  # type: ignore[assignment]
            self.settings = {"reused_from": "OTOMixin.configure_optimizers"}
        else:
            self.optimizer = self._make_optimizer(trainer, net, user_opt)
            trainer.strategy.optimizers = [self.optimizer]
        if self.visualize and trainer.is_global_zero:
            self._draw(self._export_dir(trainer) / "graphs_fit_start", ("trace", "space"))
        rank_zero_info(
            f"[lightning_oto] {self.mode} mode: {len(self.oto.groups)} groups, {len(self.oto.prunable_groups)} "
            f"prunable, target sparsity {self.target_group_sparsity} -> {self.optimizer.num_redundant_target} "
            f"groups; {type(self.optimizer).__name__} warmup {self.optimizer.warmup_steps} + projection "
            f"{self.optimizer.projection_steps} steps (search space built in {time.perf_counter() - t0:.1f}s).")

    def _steps_per_epoch(self, trainer: "pl.Trainer") -> float:
        if trainer.train_dataloader is None:
            _ = trainer.estimated_stepping_batches  # public API; loads the train dataloader if needed
        if trainer.train_dataloader is None:
            trainer.fit_loop.setup_data()
        n = trainer.num_training_batches
        if not math.isfinite(n):
            return float("inf")
        return float(math.ceil(n / max(1, trainer.accumulate_grad_batches)))

    def _make_optimizer(self, trainer: "pl.Trainer", net: nn.Module,
                        user_opt: torch.optim.Optimizer | None) -> HalfSpaceOptimizer:
        assert self.oto is not None
        carried = C.user_hparams(user_opt)
        settings = dict(carried)
        for k, v in self.explicit.items():
            if v is not None:
                settings[k] = v
        if "lr" not in settings:
            raise ValueError(f"{self._who()}: configure_optimizers returned no optimizer, so pass lr=... to the "
                             "callback (and optionally variant/momentum/weight_decay).")
        need_epochs = self.warmup_epochs is not None or self.projection_epochs is not None
        spe = self._steps_per_epoch(trainer) if need_epochs else None
        warm = C.steps_from(self.warmup_steps, self.warmup_epochs, spe, "warmup")
        proj = C.steps_from(self.projection_steps, self.projection_epochs, spe, "projection")
        if warm is None or proj is None:
            total = trainer.estimated_stepping_batches
            if not math.isfinite(total) or total <= 0:
                raise ValueError(f"{self._who()}: cannot plan the search without a known number of training steps; "
                                 "pass warmup_steps and projection_steps.")
            if warm is None:
                warm = int(round(C.DEFAULT_WARMUP_FRACTION * total))
            if proj is None:
                proj = max(1, int(round(C.DEFAULT_PROJECTION_FRACTION * total)))
        settings.update(target_group_sparsity=self.target_group_sparsity, warmup_steps=warm,
                        projection_steps=proj, pruning_periods=self.pruning_periods, **self.search_settings)
        total = trainer.estimated_stepping_batches if trainer.train_dataloader is not None else None
        if total is not None and math.isfinite(total) and warm + proj > total:
            rank_zero_warn(f"OTO: warm-up + projection = {warm + proj} steps but training plans only {int(total)}; "
                           "the search will not finish (the export at fit end keeps the groups that are zero by then).")
        named = C.params_for_optimizer(net, user_opt)
        opt = C.build_half_space(self.optimizer_name, named, self.oto.groups, self.oto.hierarchy_check, settings)
        C.install_optimizer(user_opt, opt, float(settings["lr"]), self.explicit["lr"] is not None)
        for cfg in trainer.lr_scheduler_configs:
            if user_opt is not None:
                C.rebind_scheduler(cfg.scheduler, user_opt, opt,
                                   float(settings["lr"]) if self.explicit["lr"] is not None else None)
        self.settings = {k: (list(v) if isinstance(v, tuple) else v) for k, v in settings.items()
                         if not callable(v)}
        self.settings["carried_over"] = sorted(k for k in carried if self.explicit.get(k) is None)
        return opt

    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """After Lightning restored the optimizer: check it agrees with this callback's saved state."""
        opt = self.optimizer
        if opt is None:
            return
        group = opt.param_groups[0]
        for k, v in opt.defaults.items():  # a foreign optimizer state may have dropped our keys
            group.setdefault(k, v)
        st = self._loaded_state
        if st is not None and "redundant" in st:
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
    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        """Log phase and redundant count every step; sparsity and params when it is cheap to (log interval)."""
        opt = self.optimizer
        if opt is None or self.oto is None:
            return
        kw = dict(on_step=True, on_epoch=False, batch_size=1)
        pl_module.log("oto/phase", float(self._phase_code()), prog_bar=True, **kw)
        pl_module.log("oto/redundant_groups", float(len(opt.redundant_group_ids)), prog_bar=True, **kw)
        step = opt.num_steps
        last_batch = batch_idx + 1 >= trainer.num_training_batches
        due = (step % max(1, trainer.log_every_n_steps) == 0 or opt.phase != self._last_phase or last_batch)
        if step != self._last_stats_step and due:
            self._last_stats_step = step
            self._last_phase = opt.phase
            zero = opt.zero_group_ids()
            sparsity = len(zero) / opt.num_prunable if opt.num_prunable else 0.0
            params = self._params_full - C.removed_params(self.oto.groups, zero, self._param_shapes)
            self._stats = (sparsity, params)
        if self._stats is not None:
            sparsity, params = self._stats
            pl_module.log("oto/group_sparsity", float(sparsity), prog_bar=True, **kw)
            pl_module.log("oto/params", float(params), **kw)
            pl_module.log("oto/params_ratio", float(params / max(1, self._params_full)), prog_bar=True, **kw)

    def on_train_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """FLOPs of the current sub-network, at most once per epoch (and only when the zero set changed)."""
        if self.oto is None or self.optimizer is None:
            return
        flops = self._current_flops()
        if flops is None:
            return
        kw = dict(on_step=False, on_epoch=True, batch_size=1, sync_dist=_dist_ready())
        pl_module.log("oto/flops", float(flops), **kw)
        pl_module.log("oto/flops_ratio", float(flops / max(1, self._flops_full or 1)), prog_bar=True, **kw)

    def _current_flops(self) -> int | None:
        assert self.oto is not None and self.optimizer is not None
        inputs = C.to_device(self.oto.example_inputs, self.oto.model)
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
            log.debug("lightning_oto: FLOPs estimate skipped: %s", e)
            return None
        self._flops_cache = (zero, flops)
        return flops

    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """DDP: every rank must have chosen the same redundant set (the saliency was all-reduced)."""
        if self.optimizer is None:
            return
        mine = list(self.optimizer.redundant_group_ids)
        sets = _gather(mine)
        self._rank_redundant = sets
        if any(s != sets[0] for s in sets[1:]):
            raise RuntimeError(
                f"{self._who()}: the ranks disagree on the redundant groups "
                f"({[len(s) for s in sets]} groups per rank; first difference on rank "
                f"{next(i for i, s in enumerate(sets) if s != sets[0])}). The saliency statistics must be "
                "all-reduced; is torch.distributed initialized in every rank?")

    # ------------------------------------------------------------------ hooks: end
    def on_fit_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """Construct, verify, export (rank 0), report, and optionally swap in the sub-network."""
        if self.oto is None or self.optimizer is None:
            return
        oto, opt = self.oto, self.optimizer
        if trainer.interrupted:
            rank_zero_warn("OTO: training was interrupted; not exporting a sub-network.")
            return
        if opt.phase != "hybrid":
            rank_zero_warn(f"OTO: fit ended in the {opt.phase} phase (step {opt.num_steps} of "
                           f"{opt.warmup_steps + opt.projection_steps}); exporting the groups that are zero now.")
        swap = self.swap_subnet and self._can_swap(trainer)
        if not trainer.is_global_zero and not swap:
            return  # only rank 0 builds and writes the export
        oto.example_inputs = C.to_device(oto.example_inputs, oto.model)  # the strategy may have moved the model
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="construct_subnet: no group is zero yet")
            sub = oto.construct_subnet(verify=False)
        err, scale = oto.verify(sub, return_scale=True)
        allowed = allowed_error(scale, self.verify_atol, self.verify_rtol)
        if not err <= allowed:
            raise SubnetMismatchError(
                f"{self._who()}: the constructed sub-network's outputs differ from the trained full model by "
                f"{err:.3g} (outputs up to {scale:.3g}; allowed verify_atol + verify_rtol x scale = {allowed:.3g}). "
                "This is an engine bug or an operator it mis-handles; nothing was exported. Please report it "
                "with the model.")
        self.subnet = sub
        construct_s = time.perf_counter() - t0
        out_dir = self._export_dir(trainer)
        if trainer.is_global_zero:
            t1 = time.perf_counter()
            if self.export_formats:
                self.export_paths = oto.export(sub, out_dir, formats=self.export_formats)
            export_s = time.perf_counter() - t1
            if self.visualize:
                self._draw(out_dir / "graphs_fit_end", ("redundant", "subnet"), sub=sub)
            if self.plot_curves:
                self._plot_curves(trainer, out_dir)
            self.report = self._build_report(trainer, sub, err, out_dir, construct_s, export_s)
            self.report["drawings"] = dict(self.drawings)
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / "oto_report.json").write_text(json.dumps(self.report, indent=2))
            table = self.summary_table(self.report)
            (out_dir / "oto_summary.txt").write_text(table + "\n")
            rank_zero_info("\n" + table)
            for lg in trainer.loggers:
                lg.log_metrics({f"oto_final/{k}": float(self.report[k]) for k in
                                ("group_sparsity", "params_sub", "flops_sub", "param_ratio", "flop_ratio",
                                 "verification_max_abs_error") if isinstance(self.report.get(k), (int, float))},
                               step=trainer.global_step)
        if swap:
            self._swap(pl_module, sub)

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
        rank_zero_info(f"[lightning_oto] drawings written to {out}: " + ", ".join(Path(p).name for p in
                                                                                  paths.values() if "." in p)[:400])

    def _plot_curves(self, trainer: "pl.Trainer", out_dir: Path) -> None:
        from lightning.pytorch.loggers import CSVLogger

        for lg in trainer.loggers:
            if not isinstance(lg, CSVLogger):
                continue
            try:
                lg.save()
                csv = Path(lg.log_dir) / "metrics.csv"
                if csv.exists():
                    from ..viz.curves import plot_training_curves

                    out_dir.mkdir(parents=True, exist_ok=True)
                    self.drawings["training_curves"] = str(plot_training_curves(str(csv),
                                                                                 str(out_dir / "training_curves.png")))
            except Exception as e:  # noqa: BLE001 - a plot must not fail a finished training
                rank_zero_warn(f"OTO: could not plot the training curves: {e}")
            return

    def _export_dir(self, trainer: "pl.Trainer") -> Path:
        if self.export_dir is not None:
            return self.export_dir
        base = trainer.log_dir or trainer.default_root_dir
        return Path(base) / "oto"

    def _build_report(self, trainer: "pl.Trainer", sub: nn.Module, err: float, out_dir: Path,
                      construct_s: float, export_s: float) -> dict[str, Any]:
        assert self.oto is not None and self.optimizer is not None
        oto, opt = self.oto, self.optimizer
        comp = oto.compression_report(sub)
        zero = oto.zero_group_ids()
        rep: dict[str, Any] = {
            "mode": self.mode,
            "optimizer": type(opt).__name__,
            "target_group_sparsity": self.target_group_sparsity,
            "group_sparsity": comp.get("group_sparsity"),
            "num_groups": len(oto.groups),
            "num_prunable_groups": len(oto.prunable_groups),
            "num_redundant_target": opt.num_redundant_target,
            "num_zero_groups": len(zero),
            "removed_groups": [{"id": g, "name": oto.groups[g].name} for g in zero],
            "redundant_group_ids": list(opt.redundant_group_ids),
            "phase": opt.phase,
            "phase_code": PHASE_CODES[opt.phase],
            "optimizer_steps": opt.num_steps,
            "warmup_steps": opt.warmup_steps,
            "projection_steps": opt.projection_steps,
            "params_full": comp.get("params_full"),
            "params_sub": comp.get("params_sub"),
            "param_ratio": comp.get("param_ratio"),
            "flops_full": comp.get("flops_full"),
            "flops_sub": comp.get("flops_sub"),
            "flop_ratio": comp.get("flop_ratio"),
            "verification_max_abs_error": err,
            "verify_atol": self.verify_atol,
            "verify_rtol": self.verify_rtol,
            "network": type(oto.model).__name__,
            "network_attr": self.network_attr,
            "space_hash": self.space_id,
            "settings": {k: v for k, v in self.settings.items() if isinstance(v, (int, float, str, bool, list))
                         or v is None},
            "exports": dict(self.export_paths),
            "export_dir": str(out_dir),
            "world_size": trainer.world_size,
            "global_step": trainer.global_step,
            "epoch": trainer.current_epoch,
            "construct_seconds": round(construct_s, 3),
            "export_seconds": round(export_s, 3),
        }
        if self._rank_redundant is not None and len(self._rank_redundant) > 1:
            rep["redundant_group_ids_per_rank"] = self._rank_redundant
        if oto.unsupported_ops:
            rep["unsupported_ops"] = dict(oto.unsupported_ops)
        return rep

    @staticmethod
    def summary_table(report: dict[str, Any]) -> str:
        """Plain-text summary of a report (what was removed, how much smaller, how exact)."""
        def fmt(v: Any) -> str:
            if isinstance(v, float):
                return f"{v:.4g}"
            return str(v)

        rows = [
            ("mode / optimizer", f"{report['mode']} / {report['optimizer']}"),
            ("group sparsity", f"{fmt(report['group_sparsity'])} (target {fmt(report['target_group_sparsity'])}, "
                               f"{report['num_zero_groups']}/{report['num_prunable_groups']} groups)"),
            ("parameters", f"{report['params_full']:,} -> {report.get('params_sub', 0):,} "
                           f"({100 * (report.get('param_ratio') or 0):.1f}%)"),
            ("FLOPs", f"{report['flops_full']:,} -> {report.get('flops_sub', 0):,} "
                      f"({100 * (report.get('flop_ratio') or 0):.1f}%)"),
            ("max |sub - full|", fmt(report["verification_max_abs_error"])),
            ("phase at end", f"{report['phase']} (step {report['optimizer_steps']})"),
            ("exported to", report["export_dir"]),
        ]
        removed = report.get("removed_groups") or []
        names = ", ".join(g["name"] for g in removed[:4]) + (f", ... (+{len(removed) - 4})" if len(removed) > 4 else "")
        rows.append(("removed", names or "-"))
        w = max(len(k) for k, _ in rows)
        line = "+" + "-" * (w + 2) + "+" + "-" * 62 + "+"
        out = [line, f"| {'OTO compression summary'.ljust(w + 63)}|", line]
        for k, v in rows:
            out.append(f"| {k.ljust(w)} | {v[:60].ljust(60)} |")
        out.append(line)
        return "\n".join(out)

    def _can_swap(self, trainer: "pl.Trainer") -> bool:
        start_method = getattr(trainer.strategy, "_start_method", None)
        if start_method in ("spawn", "fork", "forkserver") and trainer.world_size > 1:
            rank_zero_warn("OTO: swap_subnet is ignored with ddp_spawn/fork: the main process only gets the full "
                           "model's weights back. Load the export with OTOMixin.load_compressed(export_dir).")
            return False
        return True

    def _swap(self, pl_module: "pl.LightningModule", sub: nn.Module) -> None:
        assert self.oto is not None
        if self.network_attr is not None:
            self.full_network = self.oto.model
            C.set_attr_path(pl_module, self.network_attr, sub)
            return
        # the LightningModule itself was pruned: the slimmed copy has the same class; move its parts over,
        # keeping a shell with the old parts as `full_network` (no tensor is copied)
        shell = copy.copy(pl_module)
        for store in ("_modules", "_parameters", "_buffers"):
            setattr(shell, store, dict(getattr(pl_module, store)))
        self.full_network = shell
        for store in ("_modules", "_parameters", "_buffers"):
            src = getattr(sub, store)
            dst = getattr(pl_module, store)
            for k in list(dst.keys()):
                if k in src:
                    dst[k] = src[k]

    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        """Destroy the DDP process group we trained in (clean exit; a later fit re-initializes it)."""
        if stage != "fit":
            return
        self._loaded_state = None
        if not self.destroy_process_group:
            return
        if dist.is_available() and dist.is_initialized() and trainer.world_size > 1:
            dist.destroy_process_group()

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        """Search-space identity, phase and redundant set (the optimizer state itself is Lightning's)."""
        if self.optimizer is None:
            return dict(self._loaded_state or {})
        opt = self.optimizer
        return {
            "version": _STATE_VERSION,
            "mode": self.mode,
            "optimizer": type(opt).__name__,
            "space_hash": self.space_id,
            "num_groups": len(self.oto.groups) if self.oto is not None else None,
            "phase": opt.phase,
            "phase_code": PHASE_CODES[opt.phase],
            "num_steps": int(opt.num_steps),
            "redundant": list(opt.redundant_group_ids),
            "target_group_sparsity": self.target_group_sparsity,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep the saved state; it is checked against the rebuilt search space and restored optimizer."""
        if state_dict.get("mode") not in (None, self.mode):
            raise RuntimeError(f"{self._who()}: the checkpoint was written in {state_dict.get('mode')!r} mode.")
        self._loaded_state = dict(state_dict)
