"""Aggregate a Hydra multirun into a table and a Pareto plot.

    python -m lightning_oto.sweep multirun/regnet/<date>   [--out DIR]

Reads every ``result.json`` below the directory (one per run, written by ``lightning_oto.train``)
and writes ``sweep.csv``, ``sweep.md`` and ``pareto.png`` (accuracy vs parameters and vs FLOPs,
one series per optimizer; invalid sub-networks are listed, not plotted).
"""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path
from typing import Any, Sequence

COLUMNS = ("target_group_sparsity", "optimizer", "mode", "seed", "params_full", "params_sub", "flops_full",
           "flops_sub", "test_acc", "valid", "group_sparsity", "model", "data", "run_dir")


def collect(root: str | Path) -> list[dict[str, Any]]:
    """One row per run below ``root``, sorted by optimizer, sparsity and seed."""
    rows = []
    for path in sorted(Path(root).rglob("result.json")):
        r = json.loads(path.read_text())
        r["run_dir"] = str(path.parent)
        rows.append(r)
    rows.sort(key=lambda r: (str(r.get("optimizer")), float(r.get("target_group_sparsity") or 0), r.get("seed", 0)))
    return rows


def _fmt(v: Any, key: str) -> str:
    if v is None:
        return "–"
    if key.startswith("params"):
        return f"{v / 1e6:.3f}M"
    if key.startswith("flops"):
        return f"{v / 1e6:.1f}M"
    if key == "test_acc":
        return f"{100 * v:.2f}%"
    if key == "valid":
        return "yes" if v else "**no**"
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def write_table(rows: Sequence[dict[str, Any]], out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out / "sweep.csv", out / "sweep.md"
    with csv_path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k) for k in COLUMNS})
    shown = [c for c in COLUMNS if c not in ("run_dir", "mode", "model", "data")]
    lines = ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(k), k) for k in shown) + " |")
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path


def plot_pareto(rows: Sequence[dict[str, Any]], out_png: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4.2))
    axes = fig.subplots(1, 2)
    for ax, key, label in ((axes[0], "params_sub", "parameters (M)"), (axes[1], "flops_sub", "FLOPs (M)")):
        for opt in sorted({str(r.get("optimizer")) for r in rows}):
            pts = sorted((r[key] / 1e6, 100 * r["test_acc"], r.get("target_group_sparsity"))
                         for r in rows if str(r.get("optimizer")) == opt and r.get("valid")
                         and r.get(key) is not None and r.get("test_acc") is not None)
            if not pts:
                continue
            xs, ys, ss = zip(*pts)
            ax.plot(xs, ys, "o-", label=opt)
            for x, y, s in zip(xs, ys, ss):
                ax.annotate(f"{s}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        full = [r for r in rows if r.get(key.replace("_sub", "_full")) is not None]
        if full:
            ax.axvline(full[0][key.replace("_sub", "_full")] / 1e6, color="grey", ls=":", label="full model")
        ax.set_xlabel(label)
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    invalid = [r for r in rows if not r.get("valid")]
    title = "accuracy vs size (labels: target group sparsity)"
    if invalid:
        title += f" — {len(invalid)} invalid sub-network(s) not plotted"
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
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
