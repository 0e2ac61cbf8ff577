"""Seeded generator of random but valid PyTorch models for the engine's property tests.

``random_model(seed)`` returns ``(model, example_inputs)``.  The model is a DAG interpreted by a
plain ``forward`` loop over a fixed list of steps, so it traces like any hand-written module and its
slimmed copy (prune mode) runs the same code on smaller tensors: every step derives its sizes from
the tensors it receives, never from hard-coded channel counts.

What the generator draws (1-D or 2-D per model):
  stems      conv / depthwise conv / group conv / conv-transpose (maps), linear (vectors and
             channels-last on maps), with or without bias, weight sharing (one module called twice)
  norms      BatchNorm / GroupNorm / InstanceNorm (affine or not, running stats or not) / LayerNorm
             (over the channels, or over the last spatial dim)
  elementwise relu / gelu / silu / sigmoid / tanh, residual add and sub, multiply gates (sigmoid gate,
             raw product, squeeze-excite broadcast gate), a raw ``nn.Parameter`` layer scale
  shape      max / avg pooling, global average pooling, channel concat, flatten into linear
  extras     leaky_relu / hardswish / elu / softplus / hardsigmoid, PReLU, nearest upsampling, chunk
             and channel shuffle along the channels, softmax and mean over the channels, constant
             padding, ``x * a + b``, dropout, division (raw and ``a / (1 + |b|)``), concat along a
             spatial dim, channels-last LayerNorm, CBAM-style spatial gate, ``x + p`` and ``x / p`` with a
             raw parameter, bilinear upsampling, adaptive pooling to 2, reflect / replicate / circular
             conv padding, and rarely a data-dependent ``if`` (untraceable on purpose: the engine
             must answer with TraceError)
  boundary   one to three inputs (maps or vectors, possibly unused); every unconsumed value is an
             output, usually through a classifier head (pool or flatten, then linear; several heads
             sometimes concatenated into one), sometimes dead code; parameters forward never reads

The symbolic shape of every value is tracked at generation time and checked against a real forward
pass when the model is built.  ``describe()`` (also the ``repr``) prints the DAG as pseudo-code, one
line per node, so a failing seed can be read and reproduced: ``random_model(seed, max_steps)``, or
``python tests/random_models.py SEED`` (``LOTO_MAX_STEPS`` as in the soak) to print it.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

ACTS = ("relu", "gelu", "silu", "sigmoid", "tanh")
EXTRA_ACTS = ("leaky_relu", "hardswish", "elu", "softplus", "hardsigmoid")
_ACT_FN = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "sigmoid": torch.sigmoid, "tanh": torch.tanh,
           "leaky_relu": F.leaky_relu, "hardswish": F.hardswish, "elu": F.elu, "softplus": F.softplus,
           "hardsigmoid": F.hardsigmoid}


@dataclass(frozen=True)
class Val:
    """Symbolic tensor: ``c`` channels (features) and spatial sizes ``sp`` (empty for a (B, F) vector)."""

    c: int
    sp: tuple[int, ...] = ()

    @property
    def is_map(self) -> bool:
        return bool(self.sp)

    def shape(self, batch: int) -> tuple[int, ...]:
        return (batch, self.c, *self.sp)

    def __str__(self) -> str:
        return "(" + ", ".join(str(s) for s in (self.c, *self.sp)) + ")"


@dataclass
class Step:
    """One DAG node: ``v[out] = op(v[ins...])`` using module/parameter ``mod`` and options ``kw``."""

    op: str
    ins: tuple[int, ...]
    out: Val
    mod: str | None = None
    kw: dict[str, Any] = field(default_factory=dict)


@dataclass
class Spec:
    """Everything needed to build the model: inputs, steps, module constructors, outputs."""

    seed: int
    dims: int
    inputs: list[Val]
    steps: list[Step]
    modules: dict[str, tuple]          # name -> constructor description (see _build_module)
    outputs: list[int]
    batch: int = 2

    @property
    def values(self) -> list[Val]:
        return list(self.inputs) + [s.out for s in self.steps]

    @property
    def traceable(self) -> bool:
        """False when forward has data-dependent control flow (the ``branch`` op)."""
        return all(st.op != "branch" for st in self.steps)


# ------------------------------------------------------------------------------------------ modules
def _build_module(desc: tuple) -> nn.Module | nn.Parameter:
    kind = desc[0]
    if kind == "conv":
        _, d, cin, cout, k, s, p, dil, g, bias, *mode = desc
        return (nn.Conv1d if d == 1 else nn.Conv2d)(cin, cout, k, s, p, dil, groups=g, bias=bias,
                                                    padding_mode=mode[0] if mode else "zeros")
    if kind == "convT":
        _, d, cin, cout, k, s, p, op, g, bias = desc
        return (nn.ConvTranspose1d if d == 1 else nn.ConvTranspose2d)(cin, cout, k, s, p, op, groups=g, bias=bias)
    if kind == "linear":
        _, fin, fout, bias = desc
        return nn.Linear(fin, fout, bias=bias)
    if kind == "bn":
        _, d, c, affine, track = desc
        return (nn.BatchNorm1d if d <= 1 else nn.BatchNorm2d)(c, affine=affine, track_running_stats=track)
    if kind == "gn":
        _, g, c, affine = desc
        return nn.GroupNorm(g, c, affine=affine)
    if kind == "in":
        _, d, c, affine, track = desc
        return (nn.InstanceNorm1d if d == 1 else nn.InstanceNorm2d)(c, affine=affine, track_running_stats=track)
    if kind == "ln":
        _, shape, affine = desc
        return nn.LayerNorm(list(shape), elementwise_affine=affine)
    if kind == "param":
        _, shape = desc
        return nn.Parameter(torch.rand(*shape) + 0.5)
    if kind == "prelu":
        return nn.PReLU(desc[1], init=0.1)
    raise ValueError(desc)


def _module_str(desc: tuple) -> str:
    kind = desc[0]
    if kind == "conv":
        _, d, cin, cout, k, s, p, dil, g, bias, *mode = desc
        pm = f", padding_mode={mode[0]!r}" if mode and mode[0] != "zeros" else ""
        return f"Conv{d}d({cin}, {cout}, k={k}, s={s}, p={p}, d={dil}, groups={g}, bias={bias}{pm})"
    if kind == "convT":
        _, d, cin, cout, k, s, p, op, g, bias = desc
        return f"ConvTranspose{d}d({cin}, {cout}, k={k}, s={s}, p={p}, out_pad={op}, groups={g}, bias={bias})"
    if kind == "linear":
        return f"Linear({desc[1]}, {desc[2]}, bias={desc[3]})"
    if kind == "bn":
        return f"BatchNorm{max(desc[1], 1)}d({desc[2]}, affine={desc[3]}, track_running_stats={desc[4]})"
    if kind == "gn":
        return f"GroupNorm({desc[1]}, {desc[2]}, affine={desc[3]})"
    if kind == "in":
        return f"InstanceNorm{desc[1]}d({desc[2]}, affine={desc[3]}, track_running_stats={desc[4]})"
    if kind == "ln":
        return f"LayerNorm({list(desc[1])}, affine={desc[2]})"
    if kind == "param":
        return f"Parameter{tuple(desc[1])}"
    if kind == "prelu":
        return f"PReLU({desc[1]})"
    return str(desc)


def conv_out(size: int, k: int, s: int, p: int, d: int = 1) -> int:
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def convT_out(size: int, k: int, s: int, p: int, op: int) -> int:
    return (size - 1) * s - 2 * p + k + op


# ------------------------------------------------------------------------------------------ the model
class SpecModel(nn.Module):
    """A model interpreting a :class:`Spec`; weights are drawn from ``torch.manual_seed(spec.seed)``."""

    def __init__(self, spec: Spec, check: bool = True) -> None:
        super().__init__()
        self.spec = spec
        self.dims = spec.dims
        self.m = nn.ModuleDict()
        self.p = nn.ParameterDict()
        g = torch.random.fork_rng()
        with g:
            torch.manual_seed(spec.seed)
            for name, desc in spec.modules.items():
                obj = _build_module(desc)
                if isinstance(obj, nn.Parameter):
                    self.p[name] = obj
                else:
                    self.m[name] = obj
            self._randomize_norms()
        if check:
            self.check_shapes()

    @torch.no_grad()
    def _randomize_norms(self) -> None:
        """Non-trivial affine entries and running statistics, so a missed slice cannot hide behind 1s and 0s."""
        for mod in self.m.values():
            if getattr(mod, "weight", None) is not None and isinstance(
                    mod, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)):
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.5, 0.5)
            if getattr(mod, "running_mean", None) is not None:
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2.0)

    # ------------------------------------------------------------------ forward
    def forward(self, *xs: torch.Tensor):
        v: list[torch.Tensor] = list(xs)
        for st in self.spec.steps:
            v.append(self._step(st, v))
        outs = tuple(v[i] for i in self.spec.outputs)
        return outs[0] if len(outs) == 1 else outs

    def _step(self, st: Step, v: list[torch.Tensor]) -> torch.Tensor:
        op, kw = st.op, st.kw
        x = v[st.ins[0]]
        if op in ("conv", "convT", "linear", "norm"):
            return self.m[st.mod](x)
        if op == "cl_linear":  # channels-last pointwise linear on a map
            return self.m[st.mod](x.movedim(1, -1)).movedim(-1, 1)
        if op == "act":
            return _ACT_FN[kw["fn"]](x)
        if op == "maxpool":
            fn = F.max_pool1d if x.dim() == 3 else F.max_pool2d
            return fn(x, kw["k"], kw["s"], kw["p"])
        if op == "avgpool":
            fn = F.avg_pool1d if x.dim() == 3 else F.avg_pool2d
            return fn(x, kw["k"], kw["s"], kw["p"])
        if op == "gap":  # global average pool to a vector
            return x.mean(dim=tuple(range(2, x.dim())))
        if op == "gap_keep":  # global average pool keeping (C, 1, ...)
            return x.mean(dim=tuple(range(2, x.dim())), keepdim=True)
        if op == "flatten":
            return torch.flatten(x, 1)
        if op == "add":
            return x + v[st.ins[1]]
        if op == "sub":
            return x - v[st.ins[1]]
        if op == "mul":
            return x * v[st.ins[1]]
        if op in ("scale", "shift", "pdiv"):
            p = self.p[st.mod]
            p = p if kw.get("raw") else p.view(-1, *([1] * (x.dim() - 2)))
            return x * p if op == "scale" else x + p if op == "shift" else x / p
        if op == "cat":
            return torch.cat([v[i] for i in st.ins], dim=1)
        # ---- extras beyond the core families
        if op == "prelu":
            return self.m[st.mod](x)
        if op == "upsample":
            return F.interpolate(x, scale_factor=2, mode="nearest")
        if op == "chunk":
            return x.chunk(2, dim=1)[kw["i"]]
        if op == "shuffle":  # channel shuffle, written size-agnostic like real code
            b, c = x.shape[0], x.shape[1]
            g = kw["g"]
            return x.reshape(b, g, c // g, *x.shape[2:]).transpose(1, 2).reshape(x.shape)
        if op == "softmax_c":
            return torch.softmax(x, dim=1)
        if op == "pad":
            p = (kw["p"], kw["p"]) * (x.dim() - 2)
            return F.pad(x, p, value=kw["value"])
        if op == "affine_const":
            return x * kw["a"] + kw["b"]
        if op == "cmean":
            return x.mean(dim=1, keepdim=True)
        if op == "dropout":
            return F.dropout(x, 0.3, training=self.training)
        if op == "div":
            return x / v[st.ins[1]]
        if op == "div_safe":
            return x / (1.0 + v[st.ins[1]].abs())
        if op == "cat_sp":  # concat along the last spatial dim
            return torch.cat([v[i] for i in st.ins], dim=-1)
        if op == "cl_norm":  # channels-last LayerNorm (ConvNeXt / transformer style)
            return self.m[st.mod](x.movedim(1, -1)).movedim(-1, 1)
        if op == "bilinear":
            return F.interpolate(x, scale_factor=2, mode="linear" if x.dim() == 3 else "bilinear",
                                 align_corners=False)
        if op == "apool2":
            fn = F.adaptive_avg_pool1d if x.dim() == 3 else F.adaptive_avg_pool2d
            return fn(x, 2)
        if op == "branch":  # data-dependent Python control flow: torch.export cannot trace it
            return F.relu(x) if bool(x.mean() > 0) else -x
        raise ValueError(op)

    # ------------------------------------------------------------------ helpers
    def example_inputs(self, seed: int | None = None, batch: int | None = None) -> tuple[torch.Tensor, ...]:
        gen = torch.Generator().manual_seed(self.spec.seed if seed is None else seed)
        b = self.spec.batch if batch is None else batch
        return tuple(torch.randn(*val.shape(b), generator=gen) for val in self.spec.inputs)

    @torch.no_grad()
    def check_shapes(self) -> None:
        was = self.training
        self.eval()
        try:
            v: list[torch.Tensor] = list(self.example_inputs())
            for i, st in enumerate(self.spec.steps):
                y = self._step(st, v)
                want = st.out.shape(self.spec.batch)
                if tuple(y.shape) != want:
                    raise AssertionError(f"generator bug at step {i} ({st.op}): got {tuple(y.shape)}, want {want}\n"
                                         + self.describe())
                v.append(y)
        finally:
            self.train(was)

    def describe(self) -> str:
        sp = self.spec
        lines = [f"SpecModel(seed={sp.seed}, dims={sp.dims}, batch={sp.batch})"]
        for i, val in enumerate(sp.inputs):
            lines.append(f"  v{i} = input()                                  # {val}")
        n_in = len(sp.inputs)
        for j, st in enumerate(sp.steps):
            args = ", ".join(f"v{i}" for i in st.ins)
            if st.op in ("conv", "convT", "linear", "norm", "cl_linear"):
                call = f"{st.op}[{st.mod}: {_module_str(sp.modules[st.mod])}]({args})"
            elif st.op == "scale":
                call = f"{args} * {st.mod}[{_module_str(sp.modules[st.mod])}]"
            elif st.op in ("shift", "pdiv"):
                sym = "+" if st.op == "shift" else "/"
                call = f"{args} {sym} {st.mod}[{_module_str(sp.modules[st.mod])}]"
            elif st.op == "cl_norm":
                call = f"cl_norm[{st.mod}: {_module_str(sp.modules[st.mod])}]({args})"
            elif st.op in ("div", "div_safe"):
                a, b = (f"v{i}" for i in st.ins)
                call = f"{a} / {b}" if st.op == "div" else f"{a} / (1 + |{b}|)"
            elif st.op == "cat_sp":
                call = f"cat([{args}], dim=-1)"
            elif st.op in ("add", "sub", "mul"):
                sym = {"add": "+", "sub": "-", "mul": "*"}[st.op]
                call = f" {sym} ".join(f"v{i}" for i in st.ins)
            elif st.op == "cat":
                call = f"cat([{args}], dim=1)"
            elif st.op == "act":
                call = f"{st.kw['fn']}({args})"
            elif st.op == "prelu":
                call = f"prelu[{st.mod}: {_module_str(sp.modules[st.mod])}]({args})"
            elif st.kw:
                opts = ", ".join(f"{k}={val}" for k, val in st.kw.items())
                call = f"{st.op}({args}, {opts})"
            else:
                call = f"{st.op}({args})"
            line = f"  v{n_in + j} = {call}"
            lines.append(f"{line:<48} # {st.out}")
        lines.append("  return " + ", ".join(f"v{i}" for i in sp.outputs))
        used = {st.mod for st in sp.steps if st.mod}
        unused = [n for n in sp.modules if n not in used]
        if unused:
            lines.append("  unused: " + ", ".join(f"{n} = {_module_str(sp.modules[n])}" for n in unused))
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.describe()


# ------------------------------------------------------------------------------------------ generator
class _Gen:
    """Draws a spec: every step picks an op that fits the values available so far."""

    MAX_SP = 12

    def __init__(self, seed: int, max_steps: int = 14) -> None:
        self.rng = random.Random(seed)
        self.seed = seed
        self.max_steps = max_steps
        self.dims = self.rng.choice((1, 2))
        self.inputs: list[Val] = []
        self.steps: list[Step] = []
        self.modules: dict[str, tuple] = {}
        self.uses: list[int] = []

    # ---------------------------------------------------------------- bookkeeping
    @property
    def vals(self) -> list[Val]:
        return self.inputs + [s.out for s in self.steps]

    def emit(self, op: str, ins: tuple[int, ...], out: Val, mod: str | None = None, **kw: Any) -> int:
        for i in ins:
            self.uses[i] += 1
        self.steps.append(Step(op, tuple(ins), out, mod, kw))
        self.uses.append(0)
        return len(self.uses) - 1

    def new_mod(self, desc: tuple) -> str:
        name = f"{desc[0]}{len(self.modules)}"
        self.modules[name] = desc
        return name

    def pick(self, pred=lambda v: True, exclude: tuple[int, ...] = ()) -> int | None:
        vals = self.vals
        cand = [i for i, v in enumerate(vals) if pred(v) and i not in exclude]
        if not cand:
            return None
        fresh = [i for i in cand if self.uses[i] == 0]
        if fresh and self.rng.random() < 0.75:
            return self.rng.choice(fresh[-3:])
        return self.rng.choice(cand)

    def chan(self, lo: int = 1, hi: int = 8) -> int:
        return self.rng.randint(lo, hi)

    # ---------------------------------------------------------------- inputs
    def make_inputs(self) -> None:
        n = self.rng.choices((1, 2, 3), weights=(6, 3, 1))[0]
        for i in range(n):
            if i == 0 or self.rng.random() < 0.7:
                if self.dims == 1:
                    sp = (self.rng.randint(6, 12),)
                else:
                    h = self.rng.randint(5, 9)
                    sp = (h, h if self.rng.random() < 0.7 else self.rng.randint(5, 9))
                self.inputs.append(Val(self.chan(1, 6), sp))
            else:
                self.inputs.append(Val(self.chan(2, 8)))
            self.uses.append(0)

    # ---------------------------------------------------------------- ops
    def conv_like(self, x: int, cout: int | None = None, k: int | None = None, stride: int | None = None,
                  groups: int = 1, allow_share: bool = True) -> int:
        v = self.vals[x]
        cout = cout if cout is not None else self.chan(1, 8)
        if allow_share and groups == 1 and self.rng.random() < 0.25:
            for name, d in self.modules.items():
                if d[0] == "conv" and d[1] == self.dims and d[2] == v.c and d[8] == 1:
                    _, _, cin, co, kk, s, p, dil, g, bias, *mode = d
                    sp = tuple(conv_out(n, kk, s, p, dil) for n in v.sp)
                    if all(n >= 1 for n in sp) and (not mode or p < min(v.sp)):  # reflect needs p < size
                        return self.emit("conv", (x,), Val(co, sp), name, shared=True)
        smin = min(v.sp)
        k = k if k is not None else self.rng.choice([1, 3, 3, 5] if smin >= 5 else [1, 3] if smin >= 3 else [1])
        dil = 2 if k == 3 and smin >= 6 and self.rng.random() < 0.1 else 1
        p = self.rng.choice((0, (k // 2) * dil)) if k > 1 else 0
        s = stride if stride is not None else (2 if smin >= 6 and self.rng.random() < 0.2 else 1)
        sp = tuple(conv_out(n, k, s, p, dil) for n in v.sp)
        if min(sp) < 1:
            p, sp = (k // 2) * dil, tuple(conv_out(n, k, s, (k // 2) * dil, dil) for n in v.sp)
        bias = self.rng.random() < 0.6
        desc = ("conv", self.dims, v.c, cout, k, s, p, dil, groups, bias)
        if p > 0 and p < smin and self.rng.random() < 0.1:
            desc += (self.rng.choice(("reflect", "replicate", "circular")),)
        name = self.new_mod(desc)
        return self.emit("conv", (x,), Val(cout, sp), name)

    def op_conv(self) -> int | None:
        x = self.pick(lambda v: v.is_map)
        return None if x is None else self.conv_like(x)

    def op_dwconv(self) -> int | None:
        x = self.pick(lambda v: v.is_map)
        if x is None:
            return None
        c = self.vals[x].c
        return self.conv_like(x, cout=c * self.rng.choice((1, 1, 2)), groups=c, allow_share=False)

    def op_gconv(self) -> int | None:
        x = self.pick(lambda v: v.is_map and any(c % g == 0 for g in (2, 3, 4) for c in [v.c] if c > g))
        if x is None:
            return None
        c = self.vals[x].c
        g = self.rng.choice([g for g in (2, 3, 4) if c % g == 0 and c > g])
        return self.conv_like(x, cout=g * self.rng.randint(1, 3), groups=g, allow_share=False)

    def op_convT(self) -> int | None:
        x = self.pick(lambda v: v.is_map and max(v.sp) <= 8)
        if x is None:
            return None
        v = self.vals[x]
        k = self.rng.choice((1, 2, 3))
        s = self.rng.choice((1, 2)) if max(v.sp) <= 6 else 1
        p = self.rng.choice((0, 1)) if k == 3 else 0
        op = 1 if s == 2 and self.rng.random() < 0.3 else 0
        sp = tuple(convT_out(n, k, s, p, op) for n in v.sp)
        cout = self.chan(1, 8)
        g = 1
        if self.rng.random() < 0.15:
            gs = [g for g in (2, 3) if v.c % g == 0 and cout % g == 0]
            g = self.rng.choice(gs) if gs else 1
        bias = self.rng.random() < 0.6
        name = self.new_mod(("convT", self.dims, v.c, cout, k, s, p, op, g, bias))
        return self.emit("convT", (x,), Val(cout, sp), name)

    def linear_like(self, x: int, fout: int | None = None, allow_share: bool = True) -> int:
        v = self.vals[x]
        if allow_share and self.rng.random() < 0.25:
            for name, d in self.modules.items():
                if d[0] == "linear" and d[1] == v.c:
                    return self.emit("linear", (x,), Val(d[2]), name, shared=True)
        fout = fout if fout is not None else self.chan(1, 10)
        name = self.new_mod(("linear", v.c, fout, self.rng.random() < 0.7))
        return self.emit("linear", (x,), Val(fout), name)

    def op_linear(self) -> int | None:
        x = self.pick(lambda v: not v.is_map)
        return None if x is None else self.linear_like(x)

    def op_cl_linear(self) -> int | None:
        x = self.pick(lambda v: v.is_map)
        if x is None:
            return None
        v = self.vals[x]
        fout = self.chan(1, 8)
        name = self.new_mod(("linear", v.c, fout, self.rng.random() < 0.7))
        return self.emit("cl_linear", (x,), Val(fout, v.sp), name)

    def op_norm(self) -> int | None:
        x = self.pick()
        v = self.vals[x]
        r = self.rng
        if not v.is_map:
            kind = r.choice(("bn", "bn", "ln"))
        else:
            kind = r.choice(("bn", "bn", "bn", "gn", "gn", "in", "in", "ln"))
        if kind == "bn":
            # without running statistics eval mode normalizes with the batch's statistics
            desc = ("bn", self.dims if v.is_map else 1, v.c, r.random() < 0.8, r.random() < 0.9)
        elif kind == "gn":
            gs = [g for g in range(1, v.c + 1) if v.c % g == 0]
            desc = ("gn", r.choice(gs), v.c, r.random() < 0.8)
        elif kind == "in":
            if math.prod(v.sp) < 2:
                return None
            desc = ("in", self.dims, v.c, r.random() < 0.6, r.random() < 0.3)
        else:
            if v.is_map and r.random() < 0.5:
                shape = (v.sp[-1],)
            else:
                shape = (v.c, *v.sp)
            desc = ("ln", shape, r.random() < 0.8)
        name = self.new_mod(desc)
        return self.emit("norm", (x,), v, name)

    def op_act(self) -> int | None:
        x = self.pick()
        return self.emit("act", (x,), self.vals[x], fn=self.rng.choice(ACTS))

    def op_pool(self) -> int | None:
        x = self.pick(lambda v: v.is_map and min(v.sp) >= 2)
        if x is None:
            return None
        v = self.vals[x]
        kind = self.rng.choice(("maxpool", "avgpool"))
        if min(v.sp) >= 4 and self.rng.random() < 0.6:
            k, s, p = 2, 2, 0
        else:
            k, s, p = 3, 1, 1
        sp = tuple(conv_out(n, k, s, p) for n in v.sp)
        return self.emit(kind, (x,), Val(v.c, sp), k=k, s=s, p=p)

    def op_gap(self) -> int | None:
        x = self.pick(lambda v: v.is_map)
        if x is None:
            return None
        return self.emit("gap", (x,), Val(self.vals[x].c))

    def op_flatten(self) -> int | None:
        x = self.pick(lambda v: v.is_map and v.c * math.prod(v.sp) <= 160)
        if x is None:
            return None
        v = self.vals[x]
        y = self.emit("flatten", (x,), Val(v.c * math.prod(v.sp)))
        return self.linear_like(y, allow_share=False)  # flatten into linear

    def partner(self, a: int) -> int:
        """A second operand with exactly ``a``'s shape: an existing value or a fresh projection."""
        va = self.vals[a]
        same = [i for i, v in enumerate(self.vals) if v == va and i != a]
        if same and self.rng.random() < 0.6:
            return self.rng.choice(same)
        if self.rng.random() < 0.05:
            return a  # x + x / x * x
        srcs = [i for i, v in enumerate(self.vals) if v.sp == va.sp and i != a]
        src = self.rng.choice(srcs) if srcs and self.rng.random() < 0.6 else a
        if va.is_map:
            return self.conv_like(src, cout=va.c, k=1, stride=1, allow_share=False) if self.vals[src].sp == va.sp \
                else self.conv_like(a, cout=va.c, k=1, stride=1, allow_share=False)
        return self.linear_like(src, fout=va.c, allow_share=False)

    def op_add(self) -> int | None:
        a = self.pick()
        b = self.partner(a)
        op = "sub" if self.rng.random() < 0.15 else "add"
        ins = (a, b) if self.rng.random() < 0.5 else (b, a)
        return self.emit(op, ins, self.vals[a])

    def op_mul(self) -> int | None:
        a = self.pick()
        va = self.vals[a]
        r = self.rng.random()
        if va.is_map and r < 0.35:
            # squeeze-excite: a * sigmoid(conv(act(conv(gap_keep(a)))))
            s = self.emit("gap_keep", (a,), Val(va.c, (1,) * len(va.sp)))
            hid = max(1, va.c // 2)
            s = self.conv_like(s, cout=hid, k=1, stride=1, allow_share=False)
            s = self.emit("act", (s,), self.vals[s], fn=self.rng.choice(("relu", "silu")))
            s = self.conv_like(s, cout=va.c, k=1, stride=1, allow_share=False)
            s = self.emit("act", (s,), self.vals[s], fn="sigmoid")
            return self.emit("mul", (a, s) if self.rng.random() < 0.5 else (s, a), va)
        b = self.partner(a)
        if r < 0.75:
            b = self.emit("act", (b,), self.vals[b], fn=self.rng.choice(("sigmoid", "sigmoid", "tanh")))
        return self.emit("mul", (a, b) if self.rng.random() < 0.5 else (b, a), va)

    def param_op(self, op: str) -> int:
        """``x * p`` / ``x + p`` / ``x / p`` with a raw per-channel parameter, viewed or already broadcastable."""
        x = self.pick()
        v = self.vals[x]
        raw = self.rng.random() < 0.5
        shape = (1, v.c, *([1] * len(v.sp))) if raw and v.is_map else (v.c,)
        name = self.new_mod(("param", shape))
        return self.emit(op, (x,), v, name, raw=raw)

    def op_scale(self) -> int | None:
        return self.param_op("scale")

    def op_cat(self) -> int | None:
        a = self.pick()
        va = self.vals[a]
        n = self.rng.choice((1, 1, 2))
        ins = [a]
        for _ in range(n):
            cands = [i for i, v in enumerate(self.vals) if v.sp == va.sp and i not in ins]
            if cands and self.rng.random() < 0.6:
                ins.append(self.rng.choice(cands))
            elif self.rng.random() < 0.05:
                ins.append(a)
            elif va.is_map:
                ins.append(self.conv_like(a, allow_share=False, stride=1))
                if self.vals[ins[-1]].sp != va.sp:  # padding choice changed the size: use a 1x1 instead
                    ins[-1] = self.conv_like(a, k=1, stride=1, allow_share=False)
            else:
                ins.append(self.linear_like(a, allow_share=False))
        self.rng.shuffle(ins)
        c = sum(self.vals[i].c for i in ins)
        return self.emit("cat", tuple(ins), Val(c, va.sp))

    # ---------------------------------------------------------------- extras (beyond the list)
    def op_extra(self) -> int | None:
        r = self.rng
        kind = r.choice(("act2", "prelu", "upsample", "chunk", "shuffle", "softmax_c", "pad", "affine_const",
                         "cmean", "dropout"))
        if kind == "act2":
            x = self.pick()
            return self.emit("act", (x,), self.vals[x], fn=r.choice(EXTRA_ACTS))
        if kind == "prelu":
            x = self.pick(lambda v: v.is_map)
            if x is None:
                return None
            v = self.vals[x]
            name = self.new_mod(("prelu", r.choice((1, v.c))))
            return self.emit("prelu", (x,), v, name)
        if kind == "upsample":
            x = self.pick(lambda v: v.is_map and max(v.sp) <= 6)
            if x is None:
                return None
            v = self.vals[x]
            return self.emit("upsample", (x,), Val(v.c, tuple(2 * n for n in v.sp)))
        if kind == "chunk":
            x = self.pick(lambda v: v.c >= 2 and v.c % 2 == 0)
            if x is None:
                return None
            v = self.vals[x]
            return self.emit("chunk", (x,), Val(v.c // 2, v.sp), i=r.randint(0, 1))
        if kind == "shuffle":
            x = self.pick(lambda v: v.is_map and v.c >= 4 and v.c % 2 == 0)
            if x is None:
                return None
            return self.emit("shuffle", (x,), self.vals[x], g=2)
        if kind == "softmax_c":
            x = self.pick()
            return self.emit("softmax_c", (x,), self.vals[x])
        if kind == "pad":
            x = self.pick(lambda v: v.is_map and max(v.sp) <= 10)
            if x is None:
                return None
            v = self.vals[x]
            return self.emit("pad", (x,), Val(v.c, tuple(n + 2 for n in v.sp)), p=1, value=r.choice((0.0, 0.5)))
        if kind == "affine_const":
            x = self.pick()
            return self.emit("affine_const", (x,), self.vals[x], a=r.choice((0.5, 2.0)), b=r.choice((0.0, 0.1)))
        if kind == "cmean":
            x = self.pick(lambda v: v.is_map)
            if x is None:
                return None
            return self.emit("cmean", (x,), Val(1, self.vals[x].sp))
        x = self.pick()
        if r.random() < 0.1:
            return self.emit("branch", (x,), self.vals[x])
        return self.emit("dropout", (x,), self.vals[x])

    def op_extra2(self) -> int | None:
        r = self.rng
        kind = r.choice(("div", "div_safe", "cat_sp", "cl_norm", "spatial_gate", "shift", "pdiv", "bilinear",
                         "apool2"))
        if kind in ("div", "div_safe"):
            a = self.pick()
            b = self.partner(a)
            return self.emit(kind, (a, b), self.vals[a])
        if kind == "cat_sp":
            a = self.pick(lambda v: v.is_map and v.sp[-1] <= 8)
            if a is None:
                return None
            va = self.vals[a]
            others = [i for i, v in enumerate(self.vals) if v.is_map and v.c == va.c and v.sp[:-1] == va.sp[:-1]
                      and i != a and v.sp[-1] <= 8]
            b = r.choice(others) if others and r.random() < 0.6 else self.conv_like(a, cout=va.c, k=1, stride=1,
                                                                                    allow_share=False)
            vb = self.vals[b]
            ins = (a, b) if r.random() < 0.5 else (b, a)
            return self.emit("cat_sp", ins, Val(va.c, va.sp[:-1] + (va.sp[-1] + vb.sp[-1],)))
        if kind == "cl_norm":
            x = self.pick(lambda v: v.is_map)
            if x is None:
                return None
            v = self.vals[x]
            name = self.new_mod(("ln", (v.c,), r.random() < 0.8))
            return self.emit("cl_norm", (x,), v, name)
        if kind == "spatial_gate":  # CBAM-style: a * sigmoid(conv(mean over channels of a))
            a = self.pick(lambda v: v.is_map)
            if a is None:
                return None
            va = self.vals[a]
            m = self.emit("cmean", (a,), Val(1, va.sp))
            g = self.conv_like(m, cout=1, k=1, stride=1, allow_share=False)
            g = self.emit("act", (g,), self.vals[g], fn="sigmoid")
            return self.emit("mul", (a, g) if r.random() < 0.5 else (g, a), va)
        if kind in ("shift", "pdiv"):
            return self.param_op(kind)
        if kind == "bilinear":
            x = self.pick(lambda v: v.is_map and max(v.sp) <= 6)
            if x is None:
                return None
            v = self.vals[x]
            return self.emit("bilinear", (x,), Val(v.c, tuple(2 * n for n in v.sp)))
        x = self.pick(lambda v: v.is_map and min(v.sp) >= 2)
        if x is None:
            return None
        v = self.vals[x]
        return self.emit("apool2", (x,), Val(v.c, (2,) * len(v.sp)))

    OPS = {
        "conv": 10, "dwconv": 3, "gconv": 3, "convT": 2, "linear": 6, "cl_linear": 1, "norm": 8, "act": 8,
        "pool": 3, "gap": 1, "flatten": 2, "add": 9, "mul": 4, "scale": 1, "cat": 6, "extra": 4,
        "extra2": 3,
    }

    def generate(self) -> Spec:
        self.make_inputs()
        n_steps = self.rng.randint(3, self.max_steps)
        names = list(self.OPS)
        weights = [self.OPS[n] for n in names]
        tries = 0
        while len(self.steps) < n_steps and tries < 10 * n_steps:
            tries += 1
            op = self.rng.choices(names, weights)[0]
            if len(self.steps) == 0 and op not in ("conv", "dwconv", "gconv", "convT", "linear", "cl_linear"):
                continue  # start with something that has weights
            getattr(self, f"op_{op}")()
        # unused parameters: a module forward never calls and a loose raw parameter
        if self.rng.random() < 0.25:
            self.new_mod(("linear", 3, 4, True))
        if self.rng.random() < 0.15:
            self.new_mod(("param", (5,)))
        n_in = len(self.inputs)
        sinks = [i for i in range(n_in, len(self.uses)) if self.uses[i] == 0]
        if len(sinks) > 1 and self.rng.random() < 0.1:
            sinks = sinks[1:]  # dead code: forward computes a value nobody reads
        outputs = self.heads(sinks) if self.rng.random() < 0.75 else sinks
        return Spec(self.seed, self.dims, self.inputs, self.steps, self.modules, outputs)

    def heads(self, sinks: list[int]) -> list[int]:
        """Classifier-style heads (pool / flatten, then linear) so the body's channels are not outputs."""
        outs = []
        for i in sinks:
            v = self.vals[i]
            if v.is_map:
                if v.c * math.prod(v.sp) <= 64 and self.rng.random() < 0.3:
                    i = self.emit("flatten", (i,), Val(v.c * math.prod(v.sp)))
                else:
                    i = self.emit("gap", (i,), Val(v.c))
            outs.append(self.linear_like(i, fout=self.rng.randint(1, 5), allow_share=False))
        if len(outs) > 1 and self.rng.random() < 0.5:
            y = self.emit("cat", tuple(outs), Val(sum(self.vals[o].c for o in outs)))
            outs = [self.linear_like(y, fout=self.rng.randint(1, 5), allow_share=False)]
        return outs


def random_spec(seed: int, max_steps: int = 14) -> Spec:
    return _Gen(seed, max_steps).generate()


def random_model(seed: int, max_steps: int = 14) -> tuple[SpecModel, tuple[torch.Tensor, ...]]:
    """The model for ``seed`` (architecture and weights) and its example inputs."""
    model = SpecModel(random_spec(seed, max_steps))
    return model, model.example_inputs()


if __name__ == "__main__":  # python tests/random_models.py SEED...  -> print the models
    import os
    import sys

    steps = int(os.environ.get("LOTO_MAX_STEPS", "14") or 14)  # same knob as tests/test_property.py
    for s in sys.argv[1:] or ["0"]:
        print(SpecModel(random_spec(int(s), steps), check=False))
