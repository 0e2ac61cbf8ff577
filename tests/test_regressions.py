"""Engine bugs found by the random-architecture property tests, minimized (tests/regressions.py).

Every fixture runs the full property suite of tests/test_property.py in each mode it lists, plus an
assertion on the specific mistake it once triggered.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

from lightning_oto import OTO, InvalidSubnetError
from lightning_oto.space.groups import zero_group
from regressions import REGRESSIONS, make_regression
from test_property import ATOL, Case, _check_groups, _greedy, erase_properties, prune_properties

CASES = [(name, mode) for name, (_, _, modes) in sorted(REGRESSIONS.items()) for mode in modes]


def _oto(name: str, mode: str) -> OTO:
    model, x = make_regression(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return OTO(model, x, mode=mode)


def _groups_of(oto: OTO, param: str):
    return [g for g in oto.groups if any(s.name == param for s in g.slices)]


@pytest.mark.parametrize("name,mode", CASES)
def test_regression_properties(name, mode):
    model, x = make_regression(name)
    case = Case(model, x, seed=0, label=name)
    oto = (prune_properties if mode == "prune" else erase_properties)(case, n_single=4)
    assert oto is not None, f"{name} traces"


@pytest.mark.parametrize("name,param", [("depthwise_on_input", "dw.weight"),
                                        ("groupconv_on_moved_channels", "g.weight")])
def test_grouped_conv_on_foreign_channels_is_unprunable(name, param):
    oto = _oto(name, "prune")
    gs = _groups_of(oto, param)
    assert gs and all(not g.prunable for g in gs)
    assert oto.prunable_groups
    # every group zero at once: still exact (this crashed with "weight divisible by groups")
    for g in oto.prunable_groups:
        zero_group(g, dict(oto.model.named_parameters()))
    assert oto.verify(oto.construct_subnet(atol=ATOL)) <= ATOL


@pytest.mark.parametrize("name,hidden", [("shared_conv_on_input_and_features", "hidden.weight"),
                                         ("shared_linear_on_input_and_features", "hidden.weight")])
def test_shared_weight_reading_the_input_pins_its_columns(name, hidden):
    oto = _oto(name, "prune")
    gs = _groups_of(oto, hidden)
    assert gs and all(not g.prunable for g in gs), [g.reason for g in gs]
    assert all(s.name != "shared.weight" or s.dim == 0 for g in oto.prunable_groups for s in g.dependents)
    for g in oto.prunable_groups:
        zero_group(g, dict(oto.model.named_parameters()))
    assert oto.verify(oto.construct_subnet(atol=ATOL)) <= ATOL


@pytest.mark.parametrize("mode", ["prune", "erase"])
def test_grouped_convtranspose_groups_stay_in_range(mode):
    oto = _oto("grouped_convtranspose", mode)
    _check_groups(oto)
    up = _groups_of(oto, "up.weight")
    if mode == "prune":
        assert up and all(not g.prunable for g in up)
    for g in oto.groups:  # zeroing any group (even an unprunable one) is a valid tensor operation
        zero_group(g, dict(copy.deepcopy(oto.model).named_parameters()))


def test_input_used_only_by_dead_code_does_not_block_erasing():
    oto = _oto("dead_input_branch", "erase")
    sg = oto.segment_graph
    assert sg.removal_is_valid(set())
    b = next(g for g in _groups_of(oto, "b.weight"))
    assert b.prunable and oto.hierarchy_check(frozenset(), b.id)
    zero_group(b, dict(oto.model.named_parameters()))
    sub = oto.construct_subnet(atol=ATOL)
    assert sum(p.numel() for p in sub.parameters()) < sum(p.numel() for p in oto.model.parameters())


def test_pass_through_segment_into_concat_keeps_upstream_producer():
    oto = _oto("norm_segment_into_concat", "erase")
    for g in _groups_of(oto, "gn.weight"):
        assert all(s.name.startswith("gn.") for s in g.slices), g.slices
        assert all(not s.name.startswith("dw.") for s in g.dependents)
    ids = _greedy(oto, __import__("random").Random(0))
    params = dict(oto.model.named_parameters())
    for i in ids:
        zero_group(oto.groups[i], params)
    sub = oto.construct_subnet(atol=ATOL)
    with torch.no_grad():
        assert sub(*oto.example_inputs).shape == oto.model(*oto.example_inputs).shape


@pytest.mark.parametrize("name,conv", [("groupnorm_without_affine", "c1.weight"), ("functional_groupnorm", "c1.weight")])
def test_groupnorm_without_module_weight_is_unprunable(name, conv):
    oto = _oto(name, "prune")
    gs = _groups_of(oto, conv)
    assert gs and all(not g.prunable and "group count" in g.reason for g in gs)


def test_concat_affiliate_owned_by_another_segment_keeps_groups_disjoint():
    oto = _oto("concat_affiliate_owned_by_segment", "erase")
    _check_groups(oto)
    br = _groups_of(oto, "br.weight")
    mix = _groups_of(oto, "mix.weight")
    # both erasable: br owns bn's channels 4..6 (its concat affiliates), bn -> mix owns the rest of bn
    assert br and mix and mix[0].prunable and br[0].prunable
    assert {i for s in br[0].slices if s.name == "bn.weight" for i in s.indices} == {4, 5, 6}
    assert {i for s in mix[0].slices if s.name == "bn.weight" for i in s.indices} == {0, 1, 2, 3}
    opt = oto.h2spg(lr=0.01, target_group_sparsity=0.5)  # raised "groups are not disjoint"
    assert opt.prunable_group_ids == [g.id for g in oto.prunable_groups]


def test_add_whose_inputs_all_go_may_not_leave_a_concat():
    oto = _oto("dead_joint_into_concat", "erase")
    a, b = _groups_of(oto, "a.weight")[0], _groups_of(oto, "b.weight")[0]
    assert a.prunable and b.prunable
    assert oto.hierarchy_check(frozenset(), a.id) and oto.hierarchy_check(frozenset({a.id}), b.id) is False
    # zeroing both anyway (e.g. DHSPG) is reported, not built wrong
    params = dict(oto.model.named_parameters())
    zero_group(a, params)
    zero_group(b, params)
    with pytest.raises(InvalidSubnetError):
        oto.construct_subnet()


def test_division_by_a_channel_tensor_is_unprunable():
    oto = _oto("divide_by_channels", "prune")
    gs = _groups_of(oto, "b.weight")
    assert gs and all(not g.prunable and "divides" in g.reason for g in gs)


def test_parameter_divisor_is_a_dependent_not_a_variable():
    oto = _oto("divide_by_parameter", "prune")
    g = _groups_of(oto, "c1.weight")[0]
    assert g.prunable
    assert all(s.name != "p" for s in g.slices) and any(s.name == "p" and s.dim == 1 for s in g.dependents)
    zero_group(g, dict(oto.model.named_parameters()))
    sub = oto.construct_subnet(atol=ATOL)
    assert sub.p.shape == (1, 4, 1, 1)


def test_broadcasting_add_is_not_a_joint():
    oto = _oto("broadcast_add_joint", "erase")
    conv = _groups_of(oto, "conv.weight")
    # the conv alone is no removal structure; with the raw bias folded in, the chain up to head is one
    assert all(not g.prunable or {"bias", "head.weight"} <= set(g.param_names()) for g in conv)
    sg = oto.segment_graph
    add = next(n for n in oto.graph.nodes if n.op == "add" and any(oto.graph.nodes[i].op == "view" for i in n.inputs))
    assert sg.segments[sg.node_segment[add.id]].kind != "joint"


def test_segment_dividing_by_its_own_parameter_is_unerasable():
    oto = _oto("divide_by_own_parameter", "erase")
    g = _groups_of(oto, "up.weight")[0]
    assert not g.prunable and "zero" in g.reason


def test_instance_norm_with_running_stats_is_not_zero_invariant():
    oto = _oto("instancenorm_running_stats_segment", "erase")
    g = _groups_of(oto, "gn.weight")[0]
    assert not g.prunable and "zero" in g.reason
