"""Helpers shared by :class:`OTOCallback` and :class:`OTOMixin` (no Lightning hooks in here)."""
from __future__ import annotations

import functools
import hashlib
import json
import math
import warnings
import weakref
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from ..optim import DHSPG, H2SPG, HESSO, HalfSpaceOptimizer
from ..space.groups import Group

#: ``oto/phase`` as logged: the optimizer's phase name -> number.
PHASE_CODES: dict[str, int] = {"warmup": 0, "projection": 1, "hybrid": 2}

OPTIMIZERS: dict[str, type[HalfSpaceOptimizer]] = {"dhspg": DHSPG, "h2spg": H2SPG, "hesso": HESSO}
DEFAULT_OPTIMIZER = {"prune": "dhspg", "erase": "h2spg"}
#: which optimizers make sense for which mode (H2SPG needs the erase hierarchy check; DHSPG on an
#: erase space may disconnect the network, see the erasing paper's Table 4)
ALLOWED_OPTIMIZERS = {"prune": ("dhspg", "hesso"), "erase": ("h2spg",)}

#: fraction of the estimated optimizer steps used when no warm-up / projection length is given
DEFAULT_WARMUP_FRACTION = 0.2
DEFAULT_PROJECTION_FRACTION = 0.3

_BASE_KEYS = ("lr", "variant", "momentum", "nesterov", "betas", "eps", "weight_decay")


def check_target(target: Any) -> float:
    """Validate ``target_group_sparsity`` early (before any tracing) with a readable message."""
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not (0.0 <= float(target) < 1.0):
        raise ValueError(f"target_group_sparsity must be a number in [0, 1), got {target!r}.")
    return float(target)


def check_mode_optimizer(mode: str, optimizer: str | None, erase_ablation: bool = False) -> str:
    """Resolve the optimizer name for ``mode`` and reject mismatches (e.g. DHSPG in erase mode).

    ``erase_ablation`` admits DHSPG on the erase search space (no hierarchy check) for the erasing
    paper's Table 4; construction then reports an invalid sub-network instead of building one.
    """
    if mode not in DEFAULT_OPTIMIZER:
        raise ValueError(f"mode must be 'prune' or 'erase', got {mode!r}.")
    name = DEFAULT_OPTIMIZER[mode] if optimizer is None else str(optimizer).lower()
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {sorted(OPTIMIZERS)}, got {optimizer!r}.")
    if erase_ablation and mode == "erase" and name == "dhspg":
        return name
    if name not in ALLOWED_OPTIMIZERS[mode]:
        hint = ("erase mode needs H2SPG, whose hierarchy check keeps the network connected (erase_ablation=True "
                "runs DHSPG without it, for the Table 4 ablation)"
                if mode == "erase" else "H2SPG works on the erase-mode search space; use mode='erase'")
        raise ValueError(f"optimizer {name!r} does not fit mode {mode!r}: {hint}.")
    return name


def get_attr_path(obj: Any, path: str) -> Any:
    """``getattr`` over a dotted path (``"model.backbone"``) with an error naming the missing part."""
    cur = obj
    for part in path.split("."):
        if not hasattr(cur, part):
            raise AttributeError(
                f"network_attr={path!r}: {type(cur).__name__} has no attribute {part!r}; network_attr must name "
                "the nn.Module to compress inside the LightningModule (e.g. network_attr='net').")
        cur = getattr(cur, part)
    return cur


def set_attr_path(obj: Any, path: str, value: Any) -> None:
    """Set ``obj.<dotted path> = value`` (used to swap the network for its sub-network)."""
    *parents, last = path.split(".")
    for part in parents:
        obj = getattr(obj, part)
    setattr(obj, last, value)


def resolve_network(pl_module: nn.Module, network_attr: str | None) -> nn.Module:
    """The module to compress: ``pl_module.<network_attr>`` or the LightningModule itself."""
    net = pl_module if network_attr is None else get_attr_path(pl_module, network_attr)
    if not isinstance(net, nn.Module):
        raise TypeError(f"network_attr={network_attr!r} is a {type(net).__name__}, not a torch.nn.Module.")
    return net


