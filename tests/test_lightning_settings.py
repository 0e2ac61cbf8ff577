"""OTOSettings (validated once, epochs -> steps, fitting the run) and optim.factory (one mode/optimizer rule)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_oto import OTO, OTOCallback, OTOSettings
from lightning_oto.optim import DHSPG, H2SPG, HESSO
from lightning_oto.optim.factory import build_optimizer, check_target_sparsity, resolve_optimizer


def _net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1),
                         nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))


# ---------------------------------------------------------------------------------------------- factory
def test_one_rule_for_modes_and_optimizers():
    assert resolve_optimizer("prune") == "dhspg" and resolve_optimizer("erase") == "h2spg"
    assert resolve_optimizer("prune", "HESSO") == "hesso"
    for name in ("dhspg", "hesso"):  # no hierarchy check: erase mode only as the Table 4 ablation
        with pytest.raises(ValueError, match="does not fit mode 'erase'"):
            resolve_optimizer("erase", name)
        assert resolve_optimizer("erase", name, erase_ablation=True) == name
    with pytest.raises(ValueError, match="does not fit mode 'prune'"):
        resolve_optimizer("prune", "h2spg", erase_ablation=True)
    with pytest.raises(ValueError, match="mode must be"):
        resolve_optimizer("shrink")
    with pytest.raises(ValueError, match="optimizer must be one of"):
        resolve_optimizer("prune", "adam")


@pytest.mark.parametrize("bad", [1.0, -0.1, float("nan"), True, "0.5", None])
def test_target_sparsity_is_checked_in_one_place(bad):
    with pytest.raises(ValueError, match=r"target_group_sparsity must be a number in \[0, 1\)"):
        check_target_sparsity(bad)


def test_build_optimizer_for_each_mode():
    net, x = _net(), torch.randn(2, 1, 8, 8)
    prune = OTO(net, x, mode="prune")
    opt = build_optimizer(None, net.named_parameters(), prune.groups, mode="prune", lr=0.05, momentum=None,
                          target_group_sparsity=0.25, warmup_steps=1, projection_steps=1)
    assert type(opt) is DHSPG and opt.param_groups[0]["momentum"] == 0.9  # None: the optimizer's default
    assert type(build_optimizer("hesso", net.named_parameters(), prune.groups, mode="prune")) is HESSO
    erase = OTO(net, x, mode="erase")
    h2 = build_optimizer(None, net.named_parameters(), erase.groups, mode="erase",
                         hierarchy_check=erase.hierarchy_check, variant="adam", nesterov=False)
    assert type(h2) is H2SPG and h2.hierarchy_check == erase.hierarchy_check
    with pytest.raises(ValueError, match="target_group_sparsity"):
        build_optimizer(None, net.named_parameters(), prune.groups, mode="prune", target_group_sparsity=1.5)


# ---------------------------------------------------------------------------------------------- settings
def test_settings_validate_once_with_clear_messages():
    s = OTOSettings(mode="erase", network_attr="net", swap_subnet=True)
    assert s.optimizer == "h2spg" and s.export_formats == ("torch", "onnx")
    bad = [({"warmup_steps": 3, "warmup_epochs": 1}, "not both"), ({"warmup_steps": 1.5}, "integer"),
           ({"projection_epochs": -1}, ">= 0"), ({"pruning_periods": 0}, "pruning_periods"),
           ({"lr": 0}, "lr must be > 0"), ({"export_formats": ("tflite",)}, "export_formats"),
           ({"bn_recalibration_batches": -1}, "bn_recalibration_batches"), ({"verbose": 3}, "verbose"),
           ({"round_to": 0}, "round_to"), ({"mode": "erase", "swap_subnet": True}, "needs network_attr"),
           ({"network_attr": ""}, "network_attr")]
    for kwargs, message in bad:
        with pytest.raises(ValueError, match=message):
            OTOSettings(**kwargs)
    with pytest.raises(TypeError, match="unknown OTO setting.*warmup_step'"):
        OTOSettings.from_kwargs(warmup_step=3)


def test_oto_keywords_are_forwarded_only_when_set():
    assert OTOSettings().oto_kwargs() == {}
    s = OTOSettings(ignored_layers=["fc"], round_to=8, max_group_sparsity={"conv": 0.5}, dynamic_shapes="auto")
    assert s.oto_kwargs() == {"ignored_layers": ["fc"], "round_to": 8, "max_group_sparsity": {"conv": 0.5},
                              "dynamic_shapes": "auto"}


def test_callback_takes_settings_or_the_same_keywords():
    s = OTOSettings(mode="erase", target_group_sparsity=0.3, bn_recalibration_batches=0)
    assert OTOCallback(settings=s).settings is s
    kw = OTOCallback(mode="erase", target_group_sparsity=0.3, bn_recalibration_batches=0).settings
    assert kw.to_dict() == s.to_dict()
    with pytest.raises(TypeError, match="not both"):
        OTOCallback(settings=s, mode="prune")


def test_phase_lengths_default_epochs_and_fitting_the_run():
    assert OTOSettings().phase_lengths(None, 100).warmup_steps == 20  # 20% / 30% of the planned steps
    assert OTOSettings().phase_lengths(None, 100).projection_steps == 30
    plan = OTOSettings(warmup_epochs=1, projection_epochs=0.5).phase_lengths(10, 100)
    assert (plan.warmup_steps, plan.projection_steps, plan.note) == (10, 5, None)
    # demonet's 2 + 2 epochs in a 1-epoch run: scaled (ratio kept) to half the run, with a note saying so
    short = OTOSettings(warmup_epochs=2, projection_epochs=2).phase_lengths(19, 19)
    assert short.warmup_steps + short.projection_steps <= 10 and short.warmup_steps == short.projection_steps
    assert short.fits and "scaled to" in short.note
    # lengths given in steps are the user's: kept, and the note says the search will not finish
    fixed = OTOSettings(warmup_steps=8, projection_steps=6).phase_lengths(None, 10)
    assert (fixed.warmup_steps, fixed.projection_steps) == (8, 6) and not fixed.fits and "not finish" in fixed.note
    with pytest.raises(ValueError, match="warmup_epochs needs a sized"):
        OTOSettings(warmup_epochs=1, projection_steps=2).phase_lengths(float("inf"), float("inf"))
    with pytest.raises(ValueError, match="known number of training steps"):
        OTOSettings().phase_lengths(None, float("nan"))
