"""examples/diffusion_dora.py runs as documented (a subprocess, as a user runs it) and its files load back."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_diffusion_example_trains_and_saves_loadable_files(tmp_path):
    pytest.importorskip("diffusers")
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "diffusion_dora.py"), "--steps", "4", "--out",
                           str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("trainable params:")
    differences = [float(line.rsplit(" ", 1)[1]) for line in lines if "relative difference" in line]
    assert len(differences) == 3 and max(differences) < 1e-5  # kohya reload, diffusers' loader, merged
    assert (tmp_path / "unet_dora.safetensors").is_file()
    assert (tmp_path / "diffusers" / "pytorch_lora_weights.safetensors").is_file()
