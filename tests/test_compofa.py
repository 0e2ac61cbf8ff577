"""CompOFA track: design-space counts, nested weight sharing, extraction/export, latency memo,
evolutionary search, BN recalibration, Lightning training, end-to-end smoke run."""
from __future__ import annotations

import copy
import json
import math
import random
import zlib

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_oto.compofa import (
    AccuracyEvaluator,
    CompOFAModule,
    CompOFARunConfig,
    CompOFASupernet,
    DesignSpace,
    EvolutionConfig,
    LatencyTable,
    SubnetConfig,
    SupernetConfig,
    best_under,
    compofa_phases,
    crossover,
    evolutionary_search,
    exhaustive_evaluation,
    extract_subnet,
    frozen_teacher,
    max_abs_diff_vs_supernet,
    measure_latency_ms,
    mutate,
    pareto_front,
    progressive_shrinking_phases,
    recalibrate_bn,
    run_compofa,
    train_phases,
)
from lightning_oto.compofa.training import make_trainer
from lightning_oto.subnet.export import export_subnet


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny convs: one thread is as fast and avoids oversubscription on shared CI cores."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


def tiny_cfg(**kw) -> SupernetConfig:
    base = dict(
        input_size=16,
        stem_channels=8,
        stage_channels=[8, 8, 16, 16, 24],
        stage_strides=[1, 2, 1, 2, 1],
        head_channels=32,
    )
    base.update(kw)
    return SupernetConfig(**base)


def randomize_bn(net: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(n, generator=g))
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.1)


def data_loader(n: int = 64, size: int = 16, batch: int = 16, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, size, size, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=False)


# ---------------------------------------------------------------------------------------------
# design space
# ---------------------------------------------------------------------------------------------
def test_compound_count_is_243_from_config():
    cfg = SupernetConfig()
    space = DesignSpace.compound(cfg)
    expected = len(list(zip(cfg.depth_choices, cfg.expand_choices))) ** cfg.num_stages
    assert expected == 3**5 == 243
    assert space.num_architectures() == expected
    keys = {c.key() for c in space.enumerate()}
    assert len(keys) == 243
    # every member is coupled: the i-th depth goes with the i-th width for all blocks of a stage
    pair = dict(zip(sorted(cfg.depth_choices), sorted(cfg.expand_choices)))
    for c in space.enumerate():
        for d, e, k in zip(c.depths, c.expands, c.kernels):
            assert set(e) == {pair[d]} and len(e) == d
        assert [k[0] for k in c.kernels] == cfg.stage_kernels
    # the count follows the config
    four = SupernetConfig(
        stage_channels=[8, 8, 8, 8], stage_strides=[1] * 4, stage_kernels=[3] * 4, stage_se=[False] * 4, stage_act=["relu"] * 4
    )
    assert DesignSpace.compound(four).num_architectures() == 81
    # resolution is elastic: more configs to measure, not more architectures
    sp2 = DesignSpace.compound(cfg, resolutions=[24, 28])
    assert sp2.num_architectures() == 243 and sp2.num_configs() == 486


def test_uncoupled_counts():
    cfg = SupernetConfig(kernel_choices=[3, 5, 7])
    ofa = DesignSpace.ofa(cfg)
    assert ofa.num_architectures() == (3**2 + 3**3 + 3**4) ** 5  # 117**5 ~ 2.2e10
    ofa_k = DesignSpace.ofa(cfg, elastic_kernel=True)
    assert ofa_k.num_architectures() == (9**2 + 9**3 + 9**4) ** 5
    assert 1e19 < ofa_k.num_architectures() < 1e20  # the paper's O(10^19)
    comp_k = DesignSpace.compound(cfg, elastic_kernel=True)
    assert comp_k.num_architectures() == (3**2 + 3**3 + 3**4) ** 5  # paper: ~10^10
    # formula agrees with brute-force enumeration on a small uncoupled space
    small = SupernetConfig(
        stage_channels=[8, 8], stage_strides=[1, 1], stage_kernels=[3, 3], stage_se=[False, False],
        stage_act=["relu", "relu"], depth_choices=[1, 2], expand_choices=[3, 6], kernel_choices=[3, 5],
    )
    for sp in (DesignSpace.ofa(small), DesignSpace.ofa(small, elastic_kernel=True), DesignSpace.compound(small, elastic_kernel=True)):
        assert len({c.key() for c in sp.enumerate()}) == sp.num_architectures()


