"""Quantized bases (QLoRA / QDoRA): how a base model is loaded in 4 or 8 bits, and how a merged
model is measured against re-quantization.

Loading goes through transformers' ``BitsAndBytesConfig`` (the quantizer users already run); the
adapters over the quantized layers are ``dorakit.layers.QuantizedLinear``. FinLoRA's ``quant_bits``
4/8 is ``Quantization(bits=4|8)`` here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from ..layers.quantized import dequantize_module, is_quantized_linear, require_bitsandbytes

QuantizeName = Literal["none", "4bit", "8bit"]
QuantType = Literal["nf4", "fp4"]


@dataclass(frozen=True)
class Quantization:
    """How the frozen base is quantized: 4-bit NF4/FP4 (optionally double-quantized) or 8-bit LLM.int8."""

    bits: int  # 4 or 8
    quant_type: str = "nf4"  # 4-bit only: nf4 (QLoRA's default) or fp4
    double_quant: bool = True  # 4-bit only: quantize the per-block scales too (saves ~0.4 bit per weight)

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise ValueError(f"Quantization bits must be 4 or 8, got {self.bits!r}.")
        if self.quant_type not in ("nf4", "fp4"):
            raise ValueError(f"4-bit quantization type must be 'nf4' or 'fp4', got {self.quant_type!r}.")

    @classmethod
    def parse(cls, name: str, quant_type: str = "nf4", double_quant: bool = True) -> Quantization | None:
        """``"none"`` -> None, ``"4bit"``/``"8bit"`` -> a Quantization (the CLI's spelling)."""
        if name in (None, "none"):
            return None
        if name not in ("4bit", "8bit"):
            raise ValueError(f"--quantize must be none, 4bit or 8bit, got {name!r}.")
        return cls(int(name[0]), quant_type, double_quant)

    def transformers_config(self, compute_dtype: torch.dtype):
        """transformers' ``BitsAndBytesConfig`` for ``from_pretrained(quantization_config=...)``."""
        require_bitsandbytes()
        from transformers import BitsAndBytesConfig

        if self.bits == 8:
            return BitsAndBytesConfig(load_in_8bit=True)
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=self.quant_type,
                                  bnb_4bit_use_double_quant=self.double_quant, bnb_4bit_compute_dtype=compute_dtype)


@torch.no_grad()
def requantization_error(weight: Tensor, quantization: Quantization) -> tuple[float, float]:
    """(||Q(W) - W||^2, ||W||^2) for W quantized as ``quantization`` and dequantized again, summed
    in fp64: what storing a merged weight back in 4 or 8 bits would lose."""
    bnb = require_bitsandbytes()
    f = bnb.functional
    if quantization.bits == 4:
        packed, state = f.quantize_4bit(weight, blocksize=64, quant_type=quantization.quant_type,
                                        compress_statistics=quantization.double_quant)
        restored = f.dequantize_4bit(packed, state).to(weight.dtype)
    else:
        # As Int8Params quantizes: through fp16, one absmax per row.
        int8, scales, _ = f.int8_vectorwise_quant(weight.half())
        restored = f.int8_vectorwise_dequant(int8, scales).to(weight.dtype)
    diff = (restored.double() - weight.double()).square().sum().item()
    return diff, weight.double().square().sum().item()


def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every remaining bitsandbytes layer by its full-precision ``nn.Linear`` (in place) and
    drop the model's quantization settings, so ``save_pretrained`` writes a plain checkpoint."""
    from ..inject import replace_module

    for path, module in list(model.named_modules()):
        if is_quantized_linear(module):
            replace_module(model, path, dequantize_module(module, dtype))
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "quantization_config"):
        del config.quantization_config
    for attr in ("is_loaded_in_4bit", "is_loaded_in_8bit", "is_quantized"):
        if getattr(model, attr, False):
            setattr(model, attr, False)
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    return model


def floating_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's full-precision parameters (embeddings, norms): what its merged
    checkpoint is written in."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def save_merged_dequantized(
    model: nn.Module,
    directory: str | os.PathLike,
    *,
    tokenizer=None,
    overwrite: bool = False,
    requantize: Quantization | None = None,
    requantized_directory: str | os.PathLike | None = None,
) -> dict:
    """Merge the adapters of a model over a quantized base into its *dequantized* weights (the
    weights it was trained against) and write a plain full-precision transformers checkpoint.

    With ``requantize``, also measure what storing each merged weight back in that format loses
    and, given ``requantized_directory``, write that re-quantized checkpoint (transformers' own
    bitsandbytes serialization, loadable with ``from_pretrained`` alone). The model is consumed.

    Returns:
        {"layers": merged layers, "dtype": ..., "requantization": {"relative_error": ||Q(W) - W|| / ||W||
        over all merged weights, "worst_layer": ..., "worst_relative_error": ...}} (the last when measured).
    """
    from .. import atomic
    from ..formats.merged import refuse_non_finite
    from ..inject import adapter_layers, merge_and_unload

    dtype = floating_dtype(model)
    paths = [path for path, _ in adapter_layers(model)]
    merge_and_unload(model)  # merged layers come back in their compute dtype: the checkpoint's is ``dtype``
    for path in paths:
        model.get_submodule(path).to(dtype)
    dequantize_model(model, dtype)
    for path in paths:  # never write a non-finite merged weight (issue 19)
        refuse_non_finite(path, model.get_submodule(path).weight.detach())
    report: dict = {"layers": len(paths), "dtype": str(dtype).replace("torch.", "")}
    if requantize is not None:
        per_layer = {path: requantization_error(model.get_submodule(path).weight.detach(), requantize) for path in paths}
        total_diff, total_norm = (sum(v[i] for v in per_layer.values()) for i in (0, 1))
        worst = max(per_layer, key=lambda p: per_layer[p][0] / max(per_layer[p][1], 1e-30))
        report["requantization"] = {
            "format": f"{requantize.bits}bit" + (f" {requantize.quant_type}" if requantize.bits == 4 else ""),
            "relative_error": (total_diff / max(total_norm, 1e-30)) ** 0.5,
            "worst_layer": worst,
            "worst_relative_error": (per_layer[worst][0] / max(per_layer[worst][1], 1e-30)) ** 0.5,
        }
    with atomic.new_directory(directory, overwrite=overwrite, what="merged checkpoint") as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    if requantize is not None and requantized_directory is not None:
        from .transformers import load_pretrained

        requantized = load_pretrained(directory, "auto", requantize)
        with atomic.new_directory(requantized_directory, overwrite=overwrite, what="re-quantized checkpoint") as tmp:
            requantized.save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
    return report