def resolve_example_inputs(pl_module: Any, example_inputs: Any, who: str) -> tuple[torch.Tensor, ...]:
    """Example inputs from the argument or ``pl_module.example_input_array``; a clear error if neither."""
    x = example_inputs
    if x is None:
        x = getattr(pl_module, "example_input_array", None)
    if x is None:
        raise ValueError(
            f"{who} needs an example input to trace the network: set `self.example_input_array = "
            f"torch.randn(1, C, H, W)` in your LightningModule's __init__, or pass example_inputs=... .")
    if isinstance(x, torch.Tensor):
        x = (x,)
    elif isinstance(x, list):
        x = tuple(x)
    if not isinstance(x, tuple) or not x or not all(isinstance(t, torch.Tensor) for t in x):
        raise TypeError(
            f"{who}: the example input must be a tensor or a tuple of tensors (dict inputs are not supported), got "
            f"{type(x).__name__}.")
    return x


def to_device(inputs: Sequence[torch.Tensor], module: nn.Module) -> tuple[torch.Tensor, ...]:
    """Move example inputs to where ``module``'s parameters are (Lightning moves modules around)."""
    dev = next((p.device for p in module.parameters()), None)
    if dev is None:
        dev = next((b.device for b in module.buffers()), torch.device("cpu"))
    return tuple(t.to(dev) for t in inputs)


def space_hash(groups: Sequence[Group], mode: str) -> str:
    """Identity of a search space (group names, sizes, prunability): a resumed run must see the same one."""
    desc = [mode]
    for g in groups:
        desc.append([g.id, g.name, bool(g.prunable),
                     [[s.name, s.dim, None if s.indices is None else len(s.indices)] for s in g.slices]])
    return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:16]


def removed_params(groups: Sequence[Group], zero_ids: Iterable[int], param_shapes: dict[str, tuple[int, ...]]) -> int:
    """Parameters that removing ``zero_ids`` deletes (variables and dead dependents), for the live estimate.

    Counted per tensor and dimension like the slimming does, so a weight that loses rows (its group) and
    columns (another group's dependents) is not counted twice.
    """
    whole: set[str] = set()
    cuts: dict[str, dict[int, set[int]]] = {}
    for gid in zero_ids:
        g = groups[gid]
        for s in list(g.slices) + list(g.dependents):
            if s.name not in param_shapes:
                continue
            if s.indices is None:
                whole.add(s.name)
            else:
                cuts.setdefault(s.name, {}).setdefault(s.dim, set()).update(s.indices)
    removed = 0
    for name in whole | set(cuts):
        shape = param_shapes[name]
        full = math.prod(shape)
        if name in whole:
            removed += full
            continue
        left = 1
        for d, size in enumerate(shape):
            gone = len(cuts[name].get(d, ()))
            left *= max(size - gone, 1) if gone else size
        removed += full - left
    return removed


def user_hparams(opt: torch.optim.Optimizer | None) -> dict[str, Any]:
    """Base-optimizer settings of the user's optimizer, in DHSPG/H2SPG terms (only what it defines)."""
    if opt is None or not getattr(opt, "param_groups", None):
        return {}
    g = opt.param_groups[0]
    out: dict[str, Any] = {}
    lr = g.get("initial_lr", g.get("lr"))
    if lr is not None:
        out["lr"] = float(lr)
    if isinstance(opt, torch.optim.AdamW):
        out["variant"] = "adamw"
    elif isinstance(opt, torch.optim.Adam):
        out["variant"] = "adamw" if g.get("decoupled_weight_decay", False) else "adam"
    elif isinstance(opt, torch.optim.SGD):
        out["variant"] = "sgd"
        if g.get("dampening", 0):
            warnings.warn("OTO: the user's SGD dampening is not supported by the half-space optimizers; ignored.",
                          stacklevel=3)
    else:
        warnings.warn(f"OTO: {type(opt).__name__} has no half-space counterpart; using variant='sgd' with its lr, "
                      "momentum and weight decay (pass variant=... to choose).", stacklevel=3)
        out["variant"] = "sgd"
    if g.get("maximize", False):
        raise ValueError("OTO: the user's optimizer has maximize=True, which the half-space optimizers do not support.")
    for k in ("momentum", "nesterov", "eps", "weight_decay"):
        if k in g and g[k] is not None:
            out[k] = g[k]
    if "betas" in g:
        out["betas"] = tuple(float(b) for b in g["betas"])
    if out.get("variant") != "sgd":
        out.pop("momentum", None)
        out.pop("nesterov", None)
    if len(opt.param_groups) > 1:
        keys = [k for k in _BASE_KEYS if k in g]
        if any(any(pg.get(k) != g.get(k) for k in keys) for pg in opt.param_groups[1:]):
            warnings.warn("OTO: the user's optimizer has several parameter groups with different settings; the "
                          "half-space optimizer has one, so the first group's settings apply to every parameter.",
                          stacklevel=3)
    return out


