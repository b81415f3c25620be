"""The one mapping between dorakit's state-dict keys and PEFT's adapter-file keys.

dorakit's parameter names are PEFT's (``lora_A.weight``, ``lora_B.weight``,
``lora_magnitude_vector``, ``lora_embedding_A``/``_B``), so for adapter tensors a file key is the
model key with PEFT's prefix ``base_model.model.`` in front. The one other difference: PEFT stores
a ``modules_to_save`` copy under the original module's path (``head.weight``), where dorakit's
model holds it as ``head.modules_to_save.weight`` beside the frozen ``head.original_module``.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..layers.experts import ParameterAdapter, describe_expert_mismatch

PEFT_PREFIX = "base_model.model."
COPY_PART = "modules_to_save"  # ModulesToSave's trainable copy

# Path components that belong to an adapter (everything else is the frozen base).
ADAPTER_PARTS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector",
                 "vera_lambda_b", "vera_lambda_d")

# VeRA's shared projections are one pair per model, stored (when ``save_projection``) under these
# file keys, outside the per-module keys; the model holds them in every layer's ``vera_projection``.
PROJECTION_KEYS = {"vera_A": "base_model.vera_A", "vera_B": "base_model.vera_B"}


def is_adapter_key(key: str) -> bool:
    parts = key.split(".")
    return any(part in ADAPTER_PARTS for part in parts) or COPY_PART in parts


def adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The adapter's tensors (and ``modules_to_save`` copies) keyed as in ``model.state_dict()``."""
    return {k: v for k, v in model.state_dict().items() if is_adapter_key(k)}


def to_peft_key(key: str) -> str:
    """dorakit model key -> PEFT adapter-file key."""
    parts = key.split(".")
    if COPY_PART in parts:
        parts.remove(COPY_PART)
    return PEFT_PREFIX + ".".join(parts)


def from_peft_key(key: str, copy_paths: set[str] | frozenset[str] = frozenset()) -> str:
    """PEFT adapter-file key -> dorakit model key. ``copy_paths`` are the module paths that hold a
    ``modules_to_save`` copy in the model (their tensors get the copy's component back)."""
    if not key.startswith(PEFT_PREFIX):
        raise ValueError(f"Adapter key {key!r} lacks PEFT's prefix {PEFT_PREFIX!r}.")
    key = key[len(PEFT_PREFIX) :]
    for path in copy_paths:
        if key.startswith(path + "."):
            return f"{path}.{COPY_PART}.{key[len(path) + 1:]}"
    return key


# ---- Diffusion-model layouts (issue 16): diffusers' pipeline files and kohya/LyCORIS files ---------------
#
# A pipeline adapter covers several models ("components"). diffusers keys a component's tensors with its
# name in front ("unet.<path>.lora_A.weight"); kohya/LyCORIS files name a module by its path with the dots
# turned into underscores behind a component prefix ("lora_unet_down_blocks_0_..._to_q.lora_down.weight").

COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")
DENOISERS = ("unet", "transformer")

DIFFUSERS_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"  # what diffusers' save_lora_weights writes
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"  # its header entry: {"<component>.<LoraConfig field>": value}
# diffusers' own names for the pair (convert_state_dict_to_diffusers), read as PEFT's.
DIFFUSERS_PAIR_ALIASES = {".lora.down.weight": ".lora_A.weight", ".lora.up.weight": ".lora_B.weight"}
PEFT_PAIR_SUFFIXES = (".lora_A.weight", ".lora_B.weight", ".lora_magnitude_vector")

KOHYA_DOWN, KOHYA_UP, KOHYA_ALPHA, KOHYA_MAGNITUDE = "lora_down.weight", "lora_up.weight", "alpha", "dora_scale"
KOHYA_SUFFIXES = (KOHYA_DOWN, KOHYA_UP, KOHYA_ALPHA, KOHYA_MAGNITUDE)
# Reading: prefix -> component ("lycoris_", SimpleTuner's, names the denoiser of the model it is loaded into).
KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_transformer_": "transformer", "lora_te_": "text_encoder",
                  "lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2", "lora_te3_": "text_encoder_3",
                  "lycoris_": "denoiser"}
