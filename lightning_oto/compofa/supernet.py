"""Weight-shared MobileNetV3-style supernet with nested (prefix) weight sharing.

Every elastic layer stores the largest weights and, per forward, uses a *prefix*: the first
``d`` blocks of a stage, the first ``mid`` channels of a block's expanded width, the centre
``k x k`` crop of the depthwise kernel.  BatchNorm affine parameters *and* running statistics are
sliced the same way, so training a small network updates exactly the shared prefix.  Prefix
sharing is only sensible once the most important middle channels come first, hence
:meth:`CompOFASupernet.reorder_channels_by_importance` (OFA's ``re_organize_middle_weights``).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .space import SubnetConfig, SupernetConfig, full_config, make_divisible


def make_act(name: str) -> nn.Module:
    """Activation module by name (MobileNetV3 uses relu early, hard-swish late)."""
    name = name.lower()
    if name == "relu":
        return nn.ReLU()
    if name in ("hswish", "hardswish", "h_swish"):
        return nn.Hardswish()
    if name == "relu6":
        return nn.ReLU6()
    if name in ("silu", "swish"):
        return nn.SiLU()
    raise ValueError(f"unknown activation {name!r}")


def se_hidden(mid: int) -> int:
    """Squeeze-excite bottleneck width for ``mid`` channels (reduction 4, multiple of 8)."""
    return make_divisible(mid // 4, 8)


class ElasticPointwise(nn.Module):
    """1x1 conv storing (out_max, in_max); uses the first ``out`` rows and ``x``'s channels as columns."""

    def __init__(self, in_max: int, out_max: int, bias: bool = False) -> None:
        super().__init__()
        self.in_max, self.out_max = in_max, out_max
        self.weight = nn.Parameter(torch.empty(out_max, in_max, 1, 1))
        self.bias = nn.Parameter(torch.zeros(out_max)) if bias else None
        nn.init.kaiming_normal_(self.weight, mode="fan_out")

    def forward(self, x: torch.Tensor, out_channels: int | None = None) -> torch.Tensor:
        out = self.out_max if out_channels is None else out_channels
        w = self.weight[:out, : x.shape[1]]
        b = self.bias[:out] if self.bias is not None else None
        return F.conv2d(x, w, b)


