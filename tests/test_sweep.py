"""Sweep aggregation on synthetic result.json files: statuses, baseline row, phases, readable Pareto plot."""
from __future__ import annotations

import csv
import itertools
import json
from pathlib import Path

import pytest

from lightning_oto import sweep

FULL = {"params_full": 825_000, "flops_full": 215_000_000, "model": "demonet", "data": "mnist5k"}


def run(target, optimizer="h2spg", *, params=None, flops=None, acc=0.85, valid=True, zero=None, **extra):
    r = {**FULL, "target_group_sparsity": target, "optimizer": optimizer, "mode": "erase", "seed": 0,
         "valid": valid, "test_acc": acc if valid else None,
         "params_sub": params if valid else None, "flops_sub": flops if valid else None}
    if zero is not None:
        r["num_zero_groups"] = zero
    r.update(extra)
    return r


def write_runs(root: Path, runs: list[dict]) -> Path:
    for i, r in enumerate(runs):
        d = root / str(i)
        d.mkdir(parents=True)
        (d / "result.json").write_text(json.dumps(r))
    return root


@pytest.fixture
def sweep_dir(tmp_path):
    return write_runs(tmp_path / "sweep", [
        run(0.5, params=412_000, flops=110e6, acc=0.84, zero=3, phase_reached="hybrid", search_finished=True),
        run(0.8, params=700_000, flops=180e6, acc=0.83, zero=2, phase_reached="projection", search_finished=False),
        run(0.2, params=825_000, flops=215e6, acc=0.86, zero=0, phase_reached="warmup", search_finished=False),
        run(0.3, "dhspg", valid=False),
        run(0.1, "dhspg", params=800_000, flops=210e6, acc=0.85),  # an old result.json: no phase fields
        {**FULL, "baseline": True, "optimizer": "sgd", "mode": None, "seed": 0, "target_group_sparsity": 0.0,
         "valid": True, "params_sub": FULL["params_full"], "flops_sub": FULL["flops_full"], "test_acc": 0.87},
    ])


def md_rows(path: Path) -> dict[str, list[str]]:
    lines = path.read_text().strip().splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return {"header": header, **{str(i): [c.strip() for c in ln.strip("|").split("|")] for i, ln in enumerate(lines[2:])}}


def test_statuses_and_order(sweep_dir):
    rows = sweep.collect(sweep_dir)
    assert rows[0]["baseline"] and rows[0]["status"] == "baseline"
    by_target = {(r["optimizer"], r["target_group_sparsity"]): r for r in rows}
    assert by_target[("h2spg", 0.2)]["status"] == "nothing removed"
    assert by_target[("h2spg", 0.5)]["status"] == "valid"
    assert by_target[("dhspg", 0.3)]["status"] == "invalid"
    assert by_target[("dhspg", 0.1)]["status"] == "valid" and by_target[("dhspg", 0.1)]["phase_reached"] is None
    # without num_zero_groups, equal size on both counts means nothing was removed
    assert sweep.status(run(0.4, params=825_000, flops=215e6)) == "nothing removed"
    assert sweep.status(run(0.4, params=825_000, flops=200e6)) == "valid"


