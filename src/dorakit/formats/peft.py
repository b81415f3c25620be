"""Save and load adapters in PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Files written here load with ``peft.PeftModel.from_pretrained``; adapters written by PEFT (LoRA and
DoRA) load here. Loading is strict: every tensor the config implies must be in the file with the
model's shape, and nothing else may be; otherwise the error lists the offending keys and nothing is
changed. Only safetensors are read: pickle files can run code and are refused.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import Tensor, nn

from .. import atomic
from ..config import DoraConfig
from ..inject import CONFIG_ATTR, inject_adapters, unload
from .keys import PEFT_PREFIX, PROJECTION_KEYS, adapter_state_dict, expert_count_mismatches, from_peft_key, to_peft_key
from ..layers import VeraProjection
from ..modules_to_save import ModulesToSave
from .peft_config import from_peft_dict, hub_name, to_peft_dict
from .tensor_files import read_tensors, write_tensors

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
SHOWN = 2  # offending keys listed per kind of problem (with the count of the others)
BASE_MODEL_METADATA = "base_model"  # safetensors metadata: the base model's hub name, when known


def recorded_base(directory: str | os.PathLike) -> tuple[str | None, str | None]:
    """(base_model_name_or_path, hub name) an adapter directory records; either may be None."""
    from safetensors import safe_open

    config = read_adapter_config(directory)
    try:
        with safe_open(str(Path(directory) / WEIGHTS_NAME), "pt") as handle:
            hub = (handle.metadata() or {}).get(BASE_MODEL_METADATA)
    except Exception:  # an unreadable weights file is reported when it is loaded
        hub = None
    return config.base_model_name_or_path, hub


def save_adapter(
    model: nn.Module, directory: str | os.PathLike, *, overwrite: bool = False, tensors: dict[str, Tensor] | None = None
) -> Path:
    """Write the model's adapter to ``directory`` in PEFT's format.

    Args:
        model: a model adapted by ``inject_adapters`` or ``load_adapter``.
        directory: created if needed; other files in it are kept.
        overwrite: replace an adapter already in ``directory`` (refused otherwise).
        tensors: the adapter's tensors keyed as in ``model.state_dict()``, when the model's own are
            not whole (an FSDP-sharded model: gather them first); default: read from ``model``.
    Returns:
        The directory.
    Raises:
        ValueError: the model has no dorakit adapter.
        FileExistsError: ``directory`` holds an adapter and ``overwrite`` is False.

    Example::

        dorakit.save_adapter(model, "out/adapter")
        peft_model = peft.PeftModel.from_pretrained(base_model, "out/adapter")  # PEFT reads it as its own
    """
    config = getattr(model, CONFIG_ATTR, None)
    if not isinstance(config, DoraConfig):
        raise ValueError("This model has no dorakit adapter to save; call dorakit.inject_adapters first.")
    if config.magnitude_axis != "out":
        # PEFT would read the magnitude as per output row: refuse rather than write a file it misreads.
        raise ValueError("PEFT's format has DoRA's output-axis magnitude only; this adapter has magnitude_axis="
                         f"{config.magnitude_axis!r}. Save it with dorakit.save_kohya(model, 'adapter.safetensors') "
                         "(LyCORIS's layout: dora_scale [1, in]).")
    directory = Path(directory)
    if not overwrite and any((directory / name).exists() for name in (CONFIG_NAME, WEIGHTS_NAME)):
        raise FileExistsError(f"{directory} already holds an adapter; pass overwrite=True to replace it.")
    state = adapter_state_dict(model) if tensors is None else tensors
    tensors = {to_peft_key(k): v.detach().contiguous().clone() for k, v in state.items()}
    projection = model_projection(model)
    if projection is not None and config.save_projection:
        tensors.update({key: getattr(projection, name).detach().contiguous().clone() for name, key in PROJECTION_KEYS.items()})
    peft_dict = to_peft_dict(config, model)
    content = json.dumps(peft_dict, indent=2, sort_keys=True)
    metadata = {"format": "pt"}
    hub = hub_name(peft_dict.get("base_model_name_or_path"))
    if hub:
        metadata[BASE_MODEL_METADATA] = hub  # the hub's name beside the recorded path (PEFT ignores it)
    atomic.write_files(
        directory,
        {
            WEIGHTS_NAME: lambda path: write_tensors(tensors, path, metadata=metadata),
            CONFIG_NAME: lambda path: path.write_text(content + "\n"),
        },
        marker=CONFIG_NAME,
    )
    return directory


def read_adapter_config(directory: str | os.PathLike) -> DoraConfig:
    """The ``DoraConfig`` of an adapter directory (PEFT's or dorakit's), validated."""
    directory = _existing_dir(directory)
    path = directory / CONFIG_NAME
    if not path.is_file():
        present = sorted(p.name for p in directory.iterdir())[:10]
        raise FileNotFoundError(f"{directory} has no {CONFIG_NAME}, so it is not an adapter directory (it holds: {present}).")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}). Save the adapter again.") from None
    return from_peft_dict(data, source=str(path))


def read_adapter_tensors(directory: str | os.PathLike, fix: str = "Save the adapter again from the trained model."
                         ) -> dict[str, Tensor]:
    """The tensors of an adapter directory, keyed as in the file, checked (floating point, finite).
    Never unpickles anything; ``fix`` ends the message about a damaged file."""
    directory = _existing_dir(directory)
    path = directory / WEIGHTS_NAME
    if not path.is_file():
        pickles = [name for name in PICKLE_NAMES if (directory / name).exists()]
        if pickles:
            raise ValueError(
                f"{directory} holds {pickles[0]}, a pickle file, which dorakit never loads (unpickling can run code). "
                f"Convert it to {WEIGHTS_NAME} with PEFT (save_pretrained(..., safe_serialization=True))."
            )
        raise FileNotFoundError(f"{directory} has no {WEIGHTS_NAME}.")
    # Floating point and finite (issue 19): an int32 tensor would be cast silently, a NaN would spread.
    return read_tensors(path, fix=fix)


def load_adapter(
    model: nn.Module, directory: str | os.PathLike, *, adapter_dtype: torch.dtype | None = None
) -> nn.Module:
    """Wrap ``model`` as the adapter's config says and load its tensors, strictly.

    Args:
        model: the base model the adapter was trained on (no adapters yet).
        directory: an adapter directory written by dorakit or PEFT (LoRA or DoRA).
        adapter_dtype: as in ``inject_adapters``.
    Returns:
        The same model object, adapted.
    Raises:
        FileNotFoundError / ValueError: a missing or unreadable directory, config or weights file;
            missing, unexpected or wrongly shaped tensors (the error lists them). The model is
            unchanged whenever an error is raised.
    """
    config = read_adapter_config(directory)
    tensors = read_adapter_tensors(directory)
    check_ranks(config, tensors, str(directory))  # before injecting allocates what the config asks for
    try:
        inject_adapters(model, config, adapter_dtype=adapter_dtype)
    except ValueError as err:
        raise ValueError(f"{directory} does not fit this model: {err}{_trained_on(config)}") from None
    try:
        load_adapter_tensors(model, tensors, source=str(directory))
    except ValueError as err:
        unload(model)
        raise ValueError(f"{err}{_trained_on(config)}") from None
    except BaseException:
        unload(model)
        raise
    return model


def _trained_on(config: DoraConfig) -> str:
    """The adapter's recorded base model, for errors about an adapter that does not fit."""
    base = config.base_model_name_or_path
    return f" The adapter was trained on {base} (adapter_config.json): use that model (--model {base})." if base else ""


