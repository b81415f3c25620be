"""Training data from local JSONL/JSON/CSV files in the shapes fine-tuning recipes use.

Every record is read and checked before training starts, so a bad line fails in seconds, not hours in,
and the error names the file and line. Shapes (detected from the fields, after ``field_map``):

    messages                       chat turns [{role, content}]; the assistant turns are trained
    instruction, [input], output   Alpaca / LLM-Adapters; the response is trained
    context, target                FinLoRA; the target is trained
    prompt, completion             the completion is trained
    text, label                    classification; the label is trained (or a head predicts it)
    text                           plain language modelling; every token is trained
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Stanford Alpaca's prompt, used by the DoRA authors' LLM-Adapters scripts.
ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
DEFAULT_LABEL_PROMPT = "Text: {text}\nLabel:"

# shape name -> fields that must be present (checked in this order: the first match wins)
SHAPES: dict[str, tuple[str, ...]] = {
    "messages": ("messages",),
    "instruction": ("instruction", "output"),
    "context": ("context", "target"),
    "completion": ("prompt", "completion"),
    "label": ("text", "label"),
    "text": ("text",),
}


@dataclass
class Example:
    """One record, formatted: the model reads ``prompt`` and learns ``target`` (or ``messages``)."""

    prompt: str
    target: str
    source: str  # "file:line", for error messages
    label: str | None = None  # the class name, for text/label data
    text: str | None = None  # the raw text of text/label data (what a classification head reads)
    messages: list[dict[str, str]] | None = None


@dataclass
class Dataset:
    examples: list[Example]
    shape: str
    path: str

    @property
    def labels(self) -> list[str]:
        """The sorted distinct labels, for label-style data (else empty)."""
        return sorted({e.label for e in self.examples if e.label is not None})


def read_records(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    """(line or item number, record) for every record of a JSONL, JSON or CSV file.

    Raises:
        FileNotFoundError / ValueError: naming the file and the line that is wrong.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Data file {path} does not exist{' (it is a directory)' if path.is_dir() else ''}.")
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        line = path.read_bytes()[: err.start].count(b"\n") + 1
        raise ValueError(f"{path}:{line}: not valid UTF-8 ({err.reason}); re-save the file as UTF-8.") from None
    except OSError as err:
        raise ValueError(f"Data file {path} cannot be read: {err.strerror}.") from None
    if suffix == ".jsonl":
        return list(_jsonl(path, text))
    if suffix == ".json":
        return _json(path, text)
    if suffix in (".csv", ".tsv"):
        reader = csv.DictReader(text.splitlines(), delimiter="\t" if suffix == ".tsv" else ",")
        rows = []
        for row in reader:
            if None in row:
                raise ValueError(f"{path}:{reader.line_num}: more values than the header has columns.")
            rows.append((reader.line_num, dict(row)))
        return rows
    raise ValueError(f"Data file {path}: unknown format {suffix!r}; use .jsonl, .json or .csv (or .tsv).")


def _jsonl(path: Path, text: str):
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number}: not valid JSON ({err.msg} at column {err.colno}).") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{number}: each line must be a JSON object, got {type(record).__name__}.")
        yield number, record


def _json(path: Path, text: str) -> list[tuple[int, dict[str, Any]]]:
    try:
        content = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}:{err.lineno}: not valid JSON ({err.msg}).") from None
    if not isinstance(content, list):
        raise ValueError(f"{path}: a .json data file must hold a list of records (use .jsonl for one per line).")
    for index, record in enumerate(content):
        if not isinstance(record, dict):
            raise ValueError(f"{path}: item {index} must be an object, got {type(record).__name__}.")
    return list(enumerate(content))


def detect_shape(keys: set[str]) -> str | None:
    for shape, needed in SHAPES.items():
        if set(needed) <= keys:
            return shape
    return None


def load_dataset(path: str | Path, field_map: dict[str, str] | None = None,
                 prompt_template: str | None = None) -> Dataset:
    """Read, check and format every record of ``path``.

    Raises:
        ValueError: a record of another shape than the first, a missing or empty field, or no records.
    """
    records = read_records(path)
    if not records:
        raise ValueError(f"Data file {path} holds no records.")
    field_map = field_map or {}
    shape = None
    examples = []
    for number, record in records:
        record = {field_map.get(k, k): v for k, v in record.items()}
        where = f"{path}:{number}"
        found = detect_shape(set(record))
        if found is None:
            wanted = "; ".join(", ".join(f) for f in SHAPES.values())
            raise ValueError(f"{where}: fields {sorted(record)} match no known shape ({wanted}). "
                             "Rename fields with --field-map OLD NEW.")
        if shape is None:
            shape = found
        elif found != shape:
            raise ValueError(f"{where}: this record has the {found!r} shape, earlier ones the {shape!r} shape; "
                             "a file must hold one shape.")
        examples.append(_format(shape, record, where, prompt_template))
    return Dataset(examples, shape, str(path))


def _text(record: dict[str, Any], key: str, where: str, allow_empty: bool = False) -> str:
    value = record.get(key)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and key == "label":
        value = str(value)
    if value is None and allow_empty:
        return ""
    if not isinstance(value, str):
        raise ValueError(f"{where}: field {key!r} must be a string, got {type(value).__name__}.")
    if not value.strip() and not allow_empty:
        raise ValueError(f"{where}: field {key!r} is empty.")
    return value


def join_target(prompt: str, target: str) -> str:
    # A prompt that ends in a word and a target that starts with one need a space between them, and it
    # belongs to the target: " negative" is one token that carries the answer, while a trailing space
    # on the prompt would become its own token and leave the answer split (see ASSETS.md's prompt tip).
    if prompt and not prompt[-1].isspace() and not target[:1].isspace():
        return " " + target
    return target


def _format(shape: str, record: dict[str, Any], where: str, template: str | None) -> Example:
    if shape == "messages":
        return Example("", "", where, messages=_messages(record["messages"], where))
    if shape == "instruction":
        extra = _text(record, "input", where, allow_empty=True)
        fmt = ALPACA_WITH_INPUT if extra.strip() else ALPACA
        prompt = fmt.format(instruction=_text(record, "instruction", where), input=extra)
        return Example(prompt, _text(record, "output", where), where)
    if shape in ("context", "completion"):
        first, second = SHAPES[shape]
        prompt = _text(record, first, where)
        return Example(prompt, join_target(prompt, _text(record, second, where)), where)
    if shape == "label":
        label = _text(record, "label", where).strip()
        text = _text(record, "text", where)
        prompt = (template or DEFAULT_LABEL_PROMPT).format(text=text)
        return Example(prompt, join_target(prompt, label), where, label=label, text=text)
    return Example("", _text(record, "text", where), where)


def _messages(turns: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(turns, list) or not turns:
        raise ValueError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects.")
    out = []
    for index, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("role"), str) or not isinstance(turn.get("content"), str):
            raise ValueError(f"{where}: messages[{index}] must be an object with string 'role' and 'content'.")
        out.append({"role": turn["role"], "content": turn["content"]})
    if not any(t["role"] == "assistant" for t in out):
        raise ValueError(f"{where}: no 'assistant' turn to learn from.")
    return out
