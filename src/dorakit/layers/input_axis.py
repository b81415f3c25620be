"""DoRA with the magnitude on the INPUT axis: one magnitude per input column (``magnitude_axis="in"``).

LyCORIS trained this form until its 2025-04 default change, and OneTrainer trains it; their files keep
the magnitude as ``dora_scale`` [1, in] (issue 16). For a base weight W0 [out, in]:

    W' = (W0 + s B A) diag(g)        g = m / ||W0 + s B A||_col        m: [in]

A column norm of W0 + s B A is a row norm of its transpose W0^T + s A^T B^T: the factored row norm of
``dorakit.functional`` with the transposed view of the weight and the roles of A and B swapped
(A^T [in, r] plays B, B^T [r, out] plays A). No new norm math, and no [out, in] temporary.

Convolutions: LyCORIS normalises each input channel over every output channel and kernel position
(``weight.transpose(0, 1).reshape(in, -1).norm(dim=1)``), magnitude [1, in, 1, ...]. In the
transposed row view [in * k, out] those are k consecutive rows, which ``group=k`` sums.

Forward: scaling the weight's columns scales the input, so the bias stays unscaled by construction:

    y = W' x + b = base(g * x) + s B A (g * x)

one element-wise product over the input, then the base layer and the LoRA branch as usual. With
dropout on x (x' = dropout(x)) the adapter's whole change W' - W0 applies to x', as PEFT does for the
output axis:  y = base(x) + W0 ((g - 1) * x') + s B A (g * x').
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .. import functional as F_dora
from .conv import Conv
from .linear import Linear


class InputAxisMixin:
    """What changes when the magnitude indexes input columns; mixed into ``Linear`` and ``Conv``."""

    magnitude_axis = "in"
    norm_kind = "column"

    # ---- the transposed picture --------------------------------------------------------------
    def kernel_positions(self) -> int:
        """Entries of one input channel per output channel: 1 for a Linear, prod(kernel) for a conv."""
        weight = self.base_weight()
        return math.prod(weight.shape[2:]) if isinstance(self, Conv) else 1

    def column_rows(self, weight: Tensor) -> Tensor:
        """The base weight's columns as rows: [in * k, out], a transposed view (no copy)."""
        return self.weight_rows(weight).T

    @property
    def magnitude_size(self) -> int:
        """Entries of the magnitude: the input channels."""
        return self.in_features // self.kernel_positions()

    def magnitude_shape(self) -> tuple[int, ...]:
        # LyCORIS's dora_scale shapes: [1, in] for a Linear, [1, in, 1, ...] for a convolution.
        return (1, self.magnitude_size) + (1,) * (self.base_weight().dim() - 2)

    def input_view(self, v: Tensor) -> Tensor:
        """A per-input-channel vector [in] shaped to broadcast over this layer's input."""
        if isinstance(self, Conv):
            return v.reshape((1, -1) + (1,) * (self.base_weight().dim() - 2))  # [1, in, 1, ...]
        return v  # over the last dimension of [..., in]

    def _norm_operands(self, weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(W0^T, B^T, A^T): the base columns as rows, and the pair with its roles swapped."""
        return self.column_rows(weight), self.lora_B_rows().T, self.lora_A_rows().T

    # ---- norms (cached exactly as the output axis's, see AdapterLayer._cached) ----------------
    def base_sq_norms(self) -> Tensor:
        """||W0_col||^2 per column entry (fp32 [in * k]; grouped per channel where used)."""
        if self.merged:
            raise RuntimeError("The base weight holds the merged adapter; unmerge() first.")
        weight = self.base_weight()
        return self._cached("base_sq", (weight,), lambda: F_dora.squared_row_norms(self.column_rows(weight.detach())))

    def row_norm(self) -> Tensor:
        """||W0 + s B A||_col per input channel, fp32 [in], detached (paper section 4.3)."""
        weight = self.base_weight()

        def compute() -> Tensor:
            rows, lora_a, lora_b = self._norm_operands(weight.detach())
            return F_dora.dora_row_norm(rows, lora_a, lora_b, self.scaling, base_sq=self.base_sq_norms(),
                                        group=self.kernel_positions())

        return self._cached("row_norm", (weight, *self.lora_params()), compute, extra=(self.scaling,))

    # ---- forward -------------------------------------------------------------------------------
    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        if self.disabled or self.merged:
            return self.base_layer(x, *args, **kwargs)
        scale = self.input_view(self.dora_scale())  # g, broadcast over the input channels
        x_adapter = self.cast_input(x)
        weight_b = self.lora_B_weight()
        if self.training and not isinstance(self.lora_dropout, nn.Identity):
            result = self.base_layer(x, *args, **kwargs)
            dropped = self.lora_dropout(x_adapter)
            lora_out = self.lora_B_forward(self.lora_A_forward(dropped * scale), weight_b)
            base_change = self.base_forward_without_bias(dropped * (scale - 1))
            out = torch.add(result.to(lora_out.dtype) + base_change.to(lora_out.dtype), lora_out, alpha=self.scaling)
            return out.to(result.dtype)
        scaled = x_adapter * scale  # [..., in] (Linear) or [N, in, ...] (conv)
        result = self.base_layer(scaled.to(x.dtype), *args, **kwargs)
        lora_out = self.lora_B_forward(self.lora_A_forward(scaled), weight_b)
        return torch.add(result.to(lora_out.dtype), lora_out, alpha=self.scaling).to(result.dtype)

    # ---- merge / unmerge -----------------------------------------------------------------------
    @torch.no_grad()
    def merge_into(self, weight: Tensor) -> dict[str, Tensor]:
        """Fold the adapter into ``weight`` in place (W <- (W0 + s B A) diag(g)); returns the
        per-channel norms that undo it (fp64 [in])."""
        rows = self.weight_rows(weight)  # rows.T below shares its storage, so the writes land in it
        terms = F_dora.merge_rows_(rows.T, self.lora_B_rows().T, self.lora_A_rows().T, self.scaling,
                                   self.lora_magnitude_vector, group=self.kernel_positions())
        self._write_back(weight, rows)
        return {"row_norm": F_dora.norm_from_terms(terms, self.scaling), "base_row_norm": terms.base_sq.sqrt()}

    @torch.no_grad()
    def unmerge_from(self, weight: Tensor, norms: dict[str, Tensor]) -> None:
        """Undo ``merge_into`` on ``weight`` in place from the per-channel norms it returned."""
        rows = self.weight_rows(weight)
        base_norm = norms.get("base_row_norm")
        F_dora.unmerge_rows_(rows.T, self.lora_B_rows().T, self.lora_A_rows().T, self.scaling,
                             self.lora_magnitude_vector, merge_norm=norms.get("row_norm"),
                             base_sq=None if base_norm is None else base_norm.square(), group=self.kernel_positions())
        self._write_back(weight, rows)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", magnitude_axis=in"


class InputAxisLinear(InputAxisMixin, Linear):
    """DoRA over ``nn.Linear`` or transformers' ``Conv1D`` with one magnitude per input feature."""


class InputAxisConv(InputAxisMixin, Conv):
    """DoRA over ``nn.Conv1d/2d/3d`` (groups=1) with one magnitude per input channel."""

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        if base_layer.groups != 1:
            raise ValueError(
                f"magnitude_axis='in' needs groups=1 convolutions; this {type(base_layer).__name__} has "
                f"groups={base_layer.groups} (one input channel feeds only its group's outputs). Use "
                "magnitude_axis='out' or exclude this layer."
            )
        super().__init__(base_layer, **kwargs)


def input_axis_class(module: nn.Module, name: str = "") -> type:
    """The input-axis wrapper class for ``module``, or ValueError naming what is supported."""
    from .linear import is_conv1d

    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return InputAxisConv
    if isinstance(module, nn.Linear) or is_conv1d(module):
        return InputAxisLinear
    where = f" '{name}'" if name else ""
    raise ValueError(
        f"magnitude_axis='in' applies to Linear, Conv1D and Conv1d/2d/3d layers; the target{where} is "
        f"{type(module).__name__}. Exclude it (exclude_modules) or use magnitude_axis='out'."
    )
