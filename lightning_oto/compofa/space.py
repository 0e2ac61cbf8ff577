"""CompOFA / OFA design spaces as plain configuration.

A sub-network of the supernet is fully described by a :class:`SubnetConfig` (active depth per
stage, expand ratio and kernel per active block, input resolution).  A :class:`DesignSpace` says
which sub-networks are allowed and encodes each one as a short integer *genome* so that random
sampling, mutation and crossover never leave the space:

* compound (CompOFA, coupled): one gene per stage, the index ``i`` of the coupled pair
  ``(D[i], W[i])`` (the i-th smallest depth goes with the i-th smallest expand ratio, for all
  blocks of the stage); kernels fixed per stage.  5 stages x 3 pairs -> 3**5 = 243 networks.
* uncoupled (OFA): one depth gene per stage plus one expand (and optionally kernel) gene per
  block slot; genes of inactive blocks are carried but ignored, as in OFA's evolution finder.

Why genomes: the search and the trainer only ever see gene vectors, so the coupling is a property
of the encoding instead of a check that could be forgotten.
"""
from __future__ import annotations

import itertools
import random
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator, Sequence


def make_divisible(v: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round ``v`` to a multiple of ``divisor`` (MobileNet convention), never below 90% of ``v``."""
    min_value = divisor if min_value is None else min_value
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


@dataclass
class SupernetConfig:
    """Shape of the weight-shared MobileNetV3-style supernet (its largest network).

    Lists (not tuples) so the config stays YAML/Hydra friendly.  ``stage_kernels`` are the fixed
    per-stage kernels of the compound space; ``kernel_choices`` (optional) makes kernels elastic and
    sets the supernet's depthwise kernel to ``max(kernel_choices)``.
    """

    input_size: int = 28
    in_channels: int = 1
    num_classes: int = 10
    stem_channels: int = 16
    stem_stride: int = 2
    stage_channels: list[int] = field(default_factory=lambda: [16, 24, 32, 48, 64])
    stage_strides: list[int] = field(default_factory=lambda: [2, 1, 2, 1, 1])
    stage_kernels: list[int] = field(default_factory=lambda: [3, 3, 5, 3, 5])
    stage_se: list[bool] = field(default_factory=lambda: [False, False, True, True, True])
    stage_act: list[str] = field(default_factory=lambda: ["relu", "relu", "hswish", "hswish", "hswish"])
    depth_choices: list[int] = field(default_factory=lambda: [2, 3, 4])
    expand_choices: list[int] = field(default_factory=lambda: [3, 4, 6])
    kernel_choices: list[int] | None = None
    head_channels: int = 128
    dropout: float = 0.0

    def __post_init__(self) -> None:
        n = len(self.stage_channels)
        for name in ("stage_strides", "stage_kernels", "stage_se", "stage_act"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"SupernetConfig.{name} has {len(getattr(self, name))} entries, expected {n}")
        if sorted(set(self.depth_choices)) != sorted(self.depth_choices) or min(self.depth_choices) < 1:
            raise ValueError(f"depth_choices must be distinct positive ints, got {self.depth_choices}")
        if any(k % 2 == 0 for k in list(self.stage_kernels) + list(self.kernel_choices or [])):
            raise ValueError("kernel sizes must be odd (same padding)")

    @property
    def num_stages(self) -> int:
        return len(self.stage_channels)

    @property
    def max_depth(self) -> int:
        return max(self.depth_choices)

    @property
    def max_expand(self) -> int:
        return max(self.expand_choices)

    def max_kernel(self, stage: int) -> int:
        """Kernel the supernet stores for ``stage`` (smaller kernels are centre crops of it)."""
        if self.kernel_choices:
            return max(max(self.kernel_choices), self.stage_kernels[stage])
        return self.stage_kernels[stage]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class SubnetConfig:
    """One architecture: active depth per stage, per-block expand ratio and kernel, resolution."""

    depths: tuple[int, ...]
    expands: tuple[tuple[int, ...], ...]
    kernels: tuple[tuple[int, ...], ...]
    resolution: int

    def __post_init__(self) -> None:
        if not (len(self.depths) == len(self.expands) == len(self.kernels)):
            raise ValueError("depths/expands/kernels must have one entry per stage")
        for d, e, k in zip(self.depths, self.expands, self.kernels):
            if len(e) != d or len(k) != d:
                raise ValueError(f"stage with depth {d} needs {d} expand ratios and kernels, got {e}, {k}")

    def key(self) -> str:
        """Canonical string of the full architecture *including* resolution (memo key)."""
        parts = []
        for d, e, k in zip(self.depths, self.expands, self.kernels):
            parts.append(f"{d}:" + ",".join(f"e{a}k{b}" for a, b in zip(e, k)))
        return f"r{self.resolution}|" + "|".join(parts)

    def with_resolution(self, resolution: int) -> "SubnetConfig":
        return SubnetConfig(self.depths, self.expands, self.kernels, int(resolution))

    def to_dict(self) -> dict[str, Any]:
        return {
            "depths": list(self.depths),
            "expands": [list(e) for e in self.expands],
            "kernels": [list(k) for k in self.kernels],
            "resolution": self.resolution,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SubnetConfig":
        return cls(
            tuple(int(x) for x in d["depths"]),
            tuple(tuple(int(x) for x in e) for e in d["expands"]),
            tuple(tuple(int(x) for x in k) for k in d["kernels"]),
            int(d["resolution"]),
        )

    def short(self) -> str:
        """Compact human label: depths and (first-block) expand ratio per stage."""
        d = "".join(str(x) for x in self.depths)
        e = "".join(str(e[0]) if len(set(e)) == 1 else "*" for e in self.expands)
        return f"D{d}-E{e}@{self.resolution}"


class DesignSpace:
    """Set of sub-networks of one supernet, with a genome encoding (see module docstring).

    ``depth_choices``/``expand_choices``/``kernel_choices`` may be subsets of the supernet's
    choices (progressive-shrinking phases use e.g. depths [3, 4] with expand [6]).
    ``kernel_choices=None`` keeps the supernet's fixed per-stage kernels.
    """

    def __init__(
        self,
        supernet_cfg: SupernetConfig,
        coupled: bool = True,
        depth_choices: Sequence[int] | None = None,
        expand_choices: Sequence[int] | None = None,
        kernel_choices: Sequence[int] | None = None,
        resolutions: Sequence[int] | None = None,
    ) -> None:
        self.supernet_cfg = supernet_cfg
        self.coupled = bool(coupled)
        self.depth_choices = sorted(int(d) for d in (depth_choices or supernet_cfg.depth_choices))
        self.expand_choices = sorted(int(w) for w in (expand_choices or supernet_cfg.expand_choices))
        self.kernel_choices = sorted(int(k) for k in kernel_choices) if kernel_choices else None
        self.resolutions = [int(r) for r in (resolutions or [supernet_cfg.input_size])]
        self.num_stages = supernet_cfg.num_stages
        if max(self.depth_choices) > supernet_cfg.max_depth:
            raise ValueError(f"depth {max(self.depth_choices)} exceeds the supernet's {supernet_cfg.max_depth}")
        if max(self.expand_choices) > supernet_cfg.max_expand:
            raise ValueError(f"expand {max(self.expand_choices)} exceeds the supernet's {supernet_cfg.max_expand}")
        if self.kernel_choices:
            for s in range(self.num_stages):
                if max(self.kernel_choices) > supernet_cfg.max_kernel(s):
                    raise ValueError("kernel choice larger than the supernet's depthwise kernel")
        if self.coupled:
            if len(self.depth_choices) != len(self.expand_choices):
                raise ValueError(
                    "coupled space needs as many depth as expand choices "
                    f"(got D={self.depth_choices}, W={self.expand_choices})"
                )
            self.pairs = list(zip(self.depth_choices, self.expand_choices))
        else:
            self.pairs = []

    # ---- named constructors -------------------------------------------------------------
    @classmethod
    def compound(cls, supernet_cfg: SupernetConfig, elastic_kernel: bool = False, **kw: Any) -> "DesignSpace":
        """CompOFA: depth coupled with width; fixed kernel unless ``elastic_kernel``."""
        kernels = (supernet_cfg.kernel_choices or [3, 5, 7]) if elastic_kernel else None
        return cls(supernet_cfg, coupled=True, kernel_choices=kernels, **kw)

    @classmethod
    def ofa(cls, supernet_cfg: SupernetConfig, elastic_kernel: bool = False, **kw: Any) -> "DesignSpace":
        """OFA: depth and per-block width (and optionally kernel) chosen independently."""
        kernels = (supernet_cfg.kernel_choices or [3, 5, 7]) if elastic_kernel else None
        return cls(supernet_cfg, coupled=False, kernel_choices=kernels, **kw)

    # ---- counting -------------------------------------------------------------------------
    def _n_kernels(self) -> int:
        return len(self.kernel_choices) if self.kernel_choices else 1

    def num_architectures(self) -> int:
        """Number of distinct architectures (resolution excluded: it adds no trainable networks)."""
        nk = self._n_kernels()
        if self.coupled:
            per_stage = sum(nk**d for d, _ in self.pairs)
        else:
            per_stage = sum((len(self.expand_choices) * nk) ** d for d in self.depth_choices)
        return per_stage**self.num_stages

    def num_configs(self) -> int:
        """Architectures times resolutions (what a latency table may need to hold at most)."""
        return self.num_architectures() * len(self.resolutions)

    # ---- genome ----------------------------------------------------------------------------
    def gene_sizes(self) -> list[int]:
        """Number of options of each gene, in genome order (stage-major)."""
        sizes: list[int] = []
        md = max(self.depth_choices)
        for _ in range(self.num_stages):
            if self.coupled:
                sizes.append(len(self.pairs))
            else:
                sizes.append(len(self.depth_choices))
                sizes.extend([len(self.expand_choices)] * md)
            if self.kernel_choices:
                sizes.extend([len(self.kernel_choices)] * md)
        if len(self.resolutions) > 1:
            sizes.append(len(self.resolutions))
        return sizes

    def decode(self, genes: Sequence[int]) -> SubnetConfig:
        """Genome -> architecture; every genome decodes to a member of the space."""
        sizes = self.gene_sizes()
        if len(genes) != len(sizes):
            raise ValueError(f"genome of length {len(genes)}, expected {len(sizes)}")
        for g, s in zip(genes, sizes):
            if not 0 <= int(g) < s:
                raise ValueError(f"gene {g} out of range [0, {s})")
        md = max(self.depth_choices)
        pos = 0
        depths, expands, kernels = [], [], []
        for s in range(self.num_stages):
            if self.coupled:
                d, w = self.pairs[int(genes[pos])]
                pos += 1
                e = (w,) * d
            else:
                d = self.depth_choices[int(genes[pos])]
                e = tuple(self.expand_choices[int(g)] for g in genes[pos + 1 : pos + 1 + d])
                pos += 1 + md
            if self.kernel_choices:
                k = tuple(self.kernel_choices[int(g)] for g in genes[pos : pos + d])
                pos += md
            else:
                k = (self.supernet_cfg.stage_kernels[s],) * d
            depths.append(d)
            expands.append(e)
            kernels.append(k)
        res = self.resolutions[int(genes[pos])] if len(self.resolutions) > 1 else self.resolutions[0]
        return SubnetConfig(tuple(depths), tuple(expands), tuple(kernels), res)

    def encode(self, cfg: SubnetConfig) -> list[int]:
        """Architecture -> a genome (inactive-block genes set to 0); raises if not in the space."""
        if not self.contains(cfg):
            raise ValueError(f"{cfg.key()} is not in this design space")
        md = max(self.depth_choices)
        genes: list[int] = []
        for s in range(self.num_stages):
            d = cfg.depths[s]
            if self.coupled:
                genes.append(self.pairs.index((d, cfg.expands[s][0])))
            else:
                genes.append(self.depth_choices.index(d))
                ex = [self.expand_choices.index(w) for w in cfg.expands[s]]
                genes.extend(ex + [0] * (md - d))
            if self.kernel_choices:
                ks = [self.kernel_choices.index(k) for k in cfg.kernels[s]]
                genes.extend(ks + [0] * (md - d))
        if len(self.resolutions) > 1:
            genes.append(self.resolutions.index(cfg.resolution))
        return genes

    def contains(self, cfg: SubnetConfig) -> bool:
        """Whether ``cfg`` belongs to the space (coupling, choices, kernels, resolution)."""
        if len(cfg.depths) != self.num_stages or cfg.resolution not in self.resolutions:
            return False
        for s, (d, e, k) in enumerate(zip(cfg.depths, cfg.expands, cfg.kernels)):
            if d not in self.depth_choices or any(w not in self.expand_choices for w in e):
                return False
            if self.coupled and (d, e[0]) not in self.pairs or self.coupled and len(set(e)) != 1:
                return False
            if self.kernel_choices:
                if any(x not in self.kernel_choices for x in k):
                    return False
            elif any(x != self.supernet_cfg.stage_kernels[s] for x in k):
                return False
        return True

    def random_genes(self, rng: random.Random) -> list[int]:
        return [rng.randrange(s) for s in self.gene_sizes()]

    def sample(self, rng: random.Random) -> SubnetConfig:
        """Uniform per-gene sampling (OFA's sampler: depth per stage, then width per block)."""
        return self.decode(self.random_genes(rng))

    def max_config(self) -> SubnetConfig:
        """Largest member (max depth, width, kernel; the highest resolution)."""
        genes = [s - 1 for s in self.gene_sizes()]
        return self.decode(genes)

    def min_config(self) -> SubnetConfig:
        """Smallest member (min depth, width, kernel; the lowest resolution)."""
        return self.decode([0] * len(self.gene_sizes()))

    def enumerate(self, limit: int = 100_000) -> Iterator[SubnetConfig]:
        """All architectures x resolutions (only sensible for small spaces such as CompOFA's)."""
        if self.num_configs() > limit:
            raise ValueError(f"space has {self.num_configs()} configs (> limit {limit}); sample instead")
        seen: set[str] = set()
        for genes in itertools.product(*[range(s) for s in self.gene_sizes()]):
            cfg = self.decode(genes)
            k = cfg.key()
            if k not in seen:
                seen.add(k)
                yield cfg

    def describe(self) -> dict[str, Any]:
        return {
            "coupled": self.coupled,
            "depth_choices": self.depth_choices,
            "expand_choices": self.expand_choices,
            "kernel_choices": self.kernel_choices,
            "resolutions": self.resolutions,
            "num_architectures": self.num_architectures(),
        }


def full_config(supernet_cfg: SupernetConfig, resolution: int | None = None) -> SubnetConfig:
    """The supernet's largest network (used as the teacher)."""
    n = supernet_cfg.num_stages
    d = supernet_cfg.max_depth
    return SubnetConfig(
        (d,) * n,
        tuple((supernet_cfg.max_expand,) * d for _ in range(n)),
        tuple((supernet_cfg.max_kernel(s),) * d for s in range(n)),
        int(resolution or supernet_cfg.input_size),
    )
