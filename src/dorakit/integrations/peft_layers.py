"""dorakit's layer math over the DoRA adapters that PEFT's own LoRA layers hold (issue 15).

A PEFT LoRA layer keeps every adapter in dicts keyed by adapter name (``lora_A["default"]``,
``scaling["default"]``, ``lora_magnitude_vector["default"].weight``). A *view* is a dorakit layer
(``layers.Linear``, ``Conv``, ``Embedding``, ``QuantizedLinear``) that owns no tensor: every
attribute the dorakit math reads (``lora_A``, ``lora_B``, ``scaling``, the magnitude, the base layer,
train/eval mode) is a property that looks it up in the PEFT layer each time. So the view computes
exactly what dorakit's own layer would over the same tensors (factored norm, cached once per
optimizer step, folded compose, chunked exact merge), and whatever PEFT changes (``set_scale``,
``load_state_dict``, a re-created adapter) is seen at once.

A view lives in the ``__dict__`` of PEFT's magnitude holder (``DoraLinearLayer`` and kin), not among
the model's modules: it adds no parameter, buffer or state-dict key, and it goes away with the
adapter (``delete_adapter``). Its only state is its caches, keyed by ``norm_cache.cache_key``.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from .. import norm_cache
from ..layers import Conv, Embedding, Linear, QuantizedLinear, is_conv1d, is_quantized_linear

VIEW_ATTR = "_dorakit_view"
_NO_DROPOUT = nn.Identity()  # embeddings take no dropout, as in PEFT


class _PeftAdapterView:
    """Mixin placed before a dorakit layer class: that layer's methods over one adapter of a PEFT layer.

    It replaces ``AdapterLayer.__init__`` (which would create tensors) with a bare ``nn.Module`` set-up.
    """

    use_dora = True
    merged = False  # PEFT keeps the merge state (merged_adapters); a view only computes
    disabled = False

    def __init__(self, peft_layer: nn.Module, adapter_name: str) -> None:
        nn.Module.__init__(self)
        # A plain attribute, not a submodule: the view is never part of the model's module tree.
        object.__setattr__(self, "_peft_layer", peft_layer)
        self._adapter = adapter_name
        self._cache: dict[str, tuple] = {}
        self._merged_norms: dict[str, torch.Tensor] = {}
        # The norm cache is keyed on tensor identity; FSDP re-gathers parameters into fresh tensors
        # each forward, so under torch.distributed the norm is recomputed (see AdapterLayer.cache_norms).
        dist = torch.distributed
        self.cache_norms = not (dist.is_available() and dist.is_initialized())
        norm_cache.watch_optimizers()

    def is_view_of(self, peft_layer: nn.Module, adapter_name: str) -> bool:
        return self._peft_layer is peft_layer and self._adapter == adapter_name

    # Train/eval mode is the PEFT layer's (the dropout path depends on it).
    @property
    def training(self) -> bool:
        return self._peft_layer.training

    @training.setter
    def training(self, value: bool) -> None:
        pass  # nn.Module.__init__ sets it; the view follows the PEFT layer instead

    @property
    def base_layer(self) -> nn.Module:
        return self._peft_layer.get_base_layer()

    @property
    def r(self) -> int:
        return self._peft_layer.r[self._adapter]

    @property
    def lora_alpha(self) -> float:
        return self._peft_layer.lora_alpha[self._adapter]

    @property
    def scaling(self) -> float:
        return self._peft_layer.scaling[self._adapter]  # set_scale/scale_layer change it in place

    @property
    def use_rslora(self) -> bool:
        return self._peft_layer.use_rslora.get(self._adapter, False)

    @property
    def lora_A(self) -> nn.Module:
        return self._peft_layer.lora_A[self._adapter]

    @property
    def lora_B(self) -> nn.Module:
        return self._peft_layer.lora_B[self._adapter]

    @property
    def lora_dropout(self) -> nn.Module:
        return self._peft_layer.lora_dropout[self._adapter] if self.supports_dropout else _NO_DROPOUT

    @property
    def lora_magnitude_vector(self) -> nn.Parameter:
        return self._peft_layer.lora_magnitude_vector[self._adapter].weight


class PeftLinearView(_PeftAdapterView, Linear):
    @property
    def fan_in_fan_out(self) -> bool:
        return bool(self._peft_layer.fan_in_fan_out)  # True over transformers' Conv1D ([in, out])


class PeftQuantizedView(_PeftAdapterView, QuantizedLinear):
    fan_in_fan_out = False

    def __init__(self, peft_layer: nn.Module, adapter_name: str) -> None:
        super().__init__(peft_layer, adapter_name)
        if hasattr(self.base_layer, "support_avx512bf16_for_cpu"):
            # As in QuantizedLinear: bitsandbytes' CPU repacking would make the weight unreadable row by row.
            self.base_layer.support_avx512bf16_for_cpu = False


class PeftConvView(_PeftAdapterView, Conv):
    pass


class PeftEmbeddingView(_PeftAdapterView, Embedding):
    @property
    def lora_embedding_A(self) -> nn.Parameter:
        return self._peft_layer.lora_embedding_A[self._adapter]

    @property
    def lora_embedding_B(self) -> nn.Parameter:
        return self._peft_layer.lora_embedding_B[self._adapter]


def _peft_classes(module_name: str, *names: str) -> tuple[type, ...]:
    module = sys.modules.get(module_name)
    return tuple(getattr(module, n) for n in names if module is not None and hasattr(module, n))


def view_class(peft_layer: nn.Module) -> type | str:
    """The view class for this PEFT LoRA layer, or why dorakit does not cover it (a sentence).

    Covered: what dorakit's own layers compute identically to PEFT's forward and can merge exactly.
    PEFT's classes are matched exactly (a subclass, e.g. a tensor-parallel or torchao layer, may
    compute differently), and their base layers by type.
    """
    base = peft_layer.get_base_layer()
    kind = f"PEFT's {type(peft_layer).__name__} over {type(base).__module__}.{type(base).__name__}"
    lora_B = getattr(peft_layer, "lora_B", {})
    if any(getattr(b, "bias", None) is not None for b in lora_B.values()):
        return f"{kind} with lora_bias=True"
    cls = type(peft_layer)
    if cls in _peft_classes("peft.tuners.lora.bnb", "Linear8bitLt", "Linear4bit"):
        if getattr(getattr(base.weight, "quant_state", None), "packing_format_for_cpu", False):
            # Ran in eval mode on the CPU before the patch: bitsandbytes repacked the weight, and its rows
            # can no longer be read exactly (see QuantizedRows).
            return f"{kind} repacked by bitsandbytes for CPU inference"
        return PeftQuantizedView if is_quantized_linear(base) else kind
    if cls in _peft_classes("peft.tuners.lora.layer", "Linear"):
        if is_quantized_linear(base):
            return kind
        if isinstance(base, nn.Linear) and not peft_layer.fan_in_fan_out:
            return PeftLinearView
        if is_conv1d(base) and peft_layer.fan_in_fan_out:
            return PeftLinearView
        return kind
    if cls in _peft_classes("peft.tuners.lora.layer", "Embedding"):
        if isinstance(base, nn.Embedding) and getattr(peft_layer, "tp_layer", None) is None:
            return PeftEmbeddingView
        return kind
    if cls in _peft_classes("peft.tuners.lora.layer", "Conv1d", "Conv2d", "Conv3d"):
        # PEFT's lora_A is a plain convolution (no groups, dilation 1, zero padding): only where the base
        # is one too does B·A have the base weight's structure, so that the norm and the merge describe
        # what the forward computes.
        plain = base.groups == 1 and all(d == 1 for d in base.dilation) and base.padding_mode == "zeros"
        return PeftConvView if plain else f"{kind} with groups, dilation or a non-zero padding mode"
    return kind


def adapter_view(peft_layer: nn.Module, adapter_name: str):
    """The view of ``adapter_name`` in ``peft_layer`` (made once and kept on its magnitude holder),
    or the reason (a str) it is not covered."""
    holder = peft_layer.lora_magnitude_vector[adapter_name]
    view = holder.__dict__.get(VIEW_ATTR)
    if isinstance(view, str) or (isinstance(view, _PeftAdapterView) and view.is_view_of(peft_layer, adapter_name)):
        return view  # a str: the reason this layer is not covered, decided once (its type does not change)
    found = view_class(peft_layer)
    view = found if isinstance(found, str) else found(peft_layer, adapter_name)
    holder.__dict__[VIEW_ATTR] = view  # not setattr: nn.Module would register the view as a submodule
    return view


def new_view(peft_layer: nn.Module, adapter_name: str):
    """A view for an adapter whose magnitude does not exist yet (PEFT is creating it), or the reason
    the layer is not covered."""
    found = view_class(peft_layer)
    return found if isinstance(found, str) else found(peft_layer, adapter_name)
