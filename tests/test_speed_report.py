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


def test_batch_of_keeps_keyword_inputs() -> None:
    ids, mask = torch.arange(6).reshape(3, 2), torch.ones(3, 2)
    out = batch_of({"input_ids": ids, "attention_mask": mask}, 4)
    assert set(out) == {"input_ids", "attention_mask"} and out["input_ids"].shape == (4, 2)
    assert torch.equal(out["input_ids"][3], ids[0]) and out["attention_mask"].shape == (4, 2)


def test_the_full_model_is_timed_as_the_dense_model_it_stands_for(pruned, monkeypatch) -> None:
    """A model whose removed groups are zero runs faster on CPU than the dense one (6% on DemoNet), so every timing
    of "the full model" (the report's speed-up, a latency budget's selection and report) uses a copy with the
    zeros refilled; the user's model, its outputs' shape and the global RNG stay as they were."""
    import lightning_oto.oto as oto_module
    import lightning_oto.subnet.timing as timing
    from lightning_oto.subnet.timing import dense_stand_in

    oto, sub = pruned
    zeros = sum(int((p == 0).sum()) for p in oto.model.parameters())
    assert zeros > 0
    rng = torch.get_rng_state()
    stand_in = dense_stand_in(oto.model)
    assert torch.equal(torch.get_rng_state(), rng)
    assert stand_in is not oto.model and all(bool((p != 0).all()) for p in stand_in.parameters())
    assert sum(int((p == 0).sum()) for p in oto.model.parameters()) == zeros
    x = oto.example_inputs[0]
    assert stand_in(x).shape == oto.model(x).shape
    assert dense_stand_in(stand_in) is stand_in  # nothing to refill: no copy

    timed: list[nn.Module] = []

    def clock(models, inputs, runs=7, warmup=2):
        timed.append(models["full"])
        return {k: 1.0 for k in models}

    monkeypatch.setattr(oto_module, "interleaved_times", clock)
    monkeypatch.setattr(timing, "interleaved_times", clock)
    oto._latency_ratio(sub)
    oto.compression_report(sub, speed=True)
    timing.run_speed_report(oto.model, sub, oto.example_inputs, 3, 2, 1)
    assert len(timed) == 1 + 2 + 2
    assert all(m is not oto.model and all(bool((p != 0).all()) for p in m.parameters()) for m in timed)
