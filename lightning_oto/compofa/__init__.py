"""CompOFA: compound once-for-all supernets (Sahni et al., ICLR 2021), scaled for small CPUs.

Pipeline: :class:`CompOFASupernet` (weight-shared MobileNetV3-style, prefix slicing) ->
:func:`train_phases` with :func:`compofa_phases` (teacher, then compound sampled-subnet training
with distillation; :func:`progressive_shrinking_phases` for the OFA comparison) ->
:func:`recalibrate_bn` -> :func:`evolutionary_search` under measured, memoized latency
(:class:`LatencyTable`) -> :func:`extract_subnet` -> ``lightning_oto.subnet.export.export_subnet``.  :func:`run_compofa`
chains everything from one flat config.
"""
from .data import Loaders, build_loaders
from .extract import StaticSubnet, extract_subnet, max_abs_diff_vs_supernet
from .latency import LatencyTable, measure_latency_ms, supernet_latency_fn
from .pipeline import CompOFARunConfig, run_compofa
from .search import (
    EvolutionConfig,
    SearchResult,
    best_under,
    crossover,
    default_targets,
    evolutionary_search,
    exhaustive_evaluation,
    mutate,
    pareto_front,
    search_pareto,
)
from .space import DesignSpace, SubnetConfig, SupernetConfig, full_config
from .supernet import CompOFASupernet
from .training import (
    AccuracyEvaluator,
    CompOFAModule,
    PhaseSpec,
    TrainResult,
    compofa_phases,
    evaluate_accuracy,
    frozen_teacher,
    kd_loss,
    progressive_shrinking_phases,
    recalibrate_bn,
    train_phases,
)

__all__ = [
    "AccuracyEvaluator",
    "CompOFAModule",
    "CompOFARunConfig",
    "CompOFASupernet",
    "DesignSpace",
    "EvolutionConfig",
    "LatencyTable",
    "Loaders",
    "PhaseSpec",
    "SearchResult",
    "StaticSubnet",
    "SubnetConfig",
    "SupernetConfig",
    "TrainResult",
    "best_under",
    "build_loaders",
    "compofa_phases",
    "crossover",
    "default_targets",
    "evaluate_accuracy",
    "evolutionary_search",
    "exhaustive_evaluation",
    "extract_subnet",
    "frozen_teacher",
    "full_config",
    "kd_loss",
    "max_abs_diff_vs_supernet",
    "measure_latency_ms",
    "mutate",
    "pareto_front",
    "progressive_shrinking_phases",
    "recalibrate_bn",
    "run_compofa",
    "search_pareto",
    "supernet_latency_fn",
    "train_phases",
]