def test_genome_roundtrip_and_membership():
    cfg = SupernetConfig()
    rng = random.Random(0)
    comp, ofa = DesignSpace.compound(cfg), DesignSpace.ofa(cfg)
    for _ in range(20):
        c = comp.sample(rng)
        assert comp.contains(c) and ofa.contains(c)
        assert comp.decode(comp.encode(c)) == c
        o = ofa.sample(rng)
        assert ofa.decode(ofa.encode(o)) == o
        assert SubnetConfig.from_dict(json.loads(json.dumps(o.to_dict()))) == o
    mixed = SubnetConfig((2,) * 5, ((3, 6),) * 5, tuple((k, k) for k in cfg.stage_kernels), 28)
    assert ofa.contains(mixed) and not comp.contains(mixed)
    with pytest.raises(ValueError):
        comp.encode(mixed)


# ---------------------------------------------------------------------------------------------
# supernet
# ---------------------------------------------------------------------------------------------
def test_reorder_preserves_full_network_output():
    torch.manual_seed(0)
    net = CompOFASupernet(tiny_cfg())
    randomize_bn(net)
    net.eval()
    x = torch.randn(4, 1, 16, 16)
    before = net(x)
    net.reorder_channels_by_importance()
    after = net(x)
    assert torch.allclose(before, after, atol=1e-5), (before - after).abs().max()
    for blocks in net.stages:
        for blk in blocks:
            imp = blk.project_conv.weight.abs().sum(dim=(0, 2, 3))
            assert torch.all(imp[:-1] >= imp[1:])  # most important middle channels first


def test_prefix_sliced_forward_random_configs():
    torch.manual_seed(0)
    cfg = tiny_cfg(kernel_choices=[3, 5, 7])
    net = CompOFASupernet(cfg)
    rng = random.Random(1)
    spaces = [DesignSpace.compound(cfg), DesignSpace.ofa(cfg, elastic_kernel=True)]
    for sp in spaces:
        for _ in range(4):
            c = sp.sample(rng).with_resolution(rng.choice([12, 16]))
            net.set_active(c)
            out = net(torch.randn(3, 1, c.resolution, c.resolution))
            assert out.shape == (3, 10) and torch.isfinite(out).all()
    # nested sharing: training a small network only touches the weight prefix
    net.zero_grad()
    small = DesignSpace.compound(cfg).min_config()
    net.set_active(small)
    net(torch.randn(4, 1, 16, 16)).sum().backward()
    blk0 = net.stages[0][0]
    mid = blk0.mid_channels(small.expands[0][0])
    assert blk0.expand_conv.weight.grad[:mid].abs().sum() > 0
    assert blk0.expand_conv.weight.grad[mid:].abs().sum() == 0
    unused = net.stages[0][small.depths[0]]  # first inactive block of stage 0
    assert unused.expand_conv.weight.grad is None or unused.expand_conv.weight.grad.abs().sum() == 0
    with pytest.raises(ValueError):
        net.set_active(SubnetConfig((5,) * 5, ((6,) * 5,) * 5, ((3,) * 5,) * 5, 16))


# ---------------------------------------------------------------------------------------------
# extraction and export
# ---------------------------------------------------------------------------------------------
def test_extraction_equals_supernet_outputs():
    torch.manual_seed(0)
    cfg = tiny_cfg(kernel_choices=[3, 5, 7])
    net = CompOFASupernet(cfg)
    randomize_bn(net, 1)
    net.reorder_channels_by_importance()
    comp = DesignSpace.compound(cfg)
    ofa = DesignSpace.ofa(cfg, elastic_kernel=True)
    rng = random.Random(2)
    configs = [comp.min_config(), comp.max_config(), comp.sample(rng), comp.sample(rng), ofa.sample(rng), ofa.max_config()]
    x = torch.randn(5, 1, 16, 16)
    for c in configs:
        sub = extract_subnet(net, c)
        assert not any("Elastic" in type(m).__name__ for m in sub.modules())
        assert max_abs_diff_vs_supernet(net, sub, c, x) <= 1e-5
    # the extracted network is a copy: changing the supernet does not change it
    c = configs[2]
    sub = extract_subnet(net, c).eval()
    ref = sub(x)
    with torch.no_grad():
        net.stages[0][0].expand_conv.weight.add_(1.0)
    assert torch.equal(sub(x), ref)
    n_small = sum(p.numel() for p in extract_subnet(net, comp.min_config()).parameters())
    n_big = sum(p.numel() for p in extract_subnet(net, comp.max_config()).parameters())
    assert n_small < n_big


