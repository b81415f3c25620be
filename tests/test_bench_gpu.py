"""benchmarks/gpu.py (`make bench-gpu`) must arrive working on a GPU machine: its whole logic runs here in
a dry run (tiny LLaMA on the CPU, every arm, two batch shapes, Triton's interpreter for the kernel arm),
its time budget skips loudly, and without CUDA the real run stops at once with the fix."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def run_bench(*args, timeout=600):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "benchmarks.gpu", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_real_run_refuses_a_machine_without_cuda(tmp_path):
    done = run_bench("--out", tmp_path)
    assert done.returncode == 2 and "needs a CUDA GPU" in done.stderr and "--dry-run" in done.stderr
    assert not (tmp_path / "gpu.json").exists()


def test_dry_run_measures_every_arm_and_renders(tmp_path):
    from benchmarks.gpu_arms import ARMS
    from benchmarks.report import render_gpu

    done = run_bench("--dry-run", "--out", tmp_path, "--ranks", "4", "--rounds", "1")
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads((tmp_path / "gpu.json").read_text())
    assert data["dry_run"] and not data["skipped_cells"]
    assert [(c["batch"], c["seq_len"]) for c in data["cells"]] == [(1, 16), (2, 8)]
    for cell in data["cells"]:
        assert not cell["skipped"], cell["skipped"]
        assert set(cell["train"]) == set(ARMS) and set(cell["inference"]) == set(ARMS) - {"dorakit_dora_compiled"}
        assert max(cell["loss_rel_diff_vs_peft_dora"].values()) < 1e-2
    assert render_gpu(data) == []  # a dry run's numbers never reach the README
    tables = "\n".join(render_gpu({**data, "dry_run": False}))
    assert "dorakit DoRA + Triton" in tables and "| tiny | 4 | 2x8 |" in tables


def test_time_budget_skips_and_says_so(tmp_path):
    done = run_bench("--dry-run", "--out", tmp_path, "--budget-s", "0")
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads((tmp_path / "gpu.json").read_text())
    assert not data["cells"] and data["skipped_cells"] == [{"model": "tiny", "reason": "time budget (model not built)"}]
