"""Checkpoints that survive the swap: what a sub-network checkpoint carries, and rebuilding it on load.

After ``swap_subnet`` the LightningModule's state_dict has the sub-network's (smaller) tensors, so a
fresh ``LitClass(...)`` cannot load it.  The checkpoint therefore carries, under
:data:`CHECKPOINT_KEY`, what turns a fresh network into the sub-network's structure:

* prune mode: the removal plan ``{(tensor name, dim): indices}``, applied with ``slim_copy``;
* erase mode: the zero group ids and the example input shapes; the fresh network is traced again
  (same model, same shapes: the same search space, checked by its hash) and the erased GraphModule is
  rebuilt by the same construction.

The weights then load as usual.  The search's optimizer state is not kept: it belongs to the full
network (a resumed fit trains the sub-network with the user's optimizer).
"""
from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ..graph.inputs import ModelInputs, map_tensors
from ..space.groups import Group, zero_group
from ..subnet.plan import plan_keeping_one
from ..subnet.slim import slim_copy
from .network import install_subnet, resolve_network

CHECKPOINT_KEY = "lightning_oto_subnet"
PAYLOAD_VERSION = 1


def space_hash(groups: Sequence[Group], mode: str) -> str:
    """Identity of a search space (group names, sizes, prunability): a resumed run must see the same one."""
    desc: list[Any] = [mode]
    for g in groups:
        desc.append([g.id, g.name, bool(g.prunable),
                     [[s.name, s.dim, None if s.indices is None else len(s.indices)] for s in g.slices]])
    return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:16]


def _tensor_shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {n: tuple(t.shape) for n, t in list(module.named_parameters()) + list(module.named_buffers())}


def subnet_payload(oto: Any, zero_ids: Sequence[int], network_attr: str | None, sub: nn.Module) -> dict[str, Any]:
    """What a checkpoint needs to rebuild ``sub`` (built by ``oto`` from ``zero_ids``) from a fresh network."""
    payload: dict[str, Any] = {"version": PAYLOAD_VERSION, "mode": oto.mode, "network_attr": network_attr,
                               "space_hash": space_hash(oto.groups, oto.mode)}
    if oto.mode == "prune":
        shapes = _tensor_shapes(oto.model)
        plan, _ = plan_keeping_one([oto.groups[i] for i in zero_ids], shapes)
        expected = dict(shapes)
        for (name, dim), idx in plan.items():
            shape = list(expected[name])
            shape[dim] -= len(idx)
            expected[name] = tuple(shape)
        if expected != _tensor_shapes(sub):
            raise RuntimeError("the removal plan does not reproduce the constructed sub-network's shapes; the "
                               "checkpoint could not be reloaded (engine inconsistency, please report it).")
        payload["plan"] = [[name, dim, sorted(int(i) for i in idx)] for (name, dim), idx in sorted(plan.items())]
    else:
        payload["zero_group_ids"] = [int(i) for i in zero_ids]
        payload["example_inputs"] = _input_shapes(oto.example_inputs)
    return payload


def _input_shapes(inputs: ModelInputs) -> Any:
    """[shape, dtype] per example input: a list (positional) or a dict (keyword inputs), JSON-able."""
    spec = map_tensors(lambda t: [list(t.shape), str(t.dtype).replace("torch.", "")], inputs)
    return dict(spec) if isinstance(spec, dict) else list(spec)


def _zero_inputs(shapes: Any, device: torch.device) -> ModelInputs:
    """Zero tensors of the recorded shapes: the erase-mode trace only needs shapes and dtypes."""
    def zeros(entry: Any) -> torch.Tensor:
        shape, dtype = entry
        return torch.zeros(shape, dtype=getattr(torch, dtype), device=device)

    if isinstance(shapes, dict):
        return {k: zeros(v) for k, v in shapes.items()}
    return tuple(zeros(v) for v in shapes)


def _already_applied(module: nn.Module, state_dict: Mapping[str, Any] | None) -> bool:
    if state_dict is None:
        return False
    own = {k: tuple(v.shape) for k, v in module.state_dict().items() if isinstance(v, torch.Tensor)}
    saved = {k: tuple(v.shape) for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
    return own == saved


def apply_subnet_payload(module: nn.Module, payload: Mapping[str, Any],
                         state_dict: Mapping[str, Any] | None = None) -> bool:
    """Rebuild the sub-network structure described by ``payload`` inside ``module`` (a fresh LightningModule).

    Returns False when nothing had to change (``module`` already matches ``state_dict``: applying a
    plan twice would remove more).
    """
    if payload.get("version") != PAYLOAD_VERSION:
        raise RuntimeError(f"{CHECKPOINT_KEY} version {payload.get('version')!r} is not supported by this "
                           f"lightning_oto (expects {PAYLOAD_VERSION}).")
    if _already_applied(module, state_dict):
        return False
    attr = payload.get("network_attr")
    net = resolve_network(module, attr)
    if payload["mode"] == "prune":
        plan = {(name, int(dim)): set(idx) for name, dim, idx in payload["plan"]}
        sub = slim_copy(net, plan)
    else:
        sub = _rebuild_erased(net, payload)
    install_subnet(module, attr, sub)
    return True


def _rebuild_erased(net: nn.Module, payload: Mapping[str, Any]) -> nn.Module:
    from ..oto import OTO  # the facade: only this upper layer may import it

    device = next((p.device for p in net.parameters()), torch.device("cpu"))
    oto = OTO(net, _zero_inputs(payload["example_inputs"], device), mode="erase")
    found = space_hash(oto.groups, "erase")
    if found != payload["space_hash"]:
        raise RuntimeError(
            f"the checkpoint's sub-network was erased from a different network (search space {payload['space_hash']}, "
            f"this one {found}): construct the LightningModule with the same architecture it was trained with.")
    params = dict(net.named_parameters())
    with torch.no_grad():
        for gid in payload["zero_group_ids"]:
            zero_group(oto.groups[gid], params)  # values are overwritten by the checkpoint's weights next
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return oto.construct_subnet(verify=False)


def load_checkpoint(lit_cls: type, ckpt_path: str | Path, **kwargs: Any) -> Any:
    """``lit_cls.load_from_checkpoint(ckpt_path, **kwargs)`` that also works after ``swap_subnet``.

    For any LightningModule class: the sub-network structure stored in the checkpoint is rebuilt in the
    fresh module before its weights load.  (``OTOMixin`` classes do this in their own
    ``on_load_checkpoint``, so their ``load_from_checkpoint`` works directly.)
    """
    def on_load_checkpoint(self: Any, checkpoint: dict[str, Any]) -> None:
        payload = checkpoint.get(CHECKPOINT_KEY)
        if payload is not None:
            apply_subnet_payload(self, payload, checkpoint.get("state_dict"))
        lit_cls.on_load_checkpoint(self, checkpoint)

    # a subclass only adds the hook; the loaded object gets the user's class back (same layout)
    shim = type(lit_cls.__name__, (lit_cls,), {"on_load_checkpoint": on_load_checkpoint,
                                               "__module__": lit_cls.__module__,
                                               "__qualname__": lit_cls.__qualname__})
    obj = shim.load_from_checkpoint(ckpt_path, **kwargs)
    obj.__class__ = lit_cls
    return obj


__all__ = ["CHECKPOINT_KEY", "apply_subnet_payload", "load_checkpoint", "space_hash", "subnet_payload"]
