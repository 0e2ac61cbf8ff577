"""docs/callback.md documents every OTOCallback argument, no more, no fewer, with the real defaults."""
from __future__ import annotations

import inspect
import re
from pathlib import Path

from lightning_oto import OTOCallback

DOC = Path(__file__).resolve().parents[1] / "docs" / "callback.md"
ROW = re.compile(r"^\| `(?P<name>[a-z_]+)` \| `(?P<default>[^`]*)` \|")


def _table() -> dict[str, str]:
    """argument -> default cell of the table under "## Arguments"."""
    text = DOC.read_text().split("## Arguments", 1)[1].split("\n## ", 1)[0]
    rows = [ROW.match(line) for line in text.splitlines() if line.startswith("| `")]
    assert all(rows), "every row starts with | `name` | `default` |"
    names = [m["name"] for m in rows]
    assert len(names) == len(set(names)), "an argument appears twice"
    return {m["name"]: m["default"] for m in rows}


def test_the_table_names_exactly_the_callback_arguments():
    params = {n: p for n, p in inspect.signature(OTOCallback.__init__).parameters.items() if n != "self"}
    table = _table()
    assert sorted(table) == sorted(params), (
        f"missing from docs/callback.md: {sorted(set(params) - set(table))}; "
        f"not an argument: {sorted(set(table) - set(params))}")
    wrong = {n: (table[n], repr(p.default)) for n, p in params.items() if table[n] != repr(p.default)}
    assert not wrong, f"default in the docs vs the code: {wrong}"


def test_every_keyword_in_the_signature_is_accepted():
    """The signature is what the callback takes: each listed keyword builds a callback at its default."""
    params = inspect.signature(OTOCallback).parameters
    for name, p in params.items():
        if name != "settings":
            assert OTOCallback(**{name: p.default}).settings.explicit == frozenset({name})


def test_readme_links_the_table():
    readme = (DOC.parents[1] / "README.md").read_text()
    line = next(line for line in readme.splitlines() if "OTOCallback(" in line and "one line" in line)
    following = readme.split(line, 1)[1].splitlines()[1]
    assert "[docs/callback.md](docs/callback.md)" in following
