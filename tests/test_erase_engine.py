"""Erase mode: GeZIGs on the segment graph, hierarchy-valid zero sets, exact erased sub-networks."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from arch_zoo import ERASE_ZOO, make
from lightning_oto import OTO, InvalidSubnetError
from lightning_oto.space.groups import zero_group


def _call(m, x):
    return m(*x) if isinstance(x, tuple) else m(x)


@pytest.mark.parametrize("name", ERASE_ZOO)
def test_random_valid_erase_is_exact_and_smaller(name):
    model, x = make(name)
    oto = OTO(model, x, mode="erase")
    assert oto.prunable_groups, f"{name} has erasable operators"
    for seed in (0, 1):
        m, _ = make(name)
        o = OTO.__new__(OTO)
        o.__dict__.update(oto.__dict__)
        o.model = m
        zeroed = o.random_set_zero_groups(fraction=0.5, seed=seed)
        if not zeroed:
            zeroed = o.random_set_zero_groups(fraction=1.0, seed=seed)
        assert zeroed and o.segment_graph.removal_is_valid({o.groups[i].vertex for i in zeroed})
        sub = o.construct_subnet()
        assert isinstance(sub, nn.Module)
        m.eval(), sub.eval()
        # another batch size than the traced example: the erased program keeps a dynamic batch
        xb = torch.randn(3, *x.shape[1:]) if isinstance(x, torch.Tensor) else x
        with torch.no_grad():
            assert (_call(m, xb) - _call(sub, xb)).abs().max() <= 1e-4
        rep = o.compression_report(sub)
        assert rep["params_sub"] < rep["params_full"]
        assert rep["flops_sub"] < rep["flops_full"]


class Fig3Net(nn.Module):
    """conv_a and conv_b feed one add read by head; conv_c joins after head. Removing a and b disconnects."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.conv_a = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4))
        self.conv_b = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4))
        self.conv_c = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4))
        self.head = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        s = F.relu(self.stem(x))
        h = F.relu(self.conv_a(s) + self.conv_b(s))
        return self.head(h) + self.conv_c(s)


def _group(oto, module):
    return next(g for g in oto.groups if any(s.name.startswith(module + ".") for s in g.slices))


def test_figure3_hierarchy_check_skips_disconnecting_group():
    torch.manual_seed(0)
    model = Fig3Net()
    x = torch.randn(2, 3, 8, 8)
    oto = OTO(model, x, mode="erase")
    a, b = _group(oto, "conv_a"), _group(oto, "conv_b")
    assert a.prunable and b.prunable
    assert oto.hierarchy_check(frozenset(), a.id)
    assert not oto.hierarchy_check(frozenset({a.id}), b.id)  # both gone: the add has no input left

    # H2SPG walks groups by ascending saliency: b is less salient than c but must be skipped after a
    c, head = _group(oto, "conv_c"), _group(oto, "head")
    order = {a.id: 0.0, b.id: 0.1, c.id: 0.2, head.id: 0.3}

    def saliency(stats):
        return torch.tensor([order[i] for i in stats.group_ids], dtype=torch.float32)

    def run(target):
        m = Fig3Net()
        m.load_state_dict(model.state_dict())
        o = OTO(m, x, mode="erase")
        opt = o.h2spg(lr=0.01, target_group_sparsity=target, warmup_steps=1, projection_steps=1, saliency=saliency)
        for _ in range(3):
            opt.zero_grad()
            m(x).square().mean().backward()
            opt.step()
        return o, opt

    o, opt = run(0.5)  # K = 2: a, then b is skipped, c is taken
    assert opt.redundant_group_ids == sorted([a.id, c.id])
    assert sorted(o.zero_group_ids()) == sorted([a.id, c.id])
    assert o.verify(o.construct_subnet()) <= 1e-5
    with pytest.warns(UserWarning):
        o, opt = run(0.99)  # K = 4 but only a and c can go together
    assert opt.redundant_group_ids == sorted([a.id, c.id])


def test_invalid_zero_set_is_detected():
    torch.manual_seed(0)
    model = Fig3Net()
    x = torch.randn(2, 3, 8, 8)
    oto = OTO(model, x, mode="erase")
    params = dict(model.named_parameters())
    for mod in ("conv_a", "conv_b"):
        zero_group(_group(oto, mod), params)
    with pytest.raises(InvalidSubnetError, match="disconnect"):
        oto.construct_subnet()


def test_dhspg_ablation_on_erase_space_runs_and_reports_validity():
    model, x = make("darts_cell")
    oto = OTO(model, x, mode="erase")
    with pytest.raises(ValueError, match="h2spg"):
        oto.dhspg()
    opt = oto.dhspg(lr=0.01, target_group_sparsity=0.9, warmup_steps=2, projection_steps=2,
                    erase_ablation=True)
    for _ in range(6):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    zero = oto.zero_group_ids()
    assert len(zero) == round(0.9 * len(oto.prunable_groups))
    valid = oto.segment_graph.removal_is_valid({oto.groups[i].vertex for i in zero})
    if valid:
        assert oto.verify(oto.construct_subnet()) <= 1e-4
    else:
        with pytest.raises(InvalidSubnetError):
            oto.construct_subnet()


def test_erased_subnet_trains_saves_and_exports(tmp_path):
    model, x = make("inception_concat")
    oto = OTO(model, x, mode="erase")
    oto.random_set_zero_groups(0.5, seed=0)
    sub = oto.construct_subnet()
    # batch norms are real modules again: train and eval behave differently
    sub.train()
    y_train = sub(x)
    sub.eval()
    with torch.no_grad():
        y_eval = sub(x)
    assert not torch.allclose(y_train, y_eval)
    sub.train()
    opt = torch.optim.SGD(sub.parameters(), lr=0.1)
    before = [p.detach().clone() for p in sub.parameters()]
    sub(x).square().mean().backward()
    opt.step()
    assert any(not torch.equal(b, p) for b, p in zip(before, sub.parameters()))
    paths = oto.export(sub, tmp_path, formats=("torch", "onnx"))
    assert float(paths["onnx_check_error"]) <= 1e-4
    assert float(paths["program_check_error"]) <= 1e-4
    from lightning_oto import load

    sub.eval()
    with torch.no_grad():
        assert torch.allclose(load(paths["program"])(x), sub(x), atol=1e-5)


def test_groups_have_readable_names_and_cover_segments():
    model, x = make("demonet_tiny")
    oto = OTO(model, x, mode="erase")
    names = {g.name for g in oto.groups}
    assert any("conv5" in n for n in names) and any("conv6" in n for n in names)
    assert all(g.vertex is not None for g in oto.groups)
    sg = oto.segment_graph
    assert sum(len(s.nodes) for s in sg.segments) == len(oto.graph)