def build_half_space(
    name: str,
    named_params: Sequence[tuple[str, nn.Parameter]],
    groups: Sequence[Group],
    hierarchy_check: Any,
    settings: dict[str, Any],
) -> HalfSpaceOptimizer:
    """Instantiate DHSPG / H2SPG / HESSO with ``settings`` (already merged user + explicit values)."""
    cls = OPTIMIZERS[name]
    kwargs = {k: v for k, v in settings.items() if v is not None}
    if name == "h2spg":
        kwargs["hierarchy_check"] = hierarchy_check
    return cls(list(named_params), groups, **kwargs)


def params_for_optimizer(network: nn.Module, user_opt: torch.optim.Optimizer | None) -> list[tuple[str, nn.Parameter]]:
    """The network's trainable parameters (named as in the trace) plus any other parameter the user optimized."""
    named = [(n, p) for n, p in network.named_parameters() if p.requires_grad]
    seen = {id(p) for _, p in named}
    if user_opt is None:
        return named
    user_ids: set[int] = set()
    k = 0
    for pg in user_opt.param_groups:
        for p in pg["params"]:
            user_ids.add(id(p))
            if id(p) not in seen and getattr(p, "requires_grad", False):
                named.append((f"<outside_network>.{k}", p))
                seen.add(id(p))
                k += 1
    missing = [n for n, p in network.named_parameters() if p.requires_grad and id(p) not in user_ids]
    if missing:
        warnings.warn(f"OTO: {len(missing)} trainable network parameter(s) (e.g. {missing[0]!r}) were not in the "
                      "user's optimizer; the half-space optimizer trains every trainable parameter of the network "
                      "(set requires_grad=False to keep one fixed).", stacklevel=3)
    return named


def mark_step_for_schedulers(opt: torch.optim.Optimizer) -> None:
    """Make ``opt.step`` look like one an LR scheduler patched (so rebound schedulers do not warn)."""
    step = opt.step
    if hasattr(step, "_wrapped_by_lr_sched"):
        return
    ref = weakref.ref(opt)
    func = step.__func__  # type: ignore[attr-defined]

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        o = ref()
        o._opt_called = True  # type: ignore[union-attr]
        return func(o, *args, **kwargs)

    wrapper._wrapped_by_lr_sched = True  # type: ignore[attr-defined]
    opt.step = wrapper  # type: ignore[method-assign]


_NOT_PER_GROUP = {"_schedulers", "_milestones", "milestones"}


def rebind_scheduler(sched: Any, old: torch.optim.Optimizer, new: torch.optim.Optimizer,
                     base_lr: float | None) -> None:
    """Point ``sched`` (and chained children) at ``new``; per-group lists keep the first group's entry.

    ``base_lr`` (when the callback overrides the lr) replaces the scheduler's base learning rate.
    """
    for child in getattr(sched, "_schedulers", None) or []:
        rebind_scheduler(child, old, new, base_lr)
    if getattr(sched, "optimizer", None) is old:
        sched.optimizer = new
        mark_step_for_schedulers(new)
    n_old = len(old.param_groups)
    for k, v in list(vars(sched).items()):
        if k in _NOT_PER_GROUP or not isinstance(v, list):
            continue
        if n_old > 1 and len(v) == n_old:
            setattr(sched, k, v[:1])
    if base_lr is not None and isinstance(getattr(sched, "base_lrs", None), list):
        sched.base_lrs = [base_lr]


def install_optimizer(old: torch.optim.Optimizer | None, new: torch.optim.Optimizer, base_lr: float,
                      lr_overridden: bool) -> None:
    """Carry the per-group scheduler bookkeeping of ``old`` (initial_lr, max_lr, current lr ratio) into ``new``."""
    group = new.param_groups[0]
    if old is None or not getattr(old, "param_groups", None):
        return
    og = old.param_groups[0]
    for k, v in og.items():
        if k != "params" and k not in group:
            group[k] = v  # e.g. initial_lr / max_lr / min_lr / base_momentum set by a scheduler
    initial = og.get("initial_lr")
    if initial is not None:
        cur = float(og["lr"])
        ratio = cur / float(initial) if float(initial) else 1.0
        group["initial_lr"] = base_lr
        group["lr"] = base_lr * ratio if lr_overridden else cur
    mark_step_for_schedulers(new)


