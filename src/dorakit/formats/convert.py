"""``dorakit convert``: any adapter layout to any other, exactly, or refused with the reason.

    read (PEFT dir, diffusers file, kohya file) -> AdapterSet -> write (PEFT dir, diffusers dir, kohya file)

Exact means the written file makes its loader compute the same weights: keys and shapes are renamed,
``alpha`` moves between kohya's per-module tensors and PEFT's ``lora_alpha``/``alpha_pattern`` (rsLoRA as
the alpha of the same scale), magnitudes change shape, never value. What cannot be exact is refused:
an input-axis magnitude (old LyCORIS, OneTrainer) has no place in PEFT's or diffusers' files, which
compute the output axis. ``approximate=True`` then fits an output-axis DoRA of the same rank to the
weight the input-axis adapter computes (needs the base weights) and reports the error.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import Tensor

from ..functional import merge_rows_
from .adapter_set import AdapterSet, LayerAdapter
from .base_model import BaseCheckpoint
from .detect import read_adapter_set
from .keys import CLIP_TEXT_MODEL

LAYOUTS = ("peft", "diffusers", "kohya")


@dataclass
class Conversion:
    """What a conversion did: the files written and, if approximated, the error per layer."""

    source_layout: str
    written: list[Path]
    layers: dict[str, int]  # component -> layers
    # (component, path) -> ||W_fit - W'||_F / ||W' - W0||_F: the error relative to the adapter's own change
    approximation: dict[tuple[str, str], float] = field(default_factory=dict)


def convert(src: str | os.PathLike, to: str, out: str | os.PathLike, *, base: str | os.PathLike | None = None,
            approximate: bool = False, component: str | None = None, overwrite: bool = False) -> Conversion:
    """Convert an adapter between layouts (see the module doc).

    Args:
        src: a PEFT directory, a diffusers LoRA directory or file, or a kohya/LyCORIS file.
        to: "peft", "diffusers" or "kohya".
        out: the PEFT directory, the diffusers directory, or the kohya ``.safetensors`` file to write.
        base: the base model directory: exact module names for kohya files (without it, names are read
            with the vocabulary of known diffusers/transformers names), and the base weights ``approximate`` needs.
        approximate: fit input-axis magnitudes to the output axis instead of refusing.
        component: the pipeline component of a single-model adapter ("unet", "transformer", "text_encoder", ...).
        overwrite: replace what is at ``out``.
    Returns:
        A ``Conversion`` report.
    Raises:
        ValueError: an inexact conversion without ``approximate`` (with the reason), names the base lacks,
            or a source of another kind.
    """
    if to not in LAYOUTS:
        raise ValueError(f"--to must be one of {LAYOUTS}, got {to!r}.")
    checkpoint = BaseCheckpoint(base) if base is not None else None
    adapters = read_adapter_set(src, paths=None if checkpoint is None else checkpoint.underscored(),
                                denoiser=None if checkpoint is None else checkpoint.denoiser, component=component)
    unresolved = [name for names in adapters.unresolved.values() for name in names]
    if unresolved:
        raise ValueError(f"{adapters.source} names {len(unresolved)} module(s) the base model {base} lacks "
                         f"(a file for another model?): {', '.join(unresolved[:5])}.")
    if component is not None and list(adapters.components) == [""]:
        adapters.components = {component: adapters.components[""]}
    errors: dict[tuple[str, str], float] = {}
    if to != "kohya" and _input_axis(adapters):
        if not approximate:
            raise ValueError(
                f"{adapters.source} has DoRA magnitudes on the input axis (dora_scale [1, in]: LyCORIS before its "
                f"2025-04 default, OneTrainer); {to} files compute the output axis, so no {to} file computes this "
                "adapter. Keep it as a kohya file (--to kohya), or pass --approximate (with --base) to fit an "
                "output-axis adapter of the same rank and see the error it introduces."
            )
        if checkpoint is None:
            raise ValueError("--approximate fits the adapter to the weights it computes, which needs the base model: "
                             "add --base MODEL_DIR.")
        errors = approximate_output_axis(adapters, checkpoint)
    if to == "peft" and checkpoint is not None:
        _base_names(adapters, checkpoint)
    written = _write(adapters, to, Path(out), overwrite)
    layers = {name: len(layers) for name, layers in adapters.components.items()}
    return Conversion(adapters.layout, written, layers, errors)


def _input_axis(adapters: AdapterSet) -> bool:
    return any(l.magnitude is not None and l.axis == "in" for ls in adapters.components.values() for l in ls.values())


def _base_names(adapters: AdapterSet, checkpoint: BaseCheckpoint) -> None:
    """PEFT directories name modules as the model does: drop the ``text_model.`` level files keep for CLIP
    where the base checkpoint has none (transformers 5's CLIPTextModel)."""
    for component, layers in adapters.components.items():
        own = set(checkpoint.paths(component))
        adapters.components[component] = {
            (path[len(CLIP_TEXT_MODEL):] if path.startswith(CLIP_TEXT_MODEL) and path not in own
             and path[len(CLIP_TEXT_MODEL):] in own else path): layer for path, layer in layers.items()}


def _write(adapters: AdapterSet, to: str, out: Path, overwrite: bool) -> list[Path]:
    if to == "peft":
        from .peft_layers import write_peft_dir

        return write_peft_dir(adapters, out, overwrite=overwrite)
    if to == "diffusers":
        from .diffusers import write_diffusers

        return [write_diffusers(adapters, out, overwrite=overwrite)]
    from .kohya import write_kohya

    return [write_kohya(adapters, out, overwrite=overwrite)]


@torch.no_grad()
def fit_output_axis(w0: Tensor, layer: LayerAdapter) -> tuple[LayerAdapter, float]:
    """An output-axis DoRA layer of the same rank close to what an input-axis ``layer`` computes over ``w0``.

    W' = (W0 + s B A) diag(m / ||.||_col) is the target. Its change D = W' - W0 is in general of full rank
    (W0 diag(g - 1) is), so s B' A' is D's best rank-r approximation (truncated SVD) and m' = ||W'||_row:
    each row then has W''s norm and the direction of W0 + s B' A'.

    Returns:
        (the fitted layer, ||W_fit - W'||_F / ||W' - W0||_F), in fp64.
    """
    rows0 = w0.reshape(w0.shape[0], -1).double()  # [out, in * k]
    a, b = layer.down.reshape(layer.r, -1).double(), layer.up.reshape(-1, layer.r).double()
    if rows0.shape != (b.shape[0], a.shape[1]):
        raise ValueError(f"The base weight of {layer.name} is {list(w0.shape)}, the adapter's update "
                         f"[{b.shape[0]}, {a.shape[1]}]: a base model of another shape.")
    target = rows0.clone()
    group = rows0.shape[1] // layer.magnitude.numel()  # kernel positions per input channel
    merge_rows_(target.T, b.T, a.T, layer.scaling, layer.magnitude.double(), group=group)
    change = target - rows0
    u, s, vh = torch.linalg.svd(change, full_matrices=False)
    r = layer.r
    new_b, new_a = u[:, :r] * (s[:r] / layer.scaling), vh[:r]  # s * B' A' = rank-r part of D
    magnitude = target.norm(dim=1)
    fitted = rows0.clone()
    merge_rows_(fitted, new_a, new_b, layer.scaling, magnitude)
    error = ((fitted - target).norm() / change.norm().clamp_min(1e-300)).item()
    dtype = layer.down.dtype
    return replace(layer, down=new_a.reshape(layer.down.shape).to(dtype), up=new_b.reshape(layer.up.shape).to(dtype),
                   magnitude=magnitude.to(layer.magnitude.dtype), axis="out"), error


def approximate_output_axis(adapters: AdapterSet, checkpoint: BaseCheckpoint) -> dict[tuple[str, str], float]:
    """Replace every input-axis layer by ``fit_output_axis``'s fit, in place; the error of each."""
    errors = {}
    for component, layers in adapters.components.items():
        for path, layer in layers.items():
            if layer.magnitude is not None and layer.axis == "in":
                layers[path], errors[(component, path)] = fit_output_axis(checkpoint.weight(component, path), layer)
    return errors
