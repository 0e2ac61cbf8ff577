"""DemoNet: the small-but-complex network of the ASGSSD/OTOv3 paper (Figure 2a).

Topology (names follow the figure)::

    x -> Conv1-BN1-ReLU ─┬─> Conv2-BN2-ReLU ─────────────┐
                         ├─> MaxPool -> Conv3-BN3-ReLU ──┼─> Concat -> MaxPool(2) ─┬─> Conv5-BN5 ─┐
                         └─> AvgPool -> Conv4-BN4-ReLU ──┘                         └─> Conv6 ─────┴─> Add -> ReLU
      -> Conv7-BN7-ReLU (stride 2) -> GlobalAvgPool -> Flatten -> Linear1 -> ReLU -> Linear2 -> logits

Conv1-BN1 has three consumers (so it is not removable); the three branches end in a Concat and
Conv5-BN5 / Conv6 end in an Add, so in erase mode those five segments are the removal structures,
and Conv6's input columns are grouped by the Concat branch they read (Figure 2c).
The exact widths of the paper's DemoNet are not published; the defaults here are chosen so the
network lands on the paper's baseline complexity for 1x28x28 Fashion-MNIST (0.82M params, 209M MACs).
"""

from __future__ import annotations

import torch
from torch import nn

from .common import ConvBN, ExampleInputMixin


class DemoNet(ExampleInputMixin, nn.Module):
    """Parallel conv / max-pool / avg-pool branches joined by Concat, then an Add of two convs."""

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int = 28,
        widths: tuple[int, int, int, int] = (64, 96, 128, 224),
        hidden: int = 128,
        width_mult: float = 1.0,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.image_size = image_size
        c1, c2, c3, c4 = (max(1, int(round(w * width_mult))) for w in widths)
        self.conv1 = ConvBN(in_channels, c1)
        self.conv2 = ConvBN(c1, c2)
        self.maxpool = nn.MaxPool2d(3, stride=1, padding=1)
        self.conv3 = ConvBN(c1, c2)
        self.avgpool = nn.AvgPool2d(3, stride=1, padding=1)
        self.conv4 = ConvBN(c1, c2)
        self.down = nn.MaxPool2d(2)
        self.conv5 = ConvBN(3 * c2, c3, relu=False)
        self.conv6 = nn.Conv2d(3 * c2, c3, kernel_size=1, bias=True)
        self.relu = nn.ReLU()
        self.conv7 = ConvBN(c3, c4, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear1 = nn.Linear(c4, hidden)
        self.linear2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.conv1(x)
        b2 = self.conv2(x1)
        b3 = self.conv3(self.maxpool(x1))
        b4 = self.conv4(self.avgpool(x1))
        cat = self.down(torch.cat([b2, b3, b4], dim=1))
        y = self.relu(self.conv5(cat) + self.conv6(cat))
        y = self.pool(self.conv7(y))
        y = torch.flatten(y, 1)
        return self.linear2(self.relu(self.linear1(y)))
