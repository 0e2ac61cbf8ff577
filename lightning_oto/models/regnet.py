"""RegNetX (Radosavovic et al., 2020) adapted to 32x32 CIFAR input.

X block: 1x1 Conv-BN-ReLU -> 3x3 group Conv-BN-ReLU (group width ``g``, stride on the 3x3) ->
1x1 Conv-BN, added to the shortcut (identity, or 1x1 stride-s Conv-BN projection when the shape
changes), then ReLU.  Bottleneck ratio 1 for all RegNetX models.

Stage depths / widths / group widths are the published RegNetX-200MF...800MF values (pycls model
zoo).  CIFAR adaptation: the ImageNet stem (3x3 stride-2 conv, 32 channels) becomes stride 1; the
four stages keep their stride 2, so a 32x32 input is seen at 16/8/4/2.  With 10 classes
RegNetX-800MF has 6.59M parameters, the paper's "RegNet-800M 6.60M" for CIFAR-10.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .common import ConvBN, ExampleInputMixin

# name -> (depths, widths, group_width); bottleneck ratio is 1 for every RegNetX.
REGNETX_CONFIGS: dict[str, tuple[tuple[int, ...], tuple[int, ...], int]] = {
    "200M": ((1, 1, 4, 7), (24, 56, 152, 368), 8),
    "400M": ((1, 2, 7, 12), (32, 64, 160, 384), 16),
    "600M": ((1, 3, 5, 7), (48, 96, 240, 528), 24),
    "800M": ((1, 3, 7, 5), (64, 128, 288, 672), 16),
}


class XBlock(nn.Module):
    """RegNetX residual bottleneck block with a group 3x3 convolution."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, group_width: int, bottleneck_ratio: float = 1.0) -> None:
        super().__init__()
        mid = int(round(out_ch * bottleneck_ratio))
        groups = max(1, mid // min(group_width, mid))
        self.a = ConvBN(in_ch, mid, kernel_size=1)
        self.b = ConvBN(mid, mid, kernel_size=3, stride=stride, groups=groups)
        self.c = ConvBN(mid, out_ch, kernel_size=1, relu=False)
        if stride != 1 or in_ch != out_ch:
            self.shortcut: nn.Module = ConvBN(in_ch, out_ch, kernel_size=1, stride=stride, relu=False)
        else:
            self.shortcut = nn.Identity()
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.shortcut(x) + self.c(self.b(self.a(x))))


class RegNet(ExampleInputMixin, nn.Module):
    """RegNetX: stem -> 4 stages of :class:`XBlock` -> global average pool -> linear."""

    def __init__(
        self,
        config: str = "800M",
        num_classes: int = 10,
        in_channels: int = 3,
        image_size: int = 32,
        stem_width: int = 32,
        stem_stride: int = 1,
        depths: Sequence[int] | None = None,
        widths: Sequence[int] | None = None,
        group_width: int | None = None,
        width_mult: float = 1.0,
    ) -> None:
        """``config`` picks a RegNetX preset; ``depths``/``widths``/``group_width`` override it.

        ``width_mult`` scales widths, rounded to a multiple of the group width so groups stay whole.
        """
        super().__init__()
        if config not in REGNETX_CONFIGS:
            raise ValueError(f"unknown RegNetX config {config!r}; choose from {sorted(REGNETX_CONFIGS)}")
        d0, w0, g0 = REGNETX_CONFIGS[config]
        depths = tuple(depths) if depths is not None else d0
        widths = tuple(widths) if widths is not None else w0
        g = group_width if group_width is not None else g0
        if len(depths) != len(widths):
            raise ValueError("depths and widths must have the same length")
        self.config = config
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.image_size = image_size
        self.stem = ConvBN(in_channels, stem_width, kernel_size=3, stride=stem_stride)
        prev = stem_width
        stages: list[nn.Module] = []
        for depth, width in zip(depths, widths):
            width = max(g, int(round(width * width_mult / g)) * g) if width_mult != 1.0 else width
            blocks = [XBlock(prev if i == 0 else width, width, 2 if i == 0 else 1, g) for i in range(depth)]
            stages.append(nn.Sequential(*blocks))
            prev = width
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(prev, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.classifier(torch.flatten(self.pool(x), 1))
