"""When a value derived from parameters may be reused: the promise behind dorakit's norm caches.

A DoRA layer's row norm ||W0 + s B A||_row costs O(out * in * r) per layer. Reusing it between forward
passes makes gradient accumulation and activation-checkpoint recomputation pay for it once per
optimizer step, and unmerged inference (one token at a time in generation) cost what LoRA costs.
A reused norm that no longer matches the parameters trains and evaluates the wrong model silently,
so a cached value is keyed on everything that can tell, from the host and without a device sync,
that one of its input tensors was written:

1. **Every optimizer step in the process.** A global post-step hook, which every
   ``torch.optim.Optimizer`` subclass runs (fused, foreach and for-loop AdamW, SGD, Adafactor,
   bitsandbytes' 8-bit and paged optimizers, and the wrappers of accelerate, DeepSpeed and FSDP that
   step them), advances a generation counter. It exists because fused optimizers write parameters
   with kernels that do not bump version counters (issue 14: transformers' Trainer and TRL default
   to ``adamw_torch_fused``, and a version-keyed norm stayed at its step-0 value). Only trainable
   tensors (``requires_grad``) are keyed on it: an optimizer cannot hold a frozen one, so the frozen
   base weight's norms survive steps.
2. **The tensor's version counter**, bumped by every in-place write autograd can see: ``copy_``,
   ``load_state_dict``, in-place ops under ``torch.no_grad()``, foreach and for-loop optimizers.
3. **The tensor's storage address, dtype, device and shape**: ``param.data = other``, ``.to()``.

What none of these can see: writes through ``tensor.data`` (``p.data.add_(...)``), which autograd
cannot see either, by code that is not a ``torch.optim.Optimizer``. After such a write, call
``refresh_norms()`` (also ``dorakit.refresh_norms``), which invalidates every cache at once.
``tests/test_norm_freshness.py`` trains with each optimizer and edit above and compares the live
model with the same adapter reloaded.
"""

from __future__ import annotations

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch import Tensor

_generation = 0
_hook_handle = None


def _after_optimizer_step(optimizer, args, kwargs) -> None:
    global _generation
    _generation += 1


def watch_optimizers() -> None:
    """Register the global post-step hook (once per process; idempotent). Adapter layers call this
    when they are built, so any optimizer created before or after is covered."""
    global _hook_handle
    if _hook_handle is None:
        _hook_handle = register_optimizer_step_post_hook(_after_optimizer_step)


def generation() -> int:
    """How many optimizer steps (and ``refresh_norms`` calls) this process has seen."""
    return _generation


def refresh_norms() -> None:
    """Invalidate every cached norm in the process. Needed only after writing trainable parameters
    through ``tensor.data`` outside a ``torch.optim.Optimizer`` (see the module docstring)."""
    global _generation
    _generation += 1


def tensor_key(t: Tensor) -> tuple:
    """What identifies the contents of ``t`` without reading them (no device sync)."""
    step = _generation if t.requires_grad else None
    return (t._version, t.data_ptr(), t.dtype, t.device, t.shape, step)


def cache_key(tensors: tuple[Tensor, ...], extra: tuple = ()) -> tuple:
    """The key under which a value computed from ``tensors`` may be reused."""
    return tuple(tensor_key(t) for t in tensors) + extra
