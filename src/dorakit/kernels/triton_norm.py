"""Fused Triton kernel for DoRA's row norm (issue 18).

PyTorch twin and reference: ``dorakit.functional.dora_row_norm``. For a block of output rows, one pass
over W0 accumulates W0_i . A_k for every k (the [out, r] product W0 @ A^T, never written out) and
||W0_i||^2; B then gives the factored terms (see ``functional.row_terms``)

    ||W0_i + s B_i A||^2 = ||W0_i||^2 + 2s B_i . (W0 @ A^T)_i + s^2 B_i (A A^T) B_i^T

and the cancellation ratio of ``functional.cancellation_ratio``. A block holding a row that cancelled
(ratio < ``functional.CANCELLATION``) reads those rows once more and sums (W0_i + s B_i A)^2 directly
in fp64: a branch taken on the device, so the host waits for nothing, and exact for every cancelled
row (the PyTorch twin, which must keep static shapes, recomputes the ``EXACT_ROWS`` worst per layer).
The whole norm is one launch (plus a few [r, in]-sized preparations of A).

PyTorch reads W0 in chunks, copies each chunk to fp32 and multiplies; here a bf16 W0 is read as it is
stored and multiplied on tensor cores against A split into three bf16 parts (A = A_hi + A_mid + A_lo,
24 significant bits: fp32's): a product of two bf16 values is exact in fp32 and the sums run in fp32,
so the result is as accurate as the fp32 matmul it replaces, whatever
``torch.backends.cuda.matmul.allow_tf32`` says. fp16 and fp32 weights take one fp32 dot ("ieee").
The module is imported only when used (Triton is optional).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..functional import CANCELLATION, NORM_EPS

# The rank tile holds a [rows, rank] fp32 accumulator in registers; wider adapters use PyTorch.
MAX_RANK = 128
SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit
def _dot_bf16(x, y, FP32_DOT: tl.constexpr):
    """x @ y for bf16 tiles, fp32 accumulation (a product of two bf16 values is exact in fp32). Triton's
    CPU interpreter (3.9) multiplies bf16 tiles wrongly, so there the same exact products run as an fp32 dot."""
    if FP32_DOT:
        return tl.dot(x.to(tl.float32), y.to(tl.float32), input_precision="ieee")
    return tl.dot(x, y)


@triton.jit
def _row_norm_kernel(
    W, A_HI, A_MID, A_LO, A_ROWS, A_NORM, B, GRAM, BASE_SQ, NORM,
    n_rows, n_cols, rank, stride_row, stride_col, scaling, cancellation, min_sq,
    BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr, BLOCK_RANK: tl.constexpr,
    SPLIT_A: tl.constexpr, HAVE_BASE_SQ: tl.constexpr, FP32_DOT: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    ranks = tl.arange(0, BLOCK_RANK)
    row_ok = rows < n_rows
    row_offsets = rows.to(tl.int64) * stride_row  # int64: an embedding's [dim, vocab] view passes 2**31
    rank_ok = ranks < rank
    weight_a = tl.zeros((BLOCK_ROWS, BLOCK_RANK), dtype=tl.float32)  # (W0 @ A^T) for these rows
    base_sq = tl.zeros((BLOCK_ROWS,), dtype=tl.float32)
    for start in range(0, n_cols, BLOCK_COLS):
        cols = start + tl.arange(0, BLOCK_COLS)
        col_ok = cols < n_cols
        w = tl.load(W + row_offsets[:, None] + cols[None, :].to(tl.int64) * stride_col,
                    mask=row_ok[:, None] & col_ok[None, :], other=0.0)  # [BLOCK_ROWS, BLOCK_COLS]
        a_offsets = cols[:, None] * rank + ranks[None, :]  # A^T tile [BLOCK_COLS, BLOCK_RANK]
        a_mask = col_ok[:, None] & rank_ok[None, :]
        if SPLIT_A:
            weight_a += _dot_bf16(w, tl.load(A_HI + a_offsets, mask=a_mask, other=0.0), FP32_DOT)
            weight_a += _dot_bf16(w, tl.load(A_MID + a_offsets, mask=a_mask, other=0.0), FP32_DOT)
            weight_a += _dot_bf16(w, tl.load(A_LO + a_offsets, mask=a_mask, other=0.0), FP32_DOT)
        else:
            weight_a += tl.dot(w.to(tl.float32), tl.load(A_HI + a_offsets, mask=a_mask, other=0.0),
                               input_precision="ieee")
        if not HAVE_BASE_SQ:
            w32 = w.to(tl.float32)
            base_sq += tl.sum(w32 * w32, axis=1)
    if HAVE_BASE_SQ:
        base_sq = tl.load(BASE_SQ + rows, mask=row_ok, other=0.0)
    b = tl.load(B + rows[:, None] * rank + ranks[None, :], mask=row_ok[:, None] & rank_ok[None, :], other=0.0)
    gram = tl.load(GRAM + ranks[:, None] * rank + ranks[None, :], mask=rank_ok[:, None] & rank_ok[None, :], other=0.0)
    cross = tl.sum(b * weight_a, axis=1)
    quad = tl.sum(tl.dot(b, gram, input_precision="ieee") * b, axis=1)
    sq = base_sq + (2.0 * scaling) * cross + (scaling * scaling) * quad
    # functional.cancellation_ratio: (||W0_i|| + |s| sum_k |B_ik| ||A_k||)^2 bounds what the terms sum.
    bound = tl.sum(tl.abs(b) * tl.load(A_NORM + ranks, mask=rank_ok, other=0.0)[None, :], axis=1)
    size = tl.sqrt(base_sq) + tl.abs(scaling) * bound
    size = size * size
    cancelled = row_ok & (size > 0) & (sq < cancellation * size)
    if tl.max(cancelled.to(tl.int32), axis=0) > 0:  # on the device: only blocks with a cancelled row
        exact = tl.zeros((BLOCK_ROWS,), dtype=tl.float64)
        for start in range(0, n_cols, BLOCK_COLS):
            cols = start + tl.arange(0, BLOCK_COLS)
            col_ok = cols < n_cols
            direct = tl.load(W + row_offsets[:, None] + cols[None, :].to(tl.int64) * stride_col,
                             mask=cancelled[:, None] & col_ok[None, :], other=0.0).to(tl.float64)
            for k in range(0, rank):  # + s B_ik A_k, term by term in fp64
                b_k = tl.load(B + rows * rank + k, mask=cancelled, other=0.0).to(tl.float64)
                a_k = tl.load(A_ROWS + k * n_cols + cols, mask=col_ok, other=0.0).to(tl.float64)
                direct += scaling * b_k[:, None] * a_k[None, :]
            exact += tl.sum(direct * direct, axis=1)
        sq = tl.where(cancelled, exact.to(tl.float32), sq)
    tl.store(NORM + rows, tl.sqrt(tl.maximum(sq, min_sq)), mask=row_ok)


def supports(weight_rows: Tensor, rank: int) -> bool:
    """Whether the kernel takes this weight (a 2-D tensor of a supported dtype) at this rank."""
    return (isinstance(weight_rows, Tensor) and weight_rows.dim() == 2 and weight_rows.dtype in SUPPORTED_DTYPES
            and 0 < rank <= MAX_RANK)


def _split_bf16(a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """a (fp32) = hi + mid + lo, each bf16 (8 significant bits each: fp32's 24 together)."""
    hi = a.to(torch.bfloat16)
    rest = a - hi.float()
    mid = rest.to(torch.bfloat16)
    return hi, mid, (rest - mid.float()).to(torch.bfloat16)


@torch.no_grad()
def row_norm(weight_rows: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float,
             base_sq: Tensor | None = None) -> Tensor:
    """``functional.dora_row_norm`` in one kernel: ||W0 + s B A||_row, fp32 [out], clamped, no grad.

    Args:
        weight_rows: W0 as [out, in] (bf16, fp16 or fp32; any strides).
        lora_A: [r, in].  lora_B: [out, r].  scaling: s.
        base_sq: ||W0_i||^2 when already known (a frozen base's is cached); computed here otherwise.
    """
    n_rows, n_cols = weight_rows.shape
    rank = lora_A.shape[0]
    a = lora_A.detach().float().contiguous()  # [r, in]
    a_t = a.T.contiguous()  # [in, r]: the dot reads A^T tiles along the rank
    parts = _split_bf16(a_t) if weight_rows.dtype == torch.bfloat16 else (a_t, a_t, a_t)
    b = lora_B.detach().float().contiguous()
    gram = (a.double() @ a.double().T).float()  # [r, r]; fp64 is never rounded to TF32
    norm = torch.empty(n_rows, dtype=torch.float32, device=weight_rows.device)
    if n_rows:
        block_rank = max(16, triton.next_power_of_2(rank))
        block_rows = 32  # 4096 rows make 128 programs: about one per multiprocessor of an H100/H200
        _row_norm_kernel[(triton.cdiv(n_rows, block_rows),)](
            weight_rows, *parts, a, torch.linalg.vector_norm(a, dim=1), b, gram,
            norm if base_sq is None else base_sq.float().contiguous(), norm,
            n_rows, n_cols, rank, weight_rows.stride(0), weight_rows.stride(1), float(scaling),
            CANCELLATION, NORM_EPS * NORM_EPS,
            BLOCK_ROWS=block_rows, BLOCK_COLS=64, BLOCK_RANK=block_rank,
            SPLIT_A=weight_rows.dtype == torch.bfloat16, HAVE_BASE_SQ=base_sq is not None,
            FP32_DOT=weight_rows.device.type != "cuda",  # only Triton's interpreter runs CPU tensors
        )
    return norm
