"""``TrainConfig``: every option of ``dorakit train``, shared by the Python API, the CLI and run files.

Options come, lowest precedence first, from the defaults below, a config file (YAML or JSON, optionally
one named configuration of several), the saved config of the run being resumed, and the command line.
Defaults follow the DoRA authors' LLaMA recipe (Liu et al. 2024, App. C): lora_alpha = 2r, dropout 0.05,
AdamW, linear schedule with warmup.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..fields import check_fields, check_values
from ..integrations.transformers import DTypeName
from ..integrations.bitsandbytes import Quantization, QuantizeName, QuantType
from .distributed import Strategy

Task = Literal["auto", "causal-lm", "classification"]
Schedule = Literal["linear", "cosine", "constant"]
Precision = Literal["auto", "fp32", "bf16"]


@dataclass
class TrainConfig:
    """Fine-tune a transformers model with DoRA (or LoRA) and save the adapter in PEFT's format."""

    # --- model ---
    model: str | None = None
    """Local transformers model directory. Unset: the embedded default (SmolLM2-135M-Instruct)."""
    task: Task = "auto"
    """causal-lm trains next-token prediction on the targets; classification trains a
    sequence-classification head on text/label data; auto follows the model's architecture."""
    dtype: DTypeName = "auto"
    """Dtype of the frozen base weights; adapters always train in float32. auto keeps the checkpoint's."""
    precision: Precision = "auto"
    """Autocast for forward/backward: bf16 on hardware with fast bf16 (auto picks it on such GPUs), fp32 otherwise."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory (slower steps)."""
    strategy: Strategy = "none"
    """Several processes (launched by torchrun, or accelerate launch --multi_gpu): ddp replicates the model,
    fsdp shards every weight (FSDP2). --batch-size stays the global batch, so with --lora-dropout 0 the
    losses are the one-process run's (to float rounding) whatever the process count. With dropout, each
    process draws its own masks: runs agree in distribution, not step by step."""
    quantize: QuantizeName = "none"
    """Load the frozen base quantized with bitsandbytes (QLoRA / QDoRA): 4bit or 8bit (LLM.int8).
    Adapters train in fp32 over it; evaluate and merge with the same --quantize."""
    quant_type: QuantType = "nf4"
    """4-bit data type: nf4 (QLoRA's) or fp4."""
    double_quant: bool = True
    """4-bit: also quantize the per-block scales (about 0.4 bits per weight less)."""

    # --- adapter ---
    method: Literal["dora", "lora", "vera", "dvora", "full"] = "dora"
    """dora (magnitude + direction), plain lora through the same code, vera (frozen random projections
    shared by all layers, trainable scaling vectors) or dvora (vera's direction with dora's magnitude,
    paper section 5.5), or full fine-tuning (every weight trains; the output is a whole model directory,
    the baseline of the paper's comparisons). vera/dvora train far fewer parameters and usually want
    a larger --lr (VeRA's authors use about 10x LoRA's)."""
    r: int | None = None
    """Adapter rank. Unset: 8, or 256 for vera/dvora (a VeRA layer trains r + out values whatever r is)."""
    lora_alpha: float | None = None
    """Update scale numerator (s = lora_alpha / r). Unset: 2r, as in the DoRA paper."""
    lora_dropout: float = 0.05
    """Dropout on the adapter input."""
    target_modules: list[str] | None = None
    """Module names to adapt. Unset: every linear projection of attention and MLP (not the output head),
    and on a mixture-of-experts model (Qwen3-MoE, Mixtral, gpt-oss, ...) the experts too (see --target-parameters)."""
    target_parameters: list[str] | None = None
    """Parameters to adapt directly (PEFT's target_parameters), e.g. experts.gate_up_proj experts.down_proj.
    Unset, with --target-modules unset too: every expert stack of a mixture-of-experts model (lora and dora;
    none for a dense model). Given without names: none."""
    use_rslora: bool = False
    """Rank-stabilised scale s = lora_alpha / sqrt(r)."""
    modules_to_save: list[str] | None = None
    """Modules trained fully beside the adapters (a classification head is added automatically)."""

    # --- data ---
    data: str | None = None
    """Training data: JSONL, JSON or CSV with instruction/input/output, context/target, prompt/completion,
    text/label, messages (chat) or text fields. Unset: the embedded tweet-sentiment set."""
    val_data: str | None = None
    """Validation data (same shapes). Unset: a seeded split of --data (see --val-fraction)."""
    val_fraction: float = 0.05
    """Share of --data held out for validation when --val-data is unset (0: none)."""
    max_val_examples: int = 500
    """At most this many validation examples (the seeded first ones)."""
    max_length: int = 512
    """Truncate each example to this many tokens; examples left with no target token are dropped."""
    prompt_template: str | None = None
    """Prompt for text/label data, with {text} where the text goes (default 'Text: {text}\\nLabel:')."""
    field_map: dict[str, str] = field(default_factory=dict)
    """Rename data fields before the shape is detected, e.g. --field-map sentiment label."""
    balance_labels: bool = False
    """Label-style data: sample every label equally often (rare labels repeat, frequent ones are
    subsampled; an epoch stays as many examples as the training split holds)."""

    # --- optimisation ---
    output: str = "runs/dorakit"
    """Output directory: adapter/, checkpoint/, metrics.jsonl, summary.json, loss.png."""
    max_steps: int | None = None
    """Optimizer steps to run. Unset: --epochs over the training data."""
    epochs: float = 1.0
    """Passes over the training data when --max-steps is unset."""
    batch_size: int = 16
    """Global batch: examples per optimizer step."""
    micro_batch_size: int | None = None
    """Examples per forward pass; the batch is accumulated over batch_size / micro_batch_size passes. Unset: batch_size."""
    lr: float = 2e-4
    """Peak learning rate (AdamW)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    schedule: Schedule = "linear"
    """Learning-rate schedule after warmup."""
    warmup_steps: int | None = None
    """Linear warmup steps. Unset: --warmup-ratio of the run."""
    warmup_ratio: float = 0.03
    """Warmup as a share of the optimizer steps, when --warmup-steps is unset."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this (0: no clipping)."""
    seed: int = 0
    """Seed for the adapter init, the data split and order, and dropout."""

    # --- evaluation, checkpoints, output ---
    eval_every: int = 100
    """Validation loss (and label accuracy) every this many steps, and at the end (0: only at the end)."""
    eval_accuracy: bool = True
    """Also rank candidate labels by likelihood at each evaluation when the data has labels."""
    save_every: int = 100
    """Write a resumable checkpoint every this many steps (0: only on interrupt and at the end)."""
    keep_checkpoints: bool = False
    """Also keep the adapter of every --save-every step (and the last) in checkpoints/step-N/, e.g. for
    `dorakit analyze`."""
    resume: bool = False
    """Continue the run in --output from its checkpoint, exactly where it stopped."""
    overwrite: bool = False
    """Replace a finished or started run in --output instead of refusing."""
    progress: bool = True
    """Show a progress bar."""
    config: str | None = None
    """YAML or JSON file of options; command-line options override it."""
    name: str | None = None
    """Which named configuration of --config to use, when the file holds several."""

    def __post_init__(self) -> None:
        check_fields(self)  # strict types first (issue 19): a YAML 'lr: fast' is refused here, not a TypeError below
        positive = {"r": self.rank, "batch_size": self.batch_size, "max_length": self.max_length,
                    "max_val_examples": self.max_val_examples}
        if self.micro_batch_size is not None:
            positive["micro_batch_size"] = self.micro_batch_size
        if self.max_steps is not None:
            positive["max_steps"] = self.max_steps
        for key, value in positive.items():
            if value < 1:
                raise ValueError(f"--{_flag(key)} must be at least 1, got {value}.")
        if self.batch_size % self.micro_batch:
            raise ValueError(
                f"--batch-size {self.batch_size} is not a multiple of --micro-batch-size {self.micro_batch}; "
                "the global batch is accumulated from whole micro-batches."
            )
        checks = [
            ("lr", self.lr > 0 and math.isfinite(self.lr), "a positive number"),
            ("epochs", self.epochs > 0, "positive"),
            ("val_fraction", 0 <= self.val_fraction < 1, "in [0, 1)"),
            ("warmup_ratio", 0 <= self.warmup_ratio < 1, "in [0, 1)"),
            ("lora_dropout", 0 <= self.lora_dropout < 1, "in [0, 1)"),
            ("max_grad_norm", self.max_grad_norm >= 0, "0 (off) or positive"),
            ("weight_decay", self.weight_decay >= 0, "0 or positive"),
            ("eval_every", self.eval_every >= 0, "0 or positive"),
            ("save_every", self.save_every >= 0, "0 or positive"),
        ]
        if self.warmup_steps is not None:
            checks.append(("warmup_steps", self.warmup_steps >= 0, "0 or positive"))
        for key, ok, need in checks:
            if not ok:
                raise ValueError(f"--{_flag(key)} must be {need}, got {getattr(self, key)}.")
        if self.quantize != "none" and self.method == "full":
            raise ValueError("--quantize trains adapters over a frozen quantized base; --method full trains every "
                             "weight and cannot. Use --method dora or lora with --quantize.")
        if self.strategy == "fsdp" and (self.quantize != "none" or self.method == "full"):
            what = "--quantize" if self.quantize != "none" else "--method full"
            raise ValueError(f"--strategy fsdp with {what} is not supported yet; use --strategy ddp for it.")
        if self.quantize != "none" and self.method in ("vera", "dvora"):
            raise ValueError(f"--method {self.method} over a quantized base is not supported; use dora or lora with --quantize.")
        if self.prompt_template is not None and "{text}" not in self.prompt_template:
            raise ValueError("--prompt-template must contain {text}, where each example's text goes.")

    @property
    def micro_batch(self) -> int:
        return self.micro_batch_size or self.batch_size

    @property
    def accumulation(self) -> int:
        return self.batch_size // self.micro_batch

    @property
    def quantization(self) -> Quantization | None:
        return Quantization.parse(self.quantize, self.quant_type, self.double_quant)

    @property
    def rank(self) -> int:
        if self.r is not None:
            return self.r
        return 256 if self.method in ("vera", "dvora") else 8

    @property
    def alpha(self) -> float:
        return self.lora_alpha if self.lora_alpha is not None else 2.0 * self.rank

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Options that do not change the numbers a run computes: they may differ when a run is resumed.
RESUMABLE_CHANGES = ("eval_every", "save_every", "keep_checkpoints", "resume", "overwrite", "progress", "config", "name",
                     "output", "strategy")


