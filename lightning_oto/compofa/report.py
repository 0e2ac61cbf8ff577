"""Pareto table (CSV + Markdown) and plot (PNG, matplotlib Agg) for CompOFA search results."""
from __future__ import annotations

import csv
import os
from typing import Any, Sequence


def write_table(rows: Sequence[dict[str, Any]], csv_path: str, md_path: str, title: str = "") -> None:
    """Same rows as CSV and as a Markdown table (columns from the first row)."""
    if not rows:
        rows = [{"note": "no rows"}]
    cols = list(rows[0].keys())
    for p in (csv_path, md_path):
        d = os.path.dirname(p)
        if d:
            os.makedirs(d, exist_ok=True)
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    with open(md_path, "w") as f:
        if title:
            f.write(f"# {title}\n\n")
        f.write("| " + " | ".join(cols) + " |\n")
        f.write("|" + "|".join("---" for _ in cols) + "|\n")
        for r in rows:
            f.write("| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |\n")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v).replace("|", "/")


def plot_pareto(
    path: str,
    front: Sequence[dict[str, Any]],
    cloud: Sequence[dict[str, Any]] = (),
    targets: Sequence[float] = (),
    title: str = "CompOFA accuracy vs measured latency",
) -> None:
    """Scatter of evaluated networks (``cloud``), the searched points (``front``) and targets."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    if cloud:
        ax.scatter(
            [r["latency_ms"] for r in cloud],
            [100 * r["accuracy"] for r in cloud],
            s=8,
            c="0.7",
            label=f"evaluated sub-networks ({len(cloud)})",
        )
    pts = sorted((r["latency_ms"], 100 * r["accuracy"]) for r in front if r.get("feasible", True))
    if pts:
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", c="C3", label="search result per target")
    for t in targets:
        ax.axvline(t, c="C0", lw=0.6, ls="--")
    ax.set_xlabel("latency (ms, batch 1, this CPU)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    d = os.path.dirname(path)
    if d:
        os.makedirs(d, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
