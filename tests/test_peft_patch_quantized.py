"""dorakit.patch_peft() over bitsandbytes 4-bit and 8-bit bases (PEFT's QDoRA layers), on the CPU."""

from __future__ import annotations

import warnings

import pytest
import torch

import dorakit

from .conftest import rel_err
from .test_peft_patch import covered_layers, unpatched  # noqa: F401
from .test_quantized import FORMATS, IDS, llama_dir, load  # noqa: F401

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def peft_qdora(path, name):
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, use_dora=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(load(path, FORMATS[name]), cfg)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_magnitude_vector" in n:
                p.mul_(1 + 0.2 * torch.randn(p.shape, generator=gen))
    return model.train()


def copy_adapter(source, target):
    params = dict(source.named_parameters())
    with torch.no_grad():
        for n, p in target.named_parameters():
            if p.requires_grad:
                p.copy_(params[n])


def outputs_and_grads(model):
    model.zero_grad(set_to_none=True)
    out = model(IDS).logits
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(7))).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("name", ["nf4-double", "fp4", "int8"])
def test_parity_with_peft_qdora(llama_dir, name):
    theirs, ours = peft_qdora(llama_dir, name), peft_qdora(llama_dir, name)
    copy_adapter(theirs, ours)
    assert type(theirs.base_model.model.model.layers[0].mlp.down_proj).__module__ == "peft.tuners.lora.bnb"
    # Two copies: PEFT's 8-bit DoRA forward leaves the CPU layer unusable for a second forward.
    out_p, grads_p = outputs_and_grads(theirs)
    with dorakit.patch_peft():
        out_o, grads_o = outputs_and_grads(ours)
        assert len(covered_layers(ours)) == 14
    assert rel_err(out_o, out_p) < 1e-5
    assert set(grads_o) == set(grads_p) and len(grads_o) == 14 * 3
    for key in grads_p:
        assert rel_err(grads_o[key], grads_p[key]) < 1e-4, key


@pytest.mark.parametrize("name", ["nf4-double", "int8"])
def test_identity_at_init_and_merge_and_unload(llama_dir, name):
    with dorakit.patch_peft():
        model = peft.get_peft_model(load(llama_dir, FORMATS[name]), peft.LoraConfig(
            r=4, lora_alpha=8, target_modules="all-linear", use_dora=True)).eval()
        with torch.no_grad():
            with model.disable_adapter():
                expected = model(IDS).logits
            assert rel_err(model(IDS).logits, expected) < 1e-5  # m from the dequantized weight
    # Merged into the dequantized weight, which PEFT quantizes again: as close to PEFT's own merge as
    # the re-quantization allows.
    theirs = peft_qdora(llama_dir, name)
    ours = peft_qdora(llama_dir, name)
    copy_adapter(theirs, ours)
    with torch.no_grad():
        reference = theirs.merge_and_unload()(IDS).logits
        with dorakit.patch_peft():
            merged = ours.merge_and_unload()
        assert rel_err(merged(IDS).logits, reference) < 1e-2


def test_a_layer_repacked_for_cpu_inference_before_the_patch_keeps_peft_code(llama_dir):
    model = peft_qdora(llama_dir, "nf4").eval()
    with torch.no_grad():
        expected = model(IDS).logits  # bitsandbytes repacks 4-bit weights at the first CPU eval forward
    repacked = getattr(model.base_model.model.model.layers[0].mlp.down_proj.base_layer.weight.quant_state,
                       "packing_format_for_cpu", False)
    if not repacked:
        pytest.skip("bitsandbytes did not repack on this CPU")
    with dorakit.patch_peft(), torch.no_grad():
        with pytest.warns(UserWarning, match="repacked by bitsandbytes"):
            assert rel_err(model(IDS).logits, expected) < 1e-6


def test_a_4bit_training_step_reads_the_weight_in_one_pass_for_output_and_norm(llama_dir, monkeypatch):
    """One active DoRA adapter, grad enabled: the layer runs as dorakit's QuantizedLinear (base output and
    W0 @ A^T from one pass); otherwise PEFT's forward with the patched variant."""
    from dorakit.layers import quantized

    calls = []
    real = quantized._QuantizedMatmul.apply
    monkeypatch.setattr(quantized._QuantizedMatmul, "apply", lambda *a: calls.append(1) or real(*a))
    theirs, ours = peft_qdora(llama_dir, "nf4"), peft_qdora(llama_dir, "nf4")
    copy_adapter(theirs, ours)
    out_p, grads_p = outputs_and_grads(theirs)
    with dorakit.patch_peft():
        out_o, grads_o = outputs_and_grads(ours)
        assert len(calls) == 14
        with torch.no_grad():
            ours(IDS)
        assert len(calls) == 14  # inference: PEFT's forward, the variant's cached norm
    assert rel_err(out_o, out_p) < 1e-5
    for key in grads_p:
        assert rel_err(grads_o[key], grads_p[key]) < 1e-4, key
