"""OTOMixin reports what OTOCallback reports (issue 18, items 4-5): the accuracy guard (said once, ``degraded``,
optional stop, kept across checkpoints) and the measured speed-up next to the FLOP reduction."""
from __future__ import annotations

import warnings

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_oto import OTOCallback, OTOMixin
from lightning_oto.lightning.mixin import GUARD_CHECKPOINT_KEY
from test_lightning import TinyNet, data, trainer

warnings.filterwarnings("ignore")


class UserHooks(L.LightningModule):
    """A user's own module with its own ``on_validation_end``: the mixin must not swallow it."""

    validation_ends = 0

    def on_validation_end(self) -> None:
        self.validation_ends += 1


class ScriptedMixin(OTOMixin, UserHooks):
    """Logs a scripted validation metric per epoch (what the guard sees, independent of training noise).
    4 batches per epoch: warm-up ends with epoch 0, whose validation is the dense reference."""

    def __init__(self, values: list[float], name: str = "val_acc", lr: float = 0.05,
                 target_group_sparsity: float = 0.5, warmup_steps: int = 4, projection_steps: int = 4,
                 monitor: str | None = None, max_metric_drop: float | None = None,
                 stop_on_metric_drop: bool = False, measure_speed: bool = False) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = TinyNet()
        self.example_input_array = torch.randn(2, 1, 8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        value = self.hparams["values"][self.current_epoch]
        self.log(self.hparams["name"], torch.tensor(value), batch_size=len(batch[0]))


def guard_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("OTO accuracy guard")]


def fit(model: ScriptedMixin, root, callbacks=(), ckpt_path=None, **kw) -> L.Trainer:
    torch.manual_seed(0)
    tr = trainer(root, list(callbacks), num_sanity_val_steps=0, **kw)
    tr.fit(model, data(), data(seed=1), ckpt_path=ckpt_path)
    return tr


def test_a_collapse_is_said_once_and_the_report_says_degraded(tmp_path, capsys):
    model = ScriptedMixin([0.90, 0.70, 0.60, 0.65])
    fit(model, tmp_path, max_epochs=4)
    lines = guard_lines(capsys.readouterr().out)
    assert len(lines) == 1, lines  # three validations are beyond the drop, one line
    assert "val_acc went from 0.9 " in lines[0] and "to 0.7 in the hybrid phase (epoch 1, step 8)" in lines[0]
    assert model.validation_ends == 4  # the user's own hook ran at every validation
    rep = model.compression_report
    g = rep["metric_guard"]
    assert rep["degraded"] is True and g["dropped"] and g["monitor"] == "val_acc" and g["drop_is"] == "absolute"
    assert g["reference"]["value"] == pytest.approx(0.90) and g["reference"]["step"] == 4
    assert g["final"]["value"] == pytest.approx(0.65) and g["final_drop"] == pytest.approx(0.25, abs=1e-6)
    assert rep["speed"] is None  # measure_speed=False in this module's hparams


def test_a_healthy_run_says_nothing_and_is_not_degraded(tmp_path, capsys):
    model = ScriptedMixin([0.90, 0.89, 0.91, 0.90], name="val_loss", max_metric_drop=0.2)
    fit(model, tmp_path, max_epochs=4)
    assert guard_lines(capsys.readouterr().out) == []
    g = model.oto_compression_report(speed=False)["metric_guard"]
    assert g["active"] and g["dropped"] is False and g["degraded"] is False and g["drop_is"] == "relative"
    assert g["max_metric_drop"] == 0.2 and model.oto_compression_report(speed=False)["degraded"] is False


def test_stop_on_metric_drop_stops_the_trainer(tmp_path, capsys):
    model = ScriptedMixin([0.90, 0.88, 0.70, 0.70, 0.70, 0.70], stop_on_metric_drop=True)
    tr = fit(model, tmp_path, max_epochs=6)
    assert len(guard_lines(capsys.readouterr().out)) == 1
    assert tr.should_stop and tr.current_epoch == 3  # stopped after the epoch-2 validation, of 6 planned
    assert model.compression_report["metric_guard"]["first_drop"]["epoch"] == 2


