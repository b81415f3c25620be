"""VeRA's direction update (Kopiczko et al. 2024) over ``nn.Linear`` / GPT-2 ``Conv1D``, with or
without DoRA's magnitude (DVoRA, DoRA paper section 5.5).

    A: [r, in_max], B: [out_max, r]   frozen, random, one pair shared by every adapted layer
    lambda_d: [r], lambda_b: [out]    trainable, per layer

    dW = diag(lambda_b) B[:out] diag(lambda_d) A[:, :in]          (no alpha: the scale is 1)

A layer narrower than the widest target uses the leading rows/columns of the shared pair (PEFT's
slicing). Folding the vectors into the pair gives LoRA's picture, A' = diag(lambda_d) A and
B' = diag(lambda_b) B, so the norm, merge and exact unmerge are the same functions as for LoRA,
and ``AdapterLayer.forward`` runs unchanged (no [out, in] temporary anywhere).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .linear import Linear


def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> Tensor:
    """U(-b, b) with b = sqrt(3) * sqrt(2 / fan_in), written as PEFT writes it so that the same
    seed gives the same bits (``sqrt(6 / fan_in)`` rounds differently for some fans)."""
    bound = math.sqrt(3.0) * (math.sqrt(2) / math.sqrt(shape[1]))
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


def folded_A(vera_A: Tensor, lambda_d: Tensor, in_features: int) -> Tensor:
    """A' = diag(lambda_d) A[:, :in], [r, in]: VeRA's update in LoRA's picture (scale 1)."""
    return lambda_d[:, None] * vera_A[:, :in_features].to(lambda_d.dtype)


def folded_B(vera_B: Tensor, lambda_b: Tensor) -> Tensor:
    """B' = diag(lambda_b) B[:out], [out, r]."""
    return lambda_b[:, None] * vera_B[: lambda_b.shape[0]].to(lambda_b.dtype)


class VeraProjection(nn.Module):
    """The frozen pair shared by all VeRA layers of a model: ``vera_A`` [r, in_max], ``vera_B`` [out_max, r].

    Registered as a child of every layer, so ``model.to(...)`` moves it (once: later visits find it
    moved) and ``deepcopy`` keeps it shared. Its buffers are not in the state dict; ``save_adapter``
    writes them under PEFT's keys when ``save_projection`` is set.
    """

    def __init__(self, vera_A: Tensor, vera_B: Tensor) -> None:
        super().__init__()
        if vera_A.dim() != 2 or vera_B.dim() != 2 or vera_A.shape[0] != vera_B.shape[1]:
            raise ValueError(f"VeRA projections must be A [r, in] and B [out, r]; got {list(vera_A.shape)} and {list(vera_B.shape)}.")
        self.register_buffer("vera_A", vera_A, persistent=False)
        self.register_buffer("vera_B", vera_B, persistent=False)

    @classmethod
    def generate(cls, r: int, in_max: int, out_max: int, seed: int, *, base_dtype: torch.dtype = torch.float32,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> VeraProjection:
        """The pair PEFT draws for ``projection_prng_key=seed``: A first, then B, from one CPU generator.

        Over a half-precision base PEFT holds the pair at the base's precision, so the values are
        rounded through ``base_dtype`` before taking ``dtype``: an adapter saved without its
        projection then regenerates the same numbers in both libraries.
        """
        generator = torch.Generator(device="cpu").manual_seed(seed)
        vera_A = kaiming_uniform((r, in_max), generator)
        vera_B = kaiming_uniform((out_max, r), generator)
        if base_dtype in (torch.float16, torch.bfloat16):
            vera_A, vera_B = vera_A.to(base_dtype), vera_B.to(base_dtype)
        return cls(vera_A.to(device=device, dtype=dtype), vera_B.to(device=device, dtype=dtype))

    @property
    def r(self) -> int:
        return self.vera_A.shape[0]

    def extra_repr(self) -> str:
        return f"r={self.r}, in_max={self.vera_A.shape[1]}, out_max={self.vera_B.shape[0]}"


class VeraLinear(Linear):
    """VeRA (``use_dora=False``) or DVoRA (``use_dora=True``) over nn.Linear / Conv1D.

    Trainable: ``vera_lambda_d`` [r], ``vera_lambda_b`` [out] (PEFT's names) and, for DVoRA,
    ``lora_magnitude_vector`` [out].
    """

    def __init__(self, base_layer: nn.Module, *, projection: VeraProjection, d_initial: float = 0.1, **kwargs) -> None:
        self._init_args = (projection, d_initial)  # read by create_adapter / reset_adapter during __init__
        # VeRA's update has no alpha / r scale (the vectors carry it): lora_alpha = r gives s = 1 exactly.
        kwargs.update(lora_alpha=kwargs["r"], use_rslora=False)
        super().__init__(base_layer, **kwargs)
        del self._init_args

    def create_adapter(self, r: int, *, device: torch.device, dtype: torch.dtype) -> None:
        projection, _ = self._init_args
        out_features, in_features = self.out_features, self.in_features
        if projection.r != r or projection.vera_A.shape[1] < in_features or projection.vera_B.shape[0] < out_features:
            raise ValueError(
                f"The shared VeRA projection ({projection.extra_repr()}) does not cover this layer "
                f"(r={r}, in={in_features}, out={out_features}). Build it over every target."
            )
        self.vera_projection = projection
        self.vera_lambda_d = nn.Parameter(torch.empty(r, device=device, dtype=dtype))
        self.vera_lambda_b = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype))

    def reset_adapter(self, init_lora_weights: bool | str) -> None:
        _, d_initial = self._init_args
        with torch.no_grad():
            if init_lora_weights is False:
                # Non-identity start (tests), as PEFT's init_weights=False.
                self.vera_lambda_b.fill_(1.0)
                self.vera_lambda_d.copy_(torch.randn(self.r))
            else:
                # lambda_b = 0 makes dW = 0: the adapted model starts as the base (VeRA section 3.1).
                self.vera_lambda_b.zero_()
                self.vera_lambda_d.fill_(d_initial)

    def lora_params(self) -> tuple[Tensor, ...]:
        return self.vera_lambda_d, self.vera_lambda_b, self.vera_projection.vera_A, self.vera_projection.vera_B

    def adapter_dtype(self) -> torch.dtype:
        return self.vera_lambda_d.dtype

    def lora_A_rows(self) -> Tensor:
        return folded_A(self.vera_projection.vera_A, self.vera_lambda_d, self.in_features)

    def lora_B_rows(self) -> Tensor:
        return self.lora_B_weight()

    def lora_A_forward(self, x: Tensor) -> Tensor:
        vera_A = self.vera_projection.vera_A[:, : self.in_features].to(device=x.device, dtype=self.vera_lambda_d.dtype)
        return self.vera_lambda_d * torch.nn.functional.linear(x, vera_A)  # [..., r]

    def lora_B_weight(self) -> Tensor:
        return folded_B(self.vera_projection.vera_B, self.vera_lambda_b)  # [out, r]

    def extra_repr(self) -> str:
        kind = "DVoRA" if self.use_dora else "VeRA"
        return f"{kind}: r={self.r}, merged={self.merged}"
