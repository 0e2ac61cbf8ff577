"""Erase-mode construction removes by liveness: one small fixture per failure class seen on real models.

Each fixture asserts exactness on the example input and on another input shape, and that what was
zeroed is really gone: the sub-network's parameter count is the full count minus exactly what the
zero groups (and their dependents) own, and no operator of a removed segment is left.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_oto import OTO
from lightning_oto.errors import DynamicShapeError, InvalidSubnetError
from lightning_oto.space.groups import zero_group


def removed_param_count(oto: OTO, zero_ids) -> int:
    """Parameters owned by the zero groups: whole tensors, plus the planned slices of the others."""
    params = dict(oto.model.named_parameters())
    whole = {s.name for i in zero_ids for s in list(oto.groups[i].slices) + list(oto.groups[i].dependents)
             if s.indices is None}
    cuts: dict[str, dict[int, set[int]]] = {}
    for i in zero_ids:
        g = oto.groups[i]
        for s in list(g.slices) + list(g.dependents):
            if s.indices is not None and s.name in params and s.name not in whole:
                cuts.setdefault(s.name, {}).setdefault(s.dim, set()).update(s.indices)
    n = sum(params[name].numel() for name in whole)
    for name, dims in cuts.items():
        shape = list(params[name].shape)
        kept = [size - len(dims.get(d, ())) for d, size in enumerate(shape)]
        n += params[name].numel() - math.prod(kept)
    return n


def count(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def erase_and_check(model: nn.Module, x, others=(), zero: list[str] | None = None, fraction: float = 1.0):
    """Build the erase space, zero groups (those whose names contain a string of ``zero``, or a random
    valid fraction), construct, and assert exactness on every input plus exact parameter accounting."""
    before = {k: v.clone() for k, v in model.state_dict().items()}
    oto = OTO(model, x, mode="erase")
    assert {k: v for k, v in model.state_dict().items()}.keys() == before.keys()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "OTO() changed the model"
    if zero is None:
        ids = oto.random_set_zero_groups(fraction, seed=0)
    else:
        ids = [g.id for g in oto.prunable_groups if any(z in g.name for z in zero)]
        params = dict(model.named_parameters())
        for i in ids:
            zero_group(oto.groups[i], params)
    assert ids, f"nothing to erase among {[g.name for g in oto.groups]} ({oto.unsupported_ops})"
    state = {k: v.clone() for k, v in model.state_dict().items()}
    sub = oto.construct_subnet(verify_inputs=others)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items()), "construction changed the model"
    assert count(sub) == count(model) - removed_param_count(oto, ids) < count(model)
    model.eval()
    sub.eval()
    with torch.no_grad():
        for inp in (x, *others):
            inp = inp if isinstance(inp, tuple) else (inp,)
            assert (model(*inp) - sub(*inp)).abs().max() <= 1e-4
    return oto, sub, ids


def _perturb(m: nn.Module) -> nn.Module:
    torch.manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
        for mod in m.modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
    return m.eval()


class TwoBranchCat(nn.Module):
    """Inception-style: conv -> BN -> ReLU(inplace) branches into cat, then a conv (crashed with empty BN stats)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.b1 = nn.Sequential(nn.Conv2d(8, 6, 1, bias=False), nn.BatchNorm2d(6), nn.ReLU(inplace=True))
        self.b2 = nn.Sequential(nn.Conv2d(8, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(inplace=True))
        self.head = nn.Conv2d(10, 5, 1)

    def forward(self, x):
        s = F.relu(self.stem(x))
        return self.head(torch.cat([self.b1(s), self.b2(s)], 1))


class ResidualMLP(nn.Module):
    """A residual MLP block written three ways: dropout on the branch, ``y += x``, and a plain add."""

    def __init__(self, style: str, d: int = 12):
        super().__init__()
        self.style = style
        self.inp = nn.Linear(4, d)
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.drop = nn.Dropout(0.1)
        self.out = nn.Linear(d, 3)

    def forward(self, x):
        x = self.inp(x)
        y = self.fc2(F.gelu(self.fc1(x)))
        if self.style == "dropout":
            x = x + self.drop(y)
        elif self.style == "iadd":
            y += x
            x = y
        else:
            x = x + y
        return self.out(x)


class Attention(nn.Module):
    """Q/K/V through scaled_dot_product_attention in a residual branch (kept whole by fx's DCE before)."""

    def __init__(self, d: int = 16, heads: int = 2):
        super().__init__()
        self.h = heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Dropout(0.1), nn.Linear(2 * d, d))

    def forward(self, x):
        b, n, d = x.shape
        h = self.norm1(x)
        q, k, v = (f(h).view(b, n, self.h, d // self.h).transpose(1, 2) for f in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v, dropout_p=0.1 if self.training else 0.0)
        x = x + self.o(a.transpose(1, 2).reshape(b, n, d))
        return x + self.mlp(self.norm2(x))


class TokenModel(nn.Module):
    def __init__(self, vocab: int = 50, d: int = 16):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.Sequential(Attention(d), Attention(d))
        self.head = nn.Linear(d, vocab)

    def forward(self, ids):
        return self.head(self.blocks(self.emb(ids)))


class BasicBlock(nn.Module):
    """torchvision's BasicBlock: ``out += identity`` and ReLU(inplace=True)."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        out = self.relu(out)
        return out


class TinyResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True))
        self.layer1 = nn.Sequential(BasicBlock(8, 8), BasicBlock(8, 8))
        self.layer2 = nn.Sequential(BasicBlock(8, 16, 2), BasicBlock(16, 16))
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class InplaceActivations(nn.Module):
    """Branches ending in in-place activations (``relu_``, ``silu_``) on values that die with the branch."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.b = nn.Linear(6, 6)
        self.c = nn.Linear(6, 6)
        self.out = nn.Linear(6, 2)

    def forward(self, x):
        h = self.a(x)
        y = self.b(h)
        y.relu_()
        z = F.silu(self.c(h), inplace=True)
        return self.out(h + y + z)


def test_branch_into_cat_with_inplace_relu_loses_its_batchnorm():
    model = _perturb(TwoBranchCat())
    oto, sub, _ = erase_and_check(model, torch.randn(2, 3, 8, 8), [torch.randn(3, 3, 12, 10)], zero=["b2"])
    names = {n for n, _ in sub.named_parameters()} | {n for n, _ in sub.named_buffers()}
    assert not any(n.startswith("b2.") for n in names), names
    assert sub.head.weight.shape[1] == 6  # the consumer lost the removed branch's columns


@pytest.mark.parametrize("style", ["dropout", "iadd", "add"])
def test_residual_mlp_branch_is_really_removed(style):
    model = _perturb(ResidualMLP(style))
    x = torch.randn(3, 4)
    oto, sub, _ = erase_and_check(model, x, [torch.randn(5, 4)], zero=["fc1"])
    # the branch is gone whatever way the residual was written
    assert count(sub) == count(model) - sum(p.numel() for n, p in model.named_parameters() if n.startswith("fc"))
    ops = {str(n.target) for n in sub.graph.nodes}
    assert not any("dropout" in o for o in ops) and not any("add_" in o for o in ops), ops


def test_attention_branch_through_sdpa_is_removed_and_other_lengths_work():
    model = _perturb(TokenModel())
    ids = torch.randint(0, 50, (2, 7))
    oto, sub, zeroed = erase_and_check(model, ids, [torch.randint(0, 50, (3, 11))], zero=["blocks.0.o"])
    # zeroing the output projection zeroes the branch: Q, K, V, the norm and the attention go with it
    attn = oto.groups[zeroed[0]]
    assert {s.name for s in attn.dependents} >= {"blocks.0.q.weight", "blocks.0.k.weight", "blocks.0.v.weight",
                                                 "blocks.0.norm1.weight"}
    assert sum("scaled_dot_product" in str(n.target) for n in sub.graph.nodes) == 1
    assert not any(n.startswith(("blocks.0.q.", "blocks.0.k.", "blocks.0.v.", "blocks.0.norm1."))
                   for n, _ in sub.named_parameters())


def test_torchvision_basic_block_iadd_is_erased_and_image_size_stays_dynamic():
    model = _perturb(TinyResNet())
    x = torch.randn(2, 3, 16, 16)
    oto, sub, ids = erase_and_check(model, x, [torch.randn(1, 3, 24, 20)], fraction=0.5)
    assert oto.dynamic_dims == [[0, 2, 3]]
    assert not any(str(n.target) == "aten.add_.Tensor" and n.users == {} for n in sub.graph.nodes)


def test_inplace_activations_on_removed_values_are_removed():
    model = _perturb(InplaceActivations())
    oto, sub, _ = erase_and_check(model, torch.randn(2, 6), [torch.randn(4, 6)], zero=["b", "c"])
    assert {n for n, _ in sub.named_parameters()} == {"a.weight", "a.bias", "out.weight", "out.bias"}


def test_erased_subnet_trains_like_a_module():
    model = _perturb(TinyResNet())
    oto = OTO(model, torch.randn(2, 3, 16, 16), mode="erase")
    oto.random_set_zero_groups(0.5, seed=1)
    sub = oto.construct_subnet()
    sub.train()
    bns = [m for m in sub.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert bns and all(m.training for m in bns)
    before = bns[0].running_mean.clone()
    sub(torch.randn(4, 3, 16, 16)).sum().backward()
    assert not torch.equal(before, bns[0].running_mean)  # running statistics update in train mode
    assert all(p.grad is not None for p in sub.parameters())
    # the user's parameter names survive construction
    assert {n for n, _ in sub.named_parameters()} <= {n for n, _ in model.named_parameters()}


def test_construction_is_repeatable_and_follows_current_weights():
    model = _perturb(TinyResNet())
    x = torch.randn(2, 3, 16, 16)
    oto = OTO(model, x, mode="erase")
    oto.random_set_zero_groups(0.5, seed=2)
    a = oto.construct_subnet()
    with torch.no_grad():
        model.fc.weight.mul_(2.0)  # training moves the weights after tracing: construction must follow
    b = oto.construct_subnet()
    model.eval()
    with torch.no_grad():
        assert (b(x) - model(x)).abs().max() <= 1e-4
        assert (a(x) - b(x)).abs().max() > 1e-3
    assert count(a) == count(b)


def test_tied_weights_stay_tied():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(20, 8)
            self.fc1, self.fc2 = nn.Linear(8, 8), nn.Linear(8, 8)
            self.head = nn.Linear(8, 20, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, ids):
            h = self.emb(ids)
            return self.head(h + self.fc2(F.relu(self.fc1(h))))

    model = _perturb(Tied())
    oto, sub, _ = erase_and_check(model, torch.randint(0, 20, (2, 5)), [torch.randint(0, 20, (1, 9))], zero=["fc1"])
    assert count(sub) == 20 * 8


def test_requested_dynamic_dimension_that_the_model_pins_is_named():
    class PinsLength(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 8)
            self.mix = nn.Linear(16, 16)  # mixes over the sequence: the length must stay 16

        def forward(self, ids):
            return self.mix(self.emb(ids).transpose(1, 2))

    from torch.export import Dim

    ids = torch.randint(0, 10, (2, 16))
    with pytest.raises(DynamicShapeError, match=r"input 0 dimension 1 is fixed to 16 by .*mm") as err:
        OTO(PinsLength(), ids, mode="erase", dynamic_shapes=({0: Dim("batch"), 1: Dim("seq")},))
    assert "test_erase_construct.py" in str(err.value)  # the source line that pins it
    oto = OTO(PinsLength(), ids, mode="prune")  # the automatic default keeps what it can
    assert oto.dynamic_dims == [[0]]


def test_branch_dies_with_its_segment_but_a_shared_producer_may_not_be_orphaned():
    class Fork(nn.Module):
        """``mid`` feeds both ``a`` and ``b``; ``solo`` only feeds ``b`` (through a concat)."""

        def __init__(self):
            super().__init__()
            self.stem = nn.Linear(4, 6)
            self.mid = nn.Linear(6, 6)
            self.solo_a, self.solo_b = nn.Linear(6, 3), nn.Linear(6, 3)
            self.a, self.b = nn.Linear(6, 6), nn.Linear(12, 6)
            self.out = nn.Linear(6, 2)

        def forward(self, x):
            s = self.stem(x)
            m = F.relu(self.mid(s))
            solo = torch.cat([self.solo_a(s), self.solo_b(s)], -1)
            return self.out(s + self.a(m) + self.b(torch.cat([m, solo], -1)))

    model = _perturb(Fork())
    oto = OTO(model, torch.randn(2, 4), mode="erase")
    a = next(g for g in oto.groups if g.name == "a")
    b = next(g for g in oto.groups if g.name == "b")
    assert a.prunable and b.prunable
    assert {s.name for s in b.dependents} == {"solo_a.weight", "solo_a.bias", "solo_b.weight", "solo_b.bias"}
    assert oto.hierarchy_check(frozenset(), a.id) and oto.hierarchy_check(frozenset(), b.id)
    # both gone: mid would feed nothing, yet it is nobody's branch (its weights are not zero)
    assert not oto.hierarchy_check(frozenset({a.id}), b.id)
    params = dict(model.named_parameters())
    zero_group(a, params)
    zero_group(b, params)
    with pytest.raises(InvalidSubnetError):
        oto.construct_subnet()
    erase_and_check(_perturb(Fork()), torch.randn(2, 4), [torch.randn(5, 4)], zero=["b"])


class DenseBlock(nn.Module):
    """DenseNet with pre-activation: every layer reads the concat of all earlier outputs through BN -> ReLU."""

    def __init__(self, c0: int = 8, growth: int = 4, n: int = 4):
        super().__init__()
        self.stem = nn.Conv2d(3, c0, 3, padding=1)
        self.layers = nn.ModuleList()
        c = c0
        for _ in range(n):
            self.layers.append(nn.Sequential(
                nn.BatchNorm2d(c), nn.ReLU(inplace=True), nn.Conv2d(c, 2 * growth, 1, bias=False),
                nn.BatchNorm2d(2 * growth), nn.ReLU(inplace=True), nn.Conv2d(2 * growth, growth, 3, padding=1, bias=False)))
            c += growth
        self.norm = nn.BatchNorm2d(c)
        self.fc = nn.Linear(c, 5)

    def forward(self, x):
        feats = [self.stem(x)]
        for layer in self.layers:
            feats.append(layer(torch.cat(feats, 1)))
        y = F.relu(self.norm(torch.cat(feats, 1)))
        return self.fc(F.adaptive_avg_pool2d(y, 1).flatten(1))


def test_dense_connectivity_gives_one_disjoint_group_per_layer():
    oto = OTO(_perturb(DenseBlock()), torch.randn(2, 3, 8, 8), mode="erase")
    assert len(oto.prunable_groups) == 4, [(g.name, g.reason) for g in oto.groups]
    # groups stay disjoint: a later norm's channels of an earlier layer belong to the earlier layer only
    owned = [(s.name, s.dim, i) for g in oto.prunable_groups for s in g.slices for i in (s.indices or [-1])]
    assert len(owned) == len(set(owned))


@pytest.mark.parametrize("zero", [["layers.0."], ["layers.1."], ["layers.0.", "layers.2."],
                                  ["layers.0.", "layers.1.", "layers.2.", "layers.3."]])
def test_dense_connectivity_every_layer_is_erasable(zero):
    erase_and_check(_perturb(DenseBlock()), torch.randn(2, 3, 8, 8), [torch.randn(3, 3, 12, 12)], zero=zero)


class LayerScaleBlock(nn.Module):
    """ConvNeXt / PoolFormer / CaiT layer scale at the end of a residual branch."""

    def __init__(self, d: int = 8, style: str = "reshape"):
        super().__init__()
        self.style = style
        self.dw = nn.Conv2d(d, d, 7, padding=3, groups=d)
        self.norm = nn.LayerNorm(d)
        self.pw1, self.pw2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.gamma = nn.Parameter(1e-6 * torch.ones(d))

    def forward(self, x):
        y = self.pw2(F.gelu(self.pw1(self.norm(self.dw(x).permute(0, 2, 3, 1)))))
        if self.style == "reshape":
            y = self.gamma.reshape(-1, 1, 1) * y.permute(0, 3, 1, 2)
        else:
            y = (y * self.gamma).permute(0, 3, 1, 2)
        return x + y


class LayerScaleNet(nn.Module):
    def __init__(self, style: str):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.Sequential(LayerScaleBlock(style=style), LayerScaleBlock(style=style))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


@pytest.mark.parametrize("style", ["reshape", "mul"])
def test_layer_scale_branches_are_erasable(style):
    oto, sub, ids = erase_and_check(_perturb(LayerScaleNet(style)), torch.randn(2, 3, 8, 8),
                                    [torch.randn(1, 3, 12, 10)], zero=["blocks.0."])
    assert "blocks.0.gamma" in {s.name for s in oto.groups[ids[0]].slices}
    assert not any(n.startswith("blocks.0.") for n, _ in sub.named_parameters())


def test_a_model_with_nothing_to_erase_says_why(caplog):
    class Chain(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 2)

        def forward(self, x):
            return self.b(F.relu(self.a(x)))

    with caplog.at_level("WARNING", logger="lightning_oto"):
        oto = OTO(Chain(), torch.randn(2, 4), mode="erase")
    assert not oto.prunable_groups
    assert "would disconnect the network" in caplog.text and "Chain has no erasable group" in caplog.text


@pytest.mark.parametrize("fmt", ["pt2", "onnx"])
def test_exported_erased_subnet_keeps_dynamic_sequence_length(tmp_path, fmt):
    import lightning_oto

    model = _perturb(TokenModel())
    oto = OTO(model, torch.randint(0, 50, (2, 7)), mode="erase")
    oto.random_set_zero_groups(0.5, seed=0)
    sub = oto.construct_subnet()
    paths = oto.export(sub, tmp_path, formats=("torch",) if fmt == "pt2" else ("onnx",))
    loaded = lightning_oto.load(paths["program" if fmt == "pt2" else "onnx"])
    other = torch.randint(0, 50, (3, 11))
    with torch.no_grad():
        assert (loaded(other) - model(other)).abs().max() <= 1e-4


def test_branch_ending_in_reshape_as_is_erasable():
    """LeViT: ``x + branch(x).reshape_as(x)`` reads x only for its shape; the branch is still a branch."""

    class ReshapeAs(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Linear(4, 12)
            self.fc1, self.fc2 = nn.Linear(12, 24), nn.Linear(24, 12)
            self.head = nn.Linear(12, 2)

        def forward(self, x):
            h = self.stem(x).unflatten(-1, (3, 4))
            h = h + self.fc2(F.relu(self.fc1(h.flatten(-2)))).reshape_as(h)
            return self.head(h.flatten(-2))

    oto, sub, _ = erase_and_check(_perturb(ReshapeAs()), torch.randn(2, 5, 4), [torch.randn(3, 7, 4)], zero=["fc1"])
    assert not any(n.startswith(("fc1.", "fc2.")) for n, _ in sub.named_parameters())


def test_masked_branch_where_condition_comes_first_is_erasable():
    """``where(cond, branch, 0)`` is zero when the branch is, whatever the condition (issue 19: the rule
    read the condition as the chosen tensor); ``where(cond, branch, 1)`` is not, and stays."""

    class MaskedBranches(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Linear(4, 8)
            self.zero_fill, self.one_fill = nn.Linear(8, 8), nn.Linear(8, 8)
            self.head = nn.Linear(8, 2)
            self.register_buffer("keep", torch.arange(8) % 3 > 0)  # a fixed mask, as causal masks are

        def forward(self, x):
            h = self.stem(x)
            h = h + torch.where(self.keep, self.zero_fill(h), 0.0) + torch.where(self.keep, self.one_fill(h), 1.0)
            return self.head(h)

    oto, sub, _ = erase_and_check(_perturb(MaskedBranches()), torch.randn(2, 5, 4), [torch.randn(3, 7, 4)],
                                  zero=["zero_fill"])
    assert {g.name for g in oto.prunable_groups if "fill" in g.name} == {"zero_fill"}
    assert not any(n.startswith("zero_fill.") for n, _ in sub.named_parameters())
