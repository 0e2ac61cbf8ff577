"""Rules for operators acting on each entry alone: activations, casts, dropout, pooling, padding."""
from __future__ import annotations


from ..channels import ParamRef, TensorChannels
from .registry import Call, Context, IsZero, Rule, add


def same_channels(ctx: "Context", call: Call, keep_zero: bool, why: str = "") -> None:
    """Output channel i is a function of input channel i only (same shape)."""
    tracked = Rule.tracked_input(ctx, call)
    if tracked is None:
        return
    t = tracked[0]
    if call.node.shape is not None and ctx.shape(call.input) != call.node.shape:
        ctx.refuse(call, f"{ctx.describe(call)} changes the shape of its input")
        return
    ctx.set(call, t.moved(t.cdim) if keep_zero else t.not_zero(why or f"{call.node.op}(0) != 0"))


class ZeroInvariantUnary(Rule):
    """f(0) = 0 entry-wise (relu, gelu, silu, tanh, dropout in eval, ...): a zero channel stays zero and
    never mixes with another channel, so removing it before or after the op is the same."""

    kind = "accessory"
    zero_preserving = True  # a zero input gives a zero output
    keeps_channels = True

    def channels(self, ctx: "Context", call: Call) -> None:
        same_channels(ctx, call, keep_zero=True)


class Cast(ZeroInvariantUnary):
    """Copies, casts and aliases (to, clone, contiguous, detach): the values are the input's, so a
    parameter stays a parameter (``gamma.to(x.dtype)``) and its uses downstream are analysed as such."""

    kind = "shape"
    shape_only = ("other",)  # type_as(x, other): other's dtype only

    def channels(self, ctx: "Context", call: Call) -> None:
        ref = ctx.param(call.input)
        if ref is not None:
            ctx.set(call, ref)
            return
        same_channels(ctx, call, keep_zero=True)


class NotZeroInvariantUnary(Rule):
    """f(0) != 0 (sigmoid, exp, cos, softplus, ...): channels still map one to one, but a zero group no
    longer gives zero here, so a consumer reading these channels keeps them (recorded as taint)."""

    kind = "accessory"
    keeps_channels = True

    infinite_at_zero = ("reciprocal", "rsqrt", "log", "log2", "log10", "logit")

    def channels(self, ctx: "Context", call: Call) -> None:
        same_channels(ctx, call, keep_zero=False)

    def poisons(self, call: Call, is_zero: IsZero) -> bool:
        return call.key in self.infinite_at_zero and is_zero(call.input)


class Clamp(Rule):
    """clamp / hardtanh: entry-wise; zero-invariant exactly when 0 lies inside [min, max]."""

    kind = "accessory"
    keeps_channels = True
    bounds = {"hardtanh": ("min_val", "max_val")}

    def _keeps_zero(self, call: Call) -> bool:
        lo_name, hi_name = self.bounds.get(call.key, ("min", "max"))
        lo, hi = call.args.get(lo_name), call.args.get(hi_name)
        if call.key == "clamp_min":
            lo, hi = call.args.get("min"), None
        elif call.key == "clamp_max":
            lo, hi = None, call.args.get("max")
        ok_lo = lo is None or (isinstance(lo, (int, float)) and lo <= 0)
        ok_hi = hi is None or (isinstance(hi, (int, float)) and hi >= 0)
        return ok_lo and ok_hi

    def channels(self, ctx: "Context", call: Call) -> None:
        if any(ctx.channels(a) is not None for a in call.tensor_args() if a is not call.input):
            ctx.refuse(call, f"{ctx.describe(call)} clamps to bounds that are channel tensors")
            return
        same_channels(ctx, call, keep_zero=self._keeps_zero(call), why=f"{call.node.op} moves 0")

    def zero_output(self, call: Call, is_zero: IsZero) -> bool:
        return self._keeps_zero(call) and is_zero(call.input)


