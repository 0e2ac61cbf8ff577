"""Minimized fixtures of engine bugs found by the random-architecture property tests.

Each class is the smallest model that reproduced one failure; the docstring names the generator
seed it came from (``python tests/random_models.py SEED`` prints the original) and what went wrong.
``REGRESSIONS`` maps a name to (factory, example-inputs factory, modes to check).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DepthwiseOnInput(nn.Module):
    """Seeds 13, 26, 58 (prune): a depthwise conv (channel multiplier 2) reads the model input.

    The input's channels are not ours to remove, so the per-conv-group coupling was skipped and each
    output channel became its own group: zeroing one left 11 rows in a groups=6 conv (crash).
    """

    def __init__(self):
        super().__init__()
        self.dw = nn.Conv2d(3, 6, 3, padding=1, groups=3, bias=False)
        self.pw = nn.Conv2d(6, 4, 1)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(F.relu(self.pw(F.relu(self.dw(x)))))


class GroupConvOnFlatFeatures(nn.Module):
    """Seed 26 family (prune): a group conv whose input arrives with its channels in another dim."""

    def __init__(self):
        super().__init__()
        self.g = nn.Conv1d(4, 8, 3, padding=1, groups=2)
        self.mid = nn.Conv1d(8, 6, 1)
        self.head = nn.Conv1d(6, 2, 1)

    def forward(self, x):  # x: (B, L, C) -> channels moved by a transpose
        return self.head(F.silu(self.mid(torch.tanh(self.g(x.transpose(1, 2))))))


class SharedConvOnInputAndFeatures(nn.Module):
    """Seeds 44, 60 (prune): one conv module called on the model input and on a conv's output.

    The second call made the hidden conv's channels prunable together with the shared conv's input
    columns; the first call still feeds it all input channels (crash: expected 4 channels, got 3).
    """

    def __init__(self):
        super().__init__()
        self.shared = nn.Conv2d(4, 4, 1)
        self.hidden = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        a = self.shared(x)
        b = self.shared(F.relu(self.hidden(x)))
        return self.head(a + b)


class SharedLinearOnInputAndFeatures(nn.Module):
    """Same bug through nn.Linear: shared by the model input and a hidden layer."""

    def __init__(self):
        super().__init__()
        self.shared = nn.Linear(6, 6)
        self.hidden = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.shared(x) * torch.sigmoid(self.shared(F.gelu(self.hidden(x)))))


class GroupedConvTranspose(nn.Module):
    """Seed 116 (prune): a grouped ConvTranspose2d(4, 8, groups=2) has a (4, 4, k, k) weight.

    Its (unprunable) group listed columns 4..7 of weight dim 1: indices out of range.
    """

    def __init__(self):
        super().__init__()
        self.up = nn.ConvTranspose2d(4, 8, 3, groups=2)
        self.gate = nn.Conv2d(8, 8, 1, bias=False)
        self.down = nn.Conv2d(4, 3, 3, padding=1)

    def forward(self, x):
        u = self.up(x)
        return u * torch.sigmoid(self.gate(u)), self.down(x)


class DeadInputBranch(nn.Module):
    """Seed 14 (erase): the second input feeds only dead code (computed, never returned).

    The validity check asked every input to reach an output, so on this model *every* removal was
    rejected and erase mode found nothing to do.
    """

    def __init__(self):
        super().__init__()
        self.a = nn.Conv1d(3, 4, 3, padding=1)
        self.b = nn.Conv1d(4, 4, 3, padding=1)
        self.c = nn.Conv1d(4, 4, 1)
        self.dead = nn.Linear(5, 5)

    def forward(self, x, y):
        h = F.relu(self.a(x))
        _ = self.dead(y)  # dead code: nobody reads it
        return self.c(h + self.b(h))


class NormSegmentIntoConcat(nn.Module):
    """Seed 168 (erase): a GroupNorm segment and its own input concatenated.

    The GroupNorm segment passes the conv's channels through, so its concat affiliates took the
    conv's rows along: zeroing the norm also zeroed (and construction removed) the conv, leaving a
    weight of size [0, 4, 3] (the original seed had a depthwise conv there).
    """

    def __init__(self):
        super().__init__()
        self.dw = nn.Conv1d(4, 4, 3, padding=1, bias=False)
        self.gn = nn.GroupNorm(1, 4)
        self.post = nn.Conv1d(8, 3, 3, padding=1)

    def forward(self, x):
        a = self.dw(x)
        return self.post(F.avg_pool1d(torch.cat([a, self.gn(a)], 1), 3, 1, 1))


class GroupNormWithoutAffine(nn.Module):
    """Seeds 516, 1044, 1128 of the soak (prune): ``GroupNorm(3, 6, affine=False)`` after a conv.

    Construction re-derives ``num_groups`` from the sliced weight; without a weight it kept 3 groups
    for 4 channels (crash: "channels divisible by num_groups").
    """

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(3, 6, 3, padding=1)
        self.gn = nn.GroupNorm(3, 6, affine=False)
        self.c2 = nn.Conv1d(6, 2, 1)

    def forward(self, x):
        return self.c2(F.relu(self.gn(self.c1(x))))


class FunctionalGroupNorm(nn.Module):
    """Same family: ``F.group_norm`` with raw parameters and a group count written in forward."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.w = nn.Parameter(torch.rand(8) + 0.5)
        self.b = nn.Parameter(torch.rand(8) - 0.5)
        self.c2 = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.c2(F.silu(F.group_norm(self.c1(x), 4, self.w, self.b)))


