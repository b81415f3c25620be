"""The models and methods of the GPU benchmark (benchmarks/gpu.py): random LLaMA-shaped bases in bf16,
and one "arm" per method, each a model over the SAME frozen base tensors (no copy of the base per
method, so an 8B base fits once) with its own adapter, fused AdamW and kernel mode.
"""

from __future__ import annotations

import copy
import gc
from dataclasses import dataclass, field

import torch

import dorakit
from dorakit import kernels

from .common import TARGETS

# name -> transformers LlamaConfig fields. "tiny" is the dry run's (CPU, seconds).
SHAPES = {
    # Llama-3.2-1B's shapes (tied embeddings).
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    # Llama-3.1-8B's shapes.
    "llama-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=128, tie_word_embeddings=False),
}

# arm -> (library, use_dora, kernel mode, compiled). Ratios are to peft_lora.
ARMS = {
    "dorakit_dora": ("dorakit", True, "torch", False),
    "dorakit_dora_triton": ("dorakit", True, "triton", False),
    "dorakit_dora_compiled": ("dorakit", True, "torch", True),
    "dorakit_lora": ("dorakit", False, "torch", False),
    "peft_dora": ("peft", True, "torch", False),
    "peft_lora": ("peft", False, "torch", False),
}


def build_base(shape: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """A randomly initialised LLaMA of the given shape, built on ``device`` (fast on a GPU), in ``dtype``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(max_position_embeddings=4096, **SHAPES[shape])
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return model.to(dtype).eval()


def tensor_mb(tensors) -> float:
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


@dataclass
class Arm:
    name: str
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    kernel_mode: str
    compiled: bool
    stats: dict = field(default_factory=dict)

    def own_mb(self) -> float:
        """Memory this arm holds beyond the shared base: trainable parameters and optimizer states."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        states = [t for s in self.optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
        return tensor_mb(params) + tensor_mb(states)


def _share_base_copy(base: torch.nn.Module) -> torch.nn.Module:
    """A deep copy whose parameters ARE the base's (same tensors): adapters wrap modules, never weights."""
    return copy.deepcopy(base, memo={id(p): p for p in base.parameters()})


def _adapt(base: torch.nn.Module, library: str, use_dora: bool, r: int) -> torch.nn.Module:
    model = _share_base_copy(base)
    if library == "dorakit":
        return dorakit.inject_adapters(model, dorakit.DoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS,
                                                                 use_dora=use_dora))
    import peft

    return peft.get_peft_model(model, peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS, use_dora=use_dora))


def compile_layers(model: torch.nn.Module, backend: str) -> None:
    """Regional compilation: each decoder layer compiled in place (the layers share one compiled code,
    so a 32-layer model costs one layer's compile), embeddings and head eager."""
    for layer in model.model.layers:
        layer.compile(backend=backend)


def build_arms(base: torch.nn.Module, r: int, names: list[str], compile_backend: str) -> dict[str, Arm]:
    """Every arm over ``base``. PEFT DoRA's B gets a non-zero value and every dorakit DoRA arm the same
    adapter values, so their losses must agree (checked by the caller)."""
    import peft

    from dorakit.formats.keys import from_peft_key

    arms = {}
    peft_dora_state = None
    for name in ["peft_dora"] + [n for n in names if n != "peft_dora"]:
        library, use_dora, mode, compiled = ARMS[name]
        model = _adapt(base, library, use_dora, r)
        if name == "peft_dora":
            with torch.no_grad():
                for pname, param in model.named_parameters():
                    if "lora_B" in pname:
                        param.normal_(0, 0.01)
            peft_dora_state = {from_peft_key(k): v for k, v in peft.get_peft_model_state_dict(model).items()}
        elif library == "dorakit" and use_dora:
            model.load_state_dict(peft_dora_state, strict=False)
        if compiled:
            compile_layers(model, compile_backend)
        params = [p for p in model.parameters() if p.requires_grad]
        fused = params[0].device.type == "cuda"  # the default of transformers' Trainer and TRL on GPUs
        arms[name] = Arm(name, model.train(), torch.optim.AdamW(params, lr=1e-5, fused=fused), mode, compiled)
    return {name: arms[name] for name in names}


def train_step(arm: Arm, ids: torch.Tensor) -> float:
    """Forward (causal-LM loss), backward, fused AdamW step; returns the loss (read after the step)."""
    arm.model.train()
    with kernels.using(arm.kernel_mode):
        loss = arm.model(input_ids=ids, labels=ids).loss
        loss.backward()
    arm.optimizer.step()
    arm.optimizer.zero_grad(set_to_none=True)
    return loss.detach()


@torch.no_grad()
def inference_forward(arm: Arm, ids: torch.Tensor) -> torch.Tensor:
    """A prefill: eval forward over the batch, logits of the last position only (the head is the same
    for every method and would dilute the ratios)."""
    arm.model.eval()
    with kernels.using(arm.kernel_mode):
        return arm.model(input_ids=ids, logits_to_keep=1).logits


def measured(fn, arm: Arm, key: str, cuda: bool):
    """``fn`` wrapped to record, in ``arm.stats[key]``, the largest increase of allocated CUDA memory
    over what was allocated before the call (activations, gradients, temporaries)."""

    def run():
        if cuda:
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        out = fn()
        if cuda:
            increase = (torch.cuda.max_memory_allocated() - before) / 2**20
            arm.stats[key] = max(arm.stats.get(key, 0.0), increase)
        return out

    return run


def release() -> None:
    """After the caller dropped its models: free their memory and compiled code before the next configuration."""
    gc.collect()
    torch._dynamo.reset()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
