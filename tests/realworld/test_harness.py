"""The real-world suite's own tools: the zoo is what the issue lists, and the checks can fail."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_oto.space.groups import Group, ParamSlice

from .harness import Outcome, expected_shapes, run_case, unused_parameters
from .zoo import BATCH, BATCH2, BATCH_ONLY, ONE_KERNEL, SEQ, SEQ2, ZOO, Entry, perturb

REQUIRED = ["bert", "roberta", "distilbert", "t5_encoder", "gpt2", "llama", "mistral_gqa", "qwen2_gqa", "vit", "swin",
            "clip_vision", "whisper_encoder", "resnet_basic", "resnet_bottleneck", "mobilenet_v2", "convnext",
            "bert_sdpa_modeloutput", "vit_sdpa_modeloutput"]
TEXT = ["bert", "bert_sdpa_modeloutput", "roberta", "albert", "electra", "distilbert", "t5_encoder", "gpt2", "llama",
        "mistral_gqa", "qwen2_gqa"]


def test_zoo_has_the_required_models_and_both_attention_kernels():
    assert set(REQUIRED) <= set(ZOO)
    assert {"eager", "sdpa"} <= {e.attention for e in ZOO.values()}
    assert sum(1 for n in ZOO if not n.startswith("fixture_")) >= 30


def test_every_attention_model_runs_with_eager_and_sdpa_attention():
    """Issue 19: T5 crashed only under SDPA, which the zoo did not build; each kernel is its own graph."""
    kernels: dict[str, set[str]] = {}
    for entry in ZOO.values():
        if entry.attention is not None:
            kernels.setdefault(entry.architecture, set()).add(entry.attention)
    one = {arch for arch, seen in kernels.items() if seen != {"eager", "sdpa"}}
    assert one == {"mobilevit"}, one  # transformers has no SDPA path for it
    assert set(ONE_KERNEL) <= set(ZOO) and all(ONE_KERNEL.values())
    assert {"t5_encoder", "t5_encoder_sdpa", "qwen2_gqa_sdpa", "swin_sdpa", "timm_cait_sdpa"} <= set(ZOO)


def test_second_inputs_change_batch_and_sequence_length():
    for name, entry in ZOO.items():
        (x,), (y,) = entry.inputs()
        assert (x.shape[0], y.shape[0]) == (BATCH, BATCH2), name
        if entry.architecture in TEXT:
            assert (x.shape[1], y.shape[1]) == (SEQ, SEQ2), name


def test_swin_entries_shift_their_windows_and_ci_traces_them_fast():
    """Swin rolls only in every second block of a stage: one block per stage would test no shifted window.  CI
    traces Swin with the batch alone dynamic (a dynamic image size costs ~100 s of sympy per mode); the entry
    that keeps the default traces a second image size and runs in the soak only."""
    from transformers.models.swin.modeling_swin import SwinLayer

    swins = {name: entry for name, entry in ZOO.items() if entry.architecture == "swin"}
    assert set(swins) == {"swin", "swin_sdpa", "swin_dynamic_image"}
    for name, entry in swins.items():
        model, (x,), (y,) = entry.make()
        assert any(m.shift_size > 0 for m in model.modules() if isinstance(m, SwinLayer)), name
        if entry.dynamic_shapes == "auto":
            assert entry.opt_in and y.shape[-1] != x.shape[-1], name
        else:
            assert not entry.opt_in and entry.dynamic_shapes == BATCH_ONLY, name


def test_models_are_returned_as_models_use_them():
    """Two entries return a transformers ModelOutput, the rest plain tensors."""
    from transformers.utils import ModelOutput

    outputs = {}
    for name in ("bert_sdpa_modeloutput", "vit_sdpa_modeloutput", "bert"):
        model, x, _ = ZOO[name].make()
        outputs[name] = model.eval()(*x)
    assert type(outputs["bert"]) is torch.Tensor
    assert isinstance(outputs["bert_sdpa_modeloutput"], ModelOutput)
    assert isinstance(outputs["vit_sdpa_modeloutput"], ModelOutput)


def test_perturb_moves_zero_initialised_parameters_and_statistics():
    m = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    nn.init.zeros_(m[0].bias)
    perturb(m, seed=0)
    assert m[0].bias.abs().min() > 0 and (m[1].running_mean != 0).all()
    assert (m[1].running_var > 0).all() and not torch.allclose(m[1].running_var, torch.ones(4))


def test_expected_shapes_delete_indices_and_whole_tensors():
    m = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 3))
    g = Group(0, "rows", [ParamSlice("0.weight", 0, (1, 2)), ParamSlice("0.bias", 0, (1, 2))],
              dependents=[ParamSlice("1.weight", 1, (2,))])
    whole = Group(1, "head", [ParamSlice("1.bias", 0, None)])
    assert expected_shapes(m, [g, whole]) == {"0.weight": (4, 4), "0.bias": (4,), "1.weight": (3, 5), "1.bias": None}


def test_unused_parameters_are_the_ones_no_output_reads():
    class Half(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used, self.dead = nn.Linear(2, 2), nn.Linear(2, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.dead(x)
            return self.used(x)

    assert unused_parameters(Half(), (torch.randn(1, 2),)) == {"dead.weight", "dead.bias"}


def test_failures_name_each_violated_property():
    ok = Outcome("m", "erase", groups=3, removable=2, zeroed=1, removed=1, err=0.0, allowed=1e-4, err2=0.0,
                 allowed2=1e-4, params_full=10, params_expected=6, params_sub=6, flops_full=8, flops_sub=4)
    assert ok.failures() == []
    kept = Outcome(**{**ok.__dict__, "params_sub": 10, "flops_sub": 8})
    assert [c for c, _ in kept.failures()] == ["zeroed weights kept"]
    silent = Outcome("m", "prune", groups=4, removable=0, err=0.0, allowed=1e-4, err2=0.0, allowed2=1e-4)
    assert [c for c, _ in silent.failures()] == ["no reason"]
    refused = Outcome(**{**ok.__dict__, "err2": None, "second_error": "Guard failed: x.size()[1] == 16"})
    assert [c for c, _ in refused.failures()] == ["other shape rejected"]


def test_a_crash_is_recorded_with_its_stage():
    class Untraceable(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(2, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x) if float(x.sum()) > 0 else -self.fc(x)  # data-dependent branch

    entry = Entry("untraceable", Untraceable, lambda: ((torch.ones(2, 2),), (torch.ones(3, 2),)))
    out = run_case(entry, "prune")
    assert [c for c, _ in out.failures()] == ["crash"] and "OTO(...)" in out.error


def test_control_model_passes_every_check_in_both_modes():
    """A plain residual MLP is within today's engine: the checks can pass, not only fail."""
    for mode in ("prune", "erase"):
        out = run_case(ZOO["fixture_residual_mlp"], mode)
        assert out.failures() == [] and out.removed > 0, (mode, out.failures())


def test_prune_on_the_erase_trace_measures_what_its_own_trace_does():
    """The suite runs prune mode on erase mode's trace: the same groups, removal and outputs as tracing afresh,
    and no second torch.export (a call would hit the guard below)."""
    import lightning_oto.graph.trace as trace_module

    entry = ZOO["fixture_cat_inplace_branches"]
    fresh = run_case(entry, "prune")
    erase = run_case(entry, "erase")
    real, calls = trace_module._export, []
    trace_module._export = lambda *a, **k: calls.append(a) or real(*a, **k)
    try:
        reused = run_case(entry, "prune", trace=erase.graph)
    finally:
        trace_module._export = real
    assert reused.graph is erase.graph and calls == []
    assert fresh.failures() == reused.failures() == [] and fresh.removed > 0
    same = ("groups", "removable", "zeroed", "removed", "params_expected", "params_sub", "flops_full", "flops_sub")
    assert {k: getattr(reused, k) for k in same} == {k: getattr(fresh, k) for k in same}
    assert reused.err == fresh.err and reused.err2 == fresh.err2
    with pytest.raises(ValueError, match="prune mode"):
        run_case(entry, "erase", trace=erase.graph)
