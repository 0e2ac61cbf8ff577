"""Rules for operators that own channels: convolutions, linear layers, matmuls with a parameter,
embeddings.  Their output channels are new elements (the weight rows / columns and bias entries are
the variables); the input channels they read are consumed through weight columns (dependents)."""
from __future__ import annotations

from typing import Any

from ..channels import ParamRef, TensorChannels
from .registry import Call, Context, IsZero, Rule, add


def consume_columns(ctx: "Context", call: Call, t: TensorChannels | None, wname: str | None, dim: int,
                    n: int, reason: str | None) -> None:
    """Input channel c of ``t`` is read through entry c of ``wname`` along ``dim``.

    The entries are claimed even when the channel is kept: a shared weight's other call must not drop them.
    """
    if t is None or len(t.elems) != n:
        why = reason or f"{ctx.describe(call)} also reads an untracked tensor"
        if t is not None:
            ctx.el.mark(t.elems, f"{ctx.describe(call)} reads a tensor whose channels moved")
        if wname is not None:
            ctx.el.pin(wname, dim, n, why)
        return
    if reason:
        ctx.el.mark(t.elems, reason)
        if wname is not None:
            ctx.el.pin(wname, dim, n, reason)
        return
    for c, e in enumerate(t.elems):
        if not t.zi[c]:
            ctx.el.mark([e], f"non-zero-invariant input ({t.taint}) to {ctx.describe(call)}")
        ctx.el.add_dep(e, wname, dim, c)


def new_channels(ctx: "Context", n: int, reason: str | None,
                 slots: list[tuple[str | None, int, int]]) -> list[int]:
    """``n`` fresh elements; output o owns entry ``o % per`` of each named tensor along its dim, for
    each ``(name, dim, per)`` of ``slots`` (``name`` None: no such tensor)."""
    outs = [ctx.el.new(reason) for _ in range(n)]
    for name, dim, per in slots:
        if name is None:
            continue
        for o, e in enumerate(outs):
            ctx.el.add_var(e, name, dim, o % per)
    return outs


