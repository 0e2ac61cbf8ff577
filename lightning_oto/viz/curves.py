"""Training curves of one run: loss / accuracy and group sparsity vs step, with the optimizer phases marked.

``plot_training_curves(metrics, out_png)`` reads a Lightning ``CSVLogger`` ``metrics.csv`` (or a list
of dicts with the same keys) and writes a two-panel PNG with matplotlib's Agg canvas (the global
pyplot backend is left alone):

* top: every column whose name contains ``loss`` (left axis) and ``acc`` (right axis);
* bottom: every column whose name contains ``sparsity`` (e.g. ``oto/group_sparsity``);
* both: vertical lines where a phase starts (warm-up / projection / hybrid), taken from
  ``phase_boundaries`` or, when omitted, from where the ``oto/phase`` column changes value.
"""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

PHASES = ("warm-up", "projection", "hybrid")
PHASE_COLORS = {"warm-up": "#fff7bc", "projection": "#fcbba1", "hybrid": "#c7e9c0"}
_PHASE_ALIASES = {"warmup": "warm-up", "warm_up": "warm-up", "warm-up": "warm-up", "projection": "projection",
                  "project": "projection", "search": "projection", "hybrid": "hybrid", "0": "warm-up",
                  "1": "projection", "2": "hybrid"}
_STEP_KEYS = ("step", "global_step", "trainer/global_step")


def _num(v: Any) -> float | None:
    if v is None:
        return None
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, (int, float)):
        return None if math.isnan(float(v)) else float(v)
    if hasattr(v, "item") and callable(v.item) and getattr(v, "numel", lambda: 1)() == 1:  # tensors / numpy
        return _num(v.item())
    s = str(v).strip()
    if not s:
        return None
    try:
        f = float(s)
    except ValueError:
        return None
    return None if math.isnan(f) else f


