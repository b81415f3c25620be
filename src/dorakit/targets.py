"""Which modules and parameters of a model a config adapts, with PEFT's matching rules and errors that help."""

from __future__ import annotations

import re
from collections import Counter

from torch import nn

from .config import DoraConfig
from .layers import SUPPORTED_TYPES, AdapterLayer, is_conv1d, is_supported
from .layers.routed import PROJECTIONS, is_expert_module
from .modules_to_save import ModulesToSave

ALL_LINEAR = "all-linear"


def name_matches(spec: list[str] | str, path: str) -> bool:
    """A regex string must match the whole path; a list entry matches the path or a dotted suffix."""
    if isinstance(spec, str):
        return re.fullmatch(spec, path) is not None
    return any(path == name or path.endswith("." + name) for name in spec)


def _inside(path: str, parents: list[str]) -> bool:
    return any(path == p or path.startswith(p + ".") for p in parents)


def _output_head_names(model: nn.Module) -> set[str]:
    """The output projection, which "all-linear" leaves alone (as PEFT does)."""
    heads = set()
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    for path, module in model.named_modules():
        if (head is not None and module is head) or path.split(".")[-1] == "lm_head":
            heads.add(path)
    return heads


def find_targets(model: nn.Module, config: DoraConfig) -> list[str]:
    """Paths of the modules to wrap, in model order.

    Raises:
        ValueError: nothing matched (with names that could), or a match is of an unsupported type,
            or is already adapted.
    """
    spec = config.target_modules
    if spec is None and config.target_parameters:
        return []  # parameters only (PEFT allows target_modules unset then)
    if spec is None:
        raise ValueError(
            "target_modules is not set. Name the modules to adapt, e.g. target_modules=['q_proj', 'v_proj'], "
            f"or use target_modules='{ALL_LINEAR}'. {_candidates_hint(model)}"
        )
    heads = _output_head_names(model) if spec == ALL_LINEAR else set()
    attention_out = _attention_out_projections(model)
    save = config.modules_to_save or []
    save_paths = [p for p, _ in model.named_modules() if p and save and name_matches(save, p)]
    adapted = [p for p, m in model.named_modules() if isinstance(m, (AdapterLayer, ModulesToSave))]
    found = []
    for path, module in model.named_modules():
        if not path or any(path.startswith(p + ".") for p in adapted):
            continue  # the model itself, or the inside of an existing wrapper
        if spec == ALL_LINEAR:
            hit = (isinstance(module, nn.Linear) or is_conv1d(module)) and path not in heads
        else:
            hit = name_matches(spec, path)
        if not hit or (config.exclude_modules and name_matches(config.exclude_modules, path)):
            continue
        if path in attention_out:
            if spec == ALL_LINEAR:
                continue  # not a layer the attention calls: see _attention_out_projections
            raise ValueError(
                f"'{path}' is the out_proj of a torch.nn.MultiheadAttention, whose forward reads its weight without "
                f"calling it, so an adapter there would do nothing. Target the attention module "
                f"'{path.rpartition('.')[0]}' instead: it adapts in_proj and out_proj."
            )
        if _inside(path, save_paths):
            continue  # trained fully; an adapter inside it would fight the copy
        if isinstance(module, AdapterLayer):
            raise ValueError(
                f"Module '{path}' already has an adapter. Call dorakit.unload(model) or "
                "dorakit.merge_and_unload(model) before adding another."
            )
        if not is_supported(module):
            raise ValueError(
                f"target_modules matched '{path}' of type {type(module).__module__}.{type(module).__name__}, "
                f"which dorakit cannot adapt. Supported types: {SUPPORTED_TYPES}. Name its linear "
                "sub-layers instead, or add it to exclude_modules."
            )
        found.append(path)
    if not found and not (spec == [] and config.target_parameters):  # [] with parameters: PEFT's "no modules"
        raise ValueError(f"No module matched target_modules={spec!r}. {_candidates_hint(model)}")
    return found


def _attention_out_projections(model: nn.Module) -> set[str]:
    """Paths of the out_proj Linear of every nn.MultiheadAttention (read as a weight, never called)."""
    return {f"{path}.out_proj" if path else "out_proj" for path, m in model.named_modules()
            if isinstance(m, nn.MultiheadAttention)}


