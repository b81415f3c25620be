"""Using a trained adapter: evaluate it on a data file (``dorakit eval``) or generate (``dorakit generate``)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch

from ..integrations.transformers import DTypeName, default_device, place
from ..formats.peft import load_adapter, read_adapter_config
from ..integrations.bitsandbytes import Quantization
from .batches import encode_all
from .data import Dataset, describe, load_dataset, shape_name
from .evaluate import EvalSetup, answerable, evaluate_loss, generation_accuracy, rank_accuracy
from .run_record import eval_options, read_record, shape_note, unseen_note
from .model import check_model_dir, load_model, pick_autocast, resolve_task

AccuracyMode = Literal["rank", "generate", "both", "none"]


def load_with_adapter(model_dir: str | Path, adapter: str | Path | None, dtype: DTypeName = "auto",
                      labels: list[str] | None = None, quantization: Quantization | None = None):
    """(model, tokenizer, task, device): the base model for its task (quantized if asked: an adapter
    trained over a quantized base is evaluated over the same), with the adapter loaded if given."""
    path = check_model_dir(model_dir)
    task = resolve_task(path, "auto")
    if adapter is not None and read_adapter_config(adapter).task_type == "SEQ_CLS":
        task = "classification"
    model, tokenizer = load_model(path, task, dtype, labels, quantization)
    if adapter is not None:
        load_adapter(model, adapter)
    device = default_device()
    return place(model, device).eval(), tokenizer, task, device


def say(line: str) -> None:
    """Progress lines go to stderr: stdout carries the metrics (JSON)."""
    print(line, file=sys.stderr, flush=True)


def evaluate_file(model_dir: str | Path, data: str | Path, adapter: str | Path | None = None, *,
                  accuracy: AccuracyMode = "rank", loss: bool = True, max_examples: int | None = None, batch_size: int = 16,
                  max_length: int | None = None, prompt_template: str | None = None, field_map: dict[str, str] | None = None,
                  dtype: DTypeName = "auto", max_new_tokens: int | None = None, quantization: Quantization | None = None,
                  default_template: str | None = None, log: Callable[[str], None] | None = say) -> dict:
    """Loss/perplexity on ``data`` (unless ``loss`` is False), and label accuracy when it has labels.

    The run's record beside the adapter (or a fully fine-tuned model) supplies what is not given: the
    prompt template, field map, max length, and the trained labels, the only candidates ranked.

    Args:
        max_length / prompt_template / field_map: None: the run's (else 512 / ``default_template`` / none).
        max_new_tokens: for generated answers; None: the longest target's tokens + 2.
        default_template: the prompt of text/label data when neither the call nor a record gives one.
        log: receives, before any evaluation, how the data was read and where this evaluation differs
            from the run (the latter also returned under "notes"); None: silent.
    Returns:
        examples, shape, loss, perplexity, rank_accuracy / generate_accuracy (with unparsed and the
        accuracy per true label),
        majority_baseline, labels (the candidates), scored_examples, and notes when there are any.
    """
    record = read_record(adapter if adapter is not None else model_dir)
    options = eval_options(record, adapter, prompt_template, field_map, max_length, default_template)
    dataset = load_dataset(data, options.field_map, options.prompt_template, options.labels, options.map_from_run)
    if max_examples is not None:
        dataset.examples = dataset.examples[:max_examples]
    labels = options.labels or dataset.labels
    model, tokenizer, task, device = load_with_adapter(model_dir, adapter, dtype, labels, quantization)
    setup = EvalSetup(model, tokenizer, task, device, pick_autocast("auto", device), batch_size, options.max_length)
    scored, unseen = answerable(dataset.examples, labels) if dataset.labels else ([], {})
    if task == "classification":  # the head has a class for the trained labels only
        label_ids = {n: i for i, n in enumerate(labels)}
        items = encode_all(Dataset(scored, dataset.shape, dataset.path), tokenizer, options.max_length, label_ids)
    else:
        items = encode_all(dataset, tokenizer, options.max_length)
    notes = _notes(options.notes, record, dataset, labels, unseen, accuracy, task)
    if log is not None:
        dropped = (len(scored) if task == "classification" else len(dataset.examples)) - len(items)
        log(f"dorakit eval: data {describe(dataset, [x.target_tokens for x in items], dropped)}")
        for note in notes:
            log(f"dorakit eval: note: {note}")
    result: dict = {"examples": len(dataset.examples), "shape": dataset.shape}
    if loss:
        result.update(evaluate_loss(setup, items))
    if dataset.labels and accuracy in ("rank", "both"):
        ranked = rank_accuracy(setup, dataset.examples, labels)
        result["rank_accuracy"], result["rank_accuracy_per_label"] = ranked["accuracy"], ranked["per_label"]
    if dataset.labels and accuracy in ("generate", "both") and task != "classification":
        found = generation_accuracy(setup, dataset.examples, labels, max_new_tokens)
        result["generate_accuracy"], result["unparsed"] = found["accuracy"], found["unparsed"]
        result["generate_accuracy_per_label"] = found["per_label"]
    if scored:
        result["majority_baseline"] = max(sum(e.label == n for e in scored) for n in labels) / len(scored)
        result.update(labels=labels, scored_examples=len(scored))
    if notes:
        result["notes"] = notes
    return result


def _notes(notes: list[str], record, dataset: Dataset, labels: list[str], unseen: dict, accuracy: str, task: str) -> list[str]:
    """One line for each way this evaluation differs from what the run trained, or cannot measure it."""
    notes = notes + [n for n in (shape_note(record, dataset.shape), unseen_note(unseen, labels)) if n]
    if not dataset.labels and accuracy != "none":
        notes.append(f"no label accuracy: {dataset.path} is {shape_name(dataset.shape)} data without label-style "
                     "targets (a few short values that recur); loss and perplexity only.")
    unplaced = sum(e.label_span is None for e in dataset.examples if e.label in labels) if task != "classification" else 0
    if unplaced and accuracy in ("rank", "both"):
        notes.append(f"{unplaced} example(s) left out of rank_accuracy: their output does not contain their answer, "
                     "so no candidate label can take its place (--accuracy generate scores them).")
    return notes


@torch.no_grad()
def generate(model_dir: str | Path, prompt: str, adapter: str | Path | None = None, *, max_new_tokens: int = 128,
             temperature: float = 0.0, chat: Literal["auto", "on", "off"] = "auto", seed: int = 0,
             dtype: DTypeName = "auto", quantization: Quantization | None = None) -> str:
    """The model's continuation of ``prompt`` (greedy when temperature is 0). With a chat template and
    chat auto/on, the prompt is sent as one user turn."""
    model, tokenizer, task, device = load_with_adapter(model_dir, adapter, dtype, quantization=quantization)
    if task != "causal-lm":
        raise ValueError("generate needs a causal language model; this one is a classifier.")
    use_chat = chat == "on" or (chat == "auto" and getattr(tokenizer, "chat_template", None))
    if chat == "on" and not getattr(tokenizer, "chat_template", None):
        raise ValueError("--chat on: this tokenizer has no chat template; use --chat off.")
    if use_chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")
    else:
        ids = tokenizer(prompt, return_tensors="pt")
    torch.manual_seed(seed)
    sample = temperature > 0
    out = model.generate(**{k: v.to(device) for k, v in ids.items()}, max_new_tokens=max_new_tokens,
                         do_sample=sample, temperature=temperature if sample else None,
                         top_p=None, top_k=None, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
