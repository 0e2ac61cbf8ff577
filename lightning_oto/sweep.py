"""Aggregate a Hydra multirun into a table and a Pareto plot.

    python -m lightning_oto.sweep multirun/regnet/<date>   [--out DIR]

Reads every ``result.json`` below the directory (one per run, written by ``lightning_oto.train``)
and writes ``sweep.csv``, ``sweep.md`` and ``pareto.png`` (accuracy vs parameters and vs FLOPs,
one series per optimizer). Each run gets a status: ``baseline`` (a dense run: ``"baseline": true``
or ``oto=none``), ``valid``, ``invalid`` (no sub-network; listed, not plotted) or ``nothing removed``
(a valid run whose sub-network is the full model, e.g. a search that ended in warm-up) or ``degraded``
(a valid sub-network whose validation metric fell by more than the callback's ``max_metric_drop``
from the dense reference at the end of warm-up; plotted, with a cross). The table
also shows the phase each search reached and whether it finished.
"""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path
from typing import Any, Sequence

COLUMNS = ("target_group_sparsity", "optimizer", "mode", "seed", "params_full", "params_sub", "flops_full",
           "flops_sub", "test_acc", "valid", "group_sparsity", "status", "phase_reached", "search_finished",
           "baseline", "model", "data", "run_dir")
SHOWN = ("run", "target_group_sparsity", "group_sparsity", "seed", "params", "flops", "test_acc", "phase_reached",
         "search_finished", "status")
HEADERS = {"run": "run", "target_group_sparsity": "target sparsity", "group_sparsity": "reached", "seed": "seed",
           "params": "params (kept)", "flops": "FLOPs (kept)", "test_acc": "test acc",
           "phase_reached": "phase reached", "search_finished": "search finished", "status": "result",
           "acc_vs_baseline": "acc vs dense"}


# ---- rows --------------------------------------------------------------------------------------------
def status(r: dict[str, Any]) -> str:
    """baseline | invalid | nothing removed | degraded | valid."""
    if r.get("baseline"):
        return "baseline"
    if not r.get("valid"):
        return "invalid"
    zero = r.get("num_zero_groups")
    same_size = (r.get("params_sub") is not None and r.get("params_sub") == r.get("params_full")
                 and r.get("flops_sub") == r.get("flops_full"))
    if zero == 0 or (zero is None and same_size):
        return "nothing removed"
    if r.get("degraded"):  # the accuracy guard: the final validation lost more than max_metric_drop
        return "degraded"
    return "valid"


def collect(root: str | Path) -> list[dict[str, Any]]:
    """One row per run below ``root``: baselines first, then by optimizer, sparsity and seed."""
    rows = []
    for path in sorted(Path(root).rglob("result.json")):
        r = json.loads(path.read_text())
        r["run_dir"] = str(path.parent)
        r.setdefault("phase_reached", None)  # written by newer runs only
        r.setdefault("search_finished", None)
        # runs without compression (oto=none) written before the "baseline" flag existed count as baselines
        r["baseline"] = bool(r.get("baseline", r.get("mode") is None and r.get("optimizer") == "sgd"))
        r["status"] = status(r)
        rows.append(r)
    rows.sort(key=lambda r: (not r["baseline"], str(r.get("optimizer")), float(r.get("target_group_sparsity") or 0),
                             r.get("seed") or 0))
    return rows


def _baseline_acc(rows: Sequence[dict[str, Any]], r: dict[str, Any]) -> float | None:
    """Test accuracy of the dense baseline for the same model and data (and seed when there is one)."""
    same = [b for b in rows if b["baseline"] and b.get("test_acc") is not None
            and (b.get("model"), b.get("data")) == (r.get("model"), r.get("data"))]
    seeded = [b for b in same if b.get("seed") == r.get("seed")]
    pick = seeded or same
    return float(pick[0]["test_acc"]) if pick else None


# ---- table -------------------------------------------------------------------------------------------
def _size(r: dict[str, Any], kind: str) -> str:
    sub, full = r.get(f"{kind}_sub"), r.get(f"{kind}_full")
    if sub is None:
        return "–"
    text = f"{sub / 1e6:.3f}M" if kind == "params" else f"{sub / 1e6:.1f}M"
    return f"{text} ({100 * sub / full:.1f}%)" if full else text


