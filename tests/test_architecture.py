"""The package's import structure: no cycles, and the pipeline only looks down.

Every ``import`` statement counts, at module level or inside a function (a lazy import that closes
a cycle is still a cycle a reader has to untangle).
"""
from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "lightning_oto"
PKG = "lightning_oto"

# graph/ -> space/ -> optim/ -> subnet/ : a lower stage never imports a higher one (errors.py is below all)
STAGES = ["errors", "graph", "space", "optim", "subnet"]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _resolve(current: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = current.split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports (``from x import y`` counts y when y is a module)."""
    files = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        is_package = path.name == "__init__.py"
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(name, is_package, node)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            else:
                continue
            edges |= {t for t in targets if t.startswith(PKG) and t in files and t != name}
        graph[name] = edges
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def _without_package_inits(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """A package ``__init__`` that re-exports its own modules is not a cycle partner of them."""
    return {n: {m for m in e if not n.startswith(m + ".")} for n, e in graph.items()}


def test_import_graph_is_found():
    graph = import_graph()
    assert {"lightning_oto.oto", "lightning_oto.space.erase", "lightning_oto.subnet.erase"} <= set(graph)
    assert "lightning_oto.space.groups" in graph["lightning_oto.subnet.erase"] | graph["lightning_oto.space.erase"]


def test_no_import_cycle():
    cycle = _cycle(_without_package_inits(import_graph()))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def _stage(module: str) -> int | None:
    parts = module.split(".")
    return STAGES.index(parts[1]) if len(parts) > 1 and parts[1] in STAGES else None


@pytest.mark.parametrize("stage", STAGES)
def test_pipeline_stages_only_import_downwards(stage):
    bad = []
    for name, edges in import_graph().items():
        if _stage(name) != STAGES.index(stage):
            continue
        for m in edges:
            if m == PKG or (_stage(m) is None) or _stage(m) > STAGES.index(stage):
                bad.append(f"{name} -> {m}")
    assert not bad, "a pipeline stage imports a later one (or the facade): " + ", ".join(sorted(bad))


def test_the_cycle_detector_finds_cycles():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def _symlinks(root: Path) -> list[Path]:
    """Every symbolic link under ``root``, outside hidden folders (.git, .venv) and caches (never entered)."""
    found: list[Path] = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d != "__pycache__"]
        found += [Path(folder, name) for name in dirs + files if Path(folder, name).is_symlink()]
    return found


def test_every_symlink_in_the_repo_resolves():
    """A link that points nowhere (configs/conf once did) breaks whoever follows it."""
    repo = ROOT.parent
    links = _symlinks(repo)
    assert repo / "configs" / "conf" in links
    broken = [str(p.relative_to(repo)) for p in links if not p.exists()]
    assert not broken, f"broken links: {broken}"
    assert (repo / "configs" / "conf" / "config.yaml").is_file()


def test_optimizers_over_a_search_space_are_built_by_the_oto():
    """OTO.build_optimizer is the one path that adds the OTO's caps and hierarchy check; only the mixin's
    optimizer over no groups (a reloaded sub-network) may call the factory itself."""
    import re

    callers = {str(p.relative_to(ROOT)) for p in ROOT.rglob("*.py")
               if re.search(r"factory import [^\n]*\bbuild_optimizer\b", p.read_text())}
    assert callers == {"oto.py", "lightning/mixin.py"}
    mixin = (ROOT / "lightning" / "mixin.py").read_text()
    direct = re.findall(r"(?<![.\w])build_optimizer\(([^,]*),\s*([^,]*),\s*([^,]*),", mixin)
    assert [groups for _, _, groups in direct] == ["[]"]  # the one direct call passes no groups


def test_benchmark_only_dependencies_stay_out_of_the_package():
    """Torch-Pruning is the quality benchmark's baseline (the ``bench`` extra), never a dependency of the package."""
    offenders = []
    for path in ROOT.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] == "torch_pruning"]
    assert not offenders, offenders
    bench = (ROOT.parent / "pyproject.toml").read_text()
    assert "torch-pruning" in bench.split("[project.optional-dependencies]")[1].split("bench = ")[1].split("\n")[0]
