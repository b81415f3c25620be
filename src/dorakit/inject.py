"""Put adapters into any ``nn.Module`` and take them out again.

    inject_adapters(model, cfg)   wrap the targets in place, freeze the rest      -> model
    merge_and_unload(model)       fold adapters in, plain torch modules again      -> model
    unload(model)                 the untouched base modules back (exact unmerge)  -> model
    disable_adapters(model)       context: the base model's behaviour, temporarily

Every check runs and every wrapper is built before the model is touched, so an error leaves the
model exactly as it was.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
import warnings
from contextlib import contextmanager

import torch
from torch import nn

from .config import DoraConfig, pattern_key
from .layers import (AdapterLayer, ParameterAdapter, VeraProjection, check_vera_target, default_adapter_dtype,
                     is_conv1d, wrap_module)
from .modules_to_save import ModulesToSave
from .targets import find_modules_to_save, find_parameter_targets, find_targets

# Attributes set on the root module by inject_adapters.
CONFIG_ATTR = "dorakit_config"
# {parameter name: requires_grad before injection}. Names, not the tensors: holding the original
# parameters would keep every full-size weight alive after FSDP shards the model (issue 7).
_FLAGS_ATTR = "_dorakit_requires_grad"
# Called with the model after its adapters were put in or taken out. An integration that must tell
# another library about them registers here, so that the core imports no integration: dorakit/__init__
# registers integrations.trainer, which lets transformers' Trainer save and resume the adapter (issue 14).
ADAPTER_HOOKS: list[Callable[[nn.Module], None]] = []


def adapter_layers(model: nn.Module) -> list[tuple[str, AdapterLayer]]:
    """(path, layer) for every dorakit adapter layer in ``model``."""
    return [(p, m) for p, m in model.named_modules() if isinstance(m, AdapterLayer)]


def _saved_copies(model: nn.Module) -> list[tuple[str, ModulesToSave]]:
    return [(p, m) for p, m in model.named_modules() if isinstance(m, ModulesToSave)]


def replace_module(model: nn.Module, path: str, new: nn.Module) -> None:
    """Put ``new`` where the submodule at ``path`` is."""
    parent_path, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent_path), child, new)


def inject_adapters(
    model: nn.Module, config: DoraConfig, *, adapter_dtype: torch.dtype | None = None
) -> nn.Module:
    """Wrap the modules ``config`` targets with DoRA (or LoRA) layers, in place.

    Everything but the adapters (and ``modules_to_save`` copies, and biases per ``config.bias``) is
    frozen. Each magnitude starts at its row norms, so the model's outputs are unchanged.

    Args:
        model: any torch module (a transformers model, a torchvision net, your own).
        config: the adapter config.
        adapter_dtype: dtype of the adapter weights; default fp32 over fp16/bf16 bases, else the base's.
    Returns:
        The same ``model`` object, adapted.
    Raises:
        ValueError: no target matched, a match has an unsupported type, the model already has
            adapters, or a hyperparameter is invalid. The model is unchanged.

    Example::

        model = dorakit.inject_adapters(model, DoraConfig(r=8, lora_alpha=16, target_modules=["q_proj"]))
    """
    if not isinstance(config, DoraConfig):
        raise TypeError(f"config must be a dorakit.DoraConfig, got {type(config).__name__}.")
    existing = adapter_layers(model) + _saved_copies(model)
    if existing:
        raise ValueError(
            f"The model already has dorakit adapters ({len(existing)} wrapped modules, e.g. '{existing[0][0]}'). "
            "Call dorakit.unload(model) or dorakit.merge_and_unload(model) before injecting again."
        )
    targets = find_targets(model, config)
    parameter_targets = find_parameter_targets(model, config, targets)
    save_paths = find_modules_to_save(model, config)
    projection = shared_projection(model, targets, config, adapter_dtype) if config.direction == "vera" else None
    wrappers = {
        path: wrap_module(
            model.get_submodule(path),
            name=path,
            projection=projection,
            d_initial=config.d_initial,
            magnitude_axis=config.magnitude_axis,
            fan_in_fan_out=config.fan_in_fan_out,
            r=config.rank_for(path),
            lora_alpha=config.alpha_for(path),
            lora_dropout=config.lora_dropout,
            use_dora=config.use_dora,
            use_rslora=config.use_rslora,
            init_lora_weights=config.init_lora_weights,
            adapter_dtype=adapter_dtype,
        )
        for path in targets
    }
    parameter_wrappers = {path: wrap_parameters(model.get_submodule(path), path, names, config, adapter_dtype)
                          for path, names in parameter_targets.items()}
    copies = {path: ModulesToSave(model.get_submodule(path)) for path in save_paths}
    _warn_unused_patterns(config, targets + [f"{p}.{n}" for p, names in parameter_targets.items() for n in names])

    # From here on nothing can fail: change the model. Modules first, then the parameter adapters, which
    # wrap the module objects holding the parameters (and whatever was put into them).
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    for path, new in {**wrappers, **copies, **parameter_wrappers}.items():
        replace_module(model, path, new)
        install = getattr(new, "install", None)
        if install is not None:
            install()  # an adapter with parts inside its module (MultiheadAttention's out_proj)
    _freeze_all_but_adapters(model, config.bias)
    setattr(model, _FLAGS_ATTR, flags)
    setattr(model, CONFIG_ATTR, config)
    for hook in ADAPTER_HOOKS:
        hook(model)
    return model


def wrap_parameters(module: nn.Module, path: str, names: list[str], config: DoraConfig,
                    adapter_dtype: torch.dtype | None = None) -> ParameterAdapter:
    """Adapters for parameters ``names`` of ``module`` (at ``path``), nested in that order as PEFT nests
    its ParamWrappers: the last one is outermost. Rank and alpha patterns match the parameter's path."""
    if getattr(config, "magnitude_axis", "out") != "out":
        raise ValueError(f"magnitude_axis={config.magnitude_axis!r} does not apply to target_parameters: parameter "
                         "adapters (expert stacks included) keep one magnitude per output row. Use the default axis.")
    wrapped = module
    for name in names:
        key = f"{path}.{name}"
        wrapped = ParameterAdapter(
            wrapped, parameter_name=name, r=config.rank_for(key), lora_alpha=config.alpha_for(key),
            lora_dropout=config.lora_dropout, use_dora=config.use_dora, use_rslora=config.use_rslora,
            init_lora_weights=config.init_lora_weights, adapter_dtype=adapter_dtype,
        )
    return wrapped


