"""DoRA and LoRA on ``nn.MultiheadAttention`` (issue 17): in_proj_weight as q/k/v rows and out_proj,
against the formula in fp64, through merge/unmerge/unload, and PEFT's LoRA file layout."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import dorakit
import dorakit.inject
from dorakit.formats.keys import adapter_state_dict, from_peft_key
from dorakit.layers import Linear, MultiheadAttention

from .conftest import perturb_adapters as perturb, rel_err


class AttentionNet(nn.Module):
    def __init__(self, batch_first: bool = True, cross: bool = False, **kwargs) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 4, batch_first=batch_first, **kwargs)
        self.fc = nn.Linear(16, 16)
        self.head = nn.Linear(16, 3)
        self.cross = cross

    def forward(self, x):
        memory = self.fc(x) if self.cross else x  # cross-attention: keys and values from another input
        return self.head(self.attn(x, memory, memory, need_weights=False)[0])


def build(dtype=torch.float32, **kwargs):
    torch.manual_seed(0)
    model = AttentionNet(**kwargs).eval().to(dtype)
    with torch.no_grad():
        model.attn.in_proj_bias.normal_(0, 0.1)
        model.attn.in_proj_weight[5].zero_()  # a zero q row
    return model


def inputs(batch_first: bool = True, dtype=torch.float32):
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1), dtype=dtype)
    return x if batch_first else x.transpose(0, 1)


def dora_weight(layer) -> torch.Tensor:
    w = layer.base_weight().detach().double()
    v = w + layer.scaling * layer.lora_B.weight.detach().double() @ layer.lora_A.weight.detach().double()
    m = layer.lora_magnitude_vector.detach().double()
    return m[:, None] * v / v.norm(dim=1, keepdim=True).clamp_min(1e-12)


CASES = [dict(batch_first=True), dict(batch_first=False), dict(cross=True)]


@pytest.mark.parametrize("kwargs", CASES)
def test_identity_at_init_and_the_formula_in_fp64(kwargs):
    base = build(torch.float64, **kwargs)
    x = inputs(kwargs.get("batch_first", True), torch.float64)
    model = dorakit.inject_adapters(copy.deepcopy(base), dorakit.DoraConfig(r=2, target_modules=["attn"]))
    assert isinstance(model.attn, MultiheadAttention) and isinstance(model.attn.base_layer.out_proj, Linear)
    assert rel_err(model(x), base(x)) < 1e-12
    perturb(model)
    reference = copy.deepcopy(base)
    with torch.no_grad():
        reference.attn.in_proj_weight.copy_(dora_weight(model.attn))  # q, k and v rows, each its own magnitude
        reference.attn.out_proj.weight.copy_(dora_weight(model.attn.base_layer.out_proj))
    out = model(x)
    assert rel_err(out, reference(x)) < 1e-6  # the norm is accumulated in fp32 by design
    assert rel_err(out, base(x)) > 1e-2
    out.sum().backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert len(trainable) == 6 and all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable.values())


def test_merge_unmerge_disable_and_unload_are_exact():
    base = build()
    x = inputs()
    model = dorakit.inject_adapters(copy.deepcopy(base), dorakit.DoraConfig(r=2, target_modules=["attn", "head"]))
    perturb(model)
    adapted = model(x)
    model.attn.merge()  # merges in_proj and out_proj
    assert model.attn.merged and model.attn.base_layer.out_proj.merged
    assert rel_err(model(x), adapted) < 1e-6
    with dorakit.disable_adapters(model):
        assert rel_err(model(x), base(x)) < 1e-6
    assert model.attn.merged and rel_err(model(x), adapted) < 1e-6
    model.attn.unmerge()
    assert rel_err(model.attn.base_layer.in_proj_weight, base.attn.in_proj_weight) < 1e-6
    assert rel_err(model.attn.base_layer.out_proj.base_layer.weight, base.attn.out_proj.weight) < 1e-6
    plain = dorakit.merge_and_unload(copy.deepcopy(model))
    assert type(plain.attn) is nn.MultiheadAttention and type(plain.attn.out_proj) is type(base.attn.out_proj)
    assert rel_err(plain(x), adapted) < 1e-6
    original = model.attn.base_layer
    dorakit.unload(model)
    assert model.attn is original and type(model.attn.out_proj) is type(base.attn.out_proj)
    assert rel_err(model(x), base(x)) < 1e-6


def test_transformer_encoder_fast_path_does_not_skip_the_adapter():
    """nn.TransformerEncoderLayer's inference fast path reads the attention's weights itself."""
    torch.manual_seed(0)
    base = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True), 2,
                                 enable_nested_tensor=False).eval()
    x = inputs()
    model = dorakit.inject_adapters(copy.deepcopy(base), dorakit.DoraConfig(r=2, target_modules=["self_attn"]))
    perturb(model)
    adapted = model(x)  # grad enabled: the ordinary path
    with torch.no_grad():
        assert rel_err(model(x), adapted) < 1e-6 and rel_err(model(x), base(x)) > 1e-2
        for _, layer in dorakit.adapter_layers(model):
            layer.merge()
        assert rel_err(model(x), adapted) < 1e-6  # merged: the fast path computes the merged weights


def test_lora_file_layout_is_peft_s_both_ways(tmp_path):
    """PEFT 0.21.2 applies the out_proj update twice in its MultiheadAttention forward (fixed upstream in
    PEFT pull request 3774), so outputs are compared with out_proj's B at zero; the files match exactly."""
    peft = pytest.importorskip("peft")
    base = build()
    x = inputs()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, target_modules=["attn"]))
    with torch.no_grad():
        theirs.base_model.model.attn.lora_B["default"].weight.normal_(0, 0.2)
        theirs.base_model.model.attn.base_layer.out_proj.lora_A["default"].weight.normal_(0, 0.2)
    ours = dorakit.inject_adapters(copy.deepcopy(base), dorakit.DoraConfig(r=2, target_modules=["attn"], use_dora=False))
    state = {from_peft_key(k): v for k, v in peft.get_peft_model_state_dict(theirs).items()}
    assert set(state) == set(adapter_state_dict(ours))
    ours.load_state_dict(state, strict=False)
    assert rel_err(ours(x), theirs(x)) < 1e-6 and rel_err(ours(x), base(x)) > 1e-2

    theirs.save_pretrained(tmp_path / "theirs")
    back = dorakit.load_adapter(copy.deepcopy(base), tmp_path / "theirs")
    dorakit.save_adapter(back, tmp_path / "ours")
    again = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    mine = {from_peft_key(k): v for k, v in peft.get_peft_model_state_dict(again).items()}
    assert all(torch.equal(mine[k], v) for k, v in state.items())


