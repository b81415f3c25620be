"""The one mapping between dorakit's state-dict keys and PEFT's adapter-file keys.

dorakit's parameter names are PEFT's (``lora_A.weight``, ``lora_B.weight``,
``lora_magnitude_vector``, ``lora_embedding_A``/``_B``), so a file key is a model key with PEFT's
prefix ``base_model.model.`` in front, and nothing else changes.
"""

from __future__ import annotations

from torch import Tensor, nn

PEFT_PREFIX = "base_model.model."

# Last path components that belong to an adapter (everything else is the frozen base).
ADAPTER_PARTS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")


def is_adapter_key(key: str) -> bool:
    parts = key.split(".")
    return any(part in ADAPTER_PARTS for part in parts) or "modules_to_save" in parts


def adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The adapter's tensors (and ``modules_to_save`` copies) keyed as in ``model.state_dict()``."""
    return {k: v for k, v in model.state_dict().items() if is_adapter_key(k)}


def to_peft_key(key: str) -> str:
    return PEFT_PREFIX + key


def from_peft_key(key: str) -> str:
    if not key.startswith(PEFT_PREFIX):
        raise ValueError(f"Adapter key {key!r} lacks PEFT's prefix {PEFT_PREFIX!r}.")
    return key[len(PEFT_PREFIX) :]
