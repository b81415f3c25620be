"""The weight-decomposition analysis of the DoRA paper (Liu et al. 2024, Sec. 2.2 and Fig. 2).

Each weight is split per output row n into a magnitude and a direction, W_n = m_n * V_n / ||V_n||.
Against the pre-trained W0, a fine-tuned W has

    delta_m = mean_n | ||W_n|| - ||W0_n|| |            (magnitude change)
    delta_d = mean_n (1 - cos(W_n, W0_n))              (direction change)

For a merged DoRA weight ||W_n|| is its learned magnitude m_n, so the same formula covers full
fine-tuning, LoRA and DoRA, and every checkpoint is analysed as the weight it computes with. The
paper reports the correlation of delta_d with delta_m over layers and checkpoints: full fine-tuning
-0.62, DoRA -0.31, LoRA +0.83 (query matrices of VL-BART).

    dorakit analyze --base MODEL_DIR --checkpoints run/checkpoints/step-* --out analysis/

A mixture-of-experts layer's stacks (``--modules gate_up_proj down_proj``: 3-D parameters) are analysed
expert by expert: one row per expert, each its own [out, in] weight (issue 17).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..functional import row_chunks
from ..formats.keys import PEFT_PREFIX, PROJECTION_KEYS

DEFAULT_MODULES = ("q_proj", "v_proj")  # the paper analyses the query and value projections


@torch.no_grad()
def decomposition_change(base_rows: Tensor, tuned_rows: Tensor, axis: str = "out") -> tuple[float, float]:
    """(delta_m, delta_d) of ``tuned_rows`` against ``base_rows`` (both [out, in]), in fp64, chunked.

    A row that is zero in either weight has no direction; it counts as unchanged in direction.
    ``axis="in"``: per input column instead, the units of DoRA's input-axis magnitude (issue 16); weights of
    more than two dimensions (convolutions) are then grouped per input channel over their kernel positions.

    >>> w0 = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    >>> decomposition_change(w0, 2 * w0)        # a pure rescale: magnitudes (5, 1) -> (10, 2)
    (3.0, 0.0)
    >>> [round(v, 9) for v in decomposition_change(w0, w0.flip(1))]   # mirrored rows: same norms, new directions
    [0.0, 0.52]
    """
    if base_rows.shape != tuned_rows.shape:
        raise ValueError(f"Weights differ in shape: base {list(base_rows.shape)}, checkpoint {list(tuned_rows.shape)}.")
    if axis == "in":  # columns as rows: [in, out * k] (a view for a 2-D weight)
        base_rows, tuned_rows = (w.transpose(0, 1).reshape(w.shape[1], -1) for w in (base_rows, tuned_rows))
    dm = dd = 0.0
    for rows in row_chunks(base_rows.shape[0], base_rows.shape[1]):
        w0, w = base_rows[rows].double(), tuned_rows[rows].double()
        n0, n = w0.norm(dim=1), w.norm(dim=1)
        dot = (w0 * w).sum(1)
        both = (n0 > 0) & (n > 0)
        cos = torch.where(both, dot / (n0 * n).clamp_min(1e-300), torch.ones_like(dot))
        dm += (n - n0).abs().sum().item()
        dd += (1 - cos.clamp(-1, 1)).sum().item()
    count = base_rows.shape[0]
    return dm / count, dd / count


def layer_index(path: str) -> int | None:
    """The block number in a module path ('model.layers.3.self_attn.q_proj' -> 3), None outside blocks."""
    numbers = re.findall(r"\.(\d+)\.", f".{path}.")
    return int(numbers[0]) if numbers else None


@dataclass
class Row:
    checkpoint: str
    method: str
    step: int | None
    layer: int | None
    module: str
    name: str
    delta_m: float
    delta_d: float
    expert: int | None = None  # the expert of a 3-D stack; None for an ordinary weight

    def as_dict(self) -> dict:
        return self.__dict__.copy()


# Architectures that store projection weights as [in, out] (transformers' Conv1D).
IN_OUT_TYPES = frozenset({"gpt2", "gpt_bigcode", "imagegpt"})


class Weights:
    """Tensors of a transformers checkpoint directory, read one at a time (no model is built); or, given
    ``model`` (loaded from it), that model's tensors under their in-memory names."""

    def __init__(self, directory: Path, model: torch.nn.Module | None = None) -> None:
        self.state = None if model is None else model.state_dict()
        index = directory / "model.safetensors.index.json"
        if self.state is not None:
            self.files = dict.fromkeys(self.state, "")
        elif index.is_file():
            self.files = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        elif (directory / "model.safetensors").is_file():
            from safetensors import safe_open

            with safe_open(str(directory / "model.safetensors"), "pt") as handle:
                self.files = {k: "model.safetensors" for k in handle.keys()}
        else:
            raise FileNotFoundError(f"{directory} is neither an adapter directory (adapter_config.json) nor a "
                                    "checkpoint with safetensors weights (model.safetensors).")
        self.directory = directory
        config = directory / "config.json"
        model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type") if config.is_file() else None
        self.in_out = model_type in IN_OUT_TYPES

    def get(self, key: str) -> Tensor:
        if self.state is not None:
            return self.state[key]
        from safetensors import safe_open

        with safe_open(str(self.directory / self.files[key]), "pt") as handle:
            return handle.get_tensor(key)

    def find(self, key: str) -> str:
        """``key``, or the one key that names the same weight under another prefix ("bert." or "model.")."""
        if key in self.files:
            return key
        matches = [k for k in self.files if same_module(k, key)]
        if len(matches) == 1:
            return matches[0]
        raise ValueError(f"{self.directory} has no tensor {key!r}" + (f" (several candidates: {matches[:3]})" if matches else "."))

    def rows(self, key: str) -> Tensor:
        weight = self.get(key)
        return weight.t() if self.in_out else weight  # (out, in)