def test_bad_input_is_a_clear_error_and_leaves_the_model_untouched(monkeypatch):
    model = build()
    before = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match="out_proj of a torch.nn.MultiheadAttention"):
        dorakit.inject_adapters(model, dorakit.DoraConfig(r=2, target_modules=["out_proj"]))
    with pytest.raises(ValueError, match="lora_dropout"):
        dorakit.inject_adapters(model, dorakit.DoraConfig(r=2, lora_dropout=0.1, target_modules=["attn"]))
    with pytest.raises(ValueError, match="kdim or vdim"):
        dorakit.inject_adapters(AttentionNet(kdim=8, vdim=8), dorakit.DoraConfig(r=2, target_modules=["attn"]))
    assert [type(m) for m in model.modules()] == before

    def failing_after_attention(module, *, name, **kwargs):
        if name == "head":
            raise ValueError("no adapter for the head")
        return wrap_module(module, name=name, **kwargs)

    wrap_module = dorakit.inject.wrap_module
    monkeypatch.setattr(dorakit.inject, "wrap_module", failing_after_attention)
    with pytest.raises(ValueError, match="no adapter for the head"):  # after the attention's wrapper was built
        dorakit.inject_adapters(model, dorakit.DoraConfig(r=2, target_modules=["attn", "head"]))
    assert [type(m) for m in model.modules()] == before


def test_all_linear_leaves_out_proj_of_attention_alone():
    """Before issue 17, "all-linear" put an adapter on MultiheadAttention's out_proj, which the
    attention never calls: a trainable adapter that changed nothing."""
    model = build(cross=True)
    dorakit.inject_adapters(model, dorakit.DoraConfig(r=2, target_modules="all-linear"))
    x = inputs()
    for path, layer in dorakit.adapter_layers(model):
        before = model(x)
        with torch.no_grad():
            layer.lora_B.weight.normal_(0, 0.5)
        assert rel_err(model(x), before) > 1e-3, f"the adapter of {path} does not change the output"


@pytest.mark.parametrize("save", ["save_kohya", "save_diffusers"])
def test_community_formats_refuse_attention_adapters_and_write_nothing(tmp_path, save):
    """No kohya or diffusers loader adapts nn.MultiheadAttention: such a file would load as another model."""
    model = dorakit.inject_adapters(build(), dorakit.DoraConfig(r=2, target_modules=["attn", "head"]))
    out = tmp_path / "file"
    with pytest.raises(ValueError, match="MultiheadAttention"):
        getattr(dorakit, save)(model, out, component="unet")
    assert not out.exists()
