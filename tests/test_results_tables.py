"""benchmarks/results_tables.py writes docs/results.md: what it says must follow from the runs it read."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "results_tables.py"


@pytest.fixture(scope="module")
def tables():
    spec = importlib.util.spec_from_file_location("results_tables", _PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(root: Path, name: str, result: dict, report: dict | None = None) -> None:
    d = root / name
    (d / "oto").mkdir(parents=True)
    (d / "result.json").write_text(json.dumps(result))
    if report is not None:
        (d / "oto" / "oto_report.json").write_text(json.dumps(report))


def _erase_report(dependents: list[dict]) -> dict:
    return {"optimizer": "H2SPG", "num_prunable_groups": 5, "num_redundant_target": 1, "num_zero_groups": 1,
            "removed_groups": [{"id": 0, "name": "conv2", "dependents": dependents}]}


def test_flops_per_image_and_columns_only_when_recorded(tables, tmp_path):
    base = {"params_full": 100, "params_sub": 100, "flops_full": 800, "flops_sub": 800, "test_acc": 0.9,
            "example_batch_size": 4}
    _run(tmp_path, "demonet_baseline", base)
    # an erase run whose removed operator fed a concat: the consumer's input columns went with it
    _run(tmp_path, "demonet_erase", {**base, "params_sub": 60, "flops_sub": 400e6, "flops_full": 800e6},
         _erase_report([{"param": "conv5.weight", "dim": 1, "count": 8}, {"param": "bn5.running_mean", "dim": 0,
                                                                          "count": 8}]))
    text = "\n".join(tables.demonet_section(tmp_path))
    assert "| FLOPs per image |" in text
    assert "100.0M (50.0% kept)" in text  # 400e6 FLOPs over a batch of 4
    assert "input columns they fed in `conv5.weight`" in text and "bn5" not in text

    # a removed operator that fed an add: no columns to claim
    _run(tmp_path / "b", "demonet_erase", base, _erase_report([]))
    text = "\n".join(tables.demonet_section(tmp_path / "b"))
    assert "input columns" not in text and "— whole operators." in text


def test_per_image_old_runs_and_nothing_removed_cell(tables):
    assert tables.per_image({"flops_sub": 10}, "flops_sub") == 10 / tables.OLD_EXAMPLE_BATCH
    assert tables.per_image({"flops_sub": 10, "example_batch_size": 1}, "flops_sub") == 10
    assert tables.per_image({}, "flops_sub") is None
    from lightning_oto.sweep import status

    nothing = {"valid": True, "num_zero_groups": 0, "params_sub": 5, "params_full": 5}
    assert tables.valid_cell(status(nothing)) == "nothing removed"
    assert tables.valid_cell(status({**nothing, "num_zero_groups": 2, "params_sub": 3})) == "yes"
    assert tables.valid_cell(status({"valid": False})) == "**no**"
