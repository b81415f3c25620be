"""Training data from local JSONL/JSON/CSV files in the shapes fine-tuning recipes use.

Every record is read and checked before training starts, so a bad line fails in seconds, not hours in,
and the error names the file and line. Shapes (detected from the fields, after ``field_map``):

    messages                               chat turns [{role, content}]; the assistant turns are trained
    instruction, [input], output, [answer] Alpaca / LLM-Adapters; the response is trained
    context, target                        FinLoRA; the target is trained
    prompt, completion                     the completion is trained
    text, label                            classification; the label is trained (or a head predicts it)
    text                                   plain language modelling; every token is trained

Label-style data (a few short targets that recur: FinLoRA's sentiment, LLM-Adapters' ``answer``) is
recognised in every shape that can carry it (see labels.py), so evaluation can report label accuracy.
"""

from __future__ import annotations

import csv
import difflib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .labels import mark_labels

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
OPTIONAL = {"instruction": ("input", "answer")}  # fields a shape also reads when present
KNOWN_FIELDS = frozenset(f for fields in (*SHAPES.values(), *OPTIONAL.values()) for f in fields)


@dataclass
class Example:
    """One record, formatted: the model reads ``prompt`` and learns ``target`` (or ``messages``)."""

    prompt: str
    target: str
    source: str  # "file:line", for error messages
    label: str | None = None  # the class name, for label-style data (text/label, or short recurring targets)
    text: str | None = None  # the raw text of text/label data (what a classification head reads)
    messages: list[dict[str, str]] | None = None
    label_span: tuple[int, int] | None = None  # target[start:end] == label: where a candidate label goes

    def target_for(self, label: str) -> str:
        """The target this example would have if its label were ``label`` (for ranking candidates)."""
        start, end = self.label_span
        return self.target[:start] + label + self.target[end:]


@dataclass
class Dataset:
    examples: list[Example]
    shape: str
    path: str
    field_map: dict[str, str] = field(default_factory=dict)  # the renames applied
    fields: list[str] = field(default_factory=list)  # the fields the shape reads (after the map)
    ignored: list[str] = field(default_factory=list)  # fields of the file the shape does not read
    template: str | None = None  # text/label data: the prompt template used

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
                 prompt_template: str | None = None, labels: list[str] | None = None,
                 map_from_run: bool = False) -> Dataset:
    """Read, check and format every record of ``path``.

    Args:
        field_map: old name -> new name, applied before the shape is detected.
        prompt_template: the prompt of text/label data, with {text}.
        labels: the label set of a trained run: the targets are labels whatever the file alone suggests.
        map_from_run: ``field_map`` is a trained run's: entries naming no field of this file are
            skipped (an evaluation file may already use the new names).
    Raises:
        ValueError: a record of another shape than the first, a missing or empty field, no records, or
            a field map that names no field of the file or leaves a field the shape needs unused.
    """
    records = read_records(path)
    if not records:
        raise ValueError(f"Data file {path} holds no records.")
    field_map = dict(field_map or {})
    present = set().union(*(record.keys() for _, record in records))
    if map_from_run:
        field_map = {old: new for old, new in field_map.items() if old in present and new not in present}
    check_field_map(field_map, present, path)
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
    mapped = {field_map.get(k, k) for k in present}
    unused = sorted(mapped - set(shape_fields(shape)))
    if field_map:
        check_nothing_dropped(field_map, shape, mapped, unused, path)
    mark_labels(examples, shape, labels)
    template = (prompt_template or DEFAULT_LABEL_PROMPT) if shape == "label" else None
    return Dataset(examples, shape, str(path), field_map, [f for f in shape_fields(shape) if f in mapped], unused,
                   template)


def shape_fields(shape: str) -> tuple[str, ...]:
    """Every field the shape reads (required, then optional)."""
    return SHAPES[shape] + OPTIONAL.get(shape, ())


def _map_text(field_map: dict[str, str]) -> str:
    return "--field-map " + " ".join(f"{old} {new}" for old, new in field_map.items())


def check_field_map(field_map: dict[str, str], present: set[str], path) -> None:
    """Every old name must be a field of the file, and no new name may overwrite a field the map keeps."""
    for old, new in field_map.items():
        if old not in present:
            near = difflib.get_close_matches(old, sorted(present), n=1, cutoff=0.6)
            hint = f"did you mean {near[0]!r}? " if near else ""
            raise ValueError(f"--field-map {old} {new}: {path} has no field {old!r} (its fields: "
                             f"{', '.join(sorted(present))}); {hint}fix the name or drop this mapping.")
        if new in present and new not in field_map:
            raise ValueError(f"--field-map {old} {new}: {path} already has a {new!r} field, which this mapping "
                             f"would overwrite; also map {new!r} to another name, or drop this mapping.")


def check_nothing_dropped(field_map: dict[str, str], shape: str, mapped: set[str], unused: list[str], path) -> None:
    """A mapped file must not leave a field of a known shape unread: ``--field-map context text`` on
    context/target data would make it plain text and silently drop the target (issue 21)."""
    dropped = [name for name in unused if name in KNOWN_FIELDS]
    if not dropped:
        return
    fix = ""
    for other, needed in SHAPES.items():  # a shape that renaming the dropped field would complete
        missing = [f for f in needed if f not in mapped]
        if len(dropped) == 1 and len(missing) == 1 and len(needed) > 1 and dropped[0] not in needed:
            fix = f" (for {shape_name(other)} data: also --field-map {dropped[0]} {missing[0]})"
            break
    raise ValueError(f"{_map_text(field_map)}: {path} then reads as {shape_name(shape)} data and its "
                     f"{', '.join(repr(d) for d in dropped)} field would be ignored, not trained; map every field "
                     f"of the shape you mean{fix}, or drop the map.")


