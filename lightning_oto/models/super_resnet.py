"""SuperResNet: a ZenNAS-inspired ResNet super-network of super-residual blocks (ASGSSD Figure 7a).

Each super-residual block keeps the ResNet shortcut (identity, or 1x1 conv-bn projection when the
shape changes) and replaces the single residual conv by parallel candidates, one Conv-BN per kernel
size (3x3, 5x5, 7x7 by default), whose outputs are summed together with the shortcut::

    x ─┬─> Conv3x3-BN ─┐
       ├─> Conv5x5-BN ─┤
       ├─> Conv7x7-BN ─┼─> Add -> ReLU
       └─> shortcut ───┘

Every candidate ends in the Add joint vertex, so in erase mode each one is a removal structure and the
search picks kernel sizes per block (and, by removing all of them, the depth: the block collapses to its
shortcut).  The paper reports only the searched sub-network (2.0M params, 97.5% on CIFAR-10); the
default super-network here is sized to ~2.0M params at 3x32x32 — pass a larger ``width_mult`` /
``stages`` for a bigger search space.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .common import ConvBN, ExampleInputMixin


class SuperResBlock(nn.Module):
    """Residual block whose residual branch is the sum of parallel Conv-BN candidates of several kernel sizes."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1, kernel_sizes: Sequence[int] = (3, 5, 7)) -> None:
        super().__init__()
        self.candidates = nn.ModuleList(
            ConvBN(in_ch, out_ch, kernel_size=k, stride=stride, relu=False) for k in kernel_sizes
        )
        if stride != 1 or in_ch != out_ch:
            self.shortcut: nn.Module = ConvBN(in_ch, out_ch, kernel_size=1, stride=stride, relu=False)
        else:
            self.shortcut = nn.Identity()
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.shortcut(x)
        for cand in self.candidates:
            out = out + cand(x)
        return self.relu(out)


class SuperResNet(ExampleInputMixin, nn.Module):
    """Stem -> stages of :class:`SuperResBlock` -> global average pool -> linear."""

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        image_size: int = 32,
        stem_width: int = 24,
        stages: Sequence[tuple[int, int, int]] = ((32, 2, 1), (64, 2, 2), (96, 2, 2)),
        kernel_sizes: Sequence[int] = (3, 5, 7),
        width_mult: float = 1.0,
    ) -> None:
        """``stages``: (out_channels, num_blocks, first_stride) per stage."""
        super().__init__()
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.image_size = image_size
        prev = max(1, int(round(stem_width * width_mult)))
        self.stem = ConvBN(in_channels, prev)
        blocks: list[nn.Module] = []
        for out_ch, n_blocks, stride in stages:
            out_ch = max(1, int(round(out_ch * width_mult)))
            for i in range(n_blocks):
                blocks.append(SuperResBlock(prev, out_ch, stride if i == 0 else 1, kernel_sizes))
                prev = out_ch
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(prev, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        return self.classifier(torch.flatten(self.pool(x), 1))
