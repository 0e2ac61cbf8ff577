"""The README's main command (``python -m lightning_oto.train``), tiny, on the default data (real digits), in a
subprocess: its terminal output is quiet (each line once, no known noise), the README's "Load and predict" runs
word for word in a fresh process against the run's own export, and the recorded normalisation is the one the
datamodule applied (raw images normalised with it give the datamodule's inputs and the recorded test accuracy)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from run_once import run_once

REPO = Path(__file__).parents[1]
TINY = ["data=digits", "data.max_samples=96", "data.batch_size=16", "data.image_size=16",
        "++model.kwargs.width_mult=0.25", "trainer.max_epochs=2", "threads=1"]
#: the run directory the README's "Load and predict" loads from (relative to where it runs)
README_RUN = Path("outputs/default/2026-01-01_12-00-00")
#: appended after the README's snippet (which runs unchanged) to hand its results back
SNIPPET_RESULT = '\ntorch.save({"images": images, "pred": pred, "meta": meta}, "snippet_result.pt")\n'

#: the README's recipe on the run's own test split (rebuilt from .hydra/config.yaml): the raw images (floats in
#: [0, 1], what a user has) come from the same datamodule with its normalisation turned off
LOAD_AND_PREDICT = """
import json, sys, torch, lightning_oto
from omegaconf import OmegaConf
from torchmetrics.classification import MulticlassAccuracy
from lightning_oto.data import build_datamodule

run = sys.argv[1]
model = lightning_oto.load(run + "/oto").eval()
meta = model.oto_metadata
mean, std = (torch.tensor(meta[k]).view(1, -1, 1, 1) for k in ("mean", "std"))
cfg = OmegaConf.to_container(OmegaConf.load(run + "/.hydra/config.yaml").data, resolve=True)
dm, raw = build_datamodule(**cfg), build_datamodule(**cfg)
raw._stats = lambda images: ([0.0] * raw.in_channels, [1.0] * raw.in_channels)  # the same split, not normalised
dm.setup("test"), raw.setup("test")
acc, worst = MulticlassAccuracy(num_classes=dm.num_classes), 0.0
with torch.no_grad():
    for (x, y), (images, _) in zip(dm.test_dataloader(), raw.test_dataloader()):
        worst = max(worst, float(((images - mean) / std - x).abs().max()))
        acc.update(model((images - mean) / std), y)
print(json.dumps({"test_acc": float(acc.compute()), "normalisation_error": worst,
                  "raw_range": [float(images.min()), float(images.max())]}))
"""


def readme_snippet() -> str:
    text = (REPO / "README.md").read_text()
    m = re.search(r"<!-- load-and-predict -->\s*```python\n(.*?)```", text, re.S)
    assert m, "README.md lost its 'Load and predict' example (marker <!-- load-and-predict -->)"
    return m.group(1)


@pytest.fixture(scope="module")
def main_command(tmp_path_factory):
    def train(folder: Path) -> tuple[Path, str, int, str]:
        run_dir = folder / README_RUN  # where the README's snippet looks
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        env.pop("PYTHONWARNINGS", None)  # the entry point itself must keep the terminal quiet
        proc = subprocess.run([sys.executable, "-m", "lightning_oto.train", *TINY, f"hydra.run.dir={run_dir}"],
                              capture_output=True, text=True, env=env, timeout=900, cwd=REPO)
        return run_dir, proc.stdout + proc.stderr, proc.returncode, proc.stderr[-3000:]

    run_dir, output, code, tail = run_once(tmp_path_factory, "readme_main_command", train)  # once per session
    assert code == 0, tail
    return run_dir, output


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


@pytest.fixture(scope="module")
def fresh_process(main_command):
    """One fresh Python process (it never trained) runs the README's snippet word for word, then
    :data:`LOAD_AND_PREDICT` on the same run: one interpreter start for both checks."""
    run_dir, _ = main_command
    snippet = readme_snippet()
    root = Path(str(run_dir)[: -len(str(README_RUN))])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", snippet + SNIPPET_RESULT + LOAD_AND_PREDICT, str(run_dir)],
                          capture_output=True, text=True, timeout=300, cwd=root, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return snippet, torch.load(root / "snippet_result.pt"), json.loads(proc.stdout.strip().splitlines()[-1])


def test_readme_load_and_predict_runs_word_for_word(fresh_process):
    snippet, got, _ = fresh_process
    assert f'lightning_oto.load("{README_RUN / "oto"}")' in snippet
    meta, images, pred = got["meta"], got["images"], got["pred"]
    assert meta["inputs"][0]["example_shape"] == [2, 1, 16, 16]  # the callback's example: 2 digits at image_size
    assert meta["inputs"][0]["shape"][0] is None  # the batch stays dynamic: the snippet ran 16 images
    assert images.shape == (16, 1, 16, 16) and pred.shape == (16,)
    assert int(pred.min()) >= 0 and int(pred.max()) < meta["num_classes"] == 10


def test_main_command_export_loads_in_a_fresh_process(main_command, fresh_process):
    run_dir, _ = main_command
    recorded = json.loads((run_dir / "result.json").read_text())
    loaded = fresh_process[2]
    assert loaded["raw_range"][0] >= 0.0 and loaded["raw_range"][1] <= 1.0 + 1e-6  # what the README calls images
    assert loaded["normalisation_error"] <= 1e-5  # wrong mean/std in the metadata fail here
    assert loaded["test_acc"] == pytest.approx(recorded["test_acc"], abs=1e-6)
    assert recorded["params_sub"] < recorded["params_full"]
