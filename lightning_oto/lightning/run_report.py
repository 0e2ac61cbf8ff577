"""The callback's run report (``oto_report.json``) and its plain-text summary (``oto_summary.txt``).

Percentages are always labelled: sizes say how much was *removed*, nothing is left as a bare ratio.
"""
from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any, Mapping

#: ``oto/phase`` as logged: the optimizer's phase name -> number
PHASE_CODES: dict[str, int] = {"warmup": 0, "projection": 1, "hybrid": 2}

REPORT_FILE = "oto_report.json"
SUMMARY_FILE = "oto_summary.txt"
_VALUE_WIDTH = 64


def search_outcome(opt: Any) -> dict[str, Any]:
    """Where the search got to: ``phase_reached``, ``search_finished`` and the step counts behind them."""
    planned = int(opt.warmup_steps) + int(opt.projection_steps)
    return {
        "phase_reached": opt.phase,
        "phase_code": PHASE_CODES[opt.phase],
        "search_finished": opt.phase == "hybrid" and int(opt.num_steps) >= planned,
        "optimizer_steps": int(opt.num_steps),
        "warmup_steps": int(opt.warmup_steps),
        "projection_steps": int(opt.projection_steps),
        # counts the half-space optimizers keep (None until the optimizer provides them)
        "zeroed_by_half_space": _int_or_none(getattr(opt, "zeroed_by_half_space", None)),
        "forced_at_deadline": _int_or_none(getattr(opt, "forced_at_deadline", None)),
        # |x_g| just before the cut / |x_g| at selection, as a distribution (None where not recorded)
        "cut_norm_ratio": opt.cut_norm_summary() if hasattr(opt, "cut_norm_summary") else None,
    }


def removed_groups(groups: Any, zero_ids: list[int]) -> list[dict[str, Any]]:
    """Each removed group by id and name, with the tensors construction sliced because of it (``dependents``:
    a consumer's input columns are ``dim 1`` of its weight), so a reader can say what went with it."""
    out = []
    for gid in zero_ids:
        g = groups[gid]
        deps = [{"param": d.name, "dim": d.dim, "count": None if d.indices is None else len(d.indices)}
                for d in g.dependents]
        out.append({"id": gid, "name": g.name, "dependents": deps})
    return out


def _int_or_none(v: Any) -> int | None:
    return None if v is None else int(v)


def size_fields(comp: Mapping[str, Any]) -> dict[str, Any]:
    """Params / FLOPs full vs sub, with the kept ratio and the removed fraction spelled out."""
    out = {k: comp.get(k) for k in ("params_full", "params_sub", "param_ratio", "flops_full", "flops_sub",
                                     "flop_ratio", "group_sparsity")}
    for ratio, removed in (("param_ratio", "params_removed_fraction"), ("flop_ratio", "flops_removed_fraction")):
        r = out.get(ratio)
        out[removed] = None if r is None else 1.0 - float(r)
    return out


def write_report(report: Mapping[str, Any], out_dir: Path) -> tuple[Path, Path]:
    """Write ``oto_report.json`` and ``oto_summary.txt`` (the same numbers) into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rep_path, sum_path = out_dir / REPORT_FILE, out_dir / SUMMARY_FILE
    rep_path.write_text(json.dumps(report, indent=2, default=str))
    text = summary_table(report)
    if report.get("module_summary"):
        text += "\n\nper module (before -> after):\n" + str(report["module_summary"])
    sum_path.write_text(text + "\n")
    return rep_path, sum_path


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _target(report: Mapping[str, Any]) -> str:
    target = report.get("target_group_sparsity")
    return "set by the budget" if target is None else f"target {_fmt(target)}"


def _size_row(report: Mapping[str, Any], key: str, unit: str) -> str:
    full, sub, removed = report.get(f"{key}_full"), report.get(f"{key}_sub"), report.get(f"{key}_removed_fraction")
    if full is None or sub is None:
        return "-"
    return f"{full:,} -> {sub:,} {unit}({100 * (removed or 0.0):.1f}% removed)"


def _search_row(report: Mapping[str, Any]) -> str:
    done = "finished" if report.get("search_finished") else "NOT finished"
    return (f"{done}: {report['phase_reached']} phase at step {report['optimizer_steps']} "
            f"(warm-up {report['warmup_steps']} + projection {report['projection_steps']})")


def _metric_rows(report: Mapping[str, Any]) -> list[tuple[str, str]]:
    metrics = report.get("metrics") or {}
    rows = []
    before, after = metrics.get("val_before_recalibration") or {}, metrics.get("val") or {}
    for key in sorted(set(before) | set(after)):
        b, a = before.get(key), after.get(key)
        if b is not None and a is not None:
            rows.append((key, f"{_fmt(b)} -> {_fmt(a)} after BN recalibration"))
        else:
            rows.append((key, _fmt(a if a is not None else b) + ("" if a is not None else " (before recalibration)")))
    for key, v in sorted((metrics.get("test") or {}).items()):
        rows.append((key, _fmt(v)))
    return rows


def _guard_rows(report: Mapping[str, Any]) -> list[tuple[str, str]]:
    """How small the groups were when cut, and the accuracy guard's verdict."""
    rows = []
    cut = report.get("cut_norm_ratio") or {}
    if cut.get("cut"):
        rows.append(("size when cut", f"median {cut['median']:.2g}, max {cut['max']:.2g} of the norm at selection "
                                      f"({cut['above_0.1']} of {cut['cut']} above 0.1)"))
    speed = report.get("speed") or {}
    for b, row in (speed.get("batches") or {}).items():
        of = row.get("of_flop_reduction")
        rows.append((f"speed-up, batch {b}", f"{row['speedup']:.2f}x on {speed['device']} ({row['full_ms']:.3g} -> "
                                             f"{row['sub_ms']:.3g} ms)" + ("" if of is None else
                                             f", {of:.2f} of the FLOP reduction {speed['flop_reduction']:.2f}x")))
    guard = report.get("metric_guard") or {}
    if guard.get("active") and guard.get("final"):
        ref, fin = guard["reference"]["value"], guard["final"]["value"]
        verdict = "DEGRADED" if guard["degraded"] else ("dropped, recovered" if guard["dropped"] else "kept")
        rows.append(("accuracy guard", f"{verdict}: {guard['monitor']} {_fmt(ref)} (end of warm-up) -> {_fmt(fin)} "
                                       f"(max drop {_fmt(guard['max_metric_drop'])}, {guard['drop_is']})"))
    return rows


