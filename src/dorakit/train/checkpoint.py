"""Resumable training state, written atomically, without pickle.

    checkpoint/
      adapter/                 the adapter in PEFT's format (usable on its own, like any saved adapter)
      model.safetensors        instead of adapter/ when every weight trains (--method full)
      optimizer.safetensors    AdamW's per-parameter state and the RNG states, as tensors
      state.json               step, data position, optimizer hyper-parameters, scheduler, Python RNG, config

The directory is built under a temporary name and renamed over the previous one, so a crash or a full
disk while writing leaves the previous checkpoint whole.
"""

from __future__ import annotations

import contextlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .. import atomic
from ..fields import check_fields
from ..inject import CONFIG_ATTR
from ..formats.peft import load_adapter_tensors, read_adapter_tensors, save_adapter
from ..formats.tensor_files import read_tensors, save_whole_model, write_tensors

STATE_NAME = "state.json"
MODEL_NAME = "model.safetensors"
TENSORS_NAME = "optimizer.safetensors"
FORMAT = 1
STATE_KEYS = {"progress": dict, "scheduler": dict, "python_rng": list, "config": dict}  # what every state.json holds


@dataclass
class Progress:
    """Where a run is: restored exactly on resume."""

    step: int = 0  # optimizer steps done
    position: int = 0  # training examples consumed (index into the seeded order stream)
    tokens: int = 0  # trained tokens seen
    elapsed: float = 0.0  # seconds of training so far, across resumes


def has_adapter(model: nn.Module) -> bool:
    return getattr(model, CONFIG_ATTR, None) is not None


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, Tensor):
        return value.item()
    return value


def _run_state(progress: Progress, scheduler, config: dict) -> dict:
    """What every checkpoint's state.json holds (JSON: no pickle)."""
    return {
        "format": FORMAT,
        "progress": progress.__dict__,
        "scheduler": _json_safe(scheduler.state_dict()),  # lr_lambdas: [None] for plain functions
        "python_rng": _json_safe(random.getstate()),
        "config": config,
    }


def _continue_from(state: dict, scheduler) -> Progress:
    """Restore what ``_run_state`` saved (the scheduler and Python's RNG); the run's progress."""
    scheduler.load_state_dict(state["scheduler"])
    version, internal, gauss = state["python_rng"]
    random.setstate((version, tuple(internal), gauss))
    progress = Progress(**state["progress"])
    check_fields(progress, source="state.json")  # a step of "3" would fail far from here
    return progress


def _optimizer_slots(tensors: dict[str, Tensor]) -> dict[int, dict[str, Tensor]]:
    """AdamW's per-parameter state from optimizer.safetensors: {parameter index: {slot: tensor}}."""
    slots: dict[int, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("state."):
            _, index, name = key.split(".", 2)
            slots.setdefault(int(index), {})[name] = value
    return slots


def save_checkpoint(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, progress: Progress, config: dict) -> None:
    """Write the whole training state to ``directory`` (replacing the previous checkpoint atomically)."""
    opt = optimizer.state_dict()
    tensors: dict[str, Tensor] = {}
    for index, slots in opt["state"].items():
        for name, value in slots.items():
            tensors[f"state.{index}.{name}"] = value.detach().cpu().contiguous()
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for device, rng in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{device}"] = rng
    state = {**_run_state(progress, scheduler, config), "param_groups": _json_safe(opt["param_groups"])}
    with atomic.new_directory(directory, overwrite=True, what="checkpoint") as tmp:
        if has_adapter(model):
            save_adapter(model, tmp / "adapter")
        else:
            save_whole_model(model, tmp / MODEL_NAME)  # handles tied weights (stored once)
        write_tensors(tensors, tmp / TENSORS_NAME)
        (tmp / STATE_NAME).write_text(json.dumps(state, indent=1), encoding="utf-8")


def damaged(directory: Path) -> str:
    """What to do about a checkpoint that cannot be read (the end of every such message)."""
    return (f"The checkpoint in {directory} is damaged and cannot be resumed: start the run again with --overwrite "
            "(or in another --output), or put back a copy of the checkpoint.")


def read_state(directory: Path) -> dict:
    """The checkpoint's state.json (step, position, config ...), or an error saying there is none or
    what is wrong with it. Reads the newest complete copy when a kill interrupted a replacement
    (``atomic.complete_copy``; the run puts it in place when it resumes)."""
    source = atomic.complete_copy(directory) or directory
    path = source / STATE_NAME
    if not path.is_file():
        raise FileNotFoundError(f"No checkpoint in {directory}: there is nothing to resume. Start the run without --resume.")
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); it may be truncated. {damaged(directory)}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        found = state.get("format") if isinstance(state, dict) else None
        raise ValueError(f"{path} has checkpoint format {found}, this dorakit reads format {FORMAT}.")
    missing = [key for key, kind in STATE_KEYS.items() if not isinstance(state.get(key), kind)]
    if missing:
        raise ValueError(f"{path} lacks {', '.join(missing)} (or has the wrong type there). {damaged(directory)}")
    return state


