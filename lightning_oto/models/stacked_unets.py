"""StackedUnets: two U-Nets with different down-samplers, combined, with a classifier head.

The ASGSSD paper (Sec. 4 / Figure 5) builds this for SVHN by "stacking two standard Unets with
different down-samplers together"; its result ("the right-hand-side Unet is disabled") shows the two
U-Nets sit side by side on the same stem and are joined by an aggregation vertex, so one of them can be
removed entirely.  Here:

    x -> Stem(Conv-BN-ReLU) ─┬─> UNet-A (MaxPool down-sampling)       ─┐
                             └─> UNet-B (stride-2 Conv-BN-ReLU down)    ─┴─> Add -> Conv-BN-ReLU
      -> GlobalAvgPool -> Flatten -> Linear -> logits

Each U-Net: an encoder of conv-bn-relu blocks (one per level, ``widths`` from shallow to deep), a bottleneck, and a decoder
that up-samples with a 2x2 stride-2 ConvTranspose and concatenates the encoder skip of the same level
before a conv-bn-relu block.  The deepest level's down -> conv -> up path ends in a Concat, so it is a
removal structure (the paper's "deepest depth path ... marked as redundant").
Exact paper widths are unpublished; the defaults hit the paper's baseline (0.80M params, 184M MACs at
3x32x32).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .common import ConvBN, ExampleInputMixin


class UNet(nn.Module):
    """A plain U-Net body (no head): ``in_ch`` channels in, ``widths[0]`` channels out, same resolution."""

    def __init__(self, in_ch: int, widths: Sequence[int], downsampler: str = "maxpool") -> None:
        super().__init__()
        if downsampler not in ("maxpool", "conv"):
            raise ValueError(f"downsampler must be 'maxpool' or 'conv', got {downsampler!r}")
        self.encoders = nn.ModuleList()
        self.downs = nn.ModuleList()
        prev = in_ch
        for level, w in enumerate(widths):
            if level > 0:
                self.downs.append(nn.MaxPool2d(2) if downsampler == "maxpool" else ConvBN(prev, prev, stride=2))
            self.encoders.append(ConvBN(prev, w))
            prev = w
        self.ups = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for level in reversed(range(len(widths) - 1)):
            self.ups.append(nn.ConvTranspose2d(widths[level + 1], widths[level], kernel_size=2, stride=2))
            self.decoders.append(ConvBN(2 * widths[level], widths[level]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips: list[torch.Tensor] = []
        for level, enc in enumerate(self.encoders):
            if level > 0:
                x = self.downs[level - 1](x)
            x = enc(x)
            skips.append(x)
        skips.pop()  # the bottleneck output is not a skip
        for up, dec in zip(self.ups, self.decoders):
            x = dec(torch.cat([up(x), skips.pop()], dim=1))
        return x


class StackedUnets(ExampleInputMixin, nn.Module):
    """Two parallel U-Nets (max-pool vs strided-conv down-sampling) summed, then a classifier head."""

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        image_size: int = 32,
        widths: Sequence[int] = (36, 54, 72, 108),
        head_width: int = 128,
        width_mult: float = 1.0,
    ) -> None:
        super().__init__()
        depth = len(widths)
        if depth < 2:
            raise ValueError("a U-Net needs at least 2 levels (widths of length >= 2)")
        if image_size % (2 ** (depth - 1)):
            raise ValueError(f"image_size {image_size} must be divisible by 2**(depth-1)={2 ** (depth - 1)}")
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.image_size = image_size
        widths = [max(1, int(round(w * width_mult))) for w in widths]
        base = widths[0]
        head = max(1, int(round(head_width * width_mult)))
        self.stem = ConvBN(in_channels, base)
        self.unet_a = UNet(base, widths, downsampler="maxpool")
        self.unet_b = UNet(base, widths, downsampler="conv")
        self.head = ConvBN(base, head)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(head, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.unet_a(x) + self.unet_b(x)
        x = self.pool(self.head(x))
        return self.classifier(torch.flatten(x, 1))