def load_adapter_tensors(model: nn.Module, tensors: dict[str, Tensor], source: str = "the adapter") -> None:
    """Copy PEFT-keyed adapter tensors into an adapted model after checking every key and shape."""
    tensors, projection_update = _split_projection(model, tensors, source)
    copy_paths = {p for p, m in model.named_modules() if isinstance(m, ModulesToSave)}
    expected = adapter_state_dict(model)
    model_state = model.state_dict(keep_vars=True)
    given: dict[str, Tensor] = {}
    unexpected: list[str] = []
    for key, value in tensors.items():
        try:
            ours = from_peft_key(key, copy_paths)
        except ValueError:
            unexpected.append(key)
            continue
        if ours in expected or ours in model_state:  # PEFT may also store base embeddings (resized vocab)
            given[ours] = value
        else:
            unexpected.append(key)
    missing = sorted(set(expected) - set(given))
    mismatched = [
        f"{to_peft_key(k)}: file {list(v.shape)} vs model {list(model_state[k].shape)}"
        for k, v in sorted(given.items())
        if tuple(v.shape) != tuple(model_state[k].shape)
    ]
    problems = []
    experts = expert_count_mismatches(model, given)  # says more than the shape mismatch below
    if experts:
        problems.append(f"{len(experts)} expert adapter(s) for another number of experts: {_first(experts)}")
    problems += _missing_problems(missing, expected)
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s): {_first(sorted(unexpected))}")
    if mismatched:
        problems.append(
            f"{len(mismatched)} shape mismatch(es) (a different base model or rank?): {_first(mismatched)}"
        )
    if problems:
        raise ValueError(f"{source} does not fit this model: " + "; ".join(problems) + ".")
    _refuse_zero_magnitudes(model, given, source)
    with torch.no_grad():
        for key, value in given.items():
            model_state[key].copy_(value.to(device=model_state[key].device, dtype=model_state[key].dtype))
        for target, value in projection_update:
            target.copy_(value.to(device=target.device, dtype=target.dtype))


