"""The Python blocks of the docs pages run as written (in order, one process per page, in an empty
directory), except those marked with a preceding ``<!-- not-run: reason -->`` line."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"
PAGES = ["trainers.md"]
BLOCK = re.compile(r"(?P<before>[^\n]*)\n```python\n(?P<code>.*?)\n```", re.S)


def runnable_blocks(text: str) -> list[str]:
    return [m["code"] for m in BLOCK.finditer(text) if not m["before"].startswith("<!-- not-run:")]


def test_not_run_blocks_are_marked_and_the_rest_found():
    text = (DOCS / "trainers.md").read_text()
    assert text.count("```python") == len(runnable_blocks(text)) + text.count("<!-- not-run:")


@pytest.mark.slow
@pytest.mark.parametrize("page", PAGES)
def test_page_runs(page, tmp_path):
    pytest.importorskip("trl")
    pytest.importorskip("bitsandbytes")
    script = "\n\n".join(runnable_blocks((DOCS / page).read_text()))
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
