"""``DoraConfig``: one typed config for the Python API, the command line and saved adapters.

Field names are PEFT's ``LoraConfig`` names, so an ``adapter_config.json`` maps onto it directly.
The direction update is LoRA's low-rank pair or VeRA's shared random projections (``direction``), and
the magnitude is on or off (``use_dora``): LoRA, DoRA, VeRA and DVoRA (paper section 5.5) from one config.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

from .fields import check_fields
from .layers.base import check_hyperparameters

BIAS_MODES = ("none", "all", "lora_only")
DIRECTIONS = ("lora", "vera")
MAGNITUDE_AXES = ("out", "in")


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
    # Parameters adapted directly (PEFT's field), e.g. ["mlp.experts.gate_up_proj"]: a name matches a
    # parameter path or its dotted suffix. 2-D ([out, in]) and 3-D (a stack of experts) parameters.
    target_parameters: list[str] | None = None
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
    # The direction update: "lora" (B A, trainable) or "vera": frozen random A [r, in_max] and
    # B [out_max, r] shared by all adapted layers, scaled by trainable vectors (Kopiczko et al. 2024):
    # dW = diag(lambda_b) B diag(lambda_d) A. With use_dora=True that is the paper's DVoRA.
    direction: str = "lora"
    projection_prng_key: int = 0  # VeRA: seed that regenerates the shared A and B (PEFT's field)
    save_projection: bool = True  # VeRA: store A and B in the adapter file (else regenerated from the seed)
    d_initial: float = 0.1  # VeRA: initial value of lambda_d (lambda_b starts at 0: the base model)
    # DoRA's magnitude per output row ("out", the paper's and PEFT's) or per input column ("in": LyCORIS
    # before 2025-04 and OneTrainer, W' = (W0 + sBA) diag(m / ||W0 + sBA||_col); see layers/input_axis.py).
    magnitude_axis: str = "out"

    def __post_init__(self) -> None:
        check_fields(self)  # strict types first (issue 19): "false" is not False, 8.0 is not 8
        check_hyperparameters(self.r, self.lora_alpha, self.lora_dropout, self.init_lora_weights)
        if self.direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {self.direction!r}.")
        if self.direction == "vera":
            self._check_vera()
        if self.magnitude_axis not in MAGNITUDE_AXES:
            raise ValueError(f"magnitude_axis must be one of {MAGNITUDE_AXES}, got {self.magnitude_axis!r}.")
        if self.magnitude_axis == "in" and (not self.use_dora or self.direction != "lora"):
            raise ValueError("magnitude_axis='in' is DoRA's input-axis magnitude: it needs use_dora=True and direction='lora'.")
        if self.bias not in BIAS_MODES:
            raise ValueError(f"bias must be one of {BIAS_MODES}, got {self.bias!r}.")
        self.target_modules = _name_list_or_regex(self.target_modules, "target_modules")
        self.exclude_modules = _name_list_or_regex(self.exclude_modules, "exclude_modules")
        self.target_parameters = _parameter_names(self.target_parameters, self.direction)
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

    def _check_vera(self) -> None:
        # VeRA has one rank (the shared projections') and no scale: reject what would be ignored.
        unused = {"rank_pattern": self.rank_pattern, "alpha_pattern": self.alpha_pattern, "use_rslora": self.use_rslora}
        given = [name for name, value in unused.items() if value]
        if given:
            raise ValueError(f"{', '.join(given)} do not apply to direction='vera' (one shared rank, no scale); remove them.")
        if self.init_lora_weights == "gaussian":
            raise ValueError("direction='vera' initialises with init_lora_weights=True (lambda_b = 0) or False (random).")
        if isinstance(self.projection_prng_key, bool) or not isinstance(self.projection_prng_key, int):
            raise ValueError(f"projection_prng_key must be an integer seed, got {self.projection_prng_key!r}.")
        if isinstance(self.d_initial, bool) or not isinstance(self.d_initial, (int, float)):
            raise ValueError(f"d_initial must be a number (VeRA's initial lambda_d, e.g. 0.1), got {self.d_initial!r}.")

    @property
    def method(self) -> str:
        """lora, dora, vera or dvora: the direction update with or without the magnitude."""
        if self.direction == "vera":
            return "dvora" if self.use_dora else "vera"
        return "dora" if self.use_dora else "lora"

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


def _parameter_names(value: Any, direction: str) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str) or not all(isinstance(n, str) and n for n in _as_list(value)):
        raise ValueError(
            f"target_parameters must be a list of parameter names, e.g. ['mlp.experts.gate_up_proj'], got {value!r} "
            "(PEFT matches them by name, never as a regex)."
        )
    if direction == "vera" and value:
        raise ValueError("target_parameters take LoRA's direction update; remove them or use direction='lora'.")
    return list(value)


def _as_list(value: Any) -> list:
    try:
        return list(value)
    except TypeError:
        return [None]


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
