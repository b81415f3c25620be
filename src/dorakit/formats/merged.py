"""Merged checkpoints: the adapter folded into the weights, loadable without dorakit, reversible.

``save_merged`` writes a plain checkpoint (``config.json`` + ``model.safetensors``, sharded when
large) that ``transformers.AutoModel*.from_pretrained`` loads as an ordinary model, so inference
costs exactly the base model's. Beside it, in files transformers ignores:

    dorakit_merge.safetensors   per merged DoRA layer: "<path>.row_norm" = ||W0 + sBA||_row and
                                "<path>.base_row_norm" = ||W0||_row (fp32 [out] each)
    dorakit_adapter/            the adapter itself (PEFT format)

With these, ``load_merged`` + ``unmerge()``/``unload()`` restore the base weights exactly in any
later process (DORA.md "Exact unmerge after a reload"); PEFT can only unmerge in the process that
merged.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .. import atomic
from ..inject import adapter_layers, refuse_tied_adapted_weights, unload
from .peft import load_adapter, save_adapter
from .keys import is_adapter_key
from .tensor_files import read_tensors, write_tensors
from ..modules_to_save import ModulesToSave

NORMS_NAME = "dorakit_merge.safetensors"
ADAPTER_SUBDIR = "dorakit_adapter"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
MAX_SHARD_BYTES = 5 * 2**30
NORMS_FIX = (f"The exact unmerge needs it whole: merge again from the base model and the adapter (kept in "
             f"{ADAPTER_SUBDIR}/), or load this checkpoint as a plain model.")


def merged_state_dict(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The plain model's state dict with every adapter folded in, and the unmerge norms.

    The model itself is not changed: merged weights are computed into new tensors (one adapted
    weight at a time, in fp64 like ``merge()``), so the live model keeps training unmerged.

    Returns:
        (state_dict keyed as the unadapted model, norms keyed "<path>.row_norm"/"<path>.base_row_norm").
    Raises:
        ValueError: an adapted weight is shared with another module (tied embeddings): merging it
            would also change the other module, so the merged model would compute something else.
    """
    layers = dict(adapter_layers(model))
    copies = {p for p, m in model.named_modules() if isinstance(m, ModulesToSave)}
    refuse_tied_adapted_weights(model)
    state: dict[str, Tensor] = {}
    for key, value in model.state_dict().items():
        plain = _plain_key(key, layers, copies)
        if plain is not None:
            state[plain] = value
    norms: dict[str, Tensor] = {}
    keys = {id(v): k for k, v in model.state_dict(keep_vars=True).items()}
    for path, layer in layers.items():
        if layer.merged:
            weight = layer.base_weight().detach()
            layer_norms = layer.merged_row_norms()
        else:
            weight = layer.base_weight().detach().clone()
            layer_norms = {name: v.float() for name, v in layer.merge_into(weight).items()}
        refuse_non_finite(path, weight, layer)
        state[_plain_key(keys[id(layer.base_weight())], layers, copies)] = weight  # "<path>.weight", an expert stack's name
        norms.update({f"{path}.{name}": v for name, v in layer_norms.items()})
    return state, norms


