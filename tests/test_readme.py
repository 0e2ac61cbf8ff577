"""The README's main command (``python -m lightning_oto.train``), tiny and on synthetic data, in a subprocess:
its terminal output is quiet (each line once, no known noise), and its export loads in a fresh Python process
with ``lightning_oto.load`` the way the README's "Load and predict" shows, reproducing the recorded test accuracy."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

TINY = ["data=synthetic", "+data.num_samples=96", "data.batch_size=16", "data.image_size=16",
        "++model.kwargs.width_mult=0.25", "trainer.max_epochs=2", "threads=1"]

#: what the README's "Load and predict" does, on the run's own test split (rebuilt from .hydra/config.yaml)
LOAD_AND_PREDICT = """
import json, sys, torch, lightning_oto
from omegaconf import OmegaConf
from torchmetrics.classification import MulticlassAccuracy
from lightning_oto.data import build_datamodule

run = sys.argv[1]
model = lightning_oto.load(run + "/oto").eval()
meta = model.oto_metadata
mean, std = (torch.tensor(meta[k]).view(1, -1, 1, 1) for k in ("mean", "std"))
cfg = OmegaConf.load(run + "/.hydra/config.yaml")
dm = build_datamodule(**OmegaConf.to_container(cfg.data, resolve=True))
dm.setup("test")
acc = MulticlassAccuracy(num_classes=dm.num_classes)
with torch.no_grad():
    for x, y in dm.test_dataloader():
        images = x * std + mean            # the images a user has: before the datamodule's normalisation
        acc.update(model((images - mean) / std), y)
print(json.dumps({"test_acc": float(acc.compute())}))
"""


@pytest.fixture(scope="module")
def main_command(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("readme") / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONWARNINGS", None)  # the entry point itself must keep the terminal quiet
    proc = subprocess.run([sys.executable, "-m", "lightning_oto.train", *TINY, f"hydra.run.dir={run_dir}"],
                          capture_output=True, text=True, env=env, timeout=900, cwd=Path(__file__).parents[1])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir, proc.stdout + proc.stderr


def test_main_command_terminal_is_quiet(main_command):
    _, output = main_command
    lines = [line for line in output.splitlines() if line.strip()]
    logged = Counter(line.split("] - ", 1)[1] for line in lines if "] - " in line)  # Hydra's log format
    assert not [msg for msg, n in logged.items() if n > 1 and msg.strip()], "a log line printed twice"
    assert not any(line.startswith("INFO: ") for line in lines), "Lightning's own handler printed under Hydra"
    for noise in ("onnx_ir", "LeafSpec", "batch size 1"):
        assert noise not in output, noise
    assert sum("[lightning_oto]" in line for line in lines) == 2  # the start line and the summary
    assert "OTO compression summary" in output and "test_acc" in output  # Lightning's test table is shown


def test_main_command_export_loads_in_a_fresh_process(main_command):
    run_dir, _ = main_command
    recorded = json.loads((run_dir / "result.json").read_text())
    proc = subprocess.run([sys.executable, "-c", LOAD_AND_PREDICT, str(run_dir)], capture_output=True, text=True,
                          timeout=300, cwd=Path(__file__).parents[1])
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    assert loaded["test_acc"] == pytest.approx(recorded["test_acc"], abs=1e-6)
    assert recorded["params_sub"] < recorded["params_full"]
