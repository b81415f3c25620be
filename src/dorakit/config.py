"""``DoraConfig``: one typed config for the Python API, the command line and saved adapters.

Field names are PEFT's ``LoraConfig`` names, so an ``adapter_config.json`` maps onto it directly.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

from .layers.base import check_hyperparameters

BIAS_MODES = ("none", "all", "lora_only")


@dataclass
class DoraConfig:
    """Which modules get an adapter and how it is shaped.

    Example:
        >>> cfg = DoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
        >>> cfg.rank_for("model.layers.0.self_attn.q_proj")
        8
    """

    r: int = 8  # rank of the update B @ A
    lora_alpha: float = 8  # update scale s = lora_alpha / r (the paper uses lora_alpha = 2r)
    lora_dropout: float = 0.0  # dropout on the adapter's input (paper: 0.05)
    # Names matched against the end of each module path ("q_proj" matches "...self_attn.q_proj"),
    # a regex string matched against the full path, or "all-linear" (every Linear/Conv1D but the output head).
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None  # same matching rules; wins over target_modules
    use_dora: bool = True  # False gives plain LoRA through the same code: the baseline
    use_rslora: bool = False  # s = lora_alpha / sqrt(r) (rank-stabilised LoRA)
    fan_in_fan_out: bool = False  # weights stored [in, out]; decided per module type anyway, with a warning
    init_lora_weights: bool | str = True  # True: B = 0 (start at the base); "gaussian": A ~ N(0, 1/r); False: random B
    rank_pattern: dict[str, int] = field(default_factory=dict)  # regex of module path -> rank
    alpha_pattern: dict[str, float] = field(default_factory=dict)  # regex of module path -> lora_alpha
    modules_to_save: list[str] | None = None  # modules trained fully (a trainable copy beside the original)
    bias: str = "none"  # which biases train: "none", "all", or "lora_only" (those of adapted layers)
    task_type: str | None = None  # PEFT's task type, kept for saved files (e.g. "CAUSAL_LM")
    base_model_name_or_path: str | None = None  # recorded in saved adapters when known

    def __post_init__(self) -> None:
        check_hyperparameters(self.r, self.lora_alpha, self.lora_dropout, self.init_lora_weights)
        if self.bias not in BIAS_MODES:
            raise ValueError(f"bias must be one of {BIAS_MODES}, got {self.bias!r}.")
        self.target_modules = _name_list_or_regex(self.target_modules, "target_modules")
        self.exclude_modules = _name_list_or_regex(self.exclude_modules, "exclude_modules")
        if self.modules_to_save is not None:
            if isinstance(self.modules_to_save, str):
                raise ValueError(f"modules_to_save must be a list of names, e.g. [{self.modules_to_save!r}].")
            self.modules_to_save = list(self.modules_to_save)
        for pattern, rank in self.rank_pattern.items():
            _check_regex(pattern, "rank_pattern")
            check_hyperparameters(rank, 1, 0.0, True)
        for pattern, alpha in self.alpha_pattern.items():
            _check_regex(pattern, "alpha_pattern")
            check_hyperparameters(1, alpha, 0.0, True)

    def rank_for(self, module_path: str) -> int:
        """The rank for one module: ``rank_pattern``'s first matching key, else ``r``."""
        key = pattern_key(self.rank_pattern, module_path)
        return self.r if key is None else self.rank_pattern[key]

    def alpha_for(self, module_path: str) -> float:
        """lora_alpha for one module: ``alpha_pattern``'s first matching key, else ``lora_alpha``."""
        key = pattern_key(self.alpha_pattern, module_path)
        return self.lora_alpha if key is None else self.alpha_pattern[key]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def pattern_key(patterns: dict[str, Any], module_path: str) -> str | None:
    # PEFT's rule: a key matches when it matches the whole path or a dotted suffix of it.
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module_path):
            return key
    return None


def _check_regex(pattern: str, field_name: str) -> None:
    try:
        re.compile(pattern)
    except re.error as err:
        raise ValueError(f"{field_name} key {pattern!r} is not a valid regular expression: {err}.") from None


def _name_list_or_regex(value: Any, field_name: str) -> list[str] | str | None:
    if value is None or isinstance(value, str):
        if isinstance(value, str):
            _check_regex(value, field_name)
        return value
    try:
        names = list(value)
    except TypeError:
        names = None
    if names is None or not all(isinstance(n, str) and n for n in names):
        raise ValueError(
            f"{field_name} must be a list of module names (e.g. ['q_proj', 'v_proj']) or a regex string, got {value!r}."
        )
    return names
