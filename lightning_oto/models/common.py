"""Shared building blocks and complexity counters for the benchmark networks.

Complexity convention
---------------------
The OTOv3 / ASGSSD papers (and the OTO library they come from) count only convolution and linear
layers and report *multiply-accumulates* (MACs) as "FLOPs": a KxK conv with Cin->Cout channels on an
HxW output costs Cin*Cout*K*K*H*W/groups.  ``torch.utils.flop_counter.FlopCounterMode`` counts every
multiply-add as **2** FLOPs, so :func:`count_macs` divides its total by two.  With that convention the
standard reference points line up (e.g. RegNetX-800MF measures ~0.80G MACs at 224x224 here), and
the numbers in ``models/README.md`` are directly comparable with the papers' tables.
"""

from __future__ import annotations

import copy
from typing import Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


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


@torch.no_grad()
def calibrate_batchnorm(model: nn.Module, inputs: torch.Tensor | Sequence[torch.Tensor]) -> nn.Module:
    """Set every BatchNorm's running statistics from one forward of ``inputs`` (returns ``model``).

    Freshly initialised BNs have running mean 0 / var 1, so an *untrained* model in eval mode does not
    normalise at all.  For sum-heavy super-networks (DARTS: every node sums ~7 ops per edge) that makes
    eval-mode activations grow ~40x per cell (1e13 after 8 cells), which breaks absolute-tolerance
    comparisons.  Training fixes the statistics; this helper does it without training, e.g. before
    checking a sub-network against an untrained full model.  The model's train/eval mode is restored.
    """
    args = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m, m.momentum) for m in bns]
    was_training = model.training
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: one batch sets the statistics exactly
    model.train()
    try:
        model(*args)
    finally:
        for m, momentum in saved:
            m.momentum = momentum
        model.train(was_training)
    return model


def count_params(model: nn.Module) -> int:
    """Number of trainable parameters (sum of ``numel``), the papers' "params" column."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _flops(model: nn.Module, inputs: Sequence[torch.Tensor]) -> int:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(*inputs)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())


def count_flops(
    model: nn.Module, example_input: torch.Tensor | Sequence[torch.Tensor], on_meta: bool = True
) -> int:
    """Raw ``FlopCounterMode`` total (each multiply-add counts 2) for one forward pass.

    FLOPs depend only on shapes, so by default the count runs on a ``meta``-device copy of the model
    (no arithmetic, no memory: large networks are counted in about the time of a trace).  Models
    that cannot run on ``meta`` fall back to a real forward; the caller's model is never modified.
    """
    inputs = tuple(example_input) if isinstance(example_input, (tuple, list)) else (example_input,)
    if on_meta:
        try:
            meta_model = copy.deepcopy(model).to("meta")
            meta_inputs = tuple(t.to("meta") if isinstance(t, torch.Tensor) else t for t in inputs)
            return _flops(meta_model, meta_inputs)
        except Exception:  # noqa: BLE001 - any meta failure just means "count for real"
            pass
    return _flops(model, inputs)


def count_macs(
    model: nn.Module, example_input: torch.Tensor | Sequence[torch.Tensor], on_meta: bool = True
) -> int:
    """Multiply-accumulates of conv/linear layers for one forward pass: the papers' "FLOPs" column.

    Use a batch of 1 to get per-image numbers comparable to the papers.
    """
    return count_flops(model, example_input, on_meta) // 2
