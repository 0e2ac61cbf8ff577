"""After fit: reloadable checkpoints of the swapped sub-network, BatchNorm recalibration and the metrics in the
report, the optimizer's counters, a quiet terminal, and the example input taken from the training data."""
from __future__ import annotations

import json
import logging
import math
import warnings

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from lightning_oto import OTOCallback, load_checkpoint
from lightning_oto.lightning.checkpointing import CHECKPOINT_KEY
from lightning_oto.optim import DHSPG
from test_lightning import LitTiny, MixinNet, data, outputs_equal, trainer

warnings.filterwarnings("ignore", category=FutureWarning)


class LitTinyEval(LitTiny):
    """LitTiny with a validation step (for the metrics recorded in the report)."""

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val_loss", torch.nn.functional.cross_entropy(logits, y), batch_size=len(x))
        self.log("val_acc", (logits.argmax(1) == y).float().mean(), batch_size=len(x))


def _swapped(tmp_path, mode: str, network_attr: str | None, model=None, **kw):
    torch.manual_seed(0)
    model = model if model is not None else LitTiny(blocks=3)
    cb = OTOCallback(mode=mode, target_group_sparsity=0.5, warmup_steps=2, projection_steps=2, export_formats=(),
                     export_dir=tmp_path / "e", swap_subnet=True, network_attr=network_attr, verbose=0, **kw)
    tr = trainer(tmp_path, [cb], max_epochs=2)
    tr.fit(model, data())
    ckpt = tmp_path / f"{mode}.ckpt"
    tr.save_checkpoint(ckpt)
    return model.eval(), cb, ckpt


def _n_params(m) -> int:
    return sum(p.numel() for p in m.parameters())


# ---------------------------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("mode,network_attr", [("prune", "net"), ("prune", None), ("erase", "net")])
def test_swapped_checkpoint_reloads_with_load_checkpoint(tmp_path, mode, network_attr):
    model, cb, ckpt = _swapped(tmp_path, mode, network_attr)
    assert _n_params(model) < _n_params(cb.full_network)
    saved = torch.load(ckpt, weights_only=False)
    assert saved[CHECKPOINT_KEY]["mode"] == mode and saved["optimizer_states"] == []
    with pytest.raises(RuntimeError, match="size mismatch|Missing key"):  # issue 14: a plain reload fails
        LitTiny.load_from_checkpoint(ckpt, blocks=3)
    loaded = load_checkpoint(LitTiny, ckpt, blocks=3)
    assert type(loaded) is LitTiny and _n_params(loaded) == _n_params(model) == cb.report["params_sub"]
    outputs_equal(model, loaded.eval(), torch.randn(5, 1, 8, 8), atol=0.0)


def test_swapped_checkpoint_resumes_with_ckpt_path(tmp_path):
    model, cb, ckpt = _swapped(tmp_path, "prune", "net")
    resumed_model = LitTiny(blocks=3)  # a fresh full-size module: the checkpoint rebuilds the sub-network
    resumed = OTOCallback(mode="prune", warmup_steps=2, projection_steps=2, export_formats=(), verbose=0,
                          network_attr="net", export_dir=tmp_path / "e2")
    tr = trainer(tmp_path, [resumed], max_epochs=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tr.fit(resumed_model, data(), ckpt_path=ckpt)
    assert tr.global_step == 12 and resumed.optimizer is None  # one more epoch, no new search
    assert _n_params(resumed_model) == _n_params(model)
    assert type(tr.optimizers[0]) is torch.optim.SGD  # the user's optimizer fine-tunes the sub-network
    after = resumed_model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if before[k].is_floating_point())
    # a checkpoint of the fine-tuned sub-network reloads as well
    tr.save_checkpoint(tmp_path / "again.ckpt")
    again = load_checkpoint(LitTiny, tmp_path / "again.ckpt", blocks=3)
    outputs_equal(resumed_model.eval(), again.eval(), torch.randn(4, 1, 8, 8), atol=0.0)


def test_mixin_checkpoint_reloads_with_load_from_checkpoint_and_resumes(tmp_path):
    torch.manual_seed(0)
    model = MixinNet(warmup_steps=2, projection_steps=2)
    tr = trainer(tmp_path, [], max_epochs=2)
    tr.fit(model, data())
    full = model.swap_in_compressed()
    assert _n_params(model) < _n_params(full)
    tr.save_checkpoint(tmp_path / "m.ckpt", weights_only=True)  # the mixin's own hook carries the plan
    loaded = MixinNet.load_from_checkpoint(tmp_path / "m.ckpt")
    x = torch.randn(4, 1, 8, 8)
    outputs_equal(model.eval(), loaded.eval(), x, atol=0.0)
    assert load_checkpoint(MixinNet, tmp_path / "m.ckpt")(x).shape == (4, 4)
    tr.save_checkpoint(tmp_path / "full.ckpt")  # resumable: without the search's optimizer state
    assert torch.load(tmp_path / "full.ckpt", weights_only=False)["optimizer_states"] == []
    tr2 = trainer(tmp_path, [], max_epochs=3)
    fresh = MixinNet(warmup_steps=2, projection_steps=2)
    tr2.fit(fresh, data(), ckpt_path=tmp_path / "full.ckpt")
    assert tr2.global_step == 12 and _n_params(fresh) == _n_params(model)
    assert tr2.optimizers[0].num_prunable == 0  # the sub-network trains on, no new search