def find_parameter_targets(model: nn.Module, config: DoraConfig, module_targets: list[str] = ()) -> dict[str, list[str]]:
    """{module path: [parameter names]} that ``config.target_parameters`` adapt, by PEFT's rules: an
    entry matches a parameter's path or a dotted suffix of it; each module's parameters in the order it
    registered them (the order in which PEFT nests its wrappers, so files agree).

    Raises:
        ValueError: an entry matches no parameter; a match is not 2-D or 3-D, belongs to the model
            itself, to a module ``target_modules`` adapts, or to a ``modules_to_save`` module.
    """
    names = config.target_parameters or []
    if not names:
        return {}
    save = config.modules_to_save or []
    save_paths = [p for p, _ in model.named_modules() if p and save and name_matches(save, p)]
    adapted = [p for p, m in model.named_modules() if isinstance(m, (AdapterLayer, ModulesToSave))]
    found: dict[str, list[str]] = {}
    used: set[str] = set()
    for path, module in model.named_modules():
        if any(path.startswith(p + ".") for p in adapted):
            continue
        for name, param in module.named_parameters(recurse=False):
            key = f"{path}.{name}" if path else name
            hits = [n for n in names if key == n or key.endswith("." + n)]
            if not hits:
                continue
            used.update(hits)
            _check_parameter_target(path, name, param, module_targets, save_paths)
            found.setdefault(path, []).append(name)
    missing = [n for n in names if n not in used]
    if missing:
        raise ValueError(f"target_parameters entries {missing} match no parameter of this model. "
                         f"{_parameter_hint(model)}")
    return found


def _check_parameter_target(path: str, name: str, param, module_targets, save_paths: list[str]) -> None:
    where = f"'{path}.{name}'" if path else f"'{name}'"
    if param.dim() not in (2, 3):
        raise ValueError(
            f"target_parameters matched {where} of shape {list(param.shape)}: only 2-D ([out, in]) and 3-D "
            "([experts, out, in]) parameters can take an adapter. Remove that entry or make it more specific."
        )
    if not path:
        raise ValueError(f"target_parameters matched {where}, a parameter of the model itself: only parameters of "
                         "its submodules can be adapted (the adapter wraps the module that holds them).")
    if _inside(path, list(module_targets)):
        raise ValueError(
            f"target_parameters matched {where}, but target_modules already adapts '{path}' (or a module around it). "
            "Adapt it one way: remove it from target_modules or from target_parameters."
        )
    if _inside(path, save_paths):
        raise ValueError(f"target_parameters matched {where} inside a modules_to_save module, which trains fully; "
                         "remove one of the two.")


def expert_parameter_names(model: nn.Module) -> list[str]:
    """target_parameters naming every expert projection stack of a mixture-of-experts model (modules of
    transformers' experts convention), e.g. ["experts.gate_up_proj", "experts.down_proj"]; [] for a dense model."""
    names: dict[str, None] = {}
    for path, module in model.named_modules():
        if is_expert_module(module) and not isinstance(module, AdapterLayer):
            for name in PROJECTIONS:
                param = getattr(module, name, None)
                if isinstance(param, nn.Parameter) and param.dim() == 3:
                    names[f"{path.rpartition('.')[2]}.{name}" if path else name] = None
    return list(names)


def _parameter_hint(model: nn.Module, limit: int = 8) -> str:
    """The model's 3-D parameters (expert stacks), with counts: the usual target_parameters."""
    counts: Counter[tuple[str, str]] = Counter()
    for path, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            if param.dim() == 3:
                counts[(f"{path.rpartition('.')[2]}.{name}", "x".join(map(str, param.shape)))] += 1
    if not counts:
        return "This model has no 3-D (expert) parameters; name 2-D ones by their path, e.g. 'mlp.gate.weight'."
    shown = ", ".join(f"{name} [{shape}] x{n}" for (name, shape), n in list(counts.items())[:limit])
    return f"Expert parameters in this model: {shown}."


def find_modules_to_save(model: nn.Module, config: DoraConfig) -> list[str]:
    """Paths of the modules to train fully; every listed name must match something."""
    names = config.modules_to_save or []
    paths = [p for p, _ in model.named_modules() if p and name_matches(names, p)]
    # Keep the outermost match only: a copy of a parent already contains its children.
    paths = [p for p in paths if not _inside(p, [q for q in paths if q != p])]
    missing = [n for n in names if not any(name_matches([n], p) for p in paths)]
    if missing:
        raise ValueError(f"modules_to_save names {missing} match no module. {_candidates_hint(model)}")
    return paths


def _candidates_hint(model: nn.Module, limit: int = 12) -> str:
    """A short list of adaptable module names (with types and counts) to choose from."""
    counts: Counter[tuple[str, str]] = Counter()
    for path, module in model.named_modules():
        if path and is_supported(module) and not isinstance(module, AdapterLayer):
            counts[(path.split(".")[-1], type(module).__name__)] += 1
    if not counts:
        return f"The model has no module of a supported type ({SUPPORTED_TYPES})."
    shown = ", ".join(f"{name} ({kind} x{n})" for (name, kind), n in list(counts.items())[:limit])
    more = "" if len(counts) <= limit else f", ... ({len(counts) - limit} more)"
    return f"Adaptable modules in this model: {shown}{more}."
