"""`OTOMixin`: OTO inside a LightningModule (``configure_optimizers`` from ``self.hparams``).

Use it when you prefer the module to own the compression settings::

    class Net(OTOMixin, L.LightningModule):
        def __init__(self, lr=0.1, target_group_sparsity=0.5, oto_mode="prune", warmup_steps=50,
                     projection_steps=50):
            super().__init__()
            self.save_hyperparameters()
            self.net = ...
            self.example_input_array = torch.randn(2, 3, 32, 32)   # optional: else a training batch

The search space is traced lazily (first use of ``self.oto``: normally in ``configure_optimizers``,
after Lightning moved the module to its device).  Every :class:`OTOSettings` field that shapes the
search is read from hparams (an ``oto_`` prefixed name wins over the plain one): ``oto_mode``,
``oto_optimizer``, ``target_group_sparsity``, ``lr``, ``variant``, ``momentum``, ``nesterov``, ``betas``,
``eps``, ``weight_decay``, ``warmup_steps``/``warmup_epochs``, ``projection_steps``/``projection_epochs``,
``pruning_periods``, ``saliency``, ``saliency_ema``, ``epsilon``, ``lambda_scale``, ``descent_margin``,
``erase_ablation``, ``network_attr``, ``ignored_layers``, ``max_group_sparsity``, ``round_to``,
``dynamic_shapes``, ``budget`` (instead of ``target_group_sparsity``), ``min_width``, ``cost_weight``.  Unset base-optimizer values take the half-space optimizer's defaults.

What the callback reports, the mixin reports too, from the same settings: the accuracy guard
(``monitor``, ``max_metric_drop``, ``stop_on_metric_drop``; :mod:`~lightning_oto.lightning.metric_guard`)
watches every validation of a fit from ``on_validation_end`` (it calls ``super()``, so a base class's
hook runs too; a subclass that overrides it calls ``super().on_validation_end()``), prints a drop beyond
the allowance once and can stop the fit; its state rides in checkpoints.  ``compression_report`` holds
``metric_guard``, ``degraded`` and, with ``measure_speed`` (default True), ``speed``: the sub-network
timed against the full model at batch 1 and the training batch size, next to the FLOP reduction.

Add :class:`OTOCallback` as well to get progress logging and the export at fit end; it reuses this
module's OTO and optimizer.  After :meth:`swap_in_compressed` (or the callback's ``swap_subnet``),
checkpoints reload with ``load_from_checkpoint`` and ``Trainer(ckpt_path=...)``: the module then trains
its sub-network with the base optimizer, without a new search.
"""
from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Any, Iterable

from torch import nn

from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from ..graph.inputs import describe, input_tensors
from ..optim import HalfSpaceOptimizer
from ..optim.factory import build_optimizer, trainable_named_params
from ..oto import OTO
from ..subnet.timing import loader_batch_size, run_speed_report
from ..subnet.verify import DEFAULT_ATOL, DEFAULT_RTOL
from .checkpointing import CHECKPOINT_KEY, apply_subnet_payload, subnet_payload
from .metric_guard import MetricGuard, guard_validation
from .network import install_subnet, resolve_example_inputs, resolve_network, to_device
from .settings import OTOSettings, planned_steps, steps_per_epoch

__all__ = ["OTOMixin"]

#: the OTOSettings fields a LightningModule's hparams may set (the rest concern the callback's output)
HPARAM_SETTINGS = (
    "mode", "optimizer", "target_group_sparsity", "lr", "variant", "momentum", "nesterov", "betas", "eps",
    "weight_decay", "warmup_steps", "warmup_epochs", "projection_steps", "projection_epochs", "pruning_periods",
    "saliency", "saliency_ema", "epsilon", "lambda_scale", "descent_margin", "erase_ablation", "network_attr",
    "ignored_layers", "max_group_sparsity", "round_to", "dynamic_shapes", "budget", "min_width", "cost_weight",
    "monitor", "max_metric_drop", "stop_on_metric_drop", "measure_speed",
)
#: the checkpoint entry that carries the accuracy guard's state (dense reference, phases, first drop)
GUARD_CHECKPOINT_KEY = "lightning_oto_metric_guard"
_FIELD_DEFAULTS = {f.name: f.default for f in dataclasses.fields(OTOSettings)}


