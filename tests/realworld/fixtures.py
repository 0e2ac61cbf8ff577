"""One small hand-written model per failure class the real-world survey found (issues 11 and 12).

Each is the smallest model that shows its class, so an engine fix can be checked in milliseconds
before the zoo runs; the zoo entries named ``fixture_*`` run them through the same checks.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CatOfInplaceBranches(nn.Module):
    """Two conv -> BN -> ReLU(inplace=True) branches into cat, then a conv (erased branch: BN of length 0)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(inplace=True))
        self.b = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(inplace=True))
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([self.a(x), self.b(x)], 1))


class ResidualMLP(nn.Module):
    """h + fc2(relu(fc1(h))), the residual written three ways: plain, with nn.Dropout, or in place."""

    def __init__(self, style: str = "plain", dim: int = 8, hidden: int = 32) -> None:
        super().__init__()
        self.style = style
        self.inp, self.fc1, self.fc2 = nn.Linear(4, dim), nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.drop = nn.Dropout(0.1)
        self.out = nn.Linear(dim, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        y = self.fc2(F.relu(self.fc1(h)))
        if self.style == "dropout":
            y = self.drop(y)
        if self.style == "inplace":
            y += h
        else:
            y = y + h
        return self.out(y)


class SdpaBlock(nn.Module):
    """x + proj(sdpa(q(x), k(x), v(x))): erasing proj must take Q, K, V and the attention with it.
    ``fused=False`` writes the same attention out as softmax(q k^T / sqrt(d)) v."""

    def __init__(self, dim: int = 8, heads: int = 2, fused: bool = True) -> None:
        super().__init__()
        self.heads, self.fused = heads, fused
        self.q, self.k, self.v, self.proj = (nn.Linear(dim, dim) for _ in range(4))
        self.out = nn.Linear(dim, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, n, self.heads, c // self.heads).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        if self.fused:
            a = F.scaled_dot_product_attention(q, k, v)
        else:
            a = torch.softmax(q @ k.transpose(-2, -1) / (c // self.heads) ** 0.5, dim=-1) @ v
        return self.out(x + self.proj(a.transpose(1, 2).reshape(b, n, c)))


class TokenMLP(nn.Module):
    """Token ids -> embedding -> residual MLP: the sub-network must accept another sequence length."""

    def __init__(self, vocab: int = 20, dim: int = 8) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.fc1, self.fc2 = nn.Linear(dim, 16), nn.Linear(16, dim)
        self.out = nn.Linear(dim, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        return self.out(h + self.fc2(F.gelu(self.fc1(h))))


class PreActDenseBlock(nn.Module):
    """Four pre-activation dense layers (BN -> ReLU -> conv on the cat of all earlier outputs)."""

    def __init__(self, cin: int = 4, growth: int = 4, layers: int = 4) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.Sequential(nn.BatchNorm2d(cin + i * growth), nn.ReLU(), nn.Conv2d(cin + i * growth, growth, 3, 1, 1))
            for i in range(layers))
        self.stem = nn.Conv2d(3, cin, 3, 1, 1)
        self.head = nn.Conv2d(cin + layers * growth, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [self.stem(x)]
        for layer in self.layers:
            feats.append(layer(torch.cat(feats, 1)))
        return self.head(torch.cat(feats, 1))


class LayerScaleConv(nn.Module):
    """x + gamma.reshape(-1, 1, 1) * conv(relu(conv(x))): zero gamma zeroes the branch."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, 1, 1)
        self.c1, self.c2 = nn.Conv2d(c, c, 3, 1, 1), nn.Conv2d(c, c, 1)
        self.gamma = nn.Parameter(torch.full((c,), 0.5))
        self.head = nn.Conv2d(c, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + self.gamma.reshape(-1, 1, 1) * self.c2(F.relu(self.c1(x)))
        return self.head(x)


class PadZero(nn.Module):
    """conv -> F.pad(value=0.0) -> conv: torch records aten.pad(x, p, 'constant', 0.0) (issue 12)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c2(F.pad(F.relu(self.c1(x)), (1, 1, 1, 1), value=0.0))


class Conv1D(nn.Module):
    """GPT-2's Conv1D: ``torch.addmm(bias, x.view(-1, nx), weight)`` with weight stored (in, out)."""

    def __init__(self, nx: int, nf: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.2)
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return out.view(x.size()[:-1] + (self.weight.size(-1),))


class AddmmMLP(nn.Module):
    """h + c_proj(gelu(c_fc(h))) with GPT-2 Conv1D layers."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.inp, self.c_fc, self.c_proj, self.out = nn.Linear(4, dim), Conv1D(dim, 16), Conv1D(16, dim), nn.Linear(dim, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        return self.out(h + self.c_proj(F.gelu(self.c_fc(h))))


class ShapeArithmeticBranch(nn.Module):
    """A batch-size product before a layer-scaled residual branch (Dinov2 / Data2Vec-vision in miniature).

    With a dynamic batch, export records ``sym_size * 2`` as an extra fx node named ``mul``, so node
    names differ from the static trace; erase construction matching nodes by name then drops the
    live residual instead of the erased branch.
    """

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.fc, self.out = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 4)
        self.lam = nn.Parameter(torch.rand(8) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x).reshape(x.shape[0] * 2, 4).reshape(x.shape[0], 8)
        return self.out(self.fc(h) * self.lam + h)


class ChannelChunkGate(nn.Module):
    """gMLP-style spatial gating: ``u, v = x.chunk(2, dim=1)``; ``u * proj(v)`` (issue 12: chunk of channels)."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 2 * c, 3, 1, 1)
        self.proj = nn.Conv2d(c, c, 1)
        self.head = nn.Conv2d(c, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u, v = F.gelu(self.stem(x)).chunk(2, dim=1)
        return self.head(u * self.proj(v))


class InplaceResidualRelu(nn.Module):
    """stem -> ReLU(inplace) -> torchvision BasicBlock (``out += identity``; ``relu(out)`` in place) -> head.

    Erasing the block's branch turns ``relu_(out += identity)`` into ``relu_(identity)``: an in-place
    op on a tensor autograd saved for the stem's ReLU, so backward through the sub-network fails.
    """

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        from .handwritten import BasicBlock

        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True))
        self.block = BasicBlock(c, c)
        self.head = nn.Conv2d(c, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.stem(x)))
