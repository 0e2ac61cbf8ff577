"""Prune-mode search space: zero-invariant channel groups (ZIGs) by union-find over channels.

Every channel of every tracked tensor is an *element* (:mod:`.channels`).  One forward walk over the
trace asks each operator's rule (:mod:`.rules`) how channels flow through it: producers create
elements, joins and coupled ops union them, views move them.  Each tensor also carries, per channel,
whether it is *zero-invariant* (zero when its group is zero).  A consumer reading a channel that is not
zero-invariant, an operator without a rule, a normalisation over the channels or the model output make
the touched elements unprunable, with the reason.  One group per component that owns variables.
The walk is O(V + E + channels).

Sizes written into the forward (``view(B, N, 8, 64)``, ``split(x, 256)``) must follow the channels on the
slimmed copy: ``-1`` and sizes computed at runtime do; a number equal to a size attribute of the calling
module (``num_heads``, ``split_size``, ...) is rewritten on the copy (:class:`SizeAttribute`); any other
number is a :class:`LiteralSize` that a trial construction confirms before training starts.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
import torch.fx
from torch import nn

from ..graph.trace import OpGraph, OpNode, concrete_shape
from .channels import ChannelElements, ParamRef, TensorChannels, merge_slots
from .groups import Group
from .rules import MODULE_RULES, Call, ModuleRule, module_rule_for, rule_for
from .rules.registry import MODULE_RULE_MATCHERS

log = logging.getLogger("lightning_oto")

TInfo = TensorChannels  # the name erase mode and older code use

# module attributes that hold a size the forward reads (head counts, widths); rewritten on the slimmed copy
SIZE_ATTRIBUTES = (
    "num_heads", "num_attention_heads", "num_key_value_heads", "num_kv_heads", "n_heads", "n_head", "n_kv_heads",
    "heads", "num_head", "nheads", "all_head_size", "inner_dim", "attn_dim", "split_size", "nf", "nx", "width",
    "hidden_dim", "inner_size",
)
CONFIG_SIZE_ATTRIBUTES = ("num_attention_heads", "num_key_value_heads", "n_head", "num_heads", "n_heads")


Plan = dict[tuple[str, int], set[int]]  # (tensor name, dim) -> indices removed (subnet.plan's removal plan)


@dataclass(frozen=True)
class SizeAttribute:
    """Attribute ``attr`` of module ``module`` (``config.<name>`` for its config) equals the number of
    ``entries`` a removal plan leaves: each entry is one variable slot of the group it goes with (None:
    nothing removes it), so the value follows whatever groups are removed, bundled or kept."""

    module: str
    attr: str
    entries: tuple[tuple[str, int, int] | None, ...]

    def value_after(self, plan: Plan) -> int:
        return sum(1 for e in self.entries if e is None or e[2] not in plan.get((e[0], e[1]), ()))


@dataclass(frozen=True)
class LiteralSize:
    """A number in the forward that must follow the channels of ``groups`` (confirmed by a trial)."""

    where: str
    groups: tuple[int, ...]


@dataclass
class PruneSpace:
    """Result of the analysis: the groups plus what construction needs."""

    groups: list[Group]
    unprunable_ops: dict[str, str] = field(default_factory=dict)  # op description -> reason
    size_attributes: list[SizeAttribute] = field(default_factory=list)
    literal_sizes: list[LiteralSize] = field(default_factory=list)
    user_rules: dict[str, tuple[str, ...]] = field(default_factory=dict)  # variable -> user rules its channels passed

    def rules_of(self, groups: Iterable[Group]) -> list[str]:
        """User rules the channels of ``groups`` passed through (named in construction errors)."""
        return sorted({r for g in groups for s in g.slices for r in self.user_rules.get(s.name, ())})

    def attribute_values(self, plan: Plan) -> dict[tuple[str, str], int]:
        """(module path, attribute) -> its value on the copy that ``plan`` slims."""
        return {(a.module, a.attr): a.value_after(plan) for a in self.size_attributes}


class ChannelAnalysis:
    """Forward walk assigning channel elements to every tensor of the trace graph.

    Rules talk to it through ``channels``, ``param``, ``shape``, ``set``, ``refuse``, ``literal`` and
    the element store ``el`` (:class:`~.channels.ChannelElements`).
    """

    def __init__(self, graph: OpGraph, model: nn.Module | None = None) -> None:
        self.g = graph
        self.model = model
        self.el = ChannelElements()
        self.info: dict[str, Any] = {}  # fx node name -> TensorChannels | ParamRef | None | list of them
        self.unknown_ops: dict[str, str] = {}
        self.bad_param_use: dict[str, str] = {}   # parameter -> the op that used it in an unknown way
        self.size_sites: dict[tuple[str, str], list[list[int]]] = {}
        self.literal_sites: list[tuple[str, list[int]]] = []
        self.ph_param = graph.placeholder_to_param
        self.ph_buffer = graph.placeholder_to_buffer
        self._consumed: set[str] = set()
        self._skip: set[int] = set()

    # ------------------------------------------------------------------ rule API
    def channels(self, a: Any) -> TensorChannels | None:
        """Channel structure of tensor argument ``a`` (None: untracked data, a constant or a parameter)."""
        v = self.info.get(a.name) if isinstance(a, torch.fx.Node) else None
        return v if isinstance(v, TensorChannels) else None

    def param(self, a: Any, consume: bool = True) -> ParamRef | None:
        """``a`` as a parameter (or buffer, or a view of one); with ``consume`` the calling rule takes
        responsibility for how it is used (otherwise the walk reports the use as unknown)."""
        if not isinstance(a, torch.fx.Node):
            return None
        ref = None
        if a.op == "placeholder":
            name = self.ph_param.get(a.name) or self.ph_buffer.get(a.name)
            if name is not None:
                shape = self.shape(a) or ()
                ref = ParamRef(name, tuple(range(len(shape))), buffer=a.name in self.ph_buffer)
        else:
            v = self.info.get(a.name)
            ref = v if isinstance(v, ParamRef) else None
        if ref is not None and consume:
            self._consumed.add(a.name)
        return ref

    def param_name(self, a: Any) -> str | None:
        """Name of the parameter ``a`` when it is one as is (same dims, not a buffer); consumes it then."""
        ref = self.param(a, consume=False)
        if ref is None or ref.buffer or ref.dims != tuple(range(len(ref.dims))):
            return None
        self._consumed.add(a.name)
        return ref.name

    def keep_whole(self, ref: ParamRef, why: str) -> None:
        """A use that needs every entry of ``ref``'s parameter: whoever slices it elsewhere is kept."""
        shape = self.g.param_shapes.get(ref.name) or self.g.buffer_shapes.get(ref.name) or ()
        for d, n in enumerate(shape):
            self.el.pin(ref.name, d, n, why)

    @staticmethod
    def shape(a: Any) -> tuple[int, ...] | None:
        if isinstance(a, torch.fx.Node):
            v = a.meta.get("val")
            if isinstance(v, torch.Tensor):
                return concrete_shape(v)
        return None

    def set(self, call: Call, out: Any) -> None:
        """The output's channel structure; a tuple-returning op gets ``out`` as its first element."""
        val = call.fx.meta.get("val")
        if isinstance(val, (tuple, list)) and not isinstance(out, list):
            out = [out] + [None] * (len(val) - 1)
        self.info[call.node.name] = out

    def describe(self, call: Call | OpNode) -> str:
        node = call.node if isinstance(call, Call) else call
        return f"{node.op}" + (f" in {node.module} ({node.module_type})" if node.module else " in forward()")

    def refuse(self, call: Call, why: str | None = None) -> None:
        """Conservative: every channel the call reads is kept, the output is untracked."""
        desc = self.describe(call)
        reason = why or f"unsupported operator {desc}"
        touched = False
        for a in call.tensor_args():
            v = self.info.get(a.name)
            for t in (v if isinstance(v, list) else [v]):
                if isinstance(t, TensorChannels):
                    self.el.mark(t.elems, reason)
                    touched = True
        if touched:
            self.unknown_ops.setdefault(desc, reason)
        self.set(call, None)

    def literal(self, call: Call, value: Any, elems: list[int], what: str) -> None:
        """A size ``value`` written in the forward must become ``len(kept elems)`` on the slimmed copy."""
        if not isinstance(value, int) or value == -1:
            return  # -1 or a size computed at runtime follows the channels by itself
        own, config = self._size_attribute(call.node.module, value)
        # one attribute of the module (else of its config) holds the value: the forward reads that one; its
        # config twins describe the same size.  Two attributes of the module with it: which one is unknown.
        if len(own) == 1 or (not own and config):
            for key in own + config:
                self.size_sites.setdefault(key, []).append(list(elems))
            return
        self.literal_sites.append((f"{what} {value} at {self.describe(call)}", list(elems)))

    def size_attributes(self, call: Call, value: int, elems: list[int], names: Iterable[str]) -> None:
        """Attributes ``names`` of the calling module (or its config) equal to ``value`` describe this size
        (a head count the forward derives with -1): they are rewritten on the slimmed copy too."""
        mod = self._module(call.node.module)
        config = getattr(mod, "config", None)
        for holder, prefix in ((mod, ""), (config, "config.")):
            for name in names:
                if holder is not None and _is_int(getattr(holder, name, None), value):
                    self.size_sites.setdefault((call.node.module, prefix + name), []).append(list(elems))

    def module_sizes(self, path: str, names: Iterable[str]) -> set[int]:
        """Values of the int attributes ``names`` of module ``path`` (and of its ``config``)."""
        mod = self._module(path)
        vals = set()
        for holder in (mod, getattr(mod, "config", None)):
            for name in names:
                v = getattr(holder, name, None) if holder is not None else None
                if isinstance(v, int) and not isinstance(v, bool):
                    vals.add(v)
        return vals

    def _module(self, path: str) -> nn.Module | None:
        if self.model is None:
            return None
        try:
            return self.model.get_submodule(path) if path else self.model
        except AttributeError:
            return None

    def _size_attribute(self, path: str, value: int) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
        """Attributes of module ``path``, and of its config, that hold ``value``."""
        mod = self._module(path)
        if mod is None:
            return [], []
        config = getattr(mod, "config", None)
        own = [(path, name) for name in SIZE_ATTRIBUTES if _is_int(getattr(mod, name, None), value)]
        conf = [(path, f"config.{name}") for name in CONFIG_SIZE_ATTRIBUTES
                if config is not None and _is_int(getattr(config, name, None), value)]
        return own, conf

    # ------------------------------------------------------------------ walk
    def run(self) -> PruneSpace:
        self.walk()
        return self.make_groups()

    def walk(self) -> None:
        """Assign channel elements to every tensor (no groups yet); erase mode stops here."""
        module_calls = self._module_calls()
        for node in self.g.nodes:
            if node.id in self._skip:
                continue
            if node.kind == "input":
                self.info[node.name] = None
            elif node.kind == "output":
                for a in node.fx_node.all_input_nodes:
                    v = self.info.get(a.name)
                    for t in (v if isinstance(v, list) else [v]):
                        if isinstance(t, TensorChannels):
                            self.el.mark(t.elems, "reaches the model output")
            elif node.id in module_calls:
                self._module_call(*module_calls[node.id])
            else:
                self._visit(node)
        self._finish_param_uses()
        self._unify_size_sites()

    def _visit(self, node: OpNode) -> None:
        call = Call.of(node)
        rule = rule_for(node.fx_node.target)
        self._consumed = set()
        try:
            rule.channels(self, call)
        except Exception as e:  # noqa: BLE001 - a failing rule must not produce groups; it keeps them
            self.refuse(call, f"rule {rule.describe()} failed on {self.describe(call)}: {type(e).__name__}: {e}")
        if rule.user:
            self._note_rule(call, rule.describe())
        self._check_param_args(call)

    def _note_rule(self, call: Call, rule: str) -> None:
        for name in [a.name for a in call.tensor_args()] + [call.node.name]:
            v = self.info.get(name)
            for t in (v if isinstance(v, list) else [v]):
                if isinstance(t, TensorChannels):
                    self.el.passed(t.elems, rule)

    def _check_param_args(self, call: Call) -> None:
        """A parameter (or a view of one) read by a rule that did not take it cannot be sliced safely."""
        for a in call.tensor_args():
            if a.name in self._consumed:
                continue
            if a.op == "placeholder":
                name = self.ph_param.get(a.name) or self.ph_buffer.get(a.name)
            else:
                v = self.info.get(a.name)
                name = v.name if isinstance(v, ParamRef) else None
            if name is not None:
                self.bad_param_use.setdefault(name, self.describe(call))

    def _finish_param_uses(self) -> None:
        for name, desc in self.bad_param_use.items():
            if name in self.el.by_tensor:
                self.el.mark(self.el.by_tensor[name], f"parameter {name} is also used by {desc}")
                self.unknown_ops.setdefault(desc, f"uses parameter {name}")

    def _unify_size_sites(self) -> None:
        """One attribute sizes several tensors (q and k heads): their removals must match entry by entry."""
        for (path, attr), sites in self.size_sites.items():
            first = sites[0]
            for other in sites[1:]:
                if len(other) != len(first):
                    self.el.mark(first + other, f"{path}.{attr} sizes tensors of different lengths")
                    continue
                for a, b in zip(first, other):
                    self.el.union(a, b)

    # ------------------------------------------------------------------ module rules
    def _module_calls(self) -> dict[int, tuple[ModuleRule, str, nn.Module, list[OpNode]]]:
        """First node id -> (rule, path, module, nodes) of each call of a module that has a module rule."""
        if self.model is None or not (MODULE_RULES or MODULE_RULE_MATCHERS):
            return {}
        calls: dict[str, tuple[ModuleRule, str, nn.Module, list[OpNode]]] = {}
        for node in self.g.nodes:
            stack = (node.fx_node.meta.get("nn_module_stack") or {}) if node.fx_node is not None else {}
            for key, (path, _) in stack.items():
                path = _clean_path(path)
                try:
                    mod = self.model.get_submodule(path) if path else self.model
                except AttributeError:
                    continue
                rule = module_rule_for(type(mod), mod)
                if rule is not None:
                    calls.setdefault(key, (rule, path, mod, []))[3].append(node)
                    break
        out = {}
        for rule, path, mod, nodes in calls.values():
            out[nodes[0].id] = (rule, path, mod, nodes)
            self._skip.update(n.id for n in nodes[1:])
        return out

    def _module_call(self, rule: ModuleRule, path: str, module: nn.Module, nodes: list[OpNode]) -> None:
        inside = {n.fx_node for n in nodes}
        inputs: list[torch.fx.Node] = []
        for n in nodes:
            for a in n.fx_node.all_input_nodes:
                if a not in inside and a not in inputs and not (a.op == "placeholder" and (
                        a.name in self.ph_param or a.name in self.ph_buffer)):
                    inputs.append(a)
        ids = {n.id for n in nodes}
        outputs = [n.fx_node for n in nodes if any(u not in ids for u in n.outputs)]  # tensors read outside
        calls = [Call.of(n) for n in nodes]
        self._consumed = set()
        try:
            rule.module_channels(self, path, module, calls, inputs, outputs)
        except Exception as e:  # noqa: BLE001 - see _visit
            self.refuse_module(calls, inputs, outputs, f"rule {rule.describe()} failed: {type(e).__name__}: {e}")
        for c in calls:
            if rule.user:
                self._note_rule(c, rule.describe())
            self._check_param_args(c)

    def take_params(self, calls: list[Call], names: Iterable[str]) -> bool:
        """The calling module rule handles ``names``; False when one of them is not read by ``calls``."""
        wanted = set(names)
        seen = set()
        for c in calls:
            for a in c.tensor_args():
                name = self.ph_param.get(a.name) if a.op == "placeholder" else None
                if name in wanted:
                    self._consumed.add(a.name)
                    seen.add(name)
        return seen == wanted

    def refuse_module(self, calls: list[Call], inputs: list[torch.fx.Node], outputs: list[torch.fx.Node],
                      why: str) -> None:
        for a in inputs:
            t = self.channels(a)
            if t is not None:
                self.el.mark(t.elems, why)
                self.unknown_ops.setdefault(self.describe(calls[0]), why)
        for c in calls:
            self.info[c.node.name] = None

    # ------------------------------------------------------------------ groups
    def make_groups(self) -> PruneSpace:
        el = self.el
        group_of_root: dict[int, int] = {}
        slot_of_root: dict[int, tuple[str, int, int]] = {}
        groups: list[Group] = []
        user_rules: dict[str, set[str]] = {}
        for root, elems in sorted(el.uf.components().items()):
            vars_ = [s for e in elems for s in el.variables(e)]
            if not vars_:
                continue
            deps = [s for e in elems for s in el.dependents(e)]
            reason = next((el.reasons[e] for e in elems if e in el.reasons), None)
            group_of_root[root], slot_of_root[root] = len(groups), vars_[0]
            groups.append(Group(id=len(groups), name=_group_name(vars_), slices=merge_slots(vars_),
                                dependents=merge_slots(deps), prunable=reason is None, reason=reason))
            for r in {r for e in elems for r in el.via_rules.get(e, ())}:
                for name, _, _ in vars_:
                    user_rules.setdefault(name, set()).add(r)

        def gid(e: int) -> int | None:
            return group_of_root.get(el.root(e))

        attrs = [SizeAttribute(path, attr, tuple(slot_of_root.get(el.root(e)) for e in sites[0]))
                 for (path, attr), sites in self.size_sites.items()]
        literals = []
        for where, elems in self.literal_sites:
            ids = tuple(sorted({g for g in map(gid, elems) if g is not None and groups[g].prunable}))
            if ids:
                literals.append(LiteralSize(where, ids))
        return PruneSpace(groups, dict(self.unknown_ops), attrs, literals,
                          {n: tuple(sorted(r)) for n, r in user_rules.items()})


def _is_int(v: Any, value: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v == value


def _clean_path(path: str) -> str:
    # export prefixes paths like "L['self'].layer1" in some versions; keep the dotted tail
    if "self" in path and "]" in path:
        path = path.split("]", 1)[-1].lstrip(".")
    return path


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


def _log_kept(space: PruneSpace) -> None:
    """Say, once per operator, why the groups it touches are kept (``OTO`` sums it up per model)."""
    for desc, why in space.unprunable_ops.items():
        log.info("lightning_oto: %s -> touched channel groups are unprunable (%s)", desc, why)


def build_prune_space(graph: OpGraph, model: nn.Module | None = None) -> PruneSpace:
    """Zero-invariant channel groups of ``graph`` (see module docstring).

    ``model`` (the traced module) lets rules read module attributes: head counts and sizes the forward
    uses, module rules such as ``nn.MultiheadAttention``'s.
    """
    space = ChannelAnalysis(graph, model).run()
    _log_kept(space)
    return space


__all__ = ["ChannelAnalysis", "PruneSpace", "SizeAttribute", "LiteralSize", "Plan", "TInfo", "build_prune_space"]