# ---------------------------------------------------------------------------------------------- recalibration
def test_batchnorm_recalibration_and_metrics_in_the_report(tmp_path):
    torch.manual_seed(0)
    model = LitTinyEval()
    cb = OTOCallback(mode="prune", target_group_sparsity=0.5, warmup_steps=3, projection_steps=3, export_formats=(),
                     export_dir=tmp_path / "e", swap_subnet=True, network_attr="net", verbose=0,
                     bn_recalibration_batches=2)
    tr = trainer(tmp_path, [cb], max_epochs=2, limit_val_batches=1)
    tr.fit(model, data(), data(32, seed=4))
    rep = cb.report
    assert rep["bn_recalibration_batches_used"] == 2
    assert set(rep["metrics"]["val_before_recalibration"]) == {"val_loss", "val_acc"}
    # recalibrated on the first 2 training batches: the full network's BN holds their exact statistics
    xs = torch.cat([b[0] for _, b in zip(range(2), data())])
    with torch.no_grad():
        z = cb.full_network.stem[0](xs)
    assert torch.allclose(cb.full_network.stem[1].running_mean, z.mean((0, 2, 3)), atol=1e-5)
    assert rep["verification_max_abs_error"] <= 1e-4  # verified after recalibration
    tr.validate(model, data(32, seed=4), verbose=False)
    tr.test(model, data(32, seed=5), verbose=False)
    saved = json.loads((tmp_path / "e" / "oto_report.json").read_text())
    assert set(saved["metrics"]) == {"val_before_recalibration", "val", "test"}
    assert 0.0 <= saved["metrics"]["test"]["test_acc"] <= 1.0
    assert "after BN recalibration" in (tmp_path / "e" / "oto_summary.txt").read_text()


def test_recalibration_can_be_switched_off(tmp_path):
    torch.manual_seed(0)
    model = LitTiny()
    cb = OTOCallback(warmup_steps=2, projection_steps=2, export_formats=(), export_dir=tmp_path / "e", verbose=0,
                     bn_recalibration_batches=0)
    before = {}

    class Spy(L.Callback):
        def on_train_end(self, trainer, pl_module):
            before.update({k: v.clone() for k, v in pl_module.state_dict().items() if "running" in k})

    trainer(tmp_path, [Spy(), cb], max_epochs=1).fit(model, data())
    assert cb.report["bn_recalibration_batches_used"] == 0
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


# ---------------------------------------------------------------------------------------------- counters, terminal
def test_half_space_counters_are_logged_and_reported(tmp_path, monkeypatch):
    monkeypatch.setattr(DHSPG, "zeroed_by_half_space", 7, raising=False)
    monkeypatch.setattr(DHSPG, "forced_at_deadline", 2, raising=False)
    cb = OTOCallback(warmup_steps=1, projection_steps=2, export_formats=(), export_dir=tmp_path / "e", verbose=0)
    tr = trainer(tmp_path, [cb], max_epochs=1)
    tr.fit(LitTiny(), data())
    assert float(tr.callback_metrics["oto/zeroed_by_half_space"]) == 7
    assert (cb.report["zeroed_by_half_space"], cb.report["forced_at_deadline"]) == (7, 2)


def test_progress_bar_only_when_asked_and_verbose_levels(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    quiet = OTOCallback(warmup_steps=1, projection_steps=1, export_formats=(), export_dir=tmp_path / "q", verbose=0)
    tr = trainer(tmp_path, [quiet], max_epochs=1, logger=CSVLogger(str(tmp_path), name="csv"))
    tr.fit(LitTiny(), data())
    assert "oto/phase" in tr.logged_metrics and not any(k.startswith("oto/") for k in tr.progress_bar_metrics)
    assert not [r for r in caplog.records if "[lightning_oto]" in r.getMessage()]
    caplog.clear()
    shown = OTOCallback(warmup_steps=1, projection_steps=1, export_formats=(), export_dir=tmp_path / "s", verbose=1,
                        progress_bar_metrics=True)
    tr = trainer(tmp_path, [shown], max_epochs=1)
    tr.fit(LitTiny(), data())
    assert {"oto/phase", "oto/group_sparsity"} <= set(tr.progress_bar_metrics)
    said = [r.getMessage() for r in caplog.records if "[lightning_oto]" in r.getMessage()]
    assert len(said) == 2 and "OTO compression summary" in said[1]  # the start line and the summary


def test_example_input_defaults_to_a_training_batch(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    cb = OTOCallback(warmup_steps=1, projection_steps=1, export_dir=tmp_path / "e", export_formats=("torch",))
    tr = trainer(tmp_path, [cb], max_epochs=1)
    tr.fit(LitTiny(example=False), data())
    assert [tuple(t.shape) for t in cb.oto.example_inputs] == [(2, 1, 8, 8)]
    said = [r.getMessage() for r in caplog.records if "no example_input_array" in r.getMessage()]
    assert len(said) == 1 and "(2, 1, 8, 8)" in said[0]
    assert not math.isnan(cb.report["verification_max_abs_error"])


def test_a_run_too_short_for_its_epochs_is_scaled_and_compresses(tmp_path):
    cb = OTOCallback(warmup_epochs=2, projection_epochs=2, export_formats=(), export_dir=tmp_path / "e", verbose=0)
    with pytest.warns(UserWarning, match="scaled to"):
        trainer(tmp_path, [cb], max_epochs=1).fit(LitTiny(), data())
    rep = cb.report
    assert rep["search_finished"] and rep["phase_reached"] == "hybrid" and not rep["removed_nothing"]
    assert rep["params_sub"] < rep["params_full"]


def test_a_run_that_removes_nothing_says_so(tmp_path):
    cb = OTOCallback(warmup_steps=50, projection_steps=10, export_formats=(), export_dir=tmp_path / "e", verbose=0)
    trainer(tmp_path, [cb], max_epochs=1).fit(LitTiny(), data())
    rep = cb.report
    assert rep["removed_nothing"] and not rep["search_finished"] and rep["phase_reached"] == "warmup"
    assert "nothing was removed" in (tmp_path / "e" / "oto_summary.txt").read_text()