class ElasticDepthwise(nn.Module):
    """Depthwise conv storing (C_max, 1, K, K); uses the first C channels and a centre k x k crop."""

    def __init__(self, channels_max: int, kernel_max: int, stride: int) -> None:
        super().__init__()
        self.kernel_max, self.stride = kernel_max, stride
        self.weight = nn.Parameter(torch.empty(channels_max, 1, kernel_max, kernel_max))
        nn.init.kaiming_normal_(self.weight, mode="fan_out")

    def sliced_weight(self, channels: int, kernel: int) -> torch.Tensor:
        if kernel > self.kernel_max or kernel % 2 == 0:
            raise ValueError(f"kernel {kernel} not available (max {self.kernel_max}, odd only)")
        o = (self.kernel_max - kernel) // 2
        return self.weight[:channels, :, o : o + kernel, o : o + kernel]

    def forward(self, x: torch.Tensor, kernel: int) -> torch.Tensor:
        c = x.shape[1]
        return F.conv2d(x, self.sliced_weight(c, kernel), None, self.stride, kernel // 2, 1, c)


class ElasticBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm whose parameters and running stats are used as a prefix of ``x.shape[1]`` entries.

    In *calibration* mode (see :func:`~lightning_oto.compofa.training.recalibrate_bn`) it normalizes
    with batch statistics and accumulates exact per-channel sums so the running stats of the active
    prefix can be replaced by the statistics of a fixed data subset.
    """

    def __init__(self, num_features: int, **kw) -> None:
        super().__init__(num_features, **kw)
        self._calib: dict[str, torch.Tensor] | None = None

    def start_calibration(self) -> None:
        self._calib = {}

    def finish_calibration(self) -> bool:
        """Write accumulated stats into the active prefix; returns whether this BN was used."""
        acc, self._calib = self._calib, None
        if not acc:
            return False
        n, s, sq = acc["n"], acc["sum"], acc["sumsq"]
        c = s.shape[0]
        mean = s / n
        var = (sq / n - mean * mean).clamp_min(0.0) * (n / max(n - 1.0, 1.0))
        with torch.no_grad():
            self.running_mean[:c].copy_(mean.to(self.running_mean.dtype))
            self.running_var[:c].copy_(var.to(self.running_var.dtype))
        return True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        w = self.weight[:c] if self.weight is not None else None
        b = self.bias[:c] if self.bias is not None else None
        if self._calib is not None:
            xd = x.detach().transpose(0, 1).reshape(c, -1).double()
            n = float(xd.shape[1])
            acc = self._calib
            if "sum" in acc and acc["sum"].shape[0] != c:
                raise RuntimeError("BN width changed during calibration (config switched mid-pass)")
            acc["n"] = acc.get("n", 0.0) + n
            acc["sum"] = acc.get("sum", 0.0) + xd.sum(1)
            acc["sumsq"] = acc.get("sumsq", 0.0) + (xd * xd).sum(1)
            return F.batch_norm(x, None, None, w, b, True, 0.0, self.eps)
        use_batch = self.training or not self.track_running_stats
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        else:
            momentum = 0.0
        rm = self.running_mean[:c] if self.running_mean is not None else None
        rv = self.running_var[:c] if self.running_var is not None else None
        return F.batch_norm(x, rm, rv, w, b, use_batch, momentum, self.eps)


class ElasticSE(nn.Module):
    """Squeeze-excite over the active middle width; the bottleneck width follows :func:`se_hidden`."""

    def __init__(self, channels_max: int) -> None:
        super().__init__()
        hidden = se_hidden(channels_max)
        self.reduce = ElasticPointwise(channels_max, hidden, bias=True)
        self.expand = ElasticPointwise(hidden, channels_max, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        y = x.mean((2, 3), keepdim=True)
        y = F.relu(self.reduce(y, se_hidden(c)))
        y = F.hardsigmoid(self.expand(y, c))
        return x * y


class ElasticInvertedResidual(nn.Module):
    """MobileNetV3 block: 1x1 expand-bn-act, depthwise-bn-act, [SE], 1x1 project-bn, [+x]."""

    def __init__(
        self, in_ch: int, out_ch: int, stride: int, max_expand: int, max_kernel: int, use_se: bool, act: str
    ) -> None:
        super().__init__()
        self.in_ch, self.out_ch, self.stride = in_ch, out_ch, stride
        self.max_expand, self.max_kernel, self.use_se, self.act_name = max_expand, max_kernel, use_se, act
        mid = in_ch * max_expand
        self.expand_conv = ElasticPointwise(in_ch, mid)
        self.expand_bn = ElasticBatchNorm2d(mid)
        self.dw_conv = ElasticDepthwise(mid, max_kernel, stride)
        self.dw_bn = ElasticBatchNorm2d(mid)
        self.se = ElasticSE(mid) if use_se else None
        self.project_conv = ElasticPointwise(mid, out_ch)
        self.project_bn = ElasticBatchNorm2d(out_ch)
        self.act = make_act(act)
        self.residual = stride == 1 and in_ch == out_ch

    def mid_channels(self, expand: int) -> int:
        return self.in_ch * int(expand)

    def forward(self, x: torch.Tensor, expand: int, kernel: int) -> torch.Tensor:
        mid = self.mid_channels(expand)
        y = self.act(self.expand_bn(self.expand_conv(x, mid)))
        y = self.act(self.dw_bn(self.dw_conv(y, kernel)))
        if self.se is not None:
            y = self.se(y)
        y = self.project_bn(self.project_conv(y, self.out_ch))
        return x + y if self.residual else y

    @torch.no_grad()
    def reorder_middle(self) -> torch.Tensor:
        """Sort middle channels by L1 norm of the project conv's input columns (descending).

        Expand rows, expand-BN entries, depthwise channels, dw-BN entries, SE columns/rows and
        project columns are permuted together, so the block computes the same function.  The SE
        bottleneck is sorted too (by the L1 norm of its expand conv's input columns).
        """
        imp = self.project_conv.weight.abs().sum(dim=(0, 2, 3))
        perm = torch.argsort(imp, descending=True, stable=True)
        self.expand_conv.weight.copy_(self.expand_conv.weight[perm])
        for bn in (self.expand_bn, self.dw_bn):
            _permute_bn(bn, perm)
        self.dw_conv.weight.copy_(self.dw_conv.weight[perm])
        self.project_conv.weight.copy_(self.project_conv.weight[:, perm])
        if self.se is not None:
            r, e = self.se.reduce, self.se.expand
            r.weight.copy_(r.weight[:, perm])
            e.weight.copy_(e.weight[perm])
            e.bias.copy_(e.bias[perm])
            hperm = torch.argsort(e.weight.abs().sum(dim=(0, 2, 3)), descending=True, stable=True)
            r.weight.copy_(r.weight[hperm])
            r.bias.copy_(r.bias[hperm])
            e.weight.copy_(e.weight[:, hperm])
        return perm


def _permute_bn(bn: nn.BatchNorm2d, perm: torch.Tensor) -> None:
    for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var):
        if t is not None:
            t.data.copy_(t.data[perm])


class CompOFASupernet(nn.Module):
    """Stem -> elastic stages of inverted residual blocks -> 1x1 head -> pool -> classifier.

    The active sub-network is set with :meth:`set_active` (or the :meth:`active` context manager);
    ``forward`` only runs the active prefix.  Resolution is not enforced: the network is fully
    convolutional, the config's resolution is what the data loader / latency probe feed it.
    """

    def __init__(self, cfg: SupernetConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or SupernetConfig()
        self.stem = nn.Sequential(
            nn.Conv2d(cfg.in_channels, cfg.stem_channels, 3, cfg.stem_stride, 1, bias=False),
            ElasticBatchNorm2d(cfg.stem_channels),
            nn.Hardswish(),
        )
        stages = []
        in_ch = cfg.stem_channels
        for s in range(cfg.num_stages):
            blocks = []
            for b in range(cfg.max_depth):
                blocks.append(
                    ElasticInvertedResidual(
                        in_ch,
                        cfg.stage_channels[s],
                        cfg.stage_strides[s] if b == 0 else 1,
                        cfg.max_expand,
                        cfg.max_kernel(s),
                        cfg.stage_se[s],
                        cfg.stage_act[s],
                    )
                )
                in_ch = cfg.stage_channels[s]
            stages.append(nn.ModuleList(blocks))
        self.stages = nn.ModuleList(stages)
        self.head = nn.Sequential(
            nn.Conv2d(in_ch, cfg.head_channels, 1, bias=False),
            ElasticBatchNorm2d(cfg.head_channels),
            nn.Hardswish(),
        )
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.classifier = nn.Linear(cfg.head_channels, cfg.num_classes)
        self._active: SubnetConfig = full_config(cfg)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
        # MobileNet trick: start every residual block as identity-ish (zero last BN gamma) is not
        # used: it would make the importance reordering degenerate before training.

    # ---- active sub-network -----------------------------------------------------------
    @property
    def active_config(self) -> SubnetConfig:
        return self._active

    def check_config(self, cfg: SubnetConfig) -> None:
        """Raise a clear error if ``cfg`` does not fit this supernet."""
        c = self.cfg
        if len(cfg.depths) != c.num_stages:
            raise ValueError(f"config has {len(cfg.depths)} stages, supernet has {c.num_stages}")
        for s, (d, e, k) in enumerate(zip(cfg.depths, cfg.expands, cfg.kernels)):
            if not 1 <= d <= c.max_depth:
                raise ValueError(f"stage {s}: depth {d} outside [1, {c.max_depth}]")
            if any(not 1 <= w <= c.max_expand for w in e):
                raise ValueError(f"stage {s}: expand ratios {e} exceed {c.max_expand}")
            if any(x > c.max_kernel(s) or x % 2 == 0 for x in k):
                raise ValueError(f"stage {s}: kernels {k} not available (max {c.max_kernel(s)})")

    def set_active(self, cfg: SubnetConfig) -> None:
        """Select the sub-network used by ``forward``."""
        self.check_config(cfg)
        self._active = cfg

    def set_max(self) -> None:
        self._active = full_config(self.cfg, self._active.resolution)

    @contextmanager
    def active(self, cfg: SubnetConfig) -> Iterator["CompOFASupernet"]:
        """Temporarily select ``cfg``; restores the previous selection on exit."""
        prev = self._active
        self.set_active(cfg)
        try:
            yield self
        finally:
            self._active = prev

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self._active
        x = self.stem(x)
        for s, blocks in enumerate(self.stages):
            for b in range(cfg.depths[s]):
                x = blocks[b](x, cfg.expands[s][b], cfg.kernels[s][b])
        x = self.head(x)
        x = x.mean((2, 3))
        return self.classifier(self.dropout(x))

    @torch.no_grad()
    def reorder_channels_by_importance(self) -> None:
        """One-time importance sort of every block's middle channels (function-preserving)."""
        for blocks in self.stages:
            for blk in blocks:
                blk.reorder_middle()

    def elastic_bns(self) -> list[ElasticBatchNorm2d]:
        return [m for m in self.modules() if isinstance(m, ElasticBatchNorm2d)]
