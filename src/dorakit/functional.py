"""The DoRA math as pure functions on tensors (Liu et al. 2024, arXiv 2402.09353).

Every layer type is reduced to one picture, the frozen weight as a matrix of output rows:

    W0: [out, in]    A: [r, in]    B: [out, r]    s = lora_alpha / r  (rsLoRA: lora_alpha / sqrt(r))

    W' = m * (W0 + s*B@A) / ||W0 + s*B@A||_row        m: [out], one magnitude per output row

Layers hand these functions row views of their weights (Linear: weight, GPT-2 Conv1D: weight.T,
Embedding: weight.T, ConvNd: weight.flatten(1)), so the forward pass, merge, unmerge, the analysis
tools and the benchmarks all share the code below.

The row norm never builds W0 + s*B@A. It uses the factored form (DORA.md):

    ||W0_i + s*B_i@A||^2 = ||W0_i||^2 + 2s * B_i . (W0@A^T)_i + s^2 * B_i @ (A@A^T) @ B_i^T

which needs an [out, r] and an [r, r] product, no [out, in] temporary and no identity matrix.
Base rows are read in chunks of bounded size and accumulated in fp32, so a bf16 base is never
copied to fp32 as a whole.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

# Largest temporary (in elements) that chunked passes over a base weight may allocate:
# 2**24 fp32 elements = 64 MiB, whatever the layer's width.
CHUNK_ELEMENTS = 2**24

# Row norms below this are treated as zero rows. Real checkpoints contain all-zero rows; PEFT
# divides by their zero norm and returns NaN. With the clamp, a zero row whose magnitude is zero
# (its initial value) gives a scale of exactly 0, so its output stays the base model's 0.
NORM_EPS = 1e-12


def row_chunks(n_rows: int, row_width: int, chunk_elements: int | None = None) -> list[slice]:
    """Split ``n_rows`` rows of ``row_width`` elements into slices of at most ``chunk_elements``."""
    limit = CHUNK_ELEMENTS if chunk_elements is None else chunk_elements
    step = max(1, limit // max(1, row_width))
    return [slice(start, min(start + step, n_rows)) for start in range(0, n_rows, step)]


class RowTerms(NamedTuple):
    """The per-row pieces of the factored norm, all fp32 of shape [out]."""

    base_sq: Tensor  # ||W0_i||^2
    cross: Tensor  # B_i . (W0 @ A^T)_i     (times 2s in the norm)
    quad: Tensor  # B_i @ (A @ A^T) @ B_i^T (times s^2 in the norm, = ||(B@A)_i||^2)


@torch.no_grad()
def row_terms(
    weight_rows: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    *,
    base_sq: Tensor | None = None,
    chunk_elements: int | None = None,
) -> RowTerms:
    """Compute the three terms of the factored row norm in fp32.

    Args:
        weight_rows: the base weight as [out, in] (any float dtype; may be a strided view).
        lora_A: [r, in].  lora_B: [out, r].
        base_sq: precomputed ||W0_i||^2 ([out], fp32) for a frozen base; computed here if None.
        chunk_elements: bound on the temporary per chunk (default ``CHUNK_ELEMENTS``).
    Returns:
        RowTerms(base_sq, cross, quad), each [out] fp32.
    """
    out_features, in_features = weight_rows.shape
    a32 = lora_A.detach().to(torch.float32)
    b32 = lora_B.detach().to(torch.float32)
    wa = torch.empty(out_features, a32.shape[0], dtype=torch.float32, device=weight_rows.device)  # [out, r]
    need_sq = base_sq is None
    if need_sq:
        base_sq = torch.empty(out_features, dtype=torch.float32, device=weight_rows.device)
    for rows in row_chunks(out_features, in_features, chunk_elements):
        chunk = weight_rows[rows].to(torch.float32)  # [rows, in]; a view when the base is fp32
        torch.matmul(chunk, a32.T, out=wa[rows])
        if need_sq:
            base_sq[rows] = torch.linalg.vector_norm(chunk, dim=1).square()
    cross = (b32 * wa).sum(dim=1)
    quad = ((b32 @ (a32 @ a32.T)) * b32).sum(dim=1)
    return RowTerms(base_sq, cross, quad)


def norm_from_terms(terms: RowTerms, scaling: float) -> Tensor:
    """||W0_i + s*B_i@A|| from its factored terms, fp32 [out], clamped away from zero."""
    sq = terms.base_sq + (2.0 * scaling) * terms.cross + (scaling * scaling) * terms.quad
    # Rounding can push the sum of a (near-)zero row slightly below zero: clamp before the sqrt.
    return sq.clamp_min(0.0).sqrt().clamp_min(NORM_EPS)


def dora_row_norm(
    weight_rows: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    *,
    base_sq: Tensor | None = None,
    chunk_elements: int | None = None,
) -> Tensor:
    """Per-output-row norm of ``W0 + scaling * B @ A`` without forming it (fp32 [out], no grad).

    The result carries no gradient: paper section 4.3 treats the norm as a constant in backward,
    which cuts training memory (LLaMA-7B 37.3 -> 28.2 GB) at no real accuracy cost.

    Example:
        >>> w = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
        >>> a = torch.tensor([[1.0, 0.0]]); b = torch.tensor([[1.0], [0.0]])
        >>> dora_row_norm(w, a, b, 1.0)  # row 0: ||[4, 4]||; row 1: zero row, clamped
        tensor([5.6569e+00, 1.0000e-12])
    """
    terms = row_terms(weight_rows, lora_A, lora_B, base_sq=base_sq, chunk_elements=chunk_elements)
    return norm_from_terms(terms, scaling)


def direct_row_norm(weight_rows: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float) -> Tensor:
    """Reference: the same norm from the full [out, in] matrix, in fp32. For tests and checks only."""
    full = weight_rows.to(torch.float32) + scaling * (lora_B.to(torch.float32) @ lora_A.to(torch.float32))
    return torch.linalg.vector_norm(full, dim=1).clamp_min(NORM_EPS)


def dora_compose(
    base_out: Tensor,
    lora_out: Tensor,
    scale: Tensor,
    scaling: float,
    *,
    bias: Tensor | None = None,
    base_dropped: Tensor | None = None,
) -> Tensor:
    """Combine the base output and the LoRA branch into the DoRA output.

    Args:
        base_out: the base layer's output on x, bias included.
        lora_out: B(A(x')), unscaled; x' = dropout(x).
        scale: g = m / ||W0 + s*B@A|| shaped to broadcast over the output channels.
        scaling: s.
        bias: the base layer's bias shaped like ``scale``, or None. The bias is never scaled.
        base_dropped: the base layer's output on x' without bias, when dropout is active; None when
            x' is x, so the base output is reused instead of a second base matmul.
    Returns:
        y = g * (x W0^T + s * lora) + b, or with dropout y = base(x) + (g - 1) * x'W0^T + g * s * lora
        (the form PEFT and the paper's code use, DORA.md).
    """
    if base_dropped is None:
        direction = base_out if bias is None else base_out - bias
        out = scale * torch.add(direction, lora_out, alpha=scaling)
        return out if bias is None else out + bias
    return base_out + (scale - 1) * base_dropped + (scale * scaling) * lora_out


@torch.no_grad()
def merge_rows_(
    weight_rows: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    magnitude: Tensor | None = None,
    *,
    chunk_elements: int | None = None,
) -> RowTerms:
    """Fold the adapter into ``weight_rows`` in place, chunk by chunk.

    LoRA (magnitude None): W <- W0 + s*B@A.  DoRA: W <- (m / ||W0 + s*B@A||)[:, None] * (W0 + s*B@A).

    Returns:
        The factored terms of the pre-merge weight. Their ``base_sq`` (||W0_i||^2, fp32 [out]) is all
        that, with the adapter, undoes the merge exactly at any later time, in any process (see
        ``unmerge_rows_``); ``rotation_ok(terms, scaling)`` says whether that undo is unambiguous.
    """
    out_features, in_features = weight_rows.shape
    a32 = lora_A.detach().to(torch.float32)
    b32 = lora_B.detach().to(torch.float32)
    terms = row_terms(weight_rows, a32, b32, chunk_elements=chunk_elements)
    factor = None
    if magnitude is not None:
        factor = magnitude.detach().reshape(-1).to(torch.float32) / norm_from_terms(terms, scaling)
    for rows in row_chunks(out_features, in_features, chunk_elements):
        new = torch.addmm(weight_rows[rows].to(torch.float32), b32[rows], a32, alpha=scaling)  # [rows, in]
        if factor is not None:
            new.mul_(factor[rows, None])
        weight_rows[rows] = new.to(weight_rows.dtype)
    return terms


def unmerge_blocked_rows(magnitude: Tensor, base_sq: Tensor) -> Tensor:
    """Rows that cannot be unmerged: zero magnitude (their direction was multiplied away) but a
    non-zero base row. Boolean [out]."""
    return (magnitude.detach().reshape(-1) == 0) & (base_sq > 0)


@torch.no_grad()
def unmerge_rows_(
    weight_rows: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    magnitude: Tensor | None = None,
    base_sq: Tensor | None = None,
    *,
    chunk_elements: int | None = None,
) -> None:
    """Undo ``merge_rows_`` in place from the merged weight, the adapter and ||W0_i||^2 alone.

    Row i of a DoRA-merged weight has norm |m_i|, so u_i = W_i / m_i is the unit direction of
    W0_i + dW_i (dW = s*B@A) and W0_i + dW_i = c_i * u_i, where c_i = ||W0_i + dW_i|| solves
        c^2 - 2c (u_i . dW_i) + ||dW_i||^2 - ||W0_i||^2 = 0.
    We take the root c = p + sqrt(p^2 - ||dW_i||^2 + ||W0_i||^2), p = u_i . dW_i, which is the true
    one whenever the adapter turned the row by less than 90 degrees (u_i . W0_i >= 0); ``merge``
    checks that (``rotation_ok``). Both p and ||dW_i||^2 come in factored form: no [out, in]
    temporary, no cache of the pre-merge weight.

    Raises:
        ValueError: DoRA without ``base_sq``, or rows with zero magnitude whose base row was not zero.
    """
    out_features, in_features = weight_rows.shape
    a32 = lora_A.detach().to(torch.float32)
    b32 = lora_B.detach().to(torch.float32)
    ratio = None
    if magnitude is not None:
        if base_sq is None:
            raise ValueError(
                "Unmerging a DoRA layer needs the squared row norms of the base weight "
                "(returned by merge_rows_ and saved with merged checkpoints)."
            )
        m = magnitude.detach().reshape(-1).to(torch.float32)
        blocked = unmerge_blocked_rows(m, base_sq)
        if bool(blocked.any()):
            raise ValueError(
                f"Cannot unmerge: {int(blocked.sum())} row(s) have magnitude 0, so the merged weight no "
                "longer holds their direction. Reload the base weights instead of unmerging."
            )
        safe_m = torch.where(m == 0, torch.ones_like(m), m)
        # (W_merged @ A^T)_i / m_i gives u_i @ A^T; dot with s*B_i gives p_i.
        terms = row_terms(weight_rows, a32, b32, base_sq=base_sq, chunk_elements=chunk_elements)
        p = scaling * terms.cross / safe_m
        delta_sq = (scaling * scaling) * terms.quad
        c = p + (p * p - delta_sq + base_sq).clamp_min(0.0).sqrt()
        ratio = torch.where(base_sq > 0, c / safe_m, torch.zeros_like(c))
    for rows in row_chunks(out_features, in_features, chunk_elements):
        merged = weight_rows[rows].to(torch.float32)  # [rows, in]
        if ratio is not None:
            merged = merged * ratio[rows, None]
        new = torch.addmm(merged, b32[rows], a32, alpha=-scaling)
        if ratio is not None:
            # A zero base row stays exactly zero (its merged row was 0 * direction).
            new.mul_((base_sq[rows] > 0).to(new.dtype)[:, None])
        weight_rows[rows] = new.to(weight_rows.dtype)


def rotation_ok(terms: RowTerms, scaling: float) -> Tensor:
    """Rows whose merged direction is within 90 degrees of W0_i: (W0_i + dW_i) . W0_i >= 0.

    For these rows ``unmerge_rows_`` picks the right root. The test costs nothing: the dot product
    is ||W0_i||^2 + s * cross_i, both already computed for the norm.
    """
    return terms.base_sq + scaling * terms.cross >= 0
