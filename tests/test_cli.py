"""The command line, run as a user runs it (a subprocess): `python -m dorakit merge ...`."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch

import dorakit

from .conftest import output_of, perturb_adapters, rel_err, seeded, tiny_llama

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def run(*args):
    return subprocess.run([sys.executable, "-m", "dorakit", *args], capture_output=True, text=True, timeout=300)


def test_help_lists_subcommands_and_options():
    top = run("--help")
    assert top.returncode == 0 and "merge" in top.stdout
    sub = run("merge", "--help")
    assert sub.returncode == 0
    for option in ("--base", "--adapter", "--out", "--dtype", "--overwrite", "default: auto"):
        assert option in sub.stdout


@pytest.mark.parametrize("writer", ["dorakit", "peft"])
def test_merge_command_writes_a_plain_checkpoint(tmp_path, writer):
    base = seeded(tiny_llama).eval()
    base.save_pretrained(tmp_path / "base")
    targets = ["q_proj", "v_proj", "gate_proj"]
    if writer == "dorakit":
        adapted = dorakit.inject_adapters(copy.deepcopy(base), dorakit.DoraConfig(r=4, lora_alpha=8, target_modules=targets))
        perturb_adapters(adapted)
        dorakit.save_adapter(adapted, tmp_path / "adapter")
    else:
        adapted = peft.get_peft_model(
            copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=True)
        )
        perturb_adapters(adapted)
        adapted.save_pretrained(tmp_path / "adapter")
    done = run("merge", "--base", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"),
               "--out", str(tmp_path / "merged"))
    assert done.returncode == 0, done.stderr
    assert "merged 6 adapted layers" in done.stdout
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    ids = torch.randint(0, 96, (2, 10))
    with torch.no_grad():
        assert rel_err(output_of(plain, ids), output_of(adapted.eval(), ids)) < 1e-5


def test_merge_command_reports_errors_without_a_traceback(tmp_path):
    seeded(tiny_llama).save_pretrained(tmp_path / "base")
    done = run("merge", "--base", str(tmp_path / "base"), "--adapter", str(tmp_path / "missing"),
               "--out", str(tmp_path / "merged"))
    assert done.returncode == 2
    assert "dorakit: error: Adapter directory" in done.stderr and "does not exist" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "merged").exists()
