"""Small hand-written architectures covering the patterns the engine must handle.

Each entry: name -> (factory, example-input factory). Kept tiny so the whole zoo runs in seconds.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def cbr(cin, cout, k=3, s=1, groups=1):
    return nn.Sequential(nn.Conv2d(cin, cout, k, s, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class PlainCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.f = nn.Sequential(cbr(3, 8), cbr(8, 16, s=2), cbr(16, 16))
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        return self.head(F.adaptive_avg_pool2d(self.f(x), 1).flatten(1))


class VGGFlatten(nn.Module):
    """flatten of a 4x4 map into a linear: channel c maps to a block of 16 features."""

    def __init__(self):
        super().__init__()
        self.f = nn.Sequential(cbr(3, 8), nn.MaxPool2d(2), cbr(8, 12), nn.MaxPool2d(2))
        self.fc1 = nn.Linear(12 * 4 * 4, 32)
        self.drop = nn.Dropout(0.1)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        x = self.f(x)
        x = x.view(x.size(0), -1)
        return self.fc2(self.drop(F.relu(self.fc1(x))))


class Block(nn.Module):
    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.c1 = cbr(cin, cout, s=stride)
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = None if (stride == 1 and cin == cout) else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = self.bn2(self.c2(self.c1(x)))
        s = x if self.short is None else self.short(x)
        return F.relu(y + s)


class ResNetTiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 8)
        self.layers = nn.Sequential(Block(8, 8), Block(8, 16, 2), Block(16, 16))
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.layers(self.stem(x)), 1), 1))


class Bottleneck(nn.Module):
    def __init__(self, cin, mid, cout, stride=1, groups=1):
        super().__init__()
        self.a = cbr(cin, mid, k=1)
        self.b = cbr(mid, mid, k=3, s=stride, groups=groups)
        self.c = nn.Sequential(nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.proj = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        return F.relu(self.c(self.b(self.a(x))) + self.proj(x))


class ResNeXtTiny(nn.Module):
    """Group convolutions (groups=4) inside bottlenecks, RegNet/ResNeXt style."""

    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 16)
        self.b1 = Bottleneck(16, 16, 32, groups=4)
        self.b2 = Bottleneck(32, 32, 32, stride=2, groups=8)
        self.fc = nn.Linear(32, 5)

    def forward(self, x):
        return self.fc(self.b2(self.b1(self.stem(x))).mean((2, 3)))


class SE(nn.Module):
    def __init__(self, c, r=4):
        super().__init__()
        self.fc1 = nn.Conv2d(c, c // r, 1)
        self.fc2 = nn.Conv2d(c // r, c, 1)

    def forward(self, x):
        s = F.adaptive_avg_pool2d(x, 1)
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(s))))


class MobileNetV3ish(nn.Module):
    """Inverted residuals: expand 1x1, depthwise 3x3, squeeze-excite gate, project, hardswish."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.Hardswish())
        self.exp = nn.Sequential(nn.Conv2d(8, 24, 1, bias=False), nn.BatchNorm2d(24), nn.Hardswish())
        self.dw = nn.Sequential(nn.Conv2d(24, 24, 3, 1, 1, groups=24, bias=False), nn.BatchNorm2d(24), nn.Hardswish())
        self.se = SE(24)
        self.proj = nn.Sequential(nn.Conv2d(24, 8, 1, bias=False), nn.BatchNorm2d(8))
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.proj(self.se(self.dw(self.exp(x))))
        return self.head(x.mean(dim=(2, 3)))


class InceptionTiny(nn.Module):
    """Parallel branches concatenated (offsets), then a consumer conv."""

    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 8)
        self.b1 = cbr(8, 4, k=1)
        self.b3 = nn.Sequential(cbr(8, 4, k=1), cbr(4, 6))
        self.b5 = nn.Sequential(cbr(8, 2, k=1), cbr(2, 4, k=5))
        self.bp = nn.Sequential(nn.MaxPool2d(3, 1, 1), cbr(8, 3, k=1))
        self.post = cbr(17, 12)
        self.fc = nn.Linear(12, 10)

    def forward(self, x):
        x = self.stem(x)
        x = torch.cat([self.b1(x), self.b3(x), self.b5(x), self.bp(x)], dim=1)
        return self.fc(self.post(x).mean((2, 3)))