class ExpertLayout:
    """For a mixture-of-experts base, its expert stacks as transformers holds them in memory: checkpoints
    store them in another layout (Qwen3-MoE and Mixtral one 2-D weight per expert, Mixtral under other
    names) that only transformers' loader converts, so such a base and full fine-tuned checkpoints of it
    are loaded whole with ``from_pretrained``."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    @classmethod
    def of(cls, directory: Path, modules) -> ExpertLayout | None:
        """The layout when the model in ``directory`` has 3-D parameters named in ``modules``, else None."""
        if not (directory / "config.json").is_file():
            return None
        config, architecture = _architecture(directory)
        with torch.device("meta"):
            skeleton = architecture._from_config(config)  # the modules and shapes, no weights allocated
        if not any(p.dim() == 3 and name.split(".")[-1] in modules for name, p in skeleton.named_parameters()):
            return None
        return cls(load_model(directory))

    def stack_rows(self, stack: Tensor, key: str) -> Tensor:
        """A stack as [E, out, in] (transformers' is_transposed flag: stored [E, in, out])."""
        module = self.model.get_submodule(key.rpartition(".")[0])
        return stack.transpose(1, 2) if getattr(module, "is_transposed", False) else stack

    def adapter_prefixes(self, config) -> dict[str, str]:
        """{parameter path: its adapter's module path} for a config's target_parameters (PEFT's nesting)."""
        from ..formats.keys import nested_adapter_paths
        from ..targets import find_parameter_targets

        out = {}
        for module, names in find_parameter_targets(self.model, config).items():
            out.update({f"{module}.{name}": path for name, path in nested_adapter_paths(module, names).items()})
        return out


def _architecture(directory: Path):
    """(config, model class) of a checkpoint: its recorded architecture, else transformers' AutoModel."""
    from ..integrations.transformers import require_transformers

    transformers = require_transformers()
    config = transformers.AutoConfig.from_pretrained(directory)
    names = getattr(config, "architectures", None) or []
    return config, (getattr(transformers, names[0], None) if names else None) or transformers.AutoModel


def load_model(directory: Path) -> torch.nn.Module:
    """The checkpoint as its recorded architecture, in its stored dtype (for in-memory expert stacks)."""
    _, cls = _architecture(directory)
    return cls.from_pretrained(directory, dtype="auto").eval()


def same_module(a: str, b: str) -> bool:
    """Paths that differ only by a leading prefix (a head class adds "bert." or "model.")."""
    return a == b or a.endswith("." + b) or b.endswith("." + a)


def checkpoint_step(path: Path) -> int | None:
    """The training step of a checkpoint: from a dorakit checkpoint's state.json, else the last number in its name."""
    state = path / "state.json"
    if state.is_file():
        return json.loads(state.read_text(encoding="utf-8"))["progress"]["step"]
    numbers = re.findall(r"\d+", path.name)
    return int(numbers[-1]) if numbers else None


def is_adapter_dir(path: Path) -> bool:
    return (path / "adapter_config.json").is_file()


class AdapterSource:
    """An adapter directory, read once: its config and tensors, and the module each entry adapts."""

    def __init__(self, directory: Path, analysed: list[str], layout: ExpertLayout | None = None) -> None:
        from ..formats.peft import read_adapter_config, read_adapter_tensors

        self.config = read_adapter_config(directory)
        self.method = self.config.method
        tensors = read_adapter_tensors(directory)
        self.vera = self.config.direction == "vera"
        suffix = ".vera_lambda_d" if self.vera else ".lora_A.weight"
        self.prefixes = {k[len(PEFT_PREFIX): -len(suffix)]: k[: -len(suffix)] for k in tensors if k.endswith(suffix)
                         if any(same_module(k[len(PEFT_PREFIX): -len(suffix)], p) for p in analysed)}
        if self.config.target_parameters and layout is not None:  # expert stacks are analysed too
            stacks = {param: PEFT_PREFIX + path for param, path in layout.adapter_prefixes(self.config).items()}
            self.prefixes = {m: p for m, p in self.prefixes.items() if p not in stacks.values()}
            self.prefixes.update({param: prefix for param, prefix in stacks.items()
                                  if any(same_module(param, a) for a in analysed)})
        # Only the analysed modules' tensors are kept: many checkpoints are open at once.
        self.tensors = {k: v for k, v in tensors.items() if any(k.startswith(p + ".") for p in self.prefixes.values())}
        if self.vera:
            missing = [key for key in PROJECTION_KEYS.values() if key not in tensors]
            if missing:
                raise ValueError(f"{directory} has no VeRA projections {missing} (saved with save_projection=false); "
                                 "load it onto its base model and save it again with save_projection=True to analyse it.")
            self.tensors.update({key: tensors[key] for key in PROJECTION_KEYS.values()})

    def factors(self, prefix: str, out_features: int, in_features: int) -> tuple[Tensor, Tensor]:
        """The update's A [r, in] and B [out, r] for one module (VeRA's vectors folded into its shared pair)."""
        if not self.vera:
            return self.tensors[f"{prefix}.lora_A.weight"].float(), self.tensors[f"{prefix}.lora_B.weight"].float()
        from ..layers.vera import folded_A, folded_B

        lambda_d, lambda_b = self.tensors[f"{prefix}.vera_lambda_d"].float(), self.tensors[f"{prefix}.vera_lambda_b"].float()
        return (folded_A(self.tensors[PROJECTION_KEYS["vera_A"]], lambda_d, in_features),
                folded_B(self.tensors[PROJECTION_KEYS["vera_B"]], lambda_b))

    @torch.no_grad()
    def rows(self, base_rows: Tensor, path: str, expert: int | None = None, experts: int = 1) -> Tensor:
        """The rows this adapter computes with for module ``path`` (or expert ``expert`` of the
        ``experts`` in stack ``path``): its merge into a copy of the base (the layers' own merge), or
        the base rows when it does not adapt that module."""
        from ..functional import lora_scaling, merge_rows_

        module = next((m for m in self.prefixes if same_module(m, path)), None)
        if module is None:
            return base_rows
        prefix, config = self.prefixes[module], self.config
        lora_a, lora_b = self.factors(prefix, *base_rows.shape)
        magnitude = self.tensors.get(f"{prefix}.lora_magnitude_vector") if config.use_dora else None
        if expert is not None:  # PEFT's layout: A [E*r, in] as [E, r, in], B [out, E*r] as [out, r, E]
            lora_a = lora_a.reshape(experts, -1, lora_a.shape[-1])[expert]
            lora_b = lora_b.reshape(lora_b.shape[0], -1, experts)[:, :, expert]
            magnitude = None if magnitude is None else magnitude[expert]
        if config.use_dora and magnitude is None:
            raise ValueError(f"The DoRA adapter has no magnitude for {module}; it cannot be analysed (or loaded) correctly.")
        rows = base_rows.float().clone()
        scaling = 1.0 if self.vera else lora_scaling(lora_a.shape[0], config.alpha_for(module), config.use_rslora)
        merge_rows_(rows, lora_a, lora_b, scaling, magnitude)
        return rows


class FullSource:
    """A fully fine-tuned checkpoint: its own weights, read one tensor at a time."""

    method = "full"

    def __init__(self, directory: Path, layout: ExpertLayout | None = None) -> None:
        self.weights = Weights(directory, load_model(directory) if layout is not None else None)
        self.layout = layout
        self._stack: tuple[str, Tensor] | None = None

    def rows(self, base_rows: Tensor, path: str, expert: int | None = None, experts: int = 1) -> Tensor:
        if expert is None:
            return self.weights.rows(self.weights.find(f"{path}.weight"))
        key = self.weights.find(path)
        if self._stack is None or self._stack[0] != key:  # one stack kept: experts are read in a row
            self._stack = (key, self.layout.stack_rows(self.weights.get(key), key))
        return self._stack[1][expert]


def open_checkpoint(checkpoint: Path, analysed: list[str], layout: ExpertLayout | None = None) -> AdapterSource | FullSource:
    if not checkpoint.is_dir():
        raise FileNotFoundError(f"Checkpoint {checkpoint} is not a directory.")
    source = checkpoint
    for inner in ("adapter", "model"):  # a dorakit run or checkpoint directory
        if not is_adapter_dir(source) and (checkpoint / inner).is_dir():
            source = checkpoint / inner
    return AdapterSource(source, analysed, layout) if is_adapter_dir(source) else FullSource(source, layout)


def analyse(base: str | Path, checkpoints: list[str | Path], modules: list[str] = DEFAULT_MODULES) -> list[Row]:
    """One Row per analysed weight matrix per checkpoint (checkpoint-major order).

    Checkpoints are adapter directories (LoRA/DoRA, merged into copies of the base weights with the
    same merge the layers use), dorakit checkpoint directories (their adapter or model), or full
    fine-tuned model directories. Each base weight is read once, and only the analysed tensors are read.
    """
    layout = ExpertLayout.of(Path(base), modules)
    weights = Weights(Path(base), None if layout is None else layout.model)
    keys = [k for k in weights.files if k.endswith(".weight") and k.split(".")[-2] in modules]
    stacks = [k for k in weights.files if layout is not None and k.split(".")[-1] in modules and weights.get(k).dim() == 3]
    if not keys and not stacks:
        names = sorted({k.split(".")[-2] for k in weights.files if k.endswith(".weight") and "." in k})
        raise ValueError(f"The base model has no weight named {list(modules)}; pass --modules with names it has: "
                         f"{', '.join(names[:12])}.")
    paths = list(map(Path, checkpoints))
    analysed = [k[: -len(".weight")] for k in keys] + stacks
    sources = [open_checkpoint(p, analysed, layout) for p in paths]
    steps = [checkpoint_step(p) for p in paths]
    rows: list[list[Row]] = [[] for _ in paths]
    for key in keys + stacks:
        path = key[: -len(".weight")] if key in keys else key
        if key in keys:
            parts = [(None, weights.rows(key))]
        else:
            stack = layout.stack_rows(weights.get(key), key)  # [E, out, in]
            parts = [(e, stack[e]) for e in range(stack.shape[0])]
        for expert, base_rows in parts:
            count = 1 if expert is None else len(parts)
            for i, source in enumerate(sources):
                dm, dd = decomposition_change(base_rows, source.rows(base_rows, path, expert, count))
                rows[i].append(Row(str(paths[i]), source.method, steps[i], layer_index(path), path.split(".")[-1],
                                   path, dm, dd, expert))
    return [row for per_checkpoint in rows for row in per_checkpoint]
