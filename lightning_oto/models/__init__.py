"""Benchmark networks of the OTOv3 / ASGSSD papers, written in plain ``torch.nn``.

``build_model(name, **kwargs)`` returns a fresh model; every model exposes ``num_classes``,
``in_channels``, ``image_size`` and ``example_input(batch)`` so the engine can trace it without
knowing its resolution.  The complexity counters (``count_params``, ``count_macs``) are re-exported
from ``lightning_oto.subnet.report``; ``models/README.md`` lists the measured numbers.
"""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

from ..subnet.report import count_flops, count_macs, count_params
from .common import ConvBN, calibrate_batchnorm
from .darts import PRIMITIVES, DartsNetwork
from .demonet import DemoNet
from .regnet import REGNETX_CONFIGS, RegNet
from .stacked_unets import StackedUnets, UNet
from .super_resnet import SuperResBlock, SuperResNet


def _with(factory: Callable[..., nn.Module], **preset: Any) -> Callable[..., nn.Module]:
    def build(**kwargs: Any) -> nn.Module:
        return factory(**{**preset, **kwargs})

    return build


_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "demonet": DemoNet,
    "stacked_unets": StackedUnets,
    "super_resnet": SuperResNet,
    "darts8": _with(DartsNetwork, layers=8),
    "darts14": _with(DartsNetwork, layers=14),
    "regnet_200m": _with(RegNet, config="200M"),
    "regnet_400m": _with(RegNet, config="400M"),
    "regnet_600m": _with(RegNet, config="600M"),
    "regnet_800m": _with(RegNet, config="800M"),
}

_ALIASES: dict[str, str] = {"darts": "darts8", "regnet": "regnet_800m", "stackedunets": "stacked_unets",
                            "superresnet": "super_resnet"}

MODEL_NAMES: tuple[str, ...] = tuple(_REGISTRY)


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered model by name (case/dash-insensitive); ``kwargs`` go to its constructor.

    Typical kwargs: ``num_classes``, ``in_channels``, ``image_size``, ``width_mult``.
    """
    key = name.lower().replace("-", "_")
    key = _ALIASES.get(key, key)
    if key not in _REGISTRY:
        raise KeyError(f"unknown model {name!r}; available: {', '.join(MODEL_NAMES)}")
    return _REGISTRY[key](**kwargs)


__all__ = [
    "MODEL_NAMES",
    "PRIMITIVES",
    "REGNETX_CONFIGS",
    "ConvBN",
    "DartsNetwork",
    "DemoNet",
    "RegNet",
    "StackedUnets",
    "SuperResBlock",
    "SuperResNet",
    "UNet",
    "build_model",
    "calibrate_batchnorm",
    "count_flops",
    "count_macs",
    "count_params",
]
