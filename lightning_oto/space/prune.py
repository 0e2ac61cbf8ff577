"""Prune-mode search space: zero-invariant channel groups (ZIGs) by union-find over channels.

Every channel of every tracked tensor is an *element*.  Producers (conv / linear / conv-transpose)
create elements; element-wise joins (add, mul, ...) and coupled ops (depthwise / group conv,
GroupNorm blocks, shared weights) union them; concat lays them side by side; flatten repeats them
over a feature block.  Each tensor also carries, per channel, whether it is *zero-invariant*: zero
when the channel's group is zero.  A consumer reading a channel that is not zero-invariant, an
operator the engine does not understand, a LayerNorm over channels or the model output make the
touched elements unprunable.  One group per union-find component that owns variables.
Single forward walk over the graph: O(V + E + channels).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
import torch.fx

from ..graph.trace import OpGraph, OpNode, concrete_shape
from .groups import Group, ParamSlice

log = logging.getLogger("lightning_oto")

ZI_UNARY = {
    "relu", "relu_", "relu6", "hardtanh", "hardtanh_", "leaky_relu", "leaky_relu_", "gelu", "gelu_", "silu",
    "silu_", "tanh", "tanh_", "hardswish", "hardswish_", "elu", "elu_", "selu", "selu_", "celu", "mish",
    "softsign", "neg", "abs", "sqrt", "square", "sin", "erf", "atan", "asin", "sinh", "tanhshrink",
    "hardshrink", "softshrink", "sign", "expm1", "dropout", "dropout_", "feature_dropout", "alpha_dropout",
    "feature_alpha_dropout", "clone", "contiguous", "alias", "detach", "detach_", "to", "_to_copy",
    "type_as", "lift_fresh_copy", "identity", "_assert_tensor_metadata", "relu6_", "native_dropout",
}
NONZI_UNARY = {
    "sigmoid", "sigmoid_", "hardsigmoid", "hardsigmoid_", "exp", "exp_", "cos", "softplus", "log_sigmoid",
    "cosh", "erfc", "exp2", "reciprocal", "log", "log1p_never",
}
SPATIAL = {
    "max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d",
    "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool1d",
    "adaptive_max_pool2d", "adaptive_max_pool3d", "upsample_nearest1d", "upsample_nearest2d",
    "upsample_nearest3d", "upsample_bilinear2d", "upsample_linear1d", "upsample_bicubic2d",
    "upsample_trilinear3d", "_upsample_nearest_exact2d", "reflection_pad1d", "reflection_pad2d",
    "replication_pad1d", "replication_pad2d", "max_pool2d_with_indices", "lp_pool2d", "pixel_unshuffle_never",
}
REDUCE = {"mean", "sum", "amax", "amin", "max", "min", "var", "std", "logsumexp_never", "norm_never"}
VIEWS = {"view", "reshape", "_unsafe_view", "flatten", "unflatten", "unsqueeze", "squeeze", "view_copy"}
CONV = {"conv1d", "conv2d", "conv3d"}
CONVT = {"conv_transpose1d", "conv_transpose2d", "conv_transpose3d"}


@dataclass
class TInfo:
    """Channel structure of one tensor: which element sits at each index of dimension ``cdim``."""

    cdim: int
    elems: list[int]
    zi: list[bool]
    taint: str = ""  # why some channel is not zero-invariant (first reason)


class _UF:
    def __init__(self) -> None:
        self.parent: list[int] = []

    def add(self) -> int:
        self.parent.append(len(self.parent))
        return len(self.parent) - 1

    def find(self, a: int) -> int:
        p = self.parent
        while p[a] != a:
            p[a] = p[p[a]]
            a = p[a]
        return a

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            if ra < rb:
                self.parent[rb] = ra
            else:
                self.parent[ra] = rb


@dataclass
class PruneSpace:
    """Result of the analysis: the groups plus what construction needs."""

    groups: list[Group]
    unprunable_ops: dict[str, str] = field(default_factory=dict)  # op description -> reason


class ChannelAnalysis:
    """Forward walk assigning channel elements to every tensor of the trace graph."""

    def __init__(self, graph: OpGraph) -> None:
        self.g = graph
        self.uf = _UF()
        self.reason: dict[int, str] = {}
        # element -> [(tensor name, dim, index)]; ParamSlices are only built once per group
        self.vars: dict[int, list[tuple[str, int, int]]] = {}
        self.deps: dict[int, list[tuple[str, int, int]]] = {}
        self.claim_var: dict[tuple[str, int, int], int] = {}
        self.claim_dep: dict[tuple[str, int, int], int] = {}
        self.var_dim: dict[str, int] = {}
        self.info: dict[str, Any] = {}  # fx node name -> TInfo | None | list[TInfo | None]
        self.param_ok: set[tuple[str, str]] = set()  # (fx node name, param/buffer name) used in a known way
        self.param_elems: dict[str, set[int]] = {}
        self.unknown_ops: dict[str, str] = {}
        self.ph_param = graph.placeholder_to_param
        self.ph_buffer = graph.placeholder_to_buffer

    # ----------------------------------------------------------------- elements
    def new_elem(self, reason: str | None = None) -> int:
        e = self.uf.add()
        if reason:
            self.reason[e] = reason
        return e

    def mark(self, elems: Iterable[int], reason: str) -> None:
        for e in elems:
            self.reason.setdefault(e, reason)

    def add_var(self, e: int, name: str, dim: int, idx: int) -> None:
        key = (name, dim, idx)
        if key in self.claim_var:
            self.uf.union(self.claim_var[key], e)
            return
        self.claim_var[key] = e
        if self.var_dim.setdefault(name, dim) != dim:
            self.mark([e], f"parameter {name} is sliced along two dimensions")
        self.vars.setdefault(e, []).append(key)
        self.param_elems.setdefault(name, set()).add(e)

    def add_dep(self, e: int, name: str, dim: int, idx: int) -> None:
        key = (name, dim, idx)
        if key in self.claim_dep:
            self.uf.union(self.claim_dep[key], e)
            return
        self.claim_dep[key] = e
        self.deps.setdefault(e, []).append(key)
        self.param_elems.setdefault(name, set()).add(e)

    def pin(self, name: str, dim: int, n: int, reason: str) -> None:
        """Columns 0..n-1 of ``name`` along ``dim`` must stay: whoever else claims them becomes unprunable."""
        for i in range(n):
            self.add_dep(self.new_elem(reason), name, dim, i)

    # ----------------------------------------------------------------- helpers
    def arg(self, fx: torch.fx.Node, i: int, name: str | None = None, default: Any = None) -> Any:
        if len(fx.args) > i:
            return fx.args[i]
        if name is not None and name in fx.kwargs:
            return fx.kwargs[name]
        return default

    def tinfo(self, a: Any) -> TInfo | None:
        if isinstance(a, torch.fx.Node):
            v = self.info.get(a.name)
            return v if isinstance(v, TInfo) else None
        return None

    def pname(self, a: Any) -> str | None:
        if isinstance(a, torch.fx.Node) and a.op == "placeholder":
            return self.ph_param.get(a.name)
        return None

    def bname(self, a: Any) -> str | None:
        if isinstance(a, torch.fx.Node) and a.op == "placeholder":
            return self.ph_buffer.get(a.name)
        return None

    @staticmethod
    def shape(a: Any) -> tuple[int, ...] | None:
        if isinstance(a, torch.fx.Node):
            v = a.meta.get("val")
            if isinstance(v, torch.Tensor):
                return concrete_shape(v)
        return None

    def ok(self, fx: torch.fx.Node, *args: Any) -> None:
        for a in args:
            n = self.pname(a) or self.bname(a)
            if n:
                self.param_ok.add((fx.name, n))

    def describe(self, node: OpNode) -> str:
        return f"{node.op}" + (f" in {node.module} ({node.module_type})" if node.module else " in forward()")

    def unknown(self, node: OpNode, why: str | None = None) -> None:
        desc = self.describe(node)
        reason = why or f"unsupported operator {desc}"
        for a in node.fx_node.all_input_nodes:
            t = self.info.get(a.name)
            ts = t if isinstance(t, list) else [t]
            for ti in ts:
                if isinstance(ti, TInfo):
                    self.mark(ti.elems, reason)
        if node.fx_node.all_input_nodes and any(isinstance(self.info.get(a.name), (TInfo, list))
                                                for a in node.fx_node.all_input_nodes):
            self.unknown_ops.setdefault(desc, reason)
        self.info[node.name] = None

    # ----------------------------------------------------------------- main walk
    def run(self) -> PruneSpace:
        self.walk()
        return self.make_groups()

    def walk(self) -> None:
        """Assign channel elements to every tensor (no groups yet); erase mode stops here."""
        for node in self.g.nodes:
            if node.kind == "input":
                self.info[node.name] = None
                continue
            if node.kind == "output":
                for a in node.fx_node.all_input_nodes:
                    t = self.info.get(a.name)
                    for ti in (t if isinstance(t, list) else [t]):
                        if isinstance(ti, TInfo):
                            self.mark(ti.elems, "reaches the model output")
                continue
            self.visit(node)
        self.check_param_uses()

    def visit(self, node: OpNode) -> None:
        op = node.op
        fx = node.fx_node
        if op in CONV or op == "convolution" or op in CONVT:
            self.conv(node)
        elif op == "linear":
            self.linear(node)
        elif op in ("batch_norm", "instance_norm", "_native_batch_norm_legit_no_training"):
            self.batch_norm(node)
        elif op == "group_norm":
            self.group_norm(node)
        elif op == "layer_norm":
            self.layer_norm(node)
        elif op in ZI_UNARY or op in NONZI_UNARY:
            self.unary(node, zi=op in ZI_UNARY)
        elif op in ("hardtanh", "clamp", "clip"):
            self.unary(node, zi=True)
        elif op in ("pow",):
            ex = self.arg(fx, 1)
            self.unary(node, zi=isinstance(ex, (int, float)) and ex > 0)
        elif op in ("prelu", "_prelu_kernel"):
            self.prelu(node)
        elif op in SPATIAL or op in ("constant_pad_nd", "pad"):
            self.spatial(node)
        elif op in ("add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_"):
            self.binary(node)
        elif op in ("cat", "concat"):
            self.cat(node)
        elif op in REDUCE:
            self.reduce(node)
        elif op in VIEWS:
            self.view(node)
        elif op in ("permute", "transpose", "t", "swapaxes", "movedim"):
            self.permute(node)
        elif op in ("expand", "expand_as"):
            self.expand(node)
        elif op == "slice":
            self.slice(node)
        elif op == "select":
            self.select(node)
        elif op in ("split", "split_with_sizes", "chunk", "unbind", "tensor_split"):
            self.split(node)
        elif op == "getitem":
            self.getitem(node)
        else:
            self.unknown(node)

    # ----------------------------------------------------------------- stems
    def conv(self, node: OpNode) -> None:
        fx = node.fx_node
        op = node.op
        x, w, b = self.arg(fx, 0), self.arg(fx, 1), self.arg(fx, 2, "bias")
        if op == "convolution":
            transposed = bool(self.arg(fx, 6))
            groups = int(self.arg(fx, 8, default=1))
        else:
            transposed = op in CONVT
            groups = int(self.arg(fx, 6 if transposed else 6, "groups", default=1) or 1)
        wname, bname = self.pname(w), self.pname(b)
        wshape = self.shape(w)
        out_shape = node.shape
        inp = self.tinfo(x)
        if wshape is None or out_shape is None:
            self.unknown(node)
            return
        self.ok(fx, w, b)
        cout = out_shape[1]
        cin = wshape[0] if transposed else wshape[1] * groups
        reason = None
        if wname is None or (b is not None and bname is None):
            reason = f"weight of {self.describe(node)} is computed, not a parameter"
        if transposed and groups != 1:
            reason = f"grouped transposed convolution {self.describe(node)}"
        outs = [self.new_elem(reason) for _ in range(cout)]
        if wname is not None:
            # a transposed weight is (C_in, C_out / groups, ...): output o of every group reads column o % per
            per = cout // groups if transposed else cout
            for o in range(cout):
                self.add_var(outs[o], wname, 1 if transposed else 0, o % per)
        if bname is not None:
            for o in range(cout):
                self.add_var(outs[o], bname, 0, o)
        self.info[node.name] = TInfo(1, outs, [True] * cout)
        grouped = groups > 1 and not transposed
        in_dim = 0 if transposed else 1
        if inp is None:
            if grouped:
                # removing a conv group means removing its input channels too, and these are not ours
                self.mark(outs, f"grouped convolution {self.describe(node)} reads an untracked tensor")
            elif wname is not None:
                self.pin(wname, in_dim, cin, f"{self.describe(node)} also reads an untracked tensor")
            return
        if inp.cdim != 1 or len(inp.elems) != cin:
            why = f"{self.describe(node)} reads a tensor whose channels moved"
            self.mark(inp.elems, why)
            if grouped:
                self.mark(outs, why)
            elif wname is not None:
                self.pin(wname, in_dim, cin, why)
            return
        if groups == 1 or transposed:
            if reason:
                self.mark(inp.elems, reason)
                if wname is not None:
                    self.pin(wname, in_dim, wshape[in_dim], reason)
                return
            for c, e in enumerate(inp.elems):
                if not inp.zi[c]:
                    self.mark([e], f"non-zero-invariant input ({inp.taint}) to {self.describe(node)}")
                if wname is not None:
                    # claimed even when unprunable: a shared weight's other call must not drop the column
                    self.add_dep(e, wname, in_dim, c)
        else:
            in_per, out_per = cin // groups, cout // groups
            for gi in range(groups):
                for c in range(gi * in_per, (gi + 1) * in_per):
                    for o in range(gi * out_per, (gi + 1) * out_per):
                        self.uf.union(inp.elems[c], outs[o])
                        break  # one union per input channel suffices; outputs chained below
                for o in range(gi * out_per + 1, (gi + 1) * out_per):
                    self.uf.union(outs[gi * out_per], outs[o])

    def linear(self, node: OpNode) -> None:
        fx = node.fx_node
        x, w, b = self.arg(fx, 0), self.arg(fx, 1), self.arg(fx, 2, "bias")
        wname, bname = self.pname(w), self.pname(b)
        wshape = self.shape(w)
        out_shape = node.shape
        if wshape is None or out_shape is None:
            self.unknown(node)
            return
        self.ok(fx, w, b)
        reason = None
        if wname is None or (b is not None and bname is None):
            reason = f"weight of {self.describe(node)} is computed, not a parameter"
        nout = wshape[0]
        outs = [self.new_elem(reason) for _ in range(nout)]
        if wname is not None:
            for o in range(nout):
                self.add_var(outs[o], wname, 0, o)
        if bname is not None:
            for o in range(nout):
                self.add_var(outs[o], bname, 0, o)
        self.info[node.name] = TInfo(len(out_shape) - 1, outs, [True] * nout)
        inp = self.tinfo(x)
        if inp is None:
            if wname is not None:
                self.pin(wname, 1, wshape[1], f"{self.describe(node)} also reads an untracked tensor")
            return
        xs = self.shape(x)
        if xs is None or inp.cdim != len(xs) - 1 or len(inp.elems) != wshape[1]:
            why = f"{self.describe(node)} mixes a dimension other than the channels"
            self.mark(inp.elems, why)
            if wname is not None:
                self.pin(wname, 1, wshape[1], why)
            return
        if reason:
            self.mark(inp.elems, reason)
            if wname is not None:
                self.pin(wname, 1, wshape[1], reason)
            return
        for c, e in enumerate(inp.elems):
            if not inp.zi[c]:
                self.mark([e], f"non-zero-invariant input ({inp.taint}) to {self.describe(node)}")
            # claimed even when unprunable: a shared weight's other call must not drop the column
            self.add_dep(e, wname, 1, c)

    # ----------------------------------------------------------------- norms
    def batch_norm(self, node: OpNode) -> None:
        fx = node.fx_node
        x, w, b = self.arg(fx, 0), self.arg(fx, 1), self.arg(fx, 2)
        rm, rv = self.arg(fx, 3), self.arg(fx, 4)
        inp = self.tinfo(x)
        self.ok(fx, w, b, rm, rv)
        if inp is None:
            self.info[node.name] = None
            self.taint_params(node, w, b)
            return
        if inp.cdim != 1:
            self.unknown(node, f"{self.describe(node)} normalizes a moved channel dim")
            self.taint_params(node, w, b)
            return
        wn, bn = self.pname(w), self.pname(b)
        for c, e in enumerate(inp.elems):
            if wn:
                self.add_var(e, wn, 0, c)
            if bn:
                self.add_var(e, bn, 0, c)
            for buf in (rm, rv):
                n = self.bname(buf) or self.pname(buf)
                if n:
                    self.add_dep(e, n, 0, c)
        affine = wn is not None and bn is not None
        use_input_stats = node.op == "instance_norm" and bool(self.arg(fx, 5, default=True))
        if affine:
            zi = [True] * len(inp.elems)
            taint = ""
        elif use_input_stats:
            zi, taint = list(inp.zi), inp.taint
        else:
            zi = [False] * len(inp.elems)
            taint = f"{self.describe(node)} without affine parameters (running mean is not zero)"
        self.info[node.name] = TInfo(1, list(inp.elems), zi, taint)

    def taint_params(self, node: OpNode, *args: Any) -> None:
        for a in args:
            n = self.pname(a)
            if n:
                self.param_ok.discard((node.name, n))

    def group_norm(self, node: OpNode) -> None:
        fx = node.fx_node
        x, ng, w, b = self.arg(fx, 0), int(self.arg(fx, 1)), self.arg(fx, 2), self.arg(fx, 3)
        inp = self.tinfo(x)
        self.ok(fx, w, b)
        if inp is None:
            self.info[node.name] = None
            return
        if inp.cdim != 1:
            self.unknown(node)
            return
        C = len(inp.elems)
        block = C // ng
        for gi in range(ng):
            for c in range(gi * block + 1, (gi + 1) * block):
                self.uf.union(inp.elems[gi * block], inp.elems[c])
        wn, bn = self.pname(w), self.pname(b)
        if not wn or node.module_type != "GroupNorm":
            # construction re-derives num_groups from the sliced weight of an nn.GroupNorm; without one
            # (affine=False, or a functional call with a hard-coded group count) it cannot follow
            self.mark(inp.elems, f"{self.describe(node)} has no weight to carry a smaller group count")
        for c, e in enumerate(inp.elems):
            if wn:
                self.add_var(e, wn, 0, c)
            if bn:
                self.add_var(e, bn, 0, c)
        if wn and bn:
            zi, taint = [True] * C, ""
        else:
            zi = []
            for gi in range(ng):
                allz = all(inp.zi[gi * block:(gi + 1) * block])
                zi += [allz] * block
            taint = inp.taint
        self.info[node.name] = TInfo(1, list(inp.elems), zi, taint)

    def layer_norm(self, node: OpNode) -> None:
        fx = node.fx_node
        x, ns, w, b = self.arg(fx, 0), self.arg(fx, 1), self.arg(fx, 2), self.arg(fx, 3)
        inp = self.tinfo(x)
        xs = self.shape(x)
        if inp is None or xs is None:
            self.info[node.name] = None
            return
        k = len(ns)
        if inp.cdim >= len(xs) - k:
            self.mark(inp.elems, f"{self.describe(node)} normalizes over the channel dimension")
            self.info[node.name] = TInfo(inp.cdim, list(inp.elems), [False] * len(inp.elems), "layer_norm")
            return
        self.ok(fx, w, b)
        zi = list(inp.zi) if b is None else [False] * len(inp.elems)
        self.info[node.name] = TInfo(inp.cdim, list(inp.elems), zi, inp.taint or "layer_norm bias")

    # ----------------------------------------------------------------- element-wise
    def unary(self, node: OpNode, zi: bool) -> None:
        inp = self.tinfo(node.fx_node.args[0] if node.fx_node.args else None)
        if inp is None:
            self.info[node.name] = None
            return
        if node.shape is not None and self.shape(node.fx_node.args[0]) != node.shape:
            self.unknown(node)
            return
        if zi:
            self.info[node.name] = TInfo(inp.cdim, list(inp.elems), list(inp.zi), inp.taint)
        else:
            self.info[node.name] = TInfo(inp.cdim, list(inp.elems), [False] * len(inp.elems),
                                         inp.taint or f"{self.describe(node)}(0) != 0")

    def prelu(self, node: OpNode) -> None:
        fx = node.fx_node
        x, w = self.arg(fx, 0), self.arg(fx, 1)
        inp = self.tinfo(x)
        self.ok(fx, w)
        if inp is None:
            self.info[node.name] = None
            return
        ws = self.shape(w)
        wn = self.pname(w)
        if wn and ws and ws[0] == len(inp.elems) and ws[0] > 1:
            if inp.cdim != 1:
                self.unknown(node)
                return
            for c, e in enumerate(inp.elems):
                self.add_dep(e, wn, 0, c)
        self.info[node.name] = TInfo(inp.cdim, list(inp.elems), list(inp.zi), inp.taint)

    def spatial(self, node: OpNode) -> None:
        fx = node.fx_node
        x = fx.args[0]
        inp = self.tinfo(x)
        xs = self.shape(x)
        if inp is None:
            self.info[node.name] = None if node.op != "max_pool2d_with_indices" else [None, None]
            return
        out = node.shape
        if node.op in ("constant_pad_nd", "pad"):
            pad = list(self.arg(fx, 1))
            touched = {len(xs) - 1 - i // 2 for i in range(len(pad)) if pad[i] != 0}
            value = self.arg(fx, 2, "value", 0) or 0
            if inp.cdim in touched:
                self.unknown(node, f"{self.describe(node)} pads the channel dimension")
                return
            zi = list(inp.zi) if value == 0 else [False] * len(inp.elems)
            self.info[node.name] = TInfo(inp.cdim, list(inp.elems), zi, inp.taint or "non-zero padding")
            return
        if inp.cdim != 1 and not (inp.cdim == 0 and xs is not None and len(xs) in (2, 3)):
            self.unknown(node, f"{self.describe(node)} pools a dimension holding channels")
            return
        t = TInfo(inp.cdim, list(inp.elems), list(inp.zi), inp.taint)
        if node.op == "max_pool2d_with_indices":
            self.info[node.name] = [t, None]
        else:
            if out is not None and xs is not None and (len(out) != len(xs) or out[inp.cdim] != xs[inp.cdim]):
                self.unknown(node)
                return
            self.info[node.name] = t

    def binary(self, node: OpNode) -> None:
        fx = node.fx_node
        op = node.op.rstrip("_")
        a, b = self.arg(fx, 0), self.arg(fx, 1, "other")
        alpha = fx.kwargs.get("alpha", 1)
        out = node.shape
        if out is None:
            self.unknown(node)
            return
        n_out = len(out)
        ta, tb = self.tinfo(a), self.tinfo(b)
        if ta is None and tb is None:
            # parameters / buffers combined with untracked data: harmless unless sliced later
            self.info[node.name] = None
            if self.pname(a) or self.pname(b):
                self.unknown_param_use(node)
            return
        if ta is None and op in ("add", "mul"):
            a, b, ta, tb = b, a, tb, ta  # commutative: keep the tracked side first
        elif ta is None:
            # scalar/untracked minus/over tracked
            sa = self.shape(a)
            if op == "div":
                self.unknown(node, f"{self.describe(node)} divides by a channel tensor")
                return
            if sa is not None and self._size_at(sa, tb, self.shape(b), n_out) > 1:
                self.unknown(node)
                return
            self.info[node.name] = TInfo(self._cdim_out(tb, self.shape(b), n_out), list(tb.elems),
                                         [False] * len(tb.elems), f"{self.describe(node)} adds a constant")
            return
        sa = self.shape(a)
        cd = self._cdim_out(ta, sa, n_out)
        C = len(ta.elems)
        if tb is not None:
            sb = self.shape(b)
            cb = self._cdim_out(tb, sb, n_out)
            if cb != cd or len(tb.elems) != C:
                # one side broadcasts over the other's channels, or channels sit in different dims
                if sb is not None and self._size_at(sb, ta, sa, n_out) == 1 and \
                        sa is not None and self._size_at(sa, tb, sb, n_out) == 1:
                    self.unknown(node, f"{self.describe(node)} combines two channel dims (outer product)")
                    return
                self.unknown(node, f"{self.describe(node)} mixes channels laid out differently")
                return
            for x, y in zip(ta.elems, tb.elems):
                self.uf.union(x, y)
            if op == "div":
                # a zeroed group would divide 0 by 0 (or by a channel we cannot prove non-zero)
                self.mark(tb.elems, f"{self.describe(node)} divides by a channel tensor")
            if op == "mul":
                zi = [p or q for p, q in zip(ta.zi, tb.zi)]
            elif op == "div":
                zi = list(ta.zi)
            else:
                zi = [p and q for p, q in zip(ta.zi, tb.zi)]
            self.info[node.name] = TInfo(cd, list(ta.elems), zi, ta.taint or tb.taint)
            return
        # b untracked: python scalar, parameter, buffer or data tensor
        if not isinstance(b, torch.fx.Node):
            if op in ("mul", "div"):
                zi = list(ta.zi)
            else:
                zi = list(ta.zi) if (b == 0 or alpha == 0) else [False] * C
            self.info[node.name] = TInfo(cd, list(ta.elems), zi, ta.taint or f"{self.describe(node)} adds a constant")
            return
        sb = self.shape(b) or ()
        size_b = self._size_at(sb, ta, sa, n_out)
        if size_b <= 1:
            if op in ("mul", "div"):
                zi = list(ta.zi)
            else:
                zi = [False] * C
            self.info[node.name] = TInfo(cd, list(ta.elems), zi,
                                         ta.taint or f"{self.describe(node)} adds a broadcast tensor")
            return
        pn, bn = self.pname(b), self.bname(b)
        if pn or bn:
            self.ok(fx, b)
            dim_b = cd - (n_out - len(sb))
            for c, e in enumerate(ta.elems):
                if pn and op != "div":
                    self.add_var(e, pn, dim_b, c)
                else:  # a buffer, or a divisor (zeroing it would divide by zero): removed, never zeroed
                    self.add_dep(e, pn or bn, dim_b, c)
            if op == "mul":
                zi = [True] * C if pn else list(ta.zi)
            elif op == "div":
                zi = list(ta.zi)
            else:
                zi = list(ta.zi) if pn else [False] * C
            self.info[node.name] = TInfo(cd, list(ta.elems), zi, ta.taint or f"{self.describe(node)} adds a buffer")
            return
        self.unknown(node, f"{self.describe(node)} combines channels with an untracked tensor")

    def unknown_param_use(self, node: OpNode) -> None:
        pass  # the parameter use stays un-ok'd; check_param_uses taints it

    @staticmethod
    def _cdim_out(t: TInfo, shape: tuple[int, ...] | None, n_out: int) -> int:
        n_in = len(shape) if shape is not None else n_out
        return t.cdim + (n_out - n_in)

    def _size_at(self, other_shape: tuple[int, ...], t: TInfo, t_shape: tuple[int, ...] | None, n_out: int) -> int:
        cd = self._cdim_out(t, t_shape, n_out)
        i = cd - (n_out - len(other_shape))
        if i < 0:
            return 1
        return other_shape[i]

    def cat(self, node: OpNode) -> None:
        fx = node.fx_node
        tensors = list(self.arg(fx, 0))
        dim = self.arg(fx, 1, "dim", 0)
        out = node.shape
        if out is None:
            self.unknown(node)
            return
        dim = dim % len(out)
        infos = [self.tinfo(t) for t in tensors]
        if all(i is None for i in infos):
            self.info[node.name] = None
            return
        cdims = {i.cdim for i in infos if i is not None}
        if len(cdims) != 1:
            self.unknown(node)
            return
        cd = cdims.pop()
        if cd == dim:
            elems: list[int] = []
            zi: list[bool] = []
            taint = ""
            for t, i in zip(tensors, infos):
                if i is None:
                    n = (self.shape(t) or (0,) * (dim + 1))[dim]
                    elems += [self.new_elem(f"concatenated with an untracked tensor in {self.describe(node)}")
                              for _ in range(n)]
                    zi += [True] * n
                else:
                    elems += i.elems
                    zi += i.zi
                    taint = taint or i.taint
            self.info[node.name] = TInfo(cd, elems, zi, taint)
            return
        first = next(i for i in infos if i is not None)
        if any(i is None for i in infos) or any(len(i.elems) != len(first.elems) for i in infos):
            self.unknown(node)
            return
        for i in infos:
            for x, y in zip(first.elems, i.elems):
                self.uf.union(x, y)
        zi = [all(z) for z in zip(*(i.zi for i in infos))]
        self.info[node.name] = TInfo(cd, list(first.elems), zi, first.taint)

    def reduce(self, node: OpNode) -> None:
        fx = node.fx_node
        x = fx.args[0]
        inp = self.tinfo(x)
        xs = self.shape(x)
        if inp is None:
            self.info[node.name] = None if node.op not in ("max", "min") or len(fx.args) < 2 else [None, None]
            return
        dims = self.arg(fx, 1, "dim")
        if dims is None or xs is None:
            self.unknown(node, f"{self.describe(node)} reduces over the channels")
            return
        if isinstance(dims, int):
            dims = [dims]
        dims = [d % len(xs) for d in dims]
        keep = bool(self.arg(fx, 2, "keepdim", False))
        if inp.cdim in dims:
            self.unknown(node, f"{self.describe(node)} reduces over the channels")
            return
        cd = inp.cdim if keep else inp.cdim - sum(1 for d in dims if d < inp.cdim)
        t = TInfo(cd, list(inp.elems), list(inp.zi), inp.taint)
        if node.op in ("max", "min") and len(fx.args) >= 2 and isinstance(fx.args[1], int):
            self.info[node.name] = [t, None]
        else:
            self.info[node.name] = t

    # ----------------------------------------------------------------- shapes
    def view(self, node: OpNode) -> None:
        x = node.fx_node.args[0]
        inp = self.tinfo(x)
        si, so = self.shape(x), node.shape
        if inp is None:
            self.info[node.name] = None
            return
        if si is None or so is None:
            self.unknown(node)
            return
        c = inp.cdim
        C = si[c]
        pre = math.prod(si[:c])
        post = math.prod(si[c + 1:])
        # find output dim k whose prefix product equals the input's prefix before the channel dim
        acc, k = 1, 0
        while k < len(so) and acc < pre:
            acc *= so[k]
            k += 1
        while k < len(so) and so[k] == 1 and acc == pre and C != 1:
            k += 1  # skip inserted singleton dims before the channel dim
        if acc != pre or k >= len(so) or so[k] % C != 0:
            self.unknown(node, f"{self.describe(node)} reshapes the channel dimension")
            return
        block = so[k] // C
        if post % block != 0 or math.prod(so[k + 1:]) * block != post:
            self.unknown(node, f"{self.describe(node)} reshapes the channel dimension")
            return
        if block == 1:
            self.info[node.name] = TInfo(k, list(inp.elems), list(inp.zi), inp.taint)
        else:
            elems = [e for e in inp.elems for _ in range(block)]
            zi = [z for z in inp.zi for _ in range(block)]
            self.info[node.name] = TInfo(k, elems, zi, inp.taint)

    def permute(self, node: OpNode) -> None:
        fx = node.fx_node
        inp = self.tinfo(fx.args[0])
        xs = self.shape(fx.args[0])
        if inp is None:
            self.info[node.name] = None
            return
        n = len(xs) if xs else 0
        op = node.op
        c = inp.cdim
        if op == "permute":
            perm = [d % n for d in fx.args[1]]
            nc = perm.index(c)
        elif op == "t":
            nc = 1 - c if n == 2 else c
        elif op == "movedim":
            src, dst = fx.args[1], fx.args[2]
            order = list(range(n))
            src = [src] if isinstance(src, int) else list(src)
            dst = [dst] if isinstance(dst, int) else list(dst)
            src = [s % n for s in src]
            dst = [d % n for d in dst]
            rest = [d for d in order if d not in src]
            perm = [None] * n
            for s, d in zip(src, dst):
                perm[d] = s
            it = iter(rest)
            perm = [p if p is not None else next(it) for p in perm]
            nc = perm.index(c)
        else:
            d0, d1 = fx.args[1] % n, fx.args[2] % n
            nc = d1 if c == d0 else d0 if c == d1 else c
        self.info[node.name] = TInfo(nc, list(inp.elems), list(inp.zi), inp.taint)

    def expand(self, node: OpNode) -> None:
        fx = node.fx_node
        inp = self.tinfo(fx.args[0])
        xs = self.shape(fx.args[0])
        if inp is None:
            self.info[node.name] = None
            return
        out = node.shape
        nc = inp.cdim + len(out) - len(xs)
        if out[nc] != xs[inp.cdim]:
            self.unknown(node)
            return
        self.info[node.name] = TInfo(nc, list(inp.elems), list(inp.zi), inp.taint)

    def slice(self, node: OpNode) -> None:
        fx = node.fx_node
        inp = self.tinfo(fx.args[0])
        xs = self.shape(fx.args[0])
        if inp is None:
            self.info[node.name] = None
            return
        dim = self.arg(fx, 1, default=0) % len(xs)
        if dim == inp.cdim and node.shape is not None and node.shape[dim] != xs[dim]:
            self.unknown(node, f"{self.describe(node)} slices the channel dimension")
            return
        self.info[node.name] = TInfo(inp.cdim, list(inp.elems), list(inp.zi), inp.taint)

    def select(self, node: OpNode) -> None:
        fx = node.fx_node
        inp = self.tinfo(fx.args[0])
        xs = self.shape(fx.args[0])
        if inp is None:
            self.info[node.name] = None
            return
        dim = fx.args[1] % len(xs)
        if dim == inp.cdim:
            self.unknown(node, f"{self.describe(node)} selects one channel")
            return
        nc = inp.cdim - (1 if dim < inp.cdim else 0)
        self.info[node.name] = TInfo(nc, list(inp.elems), list(inp.zi), inp.taint)

    def split(self, node: OpNode) -> None:
        fx = node.fx_node
        inp = self.tinfo(fx.args[0])
        xs = self.shape(fx.args[0])
        vals = fx.meta.get("val")
        n = len(vals) if isinstance(vals, (list, tuple)) else 1
        if inp is None:
            self.info[node.name] = [None] * n
            return
        if node.op == "unbind":
            dim = self.arg(fx, 1, "dim", 0) % len(xs)
        else:
            dim = self.arg(fx, 2, "dim", 0) % len(xs)
        if dim == inp.cdim:
            self.unknown(node, f"{self.describe(node)} splits the channel dimension")
            self.info[node.name] = [None] * n
            return
        nc = inp.cdim - (1 if node.op == "unbind" and dim < inp.cdim else 0)
        self.info[node.name] = [TInfo(nc, list(inp.elems), list(inp.zi), inp.taint) for _ in range(n)]

    def getitem(self, node: OpNode) -> None:
        fx = node.fx_node
        src, i = fx.args[0], fx.args[1]
        v = self.info.get(src.name) if isinstance(src, torch.fx.Node) else None
        if isinstance(v, list) and isinstance(i, int) and i < len(v):
            self.info[node.name] = v[i]
        else:
            self.info[node.name] = None

    # ----------------------------------------------------------------- finish
    def check_param_uses(self) -> None:
        """A parameter read anywhere the analysis did not understand cannot be sliced safely."""
        for node in self.g.nodes:
            for n in node.params + node.buffers:
                if (node.name, n) not in self.param_ok and n in self.param_elems:
                    self.mark(self.param_elems[n], f"parameter {n} is also used by {self.describe(node)}")
                    self.unknown_ops.setdefault(self.describe(node), f"uses parameter {n}")

    def make_groups(self) -> PruneSpace:
        comps: dict[int, list[int]] = {}
        for e in range(len(self.uf.parent)):
            comps.setdefault(self.uf.find(e), []).append(e)
        groups: list[Group] = []
        for root in sorted(comps):
            elems = comps[root]
            vars_: list[tuple[str, int, int]] = []
            deps: list[tuple[str, int, int]] = []
            reason = None
            for e in elems:
                vars_ += self.vars.get(e, [])
                deps += self.deps.get(e, [])
                if reason is None and e in self.reason:
                    reason = self.reason[e]
            if not vars_:
                continue
            groups.append(Group(
                id=len(groups), name=_group_name(vars_), slices=_merge(vars_), dependents=_merge(deps),
                prunable=reason is None, reason=reason,
            ))
        return PruneSpace(groups, dict(self.unknown_ops))


def _merge(slices: list[tuple[str, int, int]]) -> list[ParamSlice]:
    """Merge (name, dim, index) entries of the same (name, dim) into one slice with sorted indices."""
    acc: dict[tuple[str, int], list[int]] = {}
    for name, dim, idx in slices:
        acc.setdefault((name, dim), []).append(idx)
    return [ParamSlice(n, d, tuple(sorted(set(ix)))) for (n, d), ix in sorted(acc.items())]


def _group_name(slices: list[tuple[str, int, int]]) -> str:
    mods: dict[str, list[int]] = {}
    for name, _, idx in slices:
        mod = name.rsplit(".", 1)[0] if "." in name else name
        mods.setdefault(mod, []).append(idx)
    parts = []
    for m, ix in list(mods.items())[:3]:
        lo, hi = min(ix), max(ix)
        parts.append(f"{m}[{lo}]" if lo == hi else f"{m}[{lo}..{hi}]")
    more = "" if len(mods) <= 3 else f"+{len(mods) - 3}"
    return "+".join(parts) + more


def build_prune_space(graph: OpGraph) -> PruneSpace:
    """Zero-invariant channel groups of ``graph`` (see module docstring)."""
    space = ChannelAnalysis(graph).run()
    if space.unprunable_ops:
        for desc, why in space.unprunable_ops.items():
            log.info("lightning_oto: %s -> touched channel groups are unprunable (%s)", desc, why)
    return space