class ConcatAffiliateOwnedBySegment(nn.Module):
    """Seeds 458, 587, 595 (erase): the norm after a concat is itself part of an erasable segment.

    ``br`` feeds the concat, so its group took ``bn``'s channels 4..6 along as affiliates, while
    ``bn -> mix`` feeds an add and was a group owning all of ``bn``: two erasable groups shared
    variables and H2SPG refused to start ("groups are not disjoint").
    """

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.br = nn.Conv2d(4, 3, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(7)
        self.mix = nn.Conv2d(7, 4, 1)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        s = self.stem(x)
        c = torch.cat([s, self.br(F.relu(s))], 1)
        return self.head(self.mix(self.bn(c)) + s)


class DeadJointIntoConcat(nn.Module):
    """Seeds 1007, 1645, 1762 of the 28-step soak (erase): both inputs of an add removed, the add
    concatenated with another tensor.

    The add died with its inputs and the concat dropped it, but nothing sliced what reads the
    concat (here a BatchNorm and a conv: "running_mean should contain 8 elements not 12"; with a
    BatchNorm in between the removal is not even exact, since BN(0) != 0 unless its channels are zeroed).
    """

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a = nn.Conv2d(8, 4, 3, padding=1)
        self.b = nn.Conv2d(8, 4, 1)
        self.bn = nn.BatchNorm2d(12)
        self.head = nn.Conv2d(12, 2, 1)

    def forward(self, x):
        s = F.relu(self.stem(x))
        return self.head(F.relu(self.bn(torch.cat([s, self.a(s) + self.b(s)], 1))))


class DivideByChannels(nn.Module):
    """Soak seeds 169, 190, 217, 231, 496 (prune, after division joined the generator): ``a / b``.

    The element-wise join put both convs' channels in one group; zeroing it computed 0 / 0 = NaN in
    the full model while the sub-network simply had no such channel.
    """

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 4, 1)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(torch.tanh(self.a(x) / self.b(x)))


