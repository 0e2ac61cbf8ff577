"""The operator-rule registry: canonical keys, schema-bound arguments, user rules, and per-pattern coverage.

Every model here is checked the central way: the constructed sub-network equals the full model, and what
was zeroed is really gone (fewer parameters).
"""
from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from arch_zoo import HeadTransformer, SplitNet, TimmAttention, cbr, make
from lightning_oto import OTO, SubnetMismatchError, register_rule
from lightning_oto.space.groups import zero_group
from lightning_oto.space.rules import (KINDS, REGISTRY, Call, ZeroInvariantUnary, bind, canonical_op, kind_of,
                                       rule_for, unregister_rule)
from lightning_oto.subnet.slim import PrunedMultiheadAttention


# ------------------------------------------------------------------ custom ops (a user's own operators)
@torch.library.custom_op("lotest::twice", mutates_args=())
def twice(x: torch.Tensor) -> torch.Tensor:
    """Zero-invariant entry-wise op the engine does not know."""
    return x * 2


@twice.register_fake
def _(x):
    return torch.empty_like(x)


@torch.library.custom_op("lotest::plus_one", mutates_args=())
def plus_one(x: torch.Tensor) -> torch.Tensor:
    """Not zero-invariant: a rule claiming it is breaks exactness."""
    return x + 1


@plus_one.register_fake
def _(x):
    return torch.empty_like(x)


CUSTOM = {"twice": twice, "plus_one": plus_one}