class Convolution(Rule):
    """conv / conv-transpose: output channel o is owned by weight row o (column o for a transposed
    weight) and bias entry o, so zeroing them zeroes the channel whatever the input; input channel c is
    read through weight column c only.  A depthwise / grouped conv removes whole conv-groups: its input
    and output channels of one group are coupled."""

    kind = "stem"
    weight_dims = {"transposed": (1, 0), "plain": (0, 1)}  # (out, in) dims of the weight

    def weight_layout(self, key: str) -> tuple[int, int]:
        return self.weight_dims["transposed" if key.startswith("conv_transpose") else "plain"]

    @staticmethod
    def transposed(call: Call) -> bool:
        if call.key == "convolution":
            return bool(call.get("transposed", False))
        return call.key.startswith("conv_transpose")

    def channels(self, ctx: "Context", call: Call) -> None:
        w, b = call["weight"], call.args.get("bias")
        transposed, groups = self.transposed(call), int(call.get("groups", 1))
        wname = ctx.param_name(w)
        bname = ctx.param_name(b) if b is not None else None
        wshape, out = ctx.shape(w), call.node.shape
        if wshape is None or out is None:
            ctx.refuse(call)
            return
        cpos = len(out) - (len(wshape) - 2) - 1
        cout = out[cpos]
        cin = wshape[0] if transposed else wshape[1] * groups
        reason = None
        if wname is None or (b is not None and bname is None):
            reason = f"weight of {ctx.describe(call)} is computed, not a parameter"
        if transposed and groups != 1:
            reason = f"grouped transposed convolution {ctx.describe(call)}"
        out_dim, in_dim = self.weight_dims["transposed" if transposed else "plain"]
        # a transposed weight is (C_in, C_out / groups, ...): output o of every group reads column o % per
        outs = new_channels(ctx, cout, reason, [(wname, out_dim, cout // groups if transposed else cout),
                                                (bname, 0, cout)])
        ctx.set(call, TensorChannels(cpos, outs, [True] * cout))
        t = ctx.channels(call.input)
        if t is not None and t.cdim != cpos:
            ctx.el.mark(t.elems, f"{ctx.describe(call)} reads a tensor whose channels moved")
            t = None
        if groups == 1 or transposed:
            consume_columns(ctx, call, t, wname, in_dim, cin, reason)
        else:
            self.grouped(ctx, call, t, outs, groups, cin)

    @staticmethod
    def grouped(ctx: "Context", call: Call, t: TensorChannels | None, outs: list[int], groups: int,
                cin: int) -> None:
        """Removing a conv-group removes its input channels too: they must be ours to remove."""
        if t is None or len(t.elems) != cin:
            ctx.el.mark(outs, f"grouped convolution {ctx.describe(call)} reads an untracked tensor")
            return
        in_per, out_per = cin // groups, len(outs) // groups
        for gi in range(groups):
            block = t.elems[gi * in_per:(gi + 1) * in_per] + outs[gi * out_per:(gi + 1) * out_per]
            ctx.el.union_all(block)

    def zero_output(self, call: Call, is_zero: IsZero) -> bool:
        b = call.args.get("bias")
        return (is_zero(call["weight"]) or is_zero(call.input)) and (b is None or is_zero(b))


class Linear(Rule):
    """linear(x, W, b): output feature o is owned by row o of W and b[o]; input feature c is read
    through column c of W only."""

    kind = "stem"

    def weight_layout(self, key: str) -> tuple[int, int]:
        return 0, 1

    def channels(self, ctx: "Context", call: Call) -> None:
        w, b = call["weight"], call.args.get("bias")
        wname = ctx.param_name(w)
        bname = ctx.param_name(b) if b is not None else None
        wshape, out = ctx.shape(w), call.node.shape
        if wshape is None or out is None or len(wshape) != 2:
            ctx.refuse(call)
            return
        reason = None
        if wname is None or (b is not None and bname is None):
            reason = f"weight of {ctx.describe(call)} is computed, not a parameter"
        outs = new_channels(ctx, wshape[0], reason, [(wname, 0, wshape[0]), (bname, 0, wshape[0])])
        ctx.set(call, TensorChannels(len(out) - 1, outs, [True] * wshape[0]))
        t = ctx.channels(call.input)
        xs = ctx.shape(call.input)
        if t is not None and (xs is None or t.cdim != len(xs) - 1):
            ctx.el.mark(t.elems, f"{ctx.describe(call)} mixes a dimension other than the channels")
            t = None
        consume_columns(ctx, call, t, wname, 1, wshape[1], reason)

    def zero_output(self, call: Call, is_zero: IsZero) -> bool:
        b = call.args.get("bias")
        return (is_zero(call["weight"]) or is_zero(call.input)) and (b is None or is_zero(b))


class Embedding(Rule):
    """embedding(W, idx): output feature c is column c of W for every index, so it is owned by that
    column (zeroed with it, zero whatever the indices)."""

    kind = "stem"

    def weight_layout(self, key: str) -> tuple[int, int]:
        return 1, 0

    def channels(self, ctx: "Context", call: Call) -> None:
        wname = ctx.param_name(call["weight"])
        wshape, out = ctx.shape(call["weight"]), call.node.shape
        if wname is None or wshape is None or out is None or len(wshape) != 2:
            ctx.refuse(call)
            return
        outs = new_channels(ctx, wshape[1], None, [(wname, 1, wshape[1])])
        ctx.set(call, TensorChannels(len(out) - 1, outs, [True] * wshape[1]))

    def zero_output(self, call: Call, is_zero: IsZero) -> bool:
        return is_zero(call["weight"])


OPERANDS = {"mm": ("self", "mat2", None), "bmm": ("self", "mat2", None), "matmul": ("self", "other", None),
            "addmm": ("mat1", "mat2", "self"), "baddbmm": ("batch1", "batch2", "self"),
            "addbmm_never": ("batch1", "batch2", "self")}


class Matmul(Rule):
    """Matrix products (mm, bmm, matmul, addmm, baddbmm), with a parameter or between activations.

    ``x @ W`` (GPT-2's ``Conv1D``: ``addmm(b, x, W)`` with W of shape (in, out)) is a linear layer with a
    transposed weight: output column o is owned by W[:, o] (+ b[o]); input channel c is read through
    W[c, :].  ``W @ x`` likewise with rows.  Between two activations a channel in a batch dimension
    (attention heads) couples both factors head by head, and the product is zero when either factor is;
    a channel in the contracted dimension couples both factors and disappears from the output (the
    removed terms are zero products).
    """

    kind = "stem"

    def weight_layout(self, key: str) -> tuple[int, int]:
        return 1, 0  # x @ W with W of shape (in, out), as GPT-2's Conv1D

    def channels(self, ctx: "Context", call: Call) -> None:
        ln, rn, an = OPERANDS[call.key]
        left, right, addend = call[ln], call[rn], call.args.get(an) if an else None
        sl, sr, out = ctx.shape(left), ctx.shape(right), call.node.shape
        if sl is None or sr is None or out is None or len(sl) < 2 or len(sr) < 2:
            self.refuse_if_tracked(ctx, call)
            return
        tl, tr = ctx.channels(left), ctx.channels(right)
        pl = ctx.param(left, consume=False) if tl is None else None
        pr = ctx.param(right, consume=False) if tr is None else None
        if ctx.channels(addend) is not None:
            ctx.refuse(call, f"{ctx.describe(call)} adds a channel tensor to a product")
        elif tl is not None and tr is not None:
            self.between_activations(ctx, call, tl, tr, sl, sr, out, addend)
        elif tl is not None and pr is not None and tl.cdim == len(sl) - 1:
            self.times_weight(ctx, call, tl, right, pr, addend, out, row_major=True)
        elif tr is not None and pl is not None and tr.cdim == len(sr) - 2:
            self.times_weight(ctx, call, tr, left, pl, addend, out, row_major=False)
        elif tl is not None or tr is not None:
            self.channels_pass(ctx, call, left if tl is not None else right, out, addend,
                               contracted=(tl is not None and tl.cdim == len(sl) - 1)
                               or (tr is not None and tr.cdim == len(sr) - 2))
        else:
            ctx.set(call, None)

    @staticmethod
    def refuse_if_tracked(ctx: "Context", call: Call) -> None:
        if any(ctx.channels(a) is not None for a in call.tensor_args()):
            ctx.refuse(call, f"{ctx.describe(call)} multiplies vectors")
        else:
            ctx.set(call, None)

    def times_weight(self, ctx: "Context", call: Call, t: TensorChannels, w: Any, ref: ParamRef,
                     addend: Any, out: tuple[int, ...], row_major: bool) -> None:
        """x @ W (row_major) or W @ x: the weight's contracted dim is consumed, its other dim produces."""
        ws = ctx.shape(w)
        k_dim, o_dim = (len(ws) - 2, len(ws) - 1) if row_major else (len(ws) - 1, len(ws) - 2)
        pk, po = ref.dims[k_dim], ref.dims[o_dim]
        if len(ws) != 2 or pk is None or po is None or pk == po or ref.buffer:
            ctx.refuse(call, f"{ctx.describe(call)} multiplies by a batched or broadcast parameter")
            return
        ctx.param(w)
        reason, bias = None, None
        if addend is not None:
            bref = ctx.param(addend)
            bs = ctx.shape(addend) or ()
            if bref is not None and not bref.buffer and row_major and len(bs) >= 1 and bs[-1] == ws[o_dim] \
                    and bref.dims[-1] is not None and all(s == 1 for s in bs[:-1]):
                bias = (bref.name, bref.dims[-1])
            else:
                reason = f"{ctx.describe(call)} adds a term that is not a per-channel parameter"
        n = ws[o_dim]
        outs = new_channels(ctx, n, reason, [(ref.name, po, n), (bias[0], bias[1], n) if bias else (None, 0, n)])
        ctx.set(call, TensorChannels(len(out) - 1 if row_major else len(out) - 2, outs, [True] * len(outs)))
        consume_columns(ctx, call, t, ref.name, pk, ws[k_dim], None)

    @staticmethod
    def between_activations(ctx: "Context", call: Call, tl: TensorChannels, tr: TensorChannels,
                            sl: tuple, sr: tuple, out: tuple, addend: Any) -> None:
        nl, nr, no = len(sl), len(sr), len(out)
        batch_l, batch_r = tl.cdim < nl - 2, tr.cdim < nr - 2
        if batch_l and batch_r and tl.cdim - nl == tr.cdim - nr and len(tl.elems) == len(tr.elems):
            for x, y in zip(tl.elems, tr.elems):
                ctx.el.union(x, y)
            zi = [p or q for p, q in zip(tl.zi, tr.zi)] if addend is None else [False] * len(tl.elems)
            ctx.set(call, TensorChannels(tl.cdim + no - nl, list(tl.elems), zi, tl.taint or tr.taint))
            return
        if tl.cdim == nl - 1 and tr.cdim == nr - 2 and len(tl.elems) == len(tr.elems):
            for i, (x, y) in enumerate(zip(tl.elems, tr.elems)):
                ctx.el.union(x, y)
                if not (tl.zi[i] or tr.zi[i]):
                    ctx.el.mark([x], f"{ctx.describe(call)} contracts a channel that is zero in neither factor")
            ctx.set(call, None)
            return
        ctx.refuse(call, f"{ctx.describe(call)} mixes channels of both factors")

    @staticmethod
    def channels_pass(ctx: "Context", call: Call, x: Any, out: tuple, addend: Any, contracted: bool) -> None:
        """One tracked factor whose channels sit in a row / batch dim: they pass to the same output dim."""
        t = ctx.channels(x)
        if contracted:
            ctx.refuse(call, f"{ctx.describe(call)} contracts channels with an untracked tensor")
            return
        for a in call.tensor_args():
            ref = ctx.param(a, consume=False)
            if ref is not None:
                ctx.param(a)
                ctx.keep_whole(ref, f"{ref.name} is also multiplied whole by {ctx.describe(call)}")
        n_in = len(ctx.shape(x))
        cd = t.cdim + len(out) - n_in
        ctx.set(call, t.moved(cd) if addend is None else t.not_zero(f"{ctx.describe(call)} adds a term"))

    def zero_output(self, call: Call, is_zero: IsZero) -> bool:
        ln, rn, an = OPERANDS[call.key]
        product = is_zero(call[ln]) or is_zero(call[rn])
        if an is None:
            return product
        addend = call.args.get(an)
        return product and (addend is None or call.args.get("beta", 1) == 0 or is_zero(addend))


add(Convolution(), "conv1d", "conv2d", "conv3d", "convolution", "conv_transpose1d", "conv_transpose2d",
    "conv_transpose3d")
add(Linear(), "linear")
add(Embedding(), "embedding")
add(Matmul(), "mm", "bmm", "matmul", "addmm", "baddbmm")

__all__ = ["Convolution", "Linear", "Embedding", "Matmul", "consume_columns", "new_channels"]
