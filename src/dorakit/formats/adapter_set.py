"""One adapter, whatever file holds it: per module, the LoRA pair, its scale, and DoRA's magnitude with its axis.

Every layout reads into an ``AdapterSet`` and writes from one (``formats/diffusers.py``, ``formats/kohya.py``,
``formats/peft_layers.py``), so a conversion is a read and a write, and loading a file into a model is a read
and ``load_into``. The layouts differ only in key names (``formats/keys.py``), where the scale lives (a
kohya ``alpha`` per module, PEFT's config) and the magnitude's shape; the numbers are the same:

    W' = m / ||W0 + s B A||_axis * (W0 + s B A)     s = alpha / r (alpha / sqrt(r) with rsLoRA)
    axis "out": m [out], one per output row;  axis "in": m [in], one per input channel (issue 16)
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor, nn

from ..config import DoraConfig
from ..functional import lora_scaling
from ..inject import CONFIG_ATTR, adapter_layers, inject_adapters, unload
from ..layers import Conv, Embedding, MultiheadAttention, ParameterAdapter, VeraLinear, is_conv1d
from ..modules_to_save import ModulesToSave
from .keys import CLIP_TEXT_MODEL, PEFT_PREFIX, component_of_class, flattened_clip

SHOWN = 5  # offending names listed per kind of problem


@dataclass
class LayerAdapter:
    """One adapted module as every layout stores it."""

    down: Tensor  # A: [r, in] or [r, in, *kernel]  (PEFT lora_A, kohya lora_down)
    up: Tensor  # B: [out, r] or [out, r, 1, ...]  (PEFT lora_B, kohya lora_up)
    alpha: float  # s = alpha / r, or alpha / sqrt(r) with rslora
    magnitude: Tensor | None = None  # DoRA's m, 1-D: [out] (axis "out") or [in] (axis "in")
    axis: str = "out"
    rslora: bool = False
    name: str = ""  # the module's name in the file it came from, for messages

    @property
    def r(self) -> int:
        return self.down.shape[0]

    @property
    def scaling(self) -> float:
        return lora_scaling(self.r, self.alpha, self.rslora)

    def magnitude_shape(self) -> tuple[int, ...]:
        """dorakit's (and PEFT's) parameter shape: [out] (Linear) or [1, out, 1, ...] (conv); the input
        axis as LyCORIS: [1, in] or [1, in, 1, ...]."""
        size, kernel = self.magnitude.numel(), self.down.dim() - 2
        if self.axis == "in":
            return (1, size) + (1,) * kernel
        return (1, size) + (1,) * kernel if kernel else (size,)


@dataclass
class AdapterSet:
    """The adapters of a file: component ("unet", "text_encoder", ... or "" for a plain model) -> path -> layer."""

    components: dict[str, dict[str, LayerAdapter]]
    source: str  # the file, for messages
    unresolved: dict[str, list[str]] = field(default_factory=dict)  # component -> file names no module has
    layout: str = ""  # "peft", "diffusers" or "kohya": what it was read from


def model_components(models: nn.Module | dict[str, nn.Module], component: str | None = None) -> dict[str, nn.Module]:
    """{component: model} from one model (its component named or known from its class) or a dict."""
    if isinstance(models, dict):
        return dict(models)
    name = component or component_of_class(type(models).__name__)
    if name is None:
        raise ValueError(
            f"Which pipeline component is this {type(models).__name__}? Pass component='unet' (or 'transformer', "
            "'text_encoder', 'text_encoder_2', ...), or a dict {component: model}."
        )
    return {name: models}


def from_model(model: nn.Module) -> dict[str, LayerAdapter]:
    """The adapter of a dorakit-adapted model, keyed by the module paths files use.

    Raises:
        ValueError: parts no LoRA file layout holds (VeRA, modules_to_save, trained biases, embeddings,
            grouped convolutions, parameter and expert adapters, nn.MultiheadAttention): converting would
            lose them.
    """
    config = getattr(model, CONFIG_ATTR, None)
    if not isinstance(config, DoraConfig):
        raise ValueError("This model has no dorakit adapter; call dorakit.inject_adapters or dorakit.load_adapter first.")
    lost = []
    if config.direction != "lora":
        lost.append(f"direction={config.direction!r}")
    if config.bias != "none":
        lost.append(f"bias={config.bias!r} (trained biases)")
    if any(isinstance(m, ModulesToSave) for m in model.modules()):
        lost.append("modules_to_save")
    prefix = CLIP_TEXT_MODEL if flattened_clip(model) else ""
    out = {}
    for path, layer in adapter_layers(model):
        if isinstance(layer, ParameterAdapter):  # issue 17: PEFT's ParamWrapper layout, no per-module pair
            lost.append(f"'{path}' (parameter {layer.parameter_name!r}, target_parameters)")
            continue
        if isinstance(layer, (Embedding, VeraLinear, MultiheadAttention)) or (
                isinstance(layer, Conv) and layer.base_layer.groups > 1):
            kind = type(layer.base_layer).__name__ + (", grouped" if isinstance(layer, Conv) else "")
            lost.append(f"'{path}' ({kind})")
            continue
        magnitude = None if layer.lora_magnitude_vector is None else layer.lora_magnitude_vector.detach().reshape(-1)
        out[prefix + path] = LayerAdapter(layer.lora_A.weight.detach(), layer.lora_B.weight.detach(), layer.lora_alpha,
                                          magnitude, config.magnitude_axis, layer.use_rslora, prefix + path)
    if lost:
        raise ValueError(f"This adapter has parts the LoRA file layouts cannot hold: {', '.join(lost)}. Save it in "
                         "PEFT's format (dorakit.save_adapter) instead.")
    return out


def path_regex(path: str) -> str:
    """A regex of exactly this module path. A CLIP path under ``text_model.`` matches without that level too:
    transformers 5's CLIPTextModel lacks it, and diffusers strips it from keys but not from the config."""
    if path.startswith(CLIP_TEXT_MODEL):
        return "(?:" + re.escape(CLIP_TEXT_MODEL) + ")?" + re.escape(path[len(CLIP_TEXT_MODEL):])
    return re.escape(path)


