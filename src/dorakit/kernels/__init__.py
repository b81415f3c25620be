"""Optional fused kernels for DoRA's hot spots, and the one place that decides when they run (issue 18).

Two kernels, each with its PyTorch twin in ``dorakit.functional`` as the reference it is tested against:

- ``triton_norm.row_norm``: the row norm in one launch, one pass over W0, cancelled rows exact
  (twin: ``functional.dora_row_norm``);
- ``triton_compose.compose``: y = g * base + lora and its backward (twin: ``functional.dora_compose`` + cast).

When they run (``set_mode`` / ``mode()``, or the environment variable ``DORAKIT_KERNELS``):

- ``"auto"`` (default): on CUDA tensors of a GPU with bf16 tensor cores (compute capability 8.0+) when
  Triton is installed, outside torch.compile (whose own code generation fuses the PyTorch form); the
  PyTorch functions otherwise. Both compute the same thing, so this choice changes speed, never
  results beyond fp32 rounding.
- ``"torch"``: always the PyTorch functions.
- ``"triton"``: the kernels wherever their shapes allow (outside torch.compile), CPU tensors included
  under Triton's interpreter (``TRITON_INTERPRET=1``, how the tests run them); an error naming the
  fix if Triton is missing or a CPU tensor comes without the interpreter.

The core never imports this wing: importing ``dorakit`` installs ``Dispatch`` into ``dorakit.layers.base``.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os

import torch
from torch import Tensor

from ..layers import base as _base

MODES = ("auto", "torch", "triton")
INSTALL_HINT = "pip install 'dorakit[kernels]' (triton>=3.0; it comes with PyTorch's CUDA builds)"
_mode = os.environ.get("DORAKIT_KERNELS", "auto")


def _check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"Unknown kernel mode {mode!r} (from set_mode or DORAKIT_KERNELS): use one of {', '.join(MODES)}.")
    return mode


def set_mode(mode: str) -> None:
    """Choose when the fused kernels run: "auto", "torch" or "triton" (see the module docstring)."""
    global _mode
    _mode = _check_mode(mode)


def mode() -> str:
    return _check_mode(_mode)


@contextlib.contextmanager
def using(mode_: str):
    """``set_mode`` for the duration of a ``with`` block (benchmarks compare both paths in one process)."""
    previous = mode()
    set_mode(mode_)
    try:
        yield
    finally:
        set_mode(previous)


@functools.cache
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


@functools.cache
def _tensor_cores(device_index: int) -> bool:
    """bf16 tensor-core dots need compute capability 8.0 (A100, RTX 30xx) or newer."""
    return torch.cuda.get_device_capability(device_index) >= (8, 0)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _use_triton(*tensors: Tensor) -> bool:
    """Whether the Triton kernels take these tensors now (raises only in "triton" mode)."""
    current = mode()
    if current == "torch" or torch.compiler.is_compiling():
        return False
    on_cuda = all(t.device.type == "cuda" for t in tensors)
    if current == "auto":
        return on_cuda and triton_installed() and _tensor_cores(tensors[0].device.index or 0)
    if not triton_installed():
        raise ImportError(f"Kernel mode 'triton' needs Triton, which is not installed. Install it with: {INSTALL_HINT}.")
    if not on_cuda and not _interpreting():
        raise ValueError("Kernel mode 'triton' got tensors off CUDA: run on a GPU, set TRITON_INTERPRET=1 (Triton's "
                         "CPU interpreter, slow: for tests), or use mode 'auto'.")
    return True


class Dispatch:
    """What ``dorakit.layers.base`` calls at its two hot spots; each returns None where PyTorch should run."""

    @staticmethod
    def row_norm(weight_rows, lora_A: Tensor, lora_B: Tensor, scaling: float, base_sq: Tensor | None):
        if not isinstance(weight_rows, Tensor) or not _use_triton(weight_rows, lora_A, lora_B):
            return None
        from . import triton_norm

        if not triton_norm.supports(weight_rows, lora_A.shape[0]):
            return None
        return triton_norm.row_norm(weight_rows, lora_A, lora_B, scaling, base_sq)

    @staticmethod
    def compose(base_out: Tensor, lora_out: Tensor, scale: Tensor):
        if not _use_triton(base_out, lora_out, scale):
            return None
        from . import triton_compose

        if not triton_compose.supports(base_out, lora_out, scale):
            return None
        return triton_compose.compose(base_out, lora_out, scale)


_base.use_kernels(Dispatch)
