"""Shared building blocks of the benchmark networks.

Complexity convention: the OTOv3 / ASGSSD papers count *multiply-accumulates* (MACs) of convolution
and linear layers as "FLOPs"; ``lightning_oto.subnet.report.count_macs`` (FlopCounterMode total / 2)
gives that number, so the figures in ``models/README.md`` compare directly with the papers' tables
(e.g. RegNetX-800MF measures ~0.80G MACs at 224x224).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..subnet.recalibrate import recalibrate_batchnorm


class ConvBN(nn.Sequential):
    """Conv2d -> BatchNorm2d (-> ReLU): the conv-bn segment every paper network is built from."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel_size: int = 3,
        stride: int = 1,
        groups: int = 1,
        dilation: int = 1,
        relu: bool = True,
        bias: bool = False,
    ) -> None:
        padding = dilation * (kernel_size - 1) // 2
        layers: list[nn.Module] = [
            nn.Conv2d(in_ch, out_ch, kernel_size, stride, padding, dilation=dilation, groups=groups, bias=bias),
            nn.BatchNorm2d(out_ch),
        ]
        if relu:
            layers.append(nn.ReLU())
        super().__init__(*layers)


class ExampleInputMixin:
    """Gives every model a documented default input size and an ``example_input`` helper.

    The engine traces models with ``torch.export``, which needs an example input of the right shape;
    keeping it on the model means callers never have to remember each network's resolution.
    """

    in_channels: int
    image_size: int

    def example_input(self, batch: int = 2) -> torch.Tensor:
        """A random NCHW tensor at the model's default resolution (deterministic for a given batch)."""
        g = torch.Generator().manual_seed(0)
        return torch.randn(batch, self.in_channels, self.image_size, self.image_size, generator=g)


def calibrate_batchnorm(model: nn.Module, inputs: torch.Tensor | Sequence[torch.Tensor]) -> nn.Module:
    """Set every BatchNorm's running statistics from one forward of ``inputs`` (returns ``model``).

    Freshly initialised BNs have running mean 0 / var 1, so an *untrained* model in eval mode does not
    normalise at all.  For sum-heavy super-networks (DARTS: every node sums ~7 ops per edge) that makes
    eval-mode activations grow ~40x per cell (1e13 after 8 cells), which breaks absolute-tolerance
    comparisons.  Training fixes the statistics; this does it without training, e.g. before checking a
    sub-network against an untrained full model (one batch of :func:`recalibrate_batchnorm`).
    """
    args = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    recalibrate_batchnorm(model, [args], num_batches=1, inputs_of=lambda batch: batch)
    return model
