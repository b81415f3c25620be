"""Adapter wrappers per layer type, and the one place that decides which wrapper a module gets."""

from __future__ import annotations

import warnings

from torch import nn

from .base import AdapterLayer, default_adapter_dtype
from .conv import Conv
from .embedding import Embedding
from .input_axis import InputAxisConv, InputAxisLinear, input_axis_class
from .experts import ParameterAdapter, parameter_owner
from .linear import Linear, is_conv1d
from .mha import MultiheadAttention
from .quantized import QuantizedLinear, is_quantized_linear
from .vera import VeraLinear, VeraProjection

def check_vera_target(module: nn.Module, name: str) -> None:
    """Raise ValueError unless ``module`` can take a VeRA adapter (Linear or Conv1D, as in PEFT)."""
    if not (isinstance(module, nn.Linear) or is_conv1d(module)):
        raise ValueError(
            f"Target module '{name}' of type {type(module).__name__} cannot take a VeRA adapter: VeRA adapts "
            "torch.nn.Linear and transformers' Conv1D. Exclude it (exclude_modules) or use direction='lora'."
        )


SUPPORTED_TYPES = ("torch.nn.Linear, transformers' Conv1D, torch.nn.Embedding, torch.nn.Conv1d/Conv2d/Conv3d, "
                   "torch.nn.MultiheadAttention, bitsandbytes' Linear4bit/Linear8bitLt")


def is_supported(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.MultiheadAttention)) \
        or is_conv1d(module)


def wrap_module(
    module: nn.Module,
    *,
    fan_in_fan_out: bool = False,
    name: str = "",
    projection: VeraProjection | None = None,
    d_initial: float = 0.1,
    magnitude_axis: str = "out",
    **kwargs,
) -> AdapterLayer:
    """Wrap one supported module. kwargs: r, lora_alpha, lora_dropout, use_dora, use_rslora,
    init_lora_weights, adapter_dtype (see ``AdapterLayer``). With a shared VeRA ``projection`` the
    direction update is VeRA's (Linear and Conv1D only, as in PEFT). ``magnitude_axis="in"``: one
    magnitude per input column (``layers.input_axis``; DoRA over Linear, Conv1D and groups=1 convs).

    The module's type decides the layout, whatever ``fan_in_fan_out`` says; a disagreeing flag is
    corrected with a warning, as PEFT does.
    """
    where = f" ({name})" if name else ""
    if isinstance(module, AdapterLayer):
        raise ValueError(
            f"Module{where} already has an adapter. Call dorakit.unload(model) or dorakit.merge_and_unload(model) "
            "before adding another."
        )
    if magnitude_axis == "in":
        if not kwargs.get("use_dora", True) or projection is not None or is_quantized_linear(module):
            raise ValueError(f"magnitude_axis='in'{where} is DoRA's input-axis magnitude over a LoRA pair on a "
                             "full-precision base: it needs use_dora=True, direction='lora' and no quantization.")
        wrapper = input_axis_class(module, name)
        if wrapper is InputAxisLinear:
            kwargs["fan_in_fan_out"] = is_conv1d(module)  # Conv1D stores [in, out]: the type decides
        return wrapper(module, **kwargs)
    if is_quantized_linear(module):  # bitsandbytes' layers subclass nn.Linear: checked first
        if projection is not None:
            raise ValueError(f"Target module{where} is quantized; VeRA adapters over quantized bases are not supported.")
        return QuantizedLinear(module, **kwargs)
    if is_conv1d(module) or isinstance(module, nn.Linear):
        transposed = is_conv1d(module)  # Conv1D stores [in, out]
        if fan_in_fan_out != transposed:
            kind, layout = ("transformers' Conv1D", "[in, out]") if transposed else ("torch.nn.Linear", "[out, in]")
            warnings.warn(
                f"fan_in_fan_out={fan_in_fan_out} but the target{where} is {kind}, whose weight is {layout}. "
                f"Using fan_in_fan_out={transposed} for it.",
                stacklevel=3,
            )
        if projection is not None:
            return VeraLinear(module, fan_in_fan_out=transposed, projection=projection, d_initial=d_initial, **kwargs)
        return Linear(module, fan_in_fan_out=transposed, **kwargs)
    if projection is not None:
        check_vera_target(module, name)
    if isinstance(module, nn.Embedding):
        return Embedding(module, **kwargs)
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return Conv(module, **kwargs)
    if isinstance(module, nn.MultiheadAttention):
        return MultiheadAttention(module, **kwargs)
    raise ValueError(
        f"Target module{where} of type {type(module).__module__}.{type(module).__name__} is not supported. "
        f"Supported types: {SUPPORTED_TYPES}. Remove it from target_modules or add it to exclude_modules."
    )


__all__ = ["AdapterLayer", "Conv", "Embedding", "InputAxisConv", "InputAxisLinear", "Linear", "MultiheadAttention",
           "ParameterAdapter", "QuantizedLinear", "SUPPORTED_TYPES", "VeraLinear", "VeraProjection", "check_vera_target",
           "default_adapter_dtype", "input_axis_class", "is_conv1d", "is_quantized_linear", "is_supported",
           "parameter_owner", "wrap_module"]
