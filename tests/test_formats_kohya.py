"""kohya/LyCORIS files (issue 16): hand-written files in both magnitude axes against LyCORIS's own formula,
round trips through dorakit, name decoding, and the refusals."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import dorakit
from dorakit.formats.keys import decode_kohya_name

from .conftest import rel_err


class Toy(nn.Module):
    """Module names with underscores, as diffusers' (to_q, conv_in, ff_net): kohya turns every dot into one."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(3, 4, 3, padding=1)
        self.to_q = nn.Linear(4 * 4 * 4, 6)
        self.ff_net = nn.ModuleList([nn.Linear(6, 5, bias=False)])

    def forward(self, x):
        h = self.conv_in(x).relu().flatten(1)  # [N, 64]
        return self.ff_net[0](self.to_q(h).relu())


def toy(dtype=torch.float64) -> Toy:
    torch.manual_seed(0)
    return Toy().to(dtype)


def image(dtype=torch.float64):
    return torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1), dtype=dtype)


def lycoris_weight(w0, down, up, alpha, scale):
    """LyCORIS's apply_weight_decompose: the axis from dora_scale's shape, eps on the norm."""
    r = down.shape[0]
    v = w0 + alpha / r * (up.reshape(up.shape[0], -1) @ down.reshape(r, -1)).reshape(w0.shape)
    eps = torch.finfo(torch.float32).eps
    if scale.shape[0] == w0.shape[0]:  # [out, 1, ...]
        norm = v.reshape(v.shape[0], -1).norm(dim=1).reshape(scale.shape) + eps
    else:  # [1, in, ...]
        norm = v.transpose(0, 1).reshape(v.shape[1], -1).norm(dim=1).reshape(scale.shape) + eps
    return v * (scale / norm)


def hand_written(axis: str) -> dict[str, torch.Tensor]:
    """A small LyCORIS DoRA file for Toy: a 3x3 conv and two linears, alpha != r, one module without alpha."""
    g = torch.Generator().manual_seed(5)
    out = {}
    for name, (out_f, in_f, kernel, r, alpha) in {"conv_in": (4, 3, (3, 3), 2, 3.0), "to_q": (6, 64, (), 3, None),
                                                   "ff_net_0": (5, 6, (), 2, 8.0)}.items():
        key = f"lora_unet_{name}"
        out[f"{key}.lora_down.weight"] = torch.randn(r, in_f, *kernel, generator=g, dtype=torch.float64) * 0.3
        out[f"{key}.lora_up.weight"] = torch.randn(out_f, r, *(1,) * len(kernel), generator=g, dtype=torch.float64) * 0.3
        if alpha is not None:
            out[f"{key}.alpha"] = torch.tensor(alpha)
        shape = (out_f, 1, *(1,) * len(kernel)) if axis == "out" else (1, in_f, *(1,) * len(kernel))
        out[f"{key}.dora_scale"] = 1 + torch.rand(shape, generator=g, dtype=torch.float64)
    return out


def lycoris_forward(model: Toy, sd: dict, x):
    def weight(module, key):
        alpha = sd[f"{key}.alpha"].item() if f"{key}.alpha" in sd else sd[f"{key}.lora_down.weight"].shape[0]
        return lycoris_weight(module.weight, sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"], alpha,
                              sd[f"{key}.dora_scale"])

    h = F.conv2d(x, weight(model.conv_in, "lora_unet_conv_in"), model.conv_in.bias, padding=1).relu().flatten(1)
    h = F.linear(h, weight(model.to_q, "lora_unet_to_q"), model.to_q.bias).relu()
    return F.linear(h, weight(model.ff_net[0], "lora_unet_ff_net_0"))


@pytest.mark.parametrize("axis", ["out", "in"])
def test_hand_written_file_computes_what_lycoris_computes(tmp_path, axis):
    sd = hand_written(axis)
    path = tmp_path / "lora.safetensors"
    save_file(sd, str(path))
    base = toy()
    expected = lycoris_forward(base, sd, image())
    model = dorakit.load_adapter(copy.deepcopy(base), path)
    config = model.dorakit_config
    assert config.magnitude_axis == axis and config.use_dora
    assert model.to_q.scaling == 1.0 and model.conv_in.scaling == 1.5 and model.ff_net[0].scaling == 4.0
    # LyCORIS adds eps = 1.2e-7 to each norm, dorakit clamps at 1e-12: a difference of eps/||.||, and the
    # unmerged norm is accumulated in fp32.
    assert rel_err(model(image()), expected) < 1e-5
    dorakit.merge_and_unload(model)
    assert rel_err(model(image()), expected) < 1e-5


@pytest.mark.parametrize("axis", ["out", "in"])
def test_dorakit_kohya_dorakit_round_trip(tmp_path, axis):
    model = dorakit.inject_adapters(toy(torch.float32), dorakit.DoraConfig(
        r=2, lora_alpha=5, target_modules=["conv_in", "to_q", "ff_net.0"], magnitude_axis=axis,
        init_lora_weights=False, rank_pattern={"to_q": 3}))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "magnitude" in name:
                param.mul_(1.2)
    x = image(torch.float32)
    expected = model(x)
    path = dorakit.save_kohya(model, tmp_path / "lora.safetensors", component="unet")
    with safe_open(str(path), "pt") as handle:
        keys, meta = set(handle.keys()), handle.metadata()
        scale = handle.get_tensor("lora_unet_conv_in.dora_scale")
    assert "lora_unet_ff_net_0.lora_down.weight" in keys and "lora_unet_to_q.alpha" in keys
    assert scale.shape == ((4, 1, 1, 1) if axis == "out" else (1, 3, 1, 1))
    assert json.loads(meta["ss_network_args"]) == {"algo": "lora", "dora_wd": "True", "wd_on_output": str(axis == "out")}
    again = dorakit.load_adapter(toy(torch.float32), path)
    assert torch.equal(again(x), expected)
    assert again.to_q.r == 3 and again.ff_net[0].r == 2