def restore_checkpoint(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                       scheduler: torch.optim.lr_scheduler.LRScheduler) -> Progress:
    """Load adapter, optimizer, scheduler and RNG states into a freshly built run; returns its progress.

    Raises:
        ValueError / FileNotFoundError: a file of the checkpoint is missing, truncated or does not fit, named.
    """
    from safetensors.torch import load_model

    state = read_state(directory)
    with _reading(directory):
        if has_adapter(model):
            tensors = read_adapter_tensors(directory / "adapter", fix=damaged(directory))
            load_adapter_tensors(model, tensors, source=str(directory / "adapter"))
        else:
            _check_file(directory / MODEL_NAME, directory)
            try:
                load_model(model, str(directory / MODEL_NAME), device=str(next(model.parameters()).device))
            except Exception as err:  # safetensors' own error type for a truncated file
                raise ValueError(f"{directory / MODEL_NAME} cannot be read ({type(err).__name__}: {err}). "
                                 f"{damaged(directory)}") from None
        tensors = _optimizer_file(directory)
        optimizer.load_state_dict({"state": _optimizer_slots(tensors), "param_groups": state["param_groups"]})
        torch.set_rng_state(tensors["rng.torch"])
        cuda_states = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
        if cuda_states and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda_states)
        return _continue_from(state, scheduler)


def _check_file(path: Path, directory: Path) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing. {damaged(directory)}")


def _optimizer_file(directory: Path) -> dict[str, Tensor]:
    """optimizer.safetensors, checked: its float tensors finite (RNG states are bytes)."""
    _check_file(directory / TENSORS_NAME, directory)
    return read_tensors(directory / TENSORS_NAME, fix=damaged(directory), floating=False)


@contextlib.contextmanager
def _reading(directory: Path):
    """Name the checkpoint in errors from restoring what its files hold (a wrong key, shape or type)."""
    try:
        yield
    except torch.OutOfMemoryError:
        raise
    except (KeyError, TypeError, IndexError, RuntimeError) as err:
        raise ValueError(f"{directory} does not fit this run ({type(err).__name__}: {err}). {damaged(directory)}") from None
    except ValueError as err:
        if str(directory) in str(err):
            raise
        raise ValueError(f"{directory} does not fit this run ({err}). {damaged(directory)}") from None


# ---- multi-process runs (--strategy ddp|fsdp): torch.distributed.checkpoint ---------------------------
#
#   checkpoint/
#     dcp/          the trainable tensors and AdamW state, each process writing its shards (frozen base
#                   weights are not saved); loads into any number of processes, or one without torchrun
#     adapter/      the adapter gathered whole, in PEFT's format (written by rank 0)
#     state.json    as above, plus the process count and every process's torch RNG state

DCP_NAME = "dcp"