def test_export_torch_and_onnx_match(tmp_path):
    import onnxruntime as ort

    torch.manual_seed(0)
    # two stages (plain ReLU; squeeze-excitation with h-swish): every block kind at 2/5 of the five stages' graph,
    # which torch.export, its reload and the ONNX exporter each pay for (56 s -> 20 s on the shared cores)
    cfg = tiny_cfg(stage_channels=[8, 16], stage_strides=[1, 2], stage_kernels=[3, 5], stage_se=[False, True],
                   stage_act=["relu", "hswish"])
    net = CompOFASupernet(cfg)
    randomize_bn(net, 2)
    c = DesignSpace.compound(cfg).sample(random.Random(3))
    assert set(c.depths) != {min(cfg.depth_choices)}  # a stage with more than the shallowest depth
    sub = extract_subnet(net, c).eval()
    x = torch.randn(1, 1, 16, 16)
    res = export_subnet(sub, (x,), tmp_path / "s", formats=("torch", "onnx"))  # the project's one exporter
    assert float(res["onnx_check_error"]) <= 1e-4 and float(res["program_check_error"]) <= 1e-5
    # independent onnxruntime check on a different input
    sess = ort.InferenceSession(res["onnx"], providers=["CPUExecutionProvider"])
    x2 = torch.randn(1, 1, 16, 16)
    got = sess.run(None, {sess.get_inputs()[0].name: x2.numpy()})[0]
    with torch.no_grad():
        assert abs(got - sub(x2).numpy()).max() <= 1e-4
    # torch formats load back
    ep = torch.export.load(res["program"])
    with torch.no_grad():
        assert torch.allclose(ep.module()(x2), sub(x2), atol=1e-6)
    fresh = extract_subnet(CompOFASupernet(cfg), c)
    fresh.load_state_dict(torch.load(res["state_dict"]))
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x2), sub(x2))


# ---------------------------------------------------------------------------------------------
# latency memo
# ---------------------------------------------------------------------------------------------
def test_latency_memo_hits_and_resolution_keys(tmp_path):
    calls: list[str] = []

    def fake(cfg: SubnetConfig) -> float:
        calls.append(cfg.key())
        return float(sum(cfg.depths)) + cfg.resolution / 100

    sp = DesignSpace.compound(SupernetConfig(), resolutions=[24, 28])
    c = sp.sample(random.Random(0))
    table = LatencyTable(fake)
    a = table(c)
    b = table(c)
    assert a == b and len(calls) == 1 and table.hits == 1 and table.misses == 1
    c24, c28 = c.with_resolution(24), c.with_resolution(28)
    assert c24.key() != c28.key() and "r24" in c24.key()
    table(c24)
    table(c28)
    assert len(calls) == 2  # c is one of c24/c28: only the other resolution was new
    assert table.distinct_per_resolution() == {24: 1, 28: 1}
    # persist and reload: no re-measurement
    p = tmp_path / "lat.json"
    table.save(str(p))
    t2 = LatencyTable.load(str(p), fake)
    assert t2(c24) == table(c24) and len(calls) == 2 and t2.hits == 1
    # memo off: every lookup measures
    off = LatencyTable(fake, enabled=False)
    off(c)
    off(c)
    assert off.measurements == 2 and off.hits == 0
    # no measuring function and unknown key -> clear error
    with pytest.raises(KeyError):
        LatencyTable()(c)


def test_measure_latency_ms_real_module():
    prev = torch.get_num_threads()
    sub = extract_subnet(CompOFASupernet(tiny_cfg()), DesignSpace.compound(tiny_cfg()).min_config())
    ms = measure_latency_ms(sub, (1, 1, 16, 16), num_threads=1, warmup=1, runs=3)
    assert ms > 0 and math.isfinite(ms)
    assert torch.get_num_threads() == prev


# ---------------------------------------------------------------------------------------------
# search
# ---------------------------------------------------------------------------------------------
def fake_latency(cfg: SubnetConfig) -> float:
    return sum(d * e[0] for d, e in zip(cfg.depths, cfg.expands)) / 10.0