def _flag(key: str) -> str:
    return key.replace("_", "-")


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(TrainConfig)]


# Names other fine-tuning tools (HF Trainer, PEFT scripts, FinLoRA) give these options: suggested, not accepted,
# so a config never means something other than what it says.
OTHER_TOOLS_NAMES = {
    "learning_rate": "lr", "num_epochs": "epochs", "num_train_epochs": "epochs", "lora_r": "r", "rank": "r",
    "base_model": "model", "model_name_or_path": "model", "dataset_path": "data", "data_path": "data",
    "train_file": "data", "output_dir": "output", "cutoff_len": "max_length", "max_seq_length": "max_length",
    "per_device_train_batch_size": "micro_batch_size", "micro_batch": "micro_batch_size",
    "gradient_accumulation_steps": "batch_size (the global batch; accumulation = batch_size / micro_batch_size)",
    "peft_use_dora": "method (dora or lora)", "use_dora": "method (dora, lora, vera or dvora)", "lr_scheduler_type": "schedule",
    "lora_target_modules": "target_modules", "load_in_4bit": "quantize (4bit)", "load_in_8bit": "quantize (8bit)", "bnb_4bit_quant_type": "quant_type",
    "bnb_4bit_use_double_quant": "double_quant", "val_set_size": "val_fraction", "warmup": "warmup_steps",
}


