"""Rules for normalisations: batch / instance norm (per channel), group norm (per block of channels),
layer / RMS norm (over trailing dimensions)."""
from __future__ import annotations

import torch

from ..channels import TensorChannels
from .registry import MODULE_RULE_MATCHERS, Call, Context, IsZero, ModuleRule, Rule, add


def uses_input_statistics(call: Call) -> bool:
    """Normalised by the input's own statistics (instance norm, training-mode batch norm): zero stays zero."""
    if call.key == "instance_norm":
        return bool(call.get("use_input_stats", True))
    return bool(call.get("training", False))


class BatchNorm(Rule):
    """batch_norm / instance_norm normalise each channel alone: channel c owns weight[c] and bias[c]
    (zeroing both zeroes the channel), and its running statistics go with it (dependents).  Without
    affine parameters a zero channel maps to -mean/std, so it is not zero-invariant."""

    kind = "accessory"
    keeps_channels = True

    def channels(self, ctx: "Context", call: Call) -> None:
        t = ctx.channels(call.input)
        stats = [ctx.param(call.args.get(k)) for k in ("running_mean", "running_var")]
        if t is None:
            ctx.set(call, None)
            return
        if t.cdim != 1:
            ctx.refuse(call, f"{ctx.describe(call)} normalizes a moved channel dim")
            return
        wn = ctx.param_name(call.args.get("weight"))
        bn = ctx.param_name(call.args.get("bias"))
        for c, e in enumerate(t.elems):
            for name in (wn, bn):
                if name:
                    ctx.el.add_var(e, name, 0, c)
            for ref in stats:
                if ref is not None:
                    ctx.el.add_dep(e, ref.name, ref.dims[0], c)
        if wn is not None and bn is not None:
            ctx.set(call, TensorChannels(1, list(t.elems), [True] * len(t.elems)))
        elif uses_input_statistics(call):
            ctx.set(call, t.moved(1))
        else:
            ctx.set(call, t.not_zero(f"{ctx.describe(call)} without affine parameters (running mean is not zero)"))

    def zero_output(self, call: Call, is_zero: IsZero) -> bool:
        w, b = call.args.get("weight"), call.args.get("bias")
        if w is not None and b is not None and is_zero(w) and is_zero(b):
            return True
        return uses_input_statistics(call) and is_zero(call.input) and (b is None or is_zero(b))


class GroupNorm(Rule):
    """group_norm normalises blocks of channels together: a whole block is removed at once (its
    channels are coupled), and the module's group count shrinks with it (nn.GroupNorm only: its
    ``num_groups`` is rewritten from the sliced weight)."""

    kind = "accessory"
    keeps_channels = False  # slicing channels upstream would cut a normalisation block

    def channels(self, ctx: "Context", call: Call) -> None:
        t = ctx.channels(call.input)
        wn = ctx.param_name(call.args.get("weight"))
        bn = ctx.param_name(call.args.get("bias"))
        if t is None:
            ctx.set(call, None)
            return
        if t.cdim != 1:
            ctx.refuse(call)
            return
        ng = int(call["num_groups"])
        n = len(t.elems)
        block = n // ng
        for gi in range(ng):
            ctx.el.union_all(t.elems[gi * block:(gi + 1) * block])
        if not wn or call.node.module_type != "GroupNorm":
            # a functional call with a hard-coded group count, or no weight to re-derive it from
            ctx.el.mark(t.elems, f"{ctx.describe(call)} has no weight to carry a smaller group count")
        for c, e in enumerate(t.elems):
            for name in (wn, bn):
                if name:
                    ctx.el.add_var(e, name, 0, c)
        if wn and bn:
            ctx.set(call, TensorChannels(1, list(t.elems), [True] * n))
            return
        zi = [all(t.zi[gi * block:(gi + 1) * block]) for gi in range(ng) for _ in range(block)]
        ctx.set(call, TensorChannels(1, list(t.elems), zi, t.taint))

    def zero_output(self, call: Call, is_zero: IsZero) -> bool:
        w, b = call.args.get("weight"), call.args.get("bias")
        if w is not None and b is not None and is_zero(w) and is_zero(b):
            return True
        return is_zero(call.input) and (b is None or is_zero(b))


def normalised_width(ctx: "Context", t: TensorChannels, affine: list[str], where: str) -> TensorChannels:
    """The channels a norm module normalises together, when its slimmed copy keeps the full width's statistics:
    channel ``c`` goes with entry ``c`` of each ``affine`` parameter, a channel not zero at the input is kept (it
    feeds the sums), and one trial construction confirms the width may shrink (a forward may read sizes from it,
    ``b, n, c = x.shape`` ... ``reshape(b, n, heads, c // heads)``, which the trace records as numbers).  Returns
    the output's channels: zero where the input's are."""
    for c, (e, zero) in enumerate(zip(t.elems, t.zi)):
        for name in affine:
            ctx.el.add_var(e, name, 0, c)
        if not zero:
            ctx.el.mark([e], f"{where} normalizes over the channel dimension and this channel is not zero at its "
                             f"input ({t.taint or 'not zero-invariant'})")
    ctx.literal_sites.append((f"width {len(t.elems)} normalised by {where}", [e for e, z in zip(t.elems, t.zi) if z]))
    return TensorChannels(t.cdim, list(t.elems), list(t.zi), t.taint)