def _layer(key: str) -> str:
    return key.split(".lora_")[0] if ".lora_" in key else key.rsplit(".", 1)[0]


def _missing_problems(missing: list[str], expected: dict[str, Tensor]) -> list[str]:
    """Missing tensors told apart: whole adapted layers the file lacks (the model has layers the
    adapter's base did not), DoRA magnitudes alone (a file saved without them), and the rest."""
    by_layer: dict[str, list[str]] = {}
    for key in expected:
        by_layer.setdefault(_layer(key), []).append(key)
    absent = set(missing)
    whole = sorted(layer for layer, keys in by_layer.items() if all(k in absent for k in keys))
    rest = [k for k in missing if _layer(k) not in set(whole)]
    magnitudes = [k for k in rest if k.endswith("lora_magnitude_vector")]
    other = [k for k in rest if not k.endswith("lora_magnitude_vector")]
    problems = []
    if whole:
        problems.append(f"{len(whole)} adapted layer(s) of this model have no tensors in the file (a model with more "
                        f"layers or other modules than the adapter's base): {_first(whole)}")
    if magnitudes:
        problems.append(f"{len(magnitudes)} missing tensor(s) (DoRA magnitudes: PEFT would re-initialise these silently "
                        f"and change the model's outputs): {_first([to_peft_key(k) for k in magnitudes])}")
    if other:
        problems.append(f"{len(other)} missing tensor(s): {_first([to_peft_key(k) for k in other])}")
    return problems


def check_ranks(config: DoraConfig, tensors: dict[str, Tensor], source: str) -> None:
    """The ranks of the file's tensors must be the config's, compared before anything is allocated:
    a config saying r=1000000000 must not make ``inject_adapters`` try to allocate terabytes first."""
    first_dim = {".lora_A.weight": "lora_A", ".lora_embedding_A": "lora_embedding_A", ".vera_lambda_d": "vera_lambda_d"}
    found = 0
    for key, value in tensors.items():
        suffix = next((s for s in first_dim if key.endswith(s)), None)
        if suffix is None or not key.startswith(PEFT_PREFIX) or value.dim() == 0:
            continue
        found += 1
        path = key[len(PEFT_PREFIX): -len(suffix)]
        rank = config.r if config.direction == "vera" else config.rank_for(path)
        # An expert stack's lora_A is [E·r, in] (PEFT's ParamWrapper layout, issue 17): a multiple of the
        # rank here; the expert count itself is checked against the model when the tensors are loaded.
        experts = bool(config.target_parameters) and value.shape[0] % rank == 0 and suffix == ".lora_A.weight"
        if value.shape[0] != rank and not experts:
            raise ValueError(f"{source}: {CONFIG_NAME} gives rank {rank} for '{path}', but {WEIGHTS_NAME} holds "
                             f"{first_dim[suffix]} {list(value.shape)} (rank {value.shape[0]}): the config and the "
                             "weights do not belong together. Save the adapter again.")
    if not found and config.target_modules:
        raise ValueError(f"{source}: {WEIGHTS_NAME} holds no adapter tensors (lora_A, lora_embedding_A or "
                         "vera_lambda_d) for the targets its config names; save the adapter again.")