# Tensors of other LyCORIS algorithms and options (LoHa, LoKr, OFT, Tucker LoCon, full diffs, ...): refused.
KOHYA_FOREIGN = {"hada_": "LoHa", "lokr_": "LoKr", "oft_": "OFT", "lora_mid.weight": "LoCon with Tucker decomposition",
                 "diff": "a full weight difference", "w_norm": "a trained norm layer", "b_norm": "a trained norm layer",
                 "scalar": "a trained scalar"}
# Module names of the original (non-diffusers) model code: SGM/LDM UNets (SDXL in kohya's sd-scripts),
# BFL's Flux and SAI's SD3. Their files need a block map to the diffusers model, which dorakit does not have.
KOHYA_ORIGINAL_LAYOUTS = ("input_blocks", "middle_block", "output_blocks", "double_blocks", "single_blocks",
                          "joint_blocks")

# Every module name found on the path to a Linear/Conv layer of diffusers' UNet2DConditionModel, SD3 and Flux
# transformers and transformers' CLIP and T5 text encoders: what a kohya name is decoded against when no
# model or --base says which underscores are dots.
KOHYA_VOCABULARY = frozenset({
    "DenseReluDense", "EncDecAttention", "SelfAttention", "add_embedding", "add_k_proj", "add_q_proj", "add_v_proj",
    "attentions", "attn", "attn1", "attn2", "block", "context_embedder", "conv", "conv1", "conv2", "conv_in",
    "conv_out", "conv_shortcut", "down_blocks", "downsamplers", "encoder", "fc1", "fc2", "ff", "ff_context",
    "guidance_embedder", "k", "k_proj", "layer", "layers", "linear", "linear_1", "linear_2", "mid_block", "mlp", "net",
    "norm", "norm1", "norm1_context", "norm_out", "o", "out_proj", "pos_embed", "proj", "proj_in", "proj_mlp",
    "proj_out", "q", "q_proj", "resnets", "self_attn", "single_transformer_blocks", "text_embedder", "text_model",
    "text_projection", "time_emb_proj", "time_embedding", "time_text_embed", "timestep_embedder", "to_add_out", "to_k",
    "to_out", "to_q", "to_v", "transformer_blocks", "up_blocks", "upsamplers", "v", "v_proj", "wi", "wi_0", "wi_1",
    "wo", "x_embedder",
})
_LONGEST_WORD = max(len(word.split("_")) for word in KOHYA_VOCABULARY)

# transformers 5 flattened CLIPTextModel (no ``text_model`` level); files written for it by every trainer,
# and diffusers' loader, keep the ``text_model.`` path.
CLIP_TEXT_MODEL = "text_model."


def kohya_name(prefix: str, path: str) -> str:
    """'lora_unet_' + 'down_blocks.0.attentions.0.proj_in' -> 'lora_unet_down_blocks_0_attentions_0_proj_in'."""
    return prefix + path.replace(".", "_")


def kohya_prefixes(components: list[str]) -> dict[str, str]:
    """Component -> kohya prefix for writing: one text encoder is 'lora_te_', several 'lora_te1_', 'lora_te2_'..."""
    encoders = [c for c in components if c.startswith("text_encoder")]
    out = {"unet": "lora_unet_", "transformer": "lora_transformer_"}
    if encoders == ["text_encoder"]:
        out["text_encoder"] = "lora_te_"
    else:
        out.update({"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_", "text_encoder_3": "lora_te3_"})
    return {c: out[c] for c in components if c in out}


def split_kohya_key(key: str) -> tuple[str, str, str] | None:
    """'lora_te1_x_y.lora_up.weight' -> ('lora_te1_', 'x_y', 'lora_up.weight'); None for a key of no known prefix."""
    name, _, suffix = key.partition(".")
    for prefix in KOHYA_PREFIXES:
        if name.startswith(prefix):
            return prefix, name[len(prefix):], suffix
    return None