def _cell(r: dict[str, Any], key: str, rows: Sequence[dict[str, Any]]) -> str:
    v = r.get(key)
    if key == "run":
        return "dense baseline" if r["baseline"] else " ".join(str(x) for x in (r.get("mode"), r.get("optimizer")) if x)
    if key in ("params", "flops"):
        return _size(r, key)
    if key == "test_acc":
        return "–" if v is None else f"{100 * v:.2f}%"
    if key == "acc_vs_baseline":
        base = _baseline_acc(rows, r)
        return "–" if base is None or r.get("test_acc") is None or r["baseline"] else \
            f"{100 * (r['test_acc'] - base):+.2f} pt"
    if key == "search_finished":
        return "–" if v is None or r["baseline"] else ("yes" if v else "**no**")
    if key == "status":
        return v if v in ("valid", "baseline") else f"**{v}**"
    if key in ("target_group_sparsity", "group_sparsity") and r["baseline"]:
        return "–"
    if v is None:
        return "–"
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def write_table(rows: Sequence[dict[str, Any]], out: Path) -> tuple[Path, Path]:
    """``sweep.csv`` (every field) and ``sweep.md`` (header, separator, one line per run)."""
    out.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out / "sweep.csv", out / "sweep.md"
    with csv_path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k) for k in COLUMNS})
    shown = list(SHOWN)
    if any(r["baseline"] for r in rows):
        shown.insert(shown.index("test_acc") + 1, "acc_vs_baseline")
    lines = ["| " + " | ".join(HEADERS[c] for c in shown) + " |", "|" + "---|" * len(shown)]
    for r in rows:
        lines.append("| " + " | ".join(_cell(r, k, rows) for k in shown) + " |")
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path


# ---- plot --------------------------------------------------------------------------------------------
def _merged_labels(points: Sequence[tuple[float, float, str]], span: tuple[float, float]) -> list[tuple[float, float, str]]:
    """One label per spot: points closer than 1% of the axis spans share it ("0.2, 0.5")."""
    merged: list[list[Any]] = []
    for x, y, text in sorted(points):
        for m in merged:
            if abs(m[0] - x) <= 0.01 * span[0] and abs(m[1] - y) <= 0.01 * span[1]:
                if text not in m[2]:
                    m[2].append(text)
                break
        else:
            merged.append([x, y, [text]])
    return [(x, y, ", ".join(sorted(texts, key=_number_first))) for x, y, texts in merged]


def _number_first(text: str) -> tuple[float, str]:
    try:
        return float(text), text
    except ValueError:
        return float("inf"), text


def _padded(box: Any, dx: float, dy: float) -> Any:
    from matplotlib.transforms import Bbox

    return Bbox.from_extents(box.x0 - dx, box.y0 - dy, box.x1 + dx, box.y1 + dy)


def place_labels(ax: Any, points: Sequence[tuple[float, float, str]], fontsize: int = 7) -> list[Any]:
    """Annotate ``points`` so no two labels overlap: each label moves up (then down) until it is clear."""
    fig = ax.figure
    if fig.canvas is None or not hasattr(fig.canvas, "get_renderer"):
        from matplotlib.backends.backend_agg import FigureCanvasAgg

        FigureCanvasAgg(fig)
    renderer = fig.canvas.get_renderer()
    x0, x1 = ax.get_xlim()
    y0, y1 = ax.get_ylim()
    placed: list[Any] = []
    boxes: list[Any] = []
    for x, y, text in _merged_labels(points, (x1 - x0, y1 - y0)):
        left = x > x0 + 0.7 * (x1 - x0)  # near the right edge: write the label to the left of the point
        dx, ha = (-6, "right") if left else (4, "left")
        for dy in (4, 12, 20, 28, -12, -20, -28, 36, 44, -36, -44):
            ann = ax.annotate(text, (x, y), textcoords="offset points", xytext=(dx, dy), ha=ha, fontsize=fontsize)
            box = _padded(ann.get_window_extent(renderer), 4, 1)
            if not any(box.overlaps(b) for b in boxes):
                break
            ann.remove()
        else:  # nowhere free: fall back to the first position rather than lose the label
            ann = ax.annotate(text, (x, y), textcoords="offset points", xytext=(dx, 4), ha=ha, fontsize=fontsize)
            box = ann.get_window_extent(renderer)
        placed.append(ann)
        boxes.append(box)
    return placed


