"""Rules for operators that move data without computing: reshapes, permutations, expand, select, roll,
reductions over other dimensions, softmax over other dimensions.

A reshape is analysed per *chunk*: the smallest run of input dims and output dims with the same number of
entries.  The channel's chunk may keep it in one dim (a move), split it into several (attention heads:
``(B, N, H*D) -> (B, N, H, D)``) or merge it with the dims after it (flatten into a linear layer).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch.fx

from ..channels import ParamRef, TensorChannels
from .registry import Call, Context, IsZero, Rule, add

HEAD_COUNT_NAMES = ("num_heads", "num_attention_heads", "num_key_value_heads", "num_kv_heads", "n_heads", "n_head",
                    "n_kv_heads", "heads", "num_head", "nheads")
HEAD_WIDTH_NAMES = ("all_head_size", "inner_dim", "attn_dim")


def channel_chunk(si: Sequence[int], so: Sequence[int], c: int) -> tuple[list[int], list[int]] | None:
    """(input dims, output dims) of the smallest equal-size run containing input dim ``c`` (size-1 dims
    are ignored: they hold no data); None when the shapes do not line up."""
    ins = [d for d in range(len(si)) if si[d] != 1]
    outs = [d for d in range(len(so)) if so[d] != 1]
    i = j = 0
    while i < len(ins) and j < len(outs):
        i0, j0 = i, j
        pi, po = si[ins[i]], so[outs[j]]
        i, j = i + 1, j + 1
        while pi != po:
            if pi < po and i < len(ins):
                pi, i = pi * si[ins[i]], i + 1
            elif po < pi and j < len(outs):
                po, j = po * so[outs[j]], j + 1
            else:
                return None
        if c in ins[i0:i]:
            return ins[i0:i], outs[j0:j]
    return None


def permutation(call: Call, n: int) -> list[int] | None:
    """Output dim i comes from input dim perm[i]."""
    key = call.key
    if key == "permute":
        return [d % n for d in call["dims"]]
    perm = list(range(n))
    if key == "transpose":
        d0, d1 = call["dim0"] % n, call["dim1"] % n
        perm[d0], perm[d1] = perm[d1], perm[d0]
        return perm
    if key == "t":
        return perm[::-1] if n == 2 else perm
    if key == "movedim":
        src, dst = call["source"], call["destination"]
        src = [s % n for s in ([src] if isinstance(src, int) else src)]
        dst = [d % n for d in ([dst] if isinstance(dst, int) else dst)]
        out: list[int | None] = [None] * n
        for s, d in zip(src, dst):
            out[d] = s
        rest = iter(d for d in range(n) if d not in src)
        return [p if p is not None else next(rest) for p in out]
    return None


class Permute(Rule):
    """permute / transpose / t / movedim: the channel dim moves, every channel keeps its values."""

    kind = "shape"
    zero_preserving = True  # a zero input gives a zero output

    def channels(self, ctx: "Context", call: Call) -> None:
        xs = ctx.shape(call.input)
        perm = permutation(call, len(xs or ()))
        ref = ctx.param(call.input, consume=False)
        if ref is not None and perm is not None:
            ctx.param(call.input)
            ctx.set(call, ParamRef(ref.name, tuple(ref.dims[p] for p in perm), ref.buffer))
            return
        tracked = Rule.tracked_input(ctx, call)
        if tracked is None:
            return
        t = tracked[0]
        if perm is None:
            ctx.refuse(call)
            return
        ctx.set(call, t.moved(perm.index(t.cdim)))


class Reshape(Rule):
    """view / reshape / flatten / unflatten / squeeze / unsqueeze / view_as / reshape_as.

    Exact when each kept channel still lands in the same place: a channel moved to another dim, merged
    with the dims after it (each channel becomes a block of features), or split into several dims where
    one of them shrinks (heads: each head's block of channels is removed whole, so the other dims keep
    their size).  A size written in the forward at the shrinking dim must follow (``-1``, a module
    attribute, or a trial construction confirms it: see :meth:`Context.literal`).
    """

    kind = "shape"
    zero_preserving = True  # a zero input gives a zero output
    shape_only = ("other",)

    @staticmethod
    def requested(call: Call, n_out: int) -> list[Any] | None:
        """The sizes the forward asked for, aligned with the output dims (None: computed at runtime)."""
        if call.key in ("view", "reshape"):
            size = call.args.get("size", call.args.get("shape"))
            return list(size) if size is not None and len(size) == n_out else None
        if call.key == "unflatten":
            dim, sizes = call["dim"], list(call["sizes"])
            dim = dim % (n_out - len(sizes) + 1)
            return [None] * dim + sizes + [None] * (n_out - dim - len(sizes))
        return None

    def channels(self, ctx: "Context", call: Call) -> None:
        si, so = ctx.shape(call.input), call.node.shape
        ref = ctx.param(call.input, consume=False)
        if ref is not None:
            self.param_view(ctx, call, ref, si, so)
            return
        tracked = Rule.tracked_input(ctx, call)
        if tracked is None:
            return
        t = tracked[0]
        chunk = channel_chunk(si, so, t.cdim) if si is not None and so is not None and len(t.elems) > 1 else None
        if chunk is None:
            ctx.refuse(call, f"{ctx.describe(call)} reshapes the channel dimension")
            return
        ins, outs = chunk
        lit = self.requested(call, len(so))
        if ins == [t.cdim] and len(outs) == 1:
            out = t.moved(outs[0])
            ctx.literal(call, lit[outs[0]] if lit else None, out.elems, "channel count")
        elif ins == [t.cdim]:
            out = self.split(ctx, call, t, so, outs, lit)
        elif ins[0] == t.cdim:
            block = math.prod(si[d] for d in ins[1:])
            out = TensorChannels(outs[0], [e for e in t.elems for _ in range(block)],
                                 [z for z in t.zi for _ in range(block)], t.taint) if len(outs) == 1 else None
            if out is not None:
                written = lit[outs[0]] if lit else None
                ctx.literal(call, written, out.elems, "merged channel size")
                if written is None or written == -1:  # heads merged back: all_head_size and the like follow
                    ctx.size_attributes(call, so[outs[0]], out.elems, HEAD_WIDTH_NAMES)
        else:
            out = None
        if out is None:
            ctx.refuse(call, f"{ctx.describe(call)} reshapes the channel dimension")
            return
        self.match_other(ctx, call, out)

    def split(self, ctx: "Context", call: Call, t: TensorChannels, so: tuple, outs: list[int],
              lit: list | None) -> TensorChannels:
        """Channels split over ``outs``: the dim that may shrink (the head count) gets the elements, each
        coupling the channels of its block (the other dims of the block keep their size)."""
        free = self.free_axis(ctx, call, so, outs, lit)
        sizes = [so[d] for d in outs]
        stride = math.prod(sizes[outs.index(free) + 1:])
        n_free = so[free]
        members: list[list[int]] = [[] for _ in range(n_free)]
        for i in range(len(t.elems)):
            members[(i // stride) % n_free].append(i)
        for m in members:
            ctx.el.union_all(t.elems[i] for i in m)
        reps = [t.elems[m[0]] for m in members]
        zi = [all(t.zi[i] for i in m) for m in members]
        written = lit[free] if lit else None
        ctx.literal(call, written, reps, "split size")
        if free == outs[0] and (written is None or written == -1):  # heads (outermost): their count follows
            ctx.size_attributes(call, n_free, reps, HEAD_COUNT_NAMES)
        return TensorChannels(free, reps, zi, t.taint)

    @staticmethod
    def free_axis(ctx: "Context", call: Call, so: tuple, outs: list[int], lit: list | None) -> int:
        """The outer dim when written -1 (``view(B, N, -1, D)``), else one holding a head-count attribute of
        the module (``view(B, N, self.num_heads, -1)``), else one written -1, else the largest (a trial
        construction then checks the guess)."""
        def free(d: int) -> bool:
            return not isinstance(lit[d], int) or lit[d] == -1

        if lit is not None:
            if free(outs[0]):
                return outs[0]
            attrs = ctx.module_sizes(call.node.module, HEAD_COUNT_NAMES)
            for d in outs:
                if lit[d] in attrs:
                    return d
            for d in outs:
                if free(d):
                    return d
        return max(outs, key=lambda d: (so[d], -d))

    @staticmethod
    def match_other(ctx: "Context", call: Call, out: TensorChannels) -> None:
        """``*_as(other)``: the target size comes from ``other``, so its channels must be these."""
        other = call.args.get("other")
        if other is None:
            ctx.set(call, out)
            return
        to = ctx.channels(other)
        if to is None or to.cdim != out.cdim or len(to.elems) != len(out.elems):
            ctx.refuse(call, f"{ctx.describe(call)} takes its shape from a tensor with other channels")
            return
        for x, y in zip(out.elems, to.elems):
            ctx.el.union(x, y)
        ctx.set(call, out)

    @staticmethod
    def param_view(ctx: "Context", call: Call, ref: ParamRef, si: tuple | None, so: tuple | None) -> None:
        """A view of a parameter that only adds or drops size-1 dims keeps it a parameter view
        (``gamma.reshape(-1, 1, 1)``); anything else is a computed tensor."""
        if si is None or so is None:
            ctx.set(call, None)
            return
        big_in = [d for d in range(len(si)) if si[d] != 1]
        big_out = [d for d in range(len(so)) if so[d] != 1]
        if [si[d] for d in big_in] != [so[d] for d in big_out]:
            ctx.set(call, None)
            return
        dims: list[int | None] = [None] * len(so)
        for i, o in zip(big_in, big_out):
            dims[o] = ref.dims[i]
        ctx.param(call.input)
        ctx.set(call, ParamRef(ref.name, tuple(dims), ref.buffer))


class Flatten(Reshape):
    """flatten: a reshape whose channels keep their order; concat affiliates may pass through it."""

    keeps_channels = True


class Expand(Rule):
    """expand / expand_as: broadcast copies over new or size-1 dims; the channel dim keeps its size, so
    each channel still holds only its own values."""

    kind = "shape"
    zero_preserving = True  # a zero input gives a zero output
    shape_only = ("other",)

    def channels(self, ctx: "Context", call: Call) -> None:
        xs, out = ctx.shape(call.input), call.node.shape
        ref = ctx.param(call.input, consume=False)
        if ref is not None and xs is not None and out is not None:
            lead = len(out) - len(xs)
            dims = [None] * lead + [ref.dims[i] if xs[i] == out[lead + i] else None for i in range(len(xs))]
            ctx.param(call.input)
            ctx.set(call, ParamRef(ref.name, tuple(dims), ref.buffer))
            return
        tracked = Rule.tracked_input(ctx, call)
        if tracked is None:
            return
        t = tracked[0]
        nc = t.cdim + len(out) - len(xs)
        if out[nc] != xs[t.cdim]:
            ctx.refuse(call)
            return
        res = t.moved(nc)
        if call.key == "expand_as":
            Reshape.match_other(ctx, call, res)
            return
        size = call.args.get("size")
        ctx.literal(call, size[nc] if size is not None and len(size) == len(out) else None, res.elems,
                    "expanded channel count")
        ctx.set(call, res)


class Select(Rule):
    """select(dim, i) on another dim than the channels: the channels pass, one dim is dropped."""

    kind = "shape"
    zero_preserving = True  # a zero input gives a zero output

    def channels(self, ctx: "Context", call: Call) -> None:
        tracked = Rule.tracked_input(ctx, call)
        if tracked is None:
            return
        t, xs = tracked
        dim = call["dim"] % len(xs)
        if dim == t.cdim:
            ctx.refuse(call, f"{ctx.describe(call)} selects one channel")
            return
        ctx.set(call, t.moved(t.cdim - (1 if dim < t.cdim else 0)))


class GetItem(Rule):
    """Element ``index`` of a tuple result (split pieces, max's values)."""

    kind = "shape"

    def channels(self, ctx: "Context", call: Call) -> None:
        src, i = call.args.get("self"), call.args.get("index")
        v = ctx.info.get(src.name) if isinstance(src, torch.fx.Node) else None
        ctx.set(call, v[i] if isinstance(v, list) and isinstance(i, int) and i < len(v) else None)

    def zero_output(self, call: Call, is_zero: IsZero) -> bool:
        return is_zero(call.args.get("self"))


class RollOtherDims(Rule):
    """roll / flip over dims other than the channels (Swin's shifted windows): entries move within each
    channel, never across channels.  Over the channels the order would change: refused."""

    kind = "shape"
    zero_preserving = True  # a zero input gives a zero output
    keeps_channels = True

    def channels(self, ctx: "Context", call: Call) -> None:
        tracked = Rule.tracked_input(ctx, call)
        if tracked is None:
            return
        t, xs = tracked
        dims = call.args.get("dims")
        dims = [dims] if isinstance(dims, int) else list(dims or [])
        if not dims or t.cdim in [d % len(xs) for d in dims]:
            ctx.refuse(call, f"{ctx.describe(call)} moves entries across channels")
            return
        ctx.set(call, t.moved(t.cdim))


class RepeatInterleave(Rule):
    """repeat_interleave(x, r, dim): along the channels each channel becomes r consecutive copies (a
    key/value head shared by r query heads); along another dim channels just pass."""

    kind = "shape"
    zero_preserving = True  # a zero input gives a zero output

    def channels(self, ctx: "Context", call: Call) -> None:
        tracked = Rule.tracked_input(ctx, call)
        if tracked is None:
            return
        t = tracked[0]
        r, dim = call.args.get("repeats"), call.args.get("dim")
        xs = ctx.shape(call.input)
        if not isinstance(r, int) or dim is None:
            ctx.refuse(call)
            return
        if dim % len(xs) != t.cdim:
            ctx.set(call, t.moved(t.cdim))
            return
        ctx.set(call, TensorChannels(t.cdim, [e for e in t.elems for _ in range(r)],
                                     [z for z in t.zi for _ in range(r)], t.taint))


class Reduction(Rule):
    """mean / sum / amax / max / var / norm over dims other than the channels: each output channel is
    made from its own channel only, and the reduction of zeros is zero (not for logsumexp)."""

    kind = "accessory"
    keeps_channels = True
    not_zero = ("logsumexp",)

    def channels(self, ctx: "Context", call: Call) -> None:
        tracked = Rule.tracked_input(ctx, call)
        if tracked is None:
            return
        t, xs = tracked
        dims = call.args.get("dim")
        if isinstance(dims, int):
            dims = [dims]
        if not dims or xs is None or t.cdim in [d % len(xs) for d in dims]:
            ctx.refuse(call, f"{ctx.describe(call)} reduces over the channels")
            return
        dims = [d % len(xs) for d in dims]
        keep = bool(call.get("keepdim", False))
        cd = t.cdim if keep else t.cdim - sum(1 for d in dims if d < t.cdim)
        out = t.moved(cd)
        ctx.set(call, out.not_zero(call.node.op) if call.key in self.not_zero else out)

    def zero_output(self, call: Call, is_zero: IsZero) -> bool:
        return call.key not in self.not_zero and is_zero(call.input)


class Softmax(Rule):
    """softmax / log_softmax over another dim than the channels: per channel, but softmax(0) != 0.
    Over the channels it normalises across them: refused."""

    kind = "accessory"

    def channels(self, ctx: "Context", call: Call) -> None:
        tracked = Rule.tracked_input(ctx, call)
        if tracked is None:
            return
        t, xs = tracked
        if call["dim"] % len(xs) == t.cdim:
            ctx.refuse(call, f"{ctx.describe(call)} normalizes over the channels")
            return
        ctx.set(call, t.not_zero(f"{call.node.op}(0) != 0"))


add(Permute(), "permute", "transpose", "t", "movedim")
add(Reshape(), "view", "reshape", "unflatten", "unsqueeze", "squeeze", "view_as", "reshape_as")
add(Flatten(), "flatten")
add(Expand(), "expand", "expand_as")
add(Select(), "select")
add(GetItem(), "getitem")
add(RollOtherDims(), "roll", "flip")
add(RepeatInterleave(), "repeat_interleave")
add(Reduction(), "mean", "sum", "amax", "amin", "max", "min", "var", "std", "prod", "norm", "linalg_vector_norm",
    "logsumexp", "nansum", "nanmean")
add(Softmax(), "softmax", "log_softmax")

__all__ = ["Permute", "Reshape", "Flatten", "Expand", "Select", "GetItem", "RollOtherDims", "RepeatInterleave",
           "Reduction", "Softmax", "channel_chunk", "permutation", "HEAD_COUNT_NAMES", "HEAD_WIDTH_NAMES"]
