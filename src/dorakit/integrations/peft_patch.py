"""``dorakit.patch_peft()``: PEFT's own DoRA layers compute with dorakit's math (issue 15).

    import dorakit
    dorakit.patch_peft()          # once, before or after building the PEFT model
    model = peft.get_peft_model(base, peft.LoraConfig(use_dora=True, ...))   # TRL, diffusers, ... alike

The seam is PEFT's LoRA *variant* classes (``peft.tuners.lora.variants``: ``DoraLinearVariant``,
``DoraEmbeddingVariant``, ``DoraConv{1,2,3}dVariant``), whose static methods ``init``, ``forward``,
``merge_safe``, ``merge_unsafe`` and ``unmerge`` every PEFT LoRA layer calls for a DoRA adapter
(bitsandbytes' 4/8-bit layers included). Those five methods are replaced on the classes themselves,
so layers built before the patch are covered too, and ``unpatch_peft()`` puts the originals back
(the classes' ``__dict__`` as it was). Nothing else changes: ``PeftModel``, adapter names, several
adapters, ``set_adapter``, ``disable_adapter``, ``merge_and_unload``, ``save_pretrained`` and the
file format (the magnitude stays in PEFT's own holder module, under PEFT's key) are PEFT's.

The replacements compute through a dorakit layer *view* of the adapter (``peft_layers``): the
factored norm without an [out, in] temporary, cached once per optimizer step (``norm_cache``), the
folded compose, finite outputs on zero rows, fp32 norms under autocast, and the exact chunked merge
(``peft_merge``). A layer dorakit does not cover (GPTQ, HQQ, grouped convolutions, ...) runs PEFT's
original code, with a warning once per kind of layer.

One more method is replaced where bitsandbytes is installed: ``peft.tuners.lora.bnb.Linear4bit.forward``,
for a training step of a layer with one active DoRA adapter only. A variant receives the base output
already computed, so there the whole layer runs as dorakit's ``QuantizedLinear``, which gets the base
output and W0 @ A^T for the norm from one pass over the 4-bit weight (a QDoRA step then reads each
quantized weight twice, as QLoRA does, not three times). Every other call is PEFT's own forward.
"""

from __future__ import annotations

import inspect
import warnings

import torch
from torch import nn

from . import peft_merge
from .peft_layers import VIEW_ATTR, PeftQuantizedView, adapter_view, new_view

SUPPORTED_RANGE = "0.17 to 0.21"
TESTED_VERSIONS = ("0.17.1", "0.21.2")
INSTALL_HINT = "pip install 'peft>=0.17,<0.22'"

# variant class -> (PEFT's magnitude holder class in peft.tuners.lora.dora, its fan_in_fan_out)
VARIANTS = {
    "DoraLinearVariant": ("DoraLinearLayer", None),  # None: the layer's own fan_in_fan_out
    "DoraEmbeddingVariant": ("DoraEmbeddingLayer", True),
    "DoraConv1dVariant": ("DoraConv1dLayer", False),
    "DoraConv2dVariant": ("DoraConv2dLayer", False),
    "DoraConv3dVariant": ("DoraConv3dLayer", False),
}
# method -> the leading parameters PEFT calls it with (by these names)
METHODS = {
    "init": ("module", "adapter_name"),
    "forward": ("module", "active_adapter", "x", "result"),
    "merge_safe": ("module", "active_adapter", "orig_weight"),
    "merge_unsafe": ("module", "active_adapter", "orig_weight"),
    "unmerge": ("module", "active_adapter", "orig_weight"),
}
LAYER_METHODS = ("get_base_layer", "_cache_store", "_cache_pop")
# PEFT's bitsandbytes 4-bit layer: its forward, and what the fused training path reads of it
BNB_FORWARD = ("self", "x")
BNB_ATTRS = ("active_adapters", "disable_adapters", "merged")  # (and the instance's lora_A, lora_variant)

_MISSING = object()
_saved: dict[tuple[type, str], object] = {}  # (class, method) -> its own __dict__ entry before patching
_warned: set[str] = set()


class PeftVersionError(RuntimeError):
    """The installed PEFT lacks the pieces ``patch_peft`` replaces, or has them with other signatures."""


class PeftPatch:
    """What ``patch_peft()`` returns. As a context manager, leaving the block unpatches PEFT again if
    this call patched it (a ``patch_peft()`` inside an already patched block changes nothing)."""

    def __init__(self, applied: bool) -> None:
        self.applied = applied

    def __enter__(self) -> "PeftPatch":
        return self

    def __exit__(self, *exc) -> None:
        if self.applied:
            unpatch_peft()


def _peft_modules():
    try:
        import peft
        from peft.tuners.lora import dora, layer, variants
    except ImportError as err:
        raise ImportError(f"dorakit.patch_peft() patches HF PEFT, which could not be imported ({err}). Install it: "
                          f"{INSTALL_HINT}.") from None
    return peft, variants, dora, layer


