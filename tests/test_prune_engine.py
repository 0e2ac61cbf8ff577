"""Central check of prune mode: the constructed sub-network's outputs equal the full model's."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from arch_zoo import ZOO, make
from oto_copies import traced_copy
from lightning_oto import OTO, TraceError
from lightning_oto.space.groups import zero_group


def _call(m, x):
    return m(*x) if isinstance(x, tuple) else m(x)


def traced(name: str) -> tuple[nn.Module, tuple, OTO]:
    """A fresh copy of zoo model ``name``, its example input and an OTO over it: the two exactness tests
    below share one trace per model (:mod:`oto_copies`)."""
    oto = traced_copy(name, lambda: make(name))
    return oto.model, oto.example_inputs, oto


@pytest.mark.parametrize("name", sorted(ZOO))
def test_random_half_zero_gives_exact_smaller_subnet(name):
    model, x, oto = traced(name)
    assert oto.prunable_groups, "every zoo model has something prunable"
    zeroed = oto.random_set_zero_groups(fraction=0.5, seed=3)
    assert len(zeroed) == round(0.5 * len(oto.prunable_groups))
    assert sorted(oto.zero_group_ids()) == zeroed
    before = copy.deepcopy(model.state_dict())
    sub = oto.construct_subnet()
    # the original is untouched by construction
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert type(sub) is type(model)
    model.eval(), sub.eval()
    with torch.no_grad():
        # a fresh input, not the one used for tracing and verification
        torch.manual_seed(123)
        x2 = tuple(torch.randn_like(t) for t in x) if isinstance(x, tuple) else torch.randn_like(x)
        full, small = _call(model, x2), _call(sub, x2)
    assert (full - small).abs().max().item() <= 1e-4
    n_full = sum(p.numel() for p in model.parameters())
    n_sub = sum(p.numel() for p in sub.parameters())
    assert n_sub < n_full
    rep = oto.compression_report(sub)
    assert rep["params_sub"] == n_sub and rep["flops_sub"] < rep["flops_full"]


@pytest.mark.parametrize("name", sorted(ZOO))
def test_each_group_is_zero_invariant(name):
    """Zeroing one group changes nothing once its structure (and dependents) are removed."""
    model, x, oto = traced(name)
    params = dict(model.named_parameters())
    gen = torch.Generator().manual_seed(0)
    sample = torch.randperm(len(oto.prunable_groups), generator=gen)[:6].tolist()
    for i in sample:
        g = oto.prunable_groups[i]
        m2 = copy.deepcopy(model)
        zero_group(g, dict(m2.named_parameters()))
        o2 = OTO.__new__(OTO)
        o2.__dict__.update(oto.__dict__)
        o2.model = m2
        sub = o2.construct_subnet(verify=False)
        assert o2.verify(sub) <= 1e-4, g.name
    assert params  # model untouched


def test_unprunable_reasons_are_reported():
    model, x = make("sigmoid_feeds_conv")
    oto = OTO(model, x)
    c1 = [g for g in oto.groups if any(s.name == "c1.weight" for s in g.slices)]
    assert c1 and all(not g.prunable for g in c1)
    assert all("sigmoid" in g.reason for g in c1)
    out = [g for g in oto.groups if any(s.name == "c3.weight" for s in g.slices)]
    assert all(not g.prunable and "output" in g.reason for g in out)


def test_layernorm_width_goes_with_its_norm_entries():
    """The model width is normalised by LayerNorm modules: a width channel goes with its entries in both norms
    (the slimmed norms keep the full width's statistics, tests/test_hidden_width.py), as do the MLP hidden
    channels and the heads."""
    model, x = make("transformer_mlp")
    oto = OTO(model, x)
    width = [g for g in oto.groups if any(s.name == "emb.weight" for s in g.slices)]
    assert len(width) == 16 and all(g.prunable for g in width)
    for g in width:
        assert {s.name for s in g.slices} == {"emb.weight", "emb.bias", "ln1.weight", "ln1.bias", "ln2.weight",
                                              "ln2.bias", "attn.out_proj.weight", "attn.out_proj.bias",
                                              "fc2.weight", "fc2.bias"}
        assert {s.name for s in g.dependents} == {"attn.in_proj_weight", "fc1.weight", "head.weight"}
    prunable_params = {s.name for g in oto.prunable_groups for s in g.slices}
    assert {"fc1.weight", "fc1.bias", "attn.in_proj_weight", "attn.in_proj_bias"} <= prunable_params
    heads = [g for g in oto.prunable_groups if any(s.name == "attn.in_proj_weight" for s in g.slices)]
    assert len(heads) == 2  # nn.MultiheadAttention(16, 2): one group per head
    for g in heads:
        rows = next(s for s in g.slices if s.name == "attn.in_proj_weight").indices
        assert len(rows) == 3 * 8  # the head's query, key and value rows
        cols = next(s for s in g.dependents if s.name == "attn.out_proj.weight").indices
        assert len(cols) == 8


def test_group_conv_groups_cover_whole_conv_groups():
    model, x = make("resnext_groupconv")
    oto = OTO(model, x)
    g = next(g for g in oto.prunable_groups if any(s.name == "b1.b.0.weight" for s in g.slices))
    rows = next(s for s in g.slices if s.name == "b1.b.0.weight").indices
    assert len(rows) == 16 // 4  # one whole conv-group of the groups=4 conv


def test_trace_restores_mode_and_never_modifies_model():
    model, x = make("resnet_tiny")
    model.train()
    sd = copy.deepcopy(model.state_dict())
    OTO(model, x)
    assert model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k])
    model.eval()
    OTO(model, x)
    assert not model.training


def test_construct_without_zero_groups_warns_and_copies():
    model, x = make("plain_cnn")
    oto = OTO(model, x)
    with pytest.warns(UserWarning, match="no group is zero"):
        sub = oto.construct_subnet()
    assert sum(p.numel() for p in sub.parameters()) == sum(p.numel() for p in model.parameters())


def test_whole_layer_zero_keeps_one_channel():
    model, x = make("plain_cnn")
    oto = OTO(model, x)
    params = dict(model.named_parameters())
    for g in oto.prunable_groups:
        zero_group(g, params)
    sub = oto.construct_subnet()
    assert oto.verify(sub) <= 1e-5
    assert sub.f[0][0].out_channels == 1


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.l = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow
            return self.l(x)
        return -self.l(x)


def test_bad_inputs_give_clear_errors():
    model, x = make("plain_cnn")
    with pytest.raises(ValueError, match="example_inputs is required"):
        OTO(model, None)
    with pytest.raises(TypeError, match="tensor or a non-empty tuple"):
        OTO(model, "not a tensor")
    with pytest.raises(ValueError, match="mode must be one of"):
        OTO(model, x, mode="shrink")
    with pytest.raises(TraceError, match="tracer said"):
        OTO(Untraceable(), torch.randn(2, 4))
    with pytest.raises(ValueError, match="no trainable parameters"):
        OTO(nn.ReLU(), x)
    oto = OTO(model, x)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        oto.dhspg(target_group_sparsity=1.0)
    with pytest.raises(ValueError, match="erase"):
        oto.h2spg()


def test_device_mismatch_is_reported():
    model, x = make("plain_cnn")
    model = model.to(torch.float32)
    meta_x = torch.randn(2, 3, 16, 16, device="meta")
    with pytest.raises(ValueError, match="example input"):
        OTO(model, meta_x)
