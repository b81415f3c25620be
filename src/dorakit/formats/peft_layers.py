"""PEFT adapter directories as an ``AdapterSet`` (for conversions, which have no model to load into).

``formats/peft.py`` loads and saves PEFT directories through a model; this reads one into per-module layers
and writes layers back, with the same config mapping (``peft_config.py``) and the same files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors.torch import save_file

from .. import atomic
from .adapter_set import AdapterSet, LayerAdapter, peft_tensors, to_config
from .keys import PEFT_PREFIX, component_of_class
from .peft import CONFIG_NAME, WEIGHTS_NAME, read_adapter_config, read_adapter_tensors
from .peft_config import to_peft_dict

SUFFIXES = {".lora_A.weight": "down", ".lora_B.weight": "up", ".lora_magnitude_vector": "magnitude"}


def read_peft_dir(directory: str | os.PathLike, component: str | None = None) -> AdapterSet:
    """The layers of a PEFT adapter directory; its component from ``component``, else from the recorded
    base model class (``auto_mapping``), else "" (a plain model).

    Raises:
        ValueError: parts no LoRA file layout holds (VeRA, modules_to_save, trained biases, embeddings).
    """
    directory = Path(directory)
    config = read_adapter_config(directory)
    tensors = read_adapter_tensors(directory)
    source = str(directory)
    lost = [f"{name}={getattr(config, name)!r}" for name, default in
            (("direction", "lora"), ("bias", "none"), ("modules_to_save", None)) if getattr(config, name) != default]
    if config.target_parameters:  # expert stacks and other parameters (issue 17): no per-module LoRA pair to convert
        lost.append(f"target_parameters={config.target_parameters!r} (adapters of parameters such as expert stacks, "
                    "which only PEFT's layout holds: use the directory as it is)")
    parts: dict[str, dict] = {}
    for key, value in tensors.items():
        suffix = next((s for s in SUFFIXES if key.endswith(s)), None)
        if suffix is None or not key.startswith(PEFT_PREFIX):
            lost.append(key)
            continue
        parts.setdefault(key[len(PEFT_PREFIX): -len(suffix)], {})[SUFFIXES[suffix]] = value
    if lost:
        shown = ", ".join(lost[:5]) + (f", ... ({len(lost) - 5} more)" if len(lost) > 5 else "")
        raise ValueError(f"{source} has parts the LoRA file layouts cannot hold: {shown}.")
    layers = {}
    for path, found in parts.items():
        magnitude = found.get("magnitude")
        layers[path] = LayerAdapter(found["down"], found["up"], float(config.alpha_for(path)),
                                    None if magnitude is None else magnitude.reshape(-1), "out", config.use_rslora, path)
    if component is None:
        raw = json.loads((directory / CONFIG_NAME).read_text(encoding="utf-8"))
        component = component_of_class((raw.get("auto_mapping") or {}).get("base_model_class", "")) or ""
    return AdapterSet({component: layers}, source, layout="peft")


def write_peft_dir(adapters: AdapterSet, directory: str | os.PathLike, *, overwrite: bool = False) -> list[Path]:
    """One PEFT directory per component: ``directory`` itself for one, ``directory/<component>`` for several.

    Raises:
        ValueError: input-axis magnitudes (PEFT has the output axis only).
        FileExistsError: an adapter is there already and ``overwrite`` is False.
    """
    directory = Path(directory)
    written = []
    for component, layers in adapters.components.items():
        if any(layer.magnitude is not None and layer.axis != "out" for layer in layers.values()):
            raise ValueError(f"{adapters.source} has DoRA magnitudes on the input axis (dora_scale [1, in]); PEFT's "
                             "format has the output axis only (PEFT would compute another model). Keep the kohya file, "
                             "or convert with --approximate, which reports the error it introduces.")
        target = directory / component if len(adapters.components) > 1 else directory
        if not overwrite and any((target / name).exists() for name in (CONFIG_NAME, WEIGHTS_NAME)):
            raise FileExistsError(f"{target} already holds an adapter; pass overwrite=True (--overwrite) to replace it.")
        tensors = peft_tensors(layers)
        content = json.dumps(to_peft_dict(to_config(layers, adapters.source)), indent=2, sort_keys=True)
        atomic.write_files(target, {
            WEIGHTS_NAME: lambda path, t=tensors: save_file(t, str(path), metadata={"format": "pt"}),
            CONFIG_NAME: lambda path, c=content: path.write_text(c + "\n"),
        }, marker=CONFIG_NAME)
        written.append(target)
    return written
