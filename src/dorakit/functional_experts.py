"""DoRA's row math over a stack of experts: the functions of ``dorakit.functional``, batched over E.

A mixture-of-experts layer keeps its E experts' weights of one shape in one 3-D parameter. As rows:

    W: [E, out, in]    A: [E, r, in]    B: [E, out, r]    m: [E, out]

    W_e' = m_e * (W_e + s*B_e@A_e) / ||W_e + s*B_e@A_e||_row          (each expert e, each output row)

The norm is ``functional``'s factored form for all experts at once: batched [E, out, r] and [E, r, r]
products, no [E, out, in] temporary. A base stored in another dtype than the accumulation's is read
in groups of experts of at most ``functional.CHUNK_ELEMENTS`` elements, so a bf16 stack is never
copied to fp32 whole. Like ``functional``'s, the norm reads nothing back to the host (issue 18). Merge and unmerge are one-offs: they run ``functional``'s own per-row functions
expert by expert, and are exact in the same way.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import functional as F_dora
from .functional import EXACT_ROWS, NORM_EPS, RowTerms, full_precision


def expert_groups(n_experts: int, per_expert: int, chunk_elements: int | None = None) -> list[slice]:
    """Consecutive experts in groups of at most ``chunk_elements`` elements (one expert at least)."""
    return F_dora.row_chunks(n_experts, per_expert, chunk_elements)


def _base_products(
    weight_rows: Tensor, a: Tensor, base_sq: Tensor | None, chunk_elements: int | None, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """W_e @ A_e^T ([E, out, r]) and ||W_e,i||^2 ([E, out], unless given): ``functional``'s base
    products on groups of experts of at most ``chunk_elements`` elements (rows of one expert when a
    single expert is larger)."""
    n_experts, out_features, in_features = weight_rows.shape
    if weight_rows.dtype == dtype and chunk_elements is None:
        return F_dora._base_products(weight_rows, a, base_sq, None, dtype)  # views only: nothing to bound
    wa_parts, sq_parts = [], []
    for group in expert_groups(n_experts, out_features * in_features, chunk_elements):
        given = None if base_sq is None else base_sq[group]
        wa, sq = F_dora._base_products(weight_rows[group], a[group], given, chunk_elements, dtype)
        wa_parts.append(wa)  # [g, out, r]
        sq_parts.append(sq)  # [g, out]
    return torch.cat(wa_parts), torch.cat(sq_parts)


@torch.no_grad()
@full_precision
def expert_squared_row_norms(weight_rows: Tensor, chunk_elements: int | None = None) -> Tensor:
    """||W_e,i||^2 in fp32 ([E, out]), reading the stack in bounded groups."""
    n_experts, _, in_features = weight_rows.shape
    rank_zero = torch.zeros(n_experts, 0, in_features, dtype=torch.float32, device=weight_rows.device)
    return _base_products(weight_rows, rank_zero, None, chunk_elements, torch.float32)[1]


@torch.no_grad()
@full_precision
def expert_row_terms(
    weight_rows: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    *,
    base_sq: Tensor | None = None,
    chunk_elements: int | None = None,
    compute_dtype: torch.dtype = torch.float32,
) -> RowTerms:
    """``functional.row_terms`` for every expert: RowTerms(base_sq, cross, quad), each [E, out].

    Args:
        weight_rows: the stack as [E, out, in] (any float dtype; may be a strided view).
        lora_A: [E, r, in].  lora_B: [E, out, r] (may be strided views).
        base_sq: precomputed ||W_e,i||^2 ([E, out]) for a frozen stack; computed here if None.
        chunk_elements: bound on the temporary per group (default ``CHUNK_ELEMENTS``).
        compute_dtype: accumulation dtype.
    """
    a = lora_A.detach().to(compute_dtype)
    b = lora_B.detach().to(compute_dtype)
    wa, base_sq = _base_products(weight_rows, a, base_sq, chunk_elements, compute_dtype)
    cross = torch.linalg.vecdot(b, wa)  # [E, out]
    quad = torch.linalg.vecdot(b, torch.bmm(b, a @ a.mT))  # B_e,i (A_e A_e^T) B_e,i^T: [E, out]
    return RowTerms(base_sq, cross, quad)


@torch.no_grad()
@full_precision
def expert_row_norm(
    weight_rows: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    *,
    base_sq: Tensor | None = None,
    chunk_elements: int | None = None,
) -> Tensor:
    """||W_e + s*B_e@A_e||_row for every expert (fp32 [E, out], no grad: paper section 4.3), without
    forming any W_e + s*B_e@A_e. As ``functional.dora_row_norm``, per expert: the
    ``functional.EXACT_ROWS`` rows that cancelled most (lowest ``cancellation_ratio``) are recomputed
    directly in fp64, with static shapes, so nothing is read back to the host (issue 18).

    Example:
        >>> w = torch.tensor([[[3.0, 4.0]], [[0.0, 0.0]]])          # two experts of one row
        >>> a = torch.ones(2, 1, 2); b = torch.zeros(2, 1, 1)
        >>> expert_row_norm(w, a, b, 1.0)                              # expert 1 is a zero row: clamped
        tensor([[5.0000e+00],
                [1.0000e-12]])
    """
    terms = expert_row_terms(weight_rows, lora_A, lora_B, base_sq=base_sq, chunk_elements=chunk_elements)
    sq = F_dora._squared_norm(terms, scaling)  # [E, out]
    ratio = F_dora.cancellation_ratio(terms, lora_A, lora_B, scaling)  # [E, out]
    worst = torch.topk(ratio, min(EXACT_ROWS, sq.shape[1]), dim=1, largest=False, sorted=False).indices  # [E, k]
    exact = _exact_rows(weight_rows, lora_A, lora_B, scaling, worst, chunk_elements)
    return sq.scatter(1, worst, exact.to(sq.dtype)).clamp_min_(NORM_EPS * NORM_EPS).sqrt_()


def _exact_rows(weight_rows: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float, rows: Tensor,
                chunk_elements: int | None) -> Tensor:
    """||W_e,i + s*B_e,i@A_e||^2 in fp64 ([E, k]) for the rows ``rows`` ([E, k] indices) of every
    expert, in groups of experts of bounded size. Gathers only: nothing is read back to the host."""
    n_experts, k = rows.shape
    in_features = weight_rows.shape[2]
    work = F_dora._exact_dtype(lora_A.device)
    parts = []
    for group in expert_groups(n_experts, k * in_features, chunk_elements):
        picked = rows[group]  # [g, k]
        w = weight_rows[group].gather(1, picked.unsqueeze(2).expand(-1, -1, in_features)).to(work)  # [g, k, in]
        b = lora_B.detach()[group].gather(1, picked.unsqueeze(2).expand(-1, -1, lora_B.shape[2])).to(work)  # [g, k, r]
        w.baddbmm_(b, lora_A.detach()[group].to(work), alpha=scaling)
        parts.append(w.square().sum(dim=2))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def adapted_weight(weight_rows: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float,
                   scale: Tensor | None = None) -> Tensor:
    """The weight the adapter computes with, differentiable in A, B and ``scale``:
    W + s*B@A (LoRA) or g[..., None] * (W + s*B@A) with g = m / ||W + s*B@A|| (DoRA).

    For modules whose forward reads the parameter itself (``nn.MultiheadAttention``, parameters of
    modules dorakit cannot route), so it costs one weight-sized tensor per forward, like PEFT's.
    Works on [out, in] or [E, out, in] (then A [E, r, in], B [E, out, r], ``scale`` [E, out]).
    """
    dtype = lora_A.dtype
    weight = weight_rows.detach().to(dtype) + scaling * torch.matmul(lora_B, lora_A)
    return weight if scale is None else weight * scale.unsqueeze(-1).to(dtype)


@torch.no_grad()
def merge_experts_(
    weight_rows: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    magnitude: Tensor | None = None,
    *,
    chunk_elements: int | None = None,
) -> dict[str, Tensor]:
    """Fold the adapter into every expert of ``weight_rows`` ([E, out, in]) in place, expert by expert
    with ``functional.merge_rows_``. Returns (DoRA) ``{"row_norm", "base_row_norm"}``, fp64 [E, out]:
    what undoes the merge exactly in any later process (``unmerge_experts_``); {} for LoRA."""
    row_norms, base_norms = [], []
    for e in range(weight_rows.shape[0]):
        m = None if magnitude is None else magnitude[e]
        terms = F_dora.merge_rows_(weight_rows[e], lora_A[e], lora_B[e], scaling, m, chunk_elements=chunk_elements)
        row_norms.append(F_dora.norm_from_terms(terms, scaling))
        base_norms.append(terms.base_sq.sqrt())
    if magnitude is None:
        return {}
    return {"row_norm": torch.stack(row_norms), "base_row_norm": torch.stack(base_norms)}


@torch.no_grad()
def unmerge_experts_(
    weight_rows: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    magnitude: Tensor | None = None,
    *,
    merge_norm: Tensor | None = None,
    base_sq: Tensor | None = None,
    chunk_elements: int | None = None,
) -> None:
    """Undo ``merge_experts_`` in place with ``functional.unmerge_rows_`` per expert (``merge_norm``
    and ``base_sq`` are [E, out]). Every expert is checked first on a copy of its rows (one expert's
    size at a time), so an adapter that does not match leaves the whole stack unchanged.

    Raises:
        ValueError: as ``functional.unmerge_rows_``, naming the expert; nothing is written then.
    """
    n_experts = weight_rows.shape[0]

    def run(e: int, rows: Tensor) -> None:
        F_dora.unmerge_rows_(
            rows, lora_A[e], lora_B[e], scaling, None if magnitude is None else magnitude[e],
            merge_norm=None if merge_norm is None else merge_norm[e],
            base_sq=None if base_sq is None else base_sq[e], chunk_elements=chunk_elements,
        )

    if magnitude is not None:  # LoRA's unmerge cannot fail: no check pass needed
        for e in range(n_experts):
            try:
                run(e, weight_rows[e].clone())
            except ValueError as err:
                raise ValueError(f"Expert {e}: {err}") from None
    for e in range(n_experts):
        run(e, weight_rows[e])
