"""Hydra: every experiment composes and runs tiny; a 3-point multirun sweep aggregates into table + plot."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf, open_dict

EXPERIMENTS = ["demonet", "stackedunets", "superresnet", "darts", "regnet"]
TINY = {
    "demonet": ["++model.kwargs.width_mult=0.25", "data.image_size=16"],
    "stackedunets": ["++model.kwargs.width_mult=0.25", "data.image_size=16"],
    "superresnet": ["++model.kwargs.width_mult=0.25", "data.image_size=16"],
    # 2 intermediate nodes per cell (5 mixed edges, not 14): the trace of 2289 nodes took most of the run
    "darts": ["++model.kwargs.layers=2", "++model.kwargs.steps=2", "++model.kwargs.C=4", "++model.kwargs.stem_stride=1",
              "data.image_size=16"],
    "regnet": ["model.name=regnet_200m", "++model.kwargs.width_mult=0.25", "data.image_size=16"],
}
FAST = ["data=synthetic", "+data.num_samples=96", "data.batch_size=16", "trainer.max_epochs=2",
        "oto.warmup_epochs=null", "oto.projection_epochs=null", "+oto.warmup_steps=3", "+oto.projection_steps=3",
        "oto.export_formats=[]", "callbacks=none", "threads=1"]


def _compose(overrides):
    with initialize_config_module(config_module="lightning_oto.conf", version_base="1.3"):
        return compose(config_name="config", overrides=overrides, return_hydra_config=True)


@pytest.mark.parametrize("name", EXPERIMENTS + ["compofa"])
def test_experiment_configs_compose(name):
    cfg = _compose([f"experiment={name}"])
    assert cfg.experiment_name == name
    if name == "compofa":
        assert cfg.task == "compofa"
    else:
        assert cfg.oto.mode in ("prune", "erase") and 0 <= cfg.oto.target_group_sparsity < 1
        assert cfg.trainer._target_.endswith("Trainer")


def test_launcher_and_trainer_configs_compose():
    cfg = _compose(["hydra/launcher=slurm", "trainer=ddp", "trainer.num_nodes=4"])
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
    assert cfg.hydra.launcher.gpus_per_node == 1
    assert cfg.trainer.strategy == "ddp" and cfg.trainer.num_nodes == 4
    sim = _compose(["trainer=ddp_sim"])
    assert sim.trainer.strategy == "ddp" and sim.trainer.devices == 2 and sim.trainer.accelerator == "cpu"
    for name, accelerator in (("fsdp_sim", "cpu"), ("fsdp", "gpu")):
        fsdp = _compose([f"trainer={name}"]).trainer
        assert fsdp.strategy._target_.endswith("ModelParallelStrategy") and fsdp.accelerator == accelerator
        assert fsdp.strategy.tensor_parallel_size == 1 and fsdp.strategy.data_parallel_size == fsdp.devices


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_runs_tiny(name, tmp_path):
    from lightning_oto.train import run

    cfg = _compose([f"experiment={name}", *FAST, *TINY[name]])
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)
    OmegaConf.resolve(cfg.trainer)
    result = run(cfg)
    saved = json.loads((tmp_path / "result.json").read_text())
    assert saved["model"] == cfg.model.name and saved["valid"] and saved["baseline"] is False
    assert saved["verification_max_abs_error"] <= 1e-3
    assert saved["params_sub"] <= saved["params_full"]
    assert 0.0 <= result["test_acc"] <= 1.0 and 0.0 <= result["val_acc"] <= 1.0
    assert saved["phase_reached"] == "hybrid" and saved["search_finished"] is True
    # one curves PNG per run, and every path result.json lists exists
    assert [p.name for p in tmp_path.rglob("*.png")] == ["training_curves.png"]
    assert saved["curves_png"] == saved["files"]["curves"]
    assert all(Path(p).exists() for p in saved["files"].values()), saved["files"]
    report = json.loads(Path(saved["files"]["report"]).read_text())
    assert report["metrics"]["test"]["test_acc"] == pytest.approx(result["test_acc"])


def test_multirun_sweep_trains_the_baseline_once_and_aggregates(tmp_path):
    """3 targets with baseline=true: one dense training for the whole sweep, one baseline row in the table."""
    sweep_dir = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "lightning_oto.train", "-m", "experiment=demonet", *FAST, *TINY["demonet"],
           "logger=none", "run_test=true", "baseline=true", "oto.target_group_sparsity=0.2,0.5,0.8",
           f"hydra.sweep.dir={sweep_dir}"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert log.count("dense baseline: training into") == 1 and log.count("dense baseline: reusing") == 2
    dense = [p for p in sweep_dir.rglob("result.json") if json.loads(p.read_text())["baseline"]]
    assert len(dense) == 1 and dense[0].parent.parent == sweep_dir / "baseline"
    results = sorted(p for p in sweep_dir.rglob("result.json") if p not in dense)
    assert len(results) == 3
    dense_acc = json.loads(dense[0].read_text())["test_acc"]
    for p in results:
        r = json.loads(p.read_text())
        assert r["baseline_result"] == str(dense[0]) and r["baseline_test_acc"] == dense_acc
    from lightning_oto.sweep import main as aggregate

    aggregate([str(sweep_dir)])  # ``python -m lightning_oto.sweep <dir>``, in this process (no second interpreter)
    rows = (sweep_dir / "sweep.csv").read_text().strip().splitlines()
    assert len(rows) == 5  # header + the baseline + 3 runs
    sparsities = sorted(float(r.split(",")[0]) for r in rows[1:])
    assert sparsities == [0.0, 0.2, 0.5, 0.8]
    table = (sweep_dir / "sweep.md").read_text()
    assert table.count("\n") == 6 and table.count("dense baseline") == 1
    png = sweep_dir / "pareto.png"
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    params = {float(json.loads(p.read_text())["target_group_sparsity"]): json.loads(p.read_text())["params_sub"]
              for p in results}
    assert params[0.8] <= params[0.2]


def test_dense_fingerprint_ignores_oto_and_paths_only():
    """Jobs that vary oto.* share one baseline; a different seed or model gets its own."""
    from lightning_oto.train import dense_fingerprint

    base = dense_fingerprint(_compose(["experiment=demonet"]))
    assert dense_fingerprint(_compose(["experiment=demonet", "oto.target_group_sparsity=0.8"])) == base
    assert dense_fingerprint(_compose(["experiment=demonet", "paths.output_dir=elsewhere"])) == base
    assert dense_fingerprint(_compose(["experiment=demonet", "seed=1"])) != base
    assert dense_fingerprint(_compose(["experiment=regnet"])) != base


def test_compofa_experiment_runs_tiny(tmp_path, monkeypatch):
    from lightning_oto.compofa import training
    from lightning_oto.train import run

    phase_trainers = []

    def spy(epochs, max_steps=-1, **kw):  # every phase's Trainer gets the Hydra trainer config
        phase_trainers.append(kw)
        return make_trainer(epochs, max_steps, **kw)

    make_trainer = training.make_trainer
    monkeypatch.setattr(training, "make_trainer", spy)

    cfg = _compose(["experiment=compofa", "compofa.dataset=synthetic", "++compofa.num_samples=192",
                    "compofa.input_size=16", "compofa.teacher_epochs=1", "compofa.compound_warmup_epochs=0",
                    "compofa.compound_epochs=1", "compofa.n_sample=2", "compofa.num_latency_targets=1",
                    "++compofa.population_size=6", "++compofa.num_iterations=2", "++compofa.latency_runs=2",
                    "compofa.export_formats=[]"])  # export: tests/test_compofa.py
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)
    result = run(cfg)
    assert result["num_architectures"] == 243
    assert result["pareto"], "at least one latency target gives a sub-network"
    assert (tmp_path / "compofa" / "summary.json").exists()
    assert json.loads((tmp_path / "result.json").read_text())["experiment"] == "compofa"
    assert len(phase_trainers) == 2 and all(kw["accelerator"] == cfg.trainer.accelerator for kw in phase_trainers)


def test_data_configs_set_the_input_the_model_is_built_for(tmp_path):
    from lightning_oto.train import _data_and_module

    cfg = _compose(["experiment=demonet", "data=cifar10"])
    assert (cfg.data.in_channels, cfg.data.image_size) == (3, 32)
    _, module = _data_and_module(cfg)  # no CIFAR files needed to build the model
    assert tuple(module.example_input_array.shape) == (2, 3, 32, 32)
    assert module.net(module.example_input_array).shape == (2, 10)
    assert (_compose(["experiment=demonet"]).data.in_channels, _compose([]).data.image_size) == (1, 28)


def test_baseline_flag_runs_the_dense_model_alongside(tmp_path):
    from lightning_oto.train import run

    cfg = _compose(["experiment=demonet", *FAST, *TINY["demonet"], "trainer.max_epochs=1", "baseline=true"])
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)
    result = run(cfg)
    dense = json.loads((tmp_path / "baseline" / "result.json").read_text())
    assert dense["baseline"] is True and dense["mode"] is None and dense["target_group_sparsity"] == 0.0
    assert dense["params_sub"] == dense["params_full"] == result["params_full"]
    assert result["baseline"] is False and result["baseline_test_acc"] == dense["test_acc"]
    assert result["baseline_result"] == str(tmp_path / "baseline" / "result.json")


def test_one_epoch_demonet_compresses_or_says_it_did_not(tmp_path):
    """experiment=demonet trainer.max_epochs=1: its 2 + 2 epochs of search are scaled into the one epoch."""
    from lightning_oto.train import run

    cfg = _compose(["experiment=demonet", "data=synthetic", "+data.num_samples=96", "data.batch_size=16",
                    "oto.export_formats=[]", "callbacks=none", "threads=1", "trainer.max_epochs=1",
                    *TINY["demonet"]])
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)
    result = run(cfg)
    summary = (tmp_path / "oto" / "oto_summary.txt").read_text()
    if result["removed_nothing"]:
        assert "nothing was removed" in summary
    else:
        assert result["params_sub"] < result["params_full"] and result["search_finished"]
    assert result["phase_reached"] in ("warmup", "projection", "hybrid")


def test_a_bad_value_prints_its_reason_alone(tmp_path):
    """No traceback before the one-line reason; exit status 2."""
    cmd = [sys.executable, "-m", "lightning_oto.train", "data=synthetic", "oto.target_group_sparsity=1.5",
           f"hydra.run.dir={tmp_path}"]
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**env, "PYTHONWARNINGS": "ignore"}, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr + proc.stdout
    assert proc.stderr.strip().splitlines() == [
        "lightning_oto.train: invalid configuration: target_group_sparsity must be a number in [0, 1), got 1.5."]


def test_a_bad_oto_value_is_refused_before_lightning_is_imported(tmp_path):
    """The oto settings are checked first: the user waits for torch, not for Lightning, to read the reason."""
    script = f"""
