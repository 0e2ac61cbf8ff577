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
    rows += [{**r, "task": "vgg"} for r in rows]
    rows[-3]["acc"] = 0.96  # vgg: lightning_oto prune 1 point below the best Torch-Pruning variant
    head = "\n".join(bq.summary(bq.aggregate(rows), ["resnet", "vgg"], (0.5,)))
    assert "below in 1 of 2 (task, budget) cells" in head and "mean difference +0.5 points" in head
    assert "Mean per task: resnet +2.0, vgg -1.0." in head
    # dense is 98% on both tasks, the best variant 97% on each: the margin a lossless compression would have
    assert "the dense model itself, over the same cells: mean +1.0 points above the best variant, at or below " \
           "it in 0 of 2" in head and "needs it to beat" not in head
    rows[-4]["acc"] = 0.972  # vgg dense 97.2%: mean margin (1.0 + 0.2) / 2
    head = "\n".join(bq.summary(bq.aggregate(rows), ["resnet", "vgg"], (0.5,)))
    assert "mean +0.6 points above" in head
    rows[-4]["acc"] = 0.96
    head = "\n".join(bq.summary(bq.aggregate(rows), ["resnet", "vgg"], (0.5,)))
    assert "mean +0.0 points above the best variant, at or below it in 1 of 2" in head
    assert "a mean of +0.5 needs it to beat the dense model" in head
    rows[-4]["acc"] = 0.98
    rows += [{**rows[0], "seed": 1, "acc": 0.95}]  # resnet dense: 98% on seed 0, 95% on seed 1
    spread = bq.seed_spread_lines(rows, ["resnet", "vgg"])
    assert bq.seed_count(rows) == "1 (resnet: 2)"
    assert len(spread) == 1 and "resnet: the dense accuracy depends on the seed (98.0% (seed 0), 95.0% (seed 1))" in spread[0]


def test_the_paired_interval_compares_each_seed_with_the_same_seed():
    def row(seed, method, acc, keep=0.5):
        return dict(task="bert_vote", seed=seed, method=method, keep=keep, acc=acc, flops_kept=0.5,
                    params_kept=0.5, flops=1, params=1)

    # seed 0 is easy for every method, seed 1 hard: lightning_oto is 1 and 3 points above the best variant
    rows = [row(0, "lightning_oto prune", 0.99), row(0, "tp taylor global", 0.98), row(0, "tp magnitude uniform", 0.90),
            row(1, "lightning_oto prune", 0.83), row(1, "tp taylor global", 0.80), row(1, "tp magnitude uniform", 0.81)]
    agg = bq.aggregate(rows)
    assert bq.best_tp(agg, "bert_vote", 0.5)[0] == "tp taylor global"  # best by the mean over seeds
    diffs = bq.paired_seed_differences(rows, agg, "bert_vote", (0.5,))
    assert diffs == pytest.approx({0: 1.0, 1: 3.0})
    # mean 2, sd sqrt(2), t(1 df) 12.71: half width 12.71 * sqrt(2) / sqrt(2)
    assert "bert_vote +2.0 [-10.7, +14.7]" in bq.paired_line(rows, agg, ["bert_vote"], (0.5,))
    one_seed = [r for r in rows if r["seed"] == 0]
    assert "fewer than two seeds" in bq.paired_line(one_seed, bq.aggregate(one_seed), ["bert_vote"], (0.5,))


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


def test_the_word_vote_label_is_the_negation_aware_majority():
    """Recount every sequence token by token: a sentiment word votes its polarity, flipped by a "not" right
    before it.  The negations must matter (the task needs attention between neighbours), and the data must not
    depend on the global RNG."""
    from quality_tasks import NOT, SENTIMENT, word_vote_data

    torch.manual_seed(1)
    x, y, xt, yt = word_vote_data(400)
    torch.manual_seed(2)
    assert torch.equal(word_vote_data(400)[0], x)
    for ids, labels in ((x, y), (xt, yt)):
        flips = 0
        for seq, label in zip(ids.tolist(), labels.tolist()):
            votes = [(1 if t < 10 + SENTIMENT else -1) * (-1 if seq[j - 1] == NOT else 1)
                     for j, t in enumerate(seq) if 10 <= t < 10 + 2 * SENTIMENT]
            assert len(votes) in (1, 3, 5) and label == int(sum(votes) > 0)
            naive = sum(1 if t < 10 + SENTIMENT else -1 for t in seq if 10 <= t < 10 + 2 * SENTIMENT)
            flips += label != int(naive > 0)
        assert flips > 0.2 * len(labels)


def test_the_half_width_resnet_is_the_resnet_at_half_width():
    from quality_tasks import TASKS, ResNetDigits

    full, thin = ResNetDigits(), TASKS["resnet_thin"].make_model()
    widths = [m.out_channels for m in full.modules() if isinstance(m, nn.Conv2d)]
    assert [m.out_channels for m in thin.modules() if isinstance(m, nn.Conv2d)] == [round(w / 2) for w in widths]
    assert sum(p.numel() for p in full.parameters()) == 98_618  # the resnet task's model is unchanged


def test_a_run_with_dropout_does_not_depend_on_the_runs_before_it():
    """The page merges rows of separate reruns (``--budgets``, ``--methods``): the dropout masks a run draws
    must come from its seed and epoch, not from what the process ran before."""
    data = digits_data(128)

    def trained(draw_before: int) -> torch.Tensor:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 10))
        torch.rand(draw_before)  # an earlier run consumed the global generator
        opt = bq.torch_optimizer(TINY, model.parameters())
        bq.train(model, opt, data, TINY, seed=3, epochs=range(2), total_steps=2 * len(data[1]) // TINY.batch_size)
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    assert torch.equal(trained(0), trained(1000))