def _dcp_state(wrapped: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The trainable tensors and the optimizer state, keyed by parameter name (shards under FSDP)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    model_state, optim_state = get_state_dict(wrapped, optimizer, options=StateDictOptions(ignore_frozen_params=True))
    return {"model": model_state, "optim": optim_state}


def is_distributed_checkpoint(directory: Path) -> bool:
    return (directory / DCP_NAME).is_dir()


def save_distributed_checkpoint(directory: Path, wrapped: nn.Module, model: nn.Module, optimizer: torch.optim.Optimizer,
                                scheduler, progress: Progress, config: dict, run, adapter: dict[str, Tensor]) -> None:
    """Collective: every process writes its shards; rank 0 writes the rest and renames the directory
    into place only after every process has finished (a crash leaves the previous checkpoint)."""
    import torch.distributed.checkpoint as dcp

    rng_states = run.gather(torch.get_rng_state().tolist())
    state = {**_run_state(progress, scheduler, config), "processes": run.world, "torch_rng": rng_states}
    parent = directory.parent
    tmp = run.broadcast(str(atomic.temporary_directory(parent, directory.name)) if run.main else None)
    try:
        dcp.save(_dcp_state(wrapped, optimizer), checkpoint_id=str(Path(tmp) / DCP_NAME))
        if run.main:
            save_adapter(model, Path(tmp) / "adapter", tensors=adapter)
            (Path(tmp) / STATE_NAME).write_text(json.dumps(state, indent=1), encoding="utf-8")
        run.barrier()
    except BaseException:
        if run.main:
            atomic.discard(Path(tmp))
        raise
    if run.main:
        atomic.replace_directory(Path(tmp), directory)
    run.barrier()


def restore_distributed_checkpoint(directory: Path, wrapped: nn.Module, optimizer: torch.optim.Optimizer,
                                   scheduler, run) -> Progress:
    """Load a ``dcp/`` checkpoint into this run, whatever its process count (resharding as needed)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    state = read_state(directory)
    with _reading(directory):
        dcp_state = _dcp_state(wrapped, optimizer)
        if not dcp_state["model"]:
            raise ValueError(f"This model has no trainable tensors to restore from {directory}.")
        # dcp.load fails on any trainable key the checkpoint lacks; strict=False below is for the frozen
        # base, which is not in the checkpoint.
        dcp.load(dcp_state, checkpoint_id=str(directory / DCP_NAME))
        set_state_dict(wrapped, optimizer, model_state_dict=dcp_state["model"], optim_state_dict=dcp_state["optim"],
                       options=StateDictOptions(ignore_frozen_params=True, strict=False))
        if state.get("processes") == run.world:  # per-process RNG (dropout) continues exactly
            torch.set_rng_state(torch.tensor(state["torch_rng"][run.rank], dtype=torch.uint8))
        return _continue_from(state, scheduler)


def restore_single_process_checkpoint(directory: Path, wrapped: nn.Module, model: nn.Module,
                                      optimizer: torch.optim.Optimizer, scheduler) -> Progress:
    """Load a one-process checkpoint (adapter/ + optimizer.safetensors) into a multi-process run:
    the whole tensors, keyed by parameter name, are handed to ``set_state_dict``, which shards them
    (FSDP) or copies them (DDP)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    from ..formats.keys import from_peft_key
    from ..modules_to_save import ModulesToSave

    state = read_state(directory)
    if not has_adapter(model):
        raise ValueError(f"{directory} holds a one-process full fine-tuning checkpoint; resume it with one process.")
    with _reading(directory):
        copy_paths = {p for p, m in model.named_modules() if isinstance(m, ModulesToSave)}
        model_state = {f"model.{from_peft_key(k, copy_paths)}": v
                       for k, v in read_adapter_tensors(directory / "adapter", fix=damaged(directory)).items()
                       if k.startswith("base_model.model.")}
        # The one-process optimizer numbered the trainable parameters in model order: name them.
        names = [f"model.{n}" for n, p in model.named_parameters() if p.requires_grad]
        slots = {names[index]: values for index, values in _optimizer_slots(_optimizer_file(directory)).items()}
        groups = [{**group, "params": names} for group in state["param_groups"]]
        set_state_dict(wrapped, optimizer, model_state_dict=model_state, optim_state_dict={"state": slots, "param_groups": groups},
                       options=StateDictOptions(full_state_dict=True, strict=False))
        return _continue_from(state, scheduler)