import sys
from hydra import compose, initialize_config_module
from lightning_oto.errors import ConfigError
from lightning_oto.train import run
with initialize_config_module(config_module="lightning_oto.conf", version_base="1.3"):
    cfg = compose(config_name="config", overrides=["data=synthetic", "oto.budget.flops=1.5",
                                                   "paths.output_dir={tmp_path}"])
try:
    run(cfg)
except ConfigError as e:
    print("refused:", e)
print("lightning imported:", "lightning" in sys.modules)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith("refused: ") and "flops" in lines[0] and "1.5" in lines[0], lines
    assert lines[-1] == "lightning imported: False"


@pytest.mark.parametrize("strategy", ["fsdp", "lightning.pytorch.strategies.FSDPStrategy"])
def test_fsdp1_is_refused_by_name_pointing_to_fsdp2(tmp_path, strategy):
    """Lightning itself only says FSDP needs a GPU on CPU; the run names FSDP1 and the FSDP2 configs instead."""
    from lightning_oto.errors import ConfigError
    from lightning_oto.train import run

    cfg = _compose(["experiment=demonet", *FAST, *TINY["demonet"], "trainer.accelerator=cpu"])
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)
        cfg.trainer.strategy = strategy if strategy == "fsdp" else {"_target_": strategy}
    with pytest.raises(ConfigError, match=r"does not support FSDPStrategy \(FSDP1\).*trainer=fsdp_sim"):
        run(cfg)


