"""A small DOT (Graphviz) source builder and renderer, with no dependency beyond the ``dot`` program.

Nodes carry a dotted *module path*; :meth:`Dot.source` groups them into nested ``subgraph cluster_*``
blocks along that path (up to ``cluster_depth`` levels), skipping clusters that would hold a single
node and collapsing chains of clusters with one child, so big graphs stay readable without a
cluster per leaf module.  :func:`render` runs ``dot`` once for all requested formats (one layout).
"""
from __future__ import annotations

import logging
import shutil
import subprocess
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

log = logging.getLogger("lightning_oto")

INSTALL_HINT = ("install Graphviz to get SVG/PDF drawings: `apt-get install graphviz` (Debian/Ubuntu), "
                "`brew install graphviz` (macOS) or `conda install graphviz`; then e.g. "
                "`dot -Tsvg {dot} -o {svg}` renders a written source by hand")

# Qualitative pastel palette (from ColorBrewer Set3 / Pastel1 / Set2), readable with black text.  Reds and
# oranges are left out on purpose: orange marks joint operators and red marks redundant (zero) structures.
PALETTE = (
    "#8dd3c7", "#ffffb3", "#bebada", "#80b1d3", "#b3de69", "#fccde5", "#bc80bd", "#ccebc5",
    "#ffed6f", "#a6cee3", "#b2df8a", "#cab2d6", "#b3cde3", "#decbe4", "#e5d8bd", "#66c2a5",
    "#e78ac3", "#a6d854", "#ffd92f", "#e5c494", "#8da0cb",
)


def esc(text: object) -> str:
    """Body of a DOT double-quoted string (newlines become ``\\n`` line breaks)."""
    s = str(text).replace("\\", "\\\\").replace('"', '\\"')
    return s.replace("\r", "").replace("\n", "\\n")


def html_esc(text: object) -> str:
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


def _attrs(attrs: dict[str, object]) -> str:
    parts = []
    for k, v in attrs.items():
        if v is None:
            continue
        if isinstance(v, HTML):
            parts.append(f"{k}=<{v.text}>")
        else:
            parts.append(f'{k}="{esc(v)}"')
    return "[" + " ".join(parts) + "]" if parts else ""


class HTML:
    """Marks an attribute value as a Graphviz HTML-like label (written as ``<...>``)."""

    def __init__(self, text: str) -> None:
        self.text = text


@dataclass
class _Node:
    key: str
    module: str
    attrs: dict[str, object]


@dataclass
class _Cluster:
    path: str
    nodes: list[_Node] = field(default_factory=list)
    children: dict[str, "_Cluster"] = field(default_factory=dict)

    def count(self) -> int:
        return len(self.nodes) + sum(c.count() for c in self.children.values())


class Dot:
    """Directed graph source. ``node(key, module=..., **attrs)``, ``edge(a, b, **attrs)``, ``source()``."""

    def __init__(self, name: str = "G", graph: dict[str, object] | None = None,
                 node: dict[str, object] | None = None, edge: dict[str, object] | None = None,
                 cluster_depth: int = 3) -> None:
        self.name = name
        self.graph_attrs = {"rankdir": "TB", "nodesep": "0.18", "ranksep": "0.28", "fontname": "Helvetica",
                            "fontsize": "11", "newrank": "true", "outputorder": "edgesfirst"}
        self.graph_attrs.update(graph or {})
        self.node_attrs = {"shape": "box", "style": "rounded,filled", "fillcolor": "white", "fontname": "Helvetica",
                           "fontsize": "9", "height": "0.25", "margin": "0.06,0.03", "penwidth": "0.8"}
        self.node_attrs.update(node or {})
        self.edge_attrs = {"arrowsize": "0.5", "penwidth": "0.7", "color": "#555555"}
        self.edge_attrs.update(edge or {})
        self.cluster_depth = cluster_depth
        self._nodes: list[_Node] = []
        self._keys: set[str] = set()
        self._edges: list[tuple[str, str, dict[str, object]]] = []

    def __len__(self) -> int:
        return len(self._nodes)

    def node(self, key: str, module: str = "", **attrs: object) -> None:
        if key in self._keys:
            raise ValueError(f"duplicate node {key!r}")
        self._keys.add(key)
        self._nodes.append(_Node(key, module or "", attrs))

    def edge(self, a: str, b: str, **attrs: object) -> None:
        self._edges.append((a, b, attrs))

    # ------------------------------------------------------------------ clusters
    def _tree(self) -> _Cluster:
        root = _Cluster("")
        for n in self._nodes:
            parts = [p for p in n.module.split(".") if p] if n.module else []
            c = root
            for i in range(min(len(parts), self.cluster_depth)):
                path = ".".join(parts[: i + 1])
                c = c.children.setdefault(path, _Cluster(path))
            c.nodes.append(n)
        return root

    def _emit_cluster(self, c: _Cluster, out: list[str], indent: str, counter: list[int], label_from: str) -> None:
        for n in c.nodes:
            out.append(f'{indent}"{esc(n.key)}" {_attrs(n.attrs)}')
        for child in c.children.values():
            self._emit_child(child, out, indent, counter, label_from)

    def _emit_child(self, c: _Cluster, out: list[str], indent: str, counter: list[int], label_from: str) -> None:
        # a cluster with one drawable thing is noise; a cluster whose only content is one sub-cluster is merged
        if c.count() < 2:
            self._emit_cluster(c, out, indent, counter, label_from)
            return
        while not c.nodes and len(c.children) == 1:
            c = next(iter(c.children.values()))
            if c.count() < 2:
                break
        counter[0] += 1
        label = c.path[len(label_from) + 1:] if label_from and c.path.startswith(label_from + ".") else c.path
        out.append(f'{indent}subgraph "cluster_{counter[0]}_{esc(c.path)}" {{')
        inner = indent + "  "
        out.append(f'{inner}label="{esc(label)}"; tooltip="{esc(c.path)}"; style="rounded,dashed"; '
                   f'color="#9e9e9e"; fontcolor="#616161"; fontsize="9"; labeljust="l"; margin="6";')
        self._emit_cluster(c, out, inner, counter, c.path)
        out.append(f"{indent}}}")

    def source(self) -> str:
        out = [f'digraph "{esc(self.name)}" {{']
        out.append(f"  graph {_attrs(self.graph_attrs)}")
        out.append(f"  node {_attrs(self.node_attrs)}")
        out.append(f"  edge {_attrs(self.edge_attrs)}")
        self._emit_cluster(self._tree(), out, "  ", [0], "")
        for a, b, attrs in self._edges:
            out.append(f'  "{esc(a)}" -> "{esc(b)}" {_attrs(attrs)}'.rstrip())
        out.append("}")
        return "\n".join(out) + "\n"


