"""Checkpoints and exact resume: an interrupted run (SIGTERM, or killed outright) continues to the same
losses and the same adapter as a run that never stopped; nothing is lost on NaN or a full disk."""

from __future__ import annotations

import errno
import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from .train_assets import colour_records, make_model_dir, write_jsonl

pytest.importorskip("transformers")


def command(*args):
    return [sys.executable, "-m", "dorakit", "train", *map(str, args)]


def dorakit_train(*args):
    return subprocess.run(command(*args), capture_output=True, text=True, timeout=300)


def metrics(out):
    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def adapter_tensors(out):
    from safetensors.torch import load_file

    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    make_model_dir(root / "model")
    write_jsonl(root / "train.jsonl", colour_records(200, seed=0))
    # Dropout on, accumulation over micro-batches, evaluation mid-run: everything resume must restore.
    args = ("--model", root / "model", "--data", root / "train.jsonl", "--batch-size", 8, "--micro-batch-size", 2,
            "--lr", 3e-3, "--lora-dropout", 0.1, "--eval-every", 25, "--no-progress")
    full = root / "full"
    done = dorakit_train(*args, "--max-steps", 150, "--save-every", 0, "--output", full)
    assert done.returncode == 0, done.stderr
    return root, args, full


def wait_for(predicate, timeout=120.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.005)
    raise AssertionError("timed out")


def assert_same_run(a, b):
    ma, mb = metrics(a), metrics(b)
    assert [m["step"] for m in mb] == list(range(1, len(ma) + 1))
    for key in ("loss", "lr", "grad_norm", "val_loss", "val_accuracy"):
        assert [m.get(key) for m in ma] == [m.get(key) for m in mb], key
    ta, tb = adapter_tensors(a), adapter_tensors(b)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_sigterm_checkpoints_and_resume_continues_exactly(setup):
    root, args, full = setup
    cut = root / "sigterm"
    proc = subprocess.Popen(command(*args, "--max-steps", 150, "--save-every", 0, "--output", cut),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: len(metrics(cut)) >= 3)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    state = json.loads((cut / "checkpoint" / "state.json").read_text())
    stopped = state["progress"]["step"]
    assert 3 <= stopped < 150 and len(metrics(cut)) == stopped
    assert "--resume" in stdout and not (cut / "adapter").exists()
    assert json.loads((cut / "summary.json").read_text())["status"].startswith("interrupted (SIGTERM)")
    resumed = dorakit_train("--output", cut, "--resume", "--no-progress")  # every other option from the checkpoint
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming after step {stopped}" in resumed.stdout
    assert_same_run(full, cut)


