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
   step them), advances a generation counter. It exists because fused optimizers (and bitsandbytes')
   write parameters with kernels that do not bump version counters (issue 14: transformers' Trainer
   and TRL default to ``adamw_torch_fused``, and a version-keyed norm stayed at its step-0 value).
   A tensor is keyed on it when an optimizer could write it: it requires grad, or it holds a
   ``.grad`` (an optimizer updates any parameter with a gradient, also one frozen after the
   gradient was made). So the frozen base weight's norms survive steps. Writers that step a flat
   copy and copy back (DeepSpeed ZeRO, FSDP1) step a ``torch.optim.Optimizer`` inside, so the
   counter moves before the next forward reads the copied values.
2. **The tensor's version counter**, bumped by every in-place write autograd can see: ``copy_``,
   ``load_state_dict``, in-place ops under ``torch.no_grad()`` or ``torch.inference_mode()``,
   foreach and for-loop optimizers, DDP's broadcast of rank 0's parameters.
3. **The tensor's storage, by identity (a weak reference), its address, dtype and shape**:
   ``param.data = other``, ``load_state_dict(assign=True)``, ``.to()``. The address alone was not
   enough: ``param.data = t`` keeps the parameter's version counter, and a new storage can be
   allocated where a freed one was (seen: two ``.data`` reassignments in a row put a new ``lora_B``
   at the old address and the logits were 3.7% off). A weak reference dies with its storage, so a
   new storage never matches an old key, and the cache keeps nothing alive.

What none of these can see: writes through a tensor that shares the storage but not the version
counter (``p.data.add_(...)``, or ``t`` after ``p.data = t``), by code that is not a
``torch.optim.Optimizer``. Autograd cannot see them either. After such a write, call
``refresh_norms()`` (also ``dorakit.refresh_norms``), which invalidates every cache at once.
``tests/test_norm_freshness.py`` trains with each optimizer and edit above and compares the live
model with the same adapter reloaded and with PEFT's DoRA (which caches nothing) from the same start.
"""

from __future__ import annotations

import weakref

from torch import Tensor
from torch.optim.optimizer import register_optimizer_step_post_hook

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
    """Invalidate every cached norm in the process. Needed only after writing parameters through a
    tensor that does not share their version counter (``p.data``) outside a ``torch.optim.Optimizer``
    (see the module docstring)."""
    global _generation
    _generation += 1


class StorageRef(weakref.ref):
    """A weak reference to a tensor's storage that pickles (and deep-copies) as a reference to nothing,
    so a model holding cache keys can still be saved with ``torch.save`` or copied: the copy's first
    forward recomputes, its storages being new anyway."""

    __slots__ = ()

    def __reduce__(self):
        return (object, ())  # a fresh object, equal to no reference


def tensor_key(t: Tensor) -> tuple:
    """What identifies the contents of ``t`` without reading them (no device sync). ``t.grad`` is read
    only for tensors that do not require grad, which are leaves, so it never warns."""
    writable = t.requires_grad or t.grad is not None
    return (t._version, t.data_ptr(), StorageRef(t.untyped_storage()), t.dtype, t.shape,
            _generation if writable else None)


def cache_key(tensors: tuple[Tensor, ...], extra: tuple = ()) -> tuple:
    """The key under which a value computed from ``tensors`` may be reused."""
    return tuple(tensor_key(t) for t in tensors) + extra