def save_merged(
    model: nn.Module,
    directory: str | os.PathLike,
    *,
    tokenizer: Any = None,
    overwrite: bool = False,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> Path:
    """Write the model with its adapter folded in as a plain checkpoint (see the module doc).

    Args:
        model: an adapted model (merged or not; it is left as it is).
        directory: the checkpoint directory, written whole under a temporary name, then renamed.
        tokenizer: saved alongside when given, so the directory is complete for inference.
        overwrite: replace an existing non-empty ``directory``.
        max_shard_bytes: weights above this are split into shards with an index, as transformers does.
    Returns:
        The directory.

    Example::

        dorakit.save_merged(model, "out/merged", tokenizer=tokenizer)
        plain = transformers.AutoModelForCausalLM.from_pretrained("out/merged")  # no dorakit needed
    """
    state, norms = merged_state_dict(model)
    with atomic.new_directory(directory, overwrite=overwrite, what="merged checkpoint", ours=is_merged_checkpoint) as tmp:
        config = getattr(model, "config", None)
        if hasattr(config, "save_pretrained"):
            config.save_pretrained(tmp)
        generation = getattr(model, "generation_config", None)
        if hasattr(generation, "save_pretrained"):
            generation.save_pretrained(tmp)
        _write_weights(_unique_tensors(state), tmp, max_shard_bytes)
        write_tensors(norms, tmp / NORMS_NAME, metadata={"format": "pt"})
        save_adapter(model, tmp / ADAPTER_SUBDIR)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(directory)


def load_merged(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Attach the adapter saved with a merged checkpoint to ``model`` (loaded from that checkpoint),
    in the merged state: ``dorakit.unload(model)`` then gives the exact base model back, and
    ``dorakit.disable_adapters(model)`` the base behaviour.

    Raises:
        FileNotFoundError / ValueError: the directory lacks dorakit's files, or they do not fit.
    """
    directory = Path(directory)
    norms_path = directory / NORMS_NAME
    if not norms_path.is_file() or not (directory / ADAPTER_SUBDIR).is_dir():
        raise FileNotFoundError(
            f"{directory} has no {NORMS_NAME} and {ADAPTER_SUBDIR}/: it was not written by dorakit.save_merged, "
            "so the merge cannot be undone from it."
        )
    norms = read_tensors(norms_path, fix=NORMS_FIX)
    negative = [key for key, value in norms.items() if bool((value < 0).any())]
    if negative:
        raise ValueError(f"{norms_path} holds negative row norms ({', '.join(negative[:3])}): it is damaged. {NORMS_FIX}")
    load_adapter(model, directory / ADAPTER_SUBDIR)
    try:
        for path, layer in adapter_layers(model):
            if layer.use_dora:
                row, base = norms.get(f"{path}.row_norm"), norms.get(f"{path}.base_row_norm")
                if row is None or base is None:
                    raise ValueError(f"{norms_path} lacks the row norms of '{path}'.")
                layer.set_merged(row_norm=row, base_row_norm=base)
            else:
                layer.set_merged()
    except BaseException:
        for _, layer in adapter_layers(model):
            layer.merged = False  # nothing was written to the weights: drop the flags and the adapter
        unload(model)
        raise
    return model


def is_merged_checkpoint(directory: Path) -> bool:
    """Whether ``directory`` was written by ``save_merged`` (what ``overwrite`` may replace)."""
    return (directory / NORMS_NAME).is_file()


def refuse_non_finite(path: str, weight: Tensor, layer: nn.Module | None = None) -> None:
    """Never write a non-finite merged weight (issue 19): say whether the base weight or the adapter is why."""
    if bool(torch.isfinite(weight).all()):
        return
    base = getattr(layer, "base_weight", None)
    base_ok = base is None or layer.merged or not base().is_floating_point() or bool(torch.isfinite(base()).all())
    cause = "the adapter's tensors or their scale overflow" if base_ok else "the base model's weight itself is not finite"
    raise ValueError(f"Merging the adapter into '{path}' gives NaN or infinite weights ({cause}); nothing was written. "
                     "Check the adapter (dorakit.load_adapter checks its tensors) and the base model.")


def _plain_key(key: str, layers: dict[str, nn.Module], copies: set[str]) -> str | None:
    """Map an adapted model's state-dict key to the plain model's, or None for adapter-only tensors."""
    for path in copies:
        if key.startswith(f"{path}.original_module."):
            return None
        if key.startswith(f"{path}.modules_to_save."):
            return f"{path}.{key[len(path) + len('.modules_to_save.'):]}"
    if is_adapter_key(key):
        return None
    for path in sorted(layers, key=len, reverse=True):  # nested adapters (experts, attention): innermost first
        if key.startswith(f"{path}.base_layer."):
            key = f"{path}.{key[len(path) + len('.base_layer.'):]}"
    return key


def _unique_tensors(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Drop keys whose tensor is another key's (tied weights): safetensors stores each once, and
    transformers ties them again on load."""
    seen: set[tuple] = set()
    out = {}
    for key, tensor in state.items():
        ident = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.dtype)
        if tensor.numel() and ident in seen:
            continue
        seen.add(ident)
        out[key] = tensor.contiguous()
    return out


def _write_weights(state: dict[str, Tensor], directory: Path, max_shard_bytes: int) -> None:
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    if len(shards) == 1:
        write_tensors(shards[0], directory / WEIGHTS_NAME, metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        write_tensors(shard, directory / name, metadata={"format": "pt"})
        weight_map.update({key: name for key in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
