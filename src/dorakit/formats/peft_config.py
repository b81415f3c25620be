"""``DoraConfig`` <-> PEFT's ``adapter_config.json``.

dorakit writes the same fields PEFT 0.21.2 writes for a LoRA/DoRA (or VeRA) adapter, with PEFT's defaults for
the features dorakit does not have, so PEFT and inference servers read the file as their own. On
reading, a field dorakit cannot honour (a value other than its default) is an error naming it:
an adapter must never load silently different from how it was trained.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

from torch import nn

from ..config import DoraConfig
from ..fields import check_values

# The format version written; PEFT uses it only to warn about adapters from newer versions.
PEFT_FORMAT_VERSION = "0.21.2"

# Every field of PEFT 0.21.2's LoraConfig.to_dict(), at PEFT's defaults.
PEFT_LORA_FIELDS: dict[str, Any] = {
    "alora_invocation_tokens": None,
    "alpha_pattern": {},
    "arrow_config": None,
    "base_model_name_or_path": None,
    "bias": "none",
    "corda_config": None,
    "ensure_weight_tying": False,
    "eva_config": None,
    "exclude_modules": None,
    "fan_in_fan_out": False,
    "inference_mode": True,
    "init_lora_weights": True,
    "kasa_config": None,
    "layer_replication": None,
    "layers_pattern": None,
    "layers_to_transform": None,
    "loftq_config": {},
    "lora_alpha": 8,
    "lora_bias": False,
    "lora_dropout": 0.0,
    "lora_ga_config": None,
    "megatron_config": None,
    "megatron_core": "megatron.core",
    "modules_to_save": None,
    "monteclora_config": None,
    "peft_type": "LORA",
    "peft_version": PEFT_FORMAT_VERSION,
    "qalora_group_size": 16,
    "r": 8,
    "rank_pattern": {},
    "revision": None,
    "target_modules": None,
    "target_parameters": None,
    "task_type": None,
    "trainable_token_indices": None,
    "use_bdlora": None,
    "use_dora": False,
    "use_qalora": False,
    "use_rslora": False,
    "velora_config": None,
}

# Every field of PEFT 0.21.2's VeraConfig.to_dict(), at PEFT's defaults.
PEFT_VERA_FIELDS: dict[str, Any] = {
    "base_model_name_or_path": None,
    "bias": "none",
    "d_initial": 0.1,
    "fan_in_fan_out": False,
    "inference_mode": True,
    "init_weights": True,
    "layers_pattern": None,
    "layers_to_transform": None,
    "modules_to_save": None,
    "peft_type": "VERA",
    "peft_version": PEFT_FORMAT_VERSION,
    "projection_prng_key": 0,
    "r": 256,
    "revision": None,
    "save_projection": True,
    "target_modules": None,
    "task_type": None,
    "vera_dropout": 0.0,
}
# DoraConfig fields a VeRA file stores under the same name, and those it renames (ours -> PEFT's).
VERA_SHARED_FIELDS = ("r", "target_modules", "fan_in_fan_out", "modules_to_save", "task_type",
                      "base_model_name_or_path", "projection_prng_key", "save_projection", "d_initial")
VERA_RENAMED = {"lora_dropout": "vera_dropout", "init_lora_weights": "init_weights"}
VERA_BIAS = {"none": "none", "all": "all", "lora_only": "vera_only"}

# DoraConfig fields stored under the same name.
SHARED_FIELDS = (
    "r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "use_dora", "use_rslora",
    "fan_in_fan_out", "init_lora_weights", "rank_pattern", "alpha_pattern", "modules_to_save", "bias",
    "task_type", "base_model_name_or_path", "target_parameters",
)
# Fields that only steer how PEFT initialises a new adapter: irrelevant once weights are loaded.
INIT_ONLY_FIELDS = {"eva_config", "corda_config", "loftq_config", "lora_ga_config", "kasa_config", "megatron_core",
                    "inference_mode", "peft_version", "revision", "qalora_group_size", "auto_mapping",
                    "ensure_weight_tying"}
# Initialisations that leave the base model as it is (the adapter's values come from the file).
PLAIN_INITS = {True: True, False: False, "gaussian": "gaussian", "eva": True, "orthogonal": True}


def base_model_name(model: nn.Module) -> str | None:
    """The base model's name or path when the model knows it (transformers models do)."""
    name = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    return str(name) if name else None