def _refuse_zero_magnitudes(model: nn.Module, given: dict[str, Tensor], source: str) -> None:
    """A DoRA magnitude that is zero for every row zeroes every output of its layer (and makes the exact
    unmerge divide by zero): a damaged file or one saved before the magnitudes were set, unless the
    base weight itself is all zero."""
    zero = []
    for key, value in given.items():
        if key.endswith(".lora_magnitude_vector") and value.numel() and not bool(value.any()):
            base = model.get_submodule(key[: -len(".lora_magnitude_vector")]).base_weight()
            if not base.is_floating_point() or bool(base.any()):
                zero.append(to_peft_key(key))
    if zero:
        raise ValueError(f"{source}: the DoRA magnitudes (lora_magnitude_vector) of {len(zero)} layer(s) are all "
                         f"zero: {_first(zero)}. Loaded or merged, every output of those layers would be zero. The "
                         "file is damaged or its magnitudes were never set (they start as the base weight's row "
                         "norms); save the adapter again from the trained model.")


def model_projection(model: nn.Module) -> VeraProjection | None:
    """The VeRA projection shared by the model's layers, if it has VeRA adapters."""
    return next((m for m in model.modules() if isinstance(m, VeraProjection)), None)


def _split_projection(
    model: nn.Module, tensors: dict[str, Tensor], source: str
) -> tuple[dict[str, Tensor], list[tuple[Tensor, Tensor]]]:
    """Take VeRA's shared pair out of the file's tensors: (the rest, [(model buffer, file tensor)]).

    A file saved with ``save_projection`` must hold the pair (PEFT refuses it otherwise too); without
    it, the pair regenerated from ``projection_prng_key`` at injection is the one trained with.
    """
    found = {name: tensors[key] for name, key in PROJECTION_KEYS.items() if key in tensors}
    rest = {k: v for k, v in tensors.items() if k not in PROJECTION_KEYS.values()}
    projection = model_projection(model)
    config = getattr(model, CONFIG_ATTR, None)
    if projection is None:
        if found:
            raise ValueError(f"{source} holds VeRA projections ({', '.join(PROJECTION_KEYS[n] for n in found)}) "
                             "but its config is not a VeRA adapter.")
        return rest, []
    if config is not None and config.save_projection and len(found) < len(PROJECTION_KEYS):
        missing = [key for name, key in PROJECTION_KEYS.items() if name not in found]
        raise ValueError(f"{source} was saved with save_projection=true but lacks {missing}; save the adapter again.")
    updates = []
    for name, value in found.items():
        buffer = getattr(projection, name)
        if tuple(value.shape) != tuple(buffer.shape):
            raise ValueError(
                f"{source} does not fit this model: {PROJECTION_KEYS[name]} is {list(value.shape)} but the targets "
                f"need {list(buffer.shape)} ([r, widest input] / [widest output, r]): a different base model or target set?"
            )
        updates.append((buffer, value))
    return rest, updates


def _first(items: list[str]) -> str:
    more = f", ... ({len(items) - SHOWN} more)" if len(items) > SHOWN else ""
    return ", ".join(items[:SHOWN]) + more


def _existing_dir(directory: str | os.PathLike) -> Path:
    directory = Path(directory)
    if not directory.exists():
        raise FileNotFoundError(f"Adapter directory {directory} does not exist.")
    if not directory.is_dir():
        raise NotADirectoryError(f"{directory} is a file; give the adapter's directory.")
    return directory
