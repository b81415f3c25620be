"""diffusers' LoRA files: what ``save_lora_weights`` writes and ``pipe.load_lora_weights`` reads.

A directory with ``pytorch_lora_weights.safetensors``: PEFT's tensors with the pipeline component in
front instead of ``base_model.model.``

    unet.<path>.lora_A.weight [r, in, *k]   unet.<path>.lora_B.weight [out, r, *1]
    unet.<path>.lora_magnitude_vector       [out] (Linear) or [1, out, 1, 1] (conv): DoRA, output axis only
    (transformer., text_encoder., text_encoder_2., ... alike)

and in the safetensors header ``lora_adapter_metadata``: each component's ``LoraConfig`` as JSON, its
fields prefixed by the component ("unet.r", "unet.lora_alpha", ...). diffusers builds the adapter's
``LoraConfig`` from it; without it, it assumes ``lora_alpha = r`` (scale 1), so a file written without
metadata loads with another scale (a dorakit adapter with alpha 8, r 4 came out 0.365 off, issue 16).
Files written here always carry it. Reading, files without it get diffusers' own rule, which is what
a model loaded by diffusers computes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from torch import Tensor, nn

from .. import atomic
from ..config import DoraConfig
from .adapter_set import AdapterSet, LayerAdapter, from_model, model_components, peft_tensors, to_config
from .keys import COMPONENTS, DIFFUSERS_METADATA_KEY, DIFFUSERS_PAIR_ALIASES, DIFFUSERS_WEIGHTS_NAME
from .peft_config import from_peft_dict, to_peft_dict

SUFFIXES = {".lora_A.weight": "down", ".lora_B.weight": "up", ".lora_magnitude_vector": "magnitude", ".alpha": "alpha"}


def split_component(key: str) -> tuple[str, str]:
    """'unet.down_blocks.0...' -> ('unet', 'down_blocks.0...'); a key of no component -> ('', key)."""
    head, _, rest = key.partition(".")
    return (head, rest) if head in COMPONENTS and rest else ("", key)


def component_configs(metadata: dict | None, source: str) -> dict[str, DoraConfig]:
    """Each component's config from ``lora_adapter_metadata`` (fields prefixed "unet.", ...; unprefixed in
    a single model's own file, as ``save_lora_adapter`` writes it)."""
    grouped: dict[str, dict] = {}
    for key, value in (metadata or {}).items():
        component, field = split_component(key)
        grouped.setdefault(component, {})[field] = value
    return {component: from_peft_dict(fields, source=f"{source} ({component or 'model'} metadata)")
            for component, fields in grouped.items()}


def read_diffusers(tensors: dict[str, Tensor], metadata: dict | None, source: str) -> AdapterSet:
    """The adapters of a diffusers LoRA state dict and its ``lora_adapter_metadata``.

    Raises:
        ValueError: keys of other kinds (LoKr, lora_B bias, ...), a module without its pair, or
            magnitudes the metadata says are not there.
    """
    configs = component_configs(metadata, source)
    parts: dict[tuple[str, str], dict[str, Tensor]] = {}
    for key, value in tensors.items():
        for alias, name in DIFFUSERS_PAIR_ALIASES.items():
            key = key[: -len(alias)] + name if key.endswith(alias) else key
        suffix = next((s for s in SUFFIXES if key.endswith(s)), None)
        if suffix is None:
            raise ValueError(f"{source}: {key!r} is not a LoRA/DoRA tensor (lora_A, lora_B, lora_magnitude_vector); "
                             "dorakit reads LoRA and DoRA adapters.")
        component, path = split_component(key[: -len(suffix)])
        parts.setdefault((component, path), {})[SUFFIXES[suffix]] = value
    components: dict[str, dict[str, LayerAdapter]] = {}
    for (component, path), found in parts.items():
        if "down" not in found or "up" not in found:
            raise ValueError(f"{source}: {component + '.' if component else ''}{path} lacks lora_A or lora_B.")
        config = configs.get(component)
        r = found["down"].shape[0]
        if "alpha" in found:  # a per-module alpha (kohya's meaning: s = alpha / r)
            alpha, rslora = float(found["alpha"].float().item()), False
        elif config is not None:
            alpha, rslora = float(config.alpha_for(path)), config.use_rslora
        else:
            alpha, rslora = float(r), False  # diffusers' rule without metadata: scale 1
        magnitude = found.get("magnitude")
        if magnitude is not None and config is not None and not config.use_dora:
            raise ValueError(f"{source}: {path} has a DoRA magnitude but the metadata says use_dora=false.")
        name = f"{component}.{path}" if component else path
        components.setdefault(component, {})[path] = LayerAdapter(
            found["down"], found["up"], alpha, None if magnitude is None else magnitude.reshape(-1), "out", rslora, name)
    return AdapterSet(components, source, layout="diffusers")


