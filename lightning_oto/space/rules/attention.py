"""Attention: heads as channels.

After a projection is split into heads (``view(B, N, -1, D)``, see :class:`.shapes.Reshape`), one element
stands for one head.  ``scaled_dot_product_attention`` couples query head h with the key / value head it
reads (grouped-query attention: key/value head ``h // (Hq / Hkv)``), and the output head is zero when its
value head is.  ``nn.MultiheadAttention`` hides its heads inside one fused in-projection; its module rule
describes the same groups directly on the module's parameters.
"""
from __future__ import annotations


import torch
import torch.fx
from torch import nn

from ..channels import TensorChannels
from .arithmetic import size_at
from .registry import Call, Context, IsZero, MODULE_RULES, ModuleRule, Rule, add


class AttentionHeads(Rule):
    """scaled_dot_product_attention(q, k, v) with heads in dim -3.

    Head h of the output is softmax(q_h k_g^T * scale) v_g with g = h // (Hq / Hkv): it reads only
    head h of q and head g of k and v, so removing a whole head group (a key/value head with its query
    heads) removes exactly those output heads, and zeroing it zeroes v_g, hence the output heads.  The
    scale depends on the head size, which does not change.  A mask (or additive bias) with one entry per
    head that is computed from parameters (T5's relative position bias, passed as the SDPA mask) is coupled
    head by head: removing head h removes its bias too, and a zero head stays zero whatever its bias is,
    because its values are zero.  A per-head mask the analysis cannot follow keeps every head.  Channels in
    the last dim (within-head) are only accepted with an explicit ``scale`` (the default one would change
    with the head size).
    """

    kind = "joint"

    def channels(self, ctx: "Context", call: Call) -> None:
        q, k, v = call["query"], call["key"], call["value"]
        tq, tk, tv = ctx.channels(q), ctx.channels(k), ctx.channels(v)
        sq, out = ctx.shape(q), call.node.shape
        if tq is None and tk is None and tv is None:
            if ctx.channels(call.args.get("attn_mask")) is None:
                ctx.set(call, None)
            else:  # heads the analysis cannot see: the bias's heads cannot be matched to them
                ctx.refuse(call, f"{ctx.describe(call)} has a per-head bias but untracked heads")
            return
        if sq is None or out is None:
            ctx.refuse(call)
            return
        heads = [t is not None and t.cdim == len(ctx.shape(x)) - 3 for t, x in ((tq, q), (tk, k), (tv, v))]
        if ctx.channels(call.args.get("attn_mask")) is not None and not all(heads):
            ctx.refuse(call, f"{ctx.describe(call)} has a mask (or bias) computed from parameters, read within heads")
        elif all(heads):
            self.by_head(ctx, call, tq, tk, tv, out)
        elif tq is not None and tk is not None and tq.cdim == len(sq) - 1 and tk.cdim == len(ctx.shape(k)) - 1 \
                and call.args.get("scale") is not None and (tv is None or tv.cdim == len(ctx.shape(v)) - 1):
            self.within_head(ctx, call, tq, tk, tv, out)
        else:
            ctx.refuse(call, f"{ctx.describe(call)} reads heads it cannot match (a projection without heads, "
                             "or key/value from an untracked tensor)")

    @staticmethod
    def by_head(ctx: "Context", call: Call, tq: TensorChannels, tk: TensorChannels, tv: TensorChannels,
                out: tuple) -> None:
        hq, hkv = len(tq.elems), len(tk.elems)
        if len(tv.elems) != hkv or hq % hkv:
            ctx.refuse(call, f"{ctx.describe(call)} has {hq} query heads for {hkv} key/value heads")
            return
        mask = call.args.get("attn_mask")
        ms, tm = ctx.shape(mask), ctx.channels(mask)
        if tm is not None and (tm.cdim != len(out) - 3 or len(tm.elems) != hq or ms is None or len(ms) != len(out)):
            ctx.refuse(call, f"{ctx.describe(call)} has a mask (or bias) whose channels are not its heads")
            return
        if tm is None and ms is not None and size_at(ms, len(out) - 3, len(out)) > 1:
            ctx.refuse(call, f"{ctx.describe(call)} has a mask (or bias) with one entry per head")
            return
        rep = hq // hkv
        if tm is not None:  # a per-head bias made from parameters (T5's position bias): sliced with its head
            for h in range(hq):
                ctx.el.union(tq.elems[h], tm.elems[h])
        for g in range(hkv):
            ctx.el.union(tk.elems[g], tv.elems[g])
        for h in range(hq):
            ctx.el.union(tq.elems[h], tk.elems[h // rep])
        zi = [tv.zi[h // rep] for h in range(hq)]
        ctx.set(call, TensorChannels(len(out) - 3, list(tq.elems), zi, tv.taint))

    @staticmethod
    def within_head(ctx: "Context", call: Call, tq: TensorChannels, tk: TensorChannels,
                    tv: TensorChannels | None, out: tuple) -> None:
        if len(tq.elems) != len(tk.elems):
            ctx.refuse(call)
            return
        for i, (x, y) in enumerate(zip(tq.elems, tk.elems)):
            ctx.el.union(x, y)
            if not (tq.zi[i] or tk.zi[i]):
                ctx.el.mark([x], f"{ctx.describe(call)} contracts a channel that is zero in neither q nor k")
        ctx.set(call, None if tv is None else TensorChannels(len(out) - 1, list(tv.elems), list(tv.zi), tv.taint))

    def zero_output(self, call: Call, is_zero: IsZero) -> bool:
        return is_zero(call["value"])


class MultiheadAttentionHeads(ModuleRule):
    """``nn.MultiheadAttention`` (self-attention, fused in-projection): one group per head = the head's
    query, key and value rows of ``in_proj_weight`` / ``in_proj_bias`` plus its columns of
    ``out_proj.weight`` (dependents).  Zeroing them zeroes the head's values, so its attention output is
    zero and its out-projection columns contribute nothing.  The output channels are produced by
    ``out_proj`` (its rows); the input channels are read through the in-projection's columns.
    The slimmed copy runs the heads that are left (``subnet.slim``).
    """

    kind = "stem"

    def module_channels(self, ctx: "Context", path: str, module: nn.Module, calls: list[Call],
                        inputs: list[torch.fx.Node], outputs: list[torch.fx.Node]) -> None:
        mha = module
        pre = f"{path}." if path else ""
        w_in, b_in, w_out, b_out = (pre + n for n in ("in_proj_weight", "in_proj_bias", "out_proj.weight",
                                                       "out_proj.bias"))
        names = [w_in, w_out] + ([b_in] if mha.in_proj_bias is not None else []) + \
            ([b_out] if mha.out_proj.bias is not None else [])
        proj = [c for c in calls if c.key == "linear" and ctx.ph_param.get(getattr(c["weight"], "name", "")) == w_in]
        if not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn or len(proj) != 1 \
                or not ctx.take_params(calls, names):
            ctx.refuse_module(calls, inputs, outputs, f"{path} (MultiheadAttention) is not a fused self-attention")
            return
        e, h = mha.embed_dim, mha.num_heads
        d = e // h
        heads = [ctx.el.new() for _ in range(h)]
        for i, el in enumerate(heads):
            for j in range(d):
                for block in range(3):
                    ctx.el.add_var(el, w_in, 0, block * e + i * d + j)
                    if mha.in_proj_bias is not None:
                        ctx.el.add_var(el, b_in, 0, block * e + i * d + j)
                ctx.el.add_dep(el, w_out, 1, i * d + j)
        self.read_inputs(ctx, calls, inputs, w_in, e)
        produced = [ctx.el.new() for _ in range(e)]
        for o, el in enumerate(produced):
            ctx.el.add_var(el, w_out, 0, o)
            if mha.out_proj.bias is not None:
                ctx.el.add_var(el, b_out, 0, o)
        for c in calls:
            ctx.info[c.node.name] = None
        from_out_proj = self.downstream(calls, w_out, ctx)
        for node in outputs:
            val = node.meta.get("val")
            if node in from_out_proj and isinstance(val, torch.Tensor) and val.shape[-1] == e:
                ctx.info[node.name] = TensorChannels(val.dim() - 1, list(produced), [True] * e)
            else:  # the averaged attention weights depend on how many heads there are
                ctx.el.mark(heads, f"the attention weights of {path} (MultiheadAttention) are used")

    @staticmethod
    def downstream(calls: list[Call], w_out: str, ctx: "Context") -> set[torch.fx.Node]:
        """The out-projection's result and the reshapes after it (one tensor input each) inside the call."""
        inside = {c.node.id for c in calls}
        nodes = ctx.g.nodes
        start = [c.node.id for c in calls if c.key == "linear"
                 and ctx.ph_param.get(getattr(c["weight"], "name", "")) == w_out]
        seen: set[int] = set()
        while start:
            n = start.pop()
            if n in seen:
                continue
            seen.add(n)
            start += [u for u in nodes[n].outputs if u in inside and len(nodes[u].inputs) == 1]
        return {nodes[n].fx_node for n in seen}

    @staticmethod
    def read_inputs(ctx: "Context", calls: list[Call], inputs: list[torch.fx.Node], w_in: str, e: int) -> None:
        """Every input holding channels is read through the in-projection's columns (shared by q, k, v)."""
        tracked = [(t, len(ctx.shape(a))) for t, a in ((ctx.channels(a), a) for a in inputs) if t is not None]
        if not tracked:
            ctx.el.pin(w_in, 1, e, f"{w_in} reads an untracked tensor")
        for t, rank in tracked:
            if len(t.elems) != e or t.cdim != rank - 1:
                ctx.el.mark(t.elems, f"{w_in} reads a tensor whose channels moved")
                ctx.el.pin(w_in, 1, e, f"{w_in} reads a tensor whose channels moved")
                continue
            for c, el in enumerate(t.elems):
                if not t.zi[c]:
                    ctx.el.mark([el], f"non-zero-invariant input ({t.taint}) to {w_in}")
                ctx.el.add_dep(el, w_in, 1, c)


add(AttentionHeads(), "scaled_dot_product_attention")
_mha = MultiheadAttentionHeads()
_mha.ops = ("MultiheadAttention",)
MODULE_RULES[nn.MultiheadAttention] = _mha

__all__ = ["AttentionHeads", "MultiheadAttentionHeads"]
