"""dorakit: DoRA (Weight-Decomposed Low-Rank Adaptation, Liu et al. 2024) for any PyTorch model."""

from .config import DoraConfig
from .inject import (
    adapter_layers,
    disable_adapters,
    inject_adapters,
    merge_and_unload,
    print_trainable_parameters,
    trainable_parameters,
    unload,
)
from .layers import AdapterLayer

__version__ = "0.1.0"

__all__ = [
    "AdapterLayer",
    "DoraConfig",
    "adapter_layers",
    "disable_adapters",
    "inject_adapters",
    "merge_and_unload",
    "print_trainable_parameters",
    "trainable_parameters",
    "unload",
]