def check_peft() -> dict[type, type]:
    """Check every PEFT piece ``patch_peft`` replaces or uses, before touching any.

    Returns:
        {variant class: PEFT's magnitude holder class}.
    Raises:
        PeftVersionError: naming each missing piece or changed signature and the supported PEFT range.
    """
    peft, variants, dora, layer = _peft_modules()
    problems, found = [], {}
    for name, (holder_name, _) in VARIANTS.items():
        cls, holder = getattr(variants, name, None), getattr(dora, holder_name, None)
        if not isinstance(cls, type) or not isinstance(holder, type):
            problems.append(f"peft.tuners.lora.{'variants.' + name if cls is None else 'dora.' + holder_name} is missing")
            continue
        if "fan_in_fan_out" not in inspect.signature(holder.__init__).parameters:
            problems.append(f"{holder_name}.__init__ takes no fan_in_fan_out")
        for method, expected in METHODS.items():
            static = inspect.getattr_static(cls, method, None)
            if not isinstance(static, staticmethod):
                problems.append(f"{name}.{method} is not a static method")
                continue
            params = tuple(inspect.signature(static.__func__).parameters)
            if params[: len(expected)] != expected:
                problems.append(f"{name}.{method}{params} does not start with {expected}")
        found[cls] = holder
    for method in LAYER_METHODS:
        if not callable(getattr(layer.LoraLayer, method, None)):
            problems.append(f"peft.tuners.lora.layer.LoraLayer.{method} is missing")
    four_bit = _bnb_4bit_class()
    if four_bit is not None:
        params = tuple(inspect.signature(four_bit.forward).parameters)
        if params[: len(BNB_FORWARD)] != BNB_FORWARD or not all(hasattr(four_bit, a) for a in BNB_ATTRS):
            problems.append(f"peft.tuners.lora.bnb.Linear4bit.forward{params} or its attributes changed")
    if problems:
        raise PeftVersionError(
            f"dorakit.patch_peft() supports PEFT {SUPPORTED_RANGE} (tested: {', '.join(TESTED_VERSIONS)}); the "
            f"installed PEFT {peft.__version__} differs where dorakit plugs in: {'; '.join(problems[:4])}. Install a "
            f"supported PEFT ({INSTALL_HINT}) or use dorakit's own layers (dorakit.inject_adapters), which need no "
            "PEFT internals. Nothing was patched.")
    return found


def _bnb_4bit_class() -> type | None:
    """PEFT's bitsandbytes 4-bit LoRA layer, if bitsandbytes is installed (PEFT defines it only then)."""
    try:
        from peft.tuners.lora import bnb
    except ImportError:
        return None
    return getattr(bnb, "Linear4bit", None)


def is_patched() -> bool:
    return bool(_saved)


def patch_peft() -> PeftPatch:
    """Make every DoRA adapter of PEFT's LoRA layers compute with dorakit's math (idempotent).

    Covers PEFT's ``Linear`` (over ``nn.Linear`` and transformers' ``Conv1D``), ``Embedding``,
    ``Conv1d/2d/3d`` and bitsandbytes ``Linear4bit``/``Linear8bitLt`` layers, built before or after
    the call, by ``get_peft_model``, ``PeftModel.from_pretrained``, ``load_adapter``, ``add_adapter``,
    TRL's ``peft_config`` or diffusers' ``load_lora_weights``/``add_adapter``. Other layers keep
    PEFT's own DoRA code (a warning says so once per kind).

    Returns:
        A ``PeftPatch``; ``with dorakit.patch_peft(): ...`` unpatches when the block ends.
    Raises:
        ImportError: PEFT is not installed.
        PeftVersionError: the installed PEFT does not have the expected pieces (nothing is patched).

    Example::

        dorakit.patch_peft()
        model = peft.get_peft_model(base, peft.LoraConfig(r=8, use_dora=True, target_modules=["q_proj"]))
    """
    if _saved:
        return PeftPatch(applied=False)
    holders = check_peft()
    peft = _peft_modules()[0]
    if peft.__version__ not in TESTED_VERSIONS and "untested" not in _warned:
        _warned.add("untested")
        warnings.warn(f"dorakit.patch_peft(): PEFT {peft.__version__} has the expected pieces but was not tested "
                      f"(tested: {', '.join(TESTED_VERSIONS)}).", stacklevel=2)
    for cls, holder in holders.items():
        fan_in_fan_out = VARIANTS[cls.__name__][1]
        for method in METHODS:
            original = getattr(cls, method)  # the plain function (own or inherited)
            _saved[(cls, method)] = cls.__dict__.get(method, _MISSING)
            setattr(cls, method, staticmethod(_REPLACEMENTS[method](original, holder, fan_in_fan_out)))
    four_bit = _bnb_4bit_class()
    if four_bit is not None:
        _saved[(four_bit, "forward")] = four_bit.__dict__.get("forward", _MISSING)
        four_bit.forward = _bnb_4bit_forward(four_bit.forward, tuple(holders))
    return PeftPatch(applied=True)


