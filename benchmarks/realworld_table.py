"""Where the engine stands on the models people use: writes docs/realworld.md.

One row per zoo model (``tests/realworld/zoo.py``) and mode, measured by the same harness the
real-world tests assert on: removable structures found, params and FLOPs full -> sub at 50 %
(``random_set_zero_groups(0.5)``), exactness on the example and a second input, whether the parameter
accounting holds, construction time, and the first failure.  A model that fails never stops the
script.  ``--sizes`` instead times erase-mode construction on a ResNet-50-sized and a BERT-base-sized
model against one plain ``torch.export`` of the same model measured in the same run.

    python benchmarks/realworld_table.py [--models bert,vit] [--modes erase] [--out docs/realworld.md]
    python benchmarks/realworld_table.py --sizes
"""
from __future__ import annotations

import argparse
import datetime
import fnmatch
import logging
import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _use_this_checkout() -> None:
    """Import lightning_oto from this checkout (not whichever one the venv installed) and the test zoo."""
    for p in (ROOT / "tests", ROOT):
        if str(p) not in sys.path:
            sys.path.insert(0, str(p))


def _quiet() -> None:
    warnings.simplefilter("ignore")
    logging.getLogger("lightning_oto").setLevel(logging.ERROR)
    import transformers

    transformers.logging.set_verbosity_error()


# ------------------------------------------------------------------ the table
def _yes(ok: bool) -> str:
    return "yes" if ok else "**no**"


def _num(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.3g}{unit}"
    return str(n)


def _ratio(full: int | None, sub: int | None) -> str:
    if full is None or sub is None:
        return "-"
    return f"{_num(full)} -> {_num(sub)} ({sub / max(1, full):.2f})"


def _exact(err: float | None, allowed: float | None, refused: str | None = None) -> str:
    if refused:
        return "**rejected**"
    if err is None:
        return "-"
    return f"{_yes(err <= allowed)} ({err:.1e})"


def _first_failure(out) -> str:
    """Every failure class of the row, then the first one's details (cut to fit a table cell)."""
    problems = out.failures()
    if not problems:
        return ""
    classes = "; ".join(dict.fromkeys(cls for cls, _ in problems))
    detail = problems[0][1].replace("|", "/").replace("\n", " ")
    detail = detail[:200] + "..." if len(detail) > 200 else detail
    return f"{classes} -- {detail}"


def _removal(out) -> str:
    frac = out.removable / out.groups if out.groups else 0.0
    why = ""
    if not out.removable and out.reasons:
        why = f"; kept: {out.reasons[0][:80]}".replace("|", "/")
    return f"{out.removable}/{out.groups} ({frac:.0%}){why}"


def _row(out) -> str:
    t = "-" if out.trace_s is None else f"{out.trace_s:.2f}"
    c = "-" if out.construct_s is None else f"{out.construct_s:.2f}"
    accounting = "-" if not out.removable or out.params_sub is None else _yes(out.accounting_holds and not out.dead)
    cells = [out.name, out.mode, _removal(out), str(out.removed), _ratio(out.params_full, out.params_sub),
             _ratio(out.flops_full, out.flops_sub), _exact(out.err, out.allowed),
             _exact(out.err2, out.allowed2, out.second_error), accounting, f"{t} + {c}", _first_failure(out)]
    return "| " + " | ".join(cells) + " |"


HEADER = ("| model | mode | removable groups | removed | params full -> sub | FLOPs full -> sub | exact (x) | "
          "exact (other shape) | accounting | OTO + construct s | first failure |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|")


def _really_lost(out) -> bool:
    return not out.error and out.lost_structures and not out.dead


def _totals(outs: list, modes: list[str]) -> list[str]:
    lines = ["| mode | models | exact on both inputs | really lose structures | removable structures found | "
             "pass every check | crash |", "|---|---|---|---|---|---|---|"]
    for mode in modes:
        rows = [o for o in outs if o.mode == mode]
        exact = sum(1 for o in rows if not o.error and o.exact and o.exact2 and not o.second_error)
        lines.append(f"| {mode} | {len(rows)} | {exact} | {sum(map(_really_lost, rows))} | "
                     f"{sum(1 for o in rows if o.removable)} | {sum(1 for o in rows if not o.failures())} | "
                     f"{sum(1 for o in rows if o.error)} |")
    return lines


def _failure_classes(outs: list) -> list[str]:
    by_class: dict[str, list[str]] = {}
    for o in outs:
        for cls, _ in o.failures():
            by_class.setdefault(cls, []).append(f"{o.name} ({o.mode})")
    return [f"- **{cls}** ({len(set(v))}): {', '.join(sorted(set(v)))}" for cls, v in sorted(by_class.items())]


def _header_lines(elapsed: float) -> list[str]:
    import torch
    import transformers

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return [
        "# Real-world models: where the engine stands",
        "",
        "Generated by `python benchmarks/realworld_table.py`; do not edit by hand.",
        f"Commit `{commit}`, {datetime.date.today()}, torch {torch.__version__}, transformers "
        f"{transformers.__version__}, {platform.machine()}, {torch.get_num_threads()} threads, "
        f"{elapsed:.0f} s in all.",
        "",
        "Each model is a tiny random-initialised version (perturbed so no bias, gamma or statistic is trivially",
        "zero) from `tests/realworld/zoo.py`. Per mode: `OTO(model, x, mode)`, `random_set_zero_groups(0.5, seed=0)`,",
        "`construct_subnet(verify=False)`, then the checks of `tests/realworld/test_realworld.py`:",
        "exact = max |sub - full| <= 1e-4 + 1e-5 x max|full| (max difference in brackets), on the example input `x`",
        "and on a second input with another batch size (and sequence length, or image size for fully",
        "convolutional models); *accounting* = the sub-network's parameter count is the full count minus exactly",
        "what the removed zero groups own, and no parameter of the sub-network is dead. *removed* counts the zero",
        "groups due for removal (prune mode keeps one where a tensor would lose every channel). Times are wall",
        "seconds on this machine: `OTO(...)` (trace + search space) and `construct_subnet`.",
        "",
    ]


