"""DoRA/LoRA over ``nn.Embedding`` with PEFT's embedding semantics.

An embedding is a linear map from one-hot tokens: W0 = weight.T is [embedding_dim, num_embeddings],
so the magnitude has one entry per embedding dimension and the norm runs over the vocabulary.
PEFT's names and shapes: ``lora_embedding_A`` [r, num_embeddings], ``lora_embedding_B``
[embedding_dim, r]; A starts at zero and B random, so the adapted model starts as the base.
No dropout (the inputs are token ids) and no bias.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import AdapterLayer


class Embedding(AdapterLayer):
    supports_dropout = False

    def weight_rows(self, weight: Tensor) -> Tensor:
        return weight.T  # [embedding_dim, num_embeddings]

    def create_adapter(self, r: int, *, device: torch.device, dtype: torch.dtype) -> None:
        num_embeddings, embedding_dim = self.base_weight().shape
        self.lora_embedding_A = nn.Parameter(torch.randn(r, num_embeddings, device=device, dtype=dtype))
        self.lora_embedding_B = nn.Parameter(torch.randn(embedding_dim, r, device=device, dtype=dtype))

    def reset_adapter(self, init_lora_weights: bool | str) -> None:
        if init_lora_weights is False:
            return
        with torch.no_grad():  # same for True and "gaussian", as in PEFT
            nn.init.zeros_(self.lora_embedding_A)
            nn.init.normal_(self.lora_embedding_B)

    def lora_params(self) -> tuple[Tensor, Tensor]:
        return self.lora_embedding_A, self.lora_embedding_B

    def lora_A_rows(self) -> Tensor:
        return self.lora_embedding_A

    def lora_B_rows(self) -> Tensor:
        return self.lora_embedding_B

    def lora_A_forward(self, x: Tensor) -> Tensor:
        base = self.base_layer
        return F.embedding(  # [..., r]
            x,
            self.lora_embedding_A.T,
            padding_idx=base.padding_idx,
            max_norm=base.max_norm,
            norm_type=base.norm_type,
            scale_grad_by_freq=base.scale_grad_by_freq,
            sparse=base.sparse,
        )

    def lora_B_weight(self) -> Tensor:
        return self.lora_embedding_B

    def lora_B_forward(self, hidden: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        # Scaled embeddings (e.g. Gemma's) multiply the base lookup; the adapter's share must match.
        embed_scale = getattr(self.base_layer, "embed_scale", None)
        if embed_scale is not None:
            weight = weight * embed_scale
        return F.linear(hidden, weight, bias)  # [..., embedding_dim]

    def base_forward_without_bias(self, x: Tensor) -> Tensor:
        raise RuntimeError("Embeddings take no dropout; the base output is always reused.")
