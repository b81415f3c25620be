"""Tiny models for the tests: one per supported layer type, plus transformers models from configs."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn

# Without a GPU the Triton kernels (tests/test_kernels.py) run in Triton's CPU interpreter, which Triton
# chooses when its modules are imported: so it is set here, before anything imports Triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in fp64 (0 when both are zero)."""
    a, b = a.detach().double(), b.detach().double()
    denom = b.norm().item()
    return (a - b).norm().item() / denom if denom else (a - b).norm().item()


class LinearNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(10, 24)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(24, 6, bias=False)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class EmbeddingNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(40, 12, padding_idx=0)
        self.head = nn.Linear(12, 5)

    def forward(self, x):
        return self.head(self.emb(x))


class ScaledEmbedding(nn.Embedding):
    """Like Gemma's scaled word embedding: the lookup is multiplied by a constant."""

    def __init__(self, *args, embed_scale: float = 3.0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.embed_scale = embed_scale

    def forward(self, x):
        return super().forward(x) * self.embed_scale


class ScaledEmbeddingNet(EmbeddingNet):
    def __init__(self) -> None:
        super().__init__()
        self.emb = ScaledEmbedding(40, 12)


class ConvNet(nn.Module):
    """Two convolutions of dimension ``dim``; the second has a 1x1 kernel (PEFT's special case)."""

    def __init__(self, dim: int = 2, groups: int = 1, dilation: int = 1, padding_mode: str = "zeros") -> None:
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dim]
        self.conv1 = conv(4, 8, 3, padding=1 * dilation, dilation=dilation, groups=groups, padding_mode=padding_mode)
        self.act = nn.ReLU()
        self.conv2 = conv(8, 6, 1, groups=2 if groups > 1 else 1, bias=False)

    def forward(self, x):
        return self.conv2(self.act(self.conv1(x)))


def tiny_llama(vocab: int = 96):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=vocab, max_position_embeddings=64, tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(vocab: int = 96):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        n_embd=32, n_layer=2, n_head=4, vocab_size=vocab, n_positions=64,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(cfg).eval()


# name -> (builder, input maker, targets). Inputs are deterministic per call.
def _image(dim):
    return lambda: torch.randn((2, 4) + (6,) * dim, generator=torch.Generator().manual_seed(1))


TOY_CASES = {
    "linear": (LinearNet, lambda: torch.randn(3, 5, 10, generator=torch.Generator().manual_seed(1)), ["fc1", "fc2"]),
    "embedding": (
        EmbeddingNet,
        lambda: torch.randint(0, 40, (3, 7), generator=torch.Generator().manual_seed(1)),
        ["emb", "head"],
    ),
    "scaled_embedding": (
        ScaledEmbeddingNet,
        lambda: torch.randint(0, 40, (3, 7), generator=torch.Generator().manual_seed(1)),
        ["emb"],
    ),
    "conv1d": (lambda: ConvNet(1), _image(1), ["conv1", "conv2"]),
    "conv2d": (lambda: ConvNet(2), _image(2), ["conv1", "conv2"]),
    "conv3d": (lambda: ConvNet(3), _image(3), ["conv1", "conv2"]),
}

# Layer shapes PEFT cannot merge (or computes differently): checked against our own references.
EXTRA_CASES = {
    "conv2d_groups": (lambda: ConvNet(2, groups=2), _image(2), ["conv1", "conv2"]),
    "conv2d_dilation_reflect": (lambda: ConvNet(2, dilation=2, padding_mode="reflect"), _image(2), ["conv1"]),
    "gpt2_conv1d": (tiny_gpt2, lambda: torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(1)),
                    ["c_attn", "c_proj", "c_fc"]),
}


def seeded(builder, seed: int = 0):
    torch.manual_seed(seed)
    return builder()


def perturb_adapters(model: nn.Module, seed: int = 3) -> None:
    """Move every adapter away from its identity init (B non-zero, magnitude off its norm), so that
    merge and parity tests can fail."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(1 + 0.2 * torch.randn(param.shape, generator=gen, dtype=param.dtype))
            elif "lora_B" in name or "lora_embedding_A" in name:
                param.add_(0.1 * torch.randn(param.shape, generator=gen, dtype=param.dtype))


def output_of(model, inputs):
    out = model(inputs)
    return out.logits if hasattr(out, "logits") else out


@pytest.fixture
def deepcopy():
    return copy.deepcopy