class LayerNorm(Rule):
    """layer_norm / rms_norm over the trailing ``normalized_shape`` dims.

    Over other dims each channel is normalised alone: zero stays zero, and a bias makes it non-zero.
    Over the channels, dropping one changes the statistics of the others, unless the dropped channel is
    exactly zero at the input (so it adds nothing to the sums) and the statistics keep dividing by the
    full width.  The slimmed copy of an ``nn.LayerNorm`` / ``nn.RMSNorm`` module does that
    (:class:`~lightning_oto.subnet.slim.PrunedLayerNorm`), so there a channel whose input is zero with
    its group goes with its ``weight`` / ``bias`` entries: this is how a transformer's hidden size is
    pruned exactly.  A functional call (no module to rewrite) keeps its channels."""

    kind = "accessory"

    def channels(self, ctx: "Context", call: Call) -> None:
        t = ctx.channels(call.input)
        xs = ctx.shape(call.input)
        if t is None or xs is None:
            ctx.set(call, None)
            return
        k = len(call["normalized_shape"])
        if t.cdim >= len(xs) - k:
            if not self._prunable_width(ctx, call, t, xs, k):
                ctx.el.mark(t.elems, f"{ctx.describe(call)} normalizes over the channel dimension")
                ctx.set(call, t.not_zero(call.node.op))
            return
        ctx.param(call.args.get("weight"))
        b = call.args.get("bias")
        ctx.param(b)
        ctx.set(call, t.moved(t.cdim) if b is None else t.not_zero(f"{call.node.op} bias"))

    @staticmethod
    def _prunable_width(ctx: "Context", call: Call, t: TensorChannels, xs: tuple[int, ...], k: int) -> bool:
        """Channels normalised together by a module whose slimmed copy keeps the full width's statistics:
        each goes with its affine entries; a channel not zero at the input is kept (it feeds the sums)."""
        module = ctx._module(call.node.module) if call.node.module else None
        if k != 1 or t.cdim != len(xs) - 1 or type(module) not in (torch.nn.LayerNorm, torch.nn.RMSNorm):
            return False
        wn = ctx.param_name(call.args.get("weight"))
        if wn is None:  # no affine weight: a removed channel would come out as -mean / std, not zero
            return False
        bn = ctx.param_name(call.args.get("bias")) if call.args.get("bias") is not None else None
        if call.args.get("bias") is not None and bn is None:
            return False
        ctx.set(call, normalised_width(ctx, t, [n for n in (wn, bn) if n], ctx.describe(call)))
        return True

    def zero_output(self, call: Call, is_zero: IsZero) -> bool:
        w, b = call.args.get("weight"), call.args.get("bias")
        return (is_zero(call.input) or (w is not None and is_zero(w))) and (b is None or is_zero(b))


def is_variance_rms_norm(module: "torch.nn.Module") -> bool:
    """``transformers``' RMSNorm, copied into every model file (``LlamaRMSNorm``, ``MistralRMSNorm``, ...):
    ``weight * x / sqrt(mean(x**2) + variance_epsilon)`` over the last dim, no bias."""
    w = getattr(module, "weight", None)
    return type(module).__name__.endswith("RMSNorm") and isinstance(w, torch.nn.Parameter) and w.dim() == 1 \
        and isinstance(getattr(module, "variance_epsilon", None), float) and getattr(module, "bias", None) is None


class VarianceRMSNorm(ModuleRule):
    """A ``transformers`` RMSNorm module over the hidden size, as one call (its forward is decomposed into
    ``pow``, ``mean``, ``rsqrt``, ``mul``): a channel zero at the input goes with its ``weight`` entry, and the
    slimmed copy keeps dividing by the full width (:class:`~lightning_oto.subnet.slim.PrunedVarianceRMSNorm`).
    Gemma's (``1 + weight``, an ``eps`` attribute) is not matched; any other matched class whose maths differ
    fails the trial construction and keeps its width."""

    kind = "accessory"

    def module_channels(self, ctx: "Context", path: str, module: "torch.nn.Module", calls: list[Call],
                        inputs: list, outputs: list) -> None:
        weight = f"{path}.weight" if path else "weight"
        t = ctx.channels(inputs[0]) if len(inputs) == 1 else None
        xs = ctx.shape(inputs[0]) if len(inputs) == 1 else None
        # besides the result, the forward's ``x.to(float32)`` of the input may be read outside (a float32 model's
        # residual reads it: the cast is the input itself); it carries the input's channels
        casts = [o for o in outputs if o.target in (torch.ops.aten.to.dtype, torch.ops.aten._to_copy.default)
                 and o.args and o.args[0] is (inputs[0] if inputs else None)]
        results = [o for o in outputs if o not in casts]
        if t is None or xs is None or len(results) != 1 or not ctx.take_params(calls, [weight]) \
                or t.cdim != len(xs) - 1 or len(t.elems) != module.weight.shape[0]:
            ctx.refuse_module(calls, inputs, outputs, f"{path} ({type(module).__name__}) is not an RMSNorm over "
                                                      "the last dimension of one input")
            return
        out = normalised_width(ctx, t, [weight], f"{path} ({type(module).__name__})")
        for c in calls:
            ctx.info[c.node.name] = None
        for o in casts:
            ctx.info[o.name] = t
        ctx.info[results[0].name] = out


_rms = VarianceRMSNorm()
_rms.ops = ("transformers RMSNorm",)
MODULE_RULE_MATCHERS.append((is_variance_rms_norm, _rms))

add(BatchNorm(), "batch_norm", "instance_norm")
add(GroupNorm(), "group_norm")
add(LayerNorm(), "layer_norm", "rms_norm")

__all__ = ["BatchNorm", "GroupNorm", "LayerNorm", "VarianceRMSNorm", "is_variance_rms_norm", "normalised_width"]
