"""The one mapping between dorakit's state-dict keys and PEFT's adapter-file keys.

dorakit's parameter names are PEFT's (``lora_A.weight``, ``lora_B.weight``,
``lora_magnitude_vector``, ``lora_embedding_A``/``_B``), so for adapter tensors a file key is the
model key with PEFT's prefix ``base_model.model.`` in front. The one other difference: PEFT stores
a ``modules_to_save`` copy under the original module's path (``head.weight``), where dorakit's
model holds it as ``head.modules_to_save.weight`` beside the frozen ``head.original_module``.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..layers.experts import ParameterAdapter, describe_expert_mismatch

PEFT_PREFIX = "base_model.model."
COPY_PART = "modules_to_save"  # ModulesToSave's trainable copy

# Path components that belong to an adapter (everything else is the frozen base).
ADAPTER_PARTS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector",
                 "vera_lambda_b", "vera_lambda_d")

# VeRA's shared projections are one pair per model, stored (when ``save_projection``) under these
# file keys, outside the per-module keys; the model holds them in every layer's ``vera_projection``.
PROJECTION_KEYS = {"vera_A": "base_model.vera_A", "vera_B": "base_model.vera_B"}


def is_adapter_key(key: str) -> bool:
    parts = key.split(".")
    return any(part in ADAPTER_PARTS for part in parts) or COPY_PART in parts


def adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The adapter's tensors (and ``modules_to_save`` copies) keyed as in ``model.state_dict()``."""
    return {k: v for k, v in model.state_dict().items() if is_adapter_key(k)}


def to_peft_key(key: str) -> str:
    """dorakit model key -> PEFT adapter-file key."""
    parts = key.split(".")
    if COPY_PART in parts:
        parts.remove(COPY_PART)
    return PEFT_PREFIX + ".".join(parts)


def from_peft_key(key: str, copy_paths: set[str] | frozenset[str] = frozenset()) -> str:
    """PEFT adapter-file key -> dorakit model key. ``copy_paths`` are the module paths that hold a
    ``modules_to_save`` copy in the model (their tensors get the copy's component back)."""
    if not key.startswith(PEFT_PREFIX):
        raise ValueError(f"Adapter key {key!r} lacks PEFT's prefix {PEFT_PREFIX!r}.")
    key = key[len(PEFT_PREFIX) :]
    for path in copy_paths:
        if key.startswith(path + "."):
            return f"{path}.{COPY_PART}.{key[len(path) + 1:]}"
    return key


def nested_adapter_paths(module_path: str, names: list[str]) -> dict[str, str]:
    """Where the adapters of parameters ``names`` of the module at ``module_path`` live, as PEFT nests its
    ParamWrappers (and ``inject_adapters`` does): the last-registered parameter's adapter is outermost,
    at ``module_path``; each earlier one a ``.base_layer`` deeper."""
    return {name: module_path + ".base_layer" * (len(names) - 1 - i) for i, name in enumerate(names)}


def expert_count_mismatches(model: nn.Module, given: dict[str, Tensor]) -> list[str]:
    """Messages for file tensors (keyed as ``model.state_dict()``) of expert adapters that were made for
    another number of experts: the shape alone would only say "mismatch"."""
    messages = []
    for path, layer in model.named_modules():
        if not isinstance(layer, ParameterAdapter):
            continue
        for name in ("lora_magnitude_vector", "lora_A.weight", "lora_B.weight"):
            value = given.get(f"{path}.{name}")
            message = None if value is None else describe_expert_mismatch(layer, name, tuple(value.shape))
            if message is not None:
                messages.append(f"{to_peft_key(f'{path}.{name}')}: {message}")
                break
    return messages