class CustomOpNet(nn.Module):
    def __init__(self, op: str):
        super().__init__()
        self.op = op
        self.c1 = cbr(3, 8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(F.relu(self.c2(CUSTOM[self.op](self.c1(x)))).mean((2, 3)))


@pytest.fixture
def user_rules():
    """Register rules for the test and forget them afterwards (the registry is process-wide)."""
    added = []

    def add(op, rule):
        added.append(op)
        return register_rule(op, rule)

    yield add
    for op in added:
        unregister_rule(op)


def _zero_half_and_construct(oto: OTO, seed: int = 0) -> nn.Module:
    assert oto.prunable_groups
    oto.random_set_zero_groups(0.5, seed=seed)
    sub = oto.construct_subnet()
    assert sub.oto_verification_error <= 1e-4
    assert sum(p.numel() for p in sub.parameters()) < sum(p.numel() for p in oto.model.parameters())
    return sub


def _groups_of(oto: OTO, param: str):
    return [g for g in oto.groups if any(s.name == param for s in g.slices)]


# ------------------------------------------------------------------ registry basics
@pytest.mark.parametrize("spelling, key", [
    ("add_", "add"), ("concat", "cat"), ("relu_", "relu"), ("aten::silu_", "silu"), ("_softmax", "softmax"),
    (torch.ops.aten.add_.Tensor, "add"), (torch.ops.aten.cat.default, "cat"), (torch.ops.aten.concat, "cat"),
    (torch.ops.aten._native_batch_norm_legit_no_training.default, "batch_norm"),
    (torch.ops.lotest.twice.default, "lotest::twice"), (torch.ops.lotest.twice, "lotest::twice"),
])
def test_canonical_op_folds_spellings(spelling, key):
    assert canonical_op(spelling) == key


def test_arguments_are_bound_by_schema_name():
    x, p = object(), [1, 1]
    bound = bind(torch.ops.aten.pad.default, (x, p, "constant", 0.0), {})
    assert bound == {"self": x, "pad": p, "mode": "constant", "value": 0.0}
    bound = bind(torch.ops.aten.add.Tensor, (x, 2), {"alpha": 3})
    assert bound == {"self": x, "other": 2, "alpha": 3}
    assert bind(torch.ops.aten.pad.default, (x, p), {})["mode"] == "constant"  # defaults filled in


def test_every_rule_has_a_drawing_kind_and_unknown_ops_are_conservative():
    assert {r.kind for r in REGISTRY.values()} <= set(KINDS)
    assert kind_of("conv2d") == "stem" and kind_of("add_") == "joint" and kind_of("view") == "shape"
    assert kind_of("relu") == "accessory" and kind_of("lotest::twice") == "unknown"
    assert type(rule_for("no_such_op")).__name__ == "Conservative"


# ------------------------------------------------------------------ the pad bug (issue 12)
class PadNet(nn.Module):
    def __init__(self, mode, value, pad=(1, 1, 1, 1), c2_in=8):
        super().__init__()
        self.mode, self.value, self.pad = mode, value, pad
        self.c1 = cbr(3, 8)
        self.c2 = nn.Conv2d(c2_in, 6, 3)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        y = F.pad(self.c1(x), self.pad, mode=self.mode, value=self.value) if self.mode == "constant" \
            else F.pad(self.c1(x), self.pad, mode=self.mode)
        return self.fc(F.relu(self.c2(y)).mean((2, 3)))


@pytest.mark.parametrize("mode, value, zero_invariant", [
    ("constant", 0.0, True), ("constant", 0, True), ("constant", None, True), ("constant", 1.0, False),
    ("constant", -0.5, False), ("reflect", None, True), ("replicate", None, True), ("circular", None, True),
])
def test_padding_every_mode_and_value(mode, value, zero_invariant):
    """aten.pad(x, p, 'constant', 0.0): the mode string is not the value; only a non-zero fill keeps channels."""
    torch.manual_seed(0)
    model = PadNet(mode, value if value is not None else 0.0)
    oto = OTO(model, torch.randn(2, 3, 8, 8))
    c1 = _groups_of(oto, "c1.0.weight")
    assert len(c1) == 8
    if zero_invariant:
        assert all(g.prunable for g in c1)
        _zero_half_and_construct(oto)
    else:
        assert not any(g.prunable for g in c1) and all("pads with" in g.reason for g in c1)


def test_padding_the_channel_dim_is_refused():
    torch.manual_seed(0)
    oto = OTO(PadNet("constant", 0.0, pad=(1, 1, 1, 1, 1, 1), c2_in=10), torch.randn(2, 3, 8, 8))
    assert all("pads the channel dimension" in g.reason for g in _groups_of(oto, "c1.0.weight"))


# ------------------------------------------------------------------ user rules
def test_unknown_custom_op_keeps_its_groups_with_the_reason(caplog):
    torch.manual_seed(0)
    with caplog.at_level(logging.INFO, logger="lightning_oto"):
        oto = OTO(CustomOpNet("twice"), torch.randn(2, 3, 8, 8))
    c1 = _groups_of(oto, "c1.0.weight")
    assert c1 and all(not g.prunable and "unsupported operator twice" in g.reason for g in c1)
    assert any("twice" in r.getMessage() for r in caplog.records)


def test_user_rule_turns_a_custom_op_into_prunable_exact_groups(user_rules):
    torch.manual_seed(0)
    user_rules("lotest::twice", ZeroInvariantUnary)
    model = CustomOpNet("twice")
    oto = OTO(model, torch.randn(2, 3, 8, 8))
    c1 = _groups_of(oto, "c1.0.weight")
    assert len(c1) == 8 and all(g.prunable for g in c1)
    sub = _zero_half_and_construct(oto)
    assert sub.c1[0].out_channels < 8
    assert kind_of(torch.ops.lotest.twice.default) == "accessory"  # the drawings ask the same registry


def test_user_rule_that_breaks_exactness_is_named_by_construction(user_rules):
    torch.manual_seed(0)
    user_rules(torch.ops.lotest.plus_one, ZeroInvariantUnary())  # wrong: (0 + 1) != 0
    oto = OTO(CustomOpNet("plus_one"), torch.randn(2, 3, 8, 8))
    c1 = _groups_of(oto, "c1.0.weight")
    assert all(g.prunable for g in c1)
    params = dict(oto.model.named_parameters())
    for g in c1[:3]:
        zero_group(g, params)
    with pytest.raises(SubnetMismatchError, match=r"ZeroInvariantUnary \(user rule for lotest::plus_one\)"):
        oto.construct_subnet()


def test_register_rule_bad_input():
    with pytest.raises(TypeError, match="Rule"):
        register_rule("lotest::twice", object())
    with pytest.raises(ValueError, match="replace=True"):
        register_rule("relu", ZeroInvariantUnary())
    with pytest.raises(TypeError, match="op must be"):
        register_rule(3.5, ZeroInvariantUnary())
    assert type(rule_for("relu")).__name__ == "ZeroInvariantUnary" and not rule_for("relu").user


def test_erase_mode_asks_the_same_rules(user_rules):
    """A residual branch ending in a custom op is erasable only once a rule says zero stays zero."""
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = cbr(3, 8)
            self.branch = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))
            self.fc = nn.Linear(8, 4)

        def forward(self, x):
            x = self.stem(x)
            x = x + twice(self.branch(x))
            return self.fc(x.mean((2, 3)))

    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    branch = lambda o: next(g for g in o.groups if "branch" in g.name)  # noqa: E731
    assert not branch(OTO(Residual(), x, mode="erase")).prunable
    user_rules("lotest::twice", ZeroInvariantUnary)
    oto = OTO(Residual(), x, mode="erase")
    g = branch(oto)
    assert g.prunable
    zero_group(g, dict(oto.model.named_parameters()))
    sub = oto.construct_subnet()
    assert sum(p.numel() for p in sub.parameters()) < sum(p.numel() for p in oto.model.parameters())