def decode_kohya_name(name: str, paths: dict[str, list[str]] | None = None) -> str | None:
    """The module path an underscored kohya name stands for.

    Args:
        name: the name behind the prefix ('down_blocks_0_attentions_0_proj_in').
        paths: underscored form -> the model's paths of that form (``underscored_paths``: exact, from
            the model or a base checkpoint). Without it the name is read against ``KOHYA_VOCABULARY``.
    Returns:
        The path, or None when ``paths`` has none of that form (a module the model lacks).
    Raises:
        ValueError: two paths of the model share the form, or (without ``paths``) a part of the name
            is no module name the vocabulary knows.
    """
    if paths is not None:
        found = paths.get(name, [])
        if len(found) > 1:
            raise ValueError(f"The kohya name {name!r} fits several modules of the model: {found}.")
        return found[0] if found else None
    tokens, parts, i = name.split("_"), [], 0
    while i < len(tokens):
        for width in range(min(_LONGEST_WORD, len(tokens) - i), 0, -1):
            word = "_".join(tokens[i:i + width])
            if word in KOHYA_VOCABULARY or (width == 1 and word.isdigit()):
                parts.append(word)
                i += width
                break
        else:
            raise ValueError(
                f"Cannot tell which underscores of {name!r} are dots: {tokens[i]!r} is not a module name of the "
                "diffusers/transformers models dorakit knows. Give the base model (--base MODEL_DIR), or load the "
                "file into the model with dorakit.load_adapter."
            )
    return ".".join(parts)


def underscored_paths(paths, *, text_model_alias: bool = False) -> dict[str, list[str]]:
    """Underscored form -> the paths that encode to it (two paths with one form make it ambiguous).
    ``text_model_alias``: also accept each path under ``text_model.`` (see ``flattened_clip``), kept as
    the file names it (files keep the ``text_model.`` level; ``adapter_set.resolve`` drops it for the model)."""
    out: dict[str, list[str]] = {}
    for path in paths:
        for form in [path] + ([CLIP_TEXT_MODEL + path] if text_model_alias else []):
            out.setdefault(form.replace(".", "_"), []).append(form)  # the file's own form; loading strips it
    return out


def flattened_clip(model: nn.Module) -> bool:
    """transformers 5's CLIPTextModel, whose modules lack the ``text_model.`` level files name them with."""
    return type(model).__name__ == "CLIPTextModel" and not hasattr(model, "text_model")


def component_of_class(class_name: str) -> str | None:
    """The pipeline component a model class usually is ('UNet2DConditionModel' -> 'unet'), None if unknown.
    Text encoders are 'text_encoder'; a pipeline's second and third are named explicitly."""
    if class_name.startswith("UNet"):
        return "unet"
    if "Transformer" in class_name and class_name.endswith("Model"):
        return "transformer"
    if class_name.startswith(("CLIPText", "T5Encoder", "UMT5Encoder")):
        return "text_encoder"
    return None


def nested_adapter_paths(module_path: str, names: list[str]) -> dict[str, str]:
    """Where the adapters of parameters ``names`` of the module at ``module_path`` live, as PEFT nests its
    ParamWrappers (and ``inject_adapters`` does): the last-registered parameter's adapter is outermost,
    at ``module_path``; each earlier one a ``.base_layer`` deeper."""
    return {name: module_path + ".base_layer" * (len(names) - 1 - i) for i, name in enumerate(names)}


def expert_count_mismatches(model: nn.Module, given: dict[str, Tensor]) -> list[str]:
    """Messages for file tensors (keyed as ``model.state_dict()``) of expert adapters that were made for
    another number of experts: the shape alone would only say "mismatch"."""
    messages = []
    for path, layer in model.named_modules():
        if not isinstance(layer, ParameterAdapter):
            continue
        for name in ("lora_magnitude_vector", "lora_A.weight", "lora_B.weight"):
            value = given.get(f"{path}.{name}")
            message = None if value is None else describe_expert_mismatch(layer, name, tuple(value.shape))
            if message is not None:
                messages.append(f"{to_peft_key(f'{path}.{name}')}: {message}")
                break
    return messages
