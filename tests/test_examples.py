"""The examples in examples/ run as documented (in a subprocess, as a user would run them)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_quickstart_runs_and_round_trips():
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py")], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("trainable params: 17,408")
    assert "disabled == base: True" in lines
    merged = float(next(line for line in lines if line.startswith("merged vs unmerged")).split()[-1])
    restored = float(next(line for line in lines if line.startswith("after unmerge")).split()[-1])
    assert merged < 1e-4 and restored < 1e-4


def test_digits_lora_vs_dora_prints_every_method():
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "digits_lora_vs_dora.py"), "--seeds", "2",
                           "--steps", "40"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = {line.split()[0]: line.split() for line in done.stdout.splitlines()[2:]}
    assert set(rows) == {"full", "lora", "dora"}
    for name, cells in rows.items():
        mean = float(cells[1].rstrip("%"))
        assert 20 < mean <= 100, (name, cells)  # above chance (5 classes) after 40 steps