# ------------------------------------------------------------------ zero prunable groups: say why
def test_a_model_with_no_prunable_group_logs_why(caplog):
    class AllKept(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(3, 6, 3, padding=1)

        def forward(self, x):
            return torch.softmax(self.c(x), dim=1)

    with caplog.at_level(logging.WARNING, logger="lightning_oto"):
        oto = OTO(AllKept(), torch.randn(2, 3, 8, 8))
    assert not oto.prunable_groups
    msg = " ".join(r.getMessage() for r in caplog.records)
    assert "no prunable group" in msg and "6 groups" in msg and "softmax" in msg


# ------------------------------------------------------------------ matmul with a parameter (GPT-2 Conv1D)
def test_conv1d_addmm_columns_are_produced_and_nf_follows():
    model, x = make("gpt2_conv1d")
    oto = OTO(model, x)
    fc = [g for g in oto.prunable_groups if any(s.name == "c_fc.weight" for s in g.slices)]
    assert len(fc) == 24
    sl = {s.name: s for s in fc[0].slices + fc[0].dependents}
    assert sl["c_fc.weight"].dim == 1 and sl["c_fc.bias"].dim == 0 and sl["c_proj.weight"].dim == 0
    sub = _zero_half_and_construct(oto)
    assert sub.c_fc.nf == sub.c_fc.weight.shape[1] < 24 and sub.c_proj.nx == sub.c_proj.weight.shape[0]


# ------------------------------------------------------------------ attention heads
def test_grouped_query_heads_are_one_group_per_key_value_head():
    model, x = make("head_attention")
    oto = OTO(model, x)
    heads = [g for g in oto.prunable_groups if any(s.name == "a1.k_proj.weight" for s in g.slices)]
    assert len(heads) == 2  # two key/value heads, each with its two query heads
    for g in heads:
        rows = {s.name: len(s.indices) for s in g.slices}
        assert rows["a1.k_proj.weight"] == rows["a1.v_proj.weight"] == 4 and rows["a1.q_proj.weight"] == 8
        cols = {s.name: len(s.indices) for s in g.dependents}
        assert cols["a1.o_proj.weight"] == 8
    a2 = [g for g in oto.prunable_groups if any(s.name == "a2.q_proj.weight" for s in g.slices)]
    assert len(a2) == 4
    params = dict(model.named_parameters())
    zero_group(heads[0], params)
    for g in a2[:3]:
        zero_group(g, params)
    sub = oto.construct_subnet()
    assert sub.a1.q_proj.out_features == 8 and sub.a1.k_proj.out_features == 4
    assert sub.a1.num_key_value_heads == 1  # the head count the forward reads follows
    assert sub.a2.q_proj.out_features == 4
    with torch.no_grad():
        x2 = torch.randn(5, *x.shape[1:])
        assert (model.eval()(x2) - sub.eval()(x2)).abs().max() <= 1e-5


def test_multihead_attention_loses_heads_and_width():
    model, x = make("timm_attention_mha")
    oto = OTO(model, x)
    heads = [g for g in oto.prunable_groups if any(s.name == "mha.in_proj_weight" and len(s.indices) == 24
                                                   for s in g.slices)]
    assert len(heads) == 2
    zero_group(heads[0], dict(model.named_parameters()))
    sub = oto.construct_subnet()
    assert isinstance(sub.mha, PrunedMultiheadAttention) and sub.mha.num_heads == 1
    assert sub.attn.num_heads == 4  # timm-style attention: heads untouched here
    sub2 = _zero_half_and_construct(OTO(make("timm_attention_mha")[0], x))
    assert sub2.attn.num_heads == sub2.attn.qkv.out_features // (3 * sub2.attn.head_dim)


def test_multihead_attention_weights_used_keep_heads():
    class UsesWeights(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Linear(6, 8)
            self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            h = self.emb(x)
            out, w = self.mha(h, h, h)
            return self.head(out.mean(1)) + w.mean()

    torch.manual_seed(0)
    oto = OTO(UsesWeights(), torch.randn(2, 5, 6))
    heads = _groups_of(oto, "mha.in_proj_weight")
    assert heads and all(not g.prunable and "attention weights" in g.reason for g in heads)


class TimmAttentionFixedWidth(TimmAttention):
    """Older timm: reshape(B, N, C) with C taken from the input: removing a head cannot work."""

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))