def test_a_killed_run_resumes_from_its_last_periodic_checkpoint(setup):
    root, args, full = setup
    cut = root / "killed"
    proc = subprocess.Popen(command(*args, "--max-steps", 150, "--save-every", 10, "--output", cut),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def checkpoint_then_more_steps():
        state = cut / "checkpoint" / "state.json"
        return state.is_file() and len(metrics(cut)) > json.loads(state.read_text())["progress"]["step"]

    wait_for(checkpoint_then_more_steps)
    proc.kill()  # no chance to clean up: metrics.jsonl holds steps the checkpoint does not
    proc.wait()
    assert not (cut / "adapter").exists()
    resumed = dorakit_train(*args, "--max-steps", 150, "--save-every", 10, "--output", cut, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(full, cut)


def test_resume_refuses_changed_options_and_missing_checkpoints(setup):
    root, args, full = setup
    crashed = root / "crashed"
    assert dorakit_train(*args, "--max-steps", 10, "--save-every", 5, "--output", crashed).returncode == 0
    (crashed / "summary.json").unlink()  # as if it had died after the checkpoint of step 5
    changed = dorakit_train("--output", crashed, "--resume", "--lr", 1.0, "--seed", 3)
    assert changed.returncode == 2 and "--lr: 0.003 in the saved run, 1.0 now" in changed.stderr
    assert "--seed: 0 in the saved run, 3 now" in changed.stderr
    finished = dorakit_train("--output", full, "--resume")
    assert finished.returncode == 2 and "has finished; there is nothing to resume" in finished.stderr
    empty = dorakit_train(*args, "--output", root / "nothing", "--resume")
    assert empty.returncode == 2 and "nothing to resume" in empty.stderr
    again = dorakit_train(*args, "--max-steps", 2, "--output", full)
    assert again.returncode == 2 and "already holds a run" in again.stderr and "--overwrite" in again.stderr
    assert len(metrics(full)) == 150  # the refused run touched nothing


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(setup):
    root, args, _ = setup
    out = root / "nan"
    done = dorakit_train(*args, "--max-steps", 20, "--lr", 1e30, "--warmup-steps", 0, "--save-every", 1,
                         "--output", out)
    assert done.returncode == 1
    bad_step = len(metrics(out)) + 1
    assert f"at step {bad_step}; training stopped before applying it" in done.stderr
    assert "Last good checkpoint" in done.stderr and "Lower --lr" in done.stderr
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert state["progress"]["step"] == bad_step - 1 and not (out / "adapter").exists()


def test_a_full_disk_while_checkpointing_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import safetensors.torch

    import dorakit
    from dorakit.train.checkpoint import Progress, read_state
    from dorakit.train.distributed import Dist
    from dorakit.train.loop import TrainingError, _checkpoint
    from dorakit.train.options import TrainConfig
    from dorakit.train.schedule import make_scheduler

    from .conftest import seeded, tiny_llama

    model = dorakit.inject_adapters(seeded(tiny_llama), dorakit.DoraConfig(r=2, target_modules=["q_proj"]))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    scheduler = make_scheduler(optimizer, warmup=0, total=10, kind="linear")
    cfg = TrainConfig(output=str(tmp_path), data="x")
    alone = Dist()
    _checkpoint(tmp_path, model, model, optimizer, scheduler, Progress(step=1), cfg, None, alone)

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(TrainingError, match="step 2 failed \\(No space left on device\\); the checkpoint of step 1"):
        _checkpoint(tmp_path, model, model, optimizer, scheduler, Progress(step=2), cfg, 1, alone)
    assert read_state(tmp_path / "checkpoint")["progress"]["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]  # no temporary leftovers


def test_full_fine_tuning_resumes_exactly_and_its_checkpoints_analyse(setup, tmp_path):
    root, args, _ = setup
    full_args = (*args, "--method", "full", "--lr", 1e-3, "--max-steps", 10, "--save-every", 5)
    whole = tmp_path / "whole"
    done = dorakit_train(*full_args, "--keep-checkpoints", "--output", whole)
    assert done.returncode == 0, done.stderr
    assert (whole / "model" / "config.json").is_file() and not (whole / "adapter").exists()
    assert sorted(p.name for p in (whole / "checkpoints").iterdir()) == ["step-10", "step-5"]
    crashed = tmp_path / "crashed"
    assert dorakit_train(*full_args, "--output", crashed).returncode == 0
    for name in ("summary.json", "model"):  # as if it had died after the checkpoint of step 5
        path = crashed / name
        subprocess.run(["rm", "-r", str(path)], check=True)
    assert dorakit_train("--output", crashed, "--resume", "--no-progress").returncode == 0
    assert [m["loss"] for m in metrics(crashed)] == [m["loss"] for m in metrics(whole)]
    analysed = subprocess.run([sys.executable, "-m", "dorakit", "analyze", "--base", str(root / "model"),
                               "--checkpoints", str(whole / "checkpoints" / "step-5"), str(whole / "checkpoints" / "step-10"),
                               "--out", str(tmp_path / "analysis")], capture_output=True, text=True, timeout=300)
    assert analysed.returncode == 0, analysed.stderr
    rows = (tmp_path / "analysis" / "analysis.csv").read_text().splitlines()
    assert len(rows) == 1 + 2 * 2 * 2 and all(",full,"in r for r in rows[1:])


def test_class_balanced_sampling_resumes_exactly_and_the_imbalance_is_said(tmp_path, capsys):
    from dorakit.train import TrainConfig, run

    make_model_dir(tmp_path / "model")
    records = colour_records(120, seed=3)
    rare = [r for r in records if r["label"] == "cold"][:4]  # 4 cold against ~40 of each other label
    write_jsonl(tmp_path / "train.jsonl", [r for r in records if r["label"] != "cold"] + rare)
    common = dict(model=str(tmp_path / "model"), data=str(tmp_path / "train.jsonl"), batch_size=6, micro_batch_size=3,
                  lr=3e-3, lora_dropout=0.1, max_steps=10, eval_every=5, save_every=5, val_fraction=0.1, progress=False,
                  balance_labels=True)
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    run(TrainConfig(output=str(whole), **common))
    printed = capsys.readouterr().out
    assert "data " + str(tmp_path / "train.jsonl") + ": text/label data (prompt: text in the template" in printed
    assert "dorakit train: labels of the 83 training examples: plain 42 (50.6%), warm 38 (45.8%), cold 3 (3.6%)" in printed
    assert "dorakit train: --balance-labels: each label is drawn 1/3 of the time" in printed
    run(TrainConfig(output=str(tmp_path / "plain"), **{**common, "balance_labels": False, "max_steps": 2}))
    printed = capsys.readouterr().out
    assert "warning: strong label imbalance: 'plain' has 14.0x the examples of 'cold' (3 of 83)" in printed
    assert [m["loss"] for m in metrics(tmp_path / "plain")] != [m["loss"] for m in metrics(whole)][:2]  # another order
    run(TrainConfig(output=str(cut), **common))
    for name in ("summary.json", "adapter"):  # as if it had died after the checkpoint of step 5
        subprocess.run(["rm", "-r", str(cut / name)], check=True)
    run(TrainConfig(output=str(cut), resume=True, **common))
    assert_same_run(whole, cut)