def shape_name(shape: str) -> str:
    return "/".join(SHAPES[shape]) if shape != "text" else "plain text"


def describe(dataset: Dataset, trained_tokens: list[int], dropped: int | None = None) -> str:
    """One line saying how a file was read: its shape, what each field became, the field map, the
    labels and the trained tokens per example (issue 21: nothing printed which shape was detected).

    Args:
        trained_tokens: per encoded example. dropped: examples truncation left nothing to train in
            (None: those of the file without an entry in ``trained_tokens``)."""
    prompt = [f for f in dataset.fields if f in ("instruction", "input", "context", "prompt", "text")]
    trained = [f for f in dataset.fields if f in ("output", "target", "completion", "label", "messages")]
    if dataset.shape == "text":
        prompt, trained = [], ["text"]
    elif dataset.shape == "messages":
        trained = ["assistant turns of messages"]
    elif dataset.shape == "label":
        shown = repr(dataset.template)
        prompt = [f"text in the template {shown[:70]}" + ("..." if len(shown) > 70 else "")]
    elif dataset.shape == "instruction":
        prompt = [" + ".join(prompt) + " in the Alpaca template"]
    roles = [f"prompt: {', '.join(prompt)}"] if prompt else []
    roles.append(f"trained: {', '.join(trained)}")
    labels = dataset.labels
    if labels:
        source = "answer" if "answer" in dataset.fields else trained[0]
        roles.append(f"labels{'' if source == 'label' else ' from ' + source}: "
                     + (", ".join(labels) if len(labels) <= 8 else f"{len(labels)} distinct"))
    elif dataset.shape in ("context", "completion", "instruction"):
        roles.append("free-text targets, not label-style")
    line = f"{dataset.path}: {shape_name(dataset.shape)} data ({'; '.join(roles)})"
    if dataset.field_map:
        line += "; field map " + ", ".join(f"{old}->{new}" for old, new in dataset.field_map.items())
    line += f"; {len(dataset.examples)} examples"
    if trained_tokens:
        mean = sum(trained_tokens) / len(trained_tokens)
        line += f", {mean:.1f} trained tokens each ({min(trained_tokens)}-{max(trained_tokens)})"
        dropped = len(dataset.examples) - len(trained_tokens) if dropped is None else dropped
        if dropped > 0:
            line += f", {dropped} dropped by --max-length (no target token left)"
    if dataset.ignored:
        line += f"; ignored fields: {', '.join(dataset.ignored)}"
    return line


def _text(record: dict[str, Any], key: str, where: str, allow_empty: bool = False) -> str:
    value = record.get(key)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and key in ("label", "answer"):
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
    """The example of one record; ``label``/``label_span`` hold the candidate label of shapes that may
    carry one (``mark_labels`` keeps them only when the whole file is label-style)."""
    if shape == "messages":
        return Example("", "", where, messages=_messages(record["messages"], where))
    if shape == "instruction":
        extra = _text(record, "input", where, allow_empty=True)
        fmt = ALPACA_WITH_INPUT if extra.strip() else ALPACA
        prompt = fmt.format(instruction=_text(record, "instruction", where), input=extra)
        output = _text(record, "output", where)
        if "answer" in record:  # LLM-Adapters: the output explains, the answer is the label
            answer = _text(record, "answer", where).strip()
            return Example(prompt, output, where, label=answer, label_span=_word_span(output, answer))
        return _with_label(Example(prompt, output, where))
    if shape in ("context", "completion"):
        first, second = SHAPES[shape]
        prompt = _text(record, first, where)
        return _with_label(Example(prompt, join_target(prompt, _text(record, second, where)), where))
    if shape == "label":
        label = _text(record, "label", where).strip()
        text = _text(record, "text", where)
        prompt = (template or DEFAULT_LABEL_PROMPT).format_map(_OnlyText(text=text))
        return _with_label(Example(prompt, join_target(prompt, label), where, text=text))
    return Example("", _text(record, "text", where), where)


class _OnlyText(dict):
    """Template fields other than {text} stay as written: FinLoRA's prompts hold literal braces
    ("choose an answer from {negative/neutral/positive}"), which str.format refused with a KeyError."""

    def __missing__(self, key: str) -> str:
        return "{" + key + "}"


def _with_label(example: Example) -> Example:
    """The whole target, stripped, as the candidate label."""
    label = example.target.strip()
    start = example.target.index(label)
    example.label, example.label_span = label, (start, start + len(label))
    return example


def _word_span(text: str, word: str) -> tuple[int, int] | None:
    """Where ``word`` stands last in ``text`` as a whole word (any case), or None.
    LLM-Adapters' outputs end with the answer: "the correct answer is true"."""
    found = list(re.finditer(rf"(?<!\w){re.escape(word)}(?!\w)", text, flags=re.IGNORECASE)) if word else []
    return found[-1].span() if found else None


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