def legend_table(title: str, entries: Sequence[tuple[str, str, str]], subtitle: str = "") -> HTML:
    """HTML-like graph label: a title line and colour swatches ``(label, fillcolor, style)``."""
    cells = []
    for text, color, style in entries:
        border = ' STYLE="dashed"' if "dashed" in style else ""
        cells.append(f'<TD BGCOLOR="{html_esc(color)}" BORDER="1"{border} CELLPADDING="3">'
                     f'<FONT POINT-SIZE="9">{html_esc(text)}</FONT></TD>')
    rows = [f'<TR><TD COLSPAN="{max(1, len(cells))}" BORDER="0"><B>{html_esc(title)}</B></TD></TR>']
    if subtitle:
        rows.append(f'<TR><TD COLSPAN="{max(1, len(cells))}" BORDER="0">'
                    f'<FONT POINT-SIZE="9">{html_esc(subtitle)}</FONT></TD></TR>')
    if cells:
        rows.append("<TR>" + "".join(cells) + "</TR>")
    return HTML('<TABLE BORDER="0" CELLSPACING="2">' + "".join(rows) + "</TABLE>")


def dot_program() -> str | None:
    return shutil.which("dot")


def render(dot_path: str | Path, formats: Iterable[str] = ("svg", "pdf"), timeout: float = 120.0,
           warn: bool = True) -> dict[str, str]:
    """Render ``dot_path`` to each format beside it (one ``dot`` run); returns ``{format: path}``.

    Without the ``dot`` program, or when it fails, nothing but the source exists: a warning says how
    to install Graphviz (or why rendering failed) and the result is empty.
    """
    dot_path = Path(dot_path)
    formats = [f for f in dict.fromkeys(formats) if f != "dot"]
    if not formats:
        return {}
    exe = dot_program()
    if exe is None:
        if warn:
            msg = ("lightning_oto.viz: Graphviz `dot` was not found, so only the .dot source was written "
                   f"({dot_path}); " + INSTALL_HINT.format(dot=dot_path, svg=dot_path.with_suffix(".svg")) + ".")
            log.warning(msg)
            warnings.warn(msg, RuntimeWarning, stacklevel=3)
        return {}
    cmd = [exe]
    outs: dict[str, str] = {}
    for fmt in formats:
        out = dot_path.with_suffix("." + fmt)
        cmd += [f"-T{fmt}", "-o", str(out)]
        outs[fmt] = str(out)
    cmd.append(str(dot_path))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        msg = f"lightning_oto.viz: `dot` took longer than {timeout:.0f}s on {dot_path}; kept the .dot source only."
        log.warning(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)
        return {}
    if proc.returncode != 0:
        msg = f"lightning_oto.viz: `dot` failed on {dot_path} (exit {proc.returncode}): {proc.stderr.strip()[:500]}"
        log.warning(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)
        return {}
    return {fmt: p for fmt, p in outs.items() if Path(p).exists()}
