"""Structured-sparsity optimizers (DHSPG, H2SPG, HESSO) that see only removal groups."""
from lightning_oto.optim.group_index import GroupIndex, GroupStats
from lightning_oto.optim.half_space import (
    DHSPG, H2SPG, HESSO, VARIANTS, CandidateFilter, HalfSpaceOptimizer, cut_ratio_summary,
)
from lightning_oto.optim.saliency import (
    available_saliencies,
    get_saliency,
    make_default_saliency,
    register_saliency,
)

__all__ = [
    "DHSPG",
    "H2SPG",
    "HESSO",
    "HalfSpaceOptimizer",
    "CandidateFilter",
    "VARIANTS",
    "cut_ratio_summary",
    "GroupIndex",
    "GroupStats",
    "register_saliency",
    "get_saliency",
    "available_saliencies",
    "make_default_saliency",
]
