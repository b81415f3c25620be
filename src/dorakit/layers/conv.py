"""DoRA/LoRA over ``nn.Conv1d``, ``nn.Conv2d`` and ``nn.Conv3d``, grouped convolutions included.

Weight [out, in/groups, *k] viewed as rows [out, (in/groups)*prod(k)]. ``lora_A`` is a convolution
like the base (kernel, stride, padding, dilation, padding mode, groups) into r channels and
``lora_B`` a grouped 1x1 convolution back to ``out``. Because A keeps the base's groups and
dilation, the update s*B*A has exactly the base weight's structure and merges into it; PEFT's A
ignores both, which is why PEFT cannot merge grouped convolutions. With groups = 1 and no
dilation the parameters have PEFT's shapes. The magnitude has PEFT's shape [1, out, 1, ...].
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import AdapterLayer


class Conv(AdapterLayer):
    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        groups = base_layer.groups
        r = kwargs.get("r")
        if isinstance(r, int) and r > 0 and r % groups:
            raise ValueError(
                f"r={r} must be divisible by groups={groups} of this {type(base_layer).__name__}: each group "
                f"gets rank r/groups. Use r={groups * max(1, r // groups)} or exclude this layer."
            )
        super().__init__(base_layer, **kwargs)

    def weight_rows(self, weight: Tensor) -> Tensor:
        return weight.reshape(weight.shape[0], -1)  # [out, in/groups * prod(k)]; a view when contiguous

    def create_adapter(self, r: int, *, device: torch.device, dtype: torch.dtype) -> None:
        base = self.base_layer
        conv = type(base)
        factory = dict(device=device, dtype=dtype, bias=False)
        self.lora_A = conv(
            base.in_channels, r, base.kernel_size, base.stride, base.padding, base.dilation,
            groups=base.groups, padding_mode=base.padding_mode, **factory,
        )
        ones = (1,) * (base.weight.dim() - 2)
        self.lora_B = conv(r, base.out_channels, ones, ones, groups=base.groups, **factory)

    def lora_A_rows(self) -> Tensor:
        return self.lora_A.weight.reshape(self.r, -1)  # [r, in/groups * prod(k)]

    def lora_B_rows(self) -> Tensor:
        groups = self.base_layer.groups
        b = self.lora_B.weight.reshape(self.lora_B.weight.shape[0], -1)  # [out, r/groups]
        if groups == 1:
            return b
        # Output block j only sees A's block j: B as a block-diagonal [out, r].
        return torch.block_diag(*b.chunk(groups, dim=0))

    def lora_A_forward(self, x: Tensor) -> Tensor:
        return self.lora_A(x)

    def lora_B_weight(self) -> Tensor:
        return self.lora_B.weight

    def lora_B_forward(self, hidden: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        return self.lora_B._conv_forward(hidden, weight, bias)

    def base_forward_without_bias(self, x: Tensor) -> Tensor:
        weight = self.base_weight()
        return self.base_layer._conv_forward(x.to(weight.dtype), weight, None)

    def channel_view(self, v: Tensor) -> Tensor:
        return v.reshape((1, -1) + (1,) * (self.base_weight().dim() - 2))  # [1, out, 1, ...]

    def magnitude_shape(self) -> tuple[int, ...]:
        return (1, self.out_features) + (1,) * (self.base_weight().dim() - 2)