def shared_projection(
    model: nn.Module, targets: list[str], config: DoraConfig, adapter_dtype: torch.dtype | None = None
) -> VeraProjection:
    """VeRA's frozen pair, sized by the widest targets ([r, in_max] and [out_max, r]) and drawn from
    ``config.projection_prng_key`` exactly as PEFT draws it."""
    shapes = []
    for path in targets:
        module = model.get_submodule(path)
        check_vera_target(module, path)
        out_in = module.weight.shape[::-1] if is_conv1d(module) else module.weight.shape  # Conv1D stores [in, out]
        shapes.append(tuple(out_in))
    first = model.get_submodule(targets[0]).weight
    return VeraProjection.generate(
        config.r, max(s[1] for s in shapes), max(s[0] for s in shapes), config.projection_prng_key,
        base_dtype=first.dtype, dtype=adapter_dtype or default_adapter_dtype(first.dtype), device=first.device,
    )


def _warn_unused_patterns(config: DoraConfig, targets: list[str]) -> None:
    """A rank/alpha pattern that matches no target is most likely a typo: say so, as PEFT does."""
    for field_name, patterns in (
        ("rank_pattern", config.rank_pattern),
        ("alpha_pattern", config.alpha_pattern),
    ):
        used = {pattern_key(patterns, path) for path in targets}
        unused = sorted(set(patterns) - used)
        if unused:
            warnings.warn(f"{field_name} keys {unused} match no targeted module and are ignored.", stacklevel=3)