def closest(word: str, choices: list[str]) -> str:
    """' Did you mean ...?' for an unknown name, or ''."""
    if word in OTHER_TOOLS_NAMES and OTHER_TOOLS_NAMES[word].split()[0] in choices:
        return f" Did you mean {OTHER_TOOLS_NAMES[word].split()[0]!r}? ({word} -> {OTHER_TOOLS_NAMES[word]})"
    match = difflib.get_close_matches(word, choices, n=1, cutoff=0.5)
    return f" Did you mean {match[0]!r}?" if match else ""


def check_keys(options: dict[str, Any], where: str) -> dict[str, Any]:
    """Refuse unknown option names (suggesting the closest); accept dashes for underscores."""
    names = field_names()
    out = {}
    for key, value in options.items():
        norm = str(key).replace("-", "_")
        if norm == "quant_bits":  # FinLoRA's name; its values 4 and 8 mean exactly --quantize 4bit / 8bit
            if type(value) is not int or value not in (4, 8):
                raise ValueError(f"quant_bits in {where} must be 4 or 8 (or use quantize: none), got {value!r}.")
            norm, value = "quantize", f"{value}bit"
        if norm not in names:
            raise ValueError(f"Unknown option {key!r} in {where}.{closest(norm, names)} "
                             "Run `dorakit train --help` for the list.")
        out[norm] = value
    return out


