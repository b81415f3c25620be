"""Summed losses over the trained tokens of a micro-batch.

The loop divides by the number of trained tokens in the whole global batch (known before its first
micro-batch), so gradient accumulation gives the same gradient as one big batch; averaging per
micro-batch and then over micro-batches weights short examples wrongly.

For causal LMs only the hidden states at trained positions go through the output head. With prompt
masking that is a few tokens per example, and the head is the largest matmul of a small model
(SmolLM2: 49152 x 576): computing logits for every position would cost time and a [tokens, vocab]
activation for nothing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .batches import IGNORE

# Architectures whose logits are exactly head(last_hidden_state): no soft-capping or logit scaling
# after the head, so the selective path is exact. Others take the full-logits path.
PLAIN_HEAD_TYPES = frozenset({
    "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gpt2", "gpt_neox", "gptj",
    "phi", "phi3", "gemma", "olmo", "olmo2", "stablelm", "smollm3", "starcoder2", "bloom",
})


def selective_head(model: nn.Module) -> bool:
    """True when the loss may run the output head only at trained positions."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return model_type in PLAIN_HEAD_TYPES and head is not None and getattr(model, "base_model", model) is not model


def logits_at(model: nn.Module, batch: dict[str, Tensor], at: Tensor, selective: bool) -> Tensor:
    """Next-token logits at the positions where ``at`` ([B, T] bool) is True: (N, vocab), row-major."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if selective:
        hidden = model.base_model(**inputs).last_hidden_state  # (B, T, hidden)
        return model.get_output_embeddings()(hidden[at])  # the head runs at the selected positions only
    return model(**inputs).logits[at]


def target_token_losses(model: nn.Module, batch: dict[str, Tensor], selective: bool) -> tuple[Tensor, Tensor]:
    """(cross-entropy of each trained token, fp32 [N]; keep [B, T-1], where those tokens are)."""
    targets = batch["labels"][:, 1:]  # (B, T-1): token t+1 is predicted from position t
    keep = targets != IGNORE
    logits = logits_at(model, batch, F.pad(keep, (0, 1)), selective)  # (N, vocab)
    return F.cross_entropy(logits.float(), targets[keep], reduction="none"), keep


def causal_lm_loss_sum(model: nn.Module, batch: dict[str, Tensor], selective: bool) -> Tensor:
    """Sum of next-token cross-entropies over the trained (label != IGNORE) tokens."""
    return target_token_losses(model, batch, selective)[0].sum()


def classification_loss_sum(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, classes)
    return F.cross_entropy(logits.float(), batch["labels"], reduction="sum")


def loss_sum(model: nn.Module, batch: dict[str, Tensor], task: str, selective: bool) -> Tensor:
    if task == "classification":
        return classification_loss_sum(model, batch)
    return causal_lm_loss_sum(model, batch, selective)


def autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)
