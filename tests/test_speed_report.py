"""The compression report's measured speed-up (issue 18, item 5): structure and consistency only (no timed asserts)."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from lightning_oto import OTO
from lightning_oto.subnet.timing import batch_of, interleaved_times


def tiny_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))


@pytest.fixture(scope="module")
def pruned() -> tuple[OTO, nn.Module]:
    """One trace for the file (tracing is the slow part)."""
    oto = OTO(tiny_cnn(), torch.randn(3, 3, 8, 8), mode="prune")
    oto.random_set_zero_groups(0.5, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return oto, oto.construct_subnet()


def test_speed_is_measured_at_batch_one_and_the_example_batch(pruned) -> None:
    oto, sub = pruned
    oto.model.train()
    sub.eval()
    rep = oto.compression_report(sub, speed=True)
    speed = rep["speed"]
    assert speed["device"] == "cpu" and list(speed["batches"]) == ["1", "3"]
    assert speed["flop_reduction"] == pytest.approx(rep["flops_full"] / rep["flops_sub"]) and speed["flop_reduction"] > 1
    for row in speed["batches"].values():
        assert row["full_ms"] > 0 and row["sub_ms"] > 0
        assert row["speedup"] == pytest.approx(row["full_ms"] / row["sub_ms"])
        assert row["of_flop_reduction"] == pytest.approx(row["speedup"] / speed["flop_reduction"])
    assert oto.model.training and sub.training is False  # modes are restored
    assert list(oto.compression_report(sub, speed=(2, 5, 2))["speed"]["batches"]) == ["2", "5"]
    assert "speed" not in oto.compression_report(sub)  # off by default: timing costs forwards


def test_speed_bad_inputs_are_refused(pruned) -> None:
    oto, sub = pruned
    for bad in ((0,), (), (1.5,), (True,)):
        with pytest.raises(ValueError, match="batch sizes"):
            oto.compression_report(sub, speed=bad)
    with pytest.raises(ValueError, match="needs the sub-network"):
        oto.compression_report(None, speed=True)
    with pytest.raises(ValueError, match="runs"):
        interleaved_times({"m": sub}, (torch.randn(1, 3, 8, 8),), runs=0)


def test_batch_of_repeats_rows_and_passes_other_inputs() -> None:
    x, flag = torch.arange(6.0).reshape(3, 2), "mask"
    y, f = batch_of((x, flag), 5)
    assert f == "mask" and y.shape == (5, 2) and torch.equal(y[3], x[0]) and torch.equal(y[4], x[1])
    assert batch_of((x,), 1)[0].shape == (1, 2)