def read_config_file(path: str | Path, name: str | None) -> dict[str, Any]:
    """Options from a YAML/JSON file: either a mapping of option -> value, or of name -> such a mapping
    (FinLoRA-style named configurations, chosen with ``name``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Config file {path} " + ("is not a file." if path.exists() else "does not exist."))
    import yaml

    try:
        text = path.read_text(encoding="utf-8")
        content = json.loads(text) if path.suffix.lower() == ".json" else yaml.load(text, Loader=_yaml_loader())
    except UnicodeDecodeError:
        raise ValueError(f"Config file {path} is not UTF-8 text; give a YAML or JSON file.") from None
    except (ValueError, yaml.YAMLError) as err:
        raise ValueError(f"Config file {path} could not be parsed: {err}") from None
    if content is None:
        content = {}
    if not isinstance(content, dict):
        raise ValueError(f"Config file {path} must hold a mapping of option names to values, got {type(content).__name__}.")
    names = field_names()
    named = bool(content) and all(isinstance(v, dict) for v in content.values()) and not set(content) & set(names)
    if name is not None:
        if not named:
            raise ValueError(f"--name {name!r} was given but {path} holds a single configuration, not named ones.")
        if name not in content:
            raise ValueError(f"No configuration named {name!r} in {path}.{closest(name, list(content))} "
                             f"Names there: {', '.join(sorted(content))}.")
        return _checked(content[name], f"{path} [{name}]")
    if named:
        raise ValueError(f"{path} holds several named configurations; choose one with --name "
                         f"(one of: {', '.join(sorted(content))}).")
    return _checked(content, str(path))


def _checked(options: dict[str, Any], where: str) -> dict[str, Any]:
    """Known option names, each value of its option's type (named with the file: issue 19)."""
    options = check_keys(options, where)
    check_values(TrainConfig, options, source=where)
    return options


@functools.cache
def _yaml_loader():
    """PyYAML's safe loader, reading 1e-4 as a number as YAML 1.2 (and JSON) do: PyYAML follows YAML 1.1,
    where a float needs a dot (1.0e-4), and would hand 'lr: 1e-4' over as text."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    exponent = re.compile(r"^[-+]?[0-9][0-9_]*(\.[0-9_]*)?[eE][-+]?[0-9]+$")
    Loader.add_implicit_resolver("tag:yaml.org,2002:float", exponent, list("-+0123456789"))
    return Loader


def math_differences(saved: TrainConfig, current: TrainConfig) -> list[str]:
    """Options that differ between a saved run and the one resuming it, and would change its numbers."""
    diffs = []
    for key in field_names():
        if key in RESUMABLE_CHANGES:
            continue
        old, new = getattr(saved, key), getattr(current, key)
        if old != new:
            diffs.append(f"--{_flag(key)}: {old!r} in the saved run, {new!r} now")
    return diffs
