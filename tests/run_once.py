"""Expensive setup shared by every pytest-xdist worker: run it once per session, not once per worker.

``--dist worksteal`` may hand the tests of one module to both workers; a module-scoped fixture that
spawns processes (FSDP2 ranks, the README's training command) would then run twice.  ``run_once``
runs ``make(folder)`` under a file lock in the session's shared temporary folder; the other worker
waits for it and reads the pickled result.  (``filelock`` comes with torch.)
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any, Callable

import pytest
from filelock import FileLock


def run_once(tmp_path_factory: pytest.TempPathFactory, name: str, make: Callable[[Path], Any]) -> Any:
    """``make(folder)``'s return value (picklable), computed by the first worker that asks for it."""
    base = tmp_path_factory.getbasetemp()
    # under xdist each worker's basetemp is <session>/popen-gwN: the parent is this session's, shared;
    # without xdist the parent is shared with earlier sessions, so stay in basetemp
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    folder, result = root / f"once_{name}", root / f"once_{name}.pkl"
    with FileLock(str(root / f"once_{name}.lock")):
        if not result.exists():
            folder.mkdir(exist_ok=True)
            result.write_bytes(pickle.dumps(make(folder)))
    return pickle.loads(result.read_bytes())
