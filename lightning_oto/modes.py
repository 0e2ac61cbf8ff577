"""The two compression modes behind :class:`~lightning_oto.OTO`, as small strategy objects.

A mode turns the trace into removal structures, says which sets of them may be removed together,
and builds the sub-network without a set of zero groups.  Everything else (optimizers,
verification, reporting, export) is the same for both.
"""
from __future__ import annotations

import logging
from typing import Any, Protocol, Sequence

from torch import nn

from .graph.trace import OpGraph
from .space.groups import Group
from .subnet.plan import plan_keeping_one
from .subnet.slim import confirm_literal_sizes, mismatch_hint, slim_copy
from .subnet.verify import check_plan_applied

log = logging.getLogger("lightning_oto")


class Mode(Protocol):
    name: str
    groups: list[Group]
    unsupported: dict[str, str]

    def hierarchy_check(self, accepted: frozenset[int], candidate: int) -> bool: ...

    def construct(self, model: nn.Module, zero_groups: Sequence[Group]) -> nn.Module: ...

    def reference(self, model: nn.Module) -> nn.Module: ...


class PruneMode:
    """Channel groups (ZIGs); the sub-network is a slimmed copy of the user's module (same class)."""

    name = "prune"

    def __init__(self, graph: OpGraph, model: nn.Module | None = None, example_inputs: Any = ()) -> None:
        from .space.prune import build_prune_space

        # the model lets rules read the sizes its forward uses (head counts) and a trial construction
        # confirm sizes written as numbers
        space = build_prune_space(graph, model)
        if model is not None:
            confirm_literal_sizes(model, example_inputs, space)
        self.space = space
        self.groups: list[Group] = space.groups
        self.unsupported: dict[str, str] = space.unprunable_ops

    def hierarchy_check(self, accepted: frozenset[int], candidate: int) -> bool:
        return True  # channel groups are independent: any set can go

    def construct(self, model: nn.Module, zero_groups: Sequence[Group]) -> nn.Module:
        shapes = _shapes(model)
        plan, _ = plan_keeping_one(list(zero_groups), shapes)
        sub = slim_copy(model, plan, self.space.attribute_values(plan))
        check_plan_applied(_shapes(sub), shapes, plan, what="pruned sub-network")
        return sub

    def reference(self, model: nn.Module) -> nn.Module:
        return model

    def mismatch_hint(self, zero_groups: Sequence[Group]) -> str:
        """The user rules the removed channels went through, named when the sub-network differs."""
        return mismatch_hint(self.space, zero_groups)


class EraseMode:
    """Operator groups (GeZIGs) on the segment graph; the sub-network is the traced program minus them."""

    name = "erase"

    def __init__(self, graph: OpGraph, model: nn.Module | None = None, example_inputs: Any = ()) -> None:
        from .space.erase import build_erase_space

        space = build_erase_space(graph)
        self.graph = graph
        self.groups = space.groups
        self.segment_graph = space.segment_graph
        self.unsupported = dict(space.unerasable)
        if not self.groups:
            self.unsupported["(model)"] = ("no operator with parameters feeds only residual adds or concatenations: "
                                           "erasing any would disconnect the network (mode='prune' removes channels)")

    def hierarchy_check(self, accepted: frozenset[int], candidate: int) -> bool:
        return self.segment_graph.removal_is_valid(
            {self.groups[i].vertex for i in accepted} | {self.groups[candidate].vertex})

    def construct(self, model: nn.Module, zero_groups: Sequence[Group]) -> nn.Module:
        from .subnet.erase import EraseInputs, erase_subnet

        spec = EraseInputs(self.graph.program, self.graph, self.segment_graph, list(zero_groups))
        state = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers(remove_duplicate=False))
        return erase_subnet(spec, state, training=model.training)

    def reference(self, model: nn.Module) -> nn.Module:
        """The full model in the form the sub-network has (so fused eager kernels count the same)."""
        return self.graph.program.module()


def make_mode(name: str, graph: OpGraph, model: nn.Module | None = None, example_inputs: Any = ()) -> Any:
    return {"prune": PruneMode, "erase": EraseMode}[name](graph, model, example_inputs)


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {n: tuple(t.shape) for n, t in list(model.named_parameters(remove_duplicate=False))
            + list(model.named_buffers(remove_duplicate=False))}


__all__ = ["Mode", "PruneMode", "EraseMode", "make_mode"]
