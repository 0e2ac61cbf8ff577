"""Extract a static sub-network from the supernet (exported with ``lightning_oto.subnet.export``).

The extracted module has plain ``nn.Conv2d``/``nn.BatchNorm2d``/``nn.Linear`` layers of the sliced
sizes and no elastic logic, so it can be saved, ``torch.export``-ed and converted to ONNX like any
hand-written network.  Its eval outputs equal the supernet's with the same configuration active.
"""
from __future__ import annotations

import torch
from torch import nn

from .space import SubnetConfig
from .supernet import CompOFASupernet, ElasticInvertedResidual, make_act, se_hidden


class StaticSE(nn.Module):
    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, hidden, 1)
        self.expand = nn.Conv2d(hidden, channels, 1)
        self.relu = nn.ReLU()
        self.gate = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.mean((2, 3), keepdim=True)
        return x * self.gate(self.expand(self.relu(self.reduce(y))))


class StaticInvertedResidual(nn.Module):
    """Fixed-size MobileNetV3 block (what a deployment runtime sees)."""

    def __init__(
        self, in_ch: int, mid: int, out_ch: int, kernel: int, stride: int, use_se: bool, act: str, residual: bool
    ) -> None:
        super().__init__()
        self.expand = nn.Sequential(nn.Conv2d(in_ch, mid, 1, bias=False), nn.BatchNorm2d(mid), make_act(act))
        self.depthwise = nn.Sequential(
            nn.Conv2d(mid, mid, kernel, stride, kernel // 2, groups=mid, bias=False), nn.BatchNorm2d(mid), make_act(act)
        )
        self.se = StaticSE(mid, se_hidden(mid)) if use_se else nn.Identity()
        self.project = nn.Sequential(nn.Conv2d(mid, out_ch, 1, bias=False), nn.BatchNorm2d(out_ch))
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.se(self.depthwise(self.expand(x))))
        return x + y if self.residual else y


class StaticSubnet(nn.Module):
    """Stem -> blocks -> head -> pool -> classifier, all of fixed size."""

    def __init__(self, stem: nn.Module, blocks: list[nn.Module], head: nn.Module, dropout: float, classifier: nn.Linear):
        super().__init__()
        self.stem = stem
        self.blocks = nn.Sequential(*blocks)
        self.head = head
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.blocks(self.stem(x)))
        return self.classifier(self.dropout(x.mean((2, 3))))


def _copy_bn(dst: nn.BatchNorm2d, src: nn.BatchNorm2d, n: int) -> None:
    dst.weight.copy_(src.weight[:n])
    dst.bias.copy_(src.bias[:n])
    dst.running_mean.copy_(src.running_mean[:n])
    dst.running_var.copy_(src.running_var[:n])
    dst.num_batches_tracked.copy_(src.num_batches_tracked)
    dst.eps = src.eps
    dst.momentum = src.momentum


def _plain_bn(src: nn.BatchNorm2d) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(src.num_features, eps=src.eps, momentum=src.momentum)
    _copy_bn(bn, src, src.num_features)
    return bn


def _extract_block(blk: ElasticInvertedResidual, expand: int, kernel: int) -> StaticInvertedResidual:
    mid = blk.mid_channels(expand)
    out = StaticInvertedResidual(
        blk.in_ch, mid, blk.out_ch, kernel, blk.stride, blk.use_se, blk.act_name, blk.residual
    )
    out.expand[0].weight.copy_(blk.expand_conv.weight[:mid, : blk.in_ch])
    _copy_bn(out.expand[1], blk.expand_bn, mid)
    out.depthwise[0].weight.copy_(blk.dw_conv.sliced_weight(mid, kernel))
    _copy_bn(out.depthwise[1], blk.dw_bn, mid)
    if blk.se is not None:
        h = se_hidden(mid)
        out.se.reduce.weight.copy_(blk.se.reduce.weight[:h, :mid])
        out.se.reduce.bias.copy_(blk.se.reduce.bias[:h])
        out.se.expand.weight.copy_(blk.se.expand.weight[:mid, :h])
        out.se.expand.bias.copy_(blk.se.expand.bias[:mid])
    out.project[0].weight.copy_(blk.project_conv.weight[:, :mid])
    _copy_bn(out.project[1], blk.project_bn, blk.out_ch)
    return out


@torch.no_grad()
def extract_subnet(supernet: CompOFASupernet, config: SubnetConfig) -> nn.Module:
    """Copy the prefix weights of ``config`` into a new static module (supernet untouched).

    Weights are cloned, so later supernet training does not change the extracted network.  Call
    :func:`~lightning_oto.compofa.training.recalibrate_bn` for ``config`` first so the copied BN
    statistics are the ones of this sub-network.
    """
    supernet.check_config(config)
    stem_conv, stem_bn, stem_act = supernet.stem
    stem = nn.Sequential(
        nn.Conv2d(stem_conv.in_channels, stem_conv.out_channels, 3, stem_conv.stride, 1, bias=False),
        _plain_bn(stem_bn),
        nn.Hardswish(),
    )
    stem[0].weight.copy_(stem_conv.weight)
    blocks: list[nn.Module] = []
    for s, stage in enumerate(supernet.stages):
        for b in range(config.depths[s]):
            blocks.append(_extract_block(stage[b], config.expands[s][b], config.kernels[s][b]))
    head_conv, head_bn, _ = supernet.head
    head = nn.Sequential(
        nn.Conv2d(head_conv.in_channels, head_conv.out_channels, 1, bias=False), _plain_bn(head_bn), nn.Hardswish()
    )
    head[0].weight.copy_(head_conv.weight)
    cls = nn.Linear(supernet.classifier.in_features, supernet.classifier.out_features)
    cls.weight.copy_(supernet.classifier.weight)
    cls.bias.copy_(supernet.classifier.bias)
    sub = StaticSubnet(stem, blocks, head, supernet.cfg.dropout, cls)
    sub.train(supernet.training)
    sub.config = config  # type: ignore[attr-defined]  # informational
    return sub


@torch.no_grad()
def max_abs_diff_vs_supernet(
    supernet: CompOFASupernet, sub: nn.Module, config: SubnetConfig, x: torch.Tensor
) -> float:
    """Eval-mode max |supernet(x) - sub(x)| with ``config`` active (the extraction contract)."""
    was_s, was_sub = supernet.training, sub.training
    supernet.eval()
    sub.eval()
    try:
        with supernet.active(config):
            a = supernet(x)
        b = sub(x)
    finally:
        supernet.train(was_s)
        sub.train(was_sub)
    return float((a - b).abs().max())