def hub_name(base: str | None) -> str | None:
    """The model hub's name of a base model, when its path shows one: a hub cache directory
    (``.../models--ORG--NAME/snapshots/...``) or the ``_name_or_path`` older transformers wrote into
    config.json. Recorded with the adapter beside the absolute path, so that an error on another machine
    can say which model to fetch."""
    if not base:
        return None
    path = Path(base)
    for part in reversed(path.parts):
        match = re.fullmatch(r"models--([^/]+?)--([^/]+)", part)
        if match:
            return f"{match.group(1)}/{match.group(2)}"
    try:
        recorded = json.loads((path / "config.json").read_text(encoding="utf-8")).get("_name_or_path")
    except (OSError, ValueError, AttributeError):
        return None
    if isinstance(recorded, str) and re.fullmatch(r"[\w.-]+/[\w.-]+", recorded) and not Path(recorded).exists():
        return recorded
    return None


def to_peft_dict(config: DoraConfig, model: nn.Module | None = None) -> dict[str, Any]:
    """The ``adapter_config.json`` content PEFT writes for the same adapter.

    VeRA adapters get PEFT's VeRA config; DVoRA (which PEFT lacks) the same plus ``"use_dora": true``
    (PEFT warns that it ignores that field, and would compute VeRA without the magnitudes).
    """
    if config.direction == "vera":
        out = _vera_dict(config, model)
    else:
        out = copy.deepcopy(PEFT_LORA_FIELDS)
        for name in SHARED_FIELDS:
            out[name] = copy.deepcopy(getattr(config, name))
        if config.target_modules is None and config.target_parameters:
            # PEFT fills an unset target_modules with its defaults for the architecture; [] means "parameters only".
            out["target_modules"] = []
    if out["base_model_name_or_path"] is None and model is not None:
        out["base_model_name_or_path"] = base_model_name(model)
    if config.task_type is None and model is not None:
        # PEFT records the model class so that its AutoPeftModel can rebuild a custom base model.
        cls = type(model)
        if cls.__module__.startswith("torch.distributed.fsdp"):
            cls = cls.__mro__[1]  # FSDP2 swaps in a subclass named FSDP<Model>: record the model's own class
        out["auto_mapping"] = {"base_model_class": cls.__name__, "parent_library": cls.__module__}
    return out


def _vera_dict(config: DoraConfig, model: nn.Module | None) -> dict[str, Any]:
    out = copy.deepcopy(PEFT_VERA_FIELDS)
    for name in VERA_SHARED_FIELDS:
        out[name] = copy.deepcopy(getattr(config, name))
    for ours, theirs in VERA_RENAMED.items():
        out[theirs] = getattr(config, ours)
    out["bias"] = VERA_BIAS[config.bias]
    if config.exclude_modules is not None:
        # PEFT's VeraConfig has no exclude_modules: name the adapted modules themselves instead.
        from ..inject import adapter_layers

        layers = [path for path, _ in adapter_layers(model)] if model is not None else []
        if not layers:
            raise ValueError("A VeRA config with exclude_modules is written from its adapted model; pass the model.")
        out["target_modules"] = sorted(layers)
    if config.use_dora:
        out["use_dora"] = True
    return out