def unpatch_peft() -> None:
    """Put PEFT's own DoRA methods back (idempotent). Layers keep their adapters and magnitudes and
    compute with PEFT's code again; a merge made under the patch can be undone by PEFT's unmerge."""
    for (cls, method), own in _saved.items():
        if own is _MISSING:
            delattr(cls, method)
        else:
            setattr(cls, method, own)
    _saved.clear()


def _fall_back(reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"dorakit.patch_peft(): {reason} is not covered by dorakit; PEFT's own DoRA code runs for it.",
                      stacklevel=4)


# ---- the replacements: each falls back to PEFT's original where dorakit does not cover the layer ----

def _init(original, holder_cls, fan_in_fan_out):
    def init(module, adapter_name, **kwargs):
        view = new_view(module, adapter_name)
        if isinstance(view, str) or getattr(module, "ephemeral_gpu_offload", False):
            if isinstance(view, str):
                _fall_back(view)
            return original(module, adapter_name=adapter_name, **kwargs)
        if "lora_magnitude_vector" not in module.adapter_layer_names:
            module.adapter_layer_names = module.adapter_layer_names[:] + ("lora_magnitude_vector",)
        holder = holder_cls(fan_in_fan_out=getattr(module, "fan_in_fan_out", False) if fan_in_fan_out is None
                            else fan_in_fan_out)
        holder.weight = nn.Parameter(_initial_magnitude(module, view), requires_grad=True)
        module.lora_magnitude_vector[adapter_name] = holder
        holder.__dict__[VIEW_ATTR] = view  # not setattr: the view must not become a submodule
    return init


def _initial_magnitude(module: nn.Module, view) -> torch.Tensor:
    """m = ||W0 + s B A||_row (the adapted layer starts as the base), in PEFT's dtype: the adapter's
    promoted with the base weight's (PEFT casts it to fp32 later when it does so for A and B)."""
    weight = view.base_weight()
    lora_a = view.lora_params()[0]
    dtype = torch.promote_types(lora_a.dtype, view.base_rows(weight).dtype)
    shape = view.magnitude_shape()
    if weight.device.type == "meta" or lora_a.device.type == "meta":  # low_cpu_mem_usage: loaded next
        return torch.empty(shape, dtype=dtype, device="meta")
    try:
        from peft.utils.integrations import gather_params_ctx  # DeepSpeed ZeRO-3 gathers the base weight
    except ImportError:
        import contextlib
        gather_params_ctx = lambda params: contextlib.nullcontext()  # noqa: E731
    with gather_params_ctx(module.get_base_layer().parameters()):
        return view.row_norm().to(dtype).reshape(shape)


def _forward(original, holder_cls, fan_in_fan_out):
    def forward(module, active_adapter, x, result, **kwargs):
        view = adapter_view(module, active_adapter)
        if isinstance(view, str):
            _fall_back(view)
            return original(module, active_adapter=active_adapter, x=x, result=result, **kwargs)
        return view.adapted_output(x, result)
    return forward


def _returning_copy(name: str):
    """merge_safe and unmerge: dorakit's new weight (``peft_merge.<name>``), or PEFT's own method where
    dorakit does not cover the layer (it returns None then)."""
    def replacement(original, holder_cls, fan_in_fan_out):
        def method(module, active_adapter, orig_weight):
            weight = getattr(peft_merge, name)(module, active_adapter, orig_weight)
            return original(module, active_adapter, orig_weight) if weight is None else weight
        return method
    return replacement


_merge_safe = _returning_copy("merged_copy")
_unmerge = _returning_copy("unmerged_copy")


def _merge_unsafe(original, holder_cls, fan_in_fan_out):
    def merge_unsafe(module, active_adapter, orig_weight):
        if not peft_merge.merge_in_place(module, active_adapter, orig_weight):
            original(module, active_adapter, orig_weight)
    return merge_unsafe


def _bnb_4bit_forward(original, dora_variants: tuple[type, ...]):
    def forward(self, x, *args, **kwargs):
        if not (args or kwargs) and torch.is_grad_enabled() and not (self.disable_adapters or self.merged):
            active = [name for name in self.active_adapters if name in self.lora_A]
            if len(active) == 1 and isinstance(self.lora_variant.get(active[0]), dora_variants):
                view = adapter_view(self, active[0])
                if isinstance(view, PeftQuantizedView):
                    return view(x)  # QuantizedLinear.forward: the one-pass path (PEFT's own path with dropout)
        return original(self, x, *args, **kwargs)
    return forward


_REPLACEMENTS = {"init": _init, "forward": _forward, "merge_safe": _merge_safe, "merge_unsafe": _merge_unsafe,
                 "unmerge": _unmerge}
