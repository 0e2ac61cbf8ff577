"""Prune-mode construction: slim a deep copy of the user's model (same class, same forward).

Zero groups tell which indices of which parameters/buffers disappear along which dimension; the
copy's tensors are replaced by the kept slices and the modules' size attributes (``out_channels``,
``groups``, ``num_features`` ...) are updated so the unchanged forward code runs on them.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from .plan import removal_plan  # noqa: F401 - kept importable from here


def _get_owner(root: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, attr = name.rpartition(".")
    mod = root.get_submodule(path) if path else root
    return mod, attr


@torch.no_grad()
def slim_copy(model: nn.Module, plan: dict[tuple[str, int], set[int]]) -> nn.Module:
    """Deep-copy ``model`` and delete the planned indices; returns the physically smaller copy."""
    sub = copy.deepcopy(model)
    params = dict(sub.named_parameters())
    buffers = dict(sub.named_buffers())
    per_name: dict[str, list[tuple[int, set[int]]]] = {}
    for (name, dim), idx in plan.items():
        per_name.setdefault(name, []).append((dim, idx))
    old_sizes = {m: _sizes(m) for m in sub.modules()}
    replaced: dict[int, nn.Parameter] = {}
    for name, cuts in per_name.items():
        t = params.get(name)
        is_param = t is not None
        if t is None:
            t = buffers.get(name)
        if t is None:
            continue
        new = t.data
        for dim, idx in cuts:
            keep = [i for i in range(new.shape[dim]) if i not in idx]
            new = new.index_select(dim, torch.as_tensor(keep, dtype=torch.long, device=new.device))
        mod, attr = _get_owner(sub, name)
        if is_param:
            p = nn.Parameter(new.clone(), requires_grad=t.requires_grad)
            replaced[id(t)] = p
            setattr(mod, attr, p)
        else:
            mod._buffers[attr] = new.clone()
    if replaced:  # shared parameters: every module holding the old tensor gets the new one
        for m in sub.modules():
            for k, v in list(m._parameters.items()):
                if v is not None and id(v) in replaced:
                    m._parameters[k] = replaced[id(v)]
    for m in sub.modules():
        _fix_attributes(m, old_sizes.get(m, {}))
    return sub


def _sizes(m: nn.Module) -> dict[str, int]:
    out = {}
    for k in ("in_channels", "out_channels", "groups", "num_groups", "num_channels", "in_features",
              "out_features", "num_features", "num_parameters"):
        if hasattr(m, k) and isinstance(getattr(m, k), int):
            out[k] = getattr(m, k)
    return out


def _fix_attributes(m: nn.Module, old: dict[str, int]) -> None:
    """Bring size attributes in line with the sliced tensors."""
    w = getattr(m, "weight", None)
    if isinstance(m, nn.modules.conv._ConvNd) and isinstance(w, torch.Tensor):
        g_old = old.get("groups", 1)
        if m.transposed:
            m.in_channels = w.shape[0]
            m.out_channels = w.shape[1] * m.groups
        else:
            if g_old > 1:
                out_per = old["out_channels"] // g_old
                m.groups = max(1, w.shape[0] // out_per)
                m.in_channels = w.shape[1] * m.groups
            else:
                m.in_channels = w.shape[1]
            m.out_channels = w.shape[0]
    elif isinstance(m, nn.Linear) and isinstance(w, torch.Tensor):
        m.out_features, m.in_features = w.shape[0], w.shape[1]
    elif isinstance(m, nn.modules.batchnorm._NormBase):
        ref = m.weight if m.weight is not None else m.running_mean
        if ref is not None:
            m.num_features = ref.shape[0]
    elif isinstance(m, nn.GroupNorm) and m.weight is not None:
        per = old["num_channels"] // old["num_groups"]
        m.num_channels = m.weight.shape[0]
        m.num_groups = m.num_channels // per
    elif isinstance(m, nn.PReLU):
        m.num_parameters = m.weight.shape[0]
