"""Which modules of a model a config adapts, with PEFT's matching rules and errors that help."""

from __future__ import annotations

import re
from collections import Counter

from torch import nn

from .config import DoraConfig
from .layers import SUPPORTED_TYPES, AdapterLayer, is_conv1d, is_supported
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
    if spec is None:
        raise ValueError(
            "target_modules is not set. Name the modules to adapt, e.g. target_modules=['q_proj', 'v_proj'], "
            f"or use target_modules='{ALL_LINEAR}'. {_candidates_hint(model)}"
        )
    heads = _output_head_names(model) if spec == ALL_LINEAR else set()
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
    if not found:
        raise ValueError(f"No module matched target_modules={spec!r}. {_candidates_hint(model)}")
    return found


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
