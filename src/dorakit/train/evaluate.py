"""Evaluation: loss and perplexity, and accuracy for label-style targets.

Two accuracies, as label-style benchmarks report them:
- ranking: every candidate label is scored by its summed log-likelihood after the prompt and the best
  one is the answer (no parsing; what lm-eval-harness does for multiple choice). A candidate takes the
  label's place in the example's target (LLM-Adapters: "the correct answer is {label}"). When each
  candidate is one distinct token, one forward pass of the prompt scores them all.
- generation: greedy decoding, then the answer is the candidate named earliest in the output (word
  match, any case); an output naming none counts as wrong and is counted as unparsed.

The candidates are the labels the run trained (issue 21: taken from the evaluated file, one stray label
turned a 2-way choice into a 4-way one). Examples whose label is not a candidate cannot be answered
right; they are left out of the accuracy and counted.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn

from .batches import IGNORE, Encoded, collate, encode, token_ids
from .data import Example
from .loss import autocast, logits_at, loss_sum, selective_head, target_token_losses


@dataclass
class EvalSetup:
    model: nn.Module
    tokenizer: object
    task: str
    device: torch.device
    autocast: torch.dtype | None = None
    batch_size: int = 16
    max_length: int = 512
    selective: bool | None = None  # the output head may run at scored positions only; None: checked once here

    def __post_init__(self) -> None:
        # Checked once per setup: a setup's model keeps its structure (adapters are injected before).
        if self.selective is None:
            self.selective = self.task != "classification" and selective_head(self.model)

    def batch(self, items: list[Encoded]) -> dict[str, torch.Tensor]:
        return collate(items, self.tokenizer.pad_token_id, self.device)


def _chunks(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


@torch.no_grad()
def evaluate_loss(setup: EvalSetup, items: list[Encoded]) -> dict[str, float]:
    """Mean loss per trained token (per example for classification) and its perplexity."""
    was_training = setup.model.training
    setup.model.eval()
    total, count = 0.0, 0
    for chunk in _chunks(items, setup.batch_size):
        batch = setup.batch(chunk)
        with autocast(setup.device, setup.autocast):
            total += loss_sum(setup.model, batch, setup.task, setup.selective).item()
        count += sum(x.target_tokens for x in chunk)
    setup.model.train(was_training)
    loss = total / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0))}


def answerable(examples: list[Example], labels: list[str]) -> tuple[list[Example], dict[str, int]]:
    """(examples whose label is a candidate, {label: count} of the others)."""
    unseen = Counter(e.label for e in examples if e.label not in labels)
    return [e for e in examples if e.label in labels], dict(unseen)


def _result(answers: list[str | None], scored: list[Example], unseen: dict[str, int], **extra) -> dict:
    """Accuracy of ``answers`` (one per scored example), overall and per true label (a model that never
    answers a rare label shows it there)."""
    per_label = {}
    for label in sorted({e.label for e in scored}):
        rows = [a == e.label for a, e in zip(answers, scored) if e.label == label]
        per_label[label] = sum(rows) / len(rows)
    accuracy = sum(a == e.label for a, e in zip(answers, scored)) / len(scored) if scored else None
    return {"accuracy": accuracy, "per_label": per_label, "examples": len(scored), "unseen": unseen, **extra}


@torch.no_grad()
def rank_accuracy(setup: EvalSetup, examples: list[Example], labels: list[str]) -> dict:
    """Accuracy of picking the most likely of ``labels`` (see the module docstring).

    Returns:
        accuracy (None when no example has a candidate label), examples (those scored), unseen
        ({label: examples} left out: labels not among the candidates) and unplaced (examples left out
        because their output does not contain their answer, so no candidate can take its place).
    """
    model, tok = setup.model, setup.tokenizer
    scored, unseen = answerable(examples, labels)
    if not scored:
        return _result([], scored, unseen)
    was_training = model.training
    model.eval()
    if setup.task == "classification":
        label_ids = {name: i for i, name in enumerate(labels)}
        items = [encode(e, tok, setup.max_length, label_ids) for e in scored]
        answers = []
        for chunk in _chunks(items, setup.batch_size):
            batch = setup.batch(chunk)
            with autocast(setup.device, setup.autocast):
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            answers += [labels[i] for i in logits.argmax(-1).tolist()]
        model.train(was_training)
        return _result(answers, scored, unseen)
    unplaced = sum(e.label_span is None for e in scored)
    scored = [e for e in scored if e.label_span is not None]
    answers = []
    for chunk in _chunks(scored, setup.batch_size):
        prompts = [token_ids(tok, e.prompt) for e in chunk]
        # targets[i][j]: tokens of example i's target with label j in place of its own
        targets = [[token_ids(tok, e.target_for(label), False) for label in labels] for e in chunk]
        if all(len(t) == 1 for row in targets for t in row):
            scores = _next_token_scores(setup, prompts, targets, setup.selective)
        else:
            scores = torch.stack([_sequence_scores(setup, prompts, [row[j] for row in targets], setup.selective)
                                  for j in range(len(labels))], 1)
        picked = scores.argmax(1).tolist()  # (examples,) index of the most likely label
        answers += [labels[p] for p in picked]
    model.train(was_training)
    return _result(answers, scored, unseen, unplaced=unplaced)


def _next_token_scores(setup: EvalSetup, prompts: list[list[int]], targets: list[list[list[int]]],
                       selective: bool) -> torch.Tensor:
    """Single-token labels: one forward of the prompts scores every label. Returns (examples, labels)."""
    batch = setup.batch([Encoded(p, p) for p in prompts])
    at = torch.zeros_like(batch["attention_mask"], dtype=torch.bool)  # (B, T): each prompt's last position
    at[torch.arange(len(prompts)), torch.tensor([len(p) - 1 for p in prompts])] = True
    with autocast(setup.device, setup.autocast):
        logits = logits_at(setup.model, batch, at, selective)  # (B, vocab)
    ids = torch.tensor([[t[0] for t in row] for row in targets], device=logits.device)  # (B, labels)
    return torch.log_softmax(logits.float(), -1).gather(1, ids).cpu()


def _sequence_scores(setup: EvalSetup, prompts: list[list[int]], targets: list[list[int]], selective: bool) -> torch.Tensor:
    """Summed log-probability of each prompt's target tokens: one batched forward. Returns (examples,)."""
    batch = setup.batch([Encoded(p + t, [IGNORE] * len(p) + t) for p, t in zip(prompts, targets)])
    with autocast(setup.device, setup.autocast):
        losses, keep = target_token_losses(setup.model, batch, selective)  # (N,), (B, T-1)
    rows = keep.nonzero()[:, 0]  # the example of each target token
    return torch.zeros(len(prompts), device=losses.device).index_add_(0, rows, -losses).cpu()


