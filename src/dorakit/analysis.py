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
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from .functional import row_chunks

DEFAULT_MODULES = ("q_proj", "v_proj")  # the paper analyses the query and value projections


@torch.no_grad()
def decomposition_change(base_rows: Tensor, tuned_rows: Tensor) -> tuple[float, float]:
    """(delta_m, delta_d) of ``tuned_rows`` against ``base_rows`` (both [out, in]), in fp64, chunked.

    A row that is zero in either weight has no direction; it counts as unchanged in direction.

    >>> w0 = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    >>> decomposition_change(w0, 2 * w0)        # a pure rescale: magnitudes (5, 1) -> (10, 2)
    (3.0, 0.0)
    >>> [round(v, 9) for v in decomposition_change(w0, w0.flip(1))]   # mirrored rows: same norms, new directions
    [0.0, 0.52]
    """
    if base_rows.shape != tuned_rows.shape:
        raise ValueError(f"Weights differ in shape: base {list(base_rows.shape)}, checkpoint {list(tuned_rows.shape)}.")
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

    def as_dict(self) -> dict:
        return self.__dict__.copy()


def _weight_rows(module: nn.Module, weight: Tensor) -> Tensor:
    from .layers import is_conv1d

    if is_conv1d(module):
        return weight.t()  # transformers' Conv1D stores [in, out]
    return weight.reshape(weight.shape[0], -1)  # (out, in * kernel...) for convolutions


def analysed_modules(model: nn.Module, modules: list[str]) -> dict[str, nn.Module]:
    """Module path -> module for every weight matrix named in ``modules`` (suffix match)."""
    from .layers import AdapterLayer

    found = {}
    for path, module in model.named_modules():
        if path.split(".")[-1] in modules and hasattr(module, "weight"):
            found[path] = module.base_layer if isinstance(module, AdapterLayer) else module
    if not found:
        raise ValueError(f"No module named {modules} in the base model; pass --modules with names it has, "
                         f"e.g. {sorted({p.split('.')[-1] for p, m in model.named_modules() if isinstance(m, nn.Linear)})[:8]}.")
    return found


def checkpoint_step(path: Path) -> int | None:
    """The training step of a checkpoint: from a dorakit checkpoint's state.json, else the last number in its name."""
    for state in (path / "state.json", path.parent / "state.json"):
        if state.is_file():
            return json.loads(state.read_text(encoding="utf-8"))["progress"]["step"]
    numbers = re.findall(r"\d+", path.name)
    return int(numbers[-1]) if numbers else None


def is_adapter_dir(path: Path) -> bool:
    return (path / "adapter_config.json").is_file()


def analyse_adapter(model: nn.Module, targets: dict[str, nn.Module], adapter: Path) -> tuple[str, list[tuple[str, float, float]]]:
    """(method, [(module path, delta_m, delta_d)]): the adapter merged into copies of the base weights."""
    from .inject import adapter_layers, unload
    from .io import load_adapter, read_adapter_config

    method = "dora" if read_adapter_config(adapter).use_dora else "lora"
    load_adapter(model, adapter)
    try:
        layers = dict(adapter_layers(model))
        out = []
        for path, base in targets.items():
            rows0 = _weight_rows(base, base.weight)
            if path in layers:
                merged = base.weight.detach().clone()
                layers[path].merge_into(merged)
                out.append((path, *decomposition_change(rows0, _weight_rows(base, merged))))
            else:
                out.append((path, 0.0, 0.0))  # not adapted: unchanged
        return method, out
    finally:
        unload(model)


def analyse_full(targets: dict[str, nn.Module], directory: Path) -> list[tuple[str, float, float]]:
    """Rows for a full checkpoint directory: the same weights read from its safetensors files."""
    from safetensors import safe_open

    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    elif (directory / "model.safetensors").is_file():
        with safe_open(str(directory / "model.safetensors"), "pt") as handle:
            weight_map = {k: "model.safetensors" for k in handle.keys()}
    else:
        raise FileNotFoundError(f"{directory} is neither an adapter directory (adapter_config.json) nor a "
                                "checkpoint with safetensors weights.")
    out = []
    for path, base in targets.items():
        key = _find_key(weight_map, f"{path}.weight")
        with safe_open(str(directory / weight_map[key]), "pt") as handle:
            tuned = handle.get_tensor(key)
        out.append((path, *decomposition_change(_weight_rows(base, base.weight), _weight_rows(base, tuned))))
    return out


def _find_key(weight_map: dict[str, str], key: str) -> str:
    if key in weight_map:
        return key
    # Checkpoints of a different head class carry the backbone under another prefix ("model." vs none).
    tails = [k for k in weight_map if k.endswith(key.split(".", 1)[-1]) and k.split(".")[-3:] == key.split(".")[-3:]]
    if len(tails) == 1:
        return tails[0]
    raise ValueError(f"The checkpoint has no tensor {key!r} (or more than one candidate: {tails[:3]}).")


def analyse(model: nn.Module, checkpoints: list[str | Path], modules: list[str] = DEFAULT_MODULES) -> list[Row]:
    """One Row per analysed weight matrix per checkpoint (adapter or full model directories)."""
    targets = analysed_modules(model, list(modules))
    rows = []
    for checkpoint in map(Path, checkpoints):
        if not checkpoint.is_dir():
            raise FileNotFoundError(f"Checkpoint {checkpoint} is not a directory.")
        source = checkpoint / "adapter" if (checkpoint / "adapter").is_dir() and not is_adapter_dir(checkpoint) else checkpoint
        if is_adapter_dir(source):
            method, results = analyse_adapter(model, targets, source)
        else:
            method, results = "full", analyse_full(targets, source)
        step = checkpoint_step(checkpoint)
        for path, dm, dd in results:
            rows.append(Row(str(checkpoint), method, step, layer_index(path), path.split(".")[-1], path, dm, dd))
    return rows
