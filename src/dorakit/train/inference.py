"""Using a trained adapter: evaluate it on a data file (``dorakit eval``) or generate (``dorakit generate``)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch

from ..integrations.transformers import DTypeName, default_device, place
from ..formats.peft import load_adapter, read_adapter_config
from ..integrations.bitsandbytes import Quantization
from .batches import encode_all
from .data import load_dataset
from .evaluate import EvalSetup, evaluate_loss, generation_accuracy, rank_accuracy
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


def evaluate_file(model_dir: str | Path, data: str | Path, adapter: str | Path | None = None, *,
                  accuracy: AccuracyMode = "rank", loss: bool = True, max_examples: int | None = None, batch_size: int = 16,
                  max_length: int = 512, prompt_template: str | None = None, field_map: dict[str, str] | None = None,
                  dtype: DTypeName = "auto", max_new_tokens: int = 8, quantization: Quantization | None = None) -> dict:
    """Loss/perplexity on ``data`` (unless ``loss`` is False), and label accuracy when it has labels."""
    dataset = load_dataset(data, field_map, prompt_template)
    if max_examples is not None:
        dataset.examples = dataset.examples[:max_examples]
    labels = dataset.labels
    model, tokenizer, task, device = load_with_adapter(model_dir, adapter, dtype, labels, quantization)
    setup = EvalSetup(model, tokenizer, task, device, pick_autocast("auto", device), batch_size, max_length)
    label_ids = {n: i for i, n in enumerate(labels)} if task == "classification" else None
    result: dict = {"examples": len(dataset.examples)}
    if loss:
        result.update(evaluate_loss(setup, encode_all(dataset, tokenizer, max_length, label_ids)))
    if labels and accuracy in ("rank", "both"):
        result["rank_accuracy"] = rank_accuracy(setup, dataset.examples, labels)["accuracy"]
    if labels and accuracy in ("generate", "both") and task != "classification":
        found = generation_accuracy(setup, dataset.examples, labels, max_new_tokens)
        result["generate_accuracy"], result["unparsed"] = found["accuracy"], found["unparsed"]
    if labels:
        majority = max(sum(e.label == n for e in dataset.examples) for n in labels)
        result["majority_baseline"] = majority / len(dataset.examples)
    return result


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