def test_the_guard_state_survives_a_checkpoint(tmp_path, capsys):
    ck = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    values = [0.90, 0.70, 0.66, 0.64]
    fit(ScriptedMixin(values), tmp_path / "a", [ck], max_epochs=2)
    assert len(guard_lines(capsys.readouterr().out)) == 1
    last = tmp_path / "ckpt" / "last.ckpt"
    saved = torch.load(last, weights_only=False)[GUARD_CHECKPOINT_KEY]
    assert saved["reference"]["value"] == pytest.approx(0.90) and saved["first_drop"]["epoch"] == 1

    loaded = ScriptedMixin.load_from_checkpoint(last)
    assert loaded.oto_guard.state() == saved and loaded.oto_guard.degraded

    resumed = ScriptedMixin(values)  # fresh module: the reference must come from the checkpoint
    fit(resumed, tmp_path / "b", max_epochs=4, ckpt_path=last)
    assert guard_lines(capsys.readouterr().out) == []  # the drop was said before the interruption
    g = resumed.oto_compression_report(speed=False)["metric_guard"]
    assert g["reference"] == saved["reference"] and g["first_drop"] == saved["first_drop"]
    assert g["final"]["value"] == pytest.approx(0.64) and g["final"]["epoch"] == 3 and g["degraded"]


def test_with_the_callback_one_guard_and_one_announcement(tmp_path, capsys):
    model = ScriptedMixin([0.90, 0.70, 0.60])
    cb = OTOCallback(mode="prune", verbose=0, export_formats=(), export_dir=tmp_path / "e", plot_curves=False,
                     bn_recalibration_batches=0, measure_speed=False)
    fit(model, tmp_path, [cb], max_epochs=3)
    assert len(guard_lines(capsys.readouterr().out)) == 1
    rep = model.oto_compression_report(speed=False)
    assert rep["degraded"] is True and rep["metric_guard"] == cb.report["metric_guard"]


def test_the_report_has_the_measured_speed_next_to_the_flops(tmp_path):
    model = ScriptedMixin([0.9, 0.9], measure_speed=True)
    fit(model, tmp_path, max_epochs=2)
    rep = model.compression_report  # measure_speed=True: timed at batch 1 and the training batch size (16)
    speed = rep["speed"]
    assert speed["device"] == "cpu" and set(speed["batches"]) == {"1", "16"}
    assert speed["flop_reduction"] == pytest.approx(rep["flops_full"] / rep["flops_sub"]) and speed["flop_reduction"] > 1
    for row in speed["batches"].values():
        assert row["full_ms"] > 0 and row["sub_ms"] > 0 and row["speedup"] > 0
        assert row["speedup"] == pytest.approx(row["full_ms"] / row["sub_ms"])
        assert row["of_flop_reduction"] == pytest.approx(row["speedup"] / speed["flop_reduction"])
    assert model.oto_compression_report(speed=False)["speed"] is None
    with pytest.raises(ValueError, match="speed must be True, False or None"):
        model.oto_compression_report(speed=(1, 4))


def test_bad_guard_settings_are_refused_from_hparams():
    """The mixin reads the callback's settings through hparams, validated the same way."""
    for hparams, message in (({"max_metric_drop": -1.0}, "max_metric_drop"), ({"monitor": ""}, "monitor"),
                             ({"stop_on_metric_drop": "yes"}, "stop_on_metric_drop"),
                             ({"measure_speed": 1}, "measure_speed")):
        with pytest.raises(ValueError, match=message):
            ScriptedMixin([0.9], **hparams).oto_optimizer()


def test_the_docs_list_the_settings_the_mixin_reads():
    from pathlib import Path

    from lightning_oto.lightning.mixin import HPARAM_SETTINGS

    doc = (Path(__file__).resolve().parents[1] / "docs" / "callback.md").read_text()
    section = doc.split("## `OTOMixin`", 1)[1].split("\n## ", 1)[0]
    listed = section.split("It reads exactly these", 1)[1].split("\n\n", 2)[1]
    names = [n.strip().strip("`.") for n in listed.replace("\n", " ").split(",")]
    assert names == list(HPARAM_SETTINGS)
    for key in ("metric_guard", "degraded", "speed"):
        assert f"| `{key}` |" in section