def _vera_config(data: dict[str, Any], source: str) -> DoraConfig:
    known = set(VERA_SHARED_FIELDS) | set(VERA_RENAMED.values()) | {"bias", "use_dora", "peft_type"}
    unsupported = {name: value for name, value in data.items() if name not in known and name not in INIT_ONLY_FIELDS
                   and value != PEFT_VERA_FIELDS.get(name) and value not in (None, False, {}, [])}
    if unsupported:
        shown = ", ".join(f"{k}={v!r}" for k, v in sorted(unsupported.items()))
        raise ValueError(f"{source} uses VeRA feature(s) dorakit does not implement: {shown}.")
    bias = {theirs: ours for ours, theirs in VERA_BIAS.items()}.get(data.get("bias", "none"))
    if bias is None:
        raise ValueError(f"{source} has bias={data.get('bias')!r}; VeRA's are {sorted(VERA_BIAS.values())}.")
    kwargs = {name: data[name] for name in VERA_SHARED_FIELDS if data.get(name) is not None}
    kwargs.update({ours: data[theirs] for ours, theirs in VERA_RENAMED.items() if data.get(theirs) is not None})
    if data.get("use_dora") is not None:
        kwargs["use_dora"] = data["use_dora"]  # checked as a boolean below: "false" must not mean True
    check_values(DoraConfig, kwargs, source, names=VERA_RENAMED)
    kwargs.update(direction="vera", bias=bias)
    kwargs.setdefault("use_dora", False)
    kwargs.setdefault("r", PEFT_VERA_FIELDS["r"])
    try:
        return DoraConfig(**kwargs)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{source}: {err}") from None


def from_peft_dict(data: Any, source: str = "adapter_config.json") -> DoraConfig:
    """Build a ``DoraConfig`` from PEFT's (or dorakit's) ``adapter_config.json`` content.

    Raises:
        ValueError: not a LoRA/DoRA config, required fields missing, or a field set to a feature
            dorakit does not implement (which would make the adapter compute something else).
    """
    if not isinstance(data, dict):
        raise ValueError(f"{source} must hold a JSON object, got {type(data).__name__}.")
    peft_type = data.get("peft_type")
    if peft_type is None:
        raise ValueError(f"{source} has no 'peft_type'. Is this a PEFT adapter directory?")
    if peft_type == "VERA":
        if data.get("target_modules") is None:
            raise ValueError(f"{source} lacks the required field 'target_modules'.")
        return _vera_config(data, source)
    if peft_type != "LORA":
        raise ValueError(
            f"{source} has peft_type={peft_type!r}; dorakit reads LoRA/DoRA (peft_type 'LORA') and VeRA/DVoRA "
            "(peft_type 'VERA') adapters."
        )
    required = ("r", "lora_alpha") if data.get("target_parameters") else ("r", "lora_alpha", "target_modules")
    missing = [name for name in required if data.get(name) is None]
    if missing:
        raise ValueError(f"{source} lacks the required field(s) {missing}.")
    unsupported = {
        name: value
        for name, value in data.items()
        if name not in SHARED_FIELDS and name not in INIT_ONLY_FIELDS and name != "peft_type"
        and value != PEFT_LORA_FIELDS.get(name) and value not in (None, False, {}, [])
    }
    if unsupported:
        shown = ", ".join(f"{k}={v!r}" for k, v in sorted(unsupported.items()))
        raise ValueError(
            f"{source} uses feature(s) dorakit does not implement: {shown}. Loading it anyway would give a "
            "model that computes something else than the one trained."
        )
    kwargs = {name: data[name] for name in SHARED_FIELDS if name in data and data[name] is not None}
    # Strict types before any use of a value (issue 19): 1 in PLAIN_INITS would read as True.
    check_values(DoraConfig, kwargs, source)
    init = kwargs.get("init_lora_weights", True)
    if init not in PLAIN_INITS:
        raise ValueError(
            f"{source} has init_lora_weights={init!r}, which changes the base weights at init (residual "
            "model); dorakit needs an adapter for the unmodified base. Convert it with PEFT first "
            "(save_pretrained(..., path_initial_model_for_weight_conversion=...))."
        )
    kwargs["init_lora_weights"] = PLAIN_INITS[init]
    kwargs.setdefault("use_dora", False)  # PEFT's default: a file without the field is plain LoRA
    try:
        return DoraConfig(**kwargs)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{source}: {err}") from None
