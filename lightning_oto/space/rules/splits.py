"""Rules that put channels side by side or cut them into blocks: cat, stack, split / chunk /
tensor_split, channel slices, GLU."""
from __future__ import annotations

import sys

from ..channels import TensorChannels
from .registry import Call, Context, IsZero, Rule, add


class ChannelConcat(Rule):
    """cat: along the channel dim the pieces' channels are laid side by side (a channel removed from a
    piece is removed from the result at its offset); along another dim the pieces must hold the same
    channels, so they are coupled one by one (a parameter piece, like a class token, is zeroed with its
    channel)."""

    kind = "joint"
    keeps_channels = True
    joint = True

    def channels(self, ctx: "Context", call: Call) -> None:
        tensors, out = list(call["tensors"]), call.node.shape
        if out is None:
            ctx.refuse(call)
            return
        dim = call.get("dim", 0) % len(out)
        infos = [ctx.channels(t) for t in tensors]
        if all(i is None for i in infos):
            ctx.set(call, None)
            return
        cdims = {i.cdim for i in infos if i is not None}
        if len(cdims) != 1:
            ctx.refuse(call)
            return
        cd = cdims.pop()
        if cd == dim:
            self.side_by_side(ctx, call, tensors, infos, dim)
        else:
            self.coupled(ctx, call, tensors, infos, cd)

    @staticmethod
    def side_by_side(ctx: "Context", call: Call, tensors: list, infos: list, dim: int) -> None:
        elems: list[int] = []
        zi: list[bool] = []
        taint = ""
        for t, i in zip(tensors, infos):
            if i is None:
                n = (ctx.shape(t) or (0,) * (dim + 1))[dim]
                why = f"concatenated with an untracked tensor in {ctx.describe(call)}"
                elems += [ctx.el.new(why) for _ in range(n)]
                zi += [True] * n
            else:
                elems += i.elems
                zi += i.zi
                taint = taint or i.taint
        ctx.set(call, TensorChannels(dim, elems, zi, taint))

    @staticmethod
    def coupled(ctx: "Context", call: Call, tensors: list, infos: list, cd: int) -> None:
        first = next(i for i in infos if i is not None)
        n = len(first.elems)
        for t, i in zip(tensors, infos):
            if i is not None:
                if len(i.elems) != n:
                    ctx.refuse(call)
                    return
                continue
            ref = ctx.param(t, consume=False)
            shape = ctx.shape(t) or ()
            pos = cd - (len(call.node.shape) - len(shape))
            if ref is None or ref.buffer or pos < 0 or shape[pos] != n or ref.dims[pos] is None:
                ctx.refuse(call, f"{ctx.describe(call)} joins channels with an untracked tensor")
                return
        zi = [True] * n
        for t, i in zip(tensors, infos):
            if i is None:
                ref = ctx.param(t)
                shape = ctx.shape(t)
                pos = cd - (len(call.node.shape) - len(shape))
                for c, e in enumerate(first.elems):
                    ctx.el.add_var(e, ref.name, ref.dims[pos], c)
                continue
            for c, (x, y) in enumerate(zip(first.elems, i.elems)):
                ctx.el.union(x, y)
                zi[c] = zi[c] and i.zi[c]
        ctx.set(call, TensorChannels(cd, list(first.elems), zi, first.taint))

    def zero_output(self, call: Call, is_zero: IsZero) -> bool:
        return all(is_zero(t) for t in call["tensors"])


class Stack(ChannelConcat):
    """stack: like a cat along a new dim, the pieces hold the same channels and are coupled one by one."""

    joint = False

    def channels(self, ctx: "Context", call: Call) -> None:
        tensors, out = list(call["tensors"]), call.node.shape
        infos = [ctx.channels(t) for t in tensors]
        if all(i is None for i in infos):
            ctx.set(call, None)
            return
        if any(i is None for i in infos) or len({(i.cdim, len(i.elems)) for i in infos}) != 1:
            ctx.refuse(call, f"{ctx.describe(call)} stacks tensors with other channels")
            return
        dim = call.get("dim", 0) % len(out)
        cd = infos[0].cdim + (1 if dim <= infos[0].cdim else 0)
        zi = [all(z) for z in zip(*(i.zi for i in infos))]
        for i in infos[1:]:
            for x, y in zip(infos[0].elems, i.elems):
                ctx.el.union(x, y)
        ctx.set(call, TensorChannels(cd, list(infos[0].elems), zi, infos[0].taint))


def _blocks(call: Call, ctx: "Context", dim: int) -> list[int]:
    val = call.fx.meta.get("val")
    return [int(v.shape[dim]) for v in val] if isinstance(val, (list, tuple)) else []


