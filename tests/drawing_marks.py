"""Read the machine-readable marks of the drawings back (a test helper: the package only writes them)."""
from __future__ import annotations

import html
import re

_CLASS_RE = re.compile(r'\bclass="([^"]*)"')


def redundant_group_ids(source: str) -> set[int]:
    """Group ids drawn as redundant in a DOT or SVG source (the ``zg-<id>`` class tokens)."""
    ids: set[int] = set()
    source = html.unescape(source)  # SVG writes '-' as '&#45;'
    for m in _CLASS_RE.finditer(source):
        toks = m.group(1).split()
        if "redundant" in toks:
            ids.update(int(t[3:]) for t in toks if t.startswith("zg-") and t[3:].isdigit())
    return ids
