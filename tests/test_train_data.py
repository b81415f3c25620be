"""Data files in every supported shape, prompt masking, the seeded split/order, and bad lines."""

from __future__ import annotations

import json

import pytest

from dorakit.train.batches import IGNORE, collate, encode, encode_all, split, stream_indices
from dorakit.train.data import ALPACA, describe, load_dataset

from .train_assets import colour_records, make_tokenizer, write_jsonl

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def test_shapes_are_detected_and_formatted(tmp_path):
    cases = {
        "instruction": ({"instruction": "question", "input": "", "output": "answer"}, "answer"),
        "context": ({"context": "question", "target": "answer"}, " answer"),
        "completion": ({"prompt": "question\n", "completion": "answer"}, "answer"),
        "label": ({"text": "red sky", "label": "warm"}, " warm"),
        "text": ({"text": "red sky"}, "red sky"),
    }
    for shape, (record, target) in cases.items():
        ds = load_dataset(write_jsonl(tmp_path / f"{shape}.jsonl", [record, record]))
        assert ds.shape == shape
        assert ds.examples[0].target == target
    assert load_dataset(tmp_path / "instruction.jsonl").examples[0].prompt == ALPACA.format(instruction="question")
    assert load_dataset(tmp_path / "label.jsonl").labels == ["warm"]


def test_csv_json_and_field_map(tmp_path):
    (tmp_path / "d.csv").write_text("sentiment,confidence,text\nwarm,1,red sky\ncold,0.5,blue sea\n", encoding="utf-8")
    ds = load_dataset(tmp_path / "d.csv", field_map={"sentiment": "label"}, prompt_template="Tweet: {text}\nSentiment:")
    assert ds.shape == "label" and ds.labels == ["cold", "warm"]
    assert ds.examples[1].prompt == "Tweet: blue sea\nSentiment:" and ds.examples[1].target == " cold"
    finlora = "Answer from {warm/cold} or {{x}}.\nInput: {text}\nAnswer:"  # literal braces stay; {{ }} escapes
    ds = load_dataset(tmp_path / "d.csv", field_map={"sentiment": "label"}, prompt_template=finlora)
    assert ds.examples[1].prompt == "Answer from {warm/cold} or {x}.\nInput: blue sea\nAnswer:"
    (tmp_path / "d.json").write_text(json.dumps([{"context": "a", "target": "b"}]), encoding="utf-8")
    assert load_dataset(tmp_path / "d.json").shape == "context"


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"text": "a", "label": "x"}\n{"text": "b", "label": \n', "bad.jsonl:2: not valid JSON"),
        ('{"text": "a", "label": "x"}\n[1, 2]\n', "bad.jsonl:2: each line must be a JSON object"),
        ('{"text": "a", "label": "x"}\n{"instruction": "q", "output": "a"}\n', "bad.jsonl:2: this record has the 'instruction' shape"),
        ('{"question": "a", "answer": "x"}\n', "bad.jsonl:1: fields ['answer', 'question'] match no known shape"),
        ('{"text": "a", "label": ""}\n', "bad.jsonl:1: field 'label' is empty"),
        ('{"messages": [{"role": "user", "content": "hi"}]}\n', "bad.jsonl:1: no 'assistant' turn"),
        ("\n\n", "holds no records"),
    ],
)
def test_bad_records_name_file_and_line(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_dataset(path)


def test_unreadable_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_dataset(tmp_path / "missing.jsonl")
    (tmp_path / "d.parquet").write_bytes(b"x")
    with pytest.raises(ValueError, match="unknown format '.parquet'"):
        load_dataset(tmp_path / "d.parquet")
    (tmp_path / "latin.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match="latin.jsonl:2: not valid UTF-8"):
        load_dataset(tmp_path / "latin.jsonl")


def test_prompt_tokens_are_masked_and_eos_is_learned(tmp_path, tok):
    ds = load_dataset(write_jsonl(tmp_path / "d.jsonl", [{"text": "red sky", "label": "warm"}]))
    item = encode(ds.examples[0], tok, 64)
    words = tok.convert_ids_to_tokens(item.input_ids)
    assert words == ["<s>", "Text", ":", "red", "sky", "Label", ":", "warm", "</s>"]
    trained = [w for w, label in zip(words, item.labels) if label != IGNORE]
    assert trained == ["warm", "</s>"] and item.target_tokens == 2


def test_chat_masks_everything_but_assistant_turns(tmp_path, tok):
    turns = [{"role": "user", "content": "red sky"}, {"role": "assistant", "content": "warm"},
             {"role": "user", "content": "blue sea"}, {"role": "assistant", "content": "cold"}]
    ds = load_dataset(write_jsonl(tmp_path / "chat.jsonl", [{"messages": turns}]))
    item = encode(ds.examples[0], tok, 64)
    words = tok.convert_ids_to_tokens(item.input_ids)
    trained = [w for w, label in zip(words, item.labels) if label != IGNORE]
    assert trained == ["warm", "</s>", "cold", "</s>"]
    assert words.count("<|user|>") == 2


def test_truncation_drops_examples_with_nothing_to_learn(tmp_path, tok):
    long = {"text": "red sky " * 20, "label": "warm"}
    ds = load_dataset(write_jsonl(tmp_path / "d.jsonl", [long, {"text": "red", "label": "warm"}]))
    assert len(encode_all(ds, tok, 10)) == 1
    ds.examples = ds.examples[:1]
    with pytest.raises(ValueError, match="no example has a target token within --max-length 10"):
        encode_all(ds, tok, 10)


def test_split_and_order_are_seeded(tmp_path):
    items = list(range(100))
    train, val = split(items, 0.1, seed=3, max_val=500)
    assert len(val) == 10 and sorted(train + val) == items
    assert split(items, 0.1, seed=3, max_val=500) == (train, val)
    assert split(items, 0.1, seed=4, max_val=500)[1] != val
    assert len(split(items, 0.5, seed=3, max_val=7)[1]) == 7
    stream = stream_indices(10, seed=0, start=0, count=30)
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:20]) == list(range(10))
    assert stream[10:20] != stream[:10]  # a new permutation each epoch
    assert stream_indices(10, seed=0, start=7, count=9) == stream[7:16]  # resumable at any position


