"""DoRA/LoRA over ``torch.nn.MultiheadAttention``, which PEFT adapts with LoRA only.

nn.MultiheadAttention has no linear submodules its forward calls: it reads ``in_proj_weight``
[3E, E] (the q, k and v projections stacked as rows) and ``out_proj.weight`` [E, E] itself. So the
adapter adapts both weights, each as rows like any linear layer (the magnitude of ``in_proj`` has one
entry per q, k and v row), and runs the module's own forward with the adapted weights substituted:

    in_proj:  W' = g[:, None] * (W + s B A)      A [r, E], B [3E, r], m [3E]
    out_proj: a dorakit ``Linear`` adapter in ``out_proj``'s place (A [r, E], B [E, r], m [E])

which is PEFT's layout (``attn.lora_A.weight``, ``attn.base_layer.out_proj.lora_A.weight``, ...),
so LoRA files are PEFT's. Each forward builds the two adapted weights (one [3E, E] and one [E, E]
tensor; the norms come from the cached factored form); merging folds both in and the module
computes exactly as the base. Adapter dropout needs an input to act on and is refused here, as the
module only sees weights. Like PEFT, only q, k and v of one width (``kdim == vdim == embed_dim``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import AdapterLayer
from .experts import PassesAttributes, adapted_weight
from .linear import Linear


class MultiheadAttention(PassesAttributes, Linear):
    """Adapter over ``nn.MultiheadAttention``: ``in_proj_weight`` here (a ``Linear`` adapter on that
    weight's rows), ``out_proj`` by a ``Linear`` adapter of its own.

    The ``out_proj`` adapter is built with this one and put in place by ``install()`` (called by
    ``inject_adapters`` once every wrapper is built), so a failed injection leaves the model untouched.
    """

    def __init__(self, base_layer: nn.MultiheadAttention, **kwargs) -> None:
        if not base_layer._qkv_same_embed_dim:
            raise ValueError(
                "nn.MultiheadAttention with separate q/k/v weights (kdim or vdim != embed_dim) cannot take an adapter "
                "yet (PEFT has the same limit). Exclude it, or adapt only the layers around it."
            )
        if kwargs.get("lora_dropout", 0.0):
            raise ValueError(
                f"lora_dropout={kwargs['lora_dropout']} cannot apply to nn.MultiheadAttention: it reads its weights "
                "itself, so its adapter changes the weights, not an input. Set lora_dropout=0 for it."
            )
        super().__init__(base_layer, **kwargs)
        out_proj = base_layer.out_proj
        if isinstance(out_proj, AdapterLayer):
            raise ValueError("This MultiheadAttention's out_proj already has an adapter; unload it first.")
        # Not a submodule until install(): building it must not change the model.
        object.__setattr__(self, "_pending_out_proj", Linear(out_proj, **kwargs))

    def install(self) -> None:
        """Put the ``out_proj`` adapter into the attention module (PEFT's place for it)."""
        pending = self.__dict__.pop("_pending_out_proj", None)
        if pending is not None:
            self.base_layer.out_proj = pending

    @property
    def _qkv_same_embed_dim(self) -> bool:
        # nn.TransformerEncoderLayer's inference fast path reads in_proj_weight and out_proj.weight itself
        # and never calls this module, which would skip the adapters. While any is active, report False:
        # the one condition of that fast path that sends it to the ordinary path, through forward().
        out = self.out_proj_adapter()
        active = not (self.disabled or self.merged) or (out is not None and not (out.disabled or out.merged))
        return self.base_layer._qkv_same_embed_dim and not active

    def out_proj_adapter(self) -> Linear | None:
        out_proj = self.base_layer.out_proj
        return out_proj if isinstance(out_proj, Linear) else None

    # ---- in_proj as rows -----------------------------------------------------------------------
    def base_weight(self) -> Tensor:
        return self.base_layer.in_proj_weight  # [3E, E]: q, k and v rows, read as a linear layer's

    @property
    def weight(self) -> Tensor:
        return self.base_layer.in_proj_weight

    @property
    def bias(self) -> Tensor | None:
        return self.base_layer.in_proj_bias

    def forward(self, query: Tensor, *args, **kwargs):
        substitutes = {}
        if not (self.disabled or self.merged):
            substitutes["in_proj_weight"] = adapted_weight(self)
        out = self.out_proj_adapter()
        if out is not None and not (out.disabled or out.merged):
            substitutes["out_proj.base_layer.weight"] = adapted_weight(out)
        if not substitutes:
            return self.base_layer(query, *args, **kwargs)
        return torch.func.functional_call(self.base_layer, substitutes, (query, *args), kwargs, strict=False)

    # ---- merge: both weights, each layer idempotent -----------------------------------------------------
    def merge(self) -> None:
        super().merge()
        out = self.out_proj_adapter()
        if out is not None:
            out.merge()

    def unmerge(self) -> None:
        super().unmerge()
        out = self.out_proj_adapter()
        if out is not None:
            out.unmerge()

