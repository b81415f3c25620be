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


def selective_head(model: nn.Module) -> bool:
    """True when the loss may run the output head only at trained positions: the head is a Linear
    (or an adapter over one) applied once, to the base model's last hidden state, and the model
    returns its output unchanged (no soft-capping, scaling or bias after it, as Gemma-2, Cohere and
    Granite apply). Decided by what the model does, checked in one tiny forward pass, not by its name
    (issue 21: a list of architecture names missed Gemma-3 and ran its 262k-wide head everywhere)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    base = getattr(model, "base_model", model)
    linear = getattr(head, "base_layer", head)  # an adapted head computes position by position too
    if not isinstance(linear, nn.Linear) or base is model or not isinstance(base, nn.Module):
        return False
    try:
        return _head_ends_the_model(model, base, head)
    except Exception:  # a model this forward cannot drive (extra inputs needed): the full-logits path is always right
        return False


def _head_ends_the_model(model: nn.Module, base: nn.Module, head: nn.Module) -> bool:
    """One forward of three tokens with the head's output replaced by a probe tensor of large, varied
    values: the model must return exactly the probe (soft-capping tanh(x/c)*c, scaling or any later op
    changes it), and the head must have read what ``base`` returns as ``last_hidden_state`` (a second
    forward, as the selective path runs it: some models call a sub-module of ``base`` directly)."""
    seen: dict = {"calls": 0}

    def before_head(module, args):
        seen["calls"] += 1
        seen["input"] = args[0] if args else None

    def replace_output(module, args, output):
        n = output.numel()
        values = ((torch.arange(n, device=output.device) * 7919) % 101 - 50) * 0.73  # in [-36.5, 36.5], varied
        seen["probe"] = values.reshape(output.shape).to(output.dtype)
        return seen["probe"]

    weight = model.get_input_embeddings().weight
    inputs = {"input_ids": torch.arange(1, 4, device=weight.device).unsqueeze(0) % weight.shape[0]}  # (1, 3)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    hooks = [head.register_forward_pre_hook(before_head), head.register_forward_hook(replace_output)]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            logits = model(**inputs).logits
            for hook in hooks:
                hook.remove()
            hidden = base(**inputs).last_hidden_state
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    read, probe = seen.get("input"), seen.get("probe")
    return (seen["calls"] == 1 and isinstance(read, Tensor) and read.shape == hidden.shape
            and torch.allclose(read, hidden, rtol=1e-4, atol=1e-6)
            and logits.shape == probe.shape and torch.equal(logits, probe.to(logits.dtype)))


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