def test_collate_pads_right_and_ignores_padding(tmp_path, tok):
    ds = load_dataset(write_jsonl(tmp_path / "d.jsonl", colour_records(4)))
    items = encode_all(ds, tok, 64)
    batch = collate(items, tok.pad_token_id)
    lengths = [len(x.input_ids) for x in items]
    assert batch["attention_mask"].sum(1).tolist() == lengths
    for row, n in enumerate(lengths):
        assert (batch["labels"][row, n:] == IGNORE).all()
        assert (batch["input_ids"][row, n:] == tok.pad_token_id).all()


FIN = [{"context": f"News: item {i}\nAnswer:", "target": ["positive", "negative"][i % 2], "id": i} for i in range(6)]


@pytest.mark.parametrize(
    "field_map, message",
    [
        ({"contxt": "text"}, "--field-map contxt text: .*has no field 'contxt' .*did you mean 'context'\\? fix the name"),
        # a partial map turned context/target data into plain text and dropped the target, exit 0 (issue 21)
        ({"context": "text"}, "--field-map context text: .* reads as plain text data and its 'target' field would be "
                              "ignored, not trained; .*also --field-map target label"),
        ({"context": "target"}, "already has a 'target' field, which this mapping would overwrite"),
    ],
)
def test_field_maps_that_name_no_field_or_drop_one_are_errors(tmp_path, field_map, message):
    with pytest.raises(ValueError, match=message):
        load_dataset(write_jsonl(tmp_path / "fin.jsonl", FIN), field_map=field_map)


def test_a_complete_field_map_and_the_data_line(tmp_path):
    path = write_jsonl(tmp_path / "fin.jsonl", FIN)
    ds = load_dataset(path, field_map={"context": "text", "target": "label"}, prompt_template="{text}\n=")
    assert ds.shape == "label" and ds.labels == ["negative", "positive"] and ds.ignored == ["id"]
    assert describe(ds, [2, 2, 3] * 2) == (
        f"{path}: text/label data (prompt: text in the template '{{text}}\\n='; trained: label; "
        "labels: negative, positive); field map context->text, target->label; 6 examples, 2.3 trained tokens "
        "each (2-3); ignored fields: id")
    line = describe(load_dataset(path), [2] * 5)
    assert line.startswith(f"{path}: context/target data (prompt: context; trained: target; labels from target: "
                           "negative, positive); 6 examples")
    assert line.endswith(", 2.0 trained tokens each (2-2), 1 dropped by --max-length (no target token left); "
                         "ignored fields: id") and describe(load_dataset(path), [2] * 5).count("dropped") == 1
    free = write_jsonl(tmp_path / "free.jsonl", [{"instruction": "Say hi", "output": "hello there, how are you"}])
    assert "instruction/output data (prompt: instruction in the Alpaca template; trained: output; free-text " \
           "targets, not label-style)" in describe(load_dataset(free), [7])
