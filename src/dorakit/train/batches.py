"""Examples -> token ids with the prompt masked out of the loss; the seeded split, order and batches.

The order is a stream of per-epoch permutations fixed by the seed, so the data position of a run is one
integer (examples consumed) and a resumed run reads exactly the batches the interrupted one would have.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property, lru_cache

import torch
from torch import Tensor

from .data import Dataset, Example

IGNORE = -100  # label value the loss skips (PyTorch's and transformers' convention)


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]  # causal LM: IGNORE where not trained; classification: unused
    class_id: int | None = None
    label: str | None = None  # the example's label, for label-style data (class-balanced sampling)

    @cached_property
    def target_tokens(self) -> int:
        """Tokens the loss counts: a label at position 0 has nothing before it to predict it from."""
        if self.class_id is not None:
            return 1
        return sum(1 for t in self.labels[1:] if t != IGNORE)


def token_ids(tokenizer, text: str, special: bool = True) -> list[int]:
    """Token ids of ``text``, with the tokenizer's special tokens (BOS) when ``special``."""
    return tokenizer(text, add_special_tokens=special)["input_ids"]


def _chat_segments(tokenizer, messages: list[dict[str, str]], where: str) -> list[tuple[str, bool]]:
    """The rendered conversation cut into (text, trained) pieces: every assistant turn is trained.

    Each assistant turn's span is found by rendering the conversation up to it with and without the
    turn; a template whose shorter renderings are not prefixes of the longer ones cannot be split."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{where}: chat 'messages' data needs a tokenizer with a chat template; this one has none.")

    def render(turns, generation_prompt=False):
        return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=generation_prompt)

    pieces, done = [], ""
    for index, turn in enumerate(messages):
        if turn["role"] != "assistant":
            continue
        before = render(messages[:index], True) if index else ""  # the prompt this turn answers
        after = render(messages[: index + 1])
        if not before.startswith(done) or not after.startswith(before):
            raise ValueError(f"{where}: the tokenizer's chat template does not render this conversation "
                             "incrementally, so its assistant turns cannot be located.")
        pieces += [(before[len(done):], False), (after[len(before):], True)]
        done = after
    rest = render(messages)[len(done):]
    return pieces + [(rest, False)]


def encode(example: Example, tokenizer, max_length: int, label_ids: dict[str, int] | None = None) -> Encoded | None:
    """Token ids and labels for one example; None when truncation leaves nothing to learn.

    ``label_ids`` given: classification (the raw text, and the label's class id)."""
    if label_ids is not None:
        return Encoded(token_ids(tokenizer, example.text or example.prompt)[:max_length], [],
                       class_id=label_ids[example.label], label=example.label)
    if example.messages is not None:
        ids, labels = [], []
        for text, trained in _chat_segments(tokenizer, example.messages, example.source):
            piece = token_ids(tokenizer, text, False)
            ids += piece
            labels += piece if trained else [IGNORE] * len(piece)
    else:
        prompt = token_ids(tokenizer, example.prompt) if example.prompt else []
        target = token_ids(tokenizer, example.target, not example.prompt)
        if tokenizer.eos_token_id is not None and example.prompt:
            target = target + [tokenizer.eos_token_id]  # learn to stop after the answer
        ids, labels = prompt + target, [IGNORE] * len(prompt) + target
    item = Encoded(ids[:max_length], labels[:max_length], label=example.label)
    return item if item.target_tokens else None


def encode_all(dataset: Dataset, tokenizer, max_length: int,
               label_ids: dict[str, int] | None = None) -> list[Encoded]:
    """Encode every example; the dropped ones (nothing left to learn after truncation) are counted.

    Raises:
        ValueError: every example was dropped.
    """
    encoded = [encode(e, tokenizer, max_length, label_ids) for e in dataset.examples]
    kept = [e for e in encoded if e is not None]
    if not kept:
        raise ValueError(f"{dataset.path}: no example has a target token within --max-length {max_length} "
                         f"(all {len(encoded)} were dropped); raise --max-length or shorten the prompts.")
    return kept


def split(items: list, fraction: float, seed: int, max_val: int) -> tuple[list, list]:
    """(train, validation): a seeded random ``fraction`` (at most ``max_val``) held out."""
    if fraction <= 0 or len(items) < 2:
        return items, []
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).tolist()
    count = min(max_val, max(1, round(len(items) * fraction)), len(items) - 1)
    held = set(order[:count])
    return [x for i, x in enumerate(items) if i not in held], [items[i] for i in order[:count]]


@lru_cache(maxsize=2)  # a step reads at most two epochs; the loop asks for the same ones step after step
def _epoch_order(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch + 1)
    return tuple(torch.randperm(n, generator=gen).tolist())


def stream_indices(n: int, seed: int, start: int, count: int) -> list[int]:
    """Items ``start .. start+count`` of the endless stream of seeded per-epoch permutations of range(n)."""
    return [_epoch_order(n, seed, k // n)[k % n] for k in range(start, start + count)]


def training_order(items: list[Encoded], seed: int, start: int, count: int, balance: bool = False) -> list[int]:
    """The item indices of training positions ``start .. start+count``: the seeded stream, or with
    ``balance`` the class-balanced one (labels.balanced_indices). Both are pure functions of the
    position, so resuming from a checkpoint's position continues the same order."""
    if balance:
        from .labels import balanced_indices

        return balanced_indices([x.label for x in items], seed, start, count)
    return stream_indices(len(items), seed, start, count)


def collate(items: list[Encoded], pad_id: int, device: torch.device | None = None) -> dict[str, Tensor]:
    """Right-padded batch: input_ids, attention_mask and labels (causal LM) or class labels, on ``device``."""
    width = max(len(x.input_ids) for x in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)  # (batch, width)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE, dtype=torch.long)
    for row, item in enumerate(items):
        n = len(item.input_ids)
        ids[row, :n] = torch.tensor(item.input_ids)
        mask[row, :n] = 1
        if item.class_id is None:
            labels[row, :n] = torch.tensor(item.labels)
    batch = {"input_ids": ids, "attention_mask": mask}
    if items[0].class_id is not None:
        batch["labels"] = torch.tensor([x.class_id for x in items])
    else:
        batch["labels"] = labels
    return batch if device is None else {k: v.to(device) for k, v in batch.items()}
