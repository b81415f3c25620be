"""Learning-rate schedules: linear warmup, then linear decay, cosine decay or constant.

Step k (1-based optimizer step) trains at lr * factor(k). Warmup reaches the peak at k = warmup; the
decay starts from the peak at the step after and ends one step before zero, so no step is spent at
lr = 0 (the common formula gives the first warmup step and the last step a learning rate of zero).

    >>> [round(lr_factor(k, warmup=2, total=6, kind="linear"), 2) for k in range(1, 7)]
    [0.5, 1.0, 1.0, 0.75, 0.5, 0.25]
"""

from __future__ import annotations

import math
from functools import partial

import torch


def lr_factor(k: int, *, warmup: int, total: int, kind: str) -> float:
    if warmup and k <= warmup:
        return k / warmup
    if kind == "constant":
        return 1.0
    progress = (k - warmup - 1) / max(1, total - warmup)  # 0 at the first decay step, < 1 at the last
    if kind == "linear":
        return 1.0 - progress
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"Unknown schedule {kind!r}; use linear, cosine or constant.")


def _factor_at(index: int, *, warmup: int, total: int, kind: str) -> float:
    return lr_factor(index + 1, warmup=warmup, total=total, kind=kind)  # LambdaLR counts from 0


def make_scheduler(optimizer: torch.optim.Optimizer, *, warmup: int, total: int, kind: str) -> torch.optim.lr_scheduler.LambdaLR:
    lr_factor(1, warmup=warmup, total=total, kind=kind)  # an unknown kind fails here, before training
    return torch.optim.lr_scheduler.LambdaLR(optimizer, partial(_factor_at, warmup=warmup, total=total, kind=kind))
