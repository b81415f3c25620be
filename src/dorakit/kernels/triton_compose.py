"""Fused Triton kernels for DoRA's composition and its backward (issue 18).

PyTorch twin and reference: ``dorakit.functional.dora_compose`` followed by the cast to the base
output's dtype. With the LoRA branch already holding (g*s) B A x + b (1 - g) (see ``dora_compose``),
what is left over the [tokens, out] output is

    y = g * base + lora                       (base: the base layer's output, bias included)

PyTorch runs it as an fp32 addcmul and a cast (two passes, an fp32 temporary); its backward as a cast
of the incoming gradient, a product for d base, and a product plus a column sum for d g. Here the
forward is one pass writing y in the base output's dtype, and the backward one pass reading the
gradient and ``base`` once and writing d base, d lora and one partial column sum per token block
(summed by PyTorch: deterministic, no atomics). All arithmetic is fp32. ``base`` is saved for the
backward as it is (bf16 in a bf16 model), never as an fp32 copy.

Channels must be the last dimension (Linear, Conv1D, Embedding outputs); convolutions use PyTorch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
BLOCK_TOKENS, BLOCK_CHANNELS = 32, 128


@triton.jit
def _compose_forward_kernel(BASE, LORA, SCALE, OUT, n_tokens, n_channels,
                            BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    channels = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    channel_ok = channels < n_channels
    mask = (tokens < n_tokens)[:, None] & channel_ok[None, :]
    offsets = tokens.to(tl.int64)[:, None] * n_channels + channels[None, :]  # [BLOCK_T, BLOCK_C] of a [tokens, out] tensor
    base = tl.load(BASE + offsets, mask=mask, other=0.0).to(tl.float32)
    lora = tl.load(LORA + offsets, mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(SCALE + channels, mask=channel_ok, other=0.0).to(tl.float32)
    tl.store(OUT + offsets, (base * scale[None, :] + lora).to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _compose_backward_kernel(GRAD, BASE, SCALE, GRAD_BASE, GRAD_LORA, PARTIAL, n_tokens, n_channels,
                             BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
                             WANT_BASE: tl.constexpr, WANT_LORA: tl.constexpr, WANT_SCALE: tl.constexpr):
    block = tl.program_id(0)
    tokens = block * BLOCK_T + tl.arange(0, BLOCK_T)
    channels = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    channel_ok = channels < n_channels
    mask = (tokens < n_tokens)[:, None] & channel_ok[None, :]
    offsets = tokens.to(tl.int64)[:, None] * n_channels + channels[None, :]
    grad = tl.load(GRAD + offsets, mask=mask, other=0.0).to(tl.float32)
    if WANT_BASE:
        scale = tl.load(SCALE + channels, mask=channel_ok, other=0.0).to(tl.float32)
        tl.store(GRAD_BASE + offsets, (grad * scale[None, :]).to(GRAD_BASE.dtype.element_ty), mask=mask)
    if WANT_LORA:
        tl.store(GRAD_LORA + offsets, grad.to(GRAD_LORA.dtype.element_ty), mask=mask)
    if WANT_SCALE:
        base = tl.load(BASE + offsets, mask=mask, other=0.0).to(tl.float32)
        tl.store(PARTIAL + block.to(tl.int64) * n_channels + channels, tl.sum(grad * base, axis=0), mask=channel_ok)


def supports(base_out: Tensor, lora_out: Tensor, scale: Tensor) -> bool:
    """Channels last, matching shapes, supported dtypes."""
    return (scale.dim() == 1 and base_out.dim() >= 1 and base_out.shape == lora_out.shape
            and base_out.shape[-1] == scale.shape[0]
            and all(t.dtype in SUPPORTED_DTYPES for t in (base_out, lora_out, scale)))


def _grid(n_tokens: int, n_channels: int) -> tuple[int, int]:
    return triton.cdiv(n_tokens, BLOCK_TOKENS), triton.cdiv(n_channels, BLOCK_CHANNELS)


class FusedCompose(torch.autograd.Function):
    """y = scale * base + lora in base's dtype; gradients for all three (see the module docstring)."""

    @staticmethod
    def forward(ctx, base_out: Tensor, lora_out: Tensor, scale: Tensor) -> Tensor:
        channels = base_out.shape[-1]
        base2d = base_out.contiguous().reshape(-1, channels)  # [tokens, out]
        out = torch.empty_like(base2d)
        if base2d.shape[0]:
            _compose_forward_kernel[_grid(base2d.shape[0], channels)](
                base2d, lora_out.contiguous().reshape(-1, channels), scale.contiguous(), out,
                base2d.shape[0], channels, BLOCK_T=BLOCK_TOKENS, BLOCK_C=BLOCK_CHANNELS)
        ctx.save_for_backward(base2d, scale)
        ctx.shape, ctx.lora_dtype = base_out.shape, lora_out.dtype
        return out.reshape(base_out.shape)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        base2d, scale = ctx.saved_tensors
        want_base, want_lora, want_scale = ctx.needs_input_grad
        n_tokens, channels = base2d.shape
        grad2d = grad_out.contiguous().reshape(n_tokens, channels)
        grad_base = torch.empty_like(base2d) if want_base else None
        grad_lora = torch.empty(n_tokens, channels, dtype=ctx.lora_dtype, device=base2d.device) if want_lora else None
        grid = _grid(n_tokens, channels)
        partial = torch.zeros(max(grid[0], 1), channels, dtype=torch.float32, device=base2d.device) if want_scale else None
        if n_tokens and (want_base or want_lora or want_scale):
            _compose_backward_kernel[grid](
                grad2d, base2d, scale, grad_base if want_base else grad2d, grad_lora if want_lora else grad2d,
                partial if want_scale else grad2d, n_tokens, channels, BLOCK_T=BLOCK_TOKENS, BLOCK_C=BLOCK_CHANNELS,
                WANT_BASE=want_base, WANT_LORA=want_lora, WANT_SCALE=want_scale)
        grad_scale = partial.sum(0).to(scale.dtype) if want_scale else None
        return (None if grad_base is None else grad_base.reshape(ctx.shape),
                None if grad_lora is None else grad_lora.reshape(ctx.shape), grad_scale)


def compose(base_out: Tensor, lora_out: Tensor, scale: Tensor) -> Tensor:
    """DoRA's output ``scale * base_out + lora_out`` in ``base_out``'s dtype ([..., out]; ``scale`` [out])."""
    return FusedCompose.apply(base_out, lora_out, scale)
