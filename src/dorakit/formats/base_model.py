"""A base model directory read as files: its module paths and weights, without building the model.

``dorakit convert --base MODEL_DIR`` uses it to name modules exactly (which underscores of a kohya name are
dots) and, for ``--approximate``, to read the base weights. MODEL_DIR is a diffusers pipeline directory
(``model_index.json`` with one sub-directory per component), a diffusers model directory
(``diffusion_pytorch_model.safetensors``) or a transformers one (``model.safetensors``), sharded or not.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from torch import Tensor

from .keys import CLIP_TEXT_MODEL, DENOISERS, component_of_class, underscored_paths

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "model.safetensors")


def _weight_map(directory: Path) -> dict[str, Path] | None:
    """Tensor name -> file of a (sharded) safetensors checkpoint directory, or None if it has none."""
    from safetensors import safe_open

    for name in WEIGHT_FILES:
        index = directory / f"{name[: -len('.safetensors')]}.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            return {key: directory / file for key, file in weight_map.items()}
        if (directory / name).is_file():
            with safe_open(str(directory / name), "pt") as handle:
                return {key: directory / name for key in handle.keys()}
    return None


def _class_name(directory: Path) -> str:
    config = directory / "config.json"
    if not config.is_file():
        return ""
    data = json.loads(config.read_text(encoding="utf-8"))
    return data.get("_class_name") or (data.get("architectures") or [""])[0]


class BaseCheckpoint:
    """The components of a base model directory, read from their safetensors headers."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise FileNotFoundError(f"Base model directory {self.directory} does not exist.")
        self.components: dict[str, dict[str, Path]] = {}
        index = self.directory / "model_index.json"
        if index.is_file():
            for name in json.loads(index.read_text(encoding="utf-8")):
                found = _weight_map(self.directory / name) if (self.directory / name).is_dir() else None
                if found is not None:
                    self.components[name] = found
        else:
            found = _weight_map(self.directory)
            if found is not None:
                self.components[component_of_class(_class_name(self.directory)) or ""] = found
        if not self.components:
            raise FileNotFoundError(f"{self.directory} has no safetensors weights ({' or '.join(WEIGHT_FILES)}, or a "
                                    "pipeline's model_index.json with component directories).")

    def paths(self, component: str) -> list[str]:
        """The module paths that own a weight (``<path>.weight``) in that component."""
        return [key[: -len(".weight")] for key in self.components.get(component, {}) if key.endswith(".weight")]

    def underscored(self) -> dict[str, dict[str, list[str]]]:
        """Per component, kohya's underscored names -> paths (``keys.underscored_paths``)."""
        out = {}
        for component in self.components:
            paths = self.paths(component)
            flat = component.startswith("text_encoder") and not any(p.startswith(CLIP_TEXT_MODEL) for p in paths)
            out[component] = underscored_paths(paths, text_model_alias=flat)
        if "" in out:  # a single model of unknown kind: whatever prefix names it
            for component in ("unet", "transformer", "text_encoder"):
                out.setdefault(component, out[""])
        return out

    @property
    def denoiser(self) -> str | None:
        """The component ``lycoris_`` names mean: the pipeline's UNet or transformer."""
        return next((c for c in DENOISERS if c in self.components), None)

    def weight(self, component: str, path: str) -> Tensor:
        """The base weight of module ``path`` (its ``text_model.`` level dropped where the checkpoint has none)."""
        from safetensors import safe_open

        files = self.components.get(component) or self.components.get("")
        if files is None:
            raise ValueError(f"{self.directory} has no {component}; it has {sorted(self.components)}.")
        key = f"{path}.weight"
        if key not in files and path.startswith(CLIP_TEXT_MODEL):
            key = f"{path[len(CLIP_TEXT_MODEL):]}.weight"
        if key not in files:
            raise ValueError(f"{self.directory} has no weight {key!r} in its {component or 'model'}.")
        with safe_open(str(files[key]), "pt") as handle:
            return handle.get_tensor(key)