def fake_accuracy(cfg: SubnetConfig) -> float:
    # bigger is better, with a deterministic architecture-dependent wiggle
    return sum(d * (s + 1) for s, d in enumerate(cfg.depths)) + (zlib.crc32(cfg.key().encode()) % 7) / 100.0


def test_mutation_and_crossover_keep_coupling():
    cfg = SupernetConfig()
    sp = DesignSpace.compound(cfg)
    assert sp.gene_sizes() == [3] * 5  # one compound index per stage
    rng = random.Random(0)
    for _ in range(200):
        a, b = sp.random_genes(rng), sp.random_genes(rng)
        for g in (mutate(sp, a, 0.5, rng), crossover(a, b, rng)):
            assert sp.contains(sp.decode(g))


def test_evolutionary_search_respects_latency_target():
    sp = DesignSpace.compound(SupernetConfig())
    seen: list[SubnetConfig] = []

    def lat(cfg):
        seen.append(cfg)
        return fake_latency(cfg)

    rows = exhaustive_evaluation(sp, fake_accuracy, fake_latency)
    assert len(rows) == 243
    lo, hi = min(r["latency_ms"] for r in rows), max(r["latency_ms"] for r in rows)
    for target in (lo + 0.3 * (hi - lo), lo + 0.7 * (hi - lo)):
        res = evolutionary_search(sp, fake_accuracy, lat, target, EvolutionConfig(population_size=16, num_iterations=15, seed=1))
        assert res.feasible and res.latency_ms <= target and fake_latency(res.config) <= target
        best = best_under(rows, target)
        assert res.accuracy <= best["accuracy"] + 1e-12
        feasible = sorted(r["accuracy"] for r in rows if r["latency_ms"] <= target)
        assert res.accuracy >= feasible[int(0.9 * (len(feasible) - 1))]  # top decile of the feasible set
        assert res.history == sorted(res.history)  # elitist: best never gets worse
    assert seen and all(sp.contains(c) for c in seen)  # every candidate kept the coupling
    bad = evolutionary_search(sp, fake_accuracy, fake_latency, lo - 1.0)
    assert not bad.feasible and bad.config is None
    assert pareto_front([(1.0, 0.5), (2.0, 0.4), (2.0, 0.9), (3.0, 0.8)]) == [0, 2]


# ---------------------------------------------------------------------------------------------
# BN recalibration and training
# ---------------------------------------------------------------------------------------------
def test_recalibrate_bn_changes_running_stats_exactly():
    torch.manual_seed(0)
    cfg = tiny_cfg()
    net = CompOFASupernet(cfg)
    c = DesignSpace.compound(cfg).min_config()
    loader = data_loader(48, 16, 16)
    blk = net.stages[0][0]
    mid = blk.mid_channels(c.expands[0][0])
    before = {n: b.clone() for n, b in net.named_buffers() if "running" in n}
    active_before = net.active_config
    n_updated = recalibrate_bn(net, c, loader, num_batches=2)
    assert n_updated > 0
    after = dict(net.named_buffers())
    changed = [n for n in before if not torch.equal(before[n], after[n])]
    assert changed
    # exact statistics of the first 2 batches for the stem BN
    xs = torch.cat([b[0] for i, b in enumerate(loader) if i < 2])
    with torch.no_grad():
        z = net.stem[0](xs)
    assert torch.allclose(net.stem[1].running_mean, z.mean((0, 2, 3)), atol=1e-5)
    assert torch.allclose(net.stem[1].running_var, z.var((0, 2, 3), unbiased=True), rtol=1e-4, atol=1e-6)
    # only the active prefix is rewritten; inactive channels and blocks keep their stats
    assert torch.equal(blk.expand_bn.running_mean[mid:], before["stages.0.0.expand_bn.running_mean"][mid:])
    unused = f"stages.0.{c.depths[0]}.expand_bn.running_mean"
    assert torch.equal(after[unused], before[unused])
    # the supernet's mode and active config are restored
    assert net.training and net.active_config == active_before


