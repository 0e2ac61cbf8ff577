"""End-to-end CompOFA run: train (teacher -> compound) -> search -> extract -> export -> report.

``run_compofa`` takes a flat, serializable :class:`CompOFARunConfig` (or a dict of its fields) so a
Hydra config can call it directly.  Defaults finish in a few minutes on 2 CPU cores with the
offline digits data; scale epochs/search sizes up for real runs.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

import torch

from ..subnet.export import export_subnet
from ..subnet.report import count_flops, count_params
from .data import Loaders, build_loaders
from .extract import extract_subnet, max_abs_diff_vs_supernet
from .latency import LatencyTable, supernet_latency_fn
from .report import plot_pareto, write_table
from .search import EvolutionConfig, SearchResult, best_under, default_targets, exhaustive_evaluation, pareto_front, search_pareto
from .space import DesignSpace, SupernetConfig
from .supernet import CompOFASupernet
from .training import AccuracyEvaluator, TrainResult, compofa_phases, evaluate_accuracy, recalibrate_bn, train_phases


def _default(cls: type, name: str) -> Any:
    """The default of dataclass ``cls``'s field ``name`` (one place for each default)."""
    return cls.__dataclass_fields__[name].default


def _default_list(cls: type, name: str) -> Any:
    """A field whose default is a fresh copy of ``cls``'s list default."""
    factory = cls.__dataclass_fields__[name].default_factory
    return field(default_factory=lambda: list(factory()))


@dataclass
class CompOFARunConfig:
    """Everything ``run_compofa`` needs; flat and YAML-serializable (lists, not tuples)."""

    output_dir: str = "outputs/compofa"
    seed: int = 0
    num_threads: int = 1  # small convs: 1 thread is as fast and immune to oversubscription
    # data
    dataset: str = "digits"  # digits | mnist | synthetic
    batch_size: int = 64
    num_samples: int | None = None  # synthetic: pool size; others: per-split cap
    # supernet (see SupernetConfig, whose defaults these are)
    input_size: int = _default(SupernetConfig, "input_size")
    stem_channels: int = _default(SupernetConfig, "stem_channels")
    stage_channels: list[int] = _default_list(SupernetConfig, "stage_channels")
    stage_strides: list[int] = _default_list(SupernetConfig, "stage_strides")
    stage_kernels: list[int] = _default_list(SupernetConfig, "stage_kernels")
    stage_se: list[bool] = _default_list(SupernetConfig, "stage_se")
    stage_act: list[str] = _default_list(SupernetConfig, "stage_act")
    depth_choices: list[int] = _default_list(SupernetConfig, "depth_choices")
    expand_choices: list[int] = _default_list(SupernetConfig, "expand_choices")
    head_channels: int = _default(SupernetConfig, "head_channels")
    resolutions: list[int] | None = None  # elastic resolution for search; default [input_size]
    # training (paper: teacher 180 ep, compound 25 + 125 ep; scaled down)
    teacher_epochs: int = 3
    compound_warmup_epochs: int = 1
    compound_epochs: int = 2
    teacher_lr: float = 0.1
    compound_warmup_lr: float = 0.02
    compound_lr: float = 0.05
    n_sample: int = 4
    kd_ratio: float = 1.0
    kd_temperature: float = 1.0
    teacher_mode: str = "copy"  # copy (frozen trained full net) | inplace (largest subnet, no grad)
    momentum: float = 0.9
    weight_decay: float = 3e-5
    # BN recalibration / evaluation
    calib_size: int = 256
    calib_batches: int = 2
    # latency
    latency_threads: int = 1
    latency_warmup: int = 2
    latency_runs: int = 5
    latency_table: str | None = None  # JSON to load (and update); default <output_dir>/latency_table.json
    # search
    latency_targets_ms: list[float] | None = None  # default: spread between min and max network
    num_latency_targets: int = 3
    exhaustive: bool = False  # evaluate all 243 instead of evolutionary search
    # evolution (see EvolutionConfig, whose defaults these are)
    population_size: int = _default(EvolutionConfig, "population_size")
    num_iterations: int = _default(EvolutionConfig, "num_iterations")
    parent_ratio: float = _default(EvolutionConfig, "parent_ratio")
    mutation_ratio: float = _default(EvolutionConfig, "mutation_ratio")
    mutate_prob: float = _default(EvolutionConfig, "mutate_prob")
    # extraction / export
    export_formats: list[str] = field(default_factory=lambda: ["torch", "onnx"])

    def supernet_config(self, num_classes: int = 10) -> SupernetConfig:
        return SupernetConfig(
            input_size=self.input_size,
            in_channels=1,
            num_classes=num_classes,
            stem_channels=self.stem_channels,
            stage_channels=list(self.stage_channels),
            stage_strides=list(self.stage_strides),
            stage_kernels=list(self.stage_kernels),
            stage_se=list(self.stage_se),
            stage_act=list(self.stage_act),
            depth_choices=list(self.depth_choices),
            expand_choices=list(self.expand_choices),
            head_channels=self.head_channels,
        )

    def evolution_config(self) -> EvolutionConfig:
        return EvolutionConfig(
            population_size=self.population_size,
            num_iterations=self.num_iterations,
            parent_ratio=self.parent_ratio,
            mutation_ratio=self.mutation_ratio,
            mutate_prob=self.mutate_prob,
            seed=self.seed,
        )

    @classmethod
    def from_any(cls, cfg: "CompOFARunConfig | Mapping[str, Any] | None") -> "CompOFARunConfig":
        """Accept the dataclass, a plain dict, or a DictConfig-like mapping (unknown keys rejected)."""
        if cfg is None:
            return cls()
        if isinstance(cfg, cls):
            return cfg
        if dataclasses.is_dataclass(cfg):
            cfg = asdict(cfg)  # type: ignore[arg-type]
        if type(cfg).__name__ == "DictConfig":  # Hydra / OmegaConf
            from omegaconf import OmegaConf

            cfg = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
        d = dict(cfg.items()) if hasattr(cfg, "items") else dict(cfg)  # type: ignore[arg-type]
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown CompOFA config keys: {unknown}")
        d = {k: (list(v) if isinstance(v, (tuple,)) or type(v).__name__ == "ListConfig" else v) for k, v in d.items()}
        return cls(**d)


