"""`OTO`: the one object users hold — trace once, search space, optimizers, construction, export."""
from __future__ import annotations

import logging
import random
import warnings
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from .errors import InvalidSubnetError, SubnetMismatchError  # noqa: F401 - re-exported
from .graph.trace import OpGraph, normalize_inputs, trace
from .space.groups import Group, group_norm, zero_group
from .space.prune import build_prune_space
from .subnet.slim import confirm_literal_sizes, mismatch_hint, prune_subnet
from .subnet.verify import DEFAULT_ATOL, DEFAULT_RTOL, allowed_error, output_difference

log = logging.getLogger("lightning_oto")

MODES = ("prune", "erase")


def _check_sparsity(target: float) -> None:
    if not isinstance(target, (int, float)) or not (0.0 <= float(target) < 1.0):
        raise ValueError(f"target_group_sparsity must be a number in [0, 1), got {target!r}.")


class OTO:
    """Search space of ``model`` for ``mode`` ("prune": channel ZIGs; "erase": operator GeZIGs).

    The model is traced once on ``example_inputs`` (a tensor or tuple of tensors); it is never
    modified except by the methods that say so (``random_set_zero_groups`` and the optimizers,
    which write its parameters).
    """

    def __init__(self, model: nn.Module, example_inputs: Any = None, mode: str = "prune") -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
        if not any(p.requires_grad for p in model.parameters()):
            raise ValueError(f"{type(model).__name__} has no trainable parameters: there is nothing to compress.")
        self.model = model
        self.mode = mode
        self.example_inputs = normalize_inputs(model, example_inputs)
        self.graph: OpGraph = trace(model, self.example_inputs)
        self.segment_graph = None
        self.unsupported_ops: dict[str, str] = {}
        self.prune_space = None
        if mode == "prune":
            space = build_prune_space(self.graph, model)
            confirm_literal_sizes(model, self.example_inputs, space)
            self.prune_space = space
            self.groups: list[Group] = space.groups
            self.unsupported_ops = space.unprunable_ops
        else:
            from .space.erase import build_erase_space

            space = build_erase_space(self.graph)
            self.groups = space.groups
            self.segment_graph = space.segment_graph
            self.unsupported_ops = space.unerasable
        if self.unsupported_ops:
            kinds = ", ".join(sorted(self.unsupported_ops)[:5])
            more = "" if len(self.unsupported_ops) <= 5 else f" (+{len(self.unsupported_ops) - 5} more)"
            log.warning("lightning_oto: groups touching %s%s are kept (not %s).", kinds, more,
                        "prunable" if mode == "prune" else "erasable")

    # ------------------------------------------------------------------ groups
    @property
    def prunable_groups(self) -> list[Group]:
        return [g for g in self.groups if g.prunable]

    def _params(self) -> dict[str, torch.Tensor]:
        return dict(self.model.named_parameters())

    def zero_group_ids(self) -> list[int]:
        """Prunable groups whose variables are all exactly zero in the model right now."""
        params = self._params()
        return [g.id for g in self.prunable_groups if group_norm(g, params) == 0.0]

    def hierarchy_check(self, accepted: frozenset[int], candidate: int) -> bool:
        """Erase mode: True when removing ``candidate`` on top of ``accepted`` keeps inputs connected to outputs."""
        if self.segment_graph is None:
            return True
        return self.segment_graph.removal_is_valid(
            {self.groups[i].vertex for i in accepted} | {self.groups[candidate].vertex})

    def random_set_zero_groups(self, fraction: float = 0.5, seed: int = 0) -> list[int]:
        """Zero a random valid set of round(fraction * #prunable) groups in the model; returns their ids."""
        if not (0.0 <= fraction <= 1.0):
            raise ValueError(f"fraction must be in [0, 1], got {fraction!r}.")
        rng = random.Random(seed)
        cand = [g.id for g in self.prunable_groups]
        rng.shuffle(cand)
        k = round(fraction * len(cand))
        chosen: list[int] = []
        for gid in cand:
            if len(chosen) >= k:
                break
            if self.hierarchy_check(frozenset(chosen), gid):
                chosen.append(gid)
        params = self._params()
        for gid in chosen:
            zero_group(self.groups[gid], params)
        return sorted(chosen)

    # ------------------------------------------------------------------ optimizers
    def _named_trainable(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def dhspg(self, lr: float = 0.1, target_group_sparsity: float = 0.5, **kwargs: Any) -> torch.optim.Optimizer:
        """DHSPG over this search space (prune mode; in erase mode only for the paper's Table 4 ablation)."""
        _check_sparsity(target_group_sparsity)
        if self.mode == "erase" and not kwargs.pop("allow_erase_ablation", False):
            raise ValueError(
                "dhspg() is the prune-mode optimizer; in erase mode use oto.h2spg(), which keeps the network "
                "connected. (For the Table 4 ablation pass allow_erase_ablation=True.)")
        from .optim import DHSPG

        return DHSPG(self._named_trainable(), self.groups, lr=lr, target_group_sparsity=target_group_sparsity,
                     **kwargs)

    def h2spg(self, lr: float = 0.1, target_group_sparsity: float = 0.5, **kwargs: Any) -> torch.optim.Optimizer:
        """H2SPG: hierarchical search over the erase-mode GeZIGs, then hybrid training."""
        _check_sparsity(target_group_sparsity)
        if self.mode != "erase":
            raise ValueError("h2spg() works on the erase-mode search space: build OTO(model, x, mode='erase'), "
                             "or use oto.dhspg() for pruning.")
        from .optim import H2SPG

        return H2SPG(self._named_trainable(), self.groups, lr=lr, target_group_sparsity=target_group_sparsity,
                     hierarchy_check=self.hierarchy_check, **kwargs)

    def hesso(self, lr: float = 0.1, target_group_sparsity: float = 0.5, **kwargs: Any) -> torch.optim.Optimizer:
        """HESSO-style progressive shrinking (prune mode)."""
        _check_sparsity(target_group_sparsity)
        from . import optim

        if not hasattr(optim, "HESSO"):
            raise NotImplementedError("HESSO is not available in this build.")
        return optim.HESSO(self._named_trainable(), self.groups, lr=lr,
                           target_group_sparsity=target_group_sparsity, **kwargs)

    # ------------------------------------------------------------------ construction
    def construct_subnet(self, verify: bool = True, atol: float = DEFAULT_ATOL, rtol: float = DEFAULT_RTOL) -> nn.Module:
        """A new, physically smaller module without the zero groups; the original model is untouched.

        With ``verify`` the sub-network's outputs are compared with the full model's on the example
        input (eval mode) and :class:`SubnetMismatchError` is raised if they differ by more than
        ``atol + rtol * max|full(x)|`` (the relative part absorbs float32 rounding on large outputs).
        """
        zero = self.zero_group_ids()
        if not zero:
            warnings.warn("construct_subnet: no group is zero yet; returning an equal-size copy.", stacklevel=2)
        if self.mode == "prune":
            sub = self._slim(zero)
        else:
            from .subnet.erase import erase_subnet

            sub = erase_subnet(self, zero)
        if verify:
            hint = mismatch_hint(self.prune_space, zero)
            try:
                err, scale = self.verify(sub, return_scale=True)
            except Exception as e:  # noqa: BLE001 - the sub-network's forward failed
                if not hint:
                    raise
                raise SubnetMismatchError(f"the sub-network's forward failed ({type(e).__name__}: {e}).{hint}") from e
            if not err <= allowed_error(scale, atol, rtol):
                raise SubnetMismatchError(
                    f"sub-network outputs differ from the full model by {err:.3g} (outputs up to {scale:.3g}; "
                    f"allowed {atol} + {rtol} x scale); this is a bug or an operator the engine mis-handles — "
                    f"please report it with the model.{hint}")
            sub.oto_verification_error = err  # type: ignore[attr-defined]
        return sub

    def _slim(self, zero: Sequence[int]) -> nn.Module:
        return prune_subnet(self.model, self.prune_space, zero)

    def verify(self, sub: nn.Module, inputs: Any = None, return_scale: bool = False) -> Any:
        """Max |sub(x) - full(x)| over all outputs, both models in eval mode (modes restored).

        With ``return_scale`` also max |full(x)|, to judge the error relative to the outputs.
        """
        inputs = self.example_inputs if inputs is None else normalize_inputs(self.model, inputs)
        err, scale = output_difference(self.model, sub, inputs)
        return (err, scale) if return_scale else err

    # ------------------------------------------------------------------ reporting / export
    def compression_report(self, sub: nn.Module | None = None) -> dict[str, float]:
        """Parameters and FLOPs (torch.utils.flop_counter) of the full model vs ``sub``."""
        from .subnet.report import compression_report

        full = self.model
        if self.mode == "erase":
            # the erased sub-network is an exported program: count the full model in the same form, so fused
            # eager kernels (e.g. nn.MultiheadAttention's) are not counted differently on the two sides
            from .graph.trace import export_program

            full = export_program(self.model, self.example_inputs).module()
        rep = compression_report(full, sub, self.example_inputs, self.groups, self.zero_group_ids())
        rep["params_full"] = sum(p.numel() for p in self.model.parameters())
        if sub is not None:
            rep["param_ratio"] = rep["params_sub"] / max(1, rep["params_full"])
        return rep

    def export(self, sub: nn.Module, out_dir: str | Path, formats: Iterable[str] = ("torch", "onnx"),
               check: bool = True) -> dict[str, str]:
        """Write ``sub`` as torch (state_dict + torch.export program) and/or ONNX, and check each reloads."""
        from .subnet.export import export_subnet

        return export_subnet(sub, self.example_inputs, out_dir, formats=formats, check=check)

    def visualize(self, out_dir: str | Path, what: Sequence[str] = ("trace", "space", "redundant", "subnet"),
                  sub: nn.Module | None = None) -> dict[str, str]:
        """Draw the trace graph, search space, redundant structures and sub-network (Graphviz)."""
        from .viz.graphviz import visualize

        return visualize(self, out_dir, what=what, sub=sub)

    def __repr__(self) -> str:
        return (f"OTO(mode={self.mode!r}, model={type(self.model).__name__}, ops={len(self.graph)}, "
                f"groups={len(self.groups)}, prunable={len(self.prunable_groups)})")
