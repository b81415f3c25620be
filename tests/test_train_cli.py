"""`dorakit train | eval | generate` run as a user runs them (a subprocess), on tiny models built here."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys

import pytest
import torch

from dorakit.train import TrainConfig

from .conftest import rel_err
from .train_assets import colour_records, make_model_dir, write_jsonl

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def dorakit(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "dorakit", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    make_model_dir(root / "model")
    write_jsonl(root / "train.jsonl", colour_records(240, seed=0))
    write_jsonl(root / "test.jsonl", colour_records(60, seed=1))
    return root


FAST = ("--batch-size", 8, "--lr", 1e-2, "--no-progress")


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_help_shows_every_option_with_its_default():
    top = dorakit("--help")
    assert top.returncode == 0
    for command in ("train", "eval", "generate", "merge"):
        assert command in top.stdout
    sub = dorakit("train", "--help")
    assert sub.returncode == 0
    for option in ("--model", "--data", "--output", "--max-steps", "--batch-size", "--seed", "--resume", "--config",
                   "--name", "--lr", "--schedule", "--gradient-checkpointing", "--target-modules", "--eval-every"):
        assert option in sub.stdout, option
    assert sub.stdout.count("(default:") == len(dataclasses.fields(TrainConfig))  # every option, with its default


@pytest.fixture(scope="module")
def trained(workdir):
    out = workdir / "run"
    done = dorakit("train", "--model", workdir / "model", "--data", workdir / "train.jsonl", "--output", out,
                   "--max-steps", 60, "--eval-every", 30, *FAST)
    assert done.returncode == 0, done.stderr
    return out


def test_train_writes_adapter_metrics_summary_and_plot(trained):
    rows = metrics(trained)
    assert [r["step"] for r in rows] == list(range(1, 61))
    assert all({"loss", "lr", "grad_norm", "tokens_per_s"} <= set(r) for r in rows)
    assert rows[-1]["val_accuracy"] >= 0.75  # learned the colour -> label task (chance: 1/3)
    assert rows[-1]["loss"] < rows[0]["loss"] / 4
    summary = json.loads((trained / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["steps"] == 60
    assert summary["config"]["lr"] == 1e-2 and "torch" in summary["versions"]
    assert (trained / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (trained / "checkpoint").exists() or (trained / "checkpoint" / "state.json").is_file()


def test_adapter_loads_in_peft_with_the_same_outputs(trained, workdir):
    import dorakit as dk

    base = transformers.AutoModelForCausalLM.from_pretrained(workdir / "model").eval()
    ours = dk.load_adapter(transformers.AutoModelForCausalLM.from_pretrained(workdir / "model"), trained / "adapter").eval()
    theirs = peft.PeftModel.from_pretrained(base, trained / "adapter").eval()
    ids = torch.randint(4, 60, (2, 9))
    with torch.no_grad():
        a, b = ours(ids).logits, theirs(ids).logits
    assert rel_err(a, b) < 1e-6


def test_eval_and_generate_commands(trained, workdir):
    done = dorakit("eval", "--model", workdir / "model", "--adapter", trained / "adapter", "--data",
                   workdir / "test.jsonl", "--accuracy", "both", "--out", workdir / "eval.json")
    assert done.returncode == 0, done.stderr
    result = json.loads((workdir / "eval.json").read_text())
    assert result["examples"] == 60 and 0 <= result["generate_accuracy"] <= 1 and "perplexity" in result
    base = json.loads(dorakit("eval", "--model", workdir / "model", "--data", workdir / "test.jsonl").stdout)
    assert result["rank_accuracy"] >= base["rank_accuracy"] + 0.25 and base["loss"] > 2 * result["loss"]
    gen = dorakit("generate", "--model", workdir / "model", "--adapter", trained / "adapter", "--chat", "off",
                  "--prompt", "Text: the red sky\nLabel:", "--max-new-tokens", 2)
    assert gen.returncode == 0, gen.stderr
    assert gen.stdout.strip().split()[0] == "warm"


def test_named_configurations_from_a_file_with_overrides(workdir, tmp_path):
    (tmp_path / "runs.yaml").write_text(
        f"tiny_dora_r4:\n  model: {workdir / 'model'}\n  data: {workdir / 'train.jsonl'}\n  r: 4\n  max_steps: 3\n"
        f"tiny_lora_r8:\n  model: {workdir / 'model'}\n  data: {workdir / 'train.jsonl'}\n  method: lora\n",
        encoding="utf-8")
    out = tmp_path / "run"
    done = dorakit("train", "--config", tmp_path / "runs.yaml", "--name", "tiny_dora_r4", "--output", out,
                   "--max-steps", 2, *FAST)
    assert done.returncode == 0, done.stderr
    assert len(metrics(out)) == 2  # the command line wins over the file
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["r"] == 4
    wrong = dorakit("train", "--config", tmp_path / "runs.yaml", "--name", "tiny_dora_r5", "--output", tmp_path / "x")
    assert wrong.returncode == 2 and "Did you mean 'tiny_dora_r4'?" in wrong.stderr
    none = dorakit("train", "--config", tmp_path / "runs.yaml", "--output", tmp_path / "x")
    assert none.returncode == 2 and "choose one with --name" in none.stderr
    (tmp_path / "bad.json").write_text(json.dumps({"learning_rate": 1e-3, "model": "m"}), encoding="utf-8")
    bad = dorakit("train", "--config", tmp_path / "bad.json")
    assert bad.returncode == 2 and "Unknown option 'learning_rate'" in bad.stderr and "Did you mean 'lr'?" in bad.stderr


def test_classification_head_trains_and_evaluates(workdir, tmp_path):
    model = make_model_dir(tmp_path / "clf", kind="classifier")
    out = tmp_path / "run"
    done = dorakit("train", "--model", model, "--data", workdir / "train.jsonl", "--output", out,
                   "--max-steps", 80, "--val-fraction", 0.2, *FAST, "--lr", 3e-2)
    assert done.returncode == 0, done.stderr
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["score"]
    # The run is a function of its seed (the new head included: it was unseeded, which made this test
    # flaky); seeds 0-6 gave validation 0.79-0.98 and test 0.72-0.97 here, an untrained head ~1/3.
    assert metrics(out)[-1]["val_accuracy"] >= 0.7  # 48 examples, chance 1/3
    result = dorakit("eval", "--model", model, "--adapter", out / "adapter", "--data", workdir / "test.jsonl")
    assert result.returncode == 0, result.stderr
    scored = json.loads(result.stdout)
    assert scored["rank_accuracy"] >= max(0.6, scored["majority_baseline"] + 0.15)  # 60 examples
    # A file without one of the classes: the head's classes come from the run's record, not the file
    # (which gave a 2-class head, refused as a shape mismatch).
    from dorakit.train.inference import evaluate_file

    two = write_jsonl(tmp_path / "two.jsonl", [r for r in colour_records(60, seed=1) if r["label"] != "plain"])
    partial = evaluate_file(model, two, out / "adapter", log=None)
    assert partial["labels"] == ["cold", "plain", "warm"] and partial["rank_accuracy"] >= 0.6


def test_bad_inputs_fail_before_training_with_a_clear_error(workdir, tmp_path):
    model, data = workdir / "model", workdir / "train.jsonl"
    (tmp_path / "bad.jsonl").write_text('{"text": "red sky", "label": "warm"}\n{"text": "blue", \n', encoding="utf-8")
    (tmp_path / "empty_model").mkdir()
    (tmp_path / "empty_model" / "config.json").write_text((model / "config.json").read_text())
    (tmp_path / "model.Q4_1.gguf").write_bytes(b"GGUF")
    cases = [
        (("--model", model, "--data", tmp_path / "missing.jsonl"), "Data file .*missing.jsonl does not exist"),
        (("--model", model, "--data", tmp_path / "bad.jsonl"), "bad.jsonl:2: not valid JSON"),
        (("--model", tmp_path / "empty_model", "--data", data), "has a config but no weights"),
        (("--model", tmp_path / "nowhere", "--data", data), "Model directory .*nowhere does not exist"),
        (("--model", tmp_path / "model.Q4_1.gguf", "--data", data),
         "model.Q4_1.gguf is a GGUF file .*not a transformers checkpoint directory. Convert it once .*convert_gguf"),
        (("--model", model, "--data", data, "--target-modules", "qkv_proj"), "No module matched.*q_proj"),
        (("--model", model, "--data", data, "--max-length", 3), "no example has a target token within --max-length 3"),
        (("--model", model, "--data", data, "--max-step", 3), "Perhaps you meant"),
    ]
    for args, message in cases:
        done = dorakit("train", *args, "--output", tmp_path / "out", "--no-progress")
        assert done.returncode == 2, (args, done.stderr)
        assert re.search(message, done.stderr + done.stdout), (message, done.stderr)
        assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_help_shows_the_defaults_of_a_run_with_data_and_what_the_demo_changes():
    """Without --data the embedded demo runs with other defaults; --help lists a --data run's and names
    the demo's changes (issue 14)."""
    from dorakit.demo import DEMO_OPTIONS

    sub = dorakit("train", "--help")
    text = re.sub(r"[│╭╮╰╯─\s]+", " ", sub.stdout)  # the help table wraps its cells over lines
    assert "--batch-size INT Global batch: examples per optimizer step. (default: 16)" in text
    assert "--output STR Output directory: adapter/, checkpoint/, metrics.jsonl, summary.json, loss.png. (default: runs/dorakit)" in text
    assert f"--batch-size {DEMO_OPTIONS['batch_size']}" in text and f"--lr {DEMO_OPTIONS['lr']}" in text
    changed = [k for k, v in DEMO_OPTIONS.items() if getattr(TrainConfig(), k) != v]
    assert all(f"--{k.replace('_', '-')} " in text.split("which changes these:")[1] for k in changed)


def test_a_finished_run_ends_with_its_losses_and_where_its_files_are(workdir):
    out = workdir / "closing"
    done = dorakit("train", "--model", workdir / "model", "--data", workdir / "train.jsonl", "--output", out,
                   "--max-steps", 2, *FAST)
    assert done.returncode == 0, done.stderr
    last = done.stdout.strip().splitlines()[-1]
    summary = json.loads((out / "summary.json").read_text())
    assert last.startswith("dorakit train: finished 2 steps")
    assert f"final train loss {summary['final']['loss']:.4f}" in last
    assert f"validation loss {summary['final']['val_loss']:.4f}" in last
    for path in (out / "adapter", out / "metrics.jsonl", out / "summary.json"):
        assert str(path) in last
