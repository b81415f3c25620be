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


def _exact_dtype(device: torch.device) -> torch.dtype:
    """fp64 for the one-off merge/unmerge passes (fp32 where the device has no fp64)."""
    return torch.float32 if device.type == "mps" else torch.float64


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
    compute_dtype: torch.dtype = torch.float32,
) -> RowTerms:
    """Compute the three terms of the factored row norm in fp32.

    Args:
        weight_rows: the base weight as [out, in] (any float dtype; may be a strided view).
        lora_A: [r, in].  lora_B: [out, r].
        base_sq: precomputed ||W0_i||^2 ([out], fp32) for a frozen base; computed here if None.
        chunk_elements: bound on the temporary per chunk (default ``CHUNK_ELEMENTS``).
        compute_dtype: accumulation dtype (fp32; unmerge uses fp64).
    Returns:
        RowTerms(base_sq, cross, quad), each [out] in ``compute_dtype``.
    """
    out_features, in_features = weight_rows.shape
    a32 = lora_A.detach().to(compute_dtype)
    b32 = lora_B.detach().to(compute_dtype)
    wa_parts, sq_parts = [], []
    for rows in row_chunks(out_features, in_features, chunk_elements):
        chunk = weight_rows[rows].to(compute_dtype)  # [rows, in]; a view when the base is already in it
        wa_parts.append(chunk @ a32.T)  # [rows, r]
        if base_sq is None:
            sq_parts.append(torch.linalg.vector_norm(chunk, dim=1).square())
    wa = wa_parts[0] if len(wa_parts) == 1 else torch.cat(wa_parts)  # [out, r]
    if base_sq is None:
        base_sq = sq_parts[0] if len(sq_parts) == 1 else torch.cat(sq_parts)
    else:
        base_sq = base_sq.to(compute_dtype)
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
        The factored terms of the pre-merge weight (fp64 [out] each). With the adapter,
        ``norm_from_terms(terms, scaling)`` (or ``terms.base_sq``) is all that undoes the merge exactly
        at any later time, in any process: see ``unmerge_rows_``.
    """
    out_features, in_features = weight_rows.shape
    # A merge is a one-off, so it works in fp64: the merged rows then have norm |m_i| to the last
    # bit of the stored dtype, which is what makes the later unmerge exact.
    work = _exact_dtype(weight_rows.device)
    a64 = lora_A.detach().to(work)
    b64 = lora_B.detach().to(work)
    terms = row_terms(weight_rows, a64, b64, chunk_elements=chunk_elements, compute_dtype=work)
    factor = None
    if magnitude is not None:
        factor = magnitude.detach().reshape(-1).to(work) / norm_from_terms(terms, scaling)
    for rows in row_chunks(out_features, in_features, chunk_elements):
        new = torch.addmm(weight_rows[rows].to(work), b64[rows], a64, alpha=scaling)  # [rows, in]
        if factor is not None:
            new.mul_(factor[rows, None])
        weight_rows[rows] = new.to(weight_rows.dtype)
    return terms


@torch.no_grad()
def unmerge_rows_(
    weight_rows: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    magnitude: Tensor | None = None,
    *,
    merge_norm: Tensor | None = None,
    base_sq: Tensor | None = None,
    turned: Tensor | None = None,
    chunk_elements: int | None = None,
) -> None:
    """Undo ``merge_rows_`` in place from the merged weight, the adapter and one [out] vector.

    Row i of a DoRA-merged weight is W_i = (m_i / n_i) (W0_i + dW_i), dW = s*B@A, n_i its pre-merge
    row norm. Nothing from the merging process's memory is needed, only one of:

    - ``merge_norm`` (n, from ``merge_rows_``): W0_i = W_i * n_i / m_i - dW_i. Exact to the storage
      rounding of W. If ``base_sq`` is given too, the rows' recovered norms are checked against it,
      which catches an adapter that is not the one that was merged.
    - ``base_sq`` (||W0_i||^2) alone: u_i = W_i / m_i is the unit direction of W0_i + dW_i, and
      c_i = ||W0_i + dW_i|| solves c^2 - 2c p_i + ||dW_i||^2 - ||W0_i||^2 = 0 with p_i = u_i . dW_i.
      The + root is the true one when the adapter turned the row by less than 90 degrees;
      ``turned`` marks the rows where it did not. Less well conditioned when ||dW_i|| >> ||W0_i||.

    p_i and ||dW_i||^2 come in factored form, so there is no [out, in] temporary; fp64 throughout,
    as an unmerge is rare and the subtraction cancels.

    Raises:
        ValueError: DoRA with neither vector, rows with zero magnitude (their direction is gone),
            or an adapter that does not match the merged weight. The weight is unchanged then.
    """
    out_features, in_features = weight_rows.shape
    work = _exact_dtype(weight_rows.device)
    a64 = lora_A.detach().to(work)
    b64 = lora_B.detach().to(work)
    ratio = keep = None
    if magnitude is not None:
        if merge_norm is None and base_sq is None:
            raise ValueError(
                "Unmerging a DoRA layer needs the pre-merge row norms (merge_norm) or the base weight's "
                "squared row norms (base_sq), both returned by merge_rows_ and saved with merged checkpoints."
            )
        m = magnitude.detach().reshape(-1).to(work)
        safe_m = torch.where(m == 0, torch.ones_like(m), m)
        terms = row_terms(weight_rows, a64, b64, base_sq=torch.zeros_like(m), chunk_elements=chunk_elements,
                          compute_dtype=work)
        p = scaling * terms.cross / safe_m  # u_i . dW_i, as (W_merged @ A^T)_i / m_i dotted with s*B_i
        delta_sq = (scaling * scaling) * terms.quad
        if merge_norm is not None:
            c = merge_norm.reshape(-1).to(work)
            if base_sq is not None:
                eps = torch.finfo(weight_rows.dtype).eps if weight_rows.is_floating_point() else 0.0
                _check_recovered_norms(c, p, delta_sq, base_sq.to(work), eps)
        else:
            root = (p * p - delta_sq + base_sq.to(work)).clamp_min(0.0).sqrt()
            if turned is not None:
                root = torch.where(turned.to(root.device), -root, root)
            c = p + root
        zero_base = (base_sq.to(work) == 0) if base_sq is not None else torch.zeros_like(m, dtype=torch.bool)
        blocked = (m == 0) & ~zero_base
        if bool(blocked.any()):
            raise ValueError(
                f"Cannot unmerge: {int(blocked.sum())} row(s) have magnitude 0, so the merged weight no "
                "longer holds their direction. Reload the base weights instead of unmerging."
            )
        ratio = torch.where(zero_base, torch.zeros_like(c), c / safe_m)
        keep = (~zero_base).to(work)  # a zero base row stays exactly zero
    for rows in row_chunks(out_features, in_features, chunk_elements):
        merged = weight_rows[rows].to(work)  # [rows, in]
        if ratio is not None:
            merged = merged * ratio[rows, None]
        new = torch.addmm(merged, b64[rows], a64, alpha=-scaling)
        if keep is not None:
            new.mul_(keep[rows, None])
        weight_rows[rows] = new.to(weight_rows.dtype)


def _check_recovered_norms(c: Tensor, p: Tensor, delta_sq: Tensor, base_sq: Tensor, storage_eps: float) -> None:
    """||c*u - dW||^2 = c^2 - 2cp + ||dW||^2 must give back ||W0||^2, up to the rounding of the
    stored merged weight (which moves p by about eps * ||dW||) and a small relative slack."""
    recovered_sq = c * c - 2 * c * p + delta_sq
    slack = 1e-4 * base_sq + 16 * storage_eps * c * (c + delta_sq.sqrt()) + 1e-30
    bad = (recovered_sq - base_sq).abs() > slack
    if bool(bad.any()):
        raise ValueError(
            f"This adapter does not match the merged weight: {int(bad.sum())} of {bad.numel()} rows would not "
            "come back to the base weight's row norms. Unmerge with the adapter that was merged."
        )


def rotation_ok(terms: RowTerms, scaling: float) -> Tensor:
    """Rows whose merged direction is within 90 degrees of W0_i: (W0_i + dW_i) . W0_i >= 0.

    ``unmerge_rows_`` takes the other root for the rest (its ``turned`` argument). The test costs
    nothing: the dot product is ||W0_i||^2 + s * cross_i, both already computed for the norm.
    """
    return terms.base_sq + scaling * terms.cross >= 0
