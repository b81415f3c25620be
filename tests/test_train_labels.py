"""Label-style data in every shape that carries it, the label distribution, and class-balanced order."""

from __future__ import annotations

from collections import Counter

import pytest

from dorakit.train.batches import stream_indices
from dorakit.train.data import load_dataset
from dorakit.train.labels import balanced_indices, distribution, distribution_line, imbalance_warning, looks_like_labels

from .train_assets import write_jsonl


def test_label_style_is_recognised_in_every_shape_that_carries_labels(tmp_path):
    three = ["positive", "negative", "neutral"]
    files = {
        "context": [{"context": f"News {i}\nAnswer:", "target": three[i % 3]} for i in range(9)],  # FinLoRA
        "completion": [{"prompt": f"Q{i}:", "completion": " " + three[i % 2]} for i in range(6)],
        # LLM-Adapters: the output explains, the answer field is the label
        "instruction": [{"instruction": f"Is {i} even?", "input": "", "output": f"the correct answer is {a}",
                         "answer": a} for i, a in enumerate(["true", "false"] * 3)],
        "label": [{"text": "red", "label": "warm"}, {"text": "blue", "label": "cold"}],
    }
    labels = {"context": ["negative", "neutral", "positive"], "completion": ["negative", "positive"],
              "instruction": ["false", "true"], "label": ["cold", "warm"]}
    for shape, records in files.items():
        ds = load_dataset(write_jsonl(tmp_path / f"{shape}.jsonl", records))
        assert ds.shape == shape and ds.labels == labels[shape], shape
    ds = load_dataset(tmp_path / "instruction.jsonl")
    example = ds.examples[0]
    assert example.label == "true" and example.target_for("false") == "the correct answer is false"
    ds = load_dataset(tmp_path / "context.jsonl")
    assert ds.examples[0].target == " positive" and ds.examples[0].target_for("neutral") == " neutral"


def test_free_text_targets_carry_no_labels_unless_a_run_says_so(tmp_path):
    free = [{"context": f"Question {i}", "target": f"a longer free answer about item {i}"} for i in range(8)]
    assert load_dataset(write_jsonl(tmp_path / "free.jsonl", free)).labels == []
    # Each label once: too few repeats to tell from the file alone; a trained run's label set decides.
    once = [{"context": "News a\nAnswer:", "target": "positive"}, {"context": "News b\nAnswer:", "target": "negative"}]
    path = write_jsonl(tmp_path / "once.jsonl", once)
    assert load_dataset(path).labels == []
    assert load_dataset(path, labels=["negative", "neutral", "positive"]).labels == ["negative", "positive"]
    assert not looks_like_labels(["yes", "no", "maybe"]) and looks_like_labels(["yes", "no"] * 3)
    assert not looks_like_labels(["one two three four five", "x"] * 4)


def test_distribution_and_imbalance_warning():
    counts = distribution(["neutral"] * 60 + ["positive"] * 35 + ["negative"] * 5)
    assert list(counts) == ["neutral", "positive", "negative"]
    assert distribution_line(counts) == "neutral 60 (60.0%), positive 35 (35.0%), negative 5 (5.0%)"
    warning = imbalance_warning(counts)
    assert "'neutral' has 12.0x the examples of 'negative'" in warning and "--balance-labels" in warning
    assert imbalance_warning(distribution(["a"] * 40 + ["b"] * 10)) is None  # 4x: no warning
    assert imbalance_warning({"only": 10}) is None


@pytest.mark.parametrize("seed", [0, 5])
def test_balanced_order_draws_labels_evenly_and_is_resumable(seed):
    labels = ["neutral"] * 60 + ["positive"] * 35 + ["negative"] * 5
    stream = balanced_indices(labels, seed, start=0, count=300)
    drawn = Counter(labels[i] for i in stream)
    assert drawn == {"neutral": 100, "positive": 100, "negative": 100}
    for k in range(0, 300, 3):  # every round of three draws takes each label once
        assert {labels[i] for i in stream[k:k + 3]} == {"neutral", "positive", "negative"}
    rare = [i for i in stream if labels[i] == "negative"]
    assert all(sorted(rare[j:j + 5]) == list(range(95, 100)) for j in range(0, 100, 5))  # each epoch of a label: all once
    assert balanced_indices(labels, seed, start=37, count=50) == stream[37:87]  # a pure function of the position
    assert balanced_indices(labels, seed + 1, start=0, count=300) != stream
    assert stream[:100] != stream_indices(len(labels), seed, 0, 100)
