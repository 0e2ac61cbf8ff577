"""The controls pruning users expect: ignored_layers, max_group_sparsity, round_to, summary()."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_oto import OTO
from test_erase_construct import TinyResNet, _perturb

X = torch.randn(2, 3, 16, 16)


def _model() -> nn.Module:
    return _perturb(TinyResNet())


def _zeroed_params(oto: OTO, ids) -> set[str]:
    return {s.name for i in ids for s in oto.groups[i].slices}


def test_ignored_layers_by_instance_and_pattern_stay_whole():
    model = _model()
    oto = OTO(model, X, ignored_layers=[model.layer1[0].conv1, "layer2.*.conv1"])
    kept = [g for g in oto.groups if not g.prunable and "ignored_layers" in (g.reason or "")]
    assert kept
    ids = oto.random_set_zero_groups(1.0)
    touched = _zeroed_params(oto, ids)
    assert not any(n.startswith(("layer1.0.conv1.", "layer2.0.conv1.", "layer2.1.conv1.")) for n in touched)
    sub = oto.construct_subnet()
    assert sub.layer1[0].conv1.out_channels == 8 and sub.layer2[1].conv1.out_channels == 16
    assert sub.layer1[1].conv1.out_channels < 8  # the rest still prunes


def test_max_group_sparsity_caps_each_module():
    model = _model()
    oto = OTO(model, X, max_group_sparsity={"layer2.0.conv1": 0.25, "layer1.*": 0.5})
    ids = oto.random_set_zero_groups(1.0, seed=3)
    sub = oto.construct_subnet()
    assert sub.layer2[0].conv1.out_channels == 16 - 4  # floor(0.25 * 16) removed, not more
    for block in sub.layer1:
        assert block.conv1.out_channels >= 4
    assert len(ids) < len(oto.prunable_groups)


def test_round_to_removes_multiples_and_keeps_remainders():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 20, 3, padding=1)  # 20 = 2 * 8 + 4: four channels can never go
            self.b = nn.Conv2d(20, 16, 3, padding=1)
            self.head = nn.Linear(16, 4)

        def forward(self, x):
            return self.head(self.b(torch.relu(self.a(x))).relu().mean((2, 3)))

    model = _perturb(Odd())
    oto = OTO(model, X, round_to=8)
    assert sum(g.prunable for g in oto.groups) == 2 + 2
    for seed in range(4):
        m = _perturb(Odd())
        o = OTO(m, X, round_to=8)
        o.random_set_zero_groups(0.5, seed=seed)
        sub = o.construct_subnet()
        assert (20 - sub.a.out_channels) % 8 == 0 and (16 - sub.b.out_channels) % 8 == 0
        assert sub.a.out_channels >= 4


@pytest.mark.parametrize("kwargs,match", [
    ({"ignored_layers": ["nope.conv"]}, "no module of the model is called 'nope.conv'"),
    ({"max_group_sparsity": {"layer1": 1.5}}, r"max_group_sparsity\['layer1'\] must be a number in \[0, 1\]"),
    ({"round_to": 0}, "round_to must be an integer >= 1"),
    ({"round_to": 8, "mode": "erase"}, "applies to mode='prune' only"),
])
def test_bad_controls_fail_at_construction(kwargs, match):
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        OTO(model, X, **kwargs)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_summary_matches_the_subnetwork():
    model = _model()
    oto = OTO(model, X)
    ids = oto.random_set_zero_groups(0.5, seed=1)
    sub = oto.construct_subnet()
    table = oto.summary(ids)
    row = next(line for line in table.splitlines() if line.startswith("layer2.0.conv1 "))
    assert f"16 -> {sub.layer2[0].conv1.out_channels}" in " ".join(row.split())
    assert "reaches the model output" in next(line for line in table.splitlines() if line.startswith("fc "))
    text = str(oto.groups[ids[0]])
    assert text.startswith(f"Group {ids[0]}") and "zeroes" in text and "removes" in text


class _LongNames(nn.Module):
    """Module paths longer than the summary's name column (48 characters)."""

    def __init__(self) -> None:
        super().__init__()
        self.feature_extractor_with_a_long_name = nn.Sequential()
        self.feature_extractor_with_a_long_name.add_module("first_convolution_of_the_stem", nn.Conv2d(3, 8, 3))
        self.feature_extractor_with_a_long_name.add_module("act", nn.ReLU())
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.feature_extractor_with_a_long_name(x))


def test_summary_wraps_long_module_names_instead_of_cutting_them():
    from lightning_oto.subnet.summary import NAME_WIDTH, WRAP_INDENT, wrap_name

    oto = OTO(_LongNames(), torch.randn(1, 3, 8, 8))
    ids = oto.random_set_zero_groups(0.5, seed=0)
    table = oto.summary(ids).splitlines()
    name = "feature_extractor_with_a_long_name.first_convolution_of_the_stem"
    first = next(i for i, line in enumerate(table) if line.startswith("feature_extractor_with_a_long_name."))
    wrapped = wrap_name(name, NAME_WIDTH)
    assert len(wrapped) == 2 and table[first + 1] == wrapped[1]  # the rest of the name on the next line
    assert table[first][:NAME_WIDTH].rstrip() + table[first + 1][len(WRAP_INDENT):] == name
    assert "8 -> 4" in " ".join(table[first].split())
    assert not any(line.lstrip().startswith(("…", "...")) for line in table)


@pytest.mark.parametrize("name", ["a.b", "encoder.layer.11.attention.output.dense", "x" * 70, "blocks.0+blocks.1+blocks.2",
                                  "some_module_name_that_is_long.w"])
def test_wrap_name_keeps_every_character_within_the_width(name):
    from lightning_oto.subnet.summary import WRAP_INDENT, wrap_name

    lines = wrap_name(name, 16)
    assert all(len(line) <= 16 for line in lines)
    assert lines[0] + "".join(line[len(WRAP_INDENT):] for line in lines[1:]) == name
    assert all(line.startswith(WRAP_INDENT) for line in lines[1:])
    if "." in name and len(name) > 16 and len(name.split(".")[0]) < 16:
        assert lines[0].endswith(".")  # broken after a dot where one fits
    if len(name.split(".")[0]) > 16:
        assert len(lines[0]) == 16  # a part longer than a line is cut, nothing lost
