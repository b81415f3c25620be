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
from .formats.detect import load_adapter
from .formats.diffusers import save_diffusers
from .formats.kohya import save_kohya
from .formats.peft import read_adapter_config, save_adapter
from .layers import AdapterLayer
from .norm_cache import refresh_norms
from .formats.merged import load_merged, save_merged
from . import kernels  # installs the fused-kernel dispatcher (Triton is imported only on first use)
from .inject import ADAPTER_HOOKS as _ADAPTER_HOOKS
from .integrations import trainer as _trainer

_ADAPTER_HOOKS.append(_trainer.sync)  # transformers models save and resume their adapter in Trainer (issue 14)
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
    "save_diffusers",
    "save_kohya",
    "save_merged",
    "trainable_parameters",
    "unload",
    "unpatch_peft",
]
