"""Which layout a path holds (PEFT, diffusers, kohya/LyCORIS), told from its files and keys, and
``dorakit.load_adapter`` for all of them.

    directory with adapter_config.json                   PEFT (formats/peft.py)
    directory with pytorch_lora_weights.safetensors,     diffusers (keys "unet.<path>.lora_A.weight", ...)
      or a .safetensors file                             or kohya/LyCORIS (keys "lora_unet_<name>.lora_down.weight", ...)

Only safetensors are read: pickle files (.bin, .pt, .ckpt) can run code and are refused.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from .adapter_set import AdapterSet, load_into
from .diffusers import read_diffusers, split_component
from .keys import (DENOISERS, DIFFUSERS_METADATA_KEY, DIFFUSERS_PAIR_ALIASES, DIFFUSERS_WEIGHTS_NAME, KOHYA_PREFIXES,
                   PEFT_PAIR_SUFFIXES, PEFT_PREFIX, component_of_class, flattened_clip, split_kohya_key,
                   underscored_paths)
from .kohya import guess_denoiser, is_kohya, read_kohya
from .peft import CONFIG_NAME

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def locate(path: str | os.PathLike) -> tuple[str, Path]:
    """("peft", directory) or ("file", the .safetensors file to read).

    Raises:
        FileNotFoundError / ValueError: nothing there, a pickle file, or a directory of no known layout.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Adapter {path} does not exist.")
    if path.is_dir():
        if (path / CONFIG_NAME).is_file():
            return "peft", path
        if (path / DIFFUSERS_WEIGHTS_NAME).is_file():
            return "file", path / DIFFUSERS_WEIGHTS_NAME
        files = sorted(path.glob("*.safetensors"))
        if len(files) == 1:
            return "file", files[0]
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if files:
            found = f"{len(files)} .safetensors files (name the one to load)"
        else:
            found = "no .safetensors file" + (f" (pickle files {pickles} are never loaded: they can run code)" if pickles else "")
        raise FileNotFoundError(
            f"{path} holds no adapter dorakit reads: no {CONFIG_NAME} (PEFT), no {DIFFUSERS_WEIGHTS_NAME} (diffusers) "
            f"and {found}."
        )
    if path.suffix in PICKLE_SUFFIXES:
        raise ValueError(f"{path} is a pickle file, which dorakit never loads (unpickling can run code). Convert it to "
                         ".safetensors with the tool that wrote it.")
    return "file", path