def test_config_errors_keep_their_cause_and_bugs_stay_bugs(tmp_path, monkeypatch):
    """A bad setting is a ConfigError (HYDRA_FULL_ERROR=1 re-raises it for the traceback); an error once
    training runs is not turned into one."""
    import lightning as L

    from lightning_oto.errors import ConfigError
    from lightning_oto.train import exit_on_config_error, run

    cfg = _compose(["experiment=demonet", *FAST, *TINY["demonet"], "model.name=nope"])
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)
    with pytest.raises(ConfigError, match="unknown model 'nope'") as info:
        run(cfg)
    assert isinstance(info.value.__cause__, KeyError)  # the original, for HYDRA_FULL_ERROR=1
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    with pytest.raises(ConfigError):
        exit_on_config_error(info.value)
    monkeypatch.delenv("HYDRA_FULL_ERROR")
    with pytest.raises(SystemExit, match="2"):
        exit_on_config_error(info.value)

    with open_dict(cfg):  # found only once the network is traced, at fit start
        cfg.model.name = "demonet"
        cfg.oto.ignored_layers = ["no_such_layer"]
    with pytest.raises(ConfigError, match="ignored_layers: no module of the model is called 'no_such_layer'"):
        run(cfg)

    def broken_fit(*args, **kwargs):
        raise ValueError("a bug inside training")

    monkeypatch.setattr(L.Trainer, "fit", broken_fit)
    with open_dict(cfg):
        cfg.oto.ignored_layers = None
    with pytest.raises(ValueError, match="a bug inside training") as bug:
        run(cfg)
    assert not isinstance(bug.value, ConfigError)