class DenseTiny(nn.Module):
    """DenseNet-style: every layer reads the concat of all earlier features."""

    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 8)
        self.l1 = cbr(8, 4)
        self.l2 = cbr(12, 4)
        self.l3 = cbr(16, 4)
        self.trans = nn.Sequential(nn.BatchNorm2d(20), nn.ReLU(), nn.Conv2d(20, 10, 1), nn.AvgPool2d(2))
        self.fc = nn.Linear(10, 10)

    def forward(self, x):
        x = self.stem(x)
        x = torch.cat([x, self.l1(x)], 1)
        x = torch.cat([x, self.l2(x)], 1)
        x = torch.cat([x, self.l3(x)], 1)
        return self.fc(self.trans(x).mean((2, 3)))


class UNetTiny(nn.Module):
    """Encoder/decoder with ConvTranspose up-sampling and skip concats; dense output."""

    def __init__(self):
        super().__init__()
        self.e1 = cbr(3, 8)
        self.e2 = cbr(8, 16, s=2)
        self.mid = cbr(16, 16)
        self.up = nn.ConvTranspose2d(16, 8, 2, 2)
        self.upbn = nn.BatchNorm2d(8)
        self.d1 = cbr(16, 8)
        self.out = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        a = self.e1(x)
        b = self.mid(self.e2(a))
        u = F.relu(self.upbn(self.up(b)))
        return self.out(self.d1(torch.cat([u, a], 1)))


class GroupNormNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.gn1 = nn.GroupNorm(4, 16)
        self.c2 = nn.Conv2d(16, 12, 3, padding=1)
        self.gn2 = nn.GroupNorm(3, 12)
        self.fc = nn.Linear(12, 10)

    def forward(self, x):
        x = F.silu(self.gn1(self.c1(x)))
        x = F.gelu(self.gn2(self.c2(x)))
        return self.fc(x.mean((2, 3)))


class SharedWeights(nn.Module):
    """One conv module called twice (weight sharing) in sequence and one linear called on two branches."""

    def __init__(self):
        super().__init__()
        self.c1 = cbr(3, 8)
        self.shared = nn.Conv2d(8, 8, 3, padding=1)
        self.c3 = nn.Conv2d(8, 6, 3, padding=1)
        self.fc = nn.Linear(6, 10)

    def forward(self, x):
        x = self.c1(x)
        x = F.relu(self.shared(x))
        x = F.relu(self.shared(x))
        return self.fc(self.c3(x).mean((2, 3)))


class TwoInputs(nn.Module):
    """Two inputs (image + vector), fused by concat of features."""

    def __init__(self):
        super().__init__()
        self.img = nn.Sequential(cbr(3, 8), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.vec = nn.Sequential(nn.Linear(5, 12), nn.ReLU())
        self.fuse = nn.Linear(20, 16)
        self.out = nn.Linear(16, 3)

    def forward(self, x, v):
        return self.out(F.relu(self.fuse(torch.cat([self.img(x), self.vec(v)], 1))))


class Conv1dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(4, 16, 5, padding=2)
        self.bn1 = nn.BatchNorm1d(16)
        self.c2 = nn.Conv1d(16, 16, 3, padding=1, groups=16)
        self.c3 = nn.Conv1d(16, 8, 1)
        self.fc = nn.Linear(8 * 8, 6)

    def forward(self, x):
        x = F.relu(self.bn1(self.c1(x)))
        x = F.max_pool1d(F.relu(self.c2(x)) + x, 2)
        x = F.relu(self.c3(x))
        return self.fc(x.flatten(1))


class TransformerMLP(nn.Module):
    """Pre-norm transformer block: attention (kept), MLP hidden dim (prunable), LayerNorm on the model dim."""

    def __init__(self, d=16, hidden=32):
        super().__init__()
        self.emb = nn.Linear(8, d)
        self.ln1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, hidden)
        self.fc2 = nn.Linear(hidden, d)
        self.head = nn.Linear(d, 4)

    def forward(self, x):
        h = self.emb(x)
        a = self.ln1(h)
        h = h + self.attn(a, a, a, need_weights=False)[0]
        h = h + self.fc2(F.gelu(self.fc1(self.ln2(h))))
        return self.head(h.mean(1))


