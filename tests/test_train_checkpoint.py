"""Checkpoints that survive kills and say what is wrong when damaged (train/checkpoint.py, issue 19):
a kill -9 between the renames of a checkpoint replacement resumes from the newest complete copy, the
temporary copies of killed writes are removed, and a truncated state.json or optimizer.safetensors is
named with what to do."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dorakit
from dorakit.train.checkpoint import Progress, read_state, restore_checkpoint, save_checkpoint
from dorakit.train.options import TrainConfig
from dorakit.train.schedule import make_scheduler

from .conftest import seeded, tiny_llama

ROOT = Path(__file__).resolve().parents[1]


def crash(out, *modes):
    done = subprocess.run([sys.executable, "-m", "tests.checkpoint_crash", str(out), *modes], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


def resume_config(out) -> TrainConfig:
    return TrainConfig(output=str(out), data="train.jsonl", model="model", resume=True)


def lora_b_value(directory) -> float:
    tensors = dorakit.formats.peft.read_adapter_tensors(directory / "adapter")
    return float(next(v for k, v in tensors.items() if "lora_B" in k).flatten()[0])


def test_a_kill_between_the_renames_resumes_from_the_newest_complete_copy_and_leaves_nothing_behind(tmp_path):
    from dorakit.train.loop import prepare_output

    out = tmp_path / "run"
    # A kill -9 loop: two writes killed half-way (temporary copies left), then one between the renames
    # (no checkpoint/ at all: the previous copy moved aside, the new one complete under a temporary name).
    crash(out, "while-writing", "while-writing", "between-renames")
    assert not (out / "checkpoint").exists()
    state = prepare_output(resume_config(out))
    assert state["progress"]["step"] == 4
    assert sorted(p.name for p in out.iterdir() if p.name != ".dorakit-run") == ["checkpoint"]
    assert lora_b_value(out / "checkpoint") == 4.0


@pytest.fixture
def saved(tmp_path):
    model = dorakit.inject_adapters(seeded(tiny_llama), dorakit.DoraConfig(r=2, target_modules=["q_proj"]))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    model(torch.tensor([[1, 2, 3]])).logits.sum().backward()
    optimizer.step()  # AdamW state to save
    scheduler = make_scheduler(optimizer, warmup=0, total=10, kind="linear")
    directory = tmp_path / "checkpoint"
    save_checkpoint(directory, model, optimizer, scheduler, Progress(step=3), TrainConfig(data="x").to_dict())
    return directory, model, optimizer, scheduler


def truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.parametrize("name", ["state.json", "optimizer.safetensors", "adapter/adapter_model.safetensors"])
def test_a_truncated_checkpoint_file_is_named_with_what_to_do(saved, name):
    directory, model, optimizer, scheduler = saved
    truncate(directory / name)
    with pytest.raises(ValueError) as raised:
        restore_checkpoint(directory, model, optimizer, scheduler)
    message = str(raised.value)
    assert str(directory / name) in message and "start the run again with --overwrite" in message


def test_a_state_json_of_another_shape_is_refused_by_name(saved):
    directory = saved[0]
    (directory / "state.json").write_text('{"format": 1, "progress": [], "config": {}}')
    with pytest.raises(ValueError, match=r"state.json lacks progress, scheduler, python_rng .*--overwrite"):
        read_state(directory)


def test_a_non_finite_optimizer_state_is_refused(saved):
    from safetensors.torch import load_file, save_file

    directory, model, optimizer, scheduler = saved
    tensors = load_file(str(directory / "optimizer.safetensors"))
    key = next(k for k in tensors if k.endswith("exp_avg"))
    tensors[key][0] = float("nan")
    save_file(tensors, str(directory / "optimizer.safetensors"))
    with pytest.raises(ValueError, match=f"NaN or infinite values in 1 tensor.*{key}"):
        restore_checkpoint(directory, model, optimizer, scheduler)


def test_a_full_disk_reported_by_safetensors_itself_stops_the_run_and_keeps_the_checkpoint(saved, monkeypatch):
    # safetensors raises its own SafetensorError for ENOSPC, not OSError: it escaped the clean handler.
    import safetensors.torch
    from safetensors import SafetensorError

    from dorakit.train.distributed import Dist
    from dorakit.train.loop import TrainingError, _checkpoint

    directory, model, optimizer, scheduler = saved
    cfg = TrainConfig(output=str(directory.parent), data="x")

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(TrainingError, match=r"step 4 failed \(No space left on device\); the checkpoint of step 3"):
        _checkpoint(directory.parent, model, model, optimizer, scheduler, Progress(step=4), cfg, 3, Dist())
    assert read_state(directory)["progress"]["step"] == 3
    assert sorted(p.name for p in directory.parent.iterdir()) == ["checkpoint"]


def test_a_metrics_line_cut_short_by_a_kill_does_not_block_resume(tmp_path):
    from dorakit.train.report import read_metrics, truncate_metrics

    lines = [json.dumps({"step": s, "loss": 1.0}) for s in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 4, "lo')  # killed mid-write
    truncate_metrics(tmp_path, 2)  # what --resume from the checkpoint of step 2 does
    assert [m["step"] for m in read_metrics(tmp_path)] == [1, 2]
    (tmp_path / "metrics.jsonl").write_text(lines[0] + "\nnot json\n" + lines[1] + "\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl:2 is not a metrics record"):
        read_metrics(tmp_path)


def test_progress_of_the_wrong_type_is_refused_by_name(saved):
    directory, model, optimizer, scheduler = saved
    state = json.loads((directory / "state.json").read_text())
    state["progress"]["step"] = "3"
    (directory / "state.json").write_text(json.dumps(state))
    with pytest.raises(ValueError, match=r"state.json: step must be an integer, got '3'"):
        restore_checkpoint(directory, model, optimizer, scheduler)