def load_records(metrics: str | Path | Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Rows of a metrics.csv path, a list of dicts or a DataFrame, as a list of dicts."""
    if isinstance(metrics, (str, Path)):
        path = Path(metrics)
        if path.is_dir():
            path = path / "metrics.csv"
        if not path.exists():
            raise FileNotFoundError(f"no metrics file at {path} (expected a Lightning CSVLogger metrics.csv)")
        with path.open(newline="", encoding="utf-8") as f:
            return [dict(r) for r in csv.DictReader(f)]
    if hasattr(metrics, "to_dict"):  # pandas DataFrame
        return [dict(r) for r in metrics.to_dict("records")]  # type: ignore[union-attr]
    rows = [dict(r) for r in metrics]
    for i, r in enumerate(rows):
        if not isinstance(r, dict):
            raise TypeError(f"record {i} is a {type(r).__name__}; pass dicts like {{'step': 0, 'train_loss': 1.2}}")
    return rows


def _phase_name(v: Any) -> str | None:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    s = str(v).strip().lower()
    if not s or s == "nan":
        return None
    n = _num(s)
    if n is not None:
        s = str(int(n)) if float(n).is_integer() else s
    return _PHASE_ALIASES.get(s, s)


def _steps(rows: list[dict[str, Any]]) -> list[float]:
    key = next((k for k in _STEP_KEYS if any(_num(r.get(k)) is not None for r in rows)), None)
    out = []
    last = -1.0
    for i, r in enumerate(rows):
        s = _num(r.get(key)) if key else None
        if s is None:
            s = last if key else float(i)
        out.append(s)
        last = s
    return out


def phase_starts(rows: list[dict[str, Any]], steps: list[float]) -> list[tuple[float, str]]:
    """(step, phase) where the logged phase column changes value, in step order."""
    col = next((k for r in rows for k in r if k.lower().endswith("phase")), None)
    if col is None:
        return []
    seq = sorted(((s, _phase_name(r.get(col))) for s, r in zip(steps, rows)), key=lambda t: t[0])
    out: list[tuple[float, str]] = []
    for s, p in seq:
        if p is not None and (not out or out[-1][1] != p):
            out.append((s, p))
    return out


def _normalize_boundaries(b: Any) -> list[tuple[float, str]]:
    if b is None:
        return []
    if isinstance(b, Mapping):
        items = list(b.items())
        if all(_num(k) is not None and not isinstance(k, str) for k, _ in items):
            pairs = [(float(k), str(v)) for k, v in items]
        else:
            pairs = [(float(v), str(k)) for k, v in items]
    else:
        b = list(b)
        if all(isinstance(x, (tuple, list)) and len(x) == 2 for x in b):
            pairs = [(float(s), str(n)) if _num(s) is not None else (float(n), str(s)) for s, n in b]
        else:
            names = PHASES if len(b) >= 3 else PHASES[3 - len(b):]
            pairs = [(float(s), names[i] if i < len(names) else f"phase {i}") for i, s in enumerate(b)]
    return sorted(((s, _PHASE_ALIASES.get(n.lower(), n)) for s, n in pairs), key=lambda t: t[0])


def _series(rows: list[dict[str, Any]], steps: list[float], col: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for s, r in zip(steps, rows):
        v = _num(r.get(col))
        if v is not None:
            xs.append(s)
            ys.append(v)
    return xs, ys


def _smooth(ys: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, y in enumerate(ys):
        acc += y
        if i >= window:
            acc -= ys[i - window]
        out.append(acc / min(i + 1, window))
    return out


def _pretty(col: str) -> str:
    return col.replace("oto/", "").replace("_", " ")


_LOSS_COLORS = ["#1f77b4", "#ff7f0e", "#9467bd", "#8c564b", "#17becf"]
_ACC_COLORS = ["#2ca02c", "#d62728", "#e377c2", "#bcbd22"]
_SPARSITY_COLORS = ["#e31a1c", "#636363", "#3182bd", "#31a354"]


def _plot_loss_and_accuracy(ax: Any, rows: list[dict[str, Any]], steps: list[float], loss_cols: list[str],
                            acc_cols: list[str]) -> None:
    """Losses on the left axis (smoothed when dense), accuracies dashed on a right axis."""
    handles = []
    for i, c in enumerate(loss_cols[:5]):
        xs, ys = _series(rows, steps, c)
        col = _LOSS_COLORS[i % len(_LOSS_COLORS)]
        if len(ys) > 60:
            ax.plot(xs, ys, color=col, alpha=0.25, lw=0.8)
            (h,) = ax.plot(xs, _smooth(ys, max(3, len(ys) // 40)), color=col, lw=1.6, label=f"{_pretty(c)} (smoothed)")
        else:
            (h,) = ax.plot(xs, ys, color=col, lw=1.5, marker="o" if len(ys) < 25 else None, ms=3, label=_pretty(c))
        handles.append(h)
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    if acc_cols:
        ax_acc = ax.twinx()
        for i, c in enumerate(acc_cols[:4]):
            xs, ys = _series(rows, steps, c)
            (h,) = ax_acc.plot(xs, ys, color=_ACC_COLORS[i % len(_ACC_COLORS)], lw=1.6, ls="--",
                               marker="s" if len(ys) < 40 else None, ms=3.5, label=_pretty(c))
            handles.append(h)
        ax_acc.set_ylabel("accuracy")
        top = max((y for c in acc_cols for y in _series(rows, steps, c)[1]), default=1.0)
        if top <= 1.0:
            ax_acc.set_ylim(0.0, 1.02)
    if handles:
        ax.legend(handles=handles, loc="center right", fontsize=8, framealpha=0.85)
    else:
        ax.text(0.5, 0.5, "no loss / accuracy logged", ha="center", va="center", transform=ax.transAxes,
                color="#777777")


def _plot_sparsity(ax_sp: Any, rows: list[dict[str, Any]], steps: list[float], sp_cols: list[str]) -> None:
    for i, c in enumerate(sp_cols[:4]):
        xs, ys = _series(rows, steps, c)
        ax_sp.plot(xs, ys, lw=1.6, color=_SPARSITY_COLORS[i % len(_SPARSITY_COLORS)],
                   ls="-" if "target" not in c.lower() else ":", label=_pretty(c), drawstyle="steps-post")
    if sp_cols:
        ax_sp.legend(loc="upper left", fontsize=8, framealpha=0.85)
        ax_sp.set_ylim(-0.03, 1.03)
    else:
        ax_sp.text(0.5, 0.5, "no group sparsity logged", ha="center", va="center", transform=ax_sp.transAxes,
                   color="#777777")
    ax_sp.set_ylabel("group sparsity")
    ax_sp.set_xlabel("step")
    ax_sp.grid(alpha=0.3)


def _mark_phases(axes: Sequence[Any], bounds: list[tuple[float, str]], x_min: float, x_max: float) -> None:
    """Shaded spans, a dashed line where each phase starts, its name above the first axis."""
    ends = [s for s, _ in bounds[1:]] + [max(x_max, bounds[-1][0]) if bounds else x_max]
    for (start, name), end in zip(bounds, ends):
        for a in axes:
            a.axvspan(start, end, color=PHASE_COLORS.get(name, "#eeeeee"), alpha=0.35, lw=0, zorder=0)
            if start > x_min:
                a.axvline(start, color="#444444", ls="--", lw=1.0, zorder=1)
        axes[0].text(start, 1.005, f" {name}", transform=axes[0].get_xaxis_transform(), ha="left", va="bottom",
                     fontsize=9, color="#333333", clip_on=False)


def plot_training_curves(metrics_csv_or_records: str | Path | Sequence[Mapping[str, Any]], out_png: str | Path,
                         phase_boundaries: Any = None, title: str | None = None) -> str:
    """Write loss/accuracy and group-sparsity curves vs step to ``out_png``; returns its path.

    ``metrics_csv_or_records``: a CSVLogger ``metrics.csv`` (or its folder) or a list of dicts with keys
    like ``step``, ``train_loss``/``loss``, ``val_acc``, ``oto/group_sparsity``, ``oto/phase``.
    ``phase_boundaries``: where phases start — ``{"projection": 100, "hybrid": 300}``,
    ``[(100, "projection"), (300, "hybrid")]`` or plain steps (``[100, 300]`` = projection, hybrid
    starts; three steps = warm-up, projection, hybrid).  Omitted: read from the ``oto/phase`` column
    (names or codes 0/1/2 = warm-up/projection/hybrid).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = load_records(metrics_csv_or_records)
    steps = _steps(rows)
    cols: list[str] = list(dict.fromkeys(k for r in rows for k in r))
    numeric = [c for c in cols if c not in _STEP_KEYS and c != "epoch"
               and any(_num(r.get(c)) is not None for r in rows)]
    loss_cols = [c for c in numeric if "loss" in c.lower()]
    acc_cols = [c for c in numeric if "acc" in c.lower()]
    sp_cols = [c for c in numeric if "sparsity" in c.lower()]
    bounds = _normalize_boundaries(phase_boundaries) if phase_boundaries is not None else phase_starts(rows, steps)
    x_max = max(steps) if steps else 1.0
    x_min = min(steps) if steps else 0.0

    fig = Figure(figsize=(9.0, 6.4), dpi=110)
    FigureCanvasAgg(fig)
    gs = fig.add_gridspec(2, 1, height_ratios=(2.1, 1.0), hspace=0.08)
    ax = fig.add_subplot(gs[0])
    ax_sp = fig.add_subplot(gs[1], sharex=ax)
    _plot_loss_and_accuracy(ax, rows, steps, loss_cols, acc_cols)
    _plot_sparsity(ax_sp, rows, steps, sp_cols)
    ax.tick_params(labelbottom=False)
    _mark_phases((ax, ax_sp), bounds, x_min, x_max)
    ax.set_xlim(x_min, x_max if x_max > x_min else x_min + 1)
    fig.suptitle(title or "training curves", fontsize=11, y=0.985)
    fig.subplots_adjust(left=0.08, right=0.92, top=0.90, bottom=0.08)
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return str(out)


__all__ = ["plot_training_curves", "load_records", "phase_starts", "PHASES"]