def anchored(path: str) -> str:
    """A rank/alpha pattern key that matches exactly this module path (PEFT and dorakit read '^' as the start)."""
    return "^" + path_regex(path)


def to_config(layers: dict[str, LayerAdapter], source: str = "the adapter") -> DoraConfig:
    """The ``DoraConfig`` that rebuilds exactly these layers: the most common rank and alpha, patterns for
    the rest, and the exact module paths as targets."""
    if not layers:
        raise ValueError(f"{source} holds no LoRA/DoRA layers.")
    kinds = Counter((l.magnitude is not None, l.axis if l.magnitude is not None else None, l.rslora)
                    for l in layers.values())
    if len(kinds) > 1:
        raise ValueError(f"{source} mixes layers of different kinds (with/without magnitude, magnitude axis, rsLoRA: "
                         f"{sorted(kinds, key=str)}); dorakit loads one kind per adapter.")
    (use_dora, axis, rslora), = kinds
    r = Counter(l.r for l in layers.values()).most_common(1)[0][0]
    alpha = Counter(l.alpha for l in layers.values()).most_common(1)[0][0]
    return DoraConfig(
        r=r, lora_alpha=alpha, use_dora=use_dora, use_rslora=rslora, magnitude_axis=axis or "out",
        target_modules="(" + "|".join(path_regex(p) for p in layers) + ")",  # exactly these paths
        rank_pattern={anchored(p): l.r for p, l in layers.items() if l.r != r},
        alpha_pattern={anchored(p): l.alpha for p, l in layers.items() if l.alpha != alpha},
    )


