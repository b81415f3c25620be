"""A dorakit model in transformers' ``Trainer`` (and TRL's trainers, its subclasses), as a PEFT model is.

Nothing to call: when a transformers model gets dorakit adapters (``inject_adapters``, ``load_adapter``),
``sync`` below teaches it the few things a stock ``Trainer`` asks of a model with adapters, and undoes
that when the adapters are taken out (``unload``, ``merge_and_unload``). What ``Trainer`` does, and why
each piece is needed (read in transformers 5.23, accelerate 1.15 and TRL 1.16; issue 14):

- ``save_model()`` and every checkpoint call ``model.save_pretrained(dir, state_dict=..., is_main_process=...)``.
  On a dorakit model that writes the adapter in PEFT's format (``adapter_config.json`` +
  ``adapter_model.safetensors``), as a ``PeftModel``'s and transformers' own adapter integration's do;
  before, it wrote the whole model under ``base_layer`` keys, which neither ``from_pretrained`` nor
  ``dorakit.load_adapter`` reads. ``dorakit.save_merged`` writes a whole merged model.
- A bitsandbytes-quantized base is trained only when transformers sees adapters on it, by the flag
  ``_hf_peft_config_loaded`` (or ``isinstance(model, PeftModel)``). The flag is set, and the methods
  transformers calls on a model that carries it answer for dorakit's adapter (``active_adapters``,
  ``get_adapter_state_dict``, ``enable_adapters``, ``disable_adapters``); the ones that would put PEFT
  layers on top of dorakit's (``load_adapter``, ``add_adapter``, ...) raise with the call that works.
  With the flag, activation checkpointing also makes the embeddings' output require grad, as for PEFT.
- ``resume_from_checkpoint`` and ``load_best_model_at_end`` load adapter files only into a
  ``PeftModel`` (``isinstance``), and otherwise look for whole-model weights and fail. No model hook
  reaches that code, so ``Trainer._load_from_checkpoint`` and ``Trainer._load_best_model`` are wrapped
  once per process (when ``transformers.trainer`` is imported, or at once if it already was): for a
  dorakit model whose checkpoint holds an adapter they load it strictly (every tensor, every shape,
  the same scaling); every other model goes to transformers' own code, unchanged.
- TRL's trainers compute the loss from ``lm_head.weight`` directly (a fused head), which would never
  see an adapter on ``lm_head``; ``Trainer.train`` refuses that case, as TRL does for PEFT.
- Fused AdamW, the default optimizer of both, needs nothing here: ``dorakit.norm_cache`` keys the
  cached norm on every optimizer step.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import os
import sys
from pathlib import Path

from torch import nn

from ..inject import CONFIG_ATTR, adapter_layers
from ..formats.keys import PEFT_PREFIX, adapter_state_dict, is_adapter_key, to_peft_key
from ..formats.peft import (CONFIG_NAME, WEIGHTS_NAME, load_adapter_tensors, read_adapter_config, read_adapter_tensors,
                            save_adapter)
from ..functional import lora_scaling
from ..layers import AdapterLayer
from ..modules_to_save import ModulesToSave

ADAPTER_NAME = "default"  # what transformers and PEFT call the one adapter
FLAG = "_hf_peft_config_loaded"


def sync(model: nn.Module) -> None:
    """Attach to or detach from a transformers model after its adapters changed (registered with
    ``dorakit.inject``); any other module is left alone. Imports nothing: a transformers model means
    transformers is loaded."""
    modeling = sys.modules.get("transformers.modeling_utils")
    if modeling is None or not isinstance(model, modeling.PreTrainedModel):
        return
    if getattr(model, CONFIG_ATTR, None) is not None:
        attach(model)
    else:
        detach(model)


def attach(model: nn.Module) -> None:
    """Make a dorakit-adapted transformers model save, report and reload its adapter through
    transformers' own entry points (see the module docstring)."""
    for name, method in MODEL_METHODS.items():
        setattr(model, name, functools.partial(method, model))  # a partial: deepcopy and torch.save rebind it
    setattr(model, FLAG, True)
    install_trainer_patch()