def _set_ranges(ax: Any, xs: Sequence[float], ys: Sequence[float], full_x: float | None) -> None:
    """Axes that show the compression to scale: x from 0 past the full model, y at least 5 points wide."""
    right = max(list(xs) + ([full_x] if full_x else [])) if xs or full_x else 1.0
    ax.set_xlim(0, 1.08 * right)
    if ys:
        lo, hi = min(ys), max(ys)
        mid, half = (lo + hi) / 2, max((hi - lo) / 2 * 1.25, 2.5)
        ax.set_ylim(max(0.0, mid - half), min(100.0, mid + half))
    ax.ticklabel_format(useOffset=False, style="plain")


def pareto_figure(rows: Sequence[dict[str, Any]]) -> Any:
    """Accuracy vs parameters and vs FLOPs; baselines as stars, runs that removed nothing hollow."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4.4))
    axes = fig.subplots(1, 2)
    labels = []
    for ax, key, label in ((axes[0], "params_sub", "parameters (M)"), (axes[1], "flops_sub", "FLOPs (M)")):
        full_key = key.replace("_sub", "_full")
        usable = [r for r in rows if r["status"] != "invalid" and r.get(key) is not None
                  and r.get("test_acc") is not None]
        full = next((r[full_key] / 1e6 for r in rows if r.get(full_key) is not None), None)
        _set_ranges(ax, [r[key] / 1e6 for r in usable], [100 * r["test_acc"] for r in usable], full)
        labels.append(_draw_series(ax, usable, key))
        if full is not None:
            ax.axvline(full, color="grey", ls=":", label="full model")
        ax.set_xlabel(label)
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    invalid = sum(r["status"] == "invalid" for r in rows)
    title = "accuracy vs size (labels: target group sparsity)"
    if invalid:
        title += f" — {invalid} invalid sub-network(s) not plotted"
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    for ax, points in zip(axes, labels):  # after the layout, so label boxes are measured where they end up
        place_labels(ax, points)
    return fig


def _draw_series(ax: Any, rows: Sequence[dict[str, Any]], key: str) -> list[tuple[float, float, str]]:
    """Plot the rows; returns the points that want a sparsity label."""
    labels: list[tuple[float, float, str]] = []
    for b in (r for r in rows if r["baseline"]):
        ax.plot(b[key] / 1e6, 100 * b["test_acc"], "*", ms=13, color="black", label="dense baseline")
    usable = ("valid", "degraded")
    for i, opt in enumerate(sorted({str(r.get("optimizer")) for r in rows if r["status"] in usable})):
        pts = sorted((r[key] / 1e6, 100 * r["test_acc"], f"{r.get('target_group_sparsity')}")
                     for r in rows if r["status"] in usable and str(r.get("optimizer")) == opt)
        # later series smaller, so a point two optimizers share shows both
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", ms=max(3, 8 - 2.5 * i), label=opt)
        labels.extend(pts)
    bad = [r for r in rows if r["status"] == "degraded"]
    if bad:
        ax.plot([r[key] / 1e6 for r in bad], [100 * r["test_acc"] for r in bad], "x", ms=10, color="red",
                label="degraded (accuracy guard)")
    empty = [r for r in rows if r["status"] == "nothing removed"]
    if empty:
        ax.plot([r[key] / 1e6 for r in empty], [100 * r["test_acc"] for r in empty], "o", mfc="none", color="grey",
                label="removed nothing")
        labels.extend((r[key] / 1e6, 100 * r["test_acc"], f"{r.get('target_group_sparsity')}") for r in empty)
    return labels


def plot_pareto(rows: Sequence[dict[str, Any]], out_png: Path) -> Path:
    pareto_figure(rows).savefig(out_png, dpi=120)
    return out_png


def aggregate(root: str | Path, out: str | Path | None = None) -> dict[str, str]:
    rows = collect(root)
    if not rows:
        raise FileNotFoundError(f"no result.json below {root}: run a sweep with `python -m lightning_oto.train -m ...`")
    out_dir = Path(out) if out else Path(root)
    csv_path, md_path = write_table(rows, out_dir)
    png = plot_pareto(rows, out_dir / "pareto.png")
    return {"csv": str(csv_path), "markdown": str(md_path), "plot": str(png), "runs": str(len(rows))}


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root", help="multirun directory (contains one sub-directory per run)")
    ap.add_argument("--out", default=None, help="where to write sweep.csv / sweep.md / pareto.png (default: root)")
    args = ap.parse_args(argv)
    paths = aggregate(args.root, args.out)
    print(Path(paths["markdown"]).read_text())
    print(json.dumps(paths, indent=2))


if __name__ == "__main__":
    main()
