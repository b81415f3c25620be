"""kohya / LyCORIS / OneTrainer single-file adapters (A1111, ComfyUI, Forge, SD.Next read them).

One ``.safetensors`` file; per module, under ``lora_unet_<path_with_underscores>`` (``lora_transformer_`` for
DiT transformers, ``lora_te_`` / ``lora_te1_`` / ``lora_te2_`` / ``lora_te3_`` for text encoders,
``lycoris_`` for SimpleTuner's):

    .lora_down.weight   A [r, in] or [r, in, *kernel]
    .lora_up.weight     B [out, r] or [out, r, 1, ...]
    .alpha              scalar; s = alpha / r (missing or 0: alpha = r, LyCORIS's rule)
    .dora_scale         DoRA's magnitude: [out, 1, ...] (output axis, LyCORIS since 2025-04) or
                        [1, in, ...] (input axis: LyCORIS before, OneTrainer), read from its shape

LyCORIS computes W' = dora_scale * (W0 + s B A) / (||W0 + s B A||_axis + eps) with eps the weight
dtype's machine epsilon (1.2e-7 in fp32); dorakit's norm is clamped at 1e-12 instead, a difference of
eps / ||.|| relative. ComfyUI's output-axis branch divides by ||W0|| instead of ||W0 + s B A||, so it
does not compute what LyCORIS trained for output-axis files (its input-axis branch does).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from torch import Tensor, nn

from .. import atomic
from .adapter_set import AdapterSet, LayerAdapter, from_model, model_components
from .keys import (KOHYA_ALPHA, KOHYA_DOWN, KOHYA_FOREIGN, KOHYA_MAGNITUDE, KOHYA_ORIGINAL_LAYOUTS,
                   KOHYA_PREFIXES, KOHYA_SUFFIXES, KOHYA_UP, decode_kohya_name, kohya_name, kohya_prefixes,
                   split_kohya_key)


def is_kohya(keys) -> bool:
    """Whether file keys are kohya/LyCORIS's (a known prefix and LoRA's down/up names)."""
    keys = list(keys)
    return any(k.endswith(KOHYA_DOWN) or k.endswith(KOHYA_MAGNITUDE) for k in keys) and all(
        split_kohya_key(k) is not None for k in keys)


def read_kohya(tensors: dict[str, Tensor], source: str, paths: dict[str, dict[str, list[str]]] | None = None,
               denoiser: str | None = None) -> AdapterSet:
    """The adapters of a kohya/LyCORIS state dict.

    Args:
        tensors: the file's tensors.
        source: the file, for messages.
        paths: component -> underscored path -> the model's paths (``keys.underscored_paths``): exact
            names. Without it names are decoded against the vocabulary of known model names.
        denoiser: the component ``lycoris_`` names mean ("unet" or "transformer"); guessed from the names
            when None.
    Raises:
        ValueError: keys of other algorithms (LoHa, LoKr, Tucker...), a module without its pair, a
            magnitude of neither axis's shape, original (non-diffusers) module names.
    """
    entries: dict[tuple[str, str], dict[str, Tensor]] = {}
    for key, value in tensors.items():
        split = split_kohya_key(key)
        if split is None:
            raise ValueError(f"{source}: {key!r} is not a kohya/LyCORIS LoRA key (prefixes {sorted(KOHYA_PREFIXES)}).")
        prefix, name, suffix = split
        if suffix not in KOHYA_SUFFIXES:
            kind = next((what for marker, what in KOHYA_FOREIGN.items() if suffix.startswith(marker)), f"'{suffix}'")
            raise ValueError(f"{source} holds {kind} ({key}); dorakit reads LoRA and DoRA (lora_down, lora_up, alpha, "
                             "dora_scale).")
        entries.setdefault((prefix, name), {})[suffix] = value
    components: dict[str, dict[str, LayerAdapter]] = {}
    unresolved: dict[str, list[str]] = {}
    for (prefix, name), parts in entries.items():
        component = KOHYA_PREFIXES[prefix]
        if component == "denoiser":
            component = denoiser or guess_denoiser(name)
        if name.startswith(KOHYA_ORIGINAL_LAYOUTS):
            raise ValueError(
                f"{source} names modules of the original model code ({prefix}{name}: SGM/LDM UNet, BFL Flux or SAI "
                "SD3 layout), not diffusers' module paths; dorakit reads files of diffusers' names. Convert the file "
                "with diffusers (pipe.load_lora_weights, then dorakit's own save) first."
            )
        layer = _layer(parts, prefix + name, source)
        known = None if paths is None else paths.get(component, {})
        path = decode_kohya_name(name, known)
        if path is None:
            unresolved.setdefault(component, []).append(prefix + name)
            continue
        components.setdefault(component, {})[path] = layer
    return AdapterSet(components, source, unresolved, layout="kohya")


def _layer(parts: dict[str, Tensor], name: str, source: str) -> LayerAdapter:
    if KOHYA_DOWN not in parts or KOHYA_UP not in parts:
        have = sorted(parts)
        raise ValueError(f"{source}: {name} has {have} but not both {KOHYA_DOWN} and {KOHYA_UP}.")
    down, up = parts[KOHYA_DOWN], parts[KOHYA_UP]
    r = down.shape[0]
    if up.shape[1] != r:
        raise ValueError(f"{source}: {name} has lora_down {list(down.shape)} and lora_up {list(up.shape)}: ranks differ.")
    alpha = float(parts[KOHYA_ALPHA].float().item()) if KOHYA_ALPHA in parts else 0.0
    layer = LayerAdapter(down, up, alpha or float(r), name=name)  # no alpha, or 0: alpha = r (LyCORIS)
    scale = parts.get(KOHYA_MAGNITUDE)
    if scale is not None:
        layer.magnitude, layer.axis = scale.reshape(-1), _axis(scale, up.shape[0], down.shape[1], name, source)
    return layer


def _axis(scale: Tensor, out_features: int, in_features: int, name: str, source: str) -> str:
    """The magnitude's axis from its shape: [out, 1, ...] output, [1, in, ...] input; 1-D as ComfyUI reads it."""
    shape = tuple(scale.shape)
    rest = shape[2:]
    if len(shape) >= 2 and all(d == 1 for d in rest):
        if shape[:2] == (out_features, 1):
            return "out"
        if shape[:2] == (1, in_features):
            return "in"
    if len(shape) == 1 and shape[0] in (out_features, in_features):
        return "out" if shape[0] == out_features else "in"  # ComfyUI's rule: the leading size decides
    raise ValueError(f"{source}: {name}.dora_scale is {list(shape)}; for a [{out_features}, {in_features}] layer it "
                     f"must be [{out_features}, 1, ...] (output axis) or [1, {in_features}, ...] (input axis).")


