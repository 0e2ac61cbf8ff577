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


# ---------------------------------------------------------------- operator-rule coverage (issue 12)
class Conv1D(nn.Module):
    """GPT-2's Conv1D: a linear layer whose weight is (in, out), computed with addmm; nf is read in forward."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf, self.nx = nf, nx
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.2)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        size_out = x.size()[:-1] + (self.nf,)
        x = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return x.view(size_out)


class Conv1DMLP(nn.Module):
    """GPT-2 MLP block on a BatchNorm'd width: c_fc (addmm) -> gelu -> c_proj, residual; and a plain matmul."""

    def __init__(self, d=8, hidden=24):
        super().__init__()
        self.emb = nn.Linear(6, d)
        self.c_fc = Conv1D(hidden, d)
        self.c_proj = Conv1D(d, hidden)
        self.w = nn.Parameter(torch.randn(d, 12) * 0.3)
        self.head = nn.Linear(12, 4)

    def forward(self, x):
        h = self.emb(x)
        h = h + self.c_proj(F.gelu(self.c_fc(h)))
        return self.head(torch.relu(h @ self.w).mean(1))


def rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


class HeadAttention(nn.Module):
    """BERT / Llama style self-attention: q/k/v projections split with view(B, N, -1, D); grouped key/value heads
    (repeat_kv through expand + reshape), rotary embedding on q and k, eager or sdpa attention."""

    def __init__(self, d=16, heads=4, kv_heads=2, head_dim=4, sdpa=False, rope=False):
        super().__init__()
        self.num_heads, self.num_key_value_heads, self.head_dim = heads, kv_heads, head_dim
        self.num_key_value_groups = heads // kv_heads
        self.sdpa, self.rope = sdpa, rope
        self.q_proj = nn.Linear(d, heads * head_dim)
        self.k_proj = nn.Linear(d, kv_heads * head_dim)
        self.v_proj = nn.Linear(d, kv_heads * head_dim)
        self.o_proj = nn.Linear(heads * head_dim, d)

    def forward(self, x, cos, sin):
        b, n, _ = x.shape
        shape = (b, n, -1, self.head_dim)
        q = self.q_proj(x).view(shape).transpose(1, 2)
        k = self.k_proj(x).view(shape).transpose(1, 2)
        v = self.v_proj(x).view(shape).transpose(1, 2)
        if self.rope:
            q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        if self.sdpa:
            out = F.scaled_dot_product_attention(q, k, v, enable_gqa=self.num_key_value_groups > 1)
        else:
            kh, s = k.shape[1], k.shape[2]
            k = k[:, :, None].expand(b, kh, self.num_key_value_groups, s, self.head_dim).reshape(b, -1, s, self.head_dim)
            v = v[:, :, None].expand(b, kh, self.num_key_value_groups, s, self.head_dim).reshape(b, -1, s, self.head_dim)
            w = torch.softmax(torch.matmul(q, k.transpose(2, 3)) * self.head_dim ** -0.5, dim=-1)
            out = torch.matmul(w, v)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, -1))


class HeadTransformer(nn.Module):
    """Two attention layers (one eager GQA with rotary, one sdpa) with BatchNorm'd width and an MLP."""

    def __init__(self, d=16):
        super().__init__()
        self.emb = nn.Linear(6, d)
        self.a1 = HeadAttention(d, heads=4, kv_heads=2, rope=True)
        self.a2 = HeadAttention(d, heads=4, kv_heads=4, sdpa=True)
        self.fc1, self.fc2 = nn.Linear(d, 24), nn.Linear(24, d)
        self.head = nn.Linear(d, 3)
        pos = torch.arange(8.0)[:, None] * torch.tensor([1.0, 0.5, 1.0, 0.5])
        self.register_buffer("cos", pos.cos(), persistent=False)
        self.register_buffer("sin", pos.sin(), persistent=False)

    def forward(self, x):
        h = self.emb(x)
        h = h + self.a1(h, self.cos, self.sin)
        h = h + self.a2(h, self.cos, self.sin)
        h = h + self.fc2(F.relu(self.fc1(h)))
        return self.head(h.mean(1))


class TimmAttention(nn.Module):
    """timm's Attention: one fused qkv linear reshaped to (B, N, 3, num_heads, head_dim), unbind, sdpa."""

    def __init__(self, dim=16, num_heads=4):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, -1))


class TimmBlock(nn.Module):
    def __init__(self, dim=16):
        super().__init__()
        self.emb = nn.Linear(6, dim)
        self.attn = TimmAttention(dim)
        self.mha = nn.MultiheadAttention(dim, 2)  # sequence-first, with a causal mask
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        h = self.emb(x)
        h = h + self.attn(h)
        s = h.transpose(0, 1)
        mask = torch.ones(s.shape[0], s.shape[0], dtype=torch.bool).triu(1)
        h = h + self.mha(s, s, s, attn_mask=mask, need_weights=False)[0].transpose(0, 1)
        return self.head(h.mean(1))