class SigmoidFeedsConv(nn.Module):
    """Non-zero-invariant: sigmoid(0)=0.5 feeding a conv must keep c1's channels unprunable."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.c3 = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = torch.sigmoid(self.c1(x))
        x = F.relu(self.c2(x))
        return self.c3(x).mean((2, 3))


class LayerScaleMix(nn.Module):
    """Raw nn.Parameter used element-wise (layer scale) and a channel-last MLP via permute."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 12, 3, padding=1)
        self.gamma = nn.Parameter(torch.rand(12))
        self.pw1 = nn.Linear(12, 24)
        self.pw2 = nn.Linear(24, 12)
        self.fc = nn.Linear(12, 10)

    def forward(self, x):
        x = F.relu(self.c1(x))
        y = x.permute(0, 2, 3, 1)
        y = self.pw2(F.gelu(self.pw1(y))) * self.gamma
        x = x + y.permute(0, 3, 1, 2)
        return self.fc(x.mean((2, 3)))


class InstanceNormNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.in1 = nn.InstanceNorm2d(8, affine=True)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.in2 = nn.InstanceNorm2d(8)  # no affine: zero channel stays zero (input statistics)
        self.c3 = nn.Conv2d(8, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x = F.leaky_relu(self.in1(self.c1(x)))
        x = F.relu(self.in2(self.c2(x)))
        return self.fc(self.c3(x).mean((2, 3)))


def _img(c=3, s=16, b=2):
    return lambda: torch.randn(b, c, s, s)


ZOO = {
    "plain_cnn": (PlainCNN, _img()),
    "vgg_flatten": (VGGFlatten, _img()),
    "resnet_tiny": (ResNetTiny, _img()),
    "resnext_groupconv": (ResNeXtTiny, _img()),
    "mobilenetv3_se": (MobileNetV3ish, _img()),
    "inception_concat": (InceptionTiny, _img()),
    "densenet_concat": (DenseTiny, _img()),
    "unet_convtranspose": (UNetTiny, _img()),
    "groupnorm": (GroupNormNet, _img()),
    "shared_weights": (SharedWeights, _img()),
    "two_inputs": (TwoInputs, lambda: (torch.randn(2, 3, 16, 16), torch.randn(2, 5))),
    "conv1d_depthwise": (Conv1dNet, lambda: torch.randn(2, 4, 16)),
    "transformer_mlp": (TransformerMLP, lambda: torch.randn(2, 6, 8)),
    "sigmoid_feeds_conv": (SigmoidFeedsConv, _img()),
    "layerscale_channels_last": (LayerScaleMix, _img()),
    "instancenorm": (InstanceNormNet, _img()),
}


def make(name: str, seed: int = 0):
    torch.manual_seed(seed)
    factory, inp = ZOO[name]
    model = factory()
    # non-trivial BN statistics so eval mode is not an identity map
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    x = inp()
    return model, x


# ---------------------------------------------------------------- branchy models for erase mode
class SepConv(nn.Module):
    def __init__(self, c, k):
        super().__init__()
        self.op = nn.Sequential(nn.ReLU(), nn.Conv2d(c, c, k, 1, k // 2, groups=c, bias=False),
                                nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        return self.op(x)


class DartsCellNet(nn.Module):
    """DARTS-style: every intermediate node sums all candidate ops on all incoming edges; cell output concat."""

    def __init__(self, c=8, nodes=3):
        super().__init__()
        self.stem = cbr(3, c)
        self.nodes = nodes
        self.edges = nn.ModuleList()
        for i in range(nodes):
            for _ in range(i + 1):
                self.edges.append(nn.ModuleList([SepConv(c, 3), SepConv(c, 5), nn.Sequential(
                    nn.ReLU(), nn.Conv2d(c, c, 3, 1, 2, dilation=2, bias=False), nn.BatchNorm2d(c))]))
        self.pool = nn.MaxPool2d(3, 1, 1)
        self.pre = nn.Sequential(nn.ReLU(), nn.Conv2d(c * nodes, c, 1, bias=False), nn.BatchNorm2d(c))
        self.fc = nn.Linear(c, 10)

    def forward(self, x):
        states = [self.stem(x)]
        k = 0
        for i in range(self.nodes):
            acc = None
            for s in states:
                for op in self.edges[k]:
                    y = op(s)
                    acc = y if acc is None else acc + y
                acc = acc + self.pool(s)  # a parameter-free candidate is summed too
                k += 1
            states.append(acc)
        out = self.pre(torch.cat(states[1:], 1))
        return self.fc(out.mean((2, 3)))


class UNetDown(nn.Module):
    def __init__(self, c, strided):
        super().__init__()
        self.e1 = cbr(c, c)
        self.down = nn.Conv2d(c, 2 * c, 3, 2, 1) if strided else nn.Sequential(nn.MaxPool2d(2), nn.Conv2d(c, 2 * c, 1))
        self.mid = cbr(2 * c, 2 * c)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.upc = cbr(2 * c, c, k=1)
        self.fuse = cbr(2 * c, c)

    def forward(self, x):
        a = self.e1(x)
        b = self.mid(self.down(a))
        return self.fuse(torch.cat([self.upc(self.up(b)), a], 1))


class StackedUNetsTiny(nn.Module):
    """Two U-Nets with different down-samplers, stacked, each with its skip concat."""

    def __init__(self, c=6):
        super().__init__()
        self.stem = cbr(3, c)
        self.u1 = UNetDown(c, strided=False)
        self.u2 = UNetDown(c, strided=True)
        self.head = nn.Linear(c, 10)

    def forward(self, x):
        x = self.stem(x)
        x = self.u2(self.u1(x)) + x
        return self.head(x.mean((2, 3)))


class DemoNetTiny(nn.Module):
    """Figure 2a in small: conv1 fans out to conv2 / max-pool / avg-pool paths, joined by concat and add."""

    def __init__(self):
        super().__init__()
        self.conv1 = cbr(1, 8)
        self.conv2 = cbr(8, 8)
        self.mp = nn.Sequential(nn.MaxPool2d(3, 1, 1), cbr(8, 8, k=1))
        self.ap = nn.Sequential(nn.AvgPool2d(3, 1, 1), cbr(8, 8, k=1))
        self.conv3 = cbr(8, 8)
        self.conv4 = cbr(16, 8)
        self.conv5 = nn.Sequential(nn.Conv2d(8, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8))
        self.conv6 = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x1 = self.conv1(x)
        a = self.conv3(self.conv2(x1))
        b = self.mp(x1)
        c = self.ap(x1)
        y = self.conv4(torch.cat([a + b, c], 1))
        z = F.relu(self.conv5(y) + self.conv6(y))
        return self.fc(z.mean((2, 3)))


ZOO.update({
    "darts_cell": (DartsCellNet, _img(s=12)),
    "stacked_unets": (StackedUNetsTiny, _img()),
    "demonet_tiny": (DemoNetTiny, _img(c=1, s=14)),
})

ERASE_ZOO = ["inception_concat", "resnet_tiny", "densenet_concat", "unet_convtranspose", "darts_cell",
             "stacked_unets", "demonet_tiny", "resnext_groupconv", "transformer_mlp"]
