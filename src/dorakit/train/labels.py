"""Label-style targets: which data carries labels, how they are distributed, and class-balanced order.

A file is label-style when its targets are a few short values that recur (FinLoRA's "positive" /
"negative" / "neutral", LLM-Adapters' ``answer`` field, or any text/label file). Evaluation then
reports label accuracy by ranking the trained labels (evaluate.py), and training prints the label
distribution and can sample the labels evenly (issue 21: a training split that is 5% negative trained
a model that never said "negative", and nothing told the user).
"""

from __future__ import annotations

from collections import Counter
from functools import lru_cache
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .data import Example

MAX_LABELS = 50  # more distinct targets than this are free text, not classes
MAX_LABEL_CHARS = 40
MAX_LABEL_WORDS = 4
IMBALANCE_RATIO = 5.0  # most frequent / least frequent label at which training warns


def looks_like_labels(values: list[str]) -> bool:
    """Few, short values, each seen twice on average: classes rather than free-text answers."""
    distinct = set(values)
    return (0 < len(distinct) <= MAX_LABELS and len(values) >= 2 * len(distinct)
            and all(v and len(v) <= MAX_LABEL_CHARS and len(v.split()) <= MAX_LABEL_WORDS for v in distinct))


def mark_labels(examples: list[Example], shape: str, labels: list[str] | None = None) -> bool:
    """Keep the candidate labels ``data._format`` set when the file is label-style, else clear them.

    Args:
        labels: a trained run's label set: the file is read as label-style whatever its own values
            suggest (a small evaluation file may hold each label once).
    Returns:
        Whether the examples carry labels.
    """
    if shape == "label":
        return True
    candidates = [e.label for e in examples]
    keep = shape not in ("messages", "text") and all(c is not None for c in candidates) and (
        labels is not None or looks_like_labels(candidates))
    if not keep:
        for e in examples:
            e.label, e.label_span = None, None
    return keep


def distribution(labels: list[str]) -> dict[str, int]:
    """Count per label, most frequent first (ties by name)."""
    return dict(sorted(Counter(labels).items(), key=lambda kv: (-kv[1], kv[0])))


def distribution_line(counts: dict[str, int]) -> str:
    total = sum(counts.values())
    return ", ".join(f"{name} {n} ({n / total:.1%})" for name, n in counts.items())


def imbalance_warning(counts: dict[str, int]) -> str | None:
    """One line when the most frequent label outnumbers the least by IMBALANCE_RATIO or more."""
    if len(counts) < 2:
        return None
    (top, most), (low, least) = next(iter(counts.items())), list(counts.items())[-1]
    if most < IMBALANCE_RATIO * least:
        return None
    return (f"strong label imbalance: {top!r} has {most / least:.1f}x the examples of {low!r} "
            f"({least} of {sum(counts.values())}); a model trained on it may never answer {low!r}. "
            "--balance-labels samples every label equally often.")


@lru_cache(maxsize=64)  # one permutation per label and epoch; a step reads at most two epochs of each
def _order(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch + 1)
    return tuple(torch.randperm(n, generator=gen).tolist())


def balanced_indices(item_labels: list[str], seed: int, start: int, count: int) -> list[int]:
    """Items ``start .. start+count`` of an endless class-balanced stream over the items.

    Draw k belongs to round k // L (L labels); each round takes every label once, in a seeded order,
    and a label's r-th draw is item r of its own stream of seeded per-epoch permutations. A pure
    function of (labels, seed, position), like ``batches.stream_indices``: a resumed run continues
    exactly (tests/test_train_resume.py)."""
    names = sorted(set(item_labels))
    members = {name: [i for i, label in enumerate(item_labels) if label == name] for name in names}
    out = []
    for k in range(start, start + count):
        round_, slot = divmod(k, len(names))
        label_index = _order(len(names), seed, round_)[slot]
        pool = members[names[label_index]]
        # seed + label index + 1: each label's stream differs from the others' and from the label order's
        out.append(pool[_order(len(pool), seed * 131 + label_index + 1, round_ // len(pool))[round_ % len(pool)]])
    return out
