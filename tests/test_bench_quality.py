"""The quality benchmark's core pieces on one tiny task (benchmarks/bench_quality.py; needs torch_pruning)."""
from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("torch_pruning")
pytest.importorskip("sklearn")

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_quality.py"


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_quality", BENCH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_quality"] = mod
    spec.loader.exec_module(mod)
    return mod


bq = _load_bench()
from quality_tasks import BasicBlock, Task, conv_bn, digits_data  # noqa: E402  (benchmarks/ on the path now)


class TinyResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(1, 16)  # wide enough that Torch-Pruning's ratio can land within 2 points
        self.blocks = nn.Sequential(BasicBlock(16, 24, 16), BasicBlock(16, 32, 24, stride=2))
        self.fc = nn.Linear(24, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.blocks(torch.relu(self.stem(x))).mean(dim=(2, 3)))


TINY = Task("tiny", "tiny ResNet, digits", TinyResNet, digits_data, "sgd", 0.05, 5e-4, epochs=2, warmup_epochs=1,
            projection_epochs=1, batch_size=32, tp_ignored=lambda m: [m.fc])


@pytest.fixture(scope="module")
def tiny_run():
    data = digits_data(320)
    torch.manual_seed(0)
    model = TinyResNet()
    init = copy.deepcopy(model.state_dict())
    dense, pretrained = bq.run_dense(model, TINY, data, seed=0)
    oto = bq.OTO(copy.deepcopy(model), data[0][:2], mode="prune")
    oto_res = bq.run_oto(oto, init, TINY, data, 0, 0.5, dense)
    tp_res = bq.run_tp(pretrained, TINY, data, 0, "magnitude", "uniform", oto_res["flops_kept"], dense)
    return dense, oto_res, tp_res


@pytest.mark.slow
def test_torch_pruning_matches_the_flops_lightning_oto_reached(tiny_run):
    dense, oto_res, tp_res = tiny_run
    assert dense["flops_kept"] == 1.0
    assert oto_res["flops_kept"] < 0.85, "the budget of 50% removed almost nothing"
    assert abs(tp_res["flops_kept"] - oto_res["flops_kept"]) <= 0.02
    # FLOPs are measured on the physically smaller models, not estimated from zero groups
    assert oto_res["flops"] < dense["flops"] and tp_res["flops"] < dense["flops"]
    assert 0.0 <= oto_res["acc"] <= 1.0 and oto_res["zero_groups"] > 0


def test_findings_say_plainly_where_lightning_oto_is_below():
    def row(method, acc, flops_kept, keep=0.5):
        return dict(task="resnet", seed=0, method=method, keep=keep, acc=acc, flops_kept=flops_kept,
                    params_kept=flops_kept, flops=1, params=1)

    rows = [row("dense", 0.98, 1.0, keep=None), row("lightning_oto prune", 0.95, 0.44),
            row("tp magnitude uniform", 0.97, 0.44), row("tp taylor global", 0.96, 0.44)]
    lines = bq.findings(bq.aggregate(rows), ["resnet"], (0.5,))
    text = "\n".join(lines)
    assert "*below* the best Torch-Pruning variant (tp magnitude uniform" in text and "-2.0 points" in text
    assert "3.0 points *below* dense" in text
    assert "missed by -6.0 points" in text
    rows[1]["flops_kept"] = 0.48  # within the 2-point tolerance
    assert "missed" not in "\n".join(bq.findings(bq.aggregate(rows), ["resnet"], (0.5,)))
    rows[1]["acc"] = 0.99
    text = "\n".join(bq.findings(bq.aggregate(rows), ["resnet"], (0.5,)))
    assert "at or above the best Torch-Pruning variant" in text and "below dense" not in text


def test_the_page_shows_the_cut_norms_the_optimizer_recorded():
    """The per-run table and the summary read ``cut_norm_ratio`` as ``cut_ratio_summary`` writes it (the page
    once showed '–' for every run because it looked for another key)."""
    from lightning_oto.optim.half_space import cut_ratio_summary

    cuts = cut_ratio_summary([0.004, 0.008, 0.3], by_half_space=2, at_deadline=1)
    r = dict(task="resnet", seed=0, method="lightning_oto prune", keep=0.5, acc=0.9, flops_kept=0.5, params_kept=0.5,
             zeroed_by_half_space=2, forced_at_deadline=1, cut_norm_ratio=cuts)
    assert bq.cut_cell(r) == "8.0e-03, 3.0e-01"
    line = bq.cut_norm_line([r, {**r, "method": "tp magnitude uniform"}])
    assert "1 lightning_oto runs and 3 groups" in line and "1 above 0.1" in line and "1 forced" in line
    assert bq.cut_cell({**r, "cut_norm_ratio": cut_ratio_summary([])}) == "–"


def test_a_methods_rerun_replaces_only_its_own_cells(tmp_path):
    """``--methods erase`` writes ``<task>_seed<k>_erase.jsonl``; the page takes its cells over the full run's
    (the later file by name) and keeps every other cell, and names both files as its sources."""
    import json

    def row(method, acc):
        return dict(task="resnet", seed=0, method=method, keep=0.5, acc=acc, flops_kept=0.5, params_kept=0.5)

    (tmp_path / "resnet_seed0.jsonl").write_text(
        "\n".join(json.dumps(r) for r in (row("lightning_oto erase", 0.90), row("lightning_oto prune", 0.95))))
    (tmp_path / "resnet_seed0_erase.jsonl").write_text(json.dumps(row("lightning_oto erase", 0.97)))
    rows = {r["method"]: r for r in bq.load_rows(tmp_path)}
    assert rows["lightning_oto erase"]["acc"] == 0.97 and rows["lightning_oto erase"]["source"].endswith("_erase.jsonl")
    assert rows["lightning_oto prune"]["acc"] == 0.95 and rows["lightning_oto prune"]["source"] == "resnet_seed0.jsonl"
