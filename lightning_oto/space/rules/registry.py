"""The operator-rule registry: canonical op keys, schema-bound calls, the Rule base class.

Everything the engine knows about an operator is one :class:`Rule`, looked up by the operator's
canonical ATen name (``aten::add_`` -> ``add``, ``concat`` -> ``cat``; other namespaces keep theirs:
``mylib::scale``) or, for a whole module call, by the module's class.  A rule answers three questions:

* prune mode, :meth:`Rule.channels`: how channels flow through the call (which output channel is which
  input channel, what is coupled, which parameter entries go with a channel);
* erase mode, :meth:`Rule.zero_output`: is the output exactly zero when the given inputs are zero;
* drawings, :attr:`Rule.kind`: stem / joint / accessory / shape / unknown.

Rules read arguments by schema name (``call["value"]``), never by position: the fx node's arguments are
bound to ``target._schema`` once, with defaults filled in.  An operator without a rule gets
:class:`Conservative`: the channel groups it touches are kept, and the reason says which operator.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Protocol

import torch
import torch.fx

if TYPE_CHECKING:
    from ...graph.trace import OpNode

KINDS = ("stem", "joint", "accessory", "shape", "unknown")

# spellings torch uses for the same operator; in-place variants (trailing "_") are folded separately
ALIASES = {
    "concat": "cat", "concatenate": "cat", "absolute": "abs", "clip": "clamp", "multiply": "mul",
    "divide": "div", "true_divide": "div", "subtract": "sub", "swapaxes": "transpose", "swapdims": "transpose",
    "moveaxis": "movedim", "_unsafe_view": "view", "view_copy": "view", "_reshape_alias": "view",
    "_to_copy": "to", "_softmax": "softmax", "_log_softmax": "log_softmax", "native_dropout": "dropout",
    "_native_batch_norm_legit_no_training": "batch_norm", "native_batch_norm": "batch_norm",
    "_native_batch_norm_legit_functional": "batch_norm", "_prelu_kernel": "prelu", "arctan": "atan",
    "arcsin": "asin", "arcsinh": "asinh", "fix": "trunc", "greater": "gt", "less": "lt", "negative": "neg",
    "lift_fresh_copy": "clone", "_upsample_nearest_exact1d": "upsample_nearest1d",
    "_upsample_nearest_exact2d": "upsample_nearest2d", "_upsample_nearest_exact3d": "upsample_nearest3d",
}

# non-ATen targets: python callables that show up in exported graphs, with their argument names
PYTHON_TARGETS: dict[Any, tuple[str, tuple[str, ...]]] = {
    operator.getitem: ("getitem", ("self", "index")),
}


def canonical_op(target: Any) -> str:
    """Registry key of an fx target, an op overload / packet, or a name (``"aten::relu_"`` -> ``"relu"``)."""
    if target in PYTHON_TARGETS:
        return PYTHON_TARGETS[target][0]
    if isinstance(target, str):
        name = target
    elif isinstance(target, torch._ops.OpOverloadPacket):
        name = target._qualified_op_name
    elif isinstance(target, torch._ops.OpOverload):
        name = target._schema.name
    else:  # a python callable (operator.mul on sizes, a higher-order op): never an ATen rule's business
        return f"python::{getattr(target, '__name__', str(target))}"
    ns, _, short = name.rpartition("::")
    short = short.split(".")[0]
    if short.endswith("_") and not short.endswith("__") and len(short) > 1:
        short = short[:-1]  # in-place variant: same channels, same zero behaviour
    short = ALIASES.get(short, short)
    return short if ns in ("", "aten", "prims") else f"{ns}::{short}"


def bind(target: Any, args: tuple, kwargs: dict) -> dict[str, Any]:
    """Arguments of one call by schema name, defaults filled in (``aten.pad(x, p, 'constant', 0.0)``
    -> ``{"self": x, "pad": p, "mode": "constant", "value": 0.0}``)."""
    schema = getattr(target, "_schema", None)
    if schema is None:
        names = PYTHON_TARGETS.get(target, ("", ()))[1] or tuple(f"arg{i}" for i in range(len(args)))
        bound = dict(zip(names, args))
        bound.update(kwargs)
        return bound
    bound = {}
    positional = [a for a in schema.arguments if not a.kwarg_only]
    for a, v in zip(positional, args):
        bound[a.name] = v
    for a in schema.arguments:
        if a.name in kwargs:
            bound[a.name] = kwargs[a.name]
        elif a.name not in bound and a.has_default_value():
            bound[a.name] = a.default_value
    return bound


@dataclass
class Call:
    """One operator call of the trace, with its arguments bound by schema name."""

    node: "OpNode"
    key: str
    args: dict[str, Any]
    first: str  # name of the first schema argument ("self" / "input" / "query" / ...)

    @classmethod
    def of(cls, node: "OpNode") -> "Call":
        fx = node.fx_node
        args = bind(fx.target, fx.args, fx.kwargs)
        schema = getattr(fx.target, "_schema", None)
        first = schema.arguments[0].name if schema is not None and schema.arguments else next(iter(args), "")
        return cls(node, canonical_op(fx.target), args, first)

    @property
    def fx(self) -> torch.fx.Node:
        return self.node.fx_node

    @property
    def input(self) -> Any:
        """The first argument (``self`` / ``input``): the tensor most operators transform."""
        return self.args.get(self.first)

    def __getitem__(self, name: str) -> Any:
        return self.args[name]

    def get(self, name: str, default: Any = None) -> Any:
        v = self.args.get(name, default)
        return default if v is None else v

    def tensor_args(self) -> list[torch.fx.Node]:
        return list(self.fx.all_input_nodes)

    def __str__(self) -> str:
        where = f" in {self.node.module} ({self.node.module_type})" if self.node.module else " in forward()"
        return f"{self.node.op}{where}"


IsZero = Callable[[Any], bool]


class Context(Protocol):
    """What a rule may ask of the prune analysis (:class:`lightning_oto.space.prune.ChannelAnalysis`).

    ``el`` is the element store (:class:`~lightning_oto.space.channels.ChannelElements`): new elements,
    unions, reasons, variable and dependent slots.
    """

    el: Any
    g: Any
    info: dict[str, Any]
    ph_param: dict[str, str]

    def channels(self, a: Any) -> Any: ...                              # TensorChannels of a tensor arg, or None
    def param(self, a: Any, consume: bool = True) -> Any: ...           # ParamRef of a parameter (view), or None
    def param_name(self, a: Any) -> str | None: ...                     # name of a parameter used as is
    def keep_whole(self, ref: Any, why: str) -> None: ...               # a use that needs every entry
    def shape(self, a: Any) -> tuple[int, ...] | None: ...
    def set(self, call: "Call", out: Any) -> None: ...                  # the output's channels
    def refuse(self, call: "Call", why: str | None = None) -> None: ... # keep every channel the call reads
    def describe(self, call: Any) -> str: ...
    def literal(self, call: "Call", value: Any, elems: list[int], what: str) -> None: ...
    def size_attributes(self, call: "Call", value: int, elems: list[int], names: Iterable[str]) -> None: ...
    def module_sizes(self, path: str, names: Iterable[str]) -> set[int]: ...
    def take_params(self, calls: list["Call"], names: Iterable[str]) -> bool: ...
    def refuse_module(self, calls: list["Call"], inputs: list[Any], outputs: list[Any], why: str) -> None: ...


class Rule:
    """What one operator means to the engine; subclasses override what differs from "unknown".

    ``keeps_channels``: in erase mode, slicing channels before this operator slices the same channels
    after it (element-wise ops, norms, pools): the concat affiliates may flow through it.
    ``joint``: in erase mode, dropping one input that is exactly zero leaves the output unchanged
    (add / sub / concat).
    """

    kind: str = "unknown"
    keeps_channels: bool = False
    joint: bool = False
    #: arguments read only for their shape / dtype (``reshape_as(x, other)``): no value flows from them, so
    #: erase mode does not count them as inputs (a residual branch ending in ``y.reshape_as(x)`` is still a
    #: branch of its own)
    shape_only: tuple[str, ...] = ()
    #: erase mode: the output is zero exactly when the main input is (element-wise f(0) = 0, moves, pools)
    zero_preserving: bool = False

    def __init__(self) -> None:
        self.user = False     # registered with lightning_oto.register_rule
        self.ops: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return type(self).__name__

    def describe(self) -> str:
        ops = ", ".join(self.ops) or "?"
        return f"{self.name} (user rule for {ops})" if self.user else f"{self.name} ({ops})"

    def channels(self, ctx: "Context", call: Call) -> None:
        """Prune mode: give the output its channels (``ctx.set``) or refuse (``ctx.refuse``)."""
        ctx.refuse(call)

    @staticmethod
    def tracked_input(ctx: "Context", call: Call) -> tuple[Any, tuple[int, ...] | None] | None:
        """(channels, shape) of the main input; None, with the output marked untracked too, when the input
        carries no channels (data, or a tensor computed from untracked values)."""
        t = ctx.channels(call.input)
        if t is None:
            ctx.set(call, None)
            return None
        return t, ctx.shape(call.input)

    def zero_output(self, call: Call, is_zero: IsZero) -> bool:
        """Erase mode: is the output exactly zero, given ``is_zero(arg)`` for each argument?"""
        return self.zero_preserving and is_zero(call.input)

    def weight_layout(self, key: str) -> tuple[int, int] | None:
        """Drawings: the (output, input) channel dims of this stem's weight; None for other kinds."""
        return None

    def poisons(self, call: Call, is_zero: IsZero) -> bool:
        """Erase mode: do the zero arguments make the output inf / NaN (which no later zero undoes)?"""
        return False


