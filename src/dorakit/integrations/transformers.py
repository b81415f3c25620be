"""Loading transformers checkpoints by their recorded architecture (transformers is optional)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

import torch
from torch import nn

DTypeName = Literal["auto", "float32", "bfloat16", "float16"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SAFETENSORS_WEIGHTS, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth", "model.bin")


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


def check_checkpoint_dir(path: str | os.PathLike, what: str = "Model directory") -> Path:
    """A local transformers checkpoint with safetensors weights, or an error saying what is wrong and what
    to do, before transformers is asked (a missing path would otherwise be tried as a hub name).

    Weights stored only as a pickle (``pytorch_model.bin``) are refused, never loaded: unpickling can run
    code, and every loader here passes ``use_safetensors=True`` so transformers never falls back to one.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} {path} does not exist (dorakit reads local checkpoints; it downloads nothing).")
    if not path.is_dir():
        raise NotADirectoryError(f"{what} {path} is a file; give a transformers checkpoint directory (what "
                                 "save_pretrained writes).")
    config = path / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{path} has no config.json; --model must be a transformers checkpoint directory "
                                "(what save_pretrained writes).")
    try:
        content = json.loads(config.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{config} is not valid JSON ({err}); this is not a usable transformers checkpoint.") from None
    if not isinstance(content, dict):
        raise ValueError(f"{config} must hold a JSON object (a transformers model config).")
    index = path / SAFETENSORS_INDEX
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (ValueError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"{index} is not a valid safetensors index ({type(err).__name__}: {err}).") from None
        missing = [name for name in shards if not (path / name).is_file()]
        if missing:
            raise FileNotFoundError(f"{path} lacks {len(missing)} weight shard(s) its index names: {', '.join(missing[:3])}.")
    elif not (path / SAFETENSORS_WEIGHTS).is_file():
        pickles = [name for name in PICKLE_WEIGHTS if (path / name).is_file()]
        if pickles:
            raise ValueError(
                f"{path} holds its weights only as {pickles[0]}, a pickle file, which dorakit never loads (unpickling "
                "can run code). Convert it once, where you trust the file: load it with transformers' "
                "from_pretrained and save_pretrained it again (that writes model.safetensors).")
        raise FileNotFoundError(f"{path} has a config but no weights (no {SAFETENSORS_WEIGHTS} or {SAFETENSORS_INDEX}).")
    return path


def load_pretrained(path: str | os.PathLike, dtype: DTypeName = "auto", quantization=None) -> nn.Module:
    """Load a transformers model with the class its config names (``architectures[0]``), so a
    causal LM comes back with its LM head and a classifier with its classification head.
    ``quantization`` (a ``dorakit.integrations.bitsandbytes.Quantization``) loads its linear layers in 4 or 8 bits."""
    path = check_checkpoint_dir(path)
    transformers = require_transformers()
    config = transformers.AutoConfig.from_pretrained(path)
    names = getattr(config, "architectures", None) or []
    model_class = getattr(transformers, names[0], None) if names else None
    if model_class is None:
        model_class = transformers.AutoModel
    return model_class.from_pretrained(path, dtype=torch_dtype(dtype), use_safetensors=True,
                                       **quantized_loading(quantization, dtype))


def load_tokenizer(path: str | os.PathLike):
    """The checkpoint's tokenizer, or None when it has none."""
    transformers = require_transformers()
    try:
        return transformers.AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError):
        return None