def run_compofa(cfg_like: "CompOFARunConfig | Mapping[str, Any] | None" = None,
                trainer_kwargs: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Train the supernet (teacher -> compound), search per latency target, extract, export, report.

    ``trainer_kwargs`` (e.g. the Hydra ``trainer`` config's accelerator / devices / strategy / precision)
    go to every training phase's ``lightning.Trainer``.  Writes into ``output_dir``: ``supernet.pt``,
    ``latency_table.json``, ``pareto.{csv,md,png}``, ``subnets/<name>/`` (the export of each selected
    network and its ``config.json``) and ``summary.json`` (also returned).
    """
    cfg = CompOFARunConfig.from_any(cfg_like)
    os.makedirs(cfg.output_dir, exist_ok=True)
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(max(1, int(cfg.num_threads)))
    t_start = time.perf_counter()
    try:
        random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        loaders = build_loaders(cfg.dataset, cfg.input_size, cfg.batch_size, calib_size=cfg.calib_size,
                                seed=cfg.seed, num_samples=cfg.num_samples)
        sn_cfg = cfg.supernet_config(loaders.num_classes)
        supernet = CompOFASupernet(sn_cfg)
        space = DesignSpace.compound(sn_cfg, resolutions=cfg.resolutions or [cfg.input_size])
        train = _train(cfg, supernet, loaders, trainer_kwargs)
        search = _search(cfg, supernet, space, loaders)
        rows, exported = _extract_and_export(cfg, supernet, search["results"], loaders)
        _write_pareto(cfg.output_dir, rows, search)
        summary = _summary(cfg, supernet, space, loaders, train, search, rows, exported)
        summary["total_time_s"] = round(time.perf_counter() - t_start, 2)
        with open(os.path.join(cfg.output_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1, default=str)
        return summary
    finally:
        torch.set_num_threads(prev_threads)


def _train(cfg: CompOFARunConfig, supernet: CompOFASupernet, loaders: Loaders,
           trainer_kwargs: Mapping[str, Any] | None) -> TrainResult:
    """Teacher -> compound training (one config, chained phases); saves ``supernet.pt``."""
    phases = compofa_phases(
        supernet.cfg, teacher_epochs=cfg.teacher_epochs, warmup_epochs=cfg.compound_warmup_epochs,
        epochs=cfg.compound_epochs, teacher_lr=cfg.teacher_lr, warmup_lr=cfg.compound_warmup_lr,
        lr=cfg.compound_lr, n_sample=cfg.n_sample)
    train = train_phases(
        supernet, phases, loaders.train, teacher="inplace" if cfg.teacher_mode == "inplace" else None,
        kd_ratio=cfg.kd_ratio, kd_temperature=cfg.kd_temperature, momentum=cfg.momentum,
        weight_decay=cfg.weight_decay, seed=cfg.seed, trainer_kwargs=trainer_kwargs)
    torch.save(supernet.state_dict(), os.path.join(cfg.output_dir, "supernet.pt"))
    return train


def _latency_table(cfg: CompOFARunConfig, supernet: CompOFASupernet) -> tuple[LatencyTable, str, bool]:
    """The memoized latency table: reused from disk when machine kind, supernet and protocol match."""
    path = cfg.latency_table or os.path.join(cfg.output_dir, "latency_table.json")
    measure = supernet_latency_fn(supernet, num_threads=cfg.latency_threads, warmup=cfg.latency_warmup,
                                  runs=cfg.latency_runs)
    meta = {
        "supernet": hashlib.sha1(json.dumps(supernet.cfg.to_dict(), sort_keys=True).encode()).hexdigest()[:12],
        "threads": cfg.latency_threads, "batch": 1, "warmup": cfg.latency_warmup, "runs": cfg.latency_runs,
    }
    table = LatencyTable(measure, meta=meta)
    if os.path.exists(path):
        old = LatencyTable.load(path, measure)
        if all(old.meta.get(k) == v for k, v in table.meta.items()):
            return old, path, True
    return table, path, False


def _search(cfg: CompOFARunConfig, supernet: CompOFASupernet, space: DesignSpace,
            loaders: Loaders) -> dict[str, Any]:
    """Best sub-network per latency target (evolutionary, or exhaustive over all 243)."""
    acc_fn = AccuracyEvaluator(supernet, loaders.calib, loaders.val, cfg.calib_batches)
    lat_table, lat_path, reused = _latency_table(cfg, supernet)
    t_search = time.perf_counter()
    lat_table.measure(space.max_config())  # throwaway: first-call kernel/allocator setup must not inflate a target
    lat_lo = min(lat_table(space.min_config().with_resolution(r)) for r in space.resolutions)
    lat_hi = max(lat_table(space.max_config().with_resolution(r)) for r in space.resolutions)
    targets = list(cfg.latency_targets_ms or default_targets(lat_lo, lat_hi, cfg.num_latency_targets))
    if cfg.exhaustive:
        rows = exhaustive_evaluation(space, acc_fn, lat_table)
        results = []
        for t in targets:
            b = best_under(rows, t)
            results.append(SearchResult(t, b is not None, b["config"] if b else None,
                                        b["accuracy"] if b else float("nan"), b["latency_ms"] if b else float("nan"),
                                        candidates_checked=len(rows)))
    else:
        results = search_pareto(space, acc_fn, lat_table, targets, cfg.evolution_config())
    search_time = time.perf_counter() - t_search
    lat_table.save(lat_path)
    return {"results": results, "acc_fn": acc_fn, "lat_table": lat_table, "lat_path": lat_path,
            "reused": reused, "targets": targets, "time_s": search_time}


def _extract_and_export(cfg: CompOFARunConfig, supernet: CompOFASupernet, results: list[SearchResult],
                        loaders: Loaders) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Extract each selected network, check it against the supernet, count and export it (once per network)."""
    sub_dir = os.path.join(cfg.output_dir, "subnets")
    rows: list[dict[str, Any]] = []
    exported: dict[str, Any] = {}
    for res in results:
        row = res.row()
        if res.feasible and res.config is not None:
            c = res.config
            recalibrate_bn(supernet, c, loaders.calib, cfg.calib_batches)
            sub = extract_subnet(supernet, c).eval()
            x = torch.randn(2, 1, c.resolution, c.resolution)
            row["extract_max_abs_diff"] = max_abs_diff_vs_supernet(supernet, sub, c, x)
            row["test_accuracy"] = round(evaluate_accuracy(sub, c, loaders.test), 4)
            row["params"] = count_params(sub)
            row["mflops"] = round(count_flops(sub, x[:1]) / 1e6, 3)
            name = c.short().replace("@", "_r")
            if name not in exported and cfg.export_formats:
                exported[name] = export_subnet(sub, (x[:1],), os.path.join(sub_dir, name),
                                               formats=cfg.export_formats)
                with open(os.path.join(sub_dir, name, "config.json"), "w") as f:
                    json.dump(c.to_dict(), f)
            row["export"] = name
        rows.append(row)
    front = pareto_front([(r["latency_ms"], r["accuracy"]) for r in rows if r["feasible"]])
    for i, feasible in enumerate(r for r in rows if r["feasible"]):
        feasible["pareto_optimal"] = i in front
    return rows, exported


def _write_pareto(out: str, rows: list[dict[str, Any]], search: dict[str, Any]) -> None:
    write_table(rows, os.path.join(out, "pareto.csv"), os.path.join(out, "pareto.md"),
                title="CompOFA: best sub-network per latency target")
    lat_table = search["lat_table"]
    cloud = [{"latency_ms": lat_table.table[k], "accuracy": a}
             for k, a in search["acc_fn"].cache.items() if k in lat_table.table]
    plot_pareto(os.path.join(out, "pareto.png"), rows, cloud, search["targets"])


def _summary(cfg: CompOFARunConfig, supernet: CompOFASupernet, space: DesignSpace, loaders: Loaders,
             train: TrainResult, search: dict[str, Any], rows: list[dict[str, Any]],
             exported: dict[str, Any]) -> dict[str, Any]:
    out = cfg.output_dir
    full = space.max_config()
    recalibrate_bn(supernet, full, loaders.calib, cfg.calib_batches)
    acc_fn = search["acc_fn"]
    return {
        "config": asdict(cfg),
        "data_source": loaders.source,
        "num_architectures": space.num_architectures(),
        "num_configs_with_resolution": space.num_configs(),
        "ofa_num_architectures": DesignSpace.ofa(supernet.cfg).num_architectures(),
        "supernet_params": count_params(supernet),
        "training": {"phases": train.phases, "wall_time_s": round(train.wall_time_s, 2),
                     "compound_wall_time_s": round(train.time_excluding("teacher"), 2)},
        "teacher_val_accuracy": acc_fn(full),
        "teacher_test_accuracy": evaluate_accuracy(supernet, full, loaders.test),
        "search": {
            "mode": "exhaustive" if cfg.exhaustive else "evolutionary",
            "targets_ms": search["targets"],
            "time_s": round(search["time_s"], 3),
            "latency_table": search["lat_table"].stats(),
            "latency_table_reused": search["reused"],
            "accuracy_evaluations": acc_fn.evaluations,
            "accuracy_eval_time_s": round(acc_fn.eval_time_s, 3),
        },
        "pareto": rows,
        "exported": exported,
        "files": {name: os.path.join(out, f) for name, f in (
            ("supernet", "supernet.pt"), ("csv", "pareto.csv"), ("md", "pareto.md"), ("png", "pareto.png"),
            ("summary", "summary.json"))} | {"latency_table": search["lat_path"]},
    }
