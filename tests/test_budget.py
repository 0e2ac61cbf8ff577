"""Budgets (``budget={"flops" | "params" | "latency": f}``), cost-aware selection and layer floors.

Each budget test trains a few steps (warm-up 1, projection 2), builds the real sub-network and
measures it with ``oto.compression_report``: the budget must hold on the constructed network, not
only in the optimizer's bookkeeping.
"""
from __future__ import annotations

import itertools
import math
import warnings

import pytest
import torch
from torch import nn

import lightning_oto.oto

from arch_zoo import make
from oto_copies import traced_copy
from lightning_oto import OTO, OTOCallback
from lightning_oto.lightning.settings import OTOSettings
from lightning_oto.models.demonet import DemoNet
from lightning_oto.space.costs import check_budget, measure_costs
from lightning_oto.sweep import budget_cell

TOL = 0.02


def _demonet(width_mult: float = 1.0) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return DemoNet(width_mult=width_mult, image_size=16), torch.randn(2, 1, 16, 16)


def _demonet_half() -> tuple[nn.Module, torch.Tensor]:
    return _demonet(0.5)


def _resnet() -> tuple[nn.Module, torch.Tensor]:
    return make("resnet_tiny")


def _traced(net) -> tuple[nn.Module, torch.Tensor, OTO]:
    """``OTO(*net(), mode="prune")`` over a fresh copy of the model; each ``net`` is traced once (:mod:`oto_copies`)."""
    oto = traced_copy(net, net)
    return oto.model, oto.example_inputs[0], oto


def _search(oto: OTO, x: torch.Tensor, opt_name: str, steps: int = 5, **kwargs) -> torch.optim.Optimizer:
    """A short run: warm-up 1 step, projection 2 steps, then hybrid steps."""
    opt = getattr(oto, opt_name)(lr=0.01, warmup_steps=1, projection_steps=2, **kwargs)
    torch.manual_seed(1)
    for _ in range(steps):
        opt.zero_grad()
        oto.model(x).square().mean().backward()
        opt.step()
    return opt


def _layer_widths(oto: OTO) -> dict[str, tuple[int, int]]:
    """layer -> (channels after, floor) for every floored layer, from the zero groups."""
    zero = set(oto.zero_group_ids())
    return {f.layer: (f.width - f.removed(zero), f.keep) for f in oto.floors}


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("net,opt_name,budget", [
    (_demonet_half, "dhspg", {"flops": 0.5}),
    (_demonet_half, "dhspg", {"params": 0.3}),
    (_resnet, "dhspg", {"flops": 0.4}),
    (_resnet, "hesso", {"params": 0.5}),
    (_resnet, "dhspg", {"flops": 0.6, "params": 0.6}),
])
def test_prune_budget_is_met_by_the_constructed_subnet(net, opt_name, budget):
    model, x, oto = _traced(net)
    opt = _search(oto, x, opt_name, budget=budget)
    rep = oto.compression_report(oto.construct_subnet())
    reached = {"flops": rep["flop_ratio"], "params": rep["param_ratio"]}
    for key, asked in budget.items():  # each key is a cap the sub-network may keep ...
        assert reached[key] <= asked + TOL, (key, reached[key])
        assert math.isclose(opt.budget_reached[key], reached[key], rel_tol=1e-6)  # the accounting is exact
    # ... and the binding one is reached within the tolerance (with two keys the other may end lower)
    assert any(reached[k] >= asked - TOL for k, asked in budget.items()), reached
    assert all(after >= floor for after, floor in _layer_widths(oto).values())


def test_budget_in_periods_reaches_the_fraction_in_the_last_one():
    model, x, oto = _traced(_resnet)
    opt = oto.dhspg(lr=0.01, budget={"flops": 0.5}, warmup_steps=1, projection_steps=4, pruning_periods=2)
    kept = []
    for _ in range(6):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        kept.append(opt.budget_reached.get("flops"))
    assert kept[1] is not None and 0.75 - TOL <= kept[1] <= 0.75 + TOL  # first period: halfway
    assert 0.5 - TOL <= kept[-1] <= 0.5 + TOL
    rep = oto.compression_report(oto.construct_subnet())
    assert 0.5 - TOL <= rep["flop_ratio"] <= 0.5 + TOL