def detach(model: nn.Module) -> None:
    for name in (*MODEL_METHODS, FLAG):
        model.__dict__.pop(name, None)


# ---- the model's side -------------------------------------------------------------------------------

def _save_pretrained(model, save_directory, *, state_dict=None, is_main_process=True, push_to_hub=False, **_):
    """Write the adapter in PEFT's format (what ``Trainer`` calls for ``save_model`` and checkpoints).
    ``state_dict``: the whole model's, when only the caller holds whole tensors (DeepSpeed, FSDP)."""
    if push_to_hub:
        raise ValueError("A dorakit model's save_pretrained writes its adapter locally; upload the directory "
                         "with huggingface_hub.upload_folder.")
    if not is_main_process:
        return
    tensors = None
    if state_dict is not None:
        tensors = {k: v for k, v in state_dict.items() if is_adapter_key(k)}
        missing = sorted(set(adapter_state_dict(model)) - set(tensors))
        if missing:
            raise ValueError(f"The state_dict given to save_pretrained lacks {len(missing)} adapter tensors, "
                             f"e.g. {missing[:3]}; pass the whole model's state_dict.")
    save_adapter(model, save_directory, overwrite=True, tensors=tensors)


def _active_adapters(model) -> list[str]:
    return [ADAPTER_NAME]


def _get_adapter_state_dict(model, adapter_name=None, state_dict=None) -> dict:
    """The adapter's tensors under PEFT's keys without the ``base_model.model.`` prefix (as transformers
    returns them; its ``save_pretrained`` adds the prefix)."""
    state = state_dict if state_dict is not None else model.state_dict()
    return {to_peft_key(k)[len(PEFT_PREFIX):]: v for k, v in state.items() if is_adapter_key(k)}


def _set_disabled(model, disabled: bool) -> None:
    layers = [layer for _, layer in adapter_layers(model)]
    if any(layer.merged for layer in layers):
        raise ValueError("Some adapters are merged into their base weights; use `with dorakit.disable_adapters(model):`, "
                         "which unmerges them for the block.")
    for module in [*layers, *(m for m in model.modules() if isinstance(m, ModulesToSave))]:
        module.disabled = disabled


def _disable_adapters(model) -> None:
    """The base model's behaviour until ``enable_adapters()`` (``dorakit.disable_adapters`` is the context form)."""
    _set_disabled(model, True)


def _enable_adapters(model) -> None:
    _set_disabled(model, False)


def _refuse(model, *args, what: str, **kwargs):
    raise ValueError(
        f"This model carries a dorakit adapter; transformers' {what} would put PEFT layers on top of it. "
        "To use another adapter: dorakit.unload(model), then dorakit.load_adapter(model, directory)."
    )


MODEL_METHODS = {
    "save_pretrained": _save_pretrained,
    "active_adapters": _active_adapters,
    "get_adapter_state_dict": _get_adapter_state_dict,
    "enable_adapters": _enable_adapters,
    "disable_adapters": _disable_adapters,
    **{what: functools.partial(_refuse, what=what) for what in ("load_adapter", "add_adapter", "set_adapter",
                                                                "delete_adapter", "enable_peft_hotswap")},
}


# ---- the Trainer's side -----------------------------------------------------------------------------

def adapted(model: nn.Module | None, trainer=None) -> nn.Module | None:
    """The dorakit-adapted model inside ``model`` (unwrapped from DDP and accelerate), or None."""
    if model is None:
        return None
    if trainer is not None and getattr(trainer, "accelerator", None) is not None:
        model = trainer.accelerator.unwrap_model(model)  # DDP, torch.compile
    return model if getattr(model, CONFIG_ATTR, None) is not None else None


def holds_adapter(directory: str | os.PathLike | None) -> bool:
    return directory is not None and (Path(directory) / CONFIG_NAME).is_file() and (Path(directory) / WEIGHTS_NAME).is_file()