class Conservative(Rule):
    """An operator the engine does not know: every channel group it touches is kept.

    Exact by construction: nothing it reads or writes is ever removed, and the reason names the op.
    """


class ModuleRule(Rule):
    """A rule for a whole module call (every operator inside it at once), keyed by the module class.

    ``module_channels`` receives the module's path and instance, the calls inside it, the tensors it
    reads from outside and its calls whose results are used outside; it sets the outputs' channels.
    """

    def module_channels(self, ctx: "Context", path: str, module: torch.nn.Module, calls: list[Call],
                        inputs: list[torch.fx.Node], outputs: list[torch.fx.Node]) -> None:
        ctx.refuse_module(calls, inputs, outputs, f"{self.name} cannot analyse this call")


REGISTRY: dict[str, Rule] = {}
MODULE_RULES: dict[type, ModuleRule] = {}
CONSERVATIVE = Conservative()


def add(rule: Rule, *ops: str) -> Rule:
    """Register a built-in ``rule`` for ``ops`` (canonical names)."""
    for op in ops:
        key = canonical_op(op)
        REGISTRY[key] = rule
        rule.ops = tuple(dict.fromkeys(rule.ops + (key,)))
    return rule


def register_rule(op: Any, rule: Rule | type, *, replace: bool = False) -> Rule:
    """Teach the engine an operator: ``op`` is a registry key (``"mylib::scale"``), an op overload or
    packet (``torch.ops.mylib.scale``), or an ``nn.Module`` subclass (its calls become one operator,
    for a :class:`ModuleRule`); ``rule`` a :class:`Rule` instance or class.

    The rule is trusted: construction verifies the sub-network and names the user rules a group passed
    through when outputs differ.  Registering over an existing rule needs ``replace=True``.
    """
    if isinstance(rule, type):
        if not issubclass(rule, Rule):
            raise TypeError(f"rule must be a lightning_oto Rule (or subclass), got {rule!r}.")
        rule = rule()
    if not isinstance(rule, Rule):
        raise TypeError(f"rule must be a lightning_oto Rule instance or class, got {type(rule).__name__}.")
    rule.user = True
    if isinstance(op, type) and issubclass(op, torch.nn.Module):
        if not isinstance(rule, ModuleRule):
            raise TypeError(f"a rule for the module class {op.__name__} must be a ModuleRule.")
        if op in MODULE_RULES and not replace:
            raise ValueError(f"{op.__name__} already has the rule {MODULE_RULES[op].describe()}; "
                             "pass replace=True to override it.")
        MODULE_RULES[op] = rule
        rule.ops = (op.__name__,)
        return rule
    if not isinstance(op, (str, torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        raise TypeError(f"op must be an operator name, a torch op (torch.ops.ns.name) or an nn.Module class, "
                        f"got {type(op).__name__}.")
    key = canonical_op(op)
    if key in REGISTRY and not replace:
        raise ValueError(f"{key!r} already has the rule {REGISTRY[key].describe()}; pass replace=True to override it.")
    REGISTRY[key] = rule
    rule.ops = (key,)
    return rule


def unregister_rule(op: Any) -> None:
    """Forget a rule registered with :func:`register_rule` (built-in rules cannot be removed)."""
    if isinstance(op, type):
        r = MODULE_RULES.get(op)
        if r is not None and r.user:
            del MODULE_RULES[op]
        return
    key = canonical_op(op)
    if key in REGISTRY and REGISTRY[key].user:
        del REGISTRY[key]


def rule_for(target: Any) -> Rule:
    """The rule of an fx target / op name; :data:`CONSERVATIVE` when none is registered."""
    return REGISTRY.get(canonical_op(target), CONSERVATIVE)


#: module rules found by what a module is rather than by its class: ``(matches(module), rule)``, for a module
#: every model library defines its own copy of (``transformers``' ``LlamaRMSNorm``, ``MistralRMSNorm``, ...)
MODULE_RULE_MATCHERS: list[tuple[Callable[[torch.nn.Module], bool], ModuleRule]] = []


def module_rule_for(module_type: type, module: torch.nn.Module | None = None) -> ModuleRule | None:
    """The module rule of a class (its own or a base class's), else the first matcher ``module`` passes."""
    for cls in module_type.__mro__:
        if cls in MODULE_RULES:
            return MODULE_RULES[cls]
    if module is not None:
        for matches, rule in MODULE_RULE_MATCHERS:
            if matches(module):
                return rule
    return None


def kind_of(target: Any) -> str:
    """Drawing kind of an operator: stem / joint / accessory / shape / unknown."""
    return rule_for(target).kind


def names_where(pred: Callable[[Rule], bool]) -> frozenset[str]:
    """Every registered spelling (canonical key, in-place variant, alias) whose rule satisfies ``pred``."""
    keys = {k for k, r in REGISTRY.items() if pred(r)}
    out = set(keys) | {k + "_" for k in keys if "::" not in k}
    out |= {a for a, k in ALIASES.items() if k in keys}
    return frozenset(out)


def registered_ops() -> dict[str, str]:
    """Canonical key -> rule name, for documentation and the report."""
    return {k: r.name for k, r in sorted(REGISTRY.items())}


def tensor_nodes(values: Iterable[Any]) -> list[torch.fx.Node]:
    out: list[torch.fx.Node] = []
    for v in values:
        if isinstance(v, torch.fx.Node):
            out.append(v)
        elif isinstance(v, (list, tuple)):
            out += tensor_nodes(v)
    return out
