"""Optimizer construction: which half-space optimizer fits which mode, and building it.

The one place that knows the optimizer names.  Over a search space, optimizers are built by
:meth:`lightning_oto.OTO.build_optimizer` (``OTO.dhspg/h2spg/hesso``, :class:`OTOCallback` and
:class:`OTOMixin` all go through it), which adds what the ``OTO`` knows (hierarchy check, per-module
caps) and calls :func:`build_optimizer`; only an optimizer over no groups (a sub-network loaded from
a checkpoint) calls it directly.

Mode compatibility (one rule):

* ``prune`` (channel groups): ``dhspg`` (default) or ``hesso``.  ``h2spg`` is refused: its hierarchy
  check is about the erase-mode segment graph and means nothing on channel groups.
* ``erase`` (whole operators): ``h2spg`` (default) only.  Its hierarchy check is what keeps the
  network connected.  ``dhspg`` and ``hesso`` select groups without that check, so they may pick a
  set whose removal disconnects the network.  ``erase_ablation=True`` admits them anyway for the
  erasing paper's Table 4 ablation, and construction then raises ``InvalidSubnetError`` instead of
  building a broken network.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from ..space.groups import Group
from .half_space import DHSPG, H2SPG, HESSO, HalfSpaceOptimizer

OPTIMIZERS: dict[str, type[HalfSpaceOptimizer]] = {"dhspg": DHSPG, "h2spg": H2SPG, "hesso": HESSO}
DEFAULT_OPTIMIZER: dict[str, str] = {"prune": "dhspg", "erase": "h2spg"}
#: optimizer names allowed per mode without the ablation flag
ALLOWED_OPTIMIZERS: dict[str, tuple[str, ...]] = {"prune": ("dhspg", "hesso"), "erase": ("h2spg",)}
#: extra names ``erase_ablation=True`` admits (no hierarchy check: the erasing paper's Table 4)
ABLATION_OPTIMIZERS: dict[str, tuple[str, ...]] = {"prune": (), "erase": ("dhspg", "hesso")}

#: the base-optimizer settings a torch optimizer can hand over to a half-space optimizer
BASE_HPARAMS = ("lr", "variant", "momentum", "nesterov", "betas", "eps", "weight_decay")


def check_target_sparsity(target: Any) -> float:
    """``target_group_sparsity`` as a float in ``[0, 1)``, or a ``ValueError`` that says so."""
    if (isinstance(target, bool) or not isinstance(target, (int, float)) or not math.isfinite(target)
            or not 0.0 <= float(target) < 1.0):
        raise ValueError(f"target_group_sparsity must be a number in [0, 1), got {target!r}.")
    return float(target)


def resolve_optimizer(mode: str, name: str | None = None, erase_ablation: bool = False) -> str:
    """The optimizer name for ``mode`` (its default when ``name`` is None); refuses a mismatch."""
    if mode not in DEFAULT_OPTIMIZER:
        raise ValueError(f"mode must be 'prune' or 'erase', got {mode!r}.")
    resolved = DEFAULT_OPTIMIZER[mode] if name is None else str(name).lower()
    if resolved not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {sorted(OPTIMIZERS)}, got {name!r}.")
    if resolved in ALLOWED_OPTIMIZERS[mode] or (erase_ablation and resolved in ABLATION_OPTIMIZERS[mode]):
        return resolved
    if mode == "erase":
        hint = ("erase mode needs H2SPG (oto.h2spg(), optimizer='h2spg'), whose hierarchy check keeps the network "
                "connected (erase_ablation=True runs DHSPG/HESSO without it, for the Table 4 ablation)")
    else:
        hint = "H2SPG works on the erase-mode search space; use mode='erase', or oto.dhspg() for pruning"
    raise ValueError(f"optimizer {resolved!r} does not fit mode {mode!r}: {hint}.")


def build_optimizer(
    name: str | None,
    named_params: Iterable[tuple[str, nn.Parameter]],
    groups: Sequence[Group],
    *,
    mode: str,
    hierarchy_check: Callable[[frozenset[int], int], bool] | None = None,
    erase_ablation: bool = False,
    **hyperparams: Any,
) -> HalfSpaceOptimizer:
    """DHSPG / H2SPG / HESSO over ``groups`` for ``mode`` (``name=None``: the mode's default).

    ``hyperparams`` go to the optimizer; ``None`` values are dropped so the optimizer's own
    defaults apply.  ``hierarchy_check`` is used by H2SPG only.
    """
    resolved = resolve_optimizer(mode, name, erase_ablation)
    kwargs = {k: v for k, v in hyperparams.items() if v is not None}
    if "target_group_sparsity" in kwargs:
        kwargs["target_group_sparsity"] = check_target_sparsity(kwargs["target_group_sparsity"])
    if "betas" in kwargs:
        kwargs["betas"] = tuple(kwargs["betas"])
    if kwargs.get("variant", "sgd") != "sgd" and not kwargs.get("nesterov"):
        kwargs.pop("nesterov", None)  # an unset SGD-only flag; nesterov=True with Adam still errors
    if resolved == "h2spg":
        kwargs["hierarchy_check"] = hierarchy_check
    return OPTIMIZERS[resolved](list(named_params), list(groups), **kwargs)


def hparams_from_torch_optimizer(opt: torch.optim.Optimizer | None) -> dict[str, Any]:
    """The base settings of a torch optimizer in half-space terms (SGD -> sgd, Adam -> adam, AdamW -> adamw).

    Only what the optimizer defines is returned; settings without a counterpart warn or raise.
    """
    if opt is None or not getattr(opt, "param_groups", None):
        return {}
    g = opt.param_groups[0]
    out: dict[str, Any] = {}
    lr = g.get("initial_lr", g.get("lr"))
    if lr is not None:
        out["lr"] = float(lr)
    out["variant"] = _variant_of(opt, g)
    if g.get("maximize", False):
        raise ValueError("OTO: the user's optimizer has maximize=True, which the half-space optimizers do not support.")
    for k in ("momentum", "nesterov", "eps", "weight_decay"):
        if k in g and g[k] is not None:
            out[k] = g[k]
    if "betas" in g:
        out["betas"] = tuple(float(b) for b in g["betas"])
    if out["variant"] != "sgd":
        out.pop("momentum", None)
        out.pop("nesterov", None)
    if len(opt.param_groups) > 1:
        keys = [k for k in BASE_HPARAMS if k in g]
        if any(any(pg.get(k) != g.get(k) for k in keys) for pg in opt.param_groups[1:]):
            warnings.warn("OTO: the user's optimizer has several parameter groups with different settings; the "
                          "half-space optimizer has one, so the first group's settings apply to every parameter.",
                          stacklevel=3)
    return out


def _variant_of(opt: torch.optim.Optimizer, group: dict[str, Any]) -> str:
    if isinstance(opt, torch.optim.AdamW):
        return "adamw"
    if isinstance(opt, torch.optim.Adam):
        return "adamw" if group.get("decoupled_weight_decay", False) else "adam"
    if isinstance(opt, torch.optim.SGD):
        if group.get("dampening", 0):
            warnings.warn("OTO: the user's SGD dampening is not supported by the half-space optimizers; ignored.",
                          stacklevel=4)
        return "sgd"
    warnings.warn(f"OTO: {type(opt).__name__} has no half-space counterpart; using variant='sgd' with its lr, "
                  "momentum and weight decay (pass variant=... to choose).", stacklevel=4)
    return "sgd"


def trainable_named_params(network: nn.Module, extra: Iterable[torch.Tensor] = (),
                           warn_missing_from: torch.optim.Optimizer | None = None) -> list[tuple[str, nn.Parameter]]:
    """The network's trainable parameters (named as in the trace), then any other trainable tensor in ``extra``.

    Tensors outside the network are named ``<outside_network>.k``: the optimizer trains them but no
    group refers to them.  With ``warn_missing_from``, network parameters that optimizer did not
    hold are reported (the half-space optimizer trains them anyway).
    """
    named = [(n, p) for n, p in network.named_parameters() if p.requires_grad]
    seen = {id(p) for _, p in named}
    k = 0
    for p in extra:
        if id(p) not in seen and getattr(p, "requires_grad", False):
            named.append((f"<outside_network>.{k}", p))
            seen.add(id(p))
            k += 1
    if warn_missing_from is not None:
        held = {id(p) for pg in warn_missing_from.param_groups for p in pg["params"]}
        missing = [n for n, p in network.named_parameters() if p.requires_grad and id(p) not in held]
        if missing:
            warnings.warn(f"OTO: {len(missing)} trainable network parameter(s) (e.g. {missing[0]!r}) were not in the "
                          "user's optimizer; the half-space optimizer trains every trainable parameter of the network "
                          "(set requires_grad=False to keep one fixed).", stacklevel=3)
    return named


__all__ = [
    "ABLATION_OPTIMIZERS",
    "ALLOWED_OPTIMIZERS",
    "BASE_HPARAMS",
    "DEFAULT_OPTIMIZER",
    "OPTIMIZERS",
    "build_optimizer",
    "check_target_sparsity",
    "hparams_from_torch_optimizer",
    "resolve_optimizer",
    "trainable_named_params",
]