def load_checkpoint_adapter(model: nn.Module, directory: str | os.PathLike) -> None:
    """Load a checkpoint's adapter into the live adapted ``model``: every tensor with the model's shape
    (``load_adapter_tensors``), and the same scaling per layer (shapes alone do not show lora_alpha)."""
    saved = read_adapter_config(directory)
    for path, layer in adapter_layers(model):
        expected = lora_scaling(saved.rank_for(path), saved.alpha_for(path), saved.use_rslora)
        if saved.use_dora != layer.use_dora or (saved.direction == "lora" and abs(expected - layer.scaling) > 1e-12):
            raise ValueError(f"The adapter in {directory} was trained with another configuration than this model's "
                             f"(layer {path}: scaling {expected:g} vs {layer.scaling:g}, use_dora {saved.use_dora} vs "
                             f"{layer.use_dora}); resume with the model adapted by the same DoraConfig.")
    load_adapter_tensors(model, read_adapter_tensors(directory), source=str(directory))


def _check_fused_head(trainer) -> None:
    """TRL's trainers project through ``lm_head.weight`` directly (``trl.trainer.utils.add_fused_lm_head``)."""
    model = adapted(trainer.model, trainer)
    if model is None or not type(trainer).__module__.startswith("trl."):
        return
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(head, AdapterLayer):
        raise ValueError(f"{type(trainer).__name__} computes the loss from lm_head.weight directly, so a dorakit adapter "
                         "on the output head would never train (TRL refuses PEFT's there too). Remove the head from "
                         "target_modules, or train it fully with modules_to_save=['lm_head'].")


def patch_trainer(trainer_cls) -> None:
    """Wrap ``Trainer``'s checkpoint loading (and ``train``'s checks) for dorakit models; idempotent."""
    if getattr(trainer_cls, "_dorakit_patched", False):
        return
    load_from_checkpoint, load_best_model, train = (
        trainer_cls._load_from_checkpoint, trainer_cls._load_best_model, trainer_cls.train)

    @functools.wraps(load_from_checkpoint)
    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        target = adapted(model if model is not None else self.model, self)
        if target is not None and not self.is_fsdp_enabled and holds_adapter(resume_from_checkpoint):
            return load_checkpoint_adapter(target, resume_from_checkpoint)
        return load_from_checkpoint(self, resume_from_checkpoint, model)

    @functools.wraps(load_best_model)
    def _load_best_model(self):
        target = adapted(self.model, self)
        if target is not None and not self.is_fsdp_enabled and holds_adapter(self.state.best_model_checkpoint):
            return load_checkpoint_adapter(target, self.state.best_model_checkpoint)
        return load_best_model(self)

    @functools.wraps(train)
    def _train(self, *args, **kwargs):
        _check_fused_head(self)
        return train(self, *args, **kwargs)

    trainer_cls._load_from_checkpoint = _load_from_checkpoint
    trainer_cls._load_best_model = _load_best_model
    trainer_cls.train = _train
    trainer_cls._dorakit_patched = True


class _PatchOnImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Patches ``transformers.trainer`` right after it is first imported: importing it here ourselves
    would add seconds to every ``inject_adapters`` of a transformers model."""

    def find_spec(self, fullname, path, target=None):
        if fullname != "transformers.trainer":
            return None
        sys.meta_path.remove(self)  # find the real spec with the other finders
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            self._loader, spec.loader = spec.loader, self
        return spec

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        module.__loader__ = self._loader
        module.__spec__.loader = self._loader
        self._loader.exec_module(module)
        patch_trainer(module.Trainer)


_watcher: _PatchOnImport | None = None


def install_trainer_patch() -> None:
    """Patch ``transformers.Trainer`` now if it is imported, else as soon as it is."""
    global _watcher
    module = sys.modules.get("transformers.trainer")
    if module is not None and hasattr(module, "Trainer"):
        patch_trainer(module.Trainer)
    elif _watcher is None:
        _watcher = _PatchOnImport()
        sys.meta_path.insert(0, _watcher)
