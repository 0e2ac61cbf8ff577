"""`OTOMixin`: OTO inside a LightningModule (``configure_optimizers`` from ``self.hparams``).

Use it when you prefer the module to own the compression settings::

    class Net(OTOMixin, L.LightningModule):
        def __init__(self, lr=0.1, target_group_sparsity=0.5, oto_mode="prune", warmup_steps=50,
                     projection_steps=50):
            super().__init__()
            self.save_hyperparameters()
            self.net = ...
            self.example_input_array = torch.randn(1, 3, 32, 32)

The search space is traced lazily (first use of ``self.oto``: normally in ``configure_optimizers``,
after Lightning moved the module to its device).  Recognized hparams (an ``oto_`` prefixed name wins
over the plain one): ``oto_mode`` (``"prune"``), ``oto_optimizer``, ``target_group_sparsity``,
``lr``, ``variant``, ``momentum``, ``nesterov``, ``betas``, ``eps``, ``weight_decay``,
``warmup_steps``, ``projection_steps``, ``pruning_periods``, ``saliency``, ``saliency_ema``,
``epsilon``, ``lambda_scale``, ``descent_margin``, ``network_attr``.
Add :class:`OTOCallback` as well to get progress logging and the export at fit end; it reuses this
module's OTO and optimizer.
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any, Iterable

from torch import nn

from ..oto import OTO
from ..optim import HalfSpaceOptimizer
from ..subnet.verify import DEFAULT_ATOL, DEFAULT_RTOL
from . import _common as C

__all__ = ["OTOMixin"]

_DEFAULTS: dict[str, Any] = {
    "mode": "prune", "optimizer": None, "target_group_sparsity": 0.5, "lr": 0.1, "variant": "sgd",
    "momentum": 0.9, "nesterov": False, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0,
    "warmup_steps": None, "projection_steps": None, "pruning_periods": 1, "saliency": "default",
    "saliency_ema": 0.9, "epsilon": 0.0, "lambda_scale": 1.0, "descent_margin": 0.1, "network_attr": None,
}


class OTOMixin:
    """Mix into a LightningModule (listed before ``L.LightningModule``) to train it with DHSPG/H2SPG."""

    _oto: OTO | None = None
    _oto_optimizer: HalfSpaceOptimizer | None = None

    # ------------------------------------------------------------------ settings
    def oto_hparam(self, name: str) -> Any:
        """``hparams.oto_<name>``, else ``hparams.<name>``, else the default (see the module docstring)."""
        hp = getattr(self, "hparams", None) or {}
        for key in (f"oto_{name}", name):
            if key in hp and hp[key] is not None:
                return hp[key]
        return _DEFAULTS[name]

    @property
    def oto_network(self) -> nn.Module:
        """The module being compressed (``hparams.network_attr`` or the LightningModule itself)."""
        return C.resolve_network(self, self.oto_hparam("network_attr"))  # type: ignore[arg-type]

    @property
    def oto(self) -> OTO:
        """The search space, traced on first use from ``example_input_array``."""
        if self._oto is None:
            net = self.oto_network
            x = C.resolve_example_inputs(self, None, f"{type(self).__name__} (OTOMixin)")
            self._oto = OTO(net, C.to_device(x, net), mode=self.oto_hparam("mode"))
        return self._oto

    def _planned_steps(self) -> float:
        trainer = getattr(self, "_trainer", None)
        if trainer is None:
            return float("nan")
        try:
            return float(trainer.estimated_stepping_batches)
        except Exception:  # noqa: BLE001 - only a default is derived from it
            return float("nan")

    def oto_optimizer(self, **overrides: Any) -> HalfSpaceOptimizer:
        """DHSPG / H2SPG over this module's search space, from hparams (``overrides`` win)."""
        get = lambda k: overrides[k] if k in overrides else self.oto_hparam(k)  # noqa: E731
        mode = get("mode")
        name = C.check_mode_optimizer(mode, get("optimizer"))
        target = C.check_target(get("target_group_sparsity"))
        oto = self.oto
        warm, proj = get("warmup_steps"), get("projection_steps")
        if warm is None or proj is None:
            total = self._planned_steps()
            if not math.isfinite(total) or total <= 0:
                raise ValueError("OTOMixin: set hparams warmup_steps and projection_steps (the number of training "
                                 "steps is unknown here).")
            warm = int(round(C.DEFAULT_WARMUP_FRACTION * total)) if warm is None else warm
            proj = max(1, int(round(C.DEFAULT_PROJECTION_FRACTION * total))) if proj is None else proj
        settings = {k: get(k) for k in ("lr", "variant", "momentum", "nesterov", "betas", "eps", "weight_decay",
                                        "pruning_periods", "saliency", "saliency_ema", "epsilon", "lambda_scale",
                                        "descent_margin")}
        settings["betas"] = tuple(settings["betas"])
        if settings["variant"] != "sgd":
            settings["nesterov"] = False
        settings.update(target_group_sparsity=target, warmup_steps=int(warm), projection_steps=int(proj))
        named = [(n, p) for n, p in oto.model.named_parameters() if p.requires_grad]
        seen = {id(p) for _, p in named}
        extra = [p for p in self.parameters() if p.requires_grad and id(p) not in seen]  # type: ignore[attr-defined]
        named += [(f"<outside_network>.{i}", p) for i, p in enumerate(extra)]
        opt = C.build_half_space(name, named, oto.groups, oto.hierarchy_check, settings)
        self._oto_optimizer = opt
        return opt

    def configure_optimizers(self) -> Any:
        """The OTO optimizer built from ``self.hparams`` (override and call ``oto_optimizer()`` to add a scheduler)."""
        return self.oto_optimizer()

    # ------------------------------------------------------------------ results
    def construct_compressed(self, verify: bool = True, atol: float = DEFAULT_ATOL, rtol: float = DEFAULT_RTOL) -> nn.Module:
        """The physically smaller sub-network for the groups that are zero now (verified against the full one)."""
        oto = self.oto
        oto.example_inputs = C.to_device(oto.example_inputs, oto.model)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="construct_subnet: no group is zero yet")
            return oto.construct_subnet(verify=verify, atol=atol, rtol=rtol)

    @property
    def compression_report(self) -> dict[str, Any]:
        """Params / FLOPs of the full network vs the sub-network it compresses to right now."""
        oto = self.oto
        sub = self.construct_compressed()
        rep = dict(oto.compression_report(sub))
        rep["verification_max_abs_error"] = getattr(sub, "oto_verification_error", None)
        rep["removed_groups"] = [{"id": g, "name": oto.groups[g].name} for g in oto.zero_group_ids()]
        rep["mode"] = oto.mode
        return rep

    def export_compressed(self, out_dir: str | Path, formats: Iterable[str] = ("torch", "onnx")) -> dict[str, str]:
        """Construct, verify and export the sub-network (torch.export program and/or ONNX)."""
        return self.oto.export(self.construct_compressed(), out_dir, formats=tuple(formats))

    @staticmethod
    def load_compressed(path_or_dir: str | Path) -> nn.Module:
        """Load an exported sub-network (``subnet.pt2`` preferred, else ``subnet.onnx``); no pickled code."""
        return C.load_compressed(path_or_dir)

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