def table(names: list[str], modes: list[str], out_path: Path) -> None:
    from realworld.harness import run_case
    from realworld.zoo import ZOO

    t0 = time.perf_counter()
    outs = []
    for name in names:
        for mode in modes:
            t = time.perf_counter()
            out = run_case(ZOO[name], mode)
            outs.append(out)
            verdict = "ok" if not out.failures() else out.failures()[0][0]
            print(f"{name:30s} {mode:6s} {time.perf_counter() - t:6.1f}s  {verdict}", flush=True)
    zoo = [o for o in outs if not o.name.startswith("fixture_")]
    fixtures = [o for o in outs if o.name.startswith("fixture_")]
    lines = _header_lines(time.perf_counter() - t0)
    lines += ["## Totals (zoo models)", ""] + _totals(zoo, modes) + [""]
    lines += ["## Failures by class", ""] + (_failure_classes(outs) or ["none"]) + [""]
    lines += ["## Models", "", HEADER] + [_row(o) for o in zoo] + [""]
    if fixtures:
        lines += ["## Failure-class fixtures (`tests/realworld/fixtures.py`)", "", HEADER]
        lines += [_row(o) for o in fixtures] + [""]
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text("\n".join(lines))
    print("\n".join(_totals(zoo, modes)))
    print(f"wrote {out_path}")


# ------------------------------------------------------------------ --sizes
def _resnet50():
    import torch
    import transformers as hf

    from realworld.zoo import Output

    model = Output(hf.ResNetForImageClassification(hf.ResNetConfig(layer_type="bottleneck")), "logits")
    return model, (torch.randn(1, 3, 224, 224),)


def _bert_base():
    import torch
    import transformers as hf

    from realworld.zoo import Output

    cfg = hf.BertConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                        attn_implementation="sdpa")
    return Output(hf.BertModel(cfg)), (torch.randint(0, cfg.vocab_size, (1, 128)),)


def _timed(fn):
    t = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - t


def sizes() -> None:
    """Erase construction on full-size models: trace, search space, construct, each vs one torch.export."""
    import torch

    from lightning_oto import OTO
    from lightning_oto.graph.trace import trace
    from lightning_oto.space.erase import build_erase_space
    from realworld.zoo import perturb

    print(f"{'model':10s} {'params':>7s} {'export':>7s} {'trace':>14s} {'space':>14s} {'construct':>14s}  zero groups")
    for label, make in (("ResNet-50", _resnet50), ("BERT-base", _bert_base)):
        torch.manual_seed(0)
        model, x = make()
        perturb(model, 0)
        model.eval()
        _, export_s = _timed(lambda: torch.export.export(model, x, strict=False))
        graph, trace_s = _timed(lambda: trace(model, x))
        _, space_s = _timed(lambda: build_erase_space(graph))
        oto = OTO(model, x, mode="erase")
        zero = oto.random_set_zero_groups(0.5, seed=0)
        try:
            sub, construct_s = _timed(lambda: oto.construct_subnet(verify=False))
            err = oto.verify(sub)
            kept = sum(p.numel() for p in sub.parameters()) / sum(p.numel() for p in model.parameters())
            construct = f"{construct_s:6.1f}s {construct_s / export_s:4.1f}x  max diff {err:.1e}, params x{kept:.2f}"
        except Exception as e:  # noqa: BLE001 - the timing run reports the failure and goes on
            construct = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:80]}"
        n = sum(p.numel() for p in model.parameters())
        print(f"{label:10s} {n / 1e6:6.1f}M {export_s:6.1f}s {trace_s:6.1f}s {trace_s / export_s:4.1f}x "
              f"{space_s:6.1f}s {space_s / export_s:4.1f}x {construct}  {len(zero)}/{len(oto.prunable_groups)}",
              flush=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="", help="comma-separated names or globs from tests/realworld/zoo.py")
    ap.add_argument("--modes", default="prune,erase")
    ap.add_argument("--out", default=str(ROOT / "docs" / "realworld.md"))
    ap.add_argument("--sizes", action="store_true", help="time erase construction on ResNet-50 and BERT-base")
    args = ap.parse_args(argv)
    _use_this_checkout()
    _quiet()
    if args.sizes:
        sizes()
        return
    from realworld.zoo import ZOO

    patterns = [p for p in args.models.split(",") if p]
    names = [n for n in ZOO if not patterns or any(fnmatch.fnmatch(n, p) for p in patterns)]
    if not names:
        ap.error(f"no zoo model matches {args.models!r}; known: {', '.join(ZOO)}")
    modes = [m for m in args.modes.split(",") if m]
    if not set(modes) <= {"prune", "erase"}:
        ap.error(f"--modes takes prune and/or erase, got {args.modes!r}")
    table(names, modes, Path(args.out))


if __name__ == "__main__":
    main()
