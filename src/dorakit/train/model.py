"""The model a run trains: loaded for its task, with its tokenizer, adapters injected per the options."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..config import DoraConfig
from ..integrations.transformers import (check_checkpoint_dir, default_device, place, quantized_loading,
                                         require_transformers, torch_dtype)
from ..inject import inject_adapters
from ..layers import is_conv1d
from ..targets import ALL_LINEAR, expert_parameter_names  # ALL_LINEAR: every Linear/Conv1D but the output head
from .options import TrainConfig

CLASSIFIER_HEADS = ("score", "classifier")  # the new head of transformers' *ForSequenceClassification


@dataclass
class Loaded:
    model: nn.Module
    tokenizer: object
    task: str  # "causal-lm" or "classification"
    device: torch.device
    autocast: torch.dtype | None  # the autocast dtype, None for plain fp32


def check_model_dir(path: str | Path) -> Path:
    """A readable transformers checkpoint directory with safetensors weights, or an error that says what is
    missing (pickle-only weights are refused, never loaded; a GGUF file gets the command that converts it)."""
    path = Path(path)
    if path.is_file() and path.suffix.lower() == ".gguf":
        raise ValueError(
            f"{path} is a GGUF file (llama.cpp's format), not a transformers checkpoint directory. Convert it once "
            f"(needs the gguf package): python -c \"from dorakit.assets import convert_gguf; "
            f"convert_gguf('{path}', '{path.with_suffix('')}-hf')\" and pass --model {path.with_suffix('')}-hf.")
    return check_checkpoint_dir(path)


def resolve_task(path: Path, task: str) -> str:
    if task != "auto":
        return task
    transformers = require_transformers()
    names = getattr(transformers.AutoConfig.from_pretrained(path), "architectures", None) or []
    if any(n.endswith("ForSequenceClassification") for n in names):
        return "classification"
    if any(n.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")) for n in names):
        return "causal-lm"
    raise ValueError(f"Cannot tell the task of {path} from its architectures {names}; pass --task causal-lm "
                     "or --task classification.")


def pick_autocast(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    # auto: bf16 only where it is fast; on CPUs bf16 autocast is usually slower than fp32.
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def load_for_training(cfg: TrainConfig, model_dir: str | Path, labels: list[str] | None,
                      device: torch.device | None = None) -> Loaded:
    """Model + tokenizer for the run's task, adapters injected and only they (and saved modules) trainable.

    Raises:
        FileNotFoundError / ValueError: a directory without weights or tokenizer, classification without
            labels, targets the model does not have.
    """
    path = check_model_dir(model_dir)
    task = resolve_task(path, cfg.task)
    device = device or default_device()
    # Seeded before loading: a classifier's new head is initialised while loading, and --seed fixes it too
    # (unseeded, the same command trained a different model each time: issue 21's flaky accuracy test).
    torch.manual_seed(cfg.seed)
    model, tokenizer = load_model(path, task, cfg.dtype, labels, cfg.quantization, device)
    place(model, device)
    if cfg.gradient_checkpointing:
        # Non-reentrant: works with frozen inputs and keyword arguments; newer transformers renamed the method.
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable({"use_reentrant": False})  # first parameter: the torch.utils.checkpoint kwargs
        model.config.use_cache = False
    torch.manual_seed(cfg.seed)  # adapter init (A) is part of what --seed fixes
    if cfg.method == "full":
        model.requires_grad_(True)
    else:
        check_rank_size(cfg.rank, model)
        inject_adapters(model, adapter_config(cfg, model, task, str(path)))
    return Loaded(model, tokenizer, task, device, pick_autocast(cfg.precision, device))


def check_rank_size(rank: int, model: nn.Module) -> None:
    """Refuse a rank whose adapters would dwarf the model before they are allocated: a typo such as
    --r 100000000 otherwise fills the machine's memory (the kernel then kills a process, maybe another's).
    The estimate counts every 2-D weight as adapted (an upper bound); the limit is generous: 4x the model
    and at least 1e8 values."""
    weights = [p for p in model.parameters() if p.dim() >= 2]
    total = sum(p.numel() for p in model.parameters())
    estimate = rank * sum(p.shape[0] + p.shape[1] for p in weights)
    if estimate > max(4 * total, 10**8):
        raise ValueError(f"--r {rank} would make adapters of up to {estimate:,} values, more than 4x this model's "
                         f"{total:,} parameters; a rank above a layer's min(in, out) adds nothing but memory. "
                         "The DoRA paper uses r from 4 to 64.")


def load_model(path: Path, task: str, dtype: str, labels: list[str] | None, quantization=None,
               device: torch.device | None = None):
    """(model, tokenizer) of a checkpoint for ``task``; a classifier gets one output per label (a new
    head when the checkpoint's does not fit) and a tokenizer without a pad token pads with EOS.
    With ``quantization`` the base's linear layers load in 4 or 8 bits (QLoRA/QDoRA)."""
    transformers = require_transformers()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ValueError(f"The tokenizer of {path} has neither a pad nor an end-of-sequence token.")
        tokenizer.pad_token = tokenizer.eos_token  # padding is masked out; any id will do
    if task == "classification":
        if not labels:
            raise ValueError("A classification model needs text/label data (a 'label' field).")
        model = transformers.AutoModelForSequenceClassification.from_pretrained(
            path, dtype=torch_dtype(dtype), num_labels=len(labels), id2label=dict(enumerate(labels)),
            label2id={name: i for i, name in enumerate(labels)}, ignore_mismatched_sizes=True, use_safetensors=True,
            **quantized_loading(quantization, dtype, device))
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(dtype), use_safetensors=True,
                                                                  **quantized_loading(quantization, dtype, device))
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def default_parameters(cfg: TrainConfig, model: nn.Module) -> list[str] | None:
    """--target-parameters, or with no targets given, every expert stack of a mixture-of-experts model
    (LoRA's direction only: VeRA's shared projections do not cover expert stacks)."""
    if cfg.target_parameters is not None:
        return cfg.target_parameters or None
    if cfg.target_modules or cfg.method not in ("lora", "dora"):
        return None
    return expert_parameter_names(model) or None


def adapter_config(cfg: TrainConfig, model: nn.Module, task: str, base: str) -> DoraConfig:
    heads = [n for n in CLASSIFIER_HEADS if isinstance(getattr(model, n, None), nn.Module)] if task == "classification" else []
    save = list(dict.fromkeys((cfg.modules_to_save or []) + heads))  # a fresh head must train fully
    parameters = default_parameters(cfg, model)
    modules = cfg.target_modules if cfg.target_modules else ALL_LINEAR
    if cfg.target_modules == [] and cfg.target_parameters:
        modules = []  # --target-modules given empty: the parameters only
    return DoraConfig(
        r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.lora_dropout,
        target_modules=modules, target_parameters=parameters,
        exclude_modules=heads or None, use_dora=cfg.method in ("dora", "dvora"), use_rslora=cfg.use_rslora,
        # VeRA's shared projections are drawn from the run's seed, so seeds vary them as they vary LoRA's A.
        direction="vera" if cfg.method in ("vera", "dvora") else "lora", projection_prng_key=cfg.seed,
        modules_to_save=save or None, task_type="SEQ_CLS" if task == "classification" else "CAUSAL_LM",
        base_model_name_or_path=str(Path(base).resolve()),  # absolute: the adapter works from any directory
        fan_in_fan_out=any(is_conv1d(m) for m in model.modules()),  # GPT-2 style [in, out] weights
    )