class SplitNet(nn.Module):
    """Torch-Pruning's test_split: split sizes read from the consumers' in_channels; a shared consumer."""

    def __init__(self, dim=8):
        super().__init__()
        self.block1 = nn.Sequential(nn.Conv2d(3, dim, 1), nn.BatchNorm2d(dim), nn.GELU(),
                                    nn.Conv2d(dim, dim * 4, 1), nn.BatchNorm2d(dim * 4))
        self.block2_1 = nn.Sequential(nn.Conv2d(dim, dim, 1), nn.BatchNorm2d(dim))
        self.block2_2 = nn.Sequential(nn.Conv2d(2 * dim, dim, 1), nn.BatchNorm2d(dim))
        self.fc = nn.Linear(dim, 4)

    def forward(self, x):
        x = self.block1(x)
        c1, c2 = self.block2_1[0].in_channels, self.block2_2[0].in_channels
        x1, x2, x3 = torch.split(x, [c1, c1, c2], dim=1)
        y = self.block2_1(x1) + self.block2_1(x2) + self.block2_2(x3)
        return self.fc(y.mean((2, 3)))


class Res2Block(nn.Module):
    """Res2Net: split into scale blocks of self.width channels, hierarchical 3x3 convs, concat."""

    def __init__(self, c=12, scale=3):
        super().__init__()
        self.width, self.scale = c // scale, scale
        self.convs = nn.ModuleList([cbr(self.width, self.width) for _ in range(scale - 1)])

    def forward(self, x):
        spx = torch.split(x, self.width, 1)
        out, sp = [], None
        for i, conv in enumerate(self.convs):
            sp = spx[i] if sp is None else sp + spx[i]
            sp = conv(sp)
            out.append(sp)
        out.append(spx[-1])
        return torch.cat(out, 1)


class SplitsZoo(nn.Module):
    """Res2Net split, CSP halves by slicing, gMLP-style chunk gate, channel shuffle by reshape."""

    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 12)
        self.res2 = Res2Block(12)
        self.csp = cbr(6, 6)
        self.gate = nn.Conv2d(12, 16, 1)
        self.mix = cbr(8, 8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = self.res2(self.stem(x))
        c = x.shape[1] // 2
        x = torch.cat([self.csp(x[:, :c]), x[:, c:]], 1)          # CSP: half through a block
        u, v = self.gate(x).chunk(2, dim=1)                          # gMLP / GLU-style gate
        x = u * torch.sigmoid(v)
        b, ch, h, w = x.shape
        x = x.reshape(b, 2, ch // 2, h, w).transpose(1, 2).reshape(b, ch, h, w)  # channel shuffle
        return self.fc(self.mix(x).mean((2, 3)))


class WindowsAndScales(nn.Module):
    """Swin's roll over spatial dims, LeViT's reshape_as / expand_as, ConvNeXt / PoolFormer layer scale
    (gamma.reshape(-1, 1, 1) * x) and a padding layer."""

    def __init__(self, c=8):
        super().__init__()
        self.stem = cbr(3, c)
        self.conv = cbr(c, c)
        self.gamma = nn.Parameter(torch.rand(c) + 0.5)
        self.beta = nn.Parameter(torch.rand(c) + 0.5)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)
        self.fc = nn.Linear(c, 4)

    def forward(self, x):
        x = self.stem(x)
        y = torch.roll(self.conv(x), shifts=(1, -1), dims=(2, 3))
        x = x + self.gamma.reshape(-1, 1, 1) * y                       # layer scale
        z = self.conv2(F.pad(x, (1, 1, 1, 1), mode="reflect"))[:, :, 1:-1, 1:-1]
        x = x + z.reshape_as(x) * self.beta.view(1, -1, 1, 1).expand_as(x)
        return self.fc(x.mean((2, 3)))


def _tokens(n=8, d=6, b=2):
    return lambda: torch.randn(b, n, d)


ZOO.update({
    "gpt2_conv1d": (Conv1DMLP, _tokens()),
    "head_attention": (HeadTransformer, _tokens()),
    "timm_attention_mha": (TimmBlock, _tokens()),
    "split_sizes_from_consumers": (SplitNet, _img(c=3, s=6)),
    "splits_slices_chunks": (SplitsZoo, _img(s=8)),
    "roll_reshape_as_layer_scale": (WindowsAndScales, _img(s=8)),
})
