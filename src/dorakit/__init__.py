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
from .formats.peft import load_adapter, read_adapter_config, save_adapter
from .layers import AdapterLayer
from .norm_cache import refresh_norms
from .formats.merged import load_merged, save_merged
from .integrations.peft_patch import patch_peft, unpatch_peft

__version__ = "0.1.0"

__all__ = [
    "AdapterLayer",
    "DoraConfig",
    "adapter_layers",
    "disable_adapters",
    "inject_adapters",
    "load_adapter",
    "load_merged",
    "merge_and_unload",
    "patch_peft",
    "print_trainable_parameters",
    "read_adapter_config",
    "refresh_norms",
    "save_adapter",
    "save_merged",
    "trainable_parameters",
    "unload",
    "unpatch_peft",
]