def guess_denoiser(name: str) -> str:
    """The denoiser a ``lycoris_`` name belongs to: a UNet's blocks, else a transformer."""
    unet_parts = ("down_blocks", "up_blocks", "mid_block", "conv_in", "conv_out", "time_embedding")
    return "unet" if name.startswith(unet_parts) else "transformer"


def kohya_alpha(layer: LayerAdapter) -> float:
    """The alpha to store: kohya has no rsLoRA flag, so an rsLoRA layer gets the alpha of the same scale."""
    return layer.alpha * math.sqrt(layer.r) if layer.rslora else layer.alpha  # s = alpha / r either way


def kohya_tensors(adapters: AdapterSet) -> dict[str, Tensor]:
    """The kohya/LyCORIS state dict of ``adapters`` (see the module doc for the keys and shapes)."""
    prefixes = kohya_prefixes(list(adapters.components))
    out: dict[str, Tensor] = {}
    for component, layers in adapters.components.items():
        if component not in prefixes:
            raise ValueError(f"{adapters.source}: kohya files name pipeline components (unet, transformer, "
                             "text_encoder, text_encoder_2, text_encoder_3); name this adapter's (--component unet, "
                             "or component='unet').")
        for path, layer in layers.items():
            name = kohya_name(prefixes[component], path)
            out[f"{name}.{KOHYA_DOWN}"] = layer.down.contiguous()
            out[f"{name}.{KOHYA_UP}"] = layer.up.contiguous()
            out[f"{name}.{KOHYA_ALPHA}"] = torch.tensor(kohya_alpha(layer), dtype=torch.float32)
            if layer.magnitude is not None:
                kernel = (1,) * (layer.down.dim() - 2)
                shape = (1, -1) + kernel if layer.axis == "in" else (-1, 1) + kernel  # [1, in, ...] / [out, 1, ...]
                out[f"{name}.{KOHYA_MAGNITUDE}"] = layer.magnitude.reshape(shape).contiguous()
    return out


def kohya_metadata(adapters: AdapterSet) -> dict[str, str]:
    """Header fields kohya's tools and LyCORIS write (what A1111 and ComfyUI show about a file)."""
    layers = [layer for layers in adapters.components.values() for layer in layers.values()]
    dora = any(layer.magnitude is not None for layer in layers)
    args = {"algo": "lora", "dora_wd": str(dora)}
    if dora:
        args["wd_on_output"] = str(layers[0].axis == "out")
    meta = {"format": "pt", "ss_network_module": "lycoris.kohya", "ss_network_args": json.dumps(args)}
    ranks, alphas = {layer.r for layer in layers}, {kohya_alpha(layer) for layer in layers}
    if len(ranks) == 1 and len(alphas) == 1:
        meta.update(ss_network_dim=str(ranks.pop()), ss_network_alpha=f"{alphas.pop():g}")
    return meta


def write_kohya(adapters: AdapterSet, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write ``adapters`` as one kohya/LyCORIS ``.safetensors`` file, whole or not at all."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"A kohya/LyCORIS adapter is one .safetensors file; got {path}.")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True (--overwrite) to replace it.")
    tensors, meta = kohya_tensors(adapters), kohya_metadata(adapters)
    atomic.write_file(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
    return path


def save_kohya(models: nn.Module | dict[str, nn.Module], path: str | os.PathLike, *, component: str | None = None,
               overwrite: bool = False) -> Path:
    """Save a dorakit adapter as a kohya/LyCORIS file (both magnitude axes; ComfyUI and A1111 read it).

    Args:
        models: the adapted model, or {component: model} for several models of one pipeline.
        path: the ``.safetensors`` file to write.
        component: the pipeline component of a single model ("unet", "transformer", "text_encoder", ...);
            default: known from its class (UNet2DConditionModel is "unet").
        overwrite: replace an existing file.
    Returns:
        The file.

    Example::

        dorakit.save_kohya(unet, "out/my_lora.safetensors")   # lora_unet_..._to_q.lora_down.weight, ...
    """
    components = {name: from_model(model) for name, model in model_components(models, component).items()}
    return write_kohya(AdapterSet(components, source=str(path)), path, overwrite=overwrite)

