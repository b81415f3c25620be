"""`dorakit eval` measures what the run trained (issue 21): the run record beside the adapter supplies the
prompt template, field map and label set; only trained labels are ranked; differences are said in one line.

Two tiny runs: FinLoRA-style context/target data with three labels, and text/label data with two labels
and a custom prompt template. Each is evaluated on two-class and three-class files.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from dorakit.train import TrainConfig, run
from dorakit.train.inference import evaluate_file
from dorakit.train.run_record import RECORD_NAME, read_record

from .train_assets import colour_records, make_model_dir, write_jsonl

pytest.importorskip("transformers")

TEMPLATE = "Colour words: {text}\nKind:"


def as_context(records):
    return [{"context": f"News: {r['text']}\nAnswer:", "target": r["label"]} for r in records]


def without(records, label, key):
    return [r for r in records if r[key] != label]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    make_model_dir(root / "model", extra_words=["News", "Answer", "Colour", "words", "Kind", "mixed"])
    write_jsonl(root / "fin_train.jsonl", as_context(colour_records(200, seed=0)))  # cold / plain / warm
    write_jsonl(root / "tl_train.jsonl", without(colour_records(240, seed=0), "plain", "label"))  # cold / warm
    test = colour_records(90, seed=1)
    write_jsonl(root / "fin_test3.jsonl", as_context(test))
    write_jsonl(root / "fin_test2.jsonl", without(as_context(test), "plain", "target"))
    write_jsonl(root / "fin_test2_stray.jsonl", without(as_context(test), "plain", "target")
                + [{"context": "News: grey sea\nAnswer:", "target": "mixed"}])
    write_jsonl(root / "tl_test2.jsonl", without(test, "plain", "label"))
    write_jsonl(root / "tl_test3.jsonl", test)
    common = dict(model=str(root / "model"), batch_size=8, lr=2e-2, lora_dropout=0.0, progress=False, eval_every=0,
                  save_every=0, val_fraction=0.05)
    run(TrainConfig(data=str(root / "fin_train.jsonl"), output=str(root / "fin"), max_steps=40, **common))
    run(TrainConfig(data=str(root / "tl_train.jsonl"), output=str(root / "tl"), max_steps=30, prompt_template=TEMPLATE,
                    **common))
    return root


def evaluate(root, name, data, **options):
    lines = []
    result = evaluate_file(root / "model", root / data, root / name / "adapter", log=lines.append, **options)
    return result, lines


def test_the_run_record_says_what_evaluation_needs(runs):
    fin, tl = read_record(runs / "fin" / "adapter"), read_record(runs / "tl" / "adapter")
    assert (fin.shape, fin.labels, fin.prompt_template, fin.task) == ("context", ["cold", "plain", "warm"], None, "causal-lm")
    assert sum(fin.label_counts.values()) == 190 and fin.base_model == str(runs / "model")
    assert (tl.shape, tl.labels, tl.prompt_template) == ("label", ["cold", "warm"], TEMPLATE)
    config = json.loads((runs / "fin" / "adapter" / "adapter_config.json").read_text())
    assert RECORD_NAME not in config and (runs / "fin" / "adapter" / RECORD_NAME).is_file()


def test_context_target_data_gets_label_accuracy_over_the_trained_labels(runs):
    both, lines = evaluate(runs, "fin", "fin_test2.jsonl", accuracy="both")
    assert both["labels"] == ["cold", "plain", "warm"]  # the run's three, though the file holds two
    # Trained well above chance (seeds 0-3: 0.75-1.0; majority 0.52); an untrained adapter ranks ~1/3.
    assert both["rank_accuracy"] >= 0.7 and both["generate_accuracy"] >= 0.7 and both["unparsed"] == 0
    assert "notes" not in both and len(lines) == 1
    assert set(both["rank_accuracy_per_label"]) == {"cold", "warm"}
    assert min(both["rank_accuracy_per_label"].values()) <= both["rank_accuracy"] <= max(both["rank_accuracy_per_label"].values())
    assert "context/target data (prompt: context; trained: target; labels from target: cold, warm)" in lines[0]
    assert "2.0 trained tokens each" in lines[0]
    three, _ = evaluate(runs, "fin", "fin_test3.jsonl")
    assert three["rank_accuracy"] >= 0.6 and three["scored_examples"] == 90
    # One stray label no longer changes the task: it is left out and said, not ranked (issue 21: 72.5% -> 24.4%).
    stray, lines = evaluate(runs, "fin", "fin_test2_stray.jsonl")
    assert stray["rank_accuracy"] == both["rank_accuracy"] and stray["labels"] == both["labels"]
    assert stray["examples"] == both["examples"] + 1 and stray["scored_examples"] == both["examples"]
    assert stray["notes"] == ["1 example(s) hold labels the run never saw: 'mixed' (1); the accuracy leaves them out "
                              "and ranks only the trained labels (cold, plain, warm)."]
    assert lines[-1] == f"dorakit eval: note: {stray['notes'][0]}"


def test_the_recorded_template_is_used_and_a_different_one_is_said(runs):
    recorded, lines = evaluate(runs, "tl", "tl_test2.jsonl")
    given, _ = evaluate(runs, "tl", "tl_test2.jsonl", prompt_template=TEMPLATE)
    assert recorded == given and "notes" not in recorded
    assert recorded["rank_accuracy"] >= 0.7 and recorded["labels"] == ["cold", "warm"]
    assert repr(TEMPLATE) in lines[0]
    other, lines = evaluate(runs, "tl", "tl_test2.jsonl", prompt_template="Text: {text}\nLabel:")
    assert other["notes"][0].startswith("--prompt-template 'Text: {text}\\nLabel:' differs from the run's "
                                        "'Colour words: {text}\\nKind:'; evaluating with the one given.")
    assert other["loss"] != recorded["loss"]
    three, _ = evaluate(runs, "tl", "tl_test3.jsonl")  # a label the two-class run never saw
    assert three["labels"] == ["cold", "warm"] and three["scored_examples"] < three["examples"]
    assert "hold labels the run never saw: 'plain'" in three["notes"][0]


def test_other_shapes_and_adapters_without_a_record_are_said(runs, tmp_path):
    shape, _ = evaluate(runs, "fin", "tl_test3.jsonl")
    assert any("this file is text/label data, but the run trained on context/target data" in n for n in shape["notes"])
    bare = tmp_path / "peft_adapter"
    bare.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (bare / name).write_bytes((runs / "fin" / "adapter" / name).read_bytes())
    result = evaluate_file(runs / "model", runs / "fin_test2.jsonl", bare, log=None)
    assert result["labels"] == ["cold", "warm"]  # from the file, as a PEFT adapter carries no record
    assert "has no run record" in result["notes"][0]
    llm_adapters = [{"instruction": "Which kind?", "input": r["text"], "output": f"the correct answer is {r['label']}",
                     "answer": r["label"]} for r in colour_records(12, seed=2)]
    write_jsonl(tmp_path / "la.jsonl", llm_adapters)
    base = evaluate_file(runs / "model", tmp_path / "la.jsonl", None, accuracy="both", log=None)
    assert base["shape"] == "instruction" and 0 <= base["rank_accuracy"] <= 1 and "generate_accuracy" in base
    free = evaluate_file(runs / "model", write_jsonl(tmp_path / "t.jsonl", [{"text": "red sky"}]), None, log=None)
    assert "rank_accuracy" not in free and "no label accuracy" in free["notes"][0]


def test_eval_command_prints_the_data_line_first_and_refuses_a_bad_field_map(runs):
    def dorakit(*args):
        return subprocess.run([sys.executable, "-m", "dorakit", "eval", "--model", runs / "model", "--adapter",
                               runs / "fin" / "adapter", *map(str, args)], capture_output=True, text=True, timeout=300)

    done = dorakit("--data", runs / "fin_test2_stray.jsonl")
    assert done.returncode == 0, done.stderr
    lines = (runs / "fin_test2_stray.jsonl").read_text().splitlines()
    assert json.loads(done.stdout)["scored_examples"] == len(lines) - 1  # all but the stray label
    news = [line for line in done.stderr.splitlines() if line.startswith("dorakit eval:")]
    assert news[0].startswith("dorakit eval: data ") and "never saw: 'mixed'" in news[1]
    bad = dorakit("--data", runs / "fin_test2.jsonl", "--field-map", "context", "text")
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.strip().splitlines()[-1].startswith("dorakit: error: --field-map context text: ")
    assert "'target' field would be ignored" in bad.stderr and "Traceback" not in bad.stderr