def test_attention_with_a_fixed_width_reshape_keeps_its_heads():
    class Net(nn.Module):
        def __init__(self, attn):
            super().__init__()
            self.norm = nn.LayerNorm(16)
            self.attn = attn
            self.head = nn.Linear(16, 3)

        def forward(self, x):
            return self.head(self.attn(self.norm(x)).mean(1))

    torch.manual_seed(0)
    x = torch.randn(2, 5, 16)
    fixed = OTO(Net(TimmAttentionFixedWidth()), x)
    heads = _groups_of(fixed, "attn.qkv.weight")
    assert len(heads) == 4 and all(not g.prunable and "trial construction" in g.reason for g in heads)
    free = OTO(Net(TimmAttention()), x)
    assert len([g for g in _groups_of(free, "attn.qkv.weight") if g.prunable]) == 4
    sub = _zero_half_and_construct(free)
    assert sub.attn.num_heads == sub.attn.qkv.out_features // 12 < 4  # the attribute the forward reads follows


# ------------------------------------------------------------------ splits, chunks, slices
def test_split_sizes_read_from_consumers_follow_them():
    model, x = make("split_sizes_from_consumers")
    oto = OTO(model, x)
    b1 = [g for g in oto.prunable_groups if any(s.name == "block1.3.weight" for s in g.slices)]
    assert len(b1) == 8 + 16  # x1 and x2 share block2_1: their channels are coupled, x3 has its own
    sub = _zero_half_and_construct(oto)
    assert sub.block2_1[0].in_channels + sub.block2_1[0].in_channels + sub.block2_2[0].in_channels \
        == sub.block1[3].out_channels


def test_hard_coded_split_sizes_keep_their_channels():
    class Fixed(SplitNet):
        def forward(self, x):
            x1, x2, x3 = torch.split(self.block1(x), [8, 8, 16], dim=1)
            y = self.block2_1(x1) + self.block2_1(x2) + self.block2_2(x3)
            return self.fc(y.mean((2, 3)))

    torch.manual_seed(0)
    oto = OTO(Fixed(), torch.randn(2, 3, 6, 6))
    b1 = _groups_of(oto, "block1.3.weight")
    assert b1 and all(not g.prunable and "trial construction" in g.reason for g in b1)