def _freeze_all_but_adapters(model: nn.Module, bias: str) -> None:
    for param in model.parameters():
        param.requires_grad_(False)
    for _, layer in adapter_layers(model):
        for name, param in layer.named_parameters():
            if not name.startswith("base_layer."):
                param.requires_grad_(True)
        layer_bias = layer.bias
        if bias == "lora_only" and layer_bias is not None:
            layer_bias.requires_grad_(True)
    for _, copy in _saved_copies(model):
        copy.modules_to_save.requires_grad_(True)
    if bias == "all":
        for name, param in model.named_parameters():
            if name.split(".")[-1] == "bias" and ".original_module." not in f".{name}":
                param.requires_grad_(True)


def _take_out(model: nn.Module, merge: bool) -> nn.Module:
    # Innermost first: an adapter nested in another (parameter adapters of one module, the out_proj of a
    # MultiheadAttention) is taken out of its parent before the parent itself.
    for path, layer in reversed(adapter_layers(model)):
        if merge:
            replace_module(model, path, layer.merged_base())
        else:
            layer.unmerge()
            replace_module(model, path, layer.base_layer)
    for path, copy in _saved_copies(model):
        replace_module(model, path, copy.modules_to_save if merge else copy.original_module)
    flags = getattr(model, _FLAGS_ATTR, None) or {}
    params = dict(model.named_parameters())  # the original names again, now the wrappers are gone
    for name, flag in flags.items():
        if name in params:
            params[name].requires_grad_(flag)
    for attr in (_FLAGS_ATTR, CONFIG_ATTR):
        if hasattr(model, attr):
            delattr(model, attr)
    for hook in ADAPTER_HOOKS:
        hook(model)
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and return the model made of plain torch modules
    (``modules_to_save`` keep their trained copies). Inference then costs exactly the base model's.

    Raises:
        ValueError: an adapted weight is tied to another module (the model is unchanged).
    """
    refuse_tied_adapted_weights(model)
    return _take_out(model, merge=True)


def refuse_tied_adapted_weights(model: nn.Module) -> None:
    """Raise ValueError if an adapted weight is shared with another module (tied weights)."""
    layers = dict(adapter_layers(model))
    owners: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(name)
    for path, layer in layers.items():
        names = owners.get(id(layer.base_weight()), [])
        others = [n for n in names if not n.startswith(f"{path}.")]
        if others:
            raise ValueError(
                f"The weight of '{path}' is shared with {others} (tied weights). Merging the adapter into it would "
                "change those modules too, so the merged model would not compute what the adapted one does. "
                "Untie them before training (e.g. config.tie_word_embeddings=False) or do not adapt this module."
            )


def unload(model: nn.Module) -> nn.Module:
    """Remove every adapter and give back the original module objects with their original weights
    (merged layers are unmerged exactly first) and ``requires_grad`` flags."""
    return _take_out(model, merge=False)


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model inside the block: adapters are bypassed (merged ones are unmerged for the
    block and merged again after it) and ``modules_to_save`` use their originals.

    Example::

        with dorakit.disable_adapters(model):
            base_logits = model(input_ids).logits
    """
    layers = [layer for _, layer in adapter_layers(model)]
    copies = [copy for _, copy in _saved_copies(model)]
    previous = [(m, m.disabled) for m in [*layers, *copies]]
    was_merged = [layer for layer in layers if layer.merged]
    try:
        for layer in was_merged:
            layer.unmerge()
        for module, _ in previous:
            module.disabled = True
        yield model
    finally:
        for module, flag in previous:
            module.disabled = flag
        for layer in was_merged:
            layer.merge()


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; shared parameters are counted once."""
    seen: set[int] = set()
    trainable = total = 0
    for param in model.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        total += param.numel()
        if param.requires_grad:
            trainable += param.numel()
    return trainable, total


def print_trainable_parameters(model: nn.Module) -> str:
    """Print and return ``trainable params: N || all params: M || trainable%: P`` (PEFT's format)."""
    trainable, total = trainable_parameters(model)
    line = f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / max(total, 1):.4f}"
    print(line)
    return line
