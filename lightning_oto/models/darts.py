"""DARTS super-network (Liu et al., 2018) without architecture weights, as searched by ASGSSD/OTOv3.

Every cell has two input nodes (the outputs of the two previous cells, each passed through a 1x1
preprocess ReLU-Conv-BN) and ``steps`` intermediate nodes.  Intermediate node i receives an edge from
every earlier node, and each edge is a *mixed op*: the plain **sum** of all candidate operations (no
softmax-weighted architecture parameters — OTOv3 finds the redundant ones by structured sparsity).
The cell output is the channel concat of the intermediate nodes.  Cells at 1/3 and 2/3 of the depth
are reduction cells (stride 2 on edges leaving the input nodes, channels doubled).

Candidate operations (``OPS``): sep_conv_3x3, sep_conv_5x5, dil_conv_3x3, dil_conv_5x5 (with weights,
the erase-mode removal structures: each ends in the node's Add), and max_pool_3x3, avg_pool_3x3,
skip_connect (parameter-free identity; on stride-2 edges, and for the preprocess after a reduction
cell, DARTS' FactorizedReduce is replaced by a ReLU-Conv1x1(stride 2)-BN, which avoids tensor
slicing and has the same parameter count).  The 'none' op is omitted: it adds exact zeros to a sum.

STL-10 adaptation: the paper gives only the totals (8 cells, 4.05M params, 614M MACs at 96x96).  The
default stem (3x3 conv stride 3: 96x96 -> 32x32, the CIFAR resolution DARTS was designed for; stem
width 3C) with C=24 lands on them (4.08M / 600M); ``stem_stride`` and ``C`` are arguments.
``DartsNetwork(layers=14)`` is the 14-cell variant.

Numerics: with no architecture weights, node sums are not averaged, so an *untrained* network in eval
mode (BN running stats still 0/1) grows ~40x per cell (~1e13 at the output of 8 cells).  Training mode
and trained networks are fine; to compare untrained full and sub-networks use a relative tolerance or
call ``lightning_oto.models.calibrate_batchnorm(model, x)`` first (output back to O(100)).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


class ReLUConvBN(nn.Sequential):
    """ReLU -> Conv -> BN, the DARTS preprocessing unit."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int = 1, stride: int = 1) -> None:
        super().__init__(
            nn.ReLU(),
            nn.Conv2d(in_ch, out_ch, kernel_size, stride, (kernel_size - 1) // 2, bias=False),
            nn.BatchNorm2d(out_ch),
        )


class DilConv(nn.Sequential):
    """ReLU -> depthwise dilated conv -> pointwise conv -> BN."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, stride: int, dilation: int) -> None:
        pad = dilation * (kernel_size - 1) // 2
        super().__init__(
            nn.ReLU(),
            nn.Conv2d(in_ch, in_ch, kernel_size, stride, pad, dilation=dilation, groups=in_ch, bias=False),
            nn.Conv2d(in_ch, out_ch, 1, bias=False),
            nn.BatchNorm2d(out_ch),
        )


class SepConv(nn.Sequential):
    """Two stacked (ReLU -> depthwise conv -> pointwise conv -> BN); only the first one strides."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, stride: int) -> None:
        super().__init__(
            DilConv(in_ch, in_ch, kernel_size, stride, dilation=1),
            DilConv(in_ch, out_ch, kernel_size, 1, dilation=1),
        )


def _skip(c: int, stride: int) -> nn.Module:
    return nn.Identity() if stride == 1 else ReLUConvBN(c, c, 1, stride)


OPS: dict[str, Callable[[int, int], nn.Module]] = {
    "max_pool_3x3": lambda c, s: nn.MaxPool2d(3, stride=s, padding=1),
    "avg_pool_3x3": lambda c, s: nn.AvgPool2d(3, stride=s, padding=1, count_include_pad=False),
    "skip_connect": _skip,
    "sep_conv_3x3": lambda c, s: SepConv(c, c, 3, s),
    "sep_conv_5x5": lambda c, s: SepConv(c, c, 5, s),
    "dil_conv_3x3": lambda c, s: DilConv(c, c, 3, s, 2),
    "dil_conv_5x5": lambda c, s: DilConv(c, c, 5, s, 2),
}
PRIMITIVES: tuple[str, ...] = tuple(OPS)


class MixedOp(nn.Module):
    """One DARTS edge: the sum of every candidate operation applied to the same input."""

    def __init__(self, c: int, stride: int, primitives: tuple[str, ...] = PRIMITIVES) -> None:
        super().__init__()
        self.ops = nn.ModuleList(OPS[p](c, stride) for p in primitives)
        self.primitives = primitives

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.ops[0](x)
        for op in self.ops[1:]:
            out = out + op(x)
        return out


class Cell(nn.Module):
    """A DARTS cell: 2 preprocessed inputs, ``steps`` summing nodes, output = concat of the nodes."""

    def __init__(
        self,
        steps: int,
        c_prev_prev: int,
        c_prev: int,
        c: int,
        reduction: bool,
        reduction_prev: bool,
        primitives: tuple[str, ...] = PRIMITIVES,
    ) -> None:
        super().__init__()
        self.reduction = reduction
        self.steps = steps
        # After a reduction cell the older input is at twice the resolution: reduce it with stride 2.
        self.preprocess0 = ReLUConvBN(c_prev_prev, c, 1, 2 if reduction_prev else 1)
        self.preprocess1 = ReLUConvBN(c_prev, c, 1, 1)
        self.edges = nn.ModuleList()
        for i in range(steps):
            for j in range(2 + i):
                stride = 2 if reduction and j < 2 else 1
                self.edges.append(MixedOp(c, stride, primitives))

    def forward(self, s0: torch.Tensor, s1: torch.Tensor) -> torch.Tensor:
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        offset = 0
        for _ in range(self.steps):
            node = self.edges[offset](states[0])
            for j in range(1, len(states)):
                node = node + self.edges[offset + j](states[j])
            offset += len(states)
            states.append(node)
        return torch.cat(states[2:], dim=1)


class DartsNetwork(nn.Module):
    """DARTS super-network: stem -> ``layers`` cells (reductions at 1/3, 2/3) -> GAP -> linear."""

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        image_size: int = 96,
        C: int = 24,
        layers: int = 8,
        steps: int = 4,
        stem_multiplier: int = 3,
        stem_stride: int = 3,
        primitives: tuple[str, ...] = PRIMITIVES,
    ) -> None:
        super().__init__()
        unknown = [p for p in primitives if p not in OPS]
        if unknown:
            raise ValueError(f"unknown DARTS primitives {unknown}; choose from {list(OPS)}")
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.image_size = image_size
        self.layers = layers
        c_curr = stem_multiplier * C
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, c_curr, 3, stride=stem_stride, padding=1, bias=False),
            nn.BatchNorm2d(c_curr),
        )
        c_prev_prev, c_prev, c_curr = c_curr, c_curr, C
        self.cells = nn.ModuleList()
        reduction_prev = False
        reduction_at = {layers // 3, 2 * layers // 3}
        for i in range(layers):
            reduction = i in reduction_at
            if reduction:
                c_curr *= 2
            cell = Cell(steps, c_prev_prev, c_prev, c_curr, reduction, reduction_prev, primitives)
            self.cells.append(cell)
            reduction_prev = reduction
            c_prev_prev, c_prev = c_prev, steps * c_curr
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c_prev, num_classes)

    def example_input(self, batch: int = 2) -> torch.Tensor:
        """A random NCHW tensor at the model's default resolution (deterministic for a given batch)."""
        g = torch.Generator().manual_seed(0)
        return torch.randn(batch, self.in_channels, self.image_size, self.image_size, generator=g)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s0 = s1 = self.stem(x)
        for cell in self.cells:
            s0, s1 = s1, cell(s0, s1)
        return self.classifier(torch.flatten(self.pool(s1), 1))
