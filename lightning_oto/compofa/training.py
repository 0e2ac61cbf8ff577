"""Sampled-subnet supernet training with distillation (Lightning), BN recalibration, phases.

Per optimizer step (paper Sec. 5.1): the frozen teacher's logits are computed once, ``n_sample``
random sub-networks of the current phase's design space each run forward+backward on the same
batch with ``CE + kd_ratio * T^2 * KL(teacher_T || student_T)``, gradients accumulate, and one
optimizer step follows.  Phases chain teacher training -> compound training (CompOFA) or
teacher -> elastic depth -> elastic width (OFA progressive shrinking) on the same supernet.
"""
from __future__ import annotations

import contextlib
import copy
import math
import random
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from .space import DesignSpace, SubnetConfig, SupernetConfig, full_config
from .supernet import CompOFASupernet


def resize_to(x: torch.Tensor, resolution: int) -> torch.Tensor:
    """Bilinear resize to ``resolution`` (elastic resolution); no-op when already that size."""
    if x.shape[-1] == resolution and x.shape[-2] == resolution:
        return x
    return F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Hinton distillation: ``T^2 * KL(softmax(t/T) || softmax(s/T))`` (batch mean)."""
    t = float(temperature)
    log_p = F.log_softmax(student_logits / t, dim=1)
    q = F.softmax(teacher_logits.detach() / t, dim=1)
    return F.kl_div(log_p, q, reduction="batchmean") * (t * t)


def frozen_teacher(supernet: CompOFASupernet) -> CompOFASupernet:
    """Deep copy of the supernet fixed to its largest network, eval mode, no gradients."""
    t = copy.deepcopy(supernet)
    t.set_max()
    t.eval()
    t.requires_grad_(False)
    return t


# ---------------------------------------------------------------------------------------
# BatchNorm recalibration and evaluation
# ---------------------------------------------------------------------------------------
def _batches(loader: Iterable, num_batches: int | None) -> Iterable:
    for i, batch in enumerate(loader):
        if num_batches is not None and i >= num_batches:
            break
        yield batch


@torch.no_grad()
def recalibrate_bn(
    model: nn.Module, config: SubnetConfig | None, loader: Iterable, num_batches: int | None = None
) -> int:
    """Replace the BN running stats of ``config``'s layers by exact stats over a fixed data subset.

    Why: running stats accumulated while many sub-networks shared the BN buffers describe none of
    them; every sub-network must be recalibrated before it is evaluated (OFA/CompOFA do the same).
    For a :class:`CompOFASupernet` only the active prefixes of the active layers are rewritten
    (other sub-networks' stats are left alone); for any other module (e.g. an extracted static
    network, ``config=None``) all BN layers are reset and re-estimated.  ``loader`` must yield
    ``(x, ...)`` batches in a fixed order for reproducible results.  Returns the number of BN
    layers updated.
    """
    was_training = model.training
    if isinstance(model, CompOFASupernet):
        cfg = config or model.active_config
        bns = model.elastic_bns()
        model.eval()
        for bn in bns:
            bn.start_calibration()
        ok = False
        try:
            with model.active(cfg):
                for batch in _batches(loader, num_batches):
                    model(resize_to(batch[0], cfg.resolution))
            ok = True
        finally:
            if ok:
                updated = sum(int(bn.finish_calibration()) for bn in bns)
            else:
                for bn in bns:
                    bn._calib = None
            model.train(was_training)
        return updated
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(bn, bn.momentum) for bn in bns]
    model.eval()
    try:
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average over the subset
            bn.train()
        for batch in _batches(loader, num_batches):
            x = batch[0]
            if config is not None:
                x = resize_to(x, config.resolution)
            model(x)
    finally:
        for bn, m in saved:
            bn.momentum = m
        model.train(was_training)
    return len(bns)


@torch.no_grad()
def evaluate_accuracy(
    model: nn.Module, config: SubnetConfig | None, loader: Iterable, num_batches: int | None = None
) -> float:
    """Top-1 accuracy (eval mode) of ``config`` (active on a supernet) over ``loader``."""
    was_training = model.training
    model.eval()
    correct = total = 0
    use_cfg = isinstance(model, CompOFASupernet) and config is not None
    try:
        with model.active(config) if use_cfg else contextlib.nullcontext():  # type: ignore[union-attr]
            for x, y, *_ in _batches(loader, num_batches):
                if config is not None:
                    x = resize_to(x, config.resolution)
                pred = model(x).argmax(1)
                correct += int((pred == y).sum())
                total += int(y.numel())
    finally:
        model.train(was_training)
    return correct / max(total, 1)


class AccuracyEvaluator:
    """``config -> val accuracy`` after BN recalibration, memoized by the architecture key.

    (The paper uses an accuracy predictor; with 243 networks measuring is affordable.)
    """

    def __init__(
        self,
        supernet: CompOFASupernet,
        calib_loader: Iterable,
        val_loader: Iterable,
        calib_batches: int | None = 4,
        val_batches: int | None = None,
    ) -> None:
        self.supernet = supernet
        self.calib_loader, self.val_loader = calib_loader, val_loader
        self.calib_batches, self.val_batches = calib_batches, val_batches
        self.cache: dict[str, float] = {}
        self.evaluations = 0
        self.eval_time_s = 0.0

    def __call__(self, cfg: SubnetConfig) -> float:
        key = cfg.key()
        if key not in self.cache:
            t0 = time.perf_counter()
            recalibrate_bn(self.supernet, cfg, self.calib_loader, self.calib_batches)
            self.cache[key] = evaluate_accuracy(self.supernet, cfg, self.val_loader, self.val_batches)
            self.evaluations += 1
            self.eval_time_s += time.perf_counter() - t0
        return self.cache[key]


# ---------------------------------------------------------------------------------------
# Lightning module
# ---------------------------------------------------------------------------------------
class CompOFAModule(L.LightningModule):
    """Trains a :class:`CompOFASupernet` by sampling ``n_sample`` sub-networks of ``space`` per step.

    ``teacher``: a frozen network producing soft labels (e.g. :func:`frozen_teacher`), ``"inplace"``
    to use the supernet's own largest network under ``no_grad``, or ``None`` for plain CE (the
    teacher phase).  Manual optimization: gradients of all samples accumulate before one step.
    """

    def __init__(
        self,
        supernet: CompOFASupernet,
        space: DesignSpace,
        teacher: nn.Module | str | None = None,
        n_sample: int = 4,
        lr: float = 0.05,
        momentum: float = 0.9,
        weight_decay: float = 3e-5,
        kd_ratio: float = 1.0,
        kd_temperature: float = 1.0,
        warmup_steps: int = 0,
        grad_clip: float | None = 5.0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.supernet = supernet
        self.space = space
        self.inplace_teacher = teacher == "inplace"
        self.teacher = teacher if isinstance(teacher, nn.Module) else None
        if self.teacher is not None:
            self.teacher.requires_grad_(False)
            self.teacher.eval()
        self.n_sample = int(n_sample)
        if self.n_sample < 1:
            raise ValueError("n_sample must be >= 1")
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.kd_ratio, self.kd_temperature = kd_ratio, kd_temperature
        self.warmup_steps, self.grad_clip, self.seed = warmup_steps, grad_clip, seed
        self.loss_history: list[float] = []
        self.sampled_subnets = 0
        self.step_time_s = 0.0  # time inside training_step (excludes Lightning's loop overhead)

    @property
    def distill(self) -> bool:
        return self.teacher is not None or self.inplace_teacher

    def train(self, mode: bool = True) -> "CompOFAModule":
        """Keep the teacher in eval mode whatever Lightning does to the rest."""
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.supernet(x)

    def _teacher_logits(self, x: torch.Tensor) -> torch.Tensor | None:
        if self.teacher is not None:
            with torch.no_grad():
                return self.teacher(x)
        if self.inplace_teacher:
            with torch.no_grad(), self.supernet.active(full_config(self.supernet.cfg, x.shape[-1])):
                return self.supernet(x)
        return None

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        t_step = time.perf_counter()
        x, y = batch[0], batch[1]
        opt = self.optimizers()
        opt.zero_grad(set_to_none=True)
        soft = self._teacher_logits(x)
        rng = random.Random(self.seed * 1_000_003 + self.global_step)
        total = torch.zeros((), device=x.device)
        for _ in range(self.n_sample):
            cfg = self.space.sample(rng)
            self.supernet.set_active(cfg)
            xi = resize_to(x, cfg.resolution)
            logits = self.supernet(xi)
            loss = F.cross_entropy(logits, y)
            if soft is not None:
                t_logits = soft if xi.shape[-1] == x.shape[-1] else self._teacher_logits(xi)
                loss = loss + self.kd_ratio * kd_loss(logits, t_logits, self.kd_temperature)
            self.manual_backward(loss / self.n_sample)
            total = total + loss.detach()
            self.sampled_subnets += 1
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.supernet.parameters(), self.grad_clip)
        opt.step()
        sch = self.lr_schedulers()
        if sch is not None:
            sch.step()
        self.supernet.set_max()
        mean = total / self.n_sample
        self.loss_history.append(float(mean))
        self.step_time_s += time.perf_counter() - t_step
        self.log("train_loss", mean, on_step=True, on_epoch=False, prog_bar=False, batch_size=x.shape[0])
        return mean

    def configure_optimizers(self) -> Any:
        decay, no_decay = [], []
        for name, p in self.supernet.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim <= 1 else decay).append(p)  # OFA: no decay on BN and biases
        opt = torch.optim.SGD(
            [{"params": decay, "weight_decay": self.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.lr,
            momentum=self.momentum,
            nesterov=self.momentum > 0,
        )
        total = max(1, int(self.trainer.estimated_stepping_batches)) if self._trainer is not None else 1000
        warm = self.warmup_steps

        def factor(step: int) -> float:
            if warm and step < warm:
                return (step + 1) / warm
            prog = min(1.0, (step - warm) / max(1, total - warm))
            return 0.5 * (1.0 + math.cos(math.pi * prog))

        sch = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sch, "interval": "step"}}


# ---------------------------------------------------------------------------------------
# Phases
# ---------------------------------------------------------------------------------------
@dataclass
class PhaseSpec:
    """One training phase: which sub-networks are sampled, how many per step, for how long."""

    name: str
    space: DesignSpace
    n_sample: int
    epochs: int
    lr: float
    distill: bool = True
    reorder_before: bool = False
    max_steps: int = -1

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "n_sample": self.n_sample,
            "epochs": self.epochs,
            "lr": self.lr,
            "distill": self.distill,
            "reorder_before": self.reorder_before,
            "max_steps": self.max_steps,
            **{k: v for k, v in self.space.describe().items() if k != "resolutions"},
        }


def teacher_space(cfg: SupernetConfig) -> DesignSpace:
    """Space holding only the largest network (the teacher phase trains just it)."""
    return DesignSpace(
        cfg,
        coupled=True,
        depth_choices=[cfg.max_depth],
        expand_choices=[cfg.max_expand],
        kernel_choices=[max(cfg.kernel_choices)] if cfg.kernel_choices else None,
    )


def compofa_phases(
    cfg: SupernetConfig,
    teacher_epochs: int = 4,
    warmup_epochs: int = 1,
    epochs: int = 3,
    teacher_lr: float = 0.1,
    warmup_lr: float = 0.02,
    lr: float = 0.05,
    n_sample: int = 4,
    elastic_kernel: bool = False,
) -> list[PhaseSpec]:
    """Paper Table 1(b): teacher (D=4, W=6) then compound training in two runs (25 + 125 epochs)."""
    space = DesignSpace.compound(cfg, elastic_kernel=elastic_kernel)
    phases = [PhaseSpec("teacher", teacher_space(cfg), 1, teacher_epochs, teacher_lr, distill=False)]
    if warmup_epochs > 0:
        phases.append(PhaseSpec("compound-1", space, n_sample, warmup_epochs, warmup_lr, reorder_before=True))
    phases.append(PhaseSpec("compound-2", space, n_sample, epochs, lr, reorder_before=warmup_epochs <= 0))
    return phases


def progressive_shrinking_phases(
    cfg: SupernetConfig,
    teacher_epochs: int = 4,
    short_epochs: int = 1,
    long_epochs: int = 3,
    teacher_lr: float = 0.1,
    short_lr: float = 0.02,
    long_lr: float = 0.05,
    elastic_kernel: bool = False,
) -> list[PhaseSpec]:
    """Paper Table 1(a) (OFA): teacher, [elastic kernel], depth-1/2 (n=2), width-1/2 (n=4).

    Phases sample from the uncoupled OFA space restricted to the choices unlocked so far; width
    phases start with the importance reordering (OFA re-sorts channels before each width phase).
    """
    d_all = sorted(cfg.depth_choices)
    w_all = sorted(cfg.expand_choices)
    k = (cfg.kernel_choices or [3, 5, 7]) if elastic_kernel else None
    phases = [PhaseSpec("teacher", teacher_space(cfg), 1, teacher_epochs, teacher_lr, distill=False)]
    if elastic_kernel:
        sp = DesignSpace(cfg, coupled=False, depth_choices=[d_all[-1]], expand_choices=[w_all[-1]], kernel_choices=k)
        phases.append(PhaseSpec("elastic-kernel", sp, 1, long_epochs, long_lr))

    def sp(d: Sequence[int], w: Sequence[int]) -> DesignSpace:
        return DesignSpace(cfg, coupled=False, depth_choices=d, expand_choices=w, kernel_choices=k)

    phases += [
        PhaseSpec("depth-1", sp(d_all[-2:], w_all[-1:]), 2, short_epochs, short_lr),
        PhaseSpec("depth-2", sp(d_all, w_all[-1:]), 2, long_epochs, long_lr),
        PhaseSpec("width-1", sp(d_all, w_all[-2:]), 4, short_epochs, short_lr, reorder_before=True),
        PhaseSpec("width-2", sp(d_all, w_all), 4, long_epochs, long_lr, reorder_before=True),
    ]
    return [p for p in phases if p.epochs > 0 or p.max_steps > 0]


#: a phase's Trainer is quiet: no logger, checkpoints, progress bar or summary (whatever the config says)
_PHASE_QUIET: dict[str, Any] = {"logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
                                "enable_model_summary": False, "num_sanity_val_steps": 0}
#: defaults a configuration may override (accelerator, devices, strategy, precision, ...)
_PHASE_DEFAULTS: dict[str, Any] = {"accelerator": "auto", "devices": 1}
#: keys of a full Trainer config that the phases set themselves
_PHASE_OWNED = ("max_epochs", "max_steps", "callbacks", "default_root_dir", "log_every_n_steps", "_target_")


def make_trainer(epochs: int, max_steps: int = -1, **kw: Any) -> L.Trainer:
    """The Trainer of one phase: ``kw`` (e.g. a Hydra trainer config's accelerator, devices, strategy,
    precision) over the defaults; the phase sets its own length and stays quiet."""
    settings = {**_PHASE_DEFAULTS, **{k: v for k, v in kw.items() if k not in _PHASE_OWNED}, **_PHASE_QUIET}
    return L.Trainer(max_epochs=max(1, epochs) if max_steps <= 0 else None, max_steps=max_steps, **settings)


def _fit_phase(module: "CompOFAModule", ph: PhaseSpec, train_loader: Iterable,
               trainer_kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
    """Fit one phase; its record (wall time, steps, sampled sub-networks, first and last loss)."""
    trainer = make_trainer(ph.epochs, ph.max_steps, **dict(trainer_kwargs or {}))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*number of training batches.*")
        warnings.filterwarnings("ignore", ".*module\\(s\\) in eval mode.*")  # the frozen teacher
        t0 = time.perf_counter()
        trainer.fit(module, train_dataloaders=train_loader)
        wall = time.perf_counter() - t0
    return {
        **ph.describe(),
        "wall_time_s": wall,
        "step_time_s": module.step_time_s,
        "steps": int(trainer.global_step),
        "sampled_subnets": module.sampled_subnets,
        "first_loss": module.loss_history[0] if module.loss_history else float("nan"),
        "last_loss": module.loss_history[-1] if module.loss_history else float("nan"),
    }


@dataclass
class TrainResult:
    """Per-phase records (wall time, steps, sampled sub-networks, losses) and the teacher used."""

    phases: list[dict[str, Any]] = field(default_factory=list)
    teacher: nn.Module | None = None

    @property
    def wall_time_s(self) -> float:
        return sum(p["wall_time_s"] for p in self.phases)

    @property
    def step_time_s(self) -> float:
        return sum(p["step_time_s"] for p in self.phases)

    def time_excluding(self, *names: str) -> float:
        return sum(p["wall_time_s"] for p in self.phases if p["name"] not in names)


def train_phases(
    supernet: CompOFASupernet,
    phases: Sequence[PhaseSpec],
    train_loader: Iterable,
    teacher: nn.Module | str | None = None,
    kd_ratio: float = 1.0,
    kd_temperature: float = 1.0,
    momentum: float = 0.9,
    weight_decay: float = 3e-5,
    seed: int = 0,
    on_phase_end: Callable[[PhaseSpec, dict[str, Any]], None] | None = None,
    trainer_kwargs: Mapping[str, Any] | None = None,
) -> TrainResult:
    """Run ``phases`` in order on ``supernet`` (each a fresh optimizer + cosine schedule).

    The teacher for distilling phases is ``teacher`` if given, else a frozen copy of the supernet
    taken when the first distilling phase starts (i.e. right after the teacher phase).
    ``trainer_kwargs`` configure every phase's Trainer (see :func:`make_trainer`).
    """
    result = TrainResult(teacher=teacher if isinstance(teacher, nn.Module) else None)
    for i, ph in enumerate(phases):
        if ph.reorder_before:
            supernet.reorder_channels_by_importance()
        t_arg: nn.Module | str | None = None
        if ph.distill:
            if teacher == "inplace":
                t_arg = "inplace"
            else:
                if result.teacher is None:
                    result.teacher = frozen_teacher(supernet)
                t_arg = result.teacher
        module = CompOFAModule(
            supernet,
            ph.space,
            teacher=t_arg,
            n_sample=ph.n_sample,
            lr=ph.lr,
            momentum=momentum,
            weight_decay=weight_decay,
            kd_ratio=kd_ratio,
            kd_temperature=kd_temperature,
            seed=seed * 7919 + i,
        )
        rec = _fit_phase(module, ph, train_loader, trainer_kwargs)
        result.phases.append(rec)
        if on_phase_end is not None:
            on_phase_end(ph, rec)
    supernet.set_max()
    return result