def steps_from(steps: int | None, epochs: float | None, steps_per_epoch: float | None, what: str) -> int | None:
    """Convert a phase length given in epochs into optimizer steps."""
    if steps is not None:
        return int(steps)
    if epochs is None:
        return None
    if steps_per_epoch is None or not math.isfinite(steps_per_epoch):
        raise ValueError(f"{what}_epochs needs a sized training dataloader to convert epochs into optimizer "
                         f"steps; pass {what}_steps instead.")
    return int(round(float(epochs) * steps_per_epoch))


def check_length(value: Any, name: str) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or not math.isfinite(value):
        raise ValueError(f"{name} must be a number >= 0, got {value!r}.")
    if name.endswith("_steps") and int(value) != value:
        raise ValueError(f"{name} must be an integer, got {value!r}.")


def load_compressed(path_or_dir: str | Path) -> nn.Module:
    """Load an exported sub-network: the torch.export program (``subnet.pt2``), else ONNX via onnxruntime.

    Neither format contains pickled Python code, so loading an export from elsewhere is safe.
    """
    p = Path(path_or_dir)
    if p.is_dir():
        for cand in ("subnet.pt2", "subnet.onnx"):
            if (p / cand).exists():
                p = p / cand
                break
        else:
            raise FileNotFoundError(f"{path_or_dir}: no subnet.pt2 or subnet.onnx in this directory (is it an "
                                    "OTOCallback export_dir?).")
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist.")
    if p.suffix == ".pt2":
        return torch.export.load(str(p)).module()
    if p.suffix == ".onnx":
        return OnnxModule(p)
    raise ValueError(f"{p}: cannot load a compressed network from a {p.suffix!r} file; use the export's "
                     "subnet.pt2 (torch.export program) or subnet.onnx. A state_dict alone has no structure.")


class OnnxModule(nn.Module):
    """An ONNX file run by onnxruntime behind an ``nn.Module`` interface (CPU tensors in and out).

    A graph exported with a fixed batch size ``B`` is run on other batch sizes in chunks of ``B`` (the last
    one zero-padded): exported networks are in eval mode, where samples do not interact.
    """

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        import onnxruntime as ort

        self.path = str(path)
        self.session = ort.InferenceSession(self.path, providers=["CPUExecutionProvider"])
        ins = self.session.get_inputs()
        self.input_names = [i.name for i in ins]
        dims = [i.shape[0] if i.shape else None for i in ins]
        self.fixed_batch = dims[0] if dims and all(isinstance(d, int) and d == dims[0] for d in dims) else None

    def _run(self, arrays: Sequence[Any]) -> list[torch.Tensor]:
        return [torch.from_numpy(o) for o in self.session.run(None, dict(zip(self.input_names, arrays)))]

    def forward(self, *inputs: torch.Tensor) -> Any:
        arrays = [t.detach().cpu().numpy() for t in inputs]
        n = arrays[0].shape[0] if arrays and arrays[0].ndim else None
        B = self.fixed_batch
        if B is None or n is None or n == B or any(a.ndim == 0 or a.shape[0] != n for a in arrays):
            outs = self._run(arrays)
        else:
            parts: list[list[torch.Tensor]] = []
            for s in range(0, n, B):
                chunk = [a[s:s + B] for a in arrays]
                m = chunk[0].shape[0]
                if m < B:
                    import numpy as np

                    chunk = [np.concatenate([c, np.zeros((B - m,) + c.shape[1:], c.dtype)]) for c in chunk]
                parts.append([o[:m] if o.dim() and o.shape[0] == B else o for o in self._run(chunk)])
            outs = [torch.cat(ps) if ps[0].dim() and ps[0].shape[0] != 0 else ps[0] for ps in zip(*parts)]
        return outs[0] if len(outs) == 1 else tuple(outs)


def iter_optimizers(opts: Iterable[Any]) -> list[Any]:
    return [o for o in opts if type(o).__name__ != "_MockOptimizer"]