def extract_answer(text: str, labels: list[str]) -> str | None:
    """The candidate label named earliest in ``text`` (whole word, any case), or None."""
    best, where = None, len(text) + 1
    for label in labels:
        match = re.search(rf"(?<!\w){re.escape(label)}(?!\w)", text, flags=re.IGNORECASE)
        if match and match.start() < where:
            best, where = label, match.start()
    return best


@torch.no_grad()
def generation_accuracy(setup: EvalSetup, examples: list[Example], labels: list[str],
                        max_new_tokens: int | None = None) -> dict:
    """Greedy-decode an answer for each prompt and extract the label it names (candidates and left-out
    examples as in ``rank_accuracy``). ``max_new_tokens`` unset: the longest target's tokens + 2."""
    model, tok = setup.model, setup.tokenizer
    examples, unseen = answerable(examples, labels)
    if not examples:
        return {**_result([], examples, unseen), "unparsed": 0}
    if max_new_tokens is None:
        max_new_tokens = max(len(token_ids(tok, e.target, False)) for e in examples) + 2
    was_training = model.training
    model.eval()
    answers = []
    for chunk in _chunks(examples, setup.batch_size):
        # Left padding, so every prompt ends where generation starts.
        prompts = [token_ids(tok, e.prompt) for e in chunk]
        width = max(map(len, prompts))
        ids = torch.full((len(chunk), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, p in enumerate(prompts):
            ids[row, width - len(p):] = torch.tensor(p)
            mask[row, width - len(p):] = 1
        with autocast(setup.device, setup.autocast):
            out = model.generate(input_ids=ids.to(setup.device), attention_mask=mask.to(setup.device),
                                 max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        for row, example in enumerate(chunk):
            answers.append(extract_answer(tok.decode(out[row, width:], skip_special_tokens=True), labels))
    model.train(was_training)
    return _result(answers, examples, unseen, unparsed=sum(a is None for a in answers))