class Power(Rule):
    """x ** p entry-wise: zero-invariant for a positive scalar exponent (0 ** p = 0)."""

    kind = "accessory"
    keeps_channels = True

    def _keeps_zero(self, call: Call) -> bool:
        p = call.args.get("exponent")
        return isinstance(p, (int, float)) and p > 0

    def channels(self, ctx: "Context", call: Call) -> None:
        if ctx.channels(call.args.get("exponent")) is not None:
            ctx.refuse(call, f"{ctx.describe(call)} raises to a channel tensor")
            return
        same_channels(ctx, call, keep_zero=self._keeps_zero(call), why="x ** p with p <= 0")

    def zero_output(self, call: Call, is_zero: IsZero) -> bool:
        return self._keeps_zero(call) and is_zero(call.input)

    def poisons(self, call: Call, is_zero: IsZero) -> bool:
        p = call.args.get("exponent")
        return isinstance(p, (int, float)) and p < 0 and is_zero(call.input)


class PReLU(Rule):
    """prelu(x, a): entry-wise with one slope per channel; prelu(0) = 0 whatever the slope, so a
    per-channel slope is a dependent of its channel (removed with it, never zeroed)."""

    kind = "accessory"
    zero_preserving = True  # a zero input gives a zero output
    keeps_channels = True

    def channels(self, ctx: "Context", call: Call) -> None:
        t = ctx.channels(call.input)
        ref = ctx.param(call["weight"])
        if t is None:
            ctx.set(call, None)
            return
        ws = ctx.shape(call["weight"])
        if ws and ws[0] == len(t.elems) and ws[0] > 1:
            if ref is None or t.cdim != 1:
                ctx.refuse(call, f"{ctx.describe(call)} has per-channel slopes it cannot slice")
                return
            for c, e in enumerate(t.elems):
                ctx.el.add_dep(e, ref.name, 0, c)
        ctx.set(call, t.moved(t.cdim))


class Spatial(Rule):
    """Pooling and resampling over the dimensions after the channels: each output channel is made from
    its own input channel only, and pool / resample of zeros is zero."""

    kind = "accessory"
    zero_preserving = True  # a zero input gives a zero output
    keeps_channels = True

    def channels(self, ctx: "Context", call: Call) -> None:
        tracked = Rule.tracked_input(ctx, call)
        if tracked is None:
            return
        t, xs = tracked
        if t.cdim != 1 and not (t.cdim == 0 and xs is not None and len(xs) in (2, 3)):
            ctx.refuse(call, f"{ctx.describe(call)} pools a dimension holding channels")
            return
        out = call.node.shape
        if out is not None and xs is not None and (len(out) != len(xs) or out[t.cdim] != xs[t.cdim]):
            ctx.refuse(call, f"{ctx.describe(call)} changes the channel count")
            return
        ctx.set(call, t.moved(t.cdim))


