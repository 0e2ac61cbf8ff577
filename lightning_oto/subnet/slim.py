"""Prune-mode construction: slim a deep copy of the user's model (same class, same forward).

Zero groups tell which indices of which parameters/buffers disappear along which dimension; the
copy's tensors are replaced by the kept slices and the modules' size attributes (``out_channels``,
``groups``, ``num_features``, head counts ...) are updated so the unchanged forward code runs on them.
"""
from __future__ import annotations

import copy
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..space.groups import Group, zero_group
from ..space.rules.norms import is_variance_rms_norm
from ..space.prune import PruneSpace
from .plan import plan_keeping_one, removal_plan  # noqa: F401 - removal_plan kept importable from here
from .verify import DEFAULT_ATOL, DEFAULT_RTOL, allowed_error, output_difference


def _get_owner(root: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, attr = name.rpartition(".")
    mod = root.get_submodule(path) if path else root
    return mod, attr


@torch.no_grad()
def slim_copy(model: nn.Module, plan: dict[tuple[str, int], set[int]],
              attributes: dict[tuple[str, str], int] | None = None) -> nn.Module:
    """Deep-copy ``model`` and delete the planned indices; returns the physically smaller copy.

    ``attributes``: (module path, attribute) -> new value for sizes the forward reads (head counts,
    split sizes; ``config.<name>`` sets it on a copy of that module's config).
    """
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
    _set_attributes(sub, attributes or {})
    return sub


def _set_attributes(sub: nn.Module, attributes: dict[tuple[str, str], int]) -> None:
    """Write the sizes the forward reads; a config is copied first (other modules share it)."""
    copied: set[int] = set()
    for (path, attr), value in attributes.items():
        mod = sub.get_submodule(path) if path else sub
        if attr.startswith("config."):
            if id(mod) not in copied:
                mod.config = copy.copy(mod.config)
                copied.add(id(mod))
            setattr(mod.config, attr[len("config."):], value)
        else:
            setattr(mod, attr, value)


def _sizes(m: nn.Module) -> dict[str, int]:
    out = {}
    for k in ("in_channels", "out_channels", "groups", "num_groups", "num_channels", "in_features",
              "out_features", "num_features", "num_parameters"):
        if hasattr(m, k) and isinstance(getattr(m, k), int):
            out[k] = getattr(m, k)
    if is_variance_rms_norm(m):
        out["rms_width"] = getattr(m, "full_width", m.weight.shape[0])
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
    elif isinstance(m, (nn.LayerNorm, nn.RMSNorm)) and isinstance(w, torch.Tensor) \
            and tuple(w.shape) != tuple(m.normalized_shape):
        m.full_width = getattr(m, "full_width", m.normalized_shape[-1])
        m.normalized_shape = tuple(w.shape)
        m.__class__ = PrunedLayerNorm if isinstance(m, nn.LayerNorm) else PrunedRMSNorm
    elif "rms_width" in old and w.shape[0] != old["rms_width"]:
        m.full_width = old["rms_width"]
        m.__class__ = PrunedVarianceRMSNorm
    elif isinstance(m, nn.PReLU):
        m.num_parameters = m.weight.shape[0]
    elif isinstance(m, nn.MultiheadAttention) and m.in_proj_weight is not None:
        heads = m.in_proj_weight.shape[0] // (3 * m.head_dim)
        width = m.in_proj_weight.shape[1]
        if heads != m.num_heads or width != m.embed_dim:
            m.num_heads = heads
            m.embed_dim = m.kdim = m.vdim = width
            m.__class__ = PrunedMultiheadAttention


class PrunedLayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` after its removed channels: they were exactly zero in the full model, so they added
    nothing to the sums, but the mean and variance were taken over ``full_width`` channels.  Same maths on
    the kept ones: with ``r = kept / full_width``, the full mean is ``r`` times the kept channels' mean ``m``,
    and each removed channel adds ``(r m)**2`` to the variance.  (``torch.var_mean`` would be one call, but on
    CPU it is slower than the two means here: 1.12-1.22x a fused norm of the kept width in a BERT encoder, against
    1.02-1.07x; ``benchmarks/bench_pruned_norm.py``.)"""

    full_width: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        r = x.shape[-1] / self.full_width
        h = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        mean = r * h.mean(-1, keepdim=True)
        centred = h - mean
        var = r * centred.square().mean(-1, keepdim=True) + (1.0 - r) * mean.square()
        y = (centred * torch.rsqrt(var + self.eps)).to(x.dtype)
        if self.weight is not None and self.bias is not None:
            return torch.addcmul(self.bias, y, self.weight)
        if self.weight is not None:
            return y * self.weight
        return y if self.bias is None else y + self.bias


class PrunedRMSNorm(nn.RMSNorm):
    """``nn.RMSNorm`` after its removed (exactly zero) channels: the mean square is still over ``full_width``."""

    full_width: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        h = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps
        y = (h * torch.rsqrt(h.square().sum(-1, keepdim=True) / self.full_width + eps)).to(x.dtype)
        return y * self.weight if self.weight is not None else y


class PrunedVarianceRMSNorm(nn.Module):
    """A ``transformers`` RMSNorm (``LlamaRMSNorm`` ...) after its removed (exactly zero) channels: the same
    float32 maths, with the mean square still over ``full_width``."""

    full_width: int
    variance_epsilon: float

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.square().sum(-1, keepdim=True) / self.full_width + self.variance_epsilon)
        return self.weight * h.to(x.dtype)


class PrunedMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` after pruning: ``num_heads`` heads of ``head_dim`` (3 * num_heads * head_dim
    in-projection rows, as many out-projection columns) on a model width ``embed_dim`` that no longer
    equals num_heads * head_dim (torch's own forward assumes it does).  Same maths: each head attends
    with scale head_dim ** -0.5, then the heads go through the out-projection."""

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,  # type: ignore[override]
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
        if not self.batch_first or unbatched:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        h, d = self.num_heads, self.head_dim
        wq, wk, wv = self.in_proj_weight.chunk(3)
        bq, bk, bv = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None, None, None)
        b, lq, s = query.shape[0], query.shape[1], key.shape[1]
        q = F.linear(query, wq, bq).view(b, lq, h, d).transpose(1, 2)
        k = F.linear(key, wk, bk).view(b, s, h, d).transpose(1, 2)
        v = F.linear(value, wv, bv).view(b, s, h, d).transpose(1, 2)
        scores = q @ k.transpose(-2, -1) * d ** -0.5 + self._bias(attn_mask, key_padding_mask, is_causal,
                                                                  b, lq, s, q.dtype, q.device)
        p = torch.softmax(scores, dim=-1)
        out = F.dropout(p, self.dropout, self.training) @ v
        out = F.linear(out.transpose(1, 2).reshape(b, lq, h * d), self.out_proj.weight, self.out_proj.bias)
        if not self.batch_first or unbatched:
            out = out.transpose(0, 1)
        if unbatched:
            out, p = out.squeeze(1), p.squeeze(0)
        if not need_weights:
            return out, None
        return out, (p.mean(dim=-3) if average_attn_weights else p)

    def _bias(self, attn_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None, is_causal: bool,
              b: int, lq: int, s: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """Additive mask (B or 1, 1, L, S) from torch's mask conventions (True / -inf = not attended)."""
        bias = torch.zeros(1, 1, lq, s, dtype=dtype, device=device)
        if attn_mask is None and is_causal:
            attn_mask = torch.ones(lq, s, dtype=torch.bool, device=device).triu(1)
        for m, shape in ((attn_mask, None), (key_padding_mask, (b, 1, 1, s))):
            if m is None:
                continue
            add = torch.zeros_like(m, dtype=dtype).masked_fill(m, float("-inf")) if m.dtype == torch.bool \
                else m.to(dtype)
            if shape is not None:
                add = add.view(shape)
            elif add.dim() == 3:
                if add.shape[0] != 1:
                    raise ValueError("a head-pruned MultiheadAttention cannot take a per-head attn_mask; pass a "
                                     "2-D mask or a key_padding_mask.")
                add = add.unsqueeze(0)
            bias = bias + add
        return bias


# ---------------------------------------------------------------------------------------------- entry
def prune_subnet(model: nn.Module, space: PruneSpace, zero_groups: Sequence[Group]) -> nn.Module:
    """The slimmed copy of ``model`` without ``zero_groups`` (groups of ``space``, possibly bundled)."""
    shapes = {n: tuple(t.shape) for n, t in list(model.named_parameters(remove_duplicate=False))
              + list(model.named_buffers(remove_duplicate=False))}
    plan, _ = plan_keeping_one(list(zero_groups), shapes)
    return slim_copy(model, plan, space.attribute_values(plan))


def mismatch_hint(space: PruneSpace | None, zero_groups: Sequence[Group]) -> str:
    """Names the user rules the removed channels went through (the likely culprits), or ''."""
    rules = space.rules_of(zero_groups) if space is not None else []
    return f" The removed channels went through the user rule(s) {', '.join(rules)}: check them." if rules else ""


@torch.no_grad()
def _trial(model: nn.Module, inputs: tuple, space: PruneSpace, ids: Sequence[int]) -> str | None:
    """None when removing groups ``ids`` gives an exact sub-network; else what went wrong."""
    try:
        full = copy.deepcopy(model)
        params = dict(full.named_parameters())
        for i in ids:
            zero_group(space.groups[i], params)
        sub = prune_subnet(full, space, [space.groups[i] for i in ids])
        err, scale = output_difference(full, sub, inputs)
    except Exception as e:  # noqa: BLE001 - a failing forward is the answer
        return f"{type(e).__name__}: {str(e).strip().splitlines()[0][:160] if str(e).strip() else ''}"
    if not err <= allowed_error(scale, DEFAULT_ATOL, DEFAULT_RTOL):
        return f"outputs differ by {err:.3g}"
    return None


def confirm_literal_sizes(model: nn.Module, inputs: tuple, space: PruneSpace, max_trials: int = 8) -> None:
    """Sizes written as numbers in the forward (``split(x, 64)``, ``x[:, :32]``) may or may not follow the
    channels; one trial construction per site (removing one group, as the optimizer would) tells.  The
    groups of a site whose trial fails are kept, with the reason."""
    sites = [s for s in space.literal_sizes if any(space.groups[g].prunable for g in s.groups)]
    if not sites:
        return
    picks = [next(g for g in s.groups if space.groups[g].prunable) for s in sites]
    if _trial(model, inputs, space, sorted(set(picks))) is None:
        return
    tried = 0
    for site in sites:
        pick = next((g for g in site.groups if space.groups[g].prunable), None)
        if pick is None:  # kept by an earlier site (the norms of one width share its groups)
            continue
        why = _trial(model, inputs, space, [pick]) if tried < max_trials else "too many sizes to check"
        tried += 1
        if why is None:
            continue
        for g in site.groups:
            grp = space.groups[g]
            if grp.prunable:
                grp.prunable = False
                grp.reason = f"the forward writes the {site.where} as a number that does not follow " \
                             f"the channels (trial construction: {why})"
        space.unprunable_ops.setdefault(site.where, "a size written in the forward does not follow the channels")


__all__ = ["slim_copy", "prune_subnet", "confirm_literal_sizes", "mismatch_hint", "PrunedLayerNorm", "PrunedMultiheadAttention",
           "PrunedRMSNorm", "PrunedVarianceRMSNorm"]
