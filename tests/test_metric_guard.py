"""The accuracy guard (issue 18, item 4): a run that loses more than ``max_metric_drop`` of the monitored
validation metric says so once, and its report, ``result.json`` fields and sweep status say ``degraded``."""
from __future__ import annotations

import json
import warnings

import pytest
import torch

from lightning_oto import OTOCallback
from lightning_oto.lightning.metric_guard import MetricGuard, metric_kind
from lightning_oto.lightning.settings import OTOSettings
from lightning_oto.sweep import status
from test_lightning import LitTiny, data, trainer

warnings.filterwarnings("ignore")


class LitScripted(LitTiny):
    """Logs a scripted validation metric per epoch: what the guard sees, independent of training noise."""

    def __init__(self, values: list[float], name: str = "val_acc") -> None:
        super().__init__()
        self.values, self.name = values, name

    def validation_step(self, batch, batch_idx):
        self.log(self.name, torch.tensor(self.values[self.current_epoch]), batch_size=len(batch[0]))


def guard_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("OTO accuracy guard")]


def test_a_drop_is_said_once_and_the_report_says_degraded(tmp_path, capsys):
    cb = OTOCallback(mode="prune", target_group_sparsity=0.5, warmup_steps=8, projection_steps=8, verbose=0,
                     export_formats=("torch",), export_dir=tmp_path / "oto", plot_curves=False,
                     bn_recalibration_batches=0)
    tr = trainer(tmp_path, [cb], max_epochs=6, num_sanity_val_steps=0)
    tr.fit(LitScripted([0.90, 0.92, 0.80, 0.70, 0.71, 0.72]), data(), data(seed=1))
    lines = guard_lines(capsys.readouterr().out)
    assert len(lines) == 1, lines  # said once, though three validations are beyond the drop
    assert "val_acc went from 0.92" in lines[0] and "to 0.8 in the projection phase" in lines[0]
    rep = json.loads((tmp_path / "oto" / "oto_report.json").read_text())
    g = rep["metric_guard"]
    assert rep["degraded"] is True and g["degraded"] and g["dropped"]
    assert g["monitor"] == "val_acc" and g["drop_is"] == "absolute" and g["max_metric_drop"] == 0.05
    assert g["reference"]["value"] == pytest.approx(0.92) and g["reference"]["step"] == 8
    assert g["after_phase"]["projection"]["value"] == pytest.approx(0.80)
    assert g["after_phase"]["hybrid"]["value"] == pytest.approx(0.72)
    assert g["final"]["value"] == pytest.approx(0.72) and g["final_drop"] == pytest.approx(0.20, abs=1e-6)
    assert "DEGRADED" in (tmp_path / "oto" / "oto_summary.txt").read_text()
    row = {"valid": True, "num_zero_groups": rep["num_zero_groups"], "degraded": rep["degraded"]}
    assert status(row) == "degraded" and status(dict(row, degraded=False)) == "valid"


def test_no_drop_says_nothing_and_stays_valid(tmp_path, capsys):
    cb = OTOCallback(mode="prune", target_group_sparsity=0.5, warmup_steps=8, projection_steps=8, verbose=0,
                     export_formats=("torch",), export_dir=tmp_path / "oto", plot_curves=False,
                     bn_recalibration_batches=0)
    tr = trainer(tmp_path, [cb], max_epochs=5, num_sanity_val_steps=0)
    tr.fit(LitScripted([0.90, 0.92, 0.89, 0.90, 0.91]), data(), data(seed=1))
    assert guard_lines(capsys.readouterr().out) == []
    assert cb.report["degraded"] is False and cb.report["metric_guard"]["dropped"] is False
    assert cb.report["metric_guard"]["active"] is True
    speed = cb.report["speed"]  # measured by default: batch 1 and the training batch size (16)
    assert speed["device"] == "cpu" and set(speed["batches"]) == {"1", "16"}
    assert "speed-up, batch 16" in (tmp_path / "oto" / "oto_summary.txt").read_text()


def test_loss_is_relative_and_the_run_can_stop(tmp_path, capsys):
    """val_loss: 10% higher than the reference is a drop; stop_on_metric_drop ends the fit there."""
    cb = OTOCallback(mode="prune", target_group_sparsity=0.5, warmup_steps=8, projection_steps=8, verbose=0,
                     export_formats=("torch",), export_dir=tmp_path / "oto", plot_curves=False,
                     bn_recalibration_batches=0, stop_on_metric_drop=True)
    tr = trainer(tmp_path, [cb], max_epochs=6, num_sanity_val_steps=0)
    tr.fit(LitScripted([1.0, 0.5, 0.54, 0.6, 0.5, 0.5], name="val_loss"), data(), data(seed=1))
    lines = guard_lines(capsys.readouterr().out)
    assert len(lines) == 1 and "val_loss went from 0.5" in lines[0] and "(20.0%)" in lines[0]
    assert tr.current_epoch == 4  # stopped after the epoch-3 validation (0.54 was within 10%)
    g = cb.report["metric_guard"]
    assert g["drop_is"] == "relative" and g["first_drop"]["epoch"] == 3 and cb.report["degraded"]


def test_guard_rules_and_bad_settings():
    assert metric_kind("val_acc") == (True, True) and metric_kind("val/loss") == (False, False)
    g = MetricGuard(max_drop=0.02)
    assert g.pick({"train_loss": 1.0, "val_loss": 2.0, "val_acc": 0.5}) == "val_acc"
    assert g.observe(0.9, "warmup", True, 0, 5) is None
    assert g.observe(0.89, "projection", False, 1, 10) is None and not g.degraded
    assert g.observe(0.85, "hybrid", False, 2, 15) is not None and g.degraded
    assert g.observe(0.80, "hybrid", False, 3, 20) is None  # said once
    for bad in (0, -0.1, float("nan"), "5%", True):
        with pytest.raises(ValueError, match="max_metric_drop"):
            OTOSettings(max_metric_drop=bad)
    with pytest.raises(ValueError, match="monitor"):
        OTOSettings(monitor="")
    with pytest.raises(ValueError, match="stop_on_metric_drop"):
        OTOSettings(stop_on_metric_drop="yes")