def _tiny_bert() -> tuple[nn.Module, torch.Tensor]:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=16, num_labels=2)
    bert = transformers.BertForSequenceClassification(cfg).eval()

    class Classify(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.bert(input_ids=ids).logits

    return Classify(), torch.randint(0, 50, (2, 12))


def _closest_combination(oto: OTO, key: str, asked: float) -> float:
    """Brute force over every valid set of erase groups: the kept fraction nearest ``asked`` that does not
    exceed it by more than the tolerance (the oracle for the selection's combination search)."""
    costs = measure_costs(oto.model, oto.example_inputs, oto.groups)
    reachable = []
    for r in range(len(oto.groups) + 1):
        for combo in itertools.combinations(range(len(oto.groups)), r):
            if all(oto.hierarchy_check(frozenset(combo[:j]), combo[j]) for j in range(r)):
                reachable.append(costs.kept_fraction(combo)[key])
    return min((f for f in reachable if f <= asked + TOL), key=lambda f: abs(f - asked))


@pytest.mark.parametrize("net,budget", [(_demonet_half, {"flops": 0.5}), (_tiny_bert, {"flops": 0.5}),
                                        (_tiny_bert, {"flops": 0.7})])
def test_erase_budget_lands_on_the_closest_combination_and_a_gap_is_said(net, budget):
    """Erase groups are whole operators: the selection searches their combinations (a greedy order landed a
    2-layer BERT at 27% FLOPs for a 50% budget that attention + MLP of different layers meets at 50.2%).
    The constructed sub-network is as close as any valid combination, the accounting is exact, and a budget
    no combination meets within the tolerance is said."""
    model, x = net()
    oto = OTO(model, x, mode="erase")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = _search(oto, x, "h2spg", budget=budget)
    rep = oto.compression_report(oto.construct_subnet())
    (key, asked), = budget.items()
    best = _closest_combination(oto, key, asked)
    assert math.isclose(opt.budget_reached[key], rep["flop_ratio"], rel_tol=1e-6)
    assert rep["flop_ratio"] <= asked + TOL
    assert abs(rep["flop_ratio"] - asked) <= max(abs(best - asked), TOL) + 1e-9, (rep["flop_ratio"], best)
    gap_said = any("whole operators are coarse" in str(w.message) for w in caught)
    assert gap_said == (abs(best - asked) > TOL)


class Branches(nn.Module):
    """Nine parallel conv branches (kernels 1, 3, 5) summed: erasable operators of many sizes."""

    def __init__(self, c: int = 16) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.branches = nn.ModuleList(nn.Conv2d(c, c, k, padding=k // 2) for k in (1, 3, 5) * 3)
        self.head = nn.Linear(c, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        h = h + sum(b(h) for b in self.branches)
        return self.head(h.mean((2, 3)))


@pytest.mark.parametrize("budget", [{"params": 0.6}, {"flops": 0.45}])
def test_erase_budget_within_tolerance_when_operators_allow_it(budget):
    torch.manual_seed(0)
    model, x = Branches(), torch.randn(2, 3, 12, 12)
    oto = OTO(model, x, mode="erase")
    opt = _search(oto, x, "h2spg", budget=budget)
    rep = oto.compression_report(oto.construct_subnet())
    (key, asked), = budget.items()
    reached = rep["param_ratio" if key == "params" else "flop_ratio"]
    assert asked - TOL <= reached <= asked + TOL
    assert math.isclose(opt.budget_reached[key], reached, rel_tol=1e-6)


def test_cost_model_matches_the_flop_counter_for_any_removal():
    for mode in ("prune", "erase"):
        model, x = _demonet(0.5)
        oto = OTO(model, x, mode=mode)
        costs = measure_costs(model, oto.example_inputs, oto.groups)
        ids = oto.random_set_zero_groups(0.4, seed=3)
        rep = oto.compression_report(oto.construct_subnet())
        kept = costs.kept_fraction(ids)
        assert math.isclose(kept["flops"], rep["flop_ratio"], rel_tol=1e-9)
        assert math.isclose(kept["params"], rep["param_ratio"], rel_tol=1e-9)


def _collapse_saliency(oto: OTO):
    """Scores the trained DemoNet of the issue ended with: conv2-conv6 look redundant, the rest important."""
    weak = ("conv2.", "conv3.", "conv4.", "conv5.", "conv6.")
    candidates = [g for g in oto.groups if g.prunable and g.slices]
    scores = torch.tensor([0.0 if g.slices[0].name.startswith(weak) else 1.0 for g in candidates])
    return lambda stats: scores


@pytest.mark.parametrize("min_width", [0.0, 0.1])
def test_demonet_layer_collapse_is_stopped_by_the_floors(min_width):
    """The issue's case: DemoNet at sparsity 0.7 cut conv2-conv6 to one channel. Without floors that
    selection does it again; with the default floors every layer keeps at least 10% of its width, and
    the summary says where a floor held."""
    model, x = _demonet()
    oto = OTO(model, x, mode="prune", min_width=min_width)
    _search(oto, x, "dhspg", target_group_sparsity=0.7, saliency=_collapse_saliency(oto))
    sub = oto.construct_subnet()
    widths = [sub.get_submodule(layer).out_channels for layer in ("conv2.0", "conv3.0", "conv4.0", "conv5.0", "conv6")]
    if min_width == 0:
        assert widths == [1, 1, 1, 1, 1]
        return
    full = [model.get_submodule(layer).out_channels for layer in ("conv2.0", "conv3.0", "conv4.0", "conv5.0", "conv6")]
    assert all(w == math.ceil(0.1 * f) for w, f in zip(widths, full)), widths
    assert all(after >= floor for after, floor in _layer_widths(oto).values())
    assert "floor held (min_width=0.1)" in oto.summary() and "conv2.0 keeps >= 10/96" in oto.summary()


def test_floors_can_be_turned_off_and_then_a_tiny_budget_is_reached():
    model, x = _demonet(0.5)
    with pytest.raises(ValueError, match="floor"):
        OTO(model, x, mode="prune").dhspg(budget={"flops": 0.001})
    oto = OTO(model, x, mode="prune", min_width=0.0)
    assert not oto.floors
    _search(oto, x, "dhspg", budget={"flops": 0.001})
    rep = oto.compression_report(oto.construct_subnet())
    assert rep["flop_ratio"] <= 0.001 + TOL


def test_attention_keeps_a_head():
    torch.manual_seed(0)
    model, x = make("transformer_mlp")
    oto = OTO(model, x, mode="prune")
    _search(oto, x, "dhspg", target_group_sparsity=0.95)
    assert all(after >= max(1, floor) for after, floor in _layer_widths(oto).values())


@pytest.mark.parametrize("budget,match", [
    ({"macs": 0.5}, "unknown budget key"),
    ({"flops": 0.0}, r"\(0, 1\]"),
    ({"flops": 1.5}, r"\(0, 1\]"),
    ({"params": -0.2}, r"\(0, 1\]"),
    ({"flops": "half"}, r"\(0, 1\]"),
    ([0.5], "mapping"),
])
def test_bad_budget_is_refused_before_training(budget, match):
    model, x, oto = _traced(_resnet)
    before = _snapshot(model)
    with pytest.raises(ValueError, match=match):
        oto.dhspg(budget=budget)
    with pytest.raises(ValueError, match=match):
        OTOCallback(budget=budget)
    assert _unchanged(model, before)


def test_budget_and_target_together_are_refused():
    model, x, oto = _traced(_resnet)
    with pytest.raises(ValueError, match="not both"):
        oto.dhspg(budget={"flops": 0.5}, target_group_sparsity=0.5)
    with pytest.raises(ValueError, match="not both"):
        OTOSettings(budget={"flops": 0.5}, target_group_sparsity=0.3)
    assert OTOSettings().target_group_sparsity == 0.5 and OTOSettings(budget={"flops": 0.5}).target_group_sparsity is None


def test_budget_below_the_floors_names_the_floor_and_touches_nothing():
    model, x = _demonet(0.5)
    before = _snapshot(model)
    oto = OTO(model, x, mode="prune", min_width=0.5)
    with pytest.raises(ValueError, match=r"min_width=0.5.*conv\d"):
        oto.dhspg(budget={"params": 0.05})
    assert _unchanged(model, before)


def test_latency_budget_on_a_model_that_cannot_run_on_its_device_is_refused():
    model, x, oto = _traced(_resnet)
    before = _snapshot(model)

    def no_kernel(*args, **kwargs):
        raise RuntimeError("no kernel for this device")

    model.forward = no_kernel  # traced already: running is what fails, as a missing device kernel would
    with pytest.raises(ValueError, match=r"latency budget.*\(cpu\).*no kernel"):
        oto.dhspg(budget={"latency": 0.5})
    del model.forward
    assert _unchanged(model, before)


def _clock_sublinear_in_flops(monkeypatch, lucky_first_reading: float | None = None) -> list[float]:
    """Replace the whole-network timing with a clock of ``FLOPs ** 0.6`` (small networks run slower per FLOP, as
    on real devices), so a loaded machine cannot decide the test (timings are benchmarks' business:
    benchmarks/bench_budget.py).  Returns the list of true fractions, one per timing.  With
    ``lucky_first_reading``, the first timing of every sub-network after the calibration's reads that fraction."""
    from lightning_oto.subnet.report import count_flops

    seen: list[float] = []
    timed: set[int] = set()

    def clock(models, inputs, runs=15, warmup=2):
        t = {k: float(count_flops(m, inputs)) ** 0.6 for k, m in models.items()}
        seen.append(t["sub"] / t["full"])
        if lucky_first_reading is not None and len(seen) > 1 and round(t["sub"]) not in timed:
            timed.add(round(t["sub"]))
            t["sub"] = lucky_first_reading * t["full"]
        return t

    monkeypatch.setattr(lightning_oto.oto, "interleaved_times", clock)
    return seen


def _latency_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 48, 3, padding=1), nn.BatchNorm2d(48), nn.ReLU(),
                         nn.Conv2d(48, 96, 3, padding=1), nn.BatchNorm2d(96), nn.ReLU(),
                         nn.Conv2d(96, 96, 3, padding=1), nn.BatchNorm2d(96), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(96, 10))


def test_latency_budget_is_met_as_measured_not_as_modelled(monkeypatch):
    """The per-operator model is an estimate (linear in width, calibrated on two networks); the selection times the
    sub-networks it would build and corrects its modelled target until the measured fraction is within 5% of the
    asked one.  With a clock sublinear in FLOPs the modelled first choice misses; the measured one does not."""
    seen = _clock_sublinear_in_flops(monkeypatch)
    x = torch.randn(2, 3, 16, 16)
    oto = OTO(_latency_net(), x, mode="prune")
    opt = _search(oto, x, "dhspg", budget={"latency": 0.5})
    calibration, first_choice, *loop = seen
    assert abs(first_choice - 0.5) > 0.025 and loop  # modelled alone misses: the loop had work to do
    assert abs(opt.budget_reached["latency"] - 0.5) <= 0.05 * 0.5
    a, b = oto.cost_model(latency=True).calibration["latency"]  # first guess: fitted through full and smallest
    assert 0 < b and math.isclose(a + b, 1.0)
    rep = oto.budget_report(oto.construct_subnet(), {"latency": 0.5})  # the constructed sub-network, same clock
    assert rep["latency"]["asked"] == 0.5
    assert rep["latency"]["reached"] == pytest.approx(opt.budget_reached["latency"], abs=1e-6)


def test_a_lucky_timing_is_timed_again_before_the_latency_budget_counts_as_met(monkeypatch):
    """The first timing of every sub-network reads exactly the asked fraction (a lucky sample), the later ones the
    truth (``FLOPs ** 0.6``).  One timing must not end the search: the try is timed again, counts with the mean
    of its two readings, and what is reported is that mean, within the tolerance."""
    truth = _clock_sublinear_in_flops(monkeypatch, lucky_first_reading=0.5)
    x = torch.randn(2, 3, 16, 16)
    oto = OTO(_latency_net(), x, mode="prune")
    opt = _search(oto, x, "dhspg", budget={"latency": 0.5})
    reached = opt.budget_reached["latency"]
    assert abs(reached - 0.5) <= 0.05 * 0.5 and reached != 0.5  # the mean of a lucky and a true reading
    kept_truth = 2 * reached - 0.5
    assert any(math.isclose(kept_truth, t, rel_tol=1e-9) for t in truth)  # (old code: the lucky 0.5 itself)


def test_latency_budget_without_measurement_meets_the_modelled_fraction(monkeypatch):
    """A cost model without ``measure_latency`` (plain data) keeps the modelled selection: nothing is timed after
    the calibration."""
    seen = _clock_sublinear_in_flops(monkeypatch)
    x = torch.randn(2, 3, 16, 16)
    oto = OTO(_latency_net(), x, mode="prune")
    oto.cost_model(latency=True).measure_latency = None
    opt = _search(oto, x, "dhspg", budget={"latency": 0.5})
    assert abs(opt.budget_reached["latency"] - 0.5) <= TOL and len(seen) == 1


def test_check_budget_drops_unset_keys():
    assert check_budget({"flops": 0.5, "params": None, "latency": None}) == {"flops": 0.5}
    assert check_budget(None) == {} and check_budget({"flops": None}) == {}


def test_sweep_cell_shows_asked_and_reached():
    assert budget_cell({"budget": {"flops": 0.5}, "budget_reached": {"flops": 0.4931}}) == "flops 0.5 -> 0.493"
    assert budget_cell({"budget": None}) == "–"


@pytest.mark.slow
def test_hydra_budget_run_writes_asked_and_reached(tmp_path):
    from test_hydra import FAST, TINY, _compose
    from omegaconf import OmegaConf, open_dict

    from lightning_oto.train import run

    cfg = _compose(["experiment=demonet", *FAST, *TINY["demonet"], "oto.budget.flops=0.5"])
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)
    OmegaConf.resolve(cfg.trainer)
    result = run(cfg)
    assert result["budget"] == {"flops": 0.5} and result["target_group_sparsity"] is None
    assert abs(result["budget_reached"]["flops"] - 0.5) <= TOL
    assert abs(result["flop_ratio"] - 0.5) <= TOL


def test_mixin_reads_budget_and_floors_from_hparams():
    import lightning as L

    from lightning_oto import OTOMixin

    class Lit(OTOMixin, L.LightningModule):
        def __init__(self, budget, min_width=0.2):
            super().__init__()
            self.save_hyperparameters()
            self.net, self.example_input_array = _resnet()

        def forward(self, x):
            return self.net(x)

    opt = Lit({"params": 0.5}).oto_optimizer(warmup_steps=1, projection_steps=2)
    assert opt.budget == {"params": 0.5} and opt.cost_model is not None
    lit = Lit({"params": 0.5})
    assert all(f.keep >= math.ceil(0.2 * f.width) for f in lit.oto.floors) and lit.oto.floors
    with pytest.raises(ValueError, match="not both"):
        Lit({"params": 0.5}).oto_optimizer(target_group_sparsity=0.3, warmup_steps=1, projection_steps=2)


def test_budget_on_a_forward_taking_one_dict():
    """The cost pass calls the model as the trace does: ``(batch,)`` is one positional dict, not keywords."""

    class DictNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(8, 32), nn.Linear(32, 4)

        def forward(self, batch: dict) -> torch.Tensor:
            return self.b(torch.relu(self.a(batch["x"])))

    torch.manual_seed(0)
    oto = OTO(DictNet(), ({"x": torch.randn(3, 8)},), mode="prune")
    costs = oto.cost_model()
    tracker = costs.tracker()
    for g in oto.prunable_groups[: len(oto.prunable_groups) // 2]:
        tracker.add(g.id)
    assert 0.0 < tracker.fractions()["flops"] < 1.0  # half of a's rows (and b's columns) go
