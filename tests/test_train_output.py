"""The run directory (train/output.py): --overwrite deletes only what a run wrote, one run at a time per
directory (an OS lock a kill -9 cannot leave stale), and never the model or data in use (issue 19)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from dorakit.train.options import TrainConfig

from .train_assets import colour_records, make_model_dir, write_jsonl


def config(out, **kwargs) -> TrainConfig:
    return TrainConfig(output=str(out), data=kwargs.pop("data", "train.jsonl"), model=kwargs.pop("model", "m"), **kwargs)


def prepare(cfg):
    from dorakit.train.loop import prepare_output  # where the command line finds it

    return prepare_output(cfg)


def user_project(root):
    """The issue's directory: the user's base model and an unrelated checkpoints/ folder, no run."""
    (root / "model").mkdir(parents=True)
    (root / "model" / "config.json").write_text("{}")
    (root / "checkpoints").mkdir()
    (root / "checkpoints" / "mine.txt").write_text("keep me")
    return root


def test_overwrite_refuses_a_directory_that_is_not_a_run(tmp_path):
    project = user_project(tmp_path / "P")
    for overwrite in (True, False):
        with pytest.raises(FileExistsError, match="is not a dorakit run directory.*never deletes"):
            prepare(config(project, model=str(project / "model"), overwrite=overwrite))
    assert (project / "model" / "config.json").is_file() and (project / "checkpoints" / "mine.txt").is_file()
    assert sorted(p.name for p in project.iterdir()) == ["checkpoints", "model"]  # not even a marker left


def test_overwrite_deletes_only_what_a_run_wrote(tmp_path):
    out = tmp_path / "run"
    prepare(config(out))  # a run: marked first
    assert (out / ".dorakit-run").is_file()
    for name in ("adapter", "checkpoint"):
        (out / name).mkdir()
        (out / name / "x").write_text("run")
    (out / "metrics.jsonl").write_text("{}\n")
    (out / ".checkpoint.abcd1234.tmp").mkdir()  # what a killed write leaves
    (out / "notes.txt").write_text("the user's")
    (out / "data").mkdir()
    (out / "data" / "train.jsonl").write_text("{}")
    with pytest.raises(FileExistsError, match="already holds a run .*--resume.*--overwrite"):
        prepare(config(out))
    prepare(config(out, overwrite=True))
    assert sorted(p.name for p in out.iterdir()) == [".dorakit-run", "data", "notes.txt"]


def test_a_run_of_an_older_dorakit_is_recognised_by_its_own_files(tmp_path):
    out = tmp_path / "old-run"
    out.mkdir()
    (out / "adapter").mkdir()
    (out / "summary.json").write_text(json.dumps({"status": "finished", "config": {}, "versions": {}}))
    prepare(config(out, overwrite=True))  # no marker yet, but summary.json is one only a run writes
    assert sorted(p.name for p in out.iterdir()) == [".dorakit-run"]


def test_overwrite_never_deletes_the_model_or_data_in_use(tmp_path):
    out = tmp_path / "run"
    prepare(config(out))
    (out / "model").mkdir()  # a full fine-tuning result, now the base of the next run
    (out / "model" / "config.json").write_text("{}")
    (out / "checkpoints").mkdir()
    write_jsonl(out / "checkpoints" / "data.jsonl", [{"text": "x"}])
    for cfg, flag in ((config(out, model=str(out / "model"), overwrite=True), "--model"),
                      (config(out, data=str(out / "checkpoints" / "data.jsonl"), overwrite=True), "--data")):
        with pytest.raises(ValueError, match=f"--overwrite would delete .* which this run reads as {flag}"):
            prepare(cfg)
    assert (out / "model" / "config.json").is_file() and (out / "checkpoints" / "data.jsonl").is_file()


def test_a_run_file_that_is_a_symbolic_link_is_never_followed_or_deleted(tmp_path):
    out, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    prepare(config(out))
    elsewhere.mkdir()
    (elsewhere / "precious").write_text("keep")
    (out / "checkpoint").symlink_to(elsewhere)
    for cfg in (config(out, overwrite=True), config(out, resume=True)):
        with pytest.raises(FileExistsError, match="checkpoint is a symbolic link"):
            prepare(cfg)
    assert (elsewhere / "precious").read_text() == "keep" and (out / "checkpoint").is_symlink()


def test_output_that_is_a_file_is_refused_in_one_line(tmp_path):
    (tmp_path / "out").write_text("mine")
    with pytest.raises(NotADirectoryError, match=r"^--output .*out is a file; give a directory"):
        prepare(config(tmp_path / "out"))
    assert (tmp_path / "out").read_text() == "mine"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("lock")
    make_model_dir(root / "model")
    write_jsonl(root / "train.jsonl", colour_records(64, seed=0))
    return root


def train_command(root, out, *extra):
    return [sys.executable, "-m", "dorakit", "train", "--model", str(root / "model"), "--data", str(root / "train.jsonl"),
            "--output", str(out), "--batch-size", "4", "--no-progress", "--save-every", "0", *map(str, extra)]


def started(out, timeout=120.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        path = out / "metrics.jsonl"
        if path.is_file() and path.read_text().count("\n") >= 1:
            return
        time.sleep(0.02)
    raise AssertionError("the first run did not start")


def test_a_second_run_on_the_same_output_is_refused_and_a_killed_run_leaves_no_lock(tiny, tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen(train_command(tiny, out, "--max-steps", 100000), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        started(out)
        second = subprocess.run(train_command(tiny, out, "--max-steps", 2, "--overwrite"), capture_output=True,
                                text=True, timeout=300)
        assert second.returncode == 2, second.stderr
        assert f"Another dorakit train is writing to {out} (process {first.pid}" in second.stderr
        assert "Traceback" not in second.stderr and first.poll() is None  # the first run goes on, untouched
        first.send_signal(signal.SIGKILL)  # no clean-up at all: the OS releases the lock with the process
        first.wait(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, len(steps) + 1))  # one writer: no interleaved, duplicated steps
    from dorakit.train.output import run_lock

    with run_lock(out):  # free again at once: no stale lock to remove by hand
        pass


def test_train_records_the_base_model_as_an_absolute_path(tiny, tmp_path, monkeypatch):
    # issue 14's list: a relative --model made the adapter unusable from another directory.
    from dorakit.formats.peft_config import to_peft_dict
    from dorakit.inject import CONFIG_ATTR
    from dorakit.train.model import load_for_training

    monkeypatch.chdir(tmp_path)
    relative = os.path.relpath(tiny / "model", tmp_path)
    loaded = load_for_training(config(tmp_path / "run", model=relative), relative, None)
    recorded = to_peft_dict(getattr(loaded.model, CONFIG_ATTR), loaded.model)["base_model_name_or_path"]
    assert recorded == str((tiny / "model").resolve())


def test_the_base_models_hub_name_is_recorded_beside_its_path(tmp_path):
    import dorakit
    from dorakit.formats.peft import recorded_base

    from .conftest import seeded, tiny_llama

    cached = "/data/hub/models--HuggingFaceTB--SmolLM2-135M-Instruct/snapshots/12fd25f"
    config = dorakit.DoraConfig(r=2, target_modules=["q_proj"], base_model_name_or_path=cached)
    dorakit.save_adapter(dorakit.inject_adapters(seeded(tiny_llama), config), tmp_path / "adapter")
    assert recorded_base(tmp_path / "adapter") == (cached, "HuggingFaceTB/SmolLM2-135M-Instruct")