class DivideByParameter(nn.Module):
    """Same family with a raw per-channel divisor ``x / p`` (p shaped (1, C, 1, 1)): p was one of the
    group's variables, so zeroing the group divided by zero."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 5, 3, padding=1)
        self.p = nn.Parameter(torch.rand(1, 5, 1, 1) + 0.5)
        self.c2 = nn.Conv2d(5, 2, 1)

    def forward(self, x):
        return self.c2(F.relu(self.c1(x)) / self.p)


class BroadcastAddJoint(nn.Module):
    """Soak seeds 235, 299 (erase): ``conv(x) + bias.view(-1, 1, 1)`` with a raw parameter.

    The add was a joint, so erasing the conv replaced the add by the (C, 1, 1) bias alone: the
    batch and spatial dims vanished ("mat1 and mat2 shapes cannot be multiplied").
    """

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bias = nn.Parameter(torch.rand(4) - 0.5)
        self.head = nn.Linear(4 * 6 * 6, 3)
        self.skip = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x):
        s = F.relu(self.stem(x))
        y = self.conv(s) + self.bias.view(-1, 1, 1)
        return self.head(torch.flatten(y, 1)) + self.skip(torch.flatten(s, 1))


class DivideByOwnParameter(nn.Module):
    """Soak seeds 19, 340 (erase): a segment ``convT -> relu -> / p -> ...`` with its own divisor p.

    Erasing zeroes every variable of the segment, p included: x / 0 gave NaN instead of zero.
    """

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv1d(2, 4, 3, padding=1)
        self.up = nn.ConvTranspose1d(4, 4, 1)
        self.p = nn.Parameter(torch.rand(1, 4, 1) + 0.5)
        self.head = nn.Conv1d(4, 2, 1)

    def forward(self, x):
        s = self.stem(x)
        return self.head(s + F.relu(self.up(s)) / self.p)


class InstanceNormRunningStatsSegment(nn.Module):
    """Soak seed 3374 (erase): ``GroupNorm -> InstanceNorm(affine=False, track_running_stats=True)``.

    In eval the instance norm uses its running statistics, so a zero input becomes -mean/std, not 0;
    the segment was still taken for zero-invariant and its removal changed the output by 0.05.
    """

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv1d(3, 4, 3, padding=1)
        self.gn = nn.GroupNorm(2, 4)
        self.inorm = nn.InstanceNorm1d(4, affine=False, track_running_stats=True)
        self.head = nn.Conv1d(4, 2, 1)

    def forward(self, x):
        s = F.silu(self.stem(x))
        return self.head(self.inorm(self.gn(s)) - s)


def _randomize(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)) and \
                    getattr(m, "weight", None) is not None:
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
            if getattr(m, "running_mean", None) is not None:
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model


REGRESSIONS = {
    "depthwise_on_input": (DepthwiseOnInput, lambda: torch.randn(2, 3, 8, 8), ("prune", "erase")),
    "groupconv_on_moved_channels": (GroupConvOnFlatFeatures, lambda: torch.randn(2, 9, 4), ("prune", "erase")),
    "shared_conv_on_input_and_features": (SharedConvOnInputAndFeatures, lambda: torch.randn(2, 4, 6, 6),
                                          ("prune", "erase")),
    "shared_linear_on_input_and_features": (SharedLinearOnInputAndFeatures, lambda: torch.randn(2, 6),
                                            ("prune", "erase")),
    "grouped_convtranspose": (GroupedConvTranspose, lambda: torch.randn(2, 4, 5, 5), ("prune", "erase")),
    "dead_input_branch": (DeadInputBranch, lambda: (torch.randn(2, 3, 8), torch.randn(2, 5)), ("prune", "erase")),
    "norm_segment_into_concat": (NormSegmentIntoConcat, lambda: torch.randn(2, 4, 9), ("prune", "erase")),
    "groupnorm_without_affine": (GroupNormWithoutAffine, lambda: torch.randn(2, 3, 10), ("prune", "erase")),
    "functional_groupnorm": (FunctionalGroupNorm, lambda: torch.randn(2, 3, 6, 6), ("prune", "erase")),
    "concat_affiliate_owned_by_segment": (ConcatAffiliateOwnedBySegment, lambda: torch.randn(2, 3, 6, 6),
                                          ("prune", "erase")),
    "dead_joint_into_concat": (DeadJointIntoConcat, lambda: torch.randn(2, 3, 6, 6), ("prune", "erase")),
    "divide_by_channels": (DivideByChannels, lambda: torch.randn(2, 3, 6, 6), ("prune", "erase")),
    "divide_by_parameter": (DivideByParameter, lambda: torch.randn(2, 3, 6, 6), ("prune", "erase")),
    "broadcast_add_joint": (BroadcastAddJoint, lambda: torch.randn(2, 3, 6, 6), ("prune", "erase")),
    "divide_by_own_parameter": (DivideByOwnParameter, lambda: torch.randn(2, 2, 7), ("prune", "erase")),
    "instancenorm_running_stats_segment": (InstanceNormRunningStatsSegment, lambda: torch.randn(2, 3, 9),
                                           ("prune", "erase")),
}


def make_regression(name: str, seed: int = 0):
    torch.manual_seed(seed)
    factory, inp, _ = REGRESSIONS[name]
    model = _randomize(factory())
    x = inp()
    return model, (x if isinstance(x, tuple) else (x,))
