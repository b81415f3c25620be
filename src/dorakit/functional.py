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

import functools
import math
from typing import NamedTuple

import torch
from torch import Tensor

# Largest temporary (in elements) that chunked passes over a base weight may allocate:
# 2**23 elements = 32 MiB in fp32, whatever the layer's width.
CHUNK_ELEMENTS = 2**23

# Row norms below this are treated as zero rows. Real checkpoints contain all-zero rows; PEFT
# divides by their zero norm and returns NaN. With the clamp, a zero row whose magnitude is zero
# (its initial value) gives a scale of exactly 0, so its output stays the base model's 0.
NORM_EPS = 1e-12


def full_precision(fn):
    """Run ``fn`` with autocast off on its weight's device: under bf16/fp16 autocast (mixed-precision
    training) the norm's and the merge's matmuls would otherwise run in half precision, and the
    norm in the forward would no longer equal the one the magnitude was initialised from."""

    @functools.wraps(fn)
    def wrapper(weight_rows, *args, **kwargs):
        with torch.autocast(device_type=weight_rows.device.type, enabled=False):
            return fn(weight_rows, *args, **kwargs)

    return wrapper


def row_chunks(n_rows: int, row_width: int, chunk_elements: int | None = None) -> list[slice]:
    """Split ``n_rows`` rows of ``row_width`` elements into slices of at most ``chunk_elements``."""
    limit = CHUNK_ELEMENTS if chunk_elements is None else chunk_elements
    step = max(1, limit // max(1, row_width))
    return [slice(start, min(start + step, n_rows)) for start in range(0, n_rows, step)]


def lora_scaling(r: int, lora_alpha: float, use_rslora: bool = False) -> float:
    """s = lora_alpha / r, or lora_alpha / sqrt(r) with rank-stabilised LoRA (rsLoRA)."""
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


def _exact_dtype(device: torch.device) -> torch.dtype:
    """fp64 for the per-row terms of the one-off merge/unmerge (fp32 where the device has none)."""
    return torch.float32 if device.type == "mps" else torch.float64


def _update_dtype(weight: Tensor) -> torch.dtype:
    """Element-wise merge/unmerge updates run in fp32 (fp64 for an fp64 weight): their rounding is
    then at most that of storing the result, so more precision would buy nothing."""
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


class RowTerms(NamedTuple):
    """The per-row pieces of the factored norm, all fp32 of shape [out]."""

    base_sq: Tensor  # ||W0_i||^2
    cross: Tensor  # B_i . (W0 @ A^T)_i     (times 2s in the norm)
    quad: Tensor  # B_i @ (A @ A^T) @ B_i^T (times s^2 in the norm, = ||(B@A)_i||^2)


def _base_products(
    weight_rows: Tensor, a: Tensor, base_sq: Tensor | None, chunk_elements: int | None, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """W0 @ A^T ([out, r]) and ||W0_i||^2 ([out], unless given), reading W0 in bounded chunks of rows.
    Leading batch dimensions (a stack of experts: [E, out, in] with A [E, r, in]) pass through; the
    chunk bound then applies per batch entry (``functional_experts`` sizes its groups for that)."""
    out_features, in_features = weight_rows.shape[-2:]
    wa_parts, sq_parts = [], []
    for rows in row_chunks(out_features, in_features, chunk_elements):
        # [..., rows, in]; a view when the base is already in it (row readers of quantized layers take a plain slice)
        chunk = (weight_rows[rows] if len(weight_rows.shape) == 2 else weight_rows[..., rows, :]).to(dtype)
        wa_parts.append(chunk @ a.mT)  # [..., rows, r]
        if base_sq is None:
            sq_parts.append(torch.linalg.vector_norm(chunk, dim=-1).square())
    wa = wa_parts[0] if len(wa_parts) == 1 else torch.cat(wa_parts, dim=-2)
    if base_sq is None:
        base_sq = sq_parts[0] if len(sq_parts) == 1 else torch.cat(sq_parts, dim=-1)
    return wa, base_sq.to(dtype)


@torch.no_grad()
@full_precision
def squared_row_norms(weight_rows: Tensor, chunk_elements: int | None = None) -> Tensor:
    """||W0_i||^2 in fp32 ([out]), reading W0 in bounded chunks (the base products at rank 0)."""
    rank_zero = torch.zeros(0, weight_rows.shape[1], dtype=torch.float32, device=weight_rows.device)
    return _base_products(weight_rows, rank_zero, None, chunk_elements, torch.float32)[1]


@torch.no_grad()
@full_precision
def row_terms(
    weight_rows: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    *,
    base_sq: Tensor | None = None,
    chunk_elements: int | None = None,
    compute_dtype: torch.dtype = torch.float32,
    weight_a: Tensor | None = None,
) -> RowTerms:
    """The three terms of the factored row norm, separately (merge and unmerge need them apart).

    Args:
        weight_rows: the base weight as [out, in] (any float dtype; may be a strided view).
        lora_A: [r, in].  lora_B: [out, r].
        base_sq: precomputed ||W0_i||^2 ([out]) for a frozen base; computed here if None.
        chunk_elements: bound on the temporary per chunk (default ``CHUNK_ELEMENTS``).
        compute_dtype: accumulation dtype (fp32; merge and unmerge use fp64).
        weight_a: W0 @ A^T ([out, r]) when the caller already has it (a quantized layer computes it
            in the same pass over its weight as the base output); then W0 is not read (needs base_sq).
    Returns:
        RowTerms(base_sq, cross, quad), each [out] in ``compute_dtype``.
    """
    a = lora_A.detach().to(compute_dtype)
    b = lora_B.detach().to(compute_dtype)
    if weight_a is not None and base_sq is not None:
        wa, base_sq = weight_a.to(compute_dtype), base_sq.to(compute_dtype)
    else:
        wa, base_sq = _base_products(weight_rows, a, base_sq, chunk_elements, compute_dtype)
    cross = torch.linalg.vecdot(b, wa)
    quad = torch.linalg.vecdot(b, b @ (a @ a.T))
    return RowTerms(base_sq, cross, quad)


def _squared_norm(terms: RowTerms, scaling: float) -> Tensor:
    return terms.base_sq + (2.0 * scaling) * terms.cross + (scaling * scaling) * terms.quad


def norm_from_terms(terms: RowTerms, scaling: float) -> Tensor:
    """||W0_i + s*B_i@A|| from its factored terms, [out], clamped away from zero."""
    # Rounding can push the sum of a (near-)zero row slightly below zero: clamp before the sqrt.
    return _squared_norm(terms, scaling).clamp_min_(NORM_EPS * NORM_EPS).sqrt_()


def grouped_terms(terms: RowTerms, group: int) -> RowTerms:
    """The terms of ``group`` consecutive rows summed: one norm per group of rows.

    The input-axis magnitude of a convolution (LyCORIS's column norm, ``dorakit.layers.input_axis``)
    normalises each input channel over all output channels and kernel positions. In the transposed
    view [in * k, out] those are the k consecutive rows of one channel, so the factored terms of
    the rows add up to the channel's (squared norms are sums over their entries)."""
    if group == 1:
        return terms
    return RowTerms(*(t.reshape(-1, group).sum(dim=1) for t in terms))  # [rows] -> [rows / group]


# Cancellation (the update nearly negates a base row). Each factored term is rounded in fp32 relative
# to the sizes of what it sums, and those are bounded by (||W0_i|| + |s| beta_i)^2 with
# beta_i = sum_k |B_ik| ||A_k|| >= ||B_i A|| (Cauchy-Schwarz): the cross and quad terms are themselves
# dot products over r that can cancel inside, which a measure built from |cross| and quad after
# the sum misses (out=1, in=1, r=8, s=2 gave 2.6e-5 relative error while measuring 0.32; the bound
# measures 3.5e-4). The norm's relative error is then about eps32 * sqrt(in) / (2 * ratio), with
# ratio = ||W0_i + s B_i A||^2 / (||W0_i|| + |s| beta_i)^2: rows with ratio < CANCELLATION have cancelled.
CANCELLATION = 1e-2

# Rows recomputed directly (W0_i + s B_i A, fp64) on every call: the EXACT_ROWS of lowest ratio per
# layer. A fixed count keeps every shape static, so the forward never reads a value back to the host
# (issue 18: no device sync, one CUDA graph, no recompiles). Rows are exact wherever at most
# EXACT_ROWS of a layer's rows have ratio < CANCELLATION; in training no row comes near it.
EXACT_ROWS = 16


def cancellation_ratio(terms: RowTerms, lora_A: Tensor, lora_B: Tensor, scaling: float) -> Tensor:
    """||W0_i + s B_i A||^2 / (||W0_i|| + |s| sum_k |B_ik| ||A_k||)^2, fp32 [out]: near 0 where the
    factored terms cancel, 1 where nothing can (a zero row with a zero update)."""
    return grouped_cancellation_ratio(terms, lora_A, lora_B, scaling, 1)


def grouped_cancellation_ratio(terms: RowTerms, lora_A: Tensor, lora_B: Tensor, scaling: float, group: int) -> Tensor:
    """``cancellation_ratio`` of the norms of ``group`` consecutive rows ([out / group]): the squared
    norms and the bounds of a group's rows add up. With ``group`` 1, leading dimensions are batch
    dimensions (a stack of experts: terms [E, out], A [E, r, in], B [E, out, r])."""
    a, b = lora_A.detach().float(), lora_B.detach().float()
    bound = (b.abs() @ torch.linalg.vector_norm(a, dim=-1).unsqueeze(-1)).squeeze(-1)  # [..., out]
    size = (terms.base_sq.float().sqrt() + abs(scaling) * bound).square()
    if group > 1:
        size = size.reshape(-1, group).sum(dim=1)
    sq = _squared_norm(grouped_terms(terms, group), scaling).float()
    return torch.where(size > 0, sq / size.clamp_min(torch.finfo(torch.float32).tiny), torch.ones_like(sq))


def exact_squared_norms(weight_rows, lora_A: Tensor, lora_B: Tensor, scaling: float, rows: Tensor,
                        chunk_elements: int | None = None) -> Tensor:
    """||W0_i + s B_i A||^2 for the rows ``rows`` ([k] indices), computed directly in fp64 ([k]),
    reading at most ``chunk_elements`` of them at a time. Index tensors only: nothing is read back."""
    work = _exact_dtype(lora_A.device)
    a = lora_A.detach().to(work)
    parts = []
    for part in row_chunks(rows.shape[0], weight_rows.shape[1], chunk_elements):
        picked = rows[part]  # [p]
        direct = weight_rows.index_select(0, picked).to(work)  # [p, in]
        direct.addmm_(lora_B.detach().index_select(0, picked).to(work), a, alpha=scaling)
        parts.append(direct.square().sum(dim=1))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


@torch.no_grad()
@full_precision
def dora_row_norm(
    weight_rows: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    *,
    base_sq: Tensor | None = None,
    chunk_elements: int | None = None,
    weight_a: Tensor | None = None,
    group: int = 1,
) -> Tensor:
    """Per-output-row norm of ``W0 + scaling * B @ A`` without forming it (fp32 [out], no grad).
    ``weight_a``: W0 @ A^T when already computed (see ``row_terms``). ``group``: one norm per that
    many consecutive rows ([out / group]; see ``grouped_terms``). The PyTorch twin of
    ``dorakit.kernels.triton_norm.row_norm``.

    The result carries no gradient: paper section 4.3 treats the norm as a constant in backward,
    which cuts training memory (LLaMA-7B 37.3 -> 28.2 GB) at no real accuracy cost. The
    ``EXACT_ROWS`` rows that cancelled most (see ``CANCELLATION``) are recomputed directly, in fp64,
    with static shapes: no value is read back to the host.

    Example:
        >>> w = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
        >>> a = torch.tensor([[1.0, 0.0]]); b = torch.tensor([[1.0], [0.0]])
        >>> dora_row_norm(w, a, b, 1.0)  # row 0: ||[4, 4]||; row 1: zero row, clamped
        tensor([5.6569e+00, 1.0000e-12])
    """
    terms = row_terms(weight_rows, lora_A, lora_B, base_sq=base_sq, chunk_elements=chunk_elements, weight_a=weight_a)
    ratio = grouped_cancellation_ratio(terms, lora_A, lora_B, scaling, group)  # [out / group]
    terms = grouped_terms(terms, group)
    sq = _squared_norm(terms, scaling)
    worst = torch.topk(ratio, min(EXACT_ROWS, sq.shape[0]), largest=False, sorted=False).indices  # [k]
    rows = (worst[:, None] * group + torch.arange(group, device=worst.device)).reshape(-1)  # [k * group]
    exact = exact_squared_norms(weight_rows, lora_A, lora_B, scaling, rows, chunk_elements)
    sq = sq.index_copy(0, worst, exact.reshape(-1, group).sum(dim=1).to(sq.dtype))
    return sq.clamp_min_(NORM_EPS * NORM_EPS).sqrt_()


def dora_compose(base_out: Tensor, lora_out: Tensor, scale: Tensor, *, base_dropped: Tensor | None = None) -> Tensor:
    """Combine the base output and the LoRA branch into the DoRA output, in one fused op.

    DoRA's output y = g * (x W0^T + s B A x) + b (g = m / ||W0 + s B A||, bias b never scaled) is
    rearranged so that the per-channel scale costs no extra pass over the [tokens, out] output:

        y = g * base(x) + [ (g*s) B ] A x + b (1 - g)           base(x) = x W0^T + b

    The bracket is B with its rows scaled by g*s (an [out, r] op), applied by the LoRA branch's own
    matmul, which also adds the [out] bias correction b (1 - g). What is left is one addcmul.
    With dropout (x' = dropout(x)) the paper's and PEFT's form is kept:

        y = base(x) + (g - 1) * x' W0^T + [ (g*s) B ] A x'

    Args:
        base_out: base(x), the base layer's output (bias included).
        lora_out: ((g*s) B)(A(x')), plus b (1 - g) when there is no dropout.
        scale: g, shaped to broadcast over the output channels.
        base_dropped: x' W0^T without bias when dropout is active, else None (base_out is reused:
            no second base matmul).
    """
    # Mixed dtypes promote inside the op: a bf16 base output is read (and saved for backward) as it
    # is, never copied to fp32 (issue 18: an [tokens, out] fp32 copy per layer of activation memory).
    if base_dropped is None:
        return torch.addcmul(lora_out, base_out, scale)
    return torch.addcmul(base_out + lora_out, base_dropped, scale - 1)


def scaled_lora_B(lora_B: Tensor, scale: Tensor, scaling: float) -> Tensor:
    """B with output row j multiplied by g_j * s ([out, ...] whatever B's trailing shape)."""
    factor = (scale * scaling).to(lora_B.dtype)
    return lora_B * factor.reshape((-1,) + (1,) * (lora_B.dim() - 1))


def bias_correction(bias: Tensor | None, scale: Tensor) -> Tensor | None:
    """b (1 - g): what keeps the bias unscaled once g multiplies the whole base output."""
    return None if bias is None else bias.to(scale.dtype) * (1 - scale)


@torch.no_grad()
@full_precision
def merge_rows_(
    weight_rows: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    magnitude: Tensor | None = None,
    *,
    norm: Tensor | None = None,
    chunk_elements: int | None = None,
    group: int = 1,
) -> RowTerms:
    """Fold the adapter into ``weight_rows`` in place, chunk by chunk.

    LoRA (magnitude None): W <- W0 + s*B@A.  DoRA: W <- (m / ||W0 + s*B@A||)[:, None] * (W0 + s*B@A).
    ``group``: consecutive rows that share one norm and magnitude entry (``grouped_terms``).
    ``norm`` ([out]): the row norm that divides m when it is not the one of ``weight_rows`` itself: a
    PEFT layer that merges several DoRA adapters in turn divides each one's m by the norm over the
    unmerged base, as its forward does.

    Returns:
        The factored terms of the pre-merge weight (fp64 [out / group] each). With the adapter,
        ``norm_from_terms(terms, scaling)`` (or ``terms.base_sq``) is all that undoes the merge exactly
        at any later time, in any process: see ``unmerge_rows_``.
    """
    out_features, in_features = weight_rows.shape
    # A merge is a one-off: its row terms come in fp64, so the merged rows have norm |m_i| to the
    # last bit of the stored dtype, which is what makes the later unmerge exact.
    terms = grouped_terms(row_terms(weight_rows, lora_A, lora_B, chunk_elements=chunk_elements,
                                    compute_dtype=_exact_dtype(weight_rows.device)), group)
    work = _update_dtype(weight_rows)
    a_w = lora_A.detach().to(work)
    b_w = lora_B.detach().to(work)
    factor = None
    if magnitude is not None:
        divisor = norm_from_terms(terms, scaling) if norm is None else norm.reshape(-1).to(terms.base_sq.dtype)
        factor = (magnitude.detach().reshape(-1).to(terms.base_sq.dtype) / divisor).to(work)
        factor = factor.repeat_interleave(group)  # [out / group] -> [out]
    for rows in row_chunks(out_features, in_features, chunk_elements):
        new = torch.addmm(weight_rows[rows].to(work), b_w[rows], a_w, alpha=scaling)  # [rows, in]
        if factor is not None:
            new.mul_(factor[rows, None])
        weight_rows[rows].copy_(new)  # converts to the weight's dtype without another temporary
    return terms


@torch.no_grad()
@full_precision
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
    group: int = 1,
) -> None:
    """Undo ``merge_rows_`` in place from the merged weight, the adapter and one [out] vector
    ([out / group] with ``group``: rows sharing one norm, see ``grouped_terms``).

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
    update = _update_dtype(weight_rows)
    ratio = keep = None
    if magnitude is not None:
        if merge_norm is None and base_sq is None:
            raise ValueError(
                "Unmerging a DoRA layer needs the pre-merge row norms (merge_norm) or the base weight's "
                "squared row norms (base_sq), both returned by merge_rows_ and saved with merged checkpoints."
            )
        m = magnitude.detach().reshape(-1).to(work)
        safe_m = torch.where(m == 0, torch.ones_like(m), m)
        terms = grouped_terms(row_terms(weight_rows, a64, b64, base_sq=torch.zeros_like(b64[:, 0]),
                                        chunk_elements=chunk_elements, compute_dtype=work), group)
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
        ratio = torch.where(zero_base, torch.zeros_like(c), c / safe_m).repeat_interleave(group)  # per row
        keep = (~zero_base).to(work).repeat_interleave(group)  # a zero base row stays exactly zero
    a_u, b_u = a64.to(update), b64.to(update)
    ratio = None if ratio is None else ratio.to(update)
    keep = None if keep is None else keep.to(update)
    for rows in row_chunks(out_features, in_features, chunk_elements):
        merged = weight_rows[rows].to(update)  # [rows, in]
        if ratio is not None:
            merged = merged * ratio[rows, None]
        new = torch.addmm(merged, b_u[rows], a_u, alpha=-scaling)
        if keep is not None:
            new.mul_(keep[rows, None])
        weight_rows[rows].copy_(new)


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
