"""Small versions of torchvision / timm architectures, written out in their idioms.

torchvision does not import here and timm is not installed; what matters for the engine is how these
libraries write their forward passes, so each class keeps exactly that idiom: ``out += identity`` and
``ReLU(inplace=True)`` (torchvision ResNet), pre-activation dense layers reading ``torch.cat`` of all
earlier outputs (DenseNet), parallel branches into ``torch.cat`` (Inception / GoogLeNet), token and
channel MLPs (MLP-Mixer), layer scale as ``gamma.reshape(-1, 1, 1) * x`` / ``x * gamma`` (timm
ConvNeXt, PoolFormer, CaiT).
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn


def _conv3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride, 1, bias=False)


# ------------------------------------------------------------------ torchvision ResNet
class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, width: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1, self.bn1 = _conv3(cin, width, stride), nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.conv2, self.bn2 = _conv3(width, width), nn.BatchNorm2d(width)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = _conv3(width, width, stride), nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, width * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(width * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class TVResNet(nn.Module):
    """torchvision.models.ResNet in miniature (two stages of ``blocks`` blocks)."""

    def __init__(self, block: type = BasicBlock, blocks: tuple[int, int] = (2, 2), widths: tuple[int, int] = (8, 16),
                 num_classes: int = 10) -> None:
        super().__init__()
        self.inplanes = 8
        self.conv1 = nn.Conv2d(3, 8, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._layer(block, widths[0], blocks[0], 1)
        self.layer2 = self._layer(block, widths[1], blocks[1], 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[1] * block.expansion, num_classes)

    def _layer(self, block: type, width: int, n: int, stride: int) -> nn.Sequential:
        down = None
        if stride != 1 or self.inplanes != width * block.expansion:
            down = nn.Sequential(nn.Conv2d(self.inplanes, width * block.expansion, 1, stride, bias=False),
                                 nn.BatchNorm2d(width * block.expansion))
        layers = [block(self.inplanes, width, stride, down)]
        self.inplanes = width * block.expansion
        layers += [block(self.inplanes, width) for _ in range(1, n)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# ------------------------------------------------------------------ torchvision DenseNet
class DenseLayer(nn.Module):
    """Pre-activation: BN -> ReLU -> 1x1 conv -> BN -> ReLU -> 3x3 conv on the concat of all earlier outputs."""

    def __init__(self, cin: int, growth: int, bn_size: int = 2) -> None:
        super().__init__()
        self.norm1, self.relu1 = nn.BatchNorm2d(cin), nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(cin, bn_size * growth, 1, bias=False)
        self.norm2, self.relu2 = nn.BatchNorm2d(bn_size * growth), nn.ReLU(inplace=True)
        self.conv2 = _conv3(bn_size * growth, growth)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = torch.cat(features, 1)
        x = self.conv1(self.relu1(self.norm1(x)))
        return self.conv2(self.relu2(self.norm2(x)))


class DenseBlock(nn.ModuleDict):
    def __init__(self, n: int, cin: int, growth: int) -> None:
        super().__init__()
        for i in range(n):
            self[f"denselayer{i + 1}"] = DenseLayer(cin + i * growth, growth)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


class DenseNet(nn.Module):
    def __init__(self, growth: int = 8, blocks: tuple[int, int] = (4, 3), init: int = 16, num_classes: int = 10) -> None:
        super().__init__()
        feats: list[tuple[str, nn.Module]] = [("conv0", nn.Conv2d(3, init, 3, 1, 1, bias=False)),
                                              ("norm0", nn.BatchNorm2d(init)), ("relu0", nn.ReLU(inplace=True))]
        c = init
        for i, n in enumerate(blocks):
            feats.append((f"denseblock{i + 1}", DenseBlock(n, c, growth)))
            c += n * growth
            if i != len(blocks) - 1:
                feats.append((f"transition{i + 1}", nn.Sequential(
                    nn.BatchNorm2d(c), nn.ReLU(inplace=True), nn.Conv2d(c, c // 2, 1, bias=False), nn.AvgPool2d(2))))
                c //= 2
        feats.append(("norm5", nn.BatchNorm2d(c)))
        self.features = nn.Sequential(OrderedDict(feats))
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.features(x), inplace=True)
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


# ------------------------------------------------------------------ GoogLeNet / Inception
class BasicConv2d(nn.Module):
    def __init__(self, cin: int, cout: int, k: int = 1, padding: int = 0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)), inplace=True)


class Inception(nn.Module):
    def __init__(self, cin: int, c1: int, c3r: int, c3: int, c5r: int, c5: int, pool: int) -> None:
        super().__init__()
        self.branch1 = BasicConv2d(cin, c1)
        self.branch2 = nn.Sequential(BasicConv2d(cin, c3r), BasicConv2d(c3r, c3, 3, 1))
        self.branch3 = nn.Sequential(BasicConv2d(cin, c5r), BasicConv2d(c5r, c5, 3, 1))
        self.branch4 = nn.Sequential(nn.MaxPool2d(3, 1, 1, ceil_mode=True), BasicConv2d(cin, pool))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], 1)


class GoogLeNet(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = BasicConv2d(3, 16, 3, 1)
        self.maxpool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.inception3a = Inception(16, 8, 8, 12, 4, 6, 6)
        self.inception3b = Inception(32, 12, 8, 16, 4, 8, 8)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(0.2)
        self.fc = nn.Linear(44, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool1(self.conv1(x))
        x = self.inception3b(self.inception3a(x))
        return self.fc(self.dropout(torch.flatten(self.avgpool(x), 1)))


# ------------------------------------------------------------------ MLP-Mixer
class Mlp(nn.Module):
    """timm Mlp: fc1 -> GELU -> Dropout -> fc2 -> Dropout."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.1) -> None:
        super().__init__()
        self.fc1, self.act, self.drop1 = nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(drop)
        self.fc2, self.drop2 = nn.Linear(hidden, dim), nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class MixerBlock(nn.Module):
    def __init__(self, dim: int, tokens: int) -> None:
        super().__init__()
        self.norm1, self.mlp_tokens = nn.LayerNorm(dim), Mlp(tokens, tokens * 2)
        self.norm2, self.mlp_channels = nn.LayerNorm(dim), Mlp(dim, dim * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.mlp_tokens(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.mlp_channels(self.norm2(x))


class MLPMixer(nn.Module):
    def __init__(self, dim: int = 32, patch: int = 8, image: int = 32, depth: int = 2, num_classes: int = 10) -> None:
        super().__init__()
        tokens = (image // patch) ** 2
        self.stem = nn.Conv2d(3, dim, patch, patch)
        self.blocks = nn.Sequential(*[MixerBlock(dim, tokens) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x).flatten(2).transpose(1, 2)
        x = self.norm(self.blocks(x))
        return self.head(x.mean(dim=1))


# ------------------------------------------------------------------ layer scale (timm ConvNeXt / PoolFormer / CaiT)
class LayerNorm2d(nn.LayerNorm):
    """timm LayerNorm2d: LayerNorm over channels of an NCHW tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps).permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    """timm ConvNeXtBlock with conv_mlp=True: the branch ends in ``x.mul(gamma.reshape(1, -1, 1, 1))``."""

    def __init__(self, dim: int, ls_init: float = 1e-6) -> None:
        super().__init__()
        self.conv_dw = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = LayerNorm2d(dim, eps=1e-6)
        self.fc1, self.act, self.fc2 = nn.Conv2d(dim, dim * 4, 1), nn.GELU(), nn.Conv2d(dim * 4, dim, 1)
        self.gamma = nn.Parameter(ls_init * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.fc2(self.act(self.fc1(self.norm(self.conv_dw(x)))))
        x = x.mul(self.gamma.reshape(1, -1, 1, 1))
        return x + shortcut


class ConvNeXtNHWCBlock(nn.Module):
    """timm ConvNeXtBlock with conv_mlp=False: channels-last MLP, then ``x * gamma`` before permuting back."""

    def __init__(self, dim: int, ls_init: float = 1e-6) -> None:
        super().__init__()
        self.conv_dw = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, dim * 4, drop=0.0)
        self.gamma = nn.Parameter(ls_init * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.norm(self.conv_dw(x).permute(0, 2, 3, 1))
        x = self.mlp(x) * self.gamma
        return x.permute(0, 3, 1, 2) + shortcut


class TimmConvNeXt(nn.Module):
    def __init__(self, dims: tuple[int, int] = (16, 32), num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, dims[0], 4, 4), LayerNorm2d(dims[0], eps=1e-6))
        self.stage1 = nn.Sequential(ConvNeXtBlock(dims[0]), ConvNeXtNHWCBlock(dims[0]))
        self.down = nn.Sequential(LayerNorm2d(dims[0], eps=1e-6), nn.Conv2d(dims[0], dims[1], 2, 2))
        self.stage2 = nn.Sequential(ConvNeXtBlock(dims[1]), ConvNeXtNHWCBlock(dims[1]))
        self.head_norm = nn.LayerNorm(dims[1])
        self.head = nn.Linear(dims[1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage2(self.down(self.stage1(self.stem(x))))
        return self.head(self.head_norm(x.mean((2, 3))))


class PoolFormerBlock(nn.Module):
    """timm PoolFormer block: token mixer ``pool(x) - x``, GroupNorm(1), layer scale ``gamma.reshape(-1, 1, 1) * x``."""

    def __init__(self, dim: int, ls_init: float = 1e-5) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(1, dim)
        self.pool = nn.AvgPool2d(3, 1, 1, count_include_pad=False)
        self.norm2 = nn.GroupNorm(1, dim)
        self.fc1, self.act, self.fc2 = nn.Conv2d(dim, dim * 2, 1), nn.GELU(), nn.Conv2d(dim * 2, dim, 1)
        self.layer_scale1 = nn.Parameter(ls_init * torch.ones(dim))
        self.layer_scale2 = nn.Parameter(ls_init * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm1(x)
        x = x + self.layer_scale1.reshape(-1, 1, 1) * (self.pool(y) - y)
        return x + self.layer_scale2.reshape(-1, 1, 1) * self.fc2(self.act(self.fc1(self.norm2(x))))


class TimmPoolFormer(nn.Module):
    def __init__(self, dims: tuple[int, int] = (16, 32), num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, dims[0], 7, 4, 2)
        self.stage1 = nn.Sequential(PoolFormerBlock(dims[0]), PoolFormerBlock(dims[0]))
        self.down = nn.Conv2d(dims[0], dims[1], 3, 2, 1)
        self.stage2 = nn.Sequential(PoolFormerBlock(dims[1]))
        self.norm = nn.GroupNorm(1, dims[1])
        self.head = nn.Linear(dims[1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.stage2(self.down(self.stage1(self.stem(x)))))
        return self.head(x.mean((-2, -1)))


class Attention(nn.Module):
    """timm Attention: one qkv linear, then explicit softmax(q k^T) v, or ``F.scaled_dot_product_attention``
    with ``fused`` (timm's ``fused_attn``)."""

    def __init__(self, dim: int, heads: int, fused: bool = False) -> None:
        super().__init__()
        self.heads, self.scale, self.fused = heads, (dim // heads) ** -0.5, fused
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if self.fused:
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        else:
            out = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class LayerScaleBlock(nn.Module):
    """CaiT LayerScaleBlock: ``x + gamma_1 * attn(norm1(x))``, ``x + gamma_2 * mlp(norm2(x))``."""

    def __init__(self, dim: int, heads: int, ls_init: float = 1e-5, fused: bool = False) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads, fused)
        self.norm2, self.mlp = nn.LayerNorm(dim), Mlp(dim, dim * 2, drop=0.0)
        self.gamma_1 = nn.Parameter(ls_init * torch.ones(dim))
        self.gamma_2 = nn.Parameter(ls_init * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.gamma_1 * self.attn(self.norm1(x))
        return x + self.gamma_2 * self.mlp(self.norm2(x))


class CaiT(nn.Module):
    """CaiT's patch stage: layer-scaled self-attention blocks, then mean pooling (class attention left out)."""

    def __init__(self, dim: int = 32, heads: int = 4, depth: int = 2, patch: int = 8, image: int = 32,
                 num_classes: int = 10, fused: bool = False) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        self.pos_embed = nn.Parameter(torch.zeros(1, (image // patch) ** 2, dim))
        self.blocks = nn.Sequential(*[LayerScaleBlock(dim, heads, fused=fused) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed
        return self.head(self.norm(self.blocks(x)).mean(1))
