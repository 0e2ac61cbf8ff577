"""Benchmark networks: forward shapes, torch.export-ability, and size/cost against the papers.

Complexity uses the papers' convention (MACs of conv/linear layers = FlopCounterMode total / 2).
Everything runs at batch 1 in eval mode under no_grad to stay fast on 2 CPU cores.
"""

from __future__ import annotations

import pytest
import torch

from lightning_oto.models import (
    MODEL_NAMES,
    DartsNetwork,
    DemoNet,
    RegNet,
    StackedUnets,
    SuperResNet,
    build_model,
    calibrate_batchnorm,
    count_macs,
    count_params,
)
from lightning_oto.models.complexity import PAPER_TARGETS

TOL = 0.15  # the brief: within 15% of the paper's numbers

# The 14-cell DARTS (15k graph nodes) takes ~25 s to export and ~8 s to run on 2 busy cores; it is built
# from exactly the same Cell / MixedOp code as the 8-cell network, which is exported and run at full
# size.  darts14 is checked at full size on the meta device (layout and shapes only).
HEAVY = {"darts14"}
# RegNet 400M/600M are the same XBlock code as 200M/800M with other widths: run, but not exported.
EXPORT_SKIP = HEAVY | {"regnet_400m", "regnet_600m"}
# The 8-cell DARTS took ~30 s of CI to export; 3 cells of the same code at full width and image size cover every
# cell kind: a normal cell, a reduction cell, and a cell after a reduction (its strided preprocess).
EXPORT_CELLS = {"darts8": 3}


class Measured:
    """One default model, its example input and the output of a single real forward."""

    def __init__(self, name: str, **kwargs: int) -> None:
        self.model = build_model(name, **kwargs).eval()
        self.x = self.model.example_input(1)
        with torch.no_grad():
            self.y = self.model(self.x)


_CACHE: dict[str, Measured] = {}


def measured(name: str) -> Measured:
    """Forward each network once per test session (DARTS is the slow one on 2 cores)."""
    if name not in _CACHE:
        _CACHE[name] = Measured(name)
    return _CACHE[name]


@pytest.mark.parametrize("name", [n for n in MODEL_NAMES if n not in HEAVY])
def test_forward_shape(name: str) -> None:
    m = measured(name)
    model = m.model
    assert m.x.shape == (1, model.in_channels, model.image_size, model.image_size)
    assert m.y.shape == (1, model.num_classes)
    assert torch.isfinite(m.y).all()


def test_darts14_layout_and_meta_forward() -> None:
    full = build_model("darts14")
    assert len(full.cells) == 14
    assert [i for i, c in enumerate(full.cells) if c.reduction] == [4, 9]
    assert count_params(full) > count_params(build_model("darts8"))
    with torch.no_grad():
        out = full.to("meta")(full.example_input(1).to("meta"))
    assert out.shape == (1, 10)


@pytest.mark.parametrize("name", [n for n in MODEL_NAMES if n not in EXPORT_SKIP])
def test_torch_export(name: str) -> None:
    m = Measured(name, layers=EXPORT_CELLS[name]) if name in EXPORT_CELLS else measured(name)
    ep = torch.export.export(m.model, (m.x,), strict=False)
    with torch.no_grad():
        assert torch.allclose(ep.module()(m.x), m.y, atol=1e-5)
    # Nothing in-place: the engine edits these graphs and relies on functional ops.
    inplace = [
        n.target
        for n in ep.graph.nodes
        if isinstance(n.target, torch._ops.OpOverload) and n.target._schema.is_mutable
    ]
    assert not inplace, inplace


@pytest.mark.parametrize("name", sorted(PAPER_TARGETS))
def test_complexity_matches_paper(name: str) -> None:
    model = build_model(name)
    target = PAPER_TARGETS[name]
    params, macs = count_params(model), count_macs(model, model.example_input(1))
    if target.params is not None:
        assert abs(params / target.params - 1) <= TOL, (name, params, target.params)
    if target.macs is not None:
        assert abs(macs / target.macs - 1) <= TOL, (name, macs, target.macs)


def test_regnet_presets_match_published_imagenet_sizes() -> None:
    """With the ImageNet stem (stride 2, 1000 classes) the presets reproduce the RegNetX model zoo,
    which also pins the MAC convention: RegNetX-800MF is ~0.80G MACs at 224x224."""
    published = {"200M": (2.7e6, 0.2e9), "800M": (7.3e6, 0.8e9)}  # 400M/600M: see models/README.md
    x = torch.zeros(1, 3, 224, 224)
    for config, (p_ref, m_ref) in published.items():
        model = RegNet(config, num_classes=1000, stem_stride=2)
        assert abs(count_params(model) / p_ref - 1) < 0.03, config
        assert abs(count_macs(model, x) / m_ref - 1) < 0.03, config


def test_build_model_kwargs_and_errors() -> None:
    m = build_model("DemoNet", num_classes=7, in_channels=3, image_size=32, width_mult=0.5)
    assert isinstance(m, DemoNet)
    with torch.no_grad():
        assert m(m.example_input(2)).shape == (2, 7)
    assert isinstance(build_model("darts"), DartsNetwork)
    assert isinstance(build_model("regnet-800m"), RegNet)
    with pytest.raises(KeyError, match="available"):
        build_model("no_such_net")
    with pytest.raises(ValueError):
        RegNet("123M")


def test_small_variants_run() -> None:
    """Width/depth arguments produce working (smaller) networks: the knobs the tests and demos use."""
    small = [
        StackedUnets(widths=(8, 16, 32), head_width=16, in_channels=1, image_size=28, num_classes=5),
        SuperResNet(stem_width=8, stages=((8, 1, 1), (16, 1, 2)), kernel_sizes=(3, 5), num_classes=4),
        RegNet("200M", width_mult=0.5, depths=(1, 1, 1, 1)),
    ]
    for m in small:
        m.eval()
        with torch.no_grad():
            assert m(m.example_input(2)).shape == (2, m.num_classes)
    assert count_params(small[0]) < count_params(StackedUnets())


def test_calibrate_batchnorm_tames_untrained_darts() -> None:
    """Un-averaged DARTS node sums blow up in eval mode with fresh BN statistics; calibration fixes it."""
    torch.manual_seed(0)  # the weights drawn from whatever state earlier tests left failed it on some orders
    model = DartsNetwork(C=4, layers=4, steps=3, stem_stride=2, image_size=16).eval()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(x).abs().max().item()
    calibrate_batchnorm(model, x)
    assert not model.training
    assert all(m.momentum == 0.1 for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    with torch.no_grad():
        after = model(x).abs().max().item()
    assert after < 100 and before > 50 * after, (before, after)
