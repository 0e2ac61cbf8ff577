"""Rules for broadcasting element-wise arithmetic between two operands: add / sub / mul / div."""
from __future__ import annotations

from typing import Any

import torch.fx

from ..channels import TensorChannels
from .registry import Call, Context, IsZero, Rule, add


def out_cdim(t: TensorChannels, shape: tuple[int, ...] | None, n_out: int) -> int:
    """Where ``t``'s channel dim lands in a broadcast result of rank ``n_out`` (right-aligned)."""
    n_in = len(shape) if shape is not None else n_out
    return t.cdim + (n_out - n_in)


def size_at(other: tuple[int, ...], cdim: int, n_out: int) -> int:
    """Size of ``other`` at result dimension ``cdim`` (1 where it is broadcast)."""
    i = cdim - (n_out - len(other))
    return 1 if i < 0 else other[i]


class Broadcasting(Rule):
    """Shared walk of a two-operand element-wise op; subclasses say how zero propagates.

    Two tracked operands with the same channels are coupled channel by channel (removing channel i
    removes it from both, and nothing else reads it); a parameter per channel is sliced with its channel;
    a scalar or a tensor broadcast over the channels does not care which channels exist.
    """

    kind = "joint"
    commutative = False

    def zi_both(self, p: list[bool], q: list[bool]) -> list[bool]:
        raise NotImplementedError

    def zi_constant(self, t: TensorChannels, value: Any, call: Call) -> list[bool]:
        raise NotImplementedError

    def zi_param(self, t: TensorChannels, buffer: bool) -> list[bool]:
        raise NotImplementedError

    def channels(self, ctx: "Context", call: Call) -> None:
        a, b = call.input, call.args.get("other")
        out = call.node.shape
        if out is None:
            ctx.refuse(call)
            return
        n = len(out)
        ta, tb = ctx.channels(a), ctx.channels(b)
        if ta is None and tb is None:
            ctx.set(call, None)  # parameters and data only: a parameter read here is checked by the walk
            return
        if ta is None and self.commutative:
            a, b, ta, tb = b, a, tb, ta
        elif ta is None:
            self.untracked_left(ctx, call, a, b, tb, n)
            return
        cd = out_cdim(ta, ctx.shape(a), n)
        if tb is not None:
            self.both_tracked(ctx, call, (a, ta), (b, tb), n)
        elif not isinstance(b, torch.fx.Node):
            ctx.set(call, TensorChannels(cd, list(ta.elems), self.zi_constant(ta, b, call),
                                         ta.taint or f"{ctx.describe(call)} adds a constant"))
        else:
            self.with_untracked(ctx, call, ta, cd, b, n)

    def both_tracked(self, ctx: "Context", call: Call, a: tuple, b: tuple, n: int) -> None:
        (xa, ta), (xb, tb) = a, b
        sa, sb = ctx.shape(xa), ctx.shape(xb)
        cd, cb = out_cdim(ta, sa, n), out_cdim(tb, sb, n)
        if cb != cd or len(tb.elems) != len(ta.elems):
            if sb is not None and sa is not None and size_at(sb, cd, n) == 1 and size_at(sa, cb, n) == 1:
                ctx.refuse(call, f"{ctx.describe(call)} combines two channel dims (outer product)")
            else:
                ctx.refuse(call, f"{ctx.describe(call)} mixes channels laid out differently")
            return
        for x, y in zip(ta.elems, tb.elems):
            ctx.el.union(x, y)
        self.after_union(ctx, call, tb)
        ctx.set(call, TensorChannels(cd, list(ta.elems), self.zi_both(ta.zi, tb.zi), ta.taint or tb.taint))

    def after_union(self, ctx: "Context", call: Call, tb: TensorChannels) -> None:
        pass

    def with_untracked(self, ctx: "Context", call: Call, ta: TensorChannels, cd: int,
                       b: torch.fx.Node, n: int) -> None:
        sb = ctx.shape(b) or ()
        if size_at(sb, cd, n) <= 1:
            ctx.set(call, TensorChannels(cd, list(ta.elems), self.zi_constant(ta, b, call),
                                         ta.taint or f"{ctx.describe(call)} adds a broadcast tensor"))
            return
        ref = ctx.param(b)
        pos = cd - (n - len(sb))
        if ref is None or ref.dims[pos] is None:
            ctx.refuse(call, f"{ctx.describe(call)} combines channels with an untracked tensor")
            return
        for c, e in enumerate(ta.elems):
            if self.param_is_variable(ref.buffer):
                ctx.el.add_var(e, ref.name, ref.dims[pos], c)
            else:  # a buffer, or a divisor (zeroing it would divide by zero): removed, never zeroed
                ctx.el.add_dep(e, ref.name, ref.dims[pos], c)
        ctx.set(call, TensorChannels(cd, list(ta.elems), self.zi_param(ta, ref.buffer),
                                     ta.taint or f"{ctx.describe(call)} adds a buffer"))

    def param_is_variable(self, buffer: bool) -> bool:
        return not buffer

    def untracked_left(self, ctx: "Context", call: Call, a: Any, b: Any, tb: TensorChannels, n: int) -> None:
        sa = ctx.shape(a)
        cd = out_cdim(tb, ctx.shape(b), n)
        if sa is not None and size_at(sa, cd, n) > 1:
            ctx.refuse(call, f"{ctx.describe(call)} combines channels with an untracked tensor")
            return
        ctx.set(call, tb.moved(cd).not_zero(f"{ctx.describe(call)} adds a constant"))


