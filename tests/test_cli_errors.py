"""Every subcommand with missing, unreadable, foreign or damaged inputs and refused outputs: one line
`dorakit: error: ...` that names the path, exit 2, no traceback, nothing written (issue 19). Run in-process
through ``dorakit.cli.main`` (the subprocess path is the same function; tests/test_cli.py runs it too)."""

from __future__ import annotations

import errno
import json
import os
import pickle
import re
import shutil
from pathlib import Path

import pytest

import dorakit
from dorakit.cli import main

from .train_assets import colour_records, make_model_dir, write_jsonl

transformers = pytest.importorskip("transformers")


class Touch:
    """Unpickling this creates a file: proof that a pickle was (or was not) loaded."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    make_model_dir(root / "model")
    write_jsonl(root / "data.jsonl", colour_records(24, seed=0))
    model = transformers.AutoModelForCausalLM.from_pretrained(root / "model")
    config = dorakit.DoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], base_model_name_or_path=str(root / "model"))
    dorakit.save_adapter(dorakit.inject_adapters(model, config), root / "adapter")
    (root / "file").write_text("not a directory")
    (root / "foreign").mkdir()
    (root / "foreign" / "notes.txt").write_text("someone else's")
    (root / "garbage").mkdir()
    for name in ("config.json", "adapter_config.json"):
        (root / "garbage" / name).write_text("{not json")
    (root / "garbage" / "adapter_model.safetensors").write_bytes(os.urandom(64))
    (root / "pickled").mkdir()
    shutil.copy(root / "model" / "config.json", root / "pickled")
    (root / "pickled" / "pytorch_model.bin").write_bytes(pickle.dumps(Touch(root / "UNPICKLED")))
    (root / "binary.jsonl").write_bytes(bytes(range(256)))
    (root / "list.yaml").write_text("- lr\n- 1\n")
    return root


def adapter_variant(w, name, config_change=None, tensors_change=None) -> Path:
    """A copy of the good adapter with its config or tensors changed."""
    from safetensors.torch import load_file, save_file

    target = w / name
    if not target.exists():
        shutil.copytree(w / "adapter", target)
        if config_change:
            config = json.loads((target / "adapter_config.json").read_text())
            config_change(config)
            (target / "adapter_config.json").write_text(json.dumps(config))
        if tensors_change:
            tensors = load_file(str(target / "adapter_model.safetensors"))
            tensors_change(tensors)
            save_file(tensors, str(target / "adapter_model.safetensors"))
    return target


def run(*args):
    try:
        main([str(a) for a in args])
    except SystemExit as exit_:
        return exit_.code
    return 0


def assert_one_line_error(capsys, code, *patterns):
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert code == 2 and last.startswith("dorakit: error: "), (code, err)
    for pattern in patterns:
        assert re.search(pattern, last), (pattern, last)


def nan_first(tensors):
    key = next(k for k in tensors if "lora_A" in k)
    tensors[key][0, 0] = float("nan")


def as_int(tensors):
    key = next(k for k in tensors if "lora_A" in k)
    tensors[key] = tensors[key].round().to(dtype=__import__("torch").int32)


# (name, arguments given the work directory, what the one line must say)
CASES = [
    ("train --model missing", lambda w: ["train", "--model", w / "nowhere", "--data", w / "data.jsonl"], r"nowhere does not exist"),
    ("train --model a file", lambda w: ["train", "--model", w / "file", "--data", w / "data.jsonl"], r"file is a file"),
    ("train --model foreign", lambda w: ["train", "--model", w / "foreign", "--data", w / "data.jsonl"], r"foreign has no config.json"),
    ("train --model garbage", lambda w: ["train", "--model", w / "garbage", "--data", w / "data.jsonl"], r"config.json is not valid JSON"),
    ("train --model pickle", lambda w: ["train", "--model", w / "pickled", "--data", w / "data.jsonl"], r"pickle file, which dorakit never loads"),
    ("train --data a directory", lambda w: ["train", "--model", w / "model", "--data", w / "foreign"], r"foreign .*directory"),
    ("train --data binary", lambda w: ["train", "--model", w / "model", "--data", w / "binary.jsonl"], r"binary.jsonl:\d+: not valid UTF-8"),
    ("train --config a list", lambda w: ["train", "--config", w / "list.yaml"], r"list.yaml must hold a mapping"),
    ("train --config binary", lambda w: ["train", "--config", w / "binary.jsonl"], r"binary.jsonl is not UTF-8"),
    ("train --output a file", lambda w: ["train", "--model", w / "model", "--data", w / "data.jsonl", "--output", w / "file"], r"--output .*file is a file"),
    ("train --resume nothing", lambda w: ["train", "--output", w / "nothing", "--resume"], r"nothing to resume"),
    ("eval --adapter missing", lambda w: ["eval", "--adapter", w / "nowhere", "--model", w / "model", "--data", w / "data.jsonl"], r"nowhere does not exist"),
    ("eval --adapter foreign", lambda w: ["eval", "--adapter", w / "foreign", "--model", w / "model", "--data", w / "data.jsonl"], r"foreign has no adapter_config.json"),
    ("eval --adapter garbage", lambda w: ["eval", "--adapter", w / "garbage", "--model", w / "model", "--data", w / "data.jsonl"], r"adapter_config.json is not valid JSON"),
    ("eval --adapter NaN", lambda w: ["eval", "--adapter", adapter_variant(w, "nan", tensors_change=nan_first), "--model", w / "model",
                                      "--data", w / "data.jsonl"], r"NaN or infinite values in 1 tensor"),
    ("eval --adapter int32", lambda w: ["eval", "--adapter", adapter_variant(w, "int", tensors_change=as_int), "--model", w / "model",
                                        "--data", w / "data.jsonl"], r"not floating point: .*lora_A.weight \(int32\)"),
    ("eval --adapter alpha Infinity", lambda w: ["eval", "--adapter", adapter_variant(w, "inf", lambda c: c.update(lora_alpha=float("inf"))),
                                                 "--model", w / "model", "--data", w / "data.jsonl"], r"lora_alpha must be a finite number"),
    ("eval --data missing", lambda w: ["eval", "--adapter", w / "adapter", "--model", w / "model", "--data", w / "nowhere.jsonl"], r"nowhere.jsonl does not exist"),
    ("eval --out a directory", lambda w: ["eval", "--adapter", w / "adapter", "--model", w / "model", "--data", w / "data.jsonl",
                                          "--out", w / "foreign"], r"foreign is a directory"),
    ("generate --adapter a file", lambda w: ["generate", "--adapter", w / "file", "--prompt", "x"], r"file is a file"),
    ("merge --base missing", lambda w: ["merge", "--base", "/nonexistent", "--adapter", w / "adapter", "--out", w / "m1"], r"/nonexistent does not exist"),
    ("merge --base pickle", lambda w: ["merge", "--base", w / "pickled", "--adapter", w / "adapter", "--out", w / "m1"], r"never loads \(unpickling can run code\)"),
    ("merge --out a file", lambda w: ["merge", "--base", w / "model", "--adapter", w / "adapter", "--out", w / "file"], r"file is a file"),
    ("merge --out foreign --overwrite", lambda w: ["merge", "--base", w / "model", "--adapter", w / "adapter", "--out", w / "foreign",
                                                   "--overwrite"], r"foreign is not a merged checkpoint"),
    ("merge r=1e9 (float)", lambda w: ["merge", "--base", w / "model", "--adapter", adapter_variant(w, "rfloat", lambda c: c.update(r=1e9)),
                                       "--out", w / "m1"], r"r must be an integer, got 1000000000.0"),
    ("merge r=10**9", lambda w: ["merge", "--base", w / "model", "--adapter", adapter_variant(w, "rbig", lambda c: c.update(r=10**9)),
                                 "--out", w / "m1"], r"gives rank 1000000000 .* holds lora_A \[2, 32\]"),
    ("merge zero magnitudes", lambda w: ["merge", "--base", w / "model", "--adapter", adapter_variant(
        w, "zero", tensors_change=lambda t: [v.zero_() for k, v in t.items() if "magnitude" in k]), "--out", w / "m1"],
        r"magnitudes .* are all zero"),
    ("analyze --base missing", lambda w: ["analyze", "--base", w / "nowhere", "--checkpoints", w / "adapter", "--out", w / "a1"], r"nowhere does not exist"),
    ("analyze --checkpoints foreign", lambda w: ["analyze", "--base", w / "model", "--checkpoints", w / "foreign", "--out", w / "a1"], r"foreign is neither"),
    ("analyze --out a file", lambda w: ["analyze", "--base", w / "model", "--checkpoints", w / "adapter", "--out", w / "file"], r"--out .*file is a file"),
    ("compare --model missing", lambda w: ["compare", "--output", w / "c1", "--model", w / "nowhere", "--data", w / "data.jsonl"], r"nowhere does not exist"),
    ("eval --batch-size 0", lambda w: ["eval", "--adapter", w / "adapter", "--model", w / "model", "--data", w / "data.jsonl",
                                       "--batch-size", 0], r"--batch-size must be at least 1, got 0"),
    ("eval --max-examples -1", lambda w: ["eval", "--adapter", w / "adapter", "--model", w / "model", "--data", w / "data.jsonl",
                                          "--max-examples", -1], r"--max-examples must be at least 1, got -1"),  # was: all but one
    ("generate --temperature -1", lambda w: ["generate", "--model", w / "model", "--prompt", "x", "--temperature", -1],
     r"--temperature must be at least 0"),  # was: greedy, silently
    ("train --r 10**8", lambda w: ["train", "--model", w / "model", "--data", w / "data.jsonl", "--r", 10**8, "--output", w / "t1"],
     r"--r 100000000 would make adapters of up to .* values, more than 4x"),  # was: the kernel's OOM killer
    ("compare --seeds (none)", lambda w: ["compare", "--output", w / "c1", "--model", w / "model", "--data", w / "data.jsonl",
                                          "--seeds"], r"--seeds needs at least one value"),
    ("compare --ranks 0", lambda w: ["compare", "--output", w / "c1", "--model", w / "model", "--data", w / "data.jsonl",
                                     "--ranks", 0], r"Ranks must be at least 1, got 0"),
    ("compare --output a file", lambda w: ["compare", "--output", w / "file", "--model", w / "model", "--data", w / "data.jsonl"], r"file is a file"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_inputs_give_one_line_and_exit_2(w, capsys, case):
    _, arguments, pattern = case
    arguments = arguments(w)  # may write a damaged adapter copy first
    before = sorted(p.name for p in w.iterdir())
    code = run(*arguments)
    assert_one_line_error(capsys, code, pattern)
    assert not (w / "UNPICKLED").exists()  # a pickle is never loaded
    assert sorted(p.name for p in w.iterdir()) == before  # nothing written


@pytest.mark.parametrize("command", ["eval", "generate", "merge"])
def test_a_missing_recorded_base_is_named_and_never_replaced_by_another_model(w, capsys, monkeypatch, command):
    import dorakit.assets

    def substituted():
        raise AssertionError("the embedded SmolLM2 was substituted for the adapter's base model")

    monkeypatch.setattr(dorakit.assets, "smollm2_path", substituted)
    gone = "/gone/models--HuggingFaceTB--SmolLM2-135M-Instruct/snapshots/0123"
    adapter = adapter_variant(w, "moved", lambda c: c.update(base_model_name_or_path=gone))
    args = {"eval": ["--data", w / "data.jsonl"], "generate": ["--prompt", "hi"], "merge": ["--out", w / "m2"]}[command]
    flag = "--base" if command == "merge" else "--model"
    assert_one_line_error(capsys, run(command, "--adapter", adapter, *args),
                          f"trained on {gone} \\(HuggingFaceTB/SmolLM2-135M-Instruct on the model hub\\)",
                          f"Pass that model with {flag} DIR")


def test_an_unreadable_or_read_only_location_is_one_line(w, capsys, monkeypatch):
    real_mkdir = os.mkdir

    def read_only(path, *args, **kwargs):
        if str(path).startswith(str(w / "ro")):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", read_only)
    code = run("train", "--model", w / "model", "--data", w / "data.jsonl", "--output", w / "ro" / "run")
    assert_one_line_error(capsys, code, r"Read-only file system: .*ro.*choose a writable location")
    code = run("merge", "--base", w / "model", "--adapter", w / "adapter", "--out", w / "ro" / "merged")
    assert_one_line_error(capsys, code, r"Read-only file system: .*ro.*choose a writable location")


def test_a_full_disk_is_one_line_whatever_raises_it(w, capsys, monkeypatch):
    import safetensors.torch
    from safetensors import SafetensorError

    def full(*args, **kwargs):  # safetensors' own error type, as it raises it for ENOSPC
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    code = run("merge", "--base", w / "model", "--adapter", w / "adapter", "--out", w / "full")
    assert_one_line_error(capsys, code, r"No space left on device: .*full.*Free disk space")
    assert not (w / "full").exists() and not list(w.glob(".full.*"))


def test_resume_with_truncated_files_names_them(w, capsys, tmp_path):
    out = tmp_path / "run"
    assert run("train", "--model", w / "model", "--data", w / "data.jsonl", "--output", out, "--max-steps", 2,
               "--save-every", 1, "--batch-size", 4, "--no-progress") == 0
    capsys.readouterr()
    (out / "summary.json").unlink()  # as if killed after the checkpoint of step 1
    data = (out / "checkpoint" / "optimizer.safetensors").read_bytes()
    (out / "checkpoint" / "optimizer.safetensors").write_bytes(data[: len(data) // 2])
    assert_one_line_error(capsys, run("train", "--output", out, "--resume", "--no-progress"),
                          r"optimizer.safetensors is not a readable safetensors file", r"start the run again with --overwrite")
    text = (out / "checkpoint" / "state.json").read_text()
    (out / "checkpoint" / "state.json").write_text(text[: len(text) // 2])
    assert_one_line_error(capsys, run("train", "--output", out, "--resume"),
                          r"state.json is not valid JSON .*truncated", r"start the run again with --overwrite")


def test_explain_maps_errors_to_exit_codes():
    from dorakit.usage import explain
    from dorakit.train.loop import TrainingError

    assert explain(PermissionError(errno.EACCES, "Permission denied", "/x"))[0] == 2
    assert explain(PermissionError(errno.EACCES, "Permission denied", "/x"))[1].startswith("Permission denied: /x.")
    assert explain(TrainingError("stopped")) == (1, "stopped")
    assert explain(MemoryError())[0] == 1 and "out of memory" in explain(MemoryError())[1]
    assert explain(KeyboardInterrupt())[0] == 130
    assert explain(KeyError("a bug")) is None and explain(AttributeError("a bug")) is None  # bugs keep their traceback


def test_compare_exits_1_when_a_run_failed(w, capsys, monkeypatch):
    import dorakit.analysis.compare as compare

    monkeypatch.setattr(compare, "run_all", lambda runs, *args: [
        {"run": runs[0].name, "method": "lora", "rank": 8, "seed": 0, "error": "dorakit: error: out of memory"}])
    code = run("compare", "--output", w / "c2", "--model", w / "model", "--data", w / "data.jsonl", "--methods", "lora",
               "--seeds", 0)
    err = capsys.readouterr().err
    assert code == 1 and "1 of 1 runs failed (first: lora-r8-s0: dorakit: error: out of memory)" in err
    shutil.rmtree(w / "c2")