class OTOMixin:
    """Mix into a LightningModule (listed before ``L.LightningModule``) to train it with DHSPG/H2SPG."""

    _oto: OTO | None = None
    _oto_optimizer: HalfSpaceOptimizer | None = None
    _oto_subnet_payload: dict[str, Any] | None = None
    _oto_guard: MetricGuard | None = None
    _oto_guard_resumed = False  # restored from a checkpoint: the next search keeps its dense reference

    # ------------------------------------------------------------------ settings
    def oto_hparam(self, name: str) -> Any:
        """``hparams.oto_<name>``, else ``hparams.<name>``, else the :class:`OTOSettings` default."""
        hp = getattr(self, "hparams", None) or {}
        for key in (f"oto_{name}", name):
            if key in hp and hp[key] is not None:
                return hp[key]
        return _FIELD_DEFAULTS[name]

    def oto_settings(self, **overrides: Any) -> OTOSettings:
        """The settings from hparams (``overrides`` win), validated."""
        values = {k: overrides[k] if k in overrides else self.oto_hparam(k) for k in HPARAM_SETTINGS}
        return OTOSettings(**values)

    def _oto_trainer(self) -> Any:
        try:
            return self.trainer  # type: ignore[attr-defined]
        except RuntimeError:  # not attached to a Trainer
            return None

    @property
    def oto_network(self) -> nn.Module:
        """The module being compressed (``hparams.network_attr`` or the LightningModule itself)."""
        return resolve_network(self, self.oto_hparam("network_attr"))  # type: ignore[arg-type]

    @property
    def oto(self) -> OTO:
        """The search space, traced on first use from ``example_input_array`` (else a training batch)."""
        if self._oto is None:
            settings = self.oto_settings()
            net = self.oto_network
            who = f"{type(self).__name__} (OTOMixin)"
            x, source = resolve_example_inputs(self, None, who, self._oto_trainer(), net)
            if source == "a training batch":
                rank_zero_info(f"[lightning_oto] {who}: no example_input_array; tracing with {source}, input "
                               f"shape(s) {describe(x)}.")
            self._oto = OTO(net, to_device(x, net), mode=settings.mode, **settings.oto_kwargs())
        return self._oto

    def oto_optimizer(self, **overrides: Any) -> HalfSpaceOptimizer:
        """DHSPG / H2SPG over this module's search space, from hparams (``overrides`` win).

        A module holding a sub-network loaded from a checkpoint gets the same optimizer over no groups:
        plain SGD/Adam(W) training of the sub-network, no new search.
        """
        s = self.oto_settings(**overrides)
        named_extra = list(self.parameters())  # type: ignore[attr-defined]
        if self._oto_subnet_payload is not None:
            named = trainable_named_params(self.oto_network, named_extra)
            opt = build_optimizer(s.optimizer, named, [], mode=s.mode, erase_ablation=s.erase_ablation,
                                  **s.base_hparams(), target_group_sparsity=0.0, warmup_steps=0, projection_steps=0)
            self._oto_optimizer = opt
            return opt
        oto = self.oto
        trainer = self._oto_trainer()
        need_epochs = s.warmup_epochs is not None or s.projection_epochs is not None
        spe = steps_per_epoch(trainer) if need_epochs and trainer is not None else None
        phases = s.phase_lengths(spe, planned_steps(trainer))
        if phases.note:
            rank_zero_warn(f"OTOMixin: {phases.note}")
        if not self._oto_guard_resumed:
            self._oto_guard = None  # a new search: a new dense reference
        self._oto_guard_resumed = False
        named = trainable_named_params(oto.model, named_extra)
        opt = oto.build_optimizer(s.optimizer, named, erase_ablation=s.erase_ablation, **s.base_hparams(),
                                  **s.search_hparams(), target_group_sparsity=s.target_group_sparsity,
                                  budget=s.budget, warmup_steps=phases.warmup_steps,
                                  projection_steps=phases.projection_steps)
        self._oto_optimizer = opt
        return opt

    def configure_optimizers(self) -> Any:
        """The OTO optimizer built from ``self.hparams`` (override and call ``oto_optimizer()`` to add a scheduler)."""
        return self.oto_optimizer()

    # ------------------------------------------------------------------ results
    def construct_compressed(self, verify: bool = True, atol: float = DEFAULT_ATOL, rtol: float = DEFAULT_RTOL) -> nn.Module:
        """The physically smaller sub-network for the groups that are zero now (verified against the full one)."""
        oto = self.oto
        oto.example_inputs = to_device(oto.example_inputs, oto.model)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="construct_subnet: no group is zero yet")
            return oto.construct_subnet(verify=verify, atol=atol, rtol=rtol)

    @property
    def compression_report(self) -> dict[str, Any]:
        """Params / FLOPs of the full network vs the sub-network it compresses to right now, the accuracy
        guard's record and (``measure_speed`` setting) the measured speed: :meth:`oto_compression_report`."""
        return self.oto_compression_report()

    def oto_compression_report(self, speed: bool | None = None) -> dict[str, Any]:
        """The compression report; ``speed``: time the sub-network against the full model (None: the
        ``measure_speed`` setting, True by default as for :class:`OTOCallback`)."""
        if speed is not None and not isinstance(speed, bool):
            raise ValueError(f"speed must be True, False or None (the measure_speed setting), got {speed!r}.")
        measure = self.oto_settings().measure_speed if speed is None else speed
        oto = self.oto
        sub = self.construct_compressed()
        rep = dict(oto.compression_report(sub))
        rep["verification_max_abs_error"] = getattr(sub, "oto_verification_error", None)
        rep["removed_groups"] = [{"id": g, "name": oto.groups[g].name} for g in oto.zero_group_ids()]
        rep["mode"] = oto.mode
        rep.update(self.oto_guard.report())
        rep["speed"] = self._oto_speed(sub, rep.get("flops_full"), rep.get("flops_sub")) if measure else None
        return rep

    def _oto_speed(self, sub: nn.Module, flops_full: int | None, flops_sub: int | None) -> dict[str, Any] | None:
        """Sub-network vs full model at batch 1 and the training batch size (the example input's when no
        training loader is known); a failed timing is said and leaves ``None``."""
        oto = self.oto
        trainer = self._oto_trainer()
        train_batch = loader_batch_size(getattr(trainer, "train_dataloader", None)) if trainer is not None else None
        if train_batch is None:
            first = next((t for t in input_tensors(oto.example_inputs) if t.dim() > 0), None)
            train_batch = None if first is None else int(first.shape[0])
        try:
            full = oto.model
            return run_speed_report(full, sub, to_device(oto.example_inputs, full), train_batch, flops_full,
                                    flops_sub)
        except Exception as e:  # noqa: BLE001 - a timing must not cost the user the rest of the report
            rank_zero_warn(f"OTOMixin: speed measurement skipped: {e}")
            return None

    # ------------------------------------------------------------------ the accuracy guard
    @property
    def oto_guard(self) -> MetricGuard:
        """The accuracy guard of the current search (settings ``monitor`` and ``max_metric_drop``); when an
        :class:`OTOCallback` drives the fit, the callback's guard (one record, one announcement)."""
        cb = self._oto_callback()
        return cb.metric_guard if cb is not None else self._oto_own_guard()

    def _oto_own_guard(self) -> MetricGuard:
        if self._oto_guard is None:
            s = self.oto_settings()
            self._oto_guard = MetricGuard(s.monitor, s.max_metric_drop)
        return self._oto_guard

    def _oto_callback(self) -> Any:
        """The OTOCallback of this module's trainer, if any: it then watches and reports the search.  Found by
        the guard it carries (the callback imports this module, so this module does not import it)."""
        trainer = self._oto_trainer()
        callbacks = getattr(trainer, "callbacks", None) or []
        return next((cb for cb in callbacks if isinstance(getattr(cb, "metric_guard", None), MetricGuard)), None)

    def on_validation_end(self) -> None:
        """Watch each validation of a fit as :class:`OTOCallback` does (the user's hook still runs)."""
        self._oto_guard_validation()
        super().on_validation_end()  # type: ignore[misc]

    def _oto_guard_validation(self) -> None:
        trainer = self._oto_trainer()
        opt = self._oto_optimizer
        if trainer is None or opt is None or self._oto_subnet_payload is not None:
            return  # no search running (or a compressed sub-network training on)
        if trainer.state.fn != "fit" or trainer.sanity_checking or self._oto_callback() is not None:
            return  # with an OTOCallback, the callback watches the same search
        who = f"{type(self).__name__} (OTOMixin)"
        if guard_validation(self._oto_own_guard(), trainer, opt, self.oto_settings().stop_on_metric_drop, who):
            rank_zero_info(f"[lightning_oto] {who}: stop_on_metric_drop: stopping the fit.")

    def export_compressed(self, out_dir: str | Path, formats: Iterable[str] = ("torch", "onnx")) -> dict[str, str]:
        """Construct, verify and export the sub-network (torch.export program and/or ONNX)."""
        return self.oto.export(self.construct_compressed(), out_dir, formats=tuple(formats))

    def swap_in_compressed(self) -> nn.Module:
        """Replace the compressed network by its verified sub-network; returns the full one.

        Checkpoints saved afterwards carry what rebuilds the sub-network, so ``load_from_checkpoint`` works.
        """
        attr = self.oto_hparam("network_attr")
        if self.oto.mode == "erase" and attr is None:
            raise ValueError("swap_in_compressed in erase mode needs hparams.network_attr: the erased sub-network is "
                             "a GraphModule that replaces a submodule (the LightningModule itself cannot be replaced).")
        sub = self.construct_compressed()
        payload = subnet_payload(self.oto, self.oto.zero_group_ids(), attr, sub)
        full = install_subnet(self, attr, sub)  # type: ignore[arg-type]
        self.oto_mark_compressed(payload)
        return full

    def oto_mark_compressed(self, payload: dict[str, Any]) -> None:
        """Remember that this module now holds the sub-network ``payload`` describes (saved with checkpoints)."""
        self._oto_subnet_payload = payload
        self._oto_reset()

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """After the swap: store what rebuilds the sub-network; the search optimizer's state (over the full
        network's tensors) is dropped until an optimizer over the sub-network exists.  The accuracy guard's
        state is stored always (a resumed fit keeps its dense reference)."""
        if self._oto_subnet_payload is not None:
            checkpoint[CHECKPOINT_KEY] = self._oto_subnet_payload
            if self._oto_optimizer is None and "optimizer_states" in checkpoint:
                checkpoint["optimizer_states"] = []
        if self._oto_guard is not None:
            checkpoint[GUARD_CHECKPOINT_KEY] = self._oto_guard.state()
        super().on_save_checkpoint(checkpoint)  # type: ignore[misc]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """A checkpoint of the sub-network: rebuild its structure before Lightning loads the weights."""
        payload = checkpoint.get(CHECKPOINT_KEY)
        if payload is not None:
            apply_subnet_payload(self, payload, checkpoint.get("state_dict"))  # type: ignore[arg-type]
            self.oto_mark_compressed(payload)
        if checkpoint.get(GUARD_CHECKPOINT_KEY):
            self._oto_guard = None
            self._oto_own_guard().restore(checkpoint[GUARD_CHECKPOINT_KEY])
            self._oto_guard_resumed = True
        super().on_load_checkpoint(checkpoint)  # type: ignore[misc]

    def __getstate__(self) -> dict[str, Any]:
        # copies (construct_subnet deep-copies the module when it compresses itself) and pickles must not
        # drag the traced program and the optimizer along
        state = super().__getstate__() if hasattr(super(), "__getstate__") else dict(self.__dict__)
        state = dict(state)
        state.pop("_oto", None)
        state.pop("_oto_optimizer", None)
        return state

    def _oto_reset(self) -> None:
        """Forget the traced search space (e.g. after the network was replaced)."""
        self._oto = None
        self._oto_optimizer = None