@pytest.mark.parametrize("runtime", [True, False])
def test_channel_halves_by_slicing(runtime):
    class Halves(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = cbr(3, 8)
            self.a, self.b = cbr(4, 4), cbr(4, 4)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            x = self.stem(x)
            c = x.shape[1] // 2 if runtime else 4
            return self.fc((self.a(x[:, :c]) + self.b(x[:, c:])).mean((2, 3)))

    torch.manual_seed(0)
    oto = OTO(Halves(), torch.randn(2, 3, 6, 6))
    stem = _groups_of(oto, "stem.0.weight")
    assert len(stem) == 4 and all(len(g.slices[0].indices) == 2 for g in stem)  # channel i with i + 4
    if runtime:
        assert all(g.prunable for g in stem)
        _zero_half_and_construct(oto)
    else:
        assert not any(g.prunable for g in stem)


def test_roll_over_channels_is_refused():
    class RollC(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2 = cbr(3, 6), nn.Conv2d(6, 4, 1)

        def forward(self, x):
            return self.c2(torch.roll(self.c1(x), 1, dims=1)).mean((2, 3))

    oto = OTO(RollC(), torch.randn(2, 3, 6, 6))
    assert all("across channels" in g.reason for g in _groups_of(oto, "c1.0.weight"))


def test_layer_scale_through_a_parameter_view_is_zeroed_with_its_channel():
    model, x = make("roll_reshape_as_layer_scale")
    oto = OTO(model, x)
    g = next(g for g in oto.prunable_groups if any(s.name == "gamma" for s in g.slices))
    assert any(s.name == "stem.0.weight" for s in g.slices) and any(s.name == "beta" for s in g.slices)
    sub = _zero_half_and_construct(oto)
    assert sub.gamma.shape[0] == sub.stem[0].out_channels


def test_head_transformer_is_exact_for_every_single_group():
    """Zero-invariance, one group at a time, on the attention fixture (the zoo test samples 6)."""
    torch.manual_seed(0)
    model = HeadTransformer()
    x = torch.randn(2, 8, 6)
    oto = OTO(model, x)
    for g in oto.prunable_groups:
        m2 = copy.deepcopy(model)
        zero_group(g, dict(m2.named_parameters()))
        o2 = OTO.__new__(OTO)
        o2.__dict__.update(oto.__dict__)
        o2.model = m2
        assert o2.verify(o2.construct_subnet(verify=False)) <= 1e-5, g.name


def test_call_reads_normalised_arguments():
    ep = torch.export.export(PadNet("constant", 0.5), (torch.randn(1, 3, 6, 6),), strict=False)
    from lightning_oto.graph.trace import build_graph

    node = next(n for n in build_graph(ep).nodes if n.op == "pad")
    call = Call.of(node)
    assert call.key == "pad" and call["mode"] == "constant" and call["value"] == 0.5 and call.input is not None


def test_pruned_multihead_attention_takes_padding_masks():
    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Linear(6, 12)
            self.mha = nn.MultiheadAttention(12, 3, batch_first=True)
            self.head = nn.Linear(12, 2)

        def forward(self, x, pad):
            h = self.emb(x)
            return self.head(self.mha(h, h, h, key_padding_mask=pad)[0].mean(1))

    torch.manual_seed(0)
    pad = torch.zeros(2, 5, dtype=torch.bool)
    pad[0, 3:] = True
    oto = OTO(Masked(), (torch.randn(2, 5, 6), pad))
    heads = [g for g in oto.prunable_groups if any(s.name == "mha.in_proj_weight" and len(s.indices) == 12
                                                   for s in g.slices)]
    assert len(heads) == 3
    params = dict(oto.model.named_parameters())
    for g in heads[:2]:
        zero_group(g, params)
    sub = oto.construct_subnet()
    assert sub.mha.num_heads == 1 and sub.mha.in_proj_weight.shape == (12, 12)
    pad2 = torch.zeros(4, 7, dtype=torch.bool)
    pad2[1, 2:] = True
    x2 = torch.randn(4, 7, 6)
    with torch.no_grad():
        assert (oto.model(x2, pad2) - sub(x2, pad2)).abs().max() <= 1e-5


@pytest.mark.parametrize("explicit_scale", [True, False])
def test_within_head_channels_only_with_an_explicit_scale(explicit_scale):
    """One head, channels in the last dim: q/k channel i go together (their products vanish); the default
    scale 1/sqrt(E) would change with E, so without an explicit scale they are kept."""
    class OneHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v = nn.Linear(6, 8), nn.Linear(6, 8), nn.Linear(6, 8)
            self.o = nn.Linear(8, 3)

        def forward(self, x):
            q, k, v = self.q(x)[:, None], self.k(x)[:, None], self.v(x)[:, None]
            scale = 8 ** -0.5 if explicit_scale else None
            return self.o(F.scaled_dot_product_attention(q, k, v, scale=scale)[:, 0]).mean(1)

    torch.manual_seed(0)
    oto = OTO(OneHead(), torch.randn(2, 5, 6))
    qk = _groups_of(oto, "q.weight")
    assert len(qk) == 8
    if explicit_scale:
        assert all(g.prunable and any(s.name == "k.weight" for s in g.slices) for g in qk)
        assert all(g.prunable for g in _groups_of(oto, "v.weight"))
        _zero_half_and_construct(oto)
    else:
        assert not any(g.prunable for g in qk + _groups_of(oto, "k.weight") + _groups_of(oto, "v.weight"))
