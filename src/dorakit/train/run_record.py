"""The run record: what evaluating an adapter needs to know about the run that trained it (issue 21).

``dorakit train`` writes ``dorakit_run.json`` beside ``adapter_config.json``. PEFT reads only its own
two files, so the directory stays a plain PEFT adapter; ``dorakit eval`` reads the record and evaluates
the way the run trained: the same prompt template, field map and length limit, and label accuracy over
the trained labels only. Options given on the command line still win, with one line saying that they
differ from the run's.

    {"format": 1, "task": "causal-lm", "base_model": "models/smollm2", "data": "train.jsonl",
     "shape": "context", "field_map": {}, "prompt_template": null, "max_length": 512,
     "labels": ["negative", "neutral", "positive"], "label_counts": {"neutral": 140, ...}}
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from .. import atomic
from .data import shape_name

RECORD_NAME = "dorakit_run.json"
FORMAT = 1


@dataclass
class RunRecord:
    task: str  # "causal-lm" or "classification"
    shape: str  # the training data's shape (data.SHAPES)
    max_length: int
    field_map: dict[str, str] = field(default_factory=dict)
    prompt_template: str | None = None  # text/label data's prompt, the default written out; None for other shapes
    labels: list[str] | None = None  # label-style data: the trained labels (a classifier's in head order)
    label_counts: dict[str, int] | None = None  # training examples per label
    base_model: str | None = None
    data: str | None = None


def write_record(directory: str | Path, record: RunRecord) -> Path:
    """``directory``/dorakit_run.json, written whole (atomic.write_text)."""
    path = Path(directory) / RECORD_NAME
    atomic.write_text(path, json.dumps({"format": FORMAT, **dataclasses.asdict(record)}, indent=2) + "\n")
    return path


def read_record(directory: str | Path | None) -> RunRecord | None:
    """The record of an adapter (or full fine-tuning output) directory; None when it has none (an
    adapter written by PEFT, or by dorakit before records existed).

    Raises:
        ValueError: a record that is not valid JSON or is of an unknown format (naming the file).
    """
    if directory is None:
        return None
    path = Path(directory) / RECORD_NAME
    if not path.is_file():
        return None
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
        if content.pop("format", None) != FORMAT:
            raise ValueError("unknown format")
        return RunRecord(**content)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{path} is not a run record this dorakit reads ({err}); delete it to evaluate without "
                         "it (then pass --prompt-template and --field-map as the run used them).") from None


@dataclass
class EvalOptions:
    """The data options ``dorakit eval`` uses, and one line per difference from the run's."""

    prompt_template: str | None
    field_map: dict[str, str]
    map_from_run: bool  # the field map is the run's: entries naming no field of the file are skipped
    max_length: int
    labels: list[str] | None  # the trained labels, when the run recorded them
    notes: list[str]


def eval_options(record: RunRecord | None, adapter, prompt_template: str | None, field_map: dict[str, str] | None,
                 max_length: int | None, default_template: str | None = None) -> EvalOptions:
    """Options given (not None) win; unset ones come from the run's record, then ``default_template``
    (the embedded data's prompt) and the defaults."""
    if record is None:
        notes = [] if adapter is None else [
            f"{adapter} has no run record ({RECORD_NAME}: PEFT's adapters and older runs have none); the prompt "
            "template, field map and labels come from this command and the data file."]
        return EvalOptions(prompt_template or default_template, dict(field_map or {}), False, max_length or 512,
                           None, notes)
    notes = []
    given = {"prompt-template": prompt_template, "field-map": field_map, "max-length": max_length}
    recorded = {"prompt-template": record.prompt_template, "field-map": record.field_map, "max-length": record.max_length}
    for flag, value in given.items():
        if value is not None and recorded[flag] is not None and value != recorded[flag]:
            notes.append(f"--{flag} {value!r} differs from the run's {recorded[flag]!r}; evaluating with the one given.")
    return EvalOptions(
        prompt_template if prompt_template is not None else record.prompt_template or default_template,
        dict(field_map) if field_map is not None else dict(record.field_map), field_map is None,
        max_length if max_length is not None else record.max_length, record.labels, notes)


def shape_note(record: RunRecord | None, shape: str) -> str | None:
    if record is None or record.shape == shape:
        return None
    return (f"this file is {shape_name(shape)} data, but the run trained on {shape_name(record.shape)} data; "
            "the numbers may not measure what it learned.")


def unseen_note(unseen: dict[str, int], labels: list[str]) -> str | None:
    """One line for evaluation examples whose label the run never trained."""
    if not unseen:
        return None
    listed = ", ".join(f"{name!r} ({n})" for name, n in sorted(unseen.items()))
    return (f"{sum(unseen.values())} example(s) hold labels the run never saw: {listed}; the accuracy leaves them "
            f"out and ranks only the trained labels ({', '.join(labels)}).")
