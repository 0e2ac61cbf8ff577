"""Drawings (Graphviz) of the trace / search space / redundant set / sub-network, and training curves."""
from __future__ import annotations

import csv
import math
import re
import shutil
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from drawing_marks import redundant_group_ids
from lightning_oto import OTO
from lightning_oto.viz import curves, dot as dotmod
from lightning_oto.viz.graphviz import DRAWINGS, visualize

HAS_DOT = shutil.which("dot") is not None
SVG_NS = "{http://www.w3.org/2000/svg}"


class ResCatNet(nn.Module):
    """stem -> two residual branches added to the trunk -> two branches concatenated -> conv -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.res_a = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.res_b = nn.Sequential(nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8))
        self.left = nn.Sequential(nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4), nn.ReLU())
        self.right = nn.Sequential(nn.Conv2d(8, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
        self.mix = nn.Conv2d(10, 12, 3, padding=1)
        self.fc = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        h = F.relu(h + self.res_a(h) + self.res_b(h))
        h = torch.cat([self.left(h), self.right(h)], dim=1)
        h = F.relu(self.mix(h))
        return self.fc(F.adaptive_avg_pool2d(h, 1).flatten(1))


def _setup(mode: str):
    torch.manual_seed(0)
    oto = OTO(ResCatNet(), torch.randn(2, 3, 8, 8), mode=mode)
    zero = oto.random_set_zero_groups(0.5, seed=0)
    assert zero, "the test model has groups to zero"
    sub = oto.construct_subnet()
    return oto, zero, sub


@pytest.fixture(scope="module", params=["prune", "erase"])
def drawn(request, tmp_path_factory):
    oto, zero, sub = _setup(request.param)
    out = tmp_path_factory.mktemp(f"viz_{request.param}")
    paths = oto.visualize(out, sub=sub)  # the OTO method delegates to lightning_oto.viz.graphviz.visualize
    return oto, zero, sub, paths


def _dot_redundant_ids(src: str) -> set[int]:
    """Independent parse of the .dot source: zg-<id> tokens of class attributes that say 'redundant'."""
    ids: set[int] = set()
    for cls in re.findall(r'class="([^"]*)"', src):
        toks = cls.split()
        if "redundant" in toks:
            ids |= {int(t[3:]) for t in toks if re.fullmatch(r"zg-\d+", t)}
    return ids


def _svg_redundant_ids(path: str) -> set[int]:
    root = ET.parse(path).getroot()  # also proves the SVG is well-formed XML
    ids: set[int] = set()
    for g in root.iter(f"{SVG_NS}g"):
        toks = (g.get("class") or "").split()
        if "redundant" in toks:
            ids |= {int(t[3:]) for t in toks if t.startswith("zg-")}
    return ids


def test_all_drawings_written(drawn):
    oto, zero, sub, paths = drawn
    for name in DRAWINGS:
        src = Path(paths[f"{name}.dot"]).read_text()
        assert src.startswith("digraph") and src.rstrip().endswith("}")
        assert "rankdir" in src and "TB" in src
        if HAS_DOT:
            assert paths[name].endswith(".svg")
            ET.parse(paths[f"{name}.svg"])
            assert Path(paths[f"{name}.pdf"]).read_bytes()[:4] == b"%PDF"


def test_trace_labels_and_clusters(drawn):
    oto, zero, sub, paths = drawn
    src = Path(paths["trace.dot"]).read_text()
    assert "conv2d · res_a.0" in src            # op + module path
    assert "2×8×8×8" in src                      # output shape
    assert 'subgraph "cluster_' in src and 'label="res_a"' in src   # clustered by module prefix
    assert src.count(" -> ") == oto.graph.num_edges


def test_redundant_groups_are_exactly_the_zero_groups(drawn):
    oto, zero, sub, paths = drawn
    expected = set(oto.zero_group_ids())
    assert expected == set(zero)
    src = Path(paths["redundant.dot"]).read_text()
    assert _dot_redundant_ids(src) == expected
    assert redundant_group_ids(src) == expected
    assert "ZERO" in src
    # the plain search-space drawing marks nothing as redundant
    assert _dot_redundant_ids(Path(paths["space.dot"]).read_text()) == set()
    if HAS_DOT:
        assert _svg_redundant_ids(paths["redundant.svg"]) == expected
    else:
        pytest.skip("Graphviz `dot` not installed: SVG not checked")


def test_space_drawing_marks_unprunable_with_reason(drawn):
    oto, zero, sub, paths = drawn
    src = Path(paths["space.dot"]).read_text()
    blocked = [g for g in oto.groups if not g.prunable]
    if oto.mode == "prune":
        assert blocked, "the classifier's groups reach the output"
        assert "unprunable: reaches the model output" in src and "dashed" in src
        assert re.search(r"S\d+: 8 groups / 8 prunable", src)
    else:
        # one node per GeZIG, named by its id
        for g in oto.groups:
            assert f'id="group_{g.id}"' in src
        for g in blocked:
            assert g.reason and g.reason[:20] in src


def test_subnet_drawing_shows_what_remains(drawn):
    oto, zero, sub, paths = drawn
    src = Path(paths["subnet.dot"]).read_text()
    if oto.mode == "prune":
        # channel counts before -> after on conv/linear nodes
        w = dict(sub.named_parameters())["stem.0.weight"]
        assert f"out 8→{w.shape[0]}" in src
        assert "slimmed" in src
    else:
        erased = {oto.groups[i].name.split("-")[0] for i in zero}
        for mod in erased:
            assert f"· {mod}\\n" not in src, f"{mod} was erased but is still drawn"
        assert "erased fx graph" in src


def test_dot_only_fallback_without_graphviz(tmp_path, monkeypatch):
    oto = OTO(ResCatNet(), torch.randn(1, 3, 8, 8), mode="erase")
    oto.random_set_zero_groups(0.5)
    monkeypatch.setattr(dotmod.shutil, "which", lambda name, *a, **k: None)
    with pytest.warns(RuntimeWarning) as rec:
        paths = visualize(oto, tmp_path, what=("trace", "space", "redundant"))
    msg = " ".join(str(w.message) for w in rec)
    assert "apt-get install graphviz" in msg and "brew install graphviz" in msg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["redundant.dot", "space.dot", "trace.dot"]
    assert paths["trace"] == str(tmp_path / "trace.dot")
    assert redundant_group_ids((tmp_path / "redundant.dot").read_text()) == set(oto.zero_group_ids())


def test_bad_drawing_name(tmp_path):
    oto = OTO(ResCatNet(), torch.randn(1, 3, 8, 8), mode="erase")
    with pytest.raises(ValueError, match="unknown drawing"):
        visualize(oto, tmp_path, what=("trace", "sparsity"))


def test_darts_like_graph_renders_quickly(tmp_path):
    from lightning_oto.models import DartsNetwork

    model = DartsNetwork(C=4, image_size=16, layers=3, steps=2)
    oto = OTO(model, model.example_input(1), mode="erase")
    assert len(oto.graph) >= 300
    t = time.perf_counter()
    paths = visualize(oto, tmp_path, what=("trace", "space"), formats=("svg",))
    elapsed = time.perf_counter() - t
    assert elapsed < 20.0, f"drawing {len(oto.graph)} operators took {elapsed:.1f}s"
    src = Path(paths["trace.dot"]).read_text()
    assert src.count('subgraph "cluster_') >= 3          # cells are clustered
    if HAS_DOT:
        ET.parse(paths["trace.svg"])
        ET.parse(paths["space.svg"])


# --------------------------------------------------------------------------- training curves
def _fake_metrics(path: Path) -> Path:
    """A Lightning CSVLogger-style metrics.csv: sparse rows, train and val metrics on different rows."""
    fields = ["epoch", "step", "train_loss", "val_acc", "oto/group_sparsity", "oto/phase"]
    rows = []
    for step in range(0, 300, 3):
        phase = 0 if step < 90 else (1 if step < 180 else 2)
        sp = 0.0 if phase == 0 else (0.5 * (step - 90) / 90 if phase == 1 else 0.5)
        rows.append({"epoch": step // 60, "step": step, "train_loss": 2.0 * math.exp(-step / 100) + 0.2,
                     "val_acc": "", "oto/group_sparsity": sp, "oto/phase": phase})
        if step % 60 == 57:
            rows.append({"epoch": step // 60, "step": step, "train_loss": "", "val_acc": 0.4 + step / 600,
                         "oto/group_sparsity": "", "oto/phase": ""})
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    return path


def _is_png(p: Path) -> bool:
    return p.exists() and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000


def test_training_curves_from_csv(tmp_path):
    csv_path = _fake_metrics(tmp_path / "metrics.csv")
    out = curves.plot_training_curves(csv_path, tmp_path / "plots" / "curves.png")
    assert _is_png(Path(out))
    rows = curves.load_records(csv_path)
    steps = [float(r["step"]) for r in rows]
    assert curves.phase_starts(rows, steps) == [(0.0, "warm-up"), (90.0, "projection"), (180.0, "hybrid")]


def test_training_curves_from_records_with_boundaries(tmp_path):
    recs = [{"step": s, "loss": 1.0 / (1 + s), "val_acc": s / 100, "oto/group_sparsity": min(0.5, s / 100)}
            for s in range(100)]
    out = curves.plot_training_curves(recs, tmp_path / "a.png", phase_boundaries={"projection": 20, "hybrid": 60})
    assert _is_png(Path(out))
    out = curves.plot_training_curves(recs, tmp_path / "b.png", phase_boundaries=[20, 60])
    assert _is_png(Path(out))
    named = [dict(r, **{"oto/phase": "warmup" if r["step"] < 30 else "hybrid"}) for r in recs]
    assert curves.phase_starts(named, [float(r["step"]) for r in named]) == [(0.0, "warm-up"), (30.0, "hybrid")]
    assert _is_png(Path(curves.plot_training_curves(named, tmp_path / "n.png")))
    # nothing plottable still gives a picture, not an error
    assert _is_png(Path(curves.plot_training_curves([{"step": 0}], tmp_path / "c.png")))


def test_subnet_before_any_zero_draws_full_model(tmp_path, monkeypatch):
    oto = OTO(ResCatNet(), torch.randn(1, 3, 8, 8), mode="prune")
    monkeypatch.setattr(OTO, "construct_subnet", lambda self, **k: pytest.fail("nothing to construct yet"))
    paths = visualize(oto, tmp_path, what=("subnet", "redundant"), formats=())
    src = Path(paths["subnet.dot"]).read_text()
    assert "no group is zero yet" in src and "out 8→8 · in 3→3" in src
    assert redundant_group_ids(Path(paths["redundant.dot"]).read_text()) == set()
