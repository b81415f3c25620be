"""Loading transformers checkpoints by their recorded architecture (transformers is optional)."""

from __future__ import annotations

import os
from typing import Literal

import torch
from torch import nn

DTypeName = Literal["auto", "float32", "bfloat16", "float16"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: DTypeName) -> torch.dtype | str:
    """What transformers' ``from_pretrained(dtype=...)`` takes for a dtype name ("auto": the checkpoint's)."""
    return "auto" if name == "auto" else DTYPES[name]


def require_transformers():
    try:
        import transformers
    except ImportError:
        raise ImportError(
            "This needs transformers: pip install 'dorakit[hf]' (or pip install transformers)."
        ) from None
    return transformers


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def quantized_loading(quantization, dtype: DTypeName, device: torch.device | None = None) -> dict:
    """``from_pretrained`` keyword arguments that load the base quantized (none when ``quantization``
    is None): bitsandbytes layers computing in ``dtype`` (auto: bf16 on GPUs that have it, else
    fp32), placed on ``device`` at load, since a quantized model cannot be moved afterwards."""
    if quantization is None:
        return {}
    device = device or default_device()
    compute = DTYPES.get(dtype)
    if compute is None:
        compute = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return {"quantization_config": quantization.transformers_config(compute), "device_map": {"": device}}


def place(model: nn.Module, device: torch.device) -> nn.Module:
    """``model.to(device)``, except for a quantized model, which was placed when it was loaded."""
    if getattr(model, "hf_quantizer", None) is not None:
        return model
    return model.to(device)


def load_pretrained(path: str | os.PathLike, dtype: DTypeName = "auto", quantization=None) -> nn.Module:
    """Load a transformers model with the class its config names (``architectures[0]``), so a
    causal LM comes back with its LM head and a classifier with its classification head.
    ``quantization`` (a ``dorakit.integrations.bitsandbytes.Quantization``) loads its linear layers in 4 or 8 bits."""
    transformers = require_transformers()
    config = transformers.AutoConfig.from_pretrained(path)
    names = getattr(config, "architectures", None) or []
    model_class = getattr(transformers, names[0], None) if names else None
    if model_class is None:
        model_class = transformers.AutoModel
    return model_class.from_pretrained(path, dtype=torch_dtype(dtype), **quantized_loading(quantization, dtype))


def load_tokenizer(path: str | os.PathLike):
    """The checkpoint's tokenizer, or None when it has none."""
    transformers = require_transformers()
    try:
        return transformers.AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError):
        return None