class AddSub(Broadcasting):
    """x + y, x - y (and rsub): a zero channel plus a zero channel is zero; plus a constant it is not.
    The operands commute for the channel walk: which side is subtracted does not change which channel is
    which, nor whether both sides are zero."""

    joint = True
    commutative = True

    def zi_both(self, p: list[bool], q: list[bool]) -> list[bool]:
        return [x and y for x, y in zip(p, q)]

    def zi_constant(self, t: TensorChannels, value: Any, call: Call) -> list[bool]:
        alpha = call.args.get("alpha", 1)
        return list(t.zi) if (not isinstance(value, torch.fx.Node) and (value == 0 or alpha == 0)) \
            else [False] * len(t.elems)

    def zi_param(self, t: TensorChannels, buffer: bool) -> list[bool]:
        return [False] * len(t.elems) if buffer else list(t.zi)

    def zero_output(self, call: Call, is_zero: IsZero) -> bool:
        if call.args.get("alpha", 1) == 0:
            return is_zero(call.input)
        return is_zero(call.input) and is_zero(call.args.get("other"))


class Multiply(Broadcasting):
    """x * y: one zero factor makes the product zero, so a gate (SE, layer scale) coupled with the
    channel keeps it zero-invariant; a per-channel parameter factor is zeroed with its channel."""

    commutative = True

    def zi_both(self, p: list[bool], q: list[bool]) -> list[bool]:
        return [x or y for x, y in zip(p, q)]

    def zi_constant(self, t: TensorChannels, value: Any, call: Call) -> list[bool]:
        return list(t.zi)

    def zi_param(self, t: TensorChannels, buffer: bool) -> list[bool]:
        return list(t.zi) if buffer else [True] * len(t.elems)

    def zero_output(self, call: Call, is_zero: IsZero) -> bool:
        return is_zero(call.input) or is_zero(call.args.get("other"))


class Divide(Broadcasting):
    """x / y: a zero numerator gives zero; a channel divisor would give 0/0 once its group is zero, so
    it is kept, and a parameter divisor is a dependent (removed with its channel, never zeroed)."""

    def zi_both(self, p: list[bool], q: list[bool]) -> list[bool]:
        return list(p)

    def zi_constant(self, t: TensorChannels, value: Any, call: Call) -> list[bool]:
        return list(t.zi)

    def zi_param(self, t: TensorChannels, buffer: bool) -> list[bool]:
        return list(t.zi)

    def param_is_variable(self, buffer: bool) -> bool:
        return False

    def after_union(self, ctx: "Context", call: Call, tb: TensorChannels) -> None:
        ctx.el.mark(tb.elems, f"{ctx.describe(call)} divides by a channel tensor")

    def untracked_left(self, ctx: "Context", call: Call, a: Any, b: Any, tb: TensorChannels, n: int) -> None:
        ctx.refuse(call, f"{ctx.describe(call)} divides by a channel tensor")

    def zero_output(self, call: Call, is_zero: IsZero) -> bool:
        return is_zero(call.input) and not is_zero(call.args.get("other"))

    def poisons(self, call: Call, is_zero: IsZero) -> bool:
        return is_zero(call.args.get("other"))


