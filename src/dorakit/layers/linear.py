"""DoRA/LoRA over ``nn.Linear`` and transformers' GPT-2 ``Conv1D``.

nn.Linear stores its weight as [out, in]; Conv1D stores [in, out] (``fan_in_fan_out``). The row view
hands the math the same [out, in] matrix for both (a transpose view, never a copy), and
``lora_A``/``lora_B`` are ``nn.Linear`` modules in both cases, as in PEFT.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import AdapterLayer


def is_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D, recognised without importing transformers (a model holding one has
    already imported it)."""
    pytorch_utils = sys.modules.get("transformers.pytorch_utils")
    conv1d = getattr(pytorch_utils, "Conv1D", None)
    return conv1d is not None and isinstance(module, conv1d)


class Linear(AdapterLayer):
    """Adapter over ``nn.Linear`` (``fan_in_fan_out=False``) or GPT-2 ``Conv1D`` (``True``)."""

    def __init__(self, base_layer: nn.Module, *, fan_in_fan_out: bool = False, **kwargs) -> None:
        self.fan_in_fan_out = fan_in_fan_out
        super().__init__(base_layer, **kwargs)

    def weight_rows(self, weight: Tensor) -> Tensor:
        return weight.T if self.fan_in_fan_out else weight  # [out, in]

    def create_adapter(self, r: int, *, device: torch.device, dtype: torch.dtype) -> None:
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=dtype)

    def lora_A_rows(self) -> Tensor:
        return self.lora_A.weight

    def lora_B_rows(self) -> Tensor:
        return self.lora_B.weight

    def lora_A_forward(self, x: Tensor) -> Tensor:
        return self.lora_A(x)

    def lora_B_weight(self) -> Tensor:
        return self.lora_B.weight

    def lora_B_forward(self, hidden: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        return F.linear(hidden, weight, bias)

    def base_forward_without_bias(self, x: Tensor) -> Tensor:
        weight = self.base_weight()
        return F.linear(x.to(weight.dtype), self.weight_rows(weight))
