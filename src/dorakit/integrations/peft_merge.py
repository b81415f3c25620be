"""Merge and unmerge of DoRA adapters inside PEFT's layers, with dorakit's exact chunked math (issue 15).

PEFT's layer hands its variant a weight (the base weight, a copy of it, or a dequantized copy of a
bitsandbytes weight) and keeps the order of merged adapters in ``merged_adapters``. What dorakit adds:

- the merge is ``functional.merge_rows_`` (fp64 row terms, fp32 updates chunk by chunk, no
  [out, in] temporary beyond a chunk), and the norm it divided by is recorded, so the unmerge is
  exact (``functional.unmerge_rows_``), and PEFT's own unmerge still works after ``unpatch_peft()``;
- several adapters merged in turn on one layer give what the forward computes: PEFT's forward
  divides each adapter's magnitude by ||W0 + s_k B_k A_k|| over the *base* weight W0 and applies it
  to the output accumulated so far, so adapter k is merged as W_k = (m_k / n_k)(W_{k-1} + s_k B_k A_k)
  with n_k over W0. W0 is rebuilt for that (in a copy) by undoing the adapters merged before,
  exactly, in reverse order. PEFT before 0.21 divided by the norm over W_{k-1}: merged and unmerged
  outputs differed (DORA.md: up to 14%).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import functional as F_dora
from .peft_layers import PeftQuantizedView, adapter_view


def cache_key(adapter_name: str) -> str:
    """Where PEFT's layer keeps the norm a DoRA merge divided by (its own unmerge pops it)."""
    return f"{adapter_name}-weight_norm"


def _shares_storage(a: Tensor, b: Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def merge_record(peft_layer: nn.Module, adapter_name: str) -> dict[str, Tensor] | None:
    """The norms that undo the merge of ``adapter_name``: dorakit's record, or (merged by PEFT's own
    code, before ``patch_peft()``) the norm PEFT cached; None if neither exists."""
    view = adapter_view(peft_layer, adapter_name)
    if not isinstance(view, str) and view._merged_norms:
        return view._merged_norms
    cached = getattr(peft_layer, "_caches", {}).get(cache_key(adapter_name))
    return None if cached is None else {"row_norm": cached.detach().reshape(-1).double()}


def _take_out(peft_layer: nn.Module, adapter_name: str, weight: Tensor) -> bool:
    """Undo the merge of ``adapter_name`` in ``weight`` (a working copy) in place. False if dorakit
    cannot (a LoRA variant other than DoRA)."""
    if adapter_name not in peft_layer.lora_variant:  # plain LoRA: W_{k-1} = W_k - s B A
        weight -= peft_layer.get_delta_weight(adapter_name).to(weight.dtype)
        return True
    view = adapter_view(peft_layer, adapter_name)
    record = merge_record(peft_layer, adapter_name)
    if isinstance(view, str) or record is None:
        return False
    # Only the divisor: the check against ||W0|| (base_row_norm) assumes the stored weight's rounding.
    view.unmerge_from(weight, {"row_norm": record["row_norm"]})
    return True


def _norm_over_base(peft_layer: nn.Module, view, weight: Tensor, previous: list[str]) -> Tensor | None:
    """||W0 + s B A||_row (fp64) for ``view``'s adapter, W0 rebuilt from ``weight`` by undoing the
    ``previous`` merges in reverse order in an fp32 copy; None if one of them cannot be undone."""
    base = weight.detach().to(torch.float64 if weight.dtype == torch.float64 else torch.float32, copy=True)
    for name in reversed(previous):
        if not _take_out(peft_layer, name, base):
            return None
    terms = F_dora.row_terms(view.weight_rows(base), view.lora_A_rows(), view.lora_B_rows(),
                             compute_dtype=torch.float64)
    return F_dora.norm_from_terms(terms, view.scaling)


def merge_into(peft_layer: nn.Module, adapter_name: str, weight: Tensor) -> bool:
    """Fold the DoRA adapter into ``weight`` in place and record what undoes it. False (and
    ``weight`` untouched) where dorakit does not cover the layer or an earlier merge."""
    view = adapter_view(peft_layer, adapter_name)
    if isinstance(view, str):
        return False
    previous = [name for name in peft_layer.merged_adapters if name != adapter_name]
    norm = None
    if previous:
        norm = _norm_over_base(peft_layer, view, weight, previous)
        if norm is None:
            return False
    record = view.merge_into(weight, norm=norm)
    if isinstance(view, PeftQuantizedView):
        # PEFT stores the merge back in 4 or 8 bits: the check of the recovered norms would fail on
        # the quantization error, so only the divisor is kept (the unmerge is as exact as the storage).
        record.pop("base_row_norm", None)
    view._merged_norms = record
    # In the magnitude's shape, as PEFT's own unmerge divides the magnitude by it ([1, out, 1, 1] for a conv).
    peft_layer._cache_store(cache_key(adapter_name), record["row_norm"].reshape(view.lora_magnitude_vector.shape))
    return True


def merged_copy(peft_layer: nn.Module, adapter_name: str, orig_weight: Tensor) -> Tensor | None:
    """``merge_safe``: a new tensor holding ``orig_weight`` with the adapter merged, or None."""
    weight = orig_weight.detach()
    if _shares_storage(weight, peft_layer.get_base_layer().weight):
        weight = weight.clone()
    return weight if merge_into(peft_layer, adapter_name, weight) else None


def merge_in_place(peft_layer: nn.Module, adapter_name: str, orig_weight: nn.Parameter) -> bool:
    """``merge_unsafe``: the adapter merged into the parameter ``orig_weight``. Its storage is replaced,
    as PEFT's DoRA merge does (a weight tied to another module stays the other module's)."""
    weight = orig_weight.detach().clone()
    if not merge_into(peft_layer, adapter_name, weight):
        return False
    orig_weight.data = weight
    return True


def unmerged_copy(peft_layer: nn.Module, adapter_name: str, orig_weight: Tensor) -> Tensor | None:
    """``unmerge``: a new tensor with the adapter taken out of ``orig_weight`` exactly, or None where
    dorakit did not merge it (PEFT's own unmerge then reads its own cache)."""
    view = adapter_view(peft_layer, adapter_name)
    if isinstance(view, str) or not view._merged_norms:
        return None
    record = view._merged_norms
    weight = orig_weight.detach().clone()
    view.unmerge_from(weight, record)
    view._merged_norms = {}
    getattr(peft_layer, "_caches", {}).pop(cache_key(adapter_name), None)
    return weight