def test_missing_or_zero_alpha_means_alpha_equals_rank(tmp_path):
    sd = hand_written("out")
    sd["lora_unet_conv_in.alpha"] = torch.tensor(0.0)  # LyCORIS: alpha 0 or None is the rank
    save_file(sd, str(tmp_path / "a.safetensors"))
    model = dorakit.load_adapter(toy(), tmp_path / "a.safetensors")
    assert model.conv_in.scaling == 1.0 and model.to_q.scaling == 1.0


def test_rslora_becomes_the_alpha_of_the_same_scale(tmp_path):
    model = dorakit.inject_adapters(toy(torch.float32), dorakit.DoraConfig(
        r=4, lora_alpha=8, use_rslora=True, target_modules=["to_q"], init_lora_weights=False))
    x = image(torch.float32)
    expected = model(x)
    path = dorakit.save_kohya(model, tmp_path / "rs.safetensors", component="unet")
    again = dorakit.load_adapter(toy(torch.float32), path)
    assert again.to_q.scaling == pytest.approx(model.to_q.scaling) and rel_err(again(x), expected) < 1e-6


def test_kohya_to_peft_and_back(tmp_path):
    sd = hand_written("out")
    save_file(sd, str(tmp_path / "a.safetensors"))
    from dorakit.formats.convert import convert

    base = toy()
    expected = lycoris_forward(base, sd, image())
    # Toy's names are not diffusers names: decoding them needs the model, as --base gives it.
    base_dir = tmp_path / "base"
    base_dir.mkdir()
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(base_dir / "model.safetensors"))
    done = convert(tmp_path / "a.safetensors", "peft", tmp_path / "peft", base=base_dir)
    assert done.source_layout == "kohya" and done.layers == {"unet": 3}
    assert rel_err(dorakit.load_adapter(copy.deepcopy(base), tmp_path / "peft")(image()), expected) < 1e-5
    convert(tmp_path / "peft", "kohya", tmp_path / "b.safetensors", component="unet")
    with safe_open(str(tmp_path / "b.safetensors"), "pt") as handle:
        back = {k: handle.get_tensor(k) for k in handle.keys()}
    assert set(back) == set(sd) | {"lora_unet_to_q.alpha"}
    for key, value in sd.items():
        assert torch.equal(back[key].to(value.dtype), value), key


def test_vocabulary_decodes_diffusers_and_transformers_names():
    cases = {
        "down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0": "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0",
        "mid_block_resnets_1_conv_shortcut": "mid_block.resnets.1.conv_shortcut",
        "time_embedding_linear_1": "time_embedding.linear_1",
        "transformer_blocks_0_norm1_context_linear": "transformer_blocks.0.norm1_context.linear",
        "single_transformer_blocks_3_proj_mlp": "single_transformer_blocks.3.proj_mlp",
        "text_model_encoder_layers_11_self_attn_q_proj": "text_model.encoder.layers.11.self_attn.q_proj",
        "encoder_block_0_layer_1_DenseReluDense_wi_0": "encoder.block.0.layer.1.DenseReluDense.wi_0",
    }
    for name, path in cases.items():
        assert decode_kohya_name(name) == path
    with pytest.raises(ValueError, match="--base MODEL_DIR"):
        decode_kohya_name("my_custom_block_to_q")


@pytest.mark.parametrize("change, message", [
    (lambda sd: sd.update({"lora_unet_to_q.hada_w1_a": torch.zeros(1)}), "LoHa"),
    (lambda sd: sd.update({"lora_unet_conv_in.lora_mid.weight": torch.zeros(1)}), "Tucker"),
    (lambda sd: sd.update({"lora_unet_to_k.lora_down.weight": torch.zeros(2, 64),
                           "lora_unet_to_k.lora_up.weight": torch.zeros(6, 2)}), r"not in the model: lora_unet_to_k"),
    (lambda sd: sd.update({"lora_unet_to_q.lora_down.weight": torch.zeros(3, 60)}), "of another shape"),
    (lambda sd: sd.update({"lora_unet_to_q.dora_scale": torch.ones(2, 6)}), r"must be \[6, 1, ...\]"),
    (lambda sd: sd.pop("lora_unet_to_q.lora_up.weight"), "not both"),
    (lambda sd: sd.update({"lora_unet_input_blocks_4_1_proj_in.lora_down.weight": torch.zeros(1, 1),
                           "lora_unet_input_blocks_4_1_proj_in.lora_up.weight": torch.zeros(1, 1)}), "original model code"),
])
def test_bad_and_foreign_files_are_refused_and_the_model_is_unchanged(tmp_path, change, message):
    sd = hand_written("out")
    change(sd)
    save_file(sd, str(tmp_path / "bad.safetensors"))
    model = toy()
    with pytest.raises(ValueError, match=message):
        dorakit.load_adapter(model, tmp_path / "bad.safetensors")
    assert isinstance(model.to_q, nn.Linear) and not hasattr(model, "dorakit_config")


def test_pickles_and_unknown_files_are_refused(tmp_path):
    (tmp_path / "lora.ckpt").write_bytes(b"\x80\x04")
    with pytest.raises(ValueError, match="pickle"):
        dorakit.load_adapter(toy(), tmp_path / "lora.ckpt")
    save_file({"model.weight": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="neither a diffusers nor a kohya"):
        dorakit.load_adapter(toy(), tmp_path / "model.safetensors")