class Pad(Rule):
    """pad / constant_pad_nd over dimensions other than the channels: reflect, replicate and circular
    padding copy a channel's own values; constant padding adds ``value``, which keeps zero only if 0.
    The mode and value are read by name (``aten.pad(x, p, 'constant', 0.0)``)."""

    kind = "accessory"
    keeps_channels = True

    @staticmethod
    def _pads_zero(call: Call) -> bool:
        mode = call.args.get("mode", "constant")
        value = call.args.get("value")
        return mode != "constant" or value is None or value == 0

    def channels(self, ctx: "Context", call: Call) -> None:
        tracked = Rule.tracked_input(ctx, call)
        if tracked is None:
            return
        t, xs = tracked
        pad = list(call["pad"])
        n = len(xs) if xs is not None else t.cdim + 1
        touched = {n - 1 - i // 2 for i in range(len(pad)) if pad[i] != 0}
        if t.cdim in touched:
            ctx.refuse(call, f"{ctx.describe(call)} pads the channel dimension")
            return
        if self._pads_zero(call):
            ctx.set(call, t.moved(t.cdim))
        else:
            ctx.set(call, t.not_zero(f"{ctx.describe(call)} pads with {call.args.get('value')}"))

    def zero_output(self, call: Call, is_zero: IsZero) -> bool:
        return self._pads_zero(call) and is_zero(call.input)


class ShapedLike(Rule):
    """zeros_like / ones_like / full_like / empty_like / rand_like: a constant with the input's shape, so
    its channels are the input's (they shrink with it); zero-invariant only when filled with zeros."""

    kind = "shape"

    def channels(self, ctx: "Context", call: Call) -> None:
        tracked = Rule.tracked_input(ctx, call)
        if tracked is None:
            return
        t = tracked[0]
        zero = call.key == "zeros_like" or (call.key == "full_like" and call.args.get("fill_value") == 0)
        ctx.set(call, t.moved(t.cdim) if zero else t.not_zero(f"{call.node.op} is not zero"))

    def zero_output(self, call: Call, is_zero: IsZero) -> bool:
        return call.key == "zeros_like"


class NoTensorOutput(Rule):
    """Shape queries and asserts (sym_size, _assert_tensor_metadata): they read sizes, not values."""

    kind = "shape"

    def channels(self, ctx: "Context", call: Call) -> None:
        ctx.set(call, None)


ZERO_INVARIANT = (
    "relu", "relu6", "leaky_relu", "gelu", "silu", "tanh", "hardswish", "elu", "selu", "celu", "mish", "softsign",
    "neg", "abs", "sqrt", "square", "sin", "erf", "atan", "asin", "asinh", "sinh", "tan", "tanhshrink",
    "hardshrink", "softshrink", "sign", "sgn", "expm1", "log1p", "trunc", "rrelu", "dropout", "feature_dropout",
    "alpha_dropout", "feature_alpha_dropout", "identity", "positive", "deg2rad", "rad2deg", "nan_to_num",
)
NOT_ZERO_INVARIANT = (
    "sigmoid", "hardsigmoid", "exp", "cos", "softplus", "log_sigmoid", "cosh", "erfc", "exp2", "reciprocal",
    "log", "rsqrt", "logit", "acos", "bitwise_not", "log2", "log10",
)
CASTS = ("to", "clone", "contiguous", "alias", "detach", "type_as", "_assert_tensor_metadata_never")
SPATIAL = (
    "max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d",
    "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool1d", "adaptive_max_pool2d",
    "adaptive_max_pool3d", "max_pool2d_with_indices", "max_pool3d_with_indices", "lp_pool1d", "lp_pool2d",
    "upsample_nearest1d", "upsample_nearest2d", "upsample_nearest3d", "upsample_bilinear2d", "upsample_linear1d",
    "upsample_bicubic2d", "upsample_trilinear3d", "reflection_pad1d", "reflection_pad2d", "reflection_pad3d",
    "replication_pad1d", "replication_pad2d", "replication_pad3d", "fractional_max_pool2d",
)

add(ZeroInvariantUnary(), *ZERO_INVARIANT)
add(NotZeroInvariantUnary(), *NOT_ZERO_INVARIANT)
add(Cast(), *CASTS[:-1])
add(Clamp(), "clamp", "hardtanh", "clamp_min", "clamp_max")
add(Power(), "pow")
add(PReLU(), "prelu")
add(Spatial(), *SPATIAL)
add(Pad(), "pad", "constant_pad_nd")
add(ShapedLike(), "zeros_like", "ones_like", "full_like", "empty_like", "rand_like", "randn_like")
add(NoTensorOutput(), "sym_size", "sym_numel", "sym_stride", "sym_storage_offset", "_assert_tensor_metadata",
    "_assert_scalar", "sym_constrain_range", "sym_constrain_range_for_size", "_check_is_size")

__all__ = ["ZeroInvariantUnary", "NotZeroInvariantUnary", "Cast", "Clamp", "Power", "PReLU", "Spatial", "Pad",
           "ShapedLike", "NoTensorOutput", "same_channels", "ParamRef", "TensorChannels"]