class ChannelSplit(Rule):
    """split / split_with_sizes / chunk / tensor_split / unbind.

    Along another dim every piece keeps the channels.  Along the channels, equal blocks are coupled
    channel by channel (block b's channel i goes with every other block's channel i), so every block
    keeps the same size and ``chunk(n)`` or ``split(C // n)`` still cuts at the block borders; a size
    written in the forward must follow (``Context.literal``).  Unequal blocks shrink on their own,
    each with its written size.
    """

    kind = "shape"
    zero_preserving = True  # a zero input gives a zero output

    def channels(self, ctx: "Context", call: Call) -> None:
        t = ctx.channels(call.input)
        xs = ctx.shape(call.input)
        val = call.fx.meta.get("val")
        n_out = len(val) if isinstance(val, (list, tuple)) else 1
        if t is None:
            ctx.set(call, [None] * n_out)
            return
        dim = call.get("dim", 0) % len(xs)
        if dim != t.cdim:
            cd = t.cdim - (1 if call.key == "unbind" and dim < t.cdim else 0)
            ctx.set(call, [t.moved(cd) for _ in range(n_out)])
            return
        sizes = _blocks(call, ctx, dim)
        if call.key == "unbind" or not sizes or sum(sizes) != len(t.elems):
            ctx.refuse(call, f"{ctx.describe(call)} splits the channel dimension")
            ctx.set(call, [None] * n_out)
            return
        pieces, offset = [], 0
        for s in sizes:
            pieces.append(TensorChannels(t.cdim, t.elems[offset:offset + s], t.zi[offset:offset + s], t.taint))
            offset += s
        if len(set(sizes)) == 1:
            for i in range(sizes[0]):
                ctx.el.union_all(p.elems[i] for p in pieces)
        elif call.key in ("chunk", "tensor_split", "split"):
            ctx.refuse(call, f"{ctx.describe(call)} cuts unequal blocks whose sizes are computed from the total")
            ctx.set(call, [None] * n_out)
            return
        self.written_sizes(ctx, call, pieces)
        ctx.set(call, pieces)

    @staticmethod
    def written_sizes(ctx: "Context", call: Call, pieces: list[TensorChannels]) -> None:
        if call.key == "split":
            ctx.literal(call, call["split_size"], pieces[0].elems, "split size")
        elif call.key == "split_with_sizes":
            for s, p in zip(call["split_sizes"], pieces):
                ctx.literal(call, s, p.elems, "split size")
        elif call.key == "tensor_split" and not isinstance(call.args.get("sections"), int):
            offset = []
            for p in pieces[:-1]:
                offset += p.elems
                ctx.literal(call, len(offset), list(offset), "split index")


class ChannelSlice(Rule):
    """slice: along another dim the channels pass.  Along the channels, a slice that is one block of an
    equal partition (``x[:, C//2:]``) couples the blocks channel by channel like a split, and its written
    bounds must follow; any other part of the channels is refused."""

    kind = "shape"
    zero_preserving = True  # a zero input gives a zero output

    def channels(self, ctx: "Context", call: Call) -> None:
        tracked = Rule.tracked_input(ctx, call)
        if tracked is None:
            return
        t, xs = tracked
        dim = call.get("dim", 0) % len(xs)
        if dim != t.cdim:
            ctx.set(call, t.moved(t.cdim))
            return
        c = len(t.elems)
        start, end, step = self.bounds(call, c)
        if step != 1 or end <= start:
            ctx.refuse(call, f"{ctx.describe(call)} slices the channel dimension")
            return
        if start == 0 and end == c:
            ctx.set(call, t.moved(t.cdim))
            return
        size = end - start
        if c % size or start % size:
            ctx.refuse(call, f"{ctx.describe(call)} slices channels {start}:{end} of {c}, not a block")
            return
        for i in range(size):
            ctx.el.union_all(t.elems[b + i] for b in range(0, c, size))
        if start:
            ctx.literal(call, call.args.get("start"), t.elems[:start], "slice start")
        if end != c:
            ctx.literal(call, call.args.get("end"), t.elems[:end], "slice end")
        ctx.set(call, TensorChannels(t.cdim, t.elems[start:end], t.zi[start:end], t.taint))

    @staticmethod
    def bounds(call: Call, c: int) -> tuple[int, int, int]:
        start, end, step = call.get("start", 0), call.get("end", sys.maxsize), call.get("step", 1)
        if not all(isinstance(v, int) for v in (start, end, step)):
            return 0, 0, 0
        start = start + c if start < 0 else start
        end = end + c if end < 0 else min(end, c)
        return max(start, 0), end, step


class GatedLinearUnit(Rule):
    """glu(x, dim) = a * sigmoid(b) for the two halves: along the channels channel i of a and of b go
    together (coupled), and a zero ``a`` gives zero."""

    kind = "accessory"
    zero_preserving = True  # a zero input gives a zero output

    def channels(self, ctx: "Context", call: Call) -> None:
        tracked = Rule.tracked_input(ctx, call)
        if tracked is None:
            return
        t, xs = tracked
        if call.get("dim", -1) % len(xs) != t.cdim:
            ctx.set(call, t.moved(t.cdim))
            return
        h = len(t.elems) // 2
        for i in range(h):
            ctx.el.union(t.elems[i], t.elems[h + i])
        ctx.set(call, TensorChannels(t.cdim, t.elems[:h], t.zi[:h], t.taint))


add(ChannelConcat(), "cat")
add(Stack(), "stack")
add(ChannelSplit(), "split", "split_with_sizes", "chunk", "tensor_split", "unbind", "unsafe_split",
    "unsafe_chunk")
add(ChannelSlice(), "slice")
add(GatedLinearUnit(), "glu")

__all__ = ["ChannelConcat", "Stack", "ChannelSplit", "ChannelSlice", "GatedLinearUnit"]
