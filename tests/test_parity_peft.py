"""Parity with HF PEFT at the same weights: outputs and gradients of A, B and the magnitude.

PEFT is the oracle. Adapters start from a non-identity state (random B, perturbed magnitudes), so a
wrong norm axis, scaling, bias handling or dropout path makes these tests fail.
"""

from __future__ import annotations

import copy

import pytest
import torch

import dorakit
from dorakit.formats.keys import adapter_state_dict, from_peft_key

from .conftest import TOY_CASES, output_of, perturb_adapters, rel_err, seeded, tiny_gpt2, tiny_llama

peft = pytest.importorskip("peft")

TOL = 1e-5


def build_pair(builder, targets, *, use_dora=True, fan_in_fan_out=False, **extra):
    """The same base weights adapted by PEFT and by dorakit, with PEFT's adapter weights copied in."""
    base = seeded(builder)
    kwargs = dict(r=4, lora_alpha=8, target_modules=targets, use_dora=use_dora, init_lora_weights=False, **extra)
    peft_model = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(fan_in_fan_out=fan_in_fan_out, **kwargs)
    )
    perturb_adapters(peft_model)
    ours = dorakit.inject_adapters(copy.deepcopy(base), dorakit.DoraConfig(fan_in_fan_out=fan_in_fan_out, **kwargs))
    theirs = {from_peft_key(k): v for k, v in peft.get_peft_model_state_dict(peft_model, save_embedding_layers=False).items()}
    assert set(theirs) == set(adapter_state_dict(ours)), "key sets differ from PEFT's"
    ours.load_state_dict(theirs, strict=False)
    return peft_model.base_model.model, ours


def grads_by_key(model):
    out = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            # PEFT names in memory carry the adapter name, and its magnitude lives in a submodule.
            key = name.replace(".default", "").replace("lora_magnitude_vector.weight", "lora_magnitude_vector")
            out[key] = param.grad
    return out


def check_parity(peft_model, ours, inputs, *, seed=None, tol=TOL):
    results = []
    for model in (peft_model, ours):
        if seed is not None:
            torch.manual_seed(seed)
        out = output_of(model, inputs)
        weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
        (out * weight).sum().backward()
        results.append((out, grads_by_key(model)))
    (out_p, grads_p), (out_o, grads_o) = results
    assert rel_err(out_o, out_p) < tol
    assert set(grads_o) == set(grads_p) and grads_o
    for key in grads_p:
        assert grads_o[key] is not None, key
        assert rel_err(grads_o[key], grads_p[key]) < tol, key


@pytest.mark.parametrize("use_dora", [True, False], ids=["dora", "lora"])
@pytest.mark.parametrize("case", sorted(TOY_CASES))
def test_layer_parity(case, use_dora):
    builder, make_input, targets = TOY_CASES[case]
    peft_model, ours = build_pair(builder, targets, use_dora=use_dora)
    check_parity(peft_model, ours, make_input())


@pytest.mark.parametrize("use_rslora", [False, True], ids=["alpha_over_r", "rslora"])
def test_parity_with_dropout_in_training(use_rslora):
    builder, make_input, targets = TOY_CASES["linear"]
    peft_model, ours = build_pair(builder, targets, lora_dropout=0.3, use_rslora=use_rslora)
    peft_model.train()
    ours.train()
    check_parity(peft_model, ours, make_input(), seed=11)


def test_parity_rank_and_alpha_patterns():
    builder, make_input, targets = TOY_CASES["linear"]
    peft_model, ours = build_pair(builder, targets, rank_pattern={"fc2": 2}, alpha_pattern={"fc1": 3})
    assert ours.fc2.r == 2 and ours.fc1.lora_alpha == 3
    check_parity(peft_model, ours, make_input())


@pytest.mark.parametrize("use_dora", [True, False], ids=["dora", "lora"])
def test_gpt2_conv1d_parity(use_dora):
    inputs = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(1))
    peft_model, ours = build_pair(tiny_gpt2, ["c_attn", "c_proj", "c_fc"], use_dora=use_dora, fan_in_fan_out=True)
    check_parity(peft_model, ours, inputs)


def test_tiny_llama_parity():
    inputs = torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(1))
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens"]
    peft_model, ours = build_pair(tiny_llama, targets)
    check_parity(peft_model, ours, inputs)


def test_tiny_llama_parity_merged():
    """Merging gives the same weights as PEFT's merge (and the same logits)."""
    inputs = torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(1))
    peft_model, ours = build_pair(tiny_llama, ["q_proj", "v_proj", "down_proj"])
    merged_p = copy.deepcopy(peft_model)
    for module in merged_p.modules():
        if hasattr(module, "merge") and hasattr(module, "lora_A"):
            module.merge()
    merged_o = dorakit.merge_and_unload(copy.deepcopy(ours))
    with torch.no_grad():
        assert rel_err(output_of(merged_o, inputs), output_of(merged_p, inputs)) < TOL
        w_o = merged_o.model.layers[0].self_attn.q_proj.weight
        w_p = merged_p.model.layers[0].self_attn.q_proj.base_layer.weight
        assert rel_err(w_o, w_p) < TOL