def diffusers_state(adapters: AdapterSet) -> tuple[dict[str, Tensor], dict]:
    """(tensors, lora_adapter_metadata) as diffusers' ``save_lora_weights`` writes them.

    Raises:
        ValueError: an unnamed component, or input-axis magnitudes (diffusers/PEFT have the output axis only).
    """
    tensors, metadata = {}, {}
    for component, layers in adapters.components.items():
        if component not in COMPONENTS:
            raise ValueError(f"{adapters.source}: diffusers files name each pipeline component "
                             f"({', '.join(COMPONENTS)}); name this adapter's (--component unet, or component='unet').")
        if any(layer.magnitude is not None and layer.axis != "out" for layer in layers.values()):
            raise ValueError(
                f"{adapters.source} has DoRA magnitudes on the input axis (dora_scale [1, in]); diffusers and PEFT "
                "compute the output axis only, so the file would load as another model. Keep it as a kohya file "
                "(ComfyUI, A1111 and dorakit read it), or convert with --approximate, which fits an output-axis "
                "adapter and reports the error it introduces."
            )
        tensors.update(peft_tensors(layers, prefix=f"{component}."))
        config = to_peft_dict(to_config(layers, adapters.source))
        metadata.update({f"{component}.{field}": value for field, value in config.items()})
    return tensors, metadata


def write_diffusers(adapters: AdapterSet, directory: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write ``directory/pytorch_lora_weights.safetensors`` with its metadata, whole or not at all."""
    from safetensors.torch import save_file

    tensors, metadata = diffusers_state(adapters)
    directory = Path(directory)
    path = directory / DIFFUSERS_WEIGHTS_NAME
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True (--overwrite) to replace it.")
    header = {"format": "pt", DIFFUSERS_METADATA_KEY: json.dumps(metadata, indent=2, sort_keys=True)}
    atomic.write_file(path, lambda tmp: save_file(tensors, str(tmp), metadata=header))
    return directory


def save_diffusers(models: nn.Module | dict[str, nn.Module], directory: str | os.PathLike, *,
                   component: str | None = None, overwrite: bool = False) -> Path:
    """Save a dorakit adapter as diffusers' own LoRA file (``pipe.load_lora_weights(directory)`` and
    ``UNet2DConditionModel.load_lora_adapter(directory, prefix="unet")`` load it and compute what dorakit does).

    Args:
        models: the adapted model, or {component: model} for several models of one pipeline
            (e.g. {"unet": unet, "text_encoder": text_encoder}).
        directory: where ``pytorch_lora_weights.safetensors`` is written.
        component: the pipeline component of a single model; default: known from its class.
        overwrite: replace an existing file.
    Returns:
        The directory.
    Raises:
        ValueError: an input-axis adapter (diffusers has the output axis only; use ``save_kohya``).

    Example::

        dorakit.save_diffusers(unet, "out/lora")
        pipe.load_lora_weights("out/lora")
    """
    components = {name: from_model(model) for name, model in model_components(models, component).items()}
    return write_diffusers(AdapterSet(components, source=str(directory)), directory, overwrite=overwrite)
