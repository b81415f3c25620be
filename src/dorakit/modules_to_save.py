"""Fully trainable copies of chosen modules (PEFT's ``modules_to_save``, e.g. a new classifier head).

The original stays frozen beside the copy, so ``disable_adapters`` and ``unload`` can give the
untouched base model back, and ``merge_and_unload`` keeps the trained copy.
"""

from __future__ import annotations

import copy

from torch import nn


class ModulesToSave(nn.Module):
    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        if isinstance(module, ModulesToSave):
            raise ValueError("This module is already a modules_to_save copy; call dorakit.unload(model) first.")
        self.original_module = module
        self.modules_to_save = copy.deepcopy(module)  # PEFT's attribute name, one copy (one adapter)
        self.disabled = False

    def active(self) -> nn.Module:
        return self.original_module if self.disabled else self.modules_to_save

    @property
    def weight(self):
        return self.active().weight

    def forward(self, *args, **kwargs):
        return self.active()(*args, **kwargs)