@pytest.mark.filterwarnings("ignore:.*in eval mode")
def test_lightning_two_steps_trains_student_not_teacher():
    torch.manual_seed(0)
    cfg = tiny_cfg()
    net = CompOFASupernet(cfg)
    teacher = frozen_teacher(net)
    t_before = copy.deepcopy(teacher.state_dict())
    s_before = copy.deepcopy(net.state_dict())
    module = CompOFAModule(net, DesignSpace.compound(cfg), teacher=teacher, n_sample=2, lr=0.05, kd_temperature=2.0)
    trainer = make_trainer(epochs=1, max_steps=2)
    trainer.fit(module, train_dataloaders=data_loader(64, 16, 16))
    assert trainer.global_step == 2 and module.sampled_subnets == 4
    assert len(module.loss_history) == 2 and all(math.isfinite(v) for v in module.loss_history)
    changed = [k for k, v in net.state_dict().items() if v.is_floating_point() and not torch.equal(v, s_before[k])]
    assert any(k.endswith("weight") and "conv" in k for k in changed)
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, t_before[k]), k  # not even BN running stats moved
    assert not teacher.training and all(not p.requires_grad for p in teacher.parameters())


def test_phase_schedules_and_chained_training():
    cfg = tiny_cfg()
    comp = compofa_phases(cfg, teacher_epochs=1, warmup_epochs=1, epochs=1)
    assert [p.name for p in comp] == ["teacher", "compound-1", "compound-2"]
    assert comp[0].space.num_architectures() == 1 and not comp[0].distill
    assert comp[1].space.num_architectures() == 243 and comp[1].n_sample == 4 and comp[1].reorder_before
    ps = progressive_shrinking_phases(cfg, teacher_epochs=1, short_epochs=1, long_epochs=1)
    assert [p.name for p in ps] == ["teacher", "depth-1", "depth-2", "width-1", "width-2"]
    assert [p.n_sample for p in ps] == [1, 2, 2, 4, 4]
    assert ps[-1].space.num_architectures() == DesignSpace.ofa(cfg).num_architectures()
    # chain teacher -> compound with one step per phase
    for p in comp:
        p.max_steps = 1
    net = CompOFASupernet(cfg)
    res = train_phases(net, comp, data_loader(32, 16, 16))
    assert [r["steps"] for r in res.phases] == [1, 1, 1]
    assert [r["sampled_subnets"] for r in res.phases] == [1, 4, 4]
    assert res.teacher is not None and not res.teacher.training
    acc = AccuracyEvaluator(net, data_loader(32, 16, 16), data_loader(32, 16, 16, seed=1), calib_batches=1)
    c = DesignSpace.compound(cfg).min_config()
    a1 = acc(c)
    assert 0.0 <= a1 <= 1.0 and acc(c) == a1 and acc.evaluations == 1


# ---------------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------------
def test_run_compofa_end_to_end_smoke(tmp_path):
    out = run_compofa(
        {
            "output_dir": str(tmp_path / "run"),
            "dataset": "synthetic",
            "num_samples": 160,
            "batch_size": 32,
            "input_size": 16,
            "stem_channels": 8,
            "stage_channels": [8, 8, 16, 16, 24],
            "stage_strides": [1, 2, 1, 2, 1],
            "head_channels": 32,
            "teacher_epochs": 1,
            "compound_warmup_epochs": 0,
            "compound_epochs": 1,
            "n_sample": 2,
            "latency_warmup": 0,
            "latency_runs": 1,
            "num_latency_targets": 2,
            "population_size": 4,
            "num_iterations": 1,
            "calib_batches": 1,
            "export_formats": ["torch"],
            "resolutions": [12, 16],  # elastic resolution: latency keyed per resolution
        }
    )
    assert out["num_architectures"] == 243
    assert [p["name"] for p in out["training"]["phases"]] == ["teacher", "compound-2"]
    stats = out["search"]["latency_table"]
    per_res = stats["distinct_per_resolution"]
    assert set(per_res) <= {12, 16} and all(0 < n <= 243 for n in per_res.values()) and stats["hits"] > 0
    assert out["num_configs_with_resolution"] == 486
    for r in out["pareto"]:
        if r["feasible"]:
            assert r["latency_ms"] <= r["target_ms"] and r["extract_max_abs_diff"] <= 1e-5
    for f in out["files"].values():
        assert (tmp_path / "run" / f.split("/")[-1]).exists()
    with pytest.raises(ValueError):
        CompOFARunConfig.from_any({"no_such_key": 1})