def peft_tensors(layers: dict[str, LayerAdapter], prefix: str = PEFT_PREFIX) -> dict[str, Tensor]:
    """PEFT's tensors for these layers (keys ``prefix + path + .lora_A.weight`` ...), in dorakit's shapes."""
    out = {}
    for path, layer in layers.items():
        out[f"{prefix}{path}.lora_A.weight"] = layer.down.contiguous()
        out[f"{prefix}{path}.lora_B.weight"] = layer.up.contiguous()
        if layer.magnitude is not None:
            out[f"{prefix}{path}.lora_magnitude_vector"] = layer.magnitude.reshape(layer.magnitude_shape()).contiguous()
    return out


def _fit(layer: LayerAdapter, module: nn.Module) -> LayerAdapter | str:
    """The layer in the module's shapes (a 1x1 conv pair read for a Linear, or back), or why it does not fit."""
    if not (isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) or is_conv1d(module)):
        return f"a {type(module).__name__}, which these files do not adapt"
    weight = module.weight
    out_features, in_features = weight.shape[::-1] if is_conv1d(module) else weight.shape[:2]  # Conv1D: [in, out]
    kernel = tuple(weight.shape[2:])
    if (layer.down.shape[1] != in_features or layer.down.numel() != layer.r * in_features * math.prod(kernel)
            or layer.up.numel() != out_features * layer.r):
        return f"file {list(layer.down.shape)} / {list(layer.up.shape)} vs module weight {list(weight.shape)}"
    if layer.magnitude is not None:
        expected = in_features if layer.axis == "in" else out_features
        if layer.magnitude.numel() != expected:
            return f"a magnitude of {layer.magnitude.numel()} for {expected} {layer.axis}put channels"
    return replace(layer, down=layer.down.reshape(layer.r, in_features, *kernel),  # [r, in, *k]
                   up=layer.up.reshape(out_features, layer.r, *(1,) * len(kernel)))  # [out, r, 1, ...]


def resolve(model: nn.Module, layers: dict[str, LayerAdapter], source: str,
            unresolved: list[str] = ()) -> dict[str, LayerAdapter]:
    """The layers keyed by the model's own paths and fitted to its modules' shapes.

    Raises:
        ValueError: the file names modules the model lacks, or modules of other shapes or kinds (the
            first few of each are listed): it was made for another model.
    """
    modules = dict(model.named_modules())
    alias = flattened_clip(model)
    missing, mismatched, out = list(unresolved), [], {}
    for path, layer in layers.items():
        ours = path[len(CLIP_TEXT_MODEL):] if alias and path.startswith(CLIP_TEXT_MODEL) else path
        if ours not in modules:
            missing.append(layer.name or path)
            continue
        fitted = _fit(layer, modules[ours])
        if isinstance(fitted, str):
            mismatched.append(f"{layer.name or path}: {fitted}")
        else:
            out[ours] = fitted
    problems = []
    if missing:
        problems.append(f"{len(missing)} module(s) not in the model: {_first(missing)}")
    if mismatched:
        problems.append(f"{len(mismatched)} module(s) of another shape or kind: {_first(mismatched)}")
    if problems:
        raise ValueError(f"{source} does not fit this {type(model).__name__} (a file for another model?): "
                         + "; ".join(problems) + ".")
    return out


def load_into(model: nn.Module, layers: dict[str, LayerAdapter], source: str, *, unresolved: list[str] = (),
              adapter_dtype: torch.dtype | None = None) -> nn.Module:
    """Wrap ``model`` for these layers and load their tensors, strictly; the model is unchanged on any error."""
    from .peft import load_adapter_tensors

    fitted = resolve(model, layers, source, unresolved)
    inject_adapters(model, to_config(fitted, source), adapter_dtype=adapter_dtype)
    try:
        load_adapter_tensors(model, peft_tensors(fitted), source=source)
    except BaseException:
        unload(model)
        raise
    return model


def _first(items: list[str]) -> str:
    more = f", ... ({len(items) - SHOWN} more)" if len(items) > SHOWN else ""
    return ", ".join(items[:SHOWN]) + more
