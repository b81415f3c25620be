"""docs/peft.md runs as written: its Python blocks, in order, in one fresh process (blocks marked
`<!-- not-run: reason -->` are skipped)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("peft")
pytest.importorskip("transformers")

DOC = Path(__file__).resolve().parent.parent / "docs" / "peft.md"


def runnable_blocks(text: str) -> list[str]:
    blocks = []
    for match in re.finditer(r"(<!-- not-run:[^>]*-->\n)?```python\n(.*?)```", text, flags=re.S):
        if match.group(1) is None:
            blocks.append(match.group(2))
    return blocks


def test_the_python_blocks_of_docs_peft_run(tmp_path):
    blocks = runnable_blocks(DOC.read_text())
    assert len(blocks) >= 3
    script = tmp_path / "doc.py"
    script.write_text("\n".join(blocks))
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "PeftModel loss" in done.stdout
    diff = float(done.stdout.split("max weight difference after unmerge:")[1].split()[0])
    assert diff < 1e-5