def _names(removed: list[dict[str, Any]], shown: int = 6) -> str:
    """The first removed groups by name (whole names; the full list is in the JSON report)."""
    names = ", ".join(g["name"] for g in removed[:shown])
    more = f", and {len(removed) - shown} more (oto_report.json lists all)" if len(removed) > shown else ""
    return (names + more) or "-"


def summary_table(report: Mapping[str, Any]) -> str:
    """Plain-text summary of a report: what was removed, how much smaller, how accurate, how exact."""
    removed = report.get("removed_groups") or []
    rows: list[tuple[str, str]] = [
        ("mode / optimizer", f"{report['mode']} / {report['optimizer']}"),
        ("removed groups", f"{report['num_zero_groups']} of {report['num_prunable_groups']} (group sparsity "
                           f"{_fmt(report['group_sparsity'])}, {_target(report)})"),
        ("parameters", _size_row(report, "params", "")),
        ("FLOPs", _size_row(report, "flops", "")),
        ("search", _search_row(report)),
    ]
    if report.get("budget"):
        rows.insert(2, ("budget (asked -> kept)", ", ".join(f"{k} {v['asked']:g} -> {v['reached']:.3f}"
                                                            for k, v in report["budget"].items())))
    if report.get("floors_held"):
        rows.append(("floor held", ", ".join(report["floors_held"])))
    rows += _guard_rows(report)
    if report.get("removed_nothing"):
        rows.append(("RESULT", "nothing was removed: the sub-network is the full network. Train longer, or "
                               "shorten warm-up / projection, so the search finishes."))
    rows += _metric_rows(report)
    recal = report.get("bn_recalibration_batches_used")
    if recal is not None:
        rows.append(("BN recalibration", f"{recal} training batches" if recal else "off / no BatchNorm"))
    rows += [
        ("max |sub - full|", _fmt(report["verification_max_abs_error"])),
        ("exported to", str(report["export_dir"])),
        ("removed", _names(removed)),
    ]
    return _box("OTO compression summary", rows)


def _box(title: str, rows: list[tuple[str, str]]) -> str:
    """A two-column box; long values wrap onto further lines instead of being cut."""
    w = max(len(k) for k, _ in rows)
    line = "+" + "-" * (w + 2) + "+" + "-" * (_VALUE_WIDTH + 2) + "+"
    out = [line, f"| {title.ljust(w + _VALUE_WIDTH + 3)}|", line]
    for key, value in rows:
        parts = textwrap.wrap(value, _VALUE_WIDTH, break_long_words=True, break_on_hyphens=False) or ["-"]
        for i, part in enumerate(parts):
            out.append(f"| {(key if i == 0 else '').ljust(w)} | {part.ljust(_VALUE_WIDTH)} |")
    out.append(line)
    return "\n".join(out)


__all__ = ["PHASE_CODES", "REPORT_FILE", "SUMMARY_FILE", "removed_groups", "search_outcome", "size_fields",
           "summary_table", "write_report"]