class MaskedFill(Rule):
    """masked_fill(x, mask, v): entries of x replaced by v where a mask broadcast over the channels says
    so; channels stay put, and stay zero exactly when v is 0."""

    kind = "accessory"

    def channels(self, ctx: "Context", call: Call) -> None:
        tracked = Rule.tracked_input(ctx, call)
        if tracked is None:
            return
        t = tracked[0]
        mask = call.args.get("mask")
        ms, out = ctx.shape(mask), call.node.shape
        if ctx.channels(mask) is not None or (ms is not None and out is not None
                                              and size_at(ms, t.cdim, len(out)) > 1):
            ctx.refuse(call, f"{ctx.describe(call)} masks channels one by one")
            return
        value = call.args.get("value")
        ctx.set(call, t.moved(t.cdim) if value == 0 else t.not_zero(f"{ctx.describe(call)} fills {value}"))

    def zero_output(self, call: Call, is_zero: IsZero) -> bool:
        return call.args.get("value") == 0 and is_zero(call.input)


class ReverseSub(AddSub):
    """rsub(x, y) = y - alpha * x: channels as for sub, but not a joint erase mode may rewrite."""

    joint = False


class Where(Rule):
    """where(cond, x, y): entry-wise choice with a condition broadcast over the channels (a causal mask):
    channel i of the result comes from channel i of x or y only; it stays zero when both choices are.
    The chosen tensors are ``self`` and ``other``; the condition is the first argument, never a choice."""

    kind = "accessory"

    def channels(self, ctx: "Context", call: Call) -> None:
        out = call.node.shape
        cond, x, y = call["condition"], call.args.get("self"), call.args.get("other")
        tx, ty = ctx.channels(x), ctx.channels(y)
        t = tx or ty
        if t is None:
            ctx.set(call, None)
            return
        cd = out_cdim(t, ctx.shape(x if tx is not None else y), len(out))
        pieces = [(v, ctx.channels(v)) for v in (cond, x, y)]
        for v, tv in pieces:
            if tv is None and isinstance(v, torch.fx.Node) and size_at(ctx.shape(v) or (), cd, len(out)) > 1:
                ctx.refuse(call, f"{ctx.describe(call)} chooses per channel with an untracked tensor")
                return
            if tv is not None and (out_cdim(tv, ctx.shape(v), len(out)) != cd or len(tv.elems) != len(t.elems)):
                ctx.refuse(call, f"{ctx.describe(call)} mixes channels laid out differently")
                return
        for _, tv in pieces[1:]:
            if tv is not None and tv is not t:
                for a, b in zip(t.elems, tv.elems):
                    ctx.el.union(a, b)
        zi = [all(z) for z in zip(*[tv.zi if tv is not None else [v == 0] * len(t.elems)
                                    for v, tv in pieces[1:]])]
        ctx.set(call, TensorChannels(cd, list(t.elems), zi, t.taint or f"{ctx.describe(call)} fills a constant"))

    def zero_output(self, call: Call, is_zero: IsZero) -> bool:
        return is_zero(call.args.get("self")) and is_zero(call.args.get("other"))


add(AddSub(), "add", "sub")
add(Where(), "where")
add(ReverseSub(), "rsub")
add(Multiply(), "mul")
add(Divide(), "div", "floor_divide")
add(MaskedFill(), "masked_fill")

__all__ = ["Broadcasting", "AddSub", "ReverseSub", "Where", "Multiply", "Divide", "MaskedFill", "out_cdim", "size_at"]