def read_safetensors(file: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The tensors of a .safetensors file and its header metadata."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(file), "pt") as handle:
            header = handle.metadata() or {}
        return load_file(str(file)), header
    except Exception as err:  # safetensors raises its own error types for corrupt headers and data
        raise ValueError(f"{file} is not a readable safetensors file ({type(err).__name__}: {err}).") from None


def file_kind(keys: list[str], source: str) -> str:
    """"kohya" or "diffusers", from the keys. Raises ValueError naming the first keys otherwise."""
    if not keys:
        raise ValueError(f"{source} holds no tensors.")
    if is_kohya(keys):
        return "kohya"
    if any(k.startswith(PEFT_PREFIX) for k in keys):
        raise ValueError(f"{source} holds PEFT's tensors without their {CONFIG_NAME} (rank, alpha, targets): load the "
                         "adapter directory instead.")
    suffixes = PEFT_PAIR_SUFFIXES + tuple(DIFFUSERS_PAIR_ALIASES) + (".alpha",)
    if any(k.endswith((".lora_A.weight", ".lora.down.weight")) for k in keys) and all(k.endswith(suffixes) for k in keys):
        return "diffusers"
    raise ValueError(f"{source} is neither a diffusers nor a kohya/LyCORIS LoRA file (first keys: {sorted(keys)[:5]}).")


def kohya_component_of(key: str, denoiser: str | None) -> str | None:
    split = split_kohya_key(key)
    if split is None:
        return None
    component = KOHYA_PREFIXES[split[0]]
    return (denoiser or guess_denoiser(split[1])) if component == "denoiser" else component


def read_adapter_set(path: str | os.PathLike, *, paths: dict[str, dict[str, list[str]]] | None = None,
                     denoiser: str | None = None, component: str | None = None) -> AdapterSet:
    """Any adapter file or directory as an ``AdapterSet`` (conversions; ``paths``/``denoiser`` as in ``read_kohya``,
    ``component`` names a PEFT directory's)."""
    kind, where = locate(path)
    if kind == "peft":
        from .peft_layers import read_peft_dir

        return read_peft_dir(where, component)
    tensors, header = read_safetensors(where)
    if file_kind(list(tensors), str(where)) == "kohya":
        return read_kohya(tensors, str(where), paths, denoiser)
    metadata = json.loads(header[DIFFUSERS_METADATA_KEY]) if DIFFUSERS_METADATA_KEY in header else None
    return read_diffusers(tensors, metadata, str(where))


def load_adapter(model: nn.Module, path: str | os.PathLike, *, component: str | None = None,
                 adapter_dtype: torch.dtype | None = None) -> nn.Module:
    """Wrap ``model`` as an adapter file says and load it: a PEFT directory, a diffusers LoRA file or
    directory, or a kohya/LyCORIS file (both DoRA magnitude axes), told apart by their keys.

    The model computes what the file's trainer computed: PEFT's and diffusers' DoRA on the output axis,
    LyCORIS's on the axis its ``dora_scale`` has, with each module's own rank and alpha.

    Args:
        model: the base model (no adapter yet).
        path: the adapter directory or file.
        component: which part of a pipeline file to load ("unet", "transformer", "text_encoder", ...);
            default: known from the model's class, or the file's only component.
        adapter_dtype: as in ``inject_adapters``.
    Returns:
        The same model object, adapted.
    Raises:
        FileNotFoundError / ValueError: no adapter there, a pickle file, or a file for another model
            (the first mismatching module names are listed). The model is unchanged on any error.

    Example::

        unet = dorakit.load_adapter(unet, "my_lora.safetensors")   # kohya/LyCORIS, diffusers or PEFT
    """
    kind, where = locate(path)
    if kind == "peft":
        from .peft import load_adapter as load_peft

        return load_peft(model, where, adapter_dtype=adapter_dtype)
    tensors, header = read_safetensors(where)
    source = str(where)
    wanted = component or component_of_class(type(model).__name__)
    if file_kind(list(tensors), source) == "kohya":
        denoiser = wanted if wanted in DENOISERS else None
        held = {kohya_component_of(k, denoiser) or "" for k in tensors}
        chosen = _choose(held, wanted, source)
        subset = {k: v for k, v in tensors.items() if kohya_component_of(k, denoiser) == chosen}
        names = underscored_paths([p for p, _ in model.named_modules() if p], text_model_alias=flattened_clip(model))
        adapters = read_kohya(subset, source, {chosen: names}, denoiser=chosen if chosen in DENOISERS else denoiser)
    else:
        metadata = json.loads(header[DIFFUSERS_METADATA_KEY]) if DIFFUSERS_METADATA_KEY in header else None
        held = {split_component(k)[0] for k in tensors}
        chosen = _choose(held, wanted, source)
        subset = {k: v for k, v in tensors.items() if split_component(k)[0] == chosen}
        adapters = read_diffusers(subset, metadata, source)
    others = sorted(held - {chosen})
    if others:
        warnings.warn(f"{source} also holds adapters for {others}; load each into its own model with "
                      "dorakit.load_adapter(model, path, component=...).", stacklevel=2)
    return load_into(model, adapters.components.get(chosen, {}), source,
                     unresolved=adapters.unresolved.get(chosen, []), adapter_dtype=adapter_dtype)


def _choose(held: set[str], wanted: str | None, source: str) -> str:
    """The component to load: the wanted one, a file's only one, or a model-level file's ("")."""
    if "" in held and len(held) == 1:
        return ""
    if wanted is not None:
        if wanted not in held:
            raise ValueError(f"{source} has no adapter for the {wanted}; it holds {sorted(held)}. Pass the matching "
                             "model, or component=... to choose.")
        return wanted
    if len(held) == 1:
        return next(iter(held))
    raise ValueError(f"{source} holds adapters for {sorted(held)}; say which one this model is: component=...")