def test_table_shows_phase_baseline_and_empty_runs(sweep_dir):
    paths = sweep.aggregate(sweep_dir)
    table = md_rows(Path(paths["markdown"]))
    header = table.pop("header")
    assert {"phase reached", "search finished", "acc vs dense", "result"} <= set(header)
    rows = [dict(zip(header, cells)) for cells in table.values()]
    assert len(rows) == 6
    base = rows[0]
    assert base["run"] == "dense baseline" and base["result"] == "baseline" and base["test acc"] == "87.00%"
    empty = next(r for r in rows if r["target sparsity"] == "0.2")
    assert empty["result"] == "**nothing removed**" and empty["phase reached"] == "warmup"
    assert empty["search finished"] == "**no**" and empty["params (kept)"] == "0.825M (100.0%)"
    good = next(r for r in rows if r["target sparsity"] == "0.5")
    assert good["result"] == "valid" and good["search finished"] == "yes" and good["acc vs dense"] == "-3.00 pt"
    assert good["params (kept)"] == "0.412M (49.9%)"
    old = next(r for r in rows if r["target sparsity"] == "0.1")
    assert old["phase reached"] == "–" and old["search finished"] == "–"
    assert next(r for r in rows if r["target sparsity"] == "0.3")["result"] == "**invalid**"
    with open(paths["csv"]) as f:
        records = list(csv.DictReader(f))
    assert [r["status"] for r in records][:1] == ["baseline"] and records[0]["baseline"] == "True"
    assert {r["phase_reached"] for r in records} >= {"warmup", "projection", "hybrid", ""}
    assert Path(paths["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _label_boxes(fig):
    from matplotlib.text import Annotation

    renderer = fig.canvas.get_renderer()
    return {ax: [(a.get_text(), a.get_window_extent(renderer)) for a in ax.texts if isinstance(a, Annotation)]
            for ax in fig.axes}


def test_pareto_labels_do_not_overlap_and_axes_show_scale(tmp_path):
    # a short sweep: every run lands within a few parameters of the full model, accuracies within 0.2 points
    runs = [run(t, params=825_000 - i * 300, flops=215e6 - i * 1e5, acc=0.850 + 0.0005 * i, zero=1,
                phase_reached="warmup", search_finished=False) for i, t in enumerate((0.1, 0.2, 0.3, 0.4, 0.5, 0.6))]
    runs += [run(0.7, "dhspg", params=825_000, flops=215e6, acc=0.85, zero=1)]
    rows = sweep.collect(write_runs(tmp_path / "s", runs))
    fig = sweep.pareto_figure(rows)
    for ax, boxes in _label_boxes(fig).items():
        assert boxes, "points are labelled"
        for (ta, a), (tb, b) in itertools.combinations(boxes, 2):
            assert not a.overlaps(b), (ta, tb)
        x0, x1 = ax.get_xlim()
        y0, y1 = ax.get_ylim()
        assert x0 == 0 and x1 >= max(r["params_full"] if "parameters" in ax.get_xlabel() else r["flops_full"]
                                     for r in rows) / 1e6
        assert y1 - y0 >= 5  # not zoomed onto 0.3 points of noise
        assert ax.xaxis.get_major_formatter().get_offset() == ""


def test_coincident_points_share_one_label(tmp_path):
    # the same sub-network from two optimizers (sparsity 0.1 in both): one label, not two on top of each other
    rows = sweep.collect(write_runs(tmp_path / "s", [
        run(0.1, "dhspg", params=600_000, flops=150e6, acc=0.80, zero=2),
        run(0.1, "h2spg", params=600_000, flops=150e6, acc=0.80, zero=2),
        run(0.5, "h2spg", params=300_000, flops=80e6, acc=0.78, zero=5)]))
    fig = sweep.pareto_figure(rows)
    texts = sorted(t for t, _ in _label_boxes(fig)[fig.axes[0]])
    assert texts == ["0.1", "0.5"]


def test_empty_directory_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no result.json"):
        sweep.aggregate(tmp_path)


def test_degraded_runs_say_so_and_are_plotted(tmp_path):
    """Issue 18: a run whose accuracy guard fired is 'degraded', not 'valid', in the table and the plot."""
    root = write_runs(tmp_path / "s", [
        run(0.7, "dhspg", params=30_000, flops=1e6, acc=0.10, zero=9, degraded=True),
        run(0.3, "dhspg", params=600_000, flops=150e6, acc=0.84, zero=3, degraded=False)])
    rows = sweep.collect(root)
    assert {r["target_group_sparsity"]: r["status"] for r in rows} == {0.7: "degraded", 0.3: "valid"}
    paths = sweep.aggregate(root)
    table = md_rows(Path(paths["markdown"]))
    header = table.pop("header")
    cells = {row["target sparsity"]: row["result"] for row in (dict(zip(header, c)) for c in table.values())}
    assert cells == {"0.7": "**degraded**", "0.3": "valid"}
    fig = sweep.pareto_figure(rows)
    labels = fig.axes[0].get_legend_handles_labels()[1]
    assert "degraded (accuracy guard)" in labels and "dhspg" in labels
