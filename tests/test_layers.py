"""Behaviour matrix over every layer type: plain == merged == unmerged == merge_and_unload,
merge is idempotent and exactly reversible, unload gives the original modules back, and only the
adapter trains."""

from __future__ import annotations

import copy

import pytest
import torch

import dorakit
from dorakit.formats.keys import adapter_state_dict
from dorakit.layers import AdapterLayer

from .conftest import EXTRA_CASES, TOY_CASES, output_of, perturb_adapters, rel_err, seeded

CASES = {**TOY_CASES, **EXTRA_CASES}
TOL = 1e-5


def adapted(case, use_dora=True, **extra):
    builder, make_input, targets = CASES[case]
    base = seeded(builder)
    originals = {name: module for name, module in base.named_modules()}
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    # Default init (B = 0) then perturbed: a non-identity adapter whose update is a realistic
    # 10-20% of the base weight (the parity tests use PEFT's random init, far larger updates).
    cfg = dorakit.DoraConfig(
        r=4, lora_alpha=8, target_modules=targets, use_dora=use_dora, fan_in_fan_out=case.startswith("gpt2"), **extra
    )
    model = dorakit.inject_adapters(base, cfg)
    perturb_adapters(model)
    return model, make_input(), originals, base_state


def layers_of(model):
    return [m for m in model.modules() if isinstance(m, AdapterLayer)]


def base_weights(model):
    return {id(layer): layer.base_layer.weight.detach().clone() for layer in layers_of(model)}


@pytest.mark.parametrize("use_dora", [True, False], ids=["dora", "lora"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_plain_merged_unmerged_unloaded_agree(case, use_dora):
    model, x, originals, base_state = adapted(case, use_dora)
    with torch.no_grad():
        plain = output_of(model, x)
        before = base_weights(model)
        for layer in layers_of(model):
            layer.merge()
        merged = output_of(model, x)
        assert rel_err(merged, plain) < TOL
        once = base_weights(model)
        assert any(rel_err(once[k], before[k]) > 1e-3 for k in once)  # the merge did change weights
        for layer in layers_of(model):
            layer.merge()  # merging twice == merging once
        assert all(torch.equal(w, once[k]) for k, w in base_weights(model).items())
        for layer in layers_of(model):
            layer.unmerge()
        for k, w in base_weights(model).items():
            assert rel_err(w, before[k]) < 1e-6
        for layer in layers_of(model):
            layer.unmerge()  # unmerging twice == unmerging once
        assert rel_err(output_of(model, x), plain) < TOL
        folded = dorakit.merge_and_unload(copy.deepcopy(model))
        assert not layers_of(folded)
        assert rel_err(output_of(folded, x), plain) < TOL


@pytest.mark.parametrize("case", sorted(CASES))
def test_unload_returns_the_original_modules(case):
    model, x, originals, base_state = adapted(case)
    with torch.no_grad():
        for layer in layers_of(model):
            layer.merge()
    restored = dorakit.unload(model)
    for name, module in restored.named_modules():
        assert originals[name] is module
    for key, value in restored.state_dict().items():
        assert rel_err(value, base_state[key]) < 1e-6, key


@pytest.mark.parametrize("case", sorted(CASES))
def test_exact_unmerge_from_saved_norms_in_fresh_objects(case):
    """What a new process has: merged weights, the adapter, and the signed base row norms."""
    model, x, originals, base_state = adapted(case)
    adapter = {k: v.clone() for k, v in adapter_state_dict(model).items()}
    with torch.no_grad():
        for layer in layers_of(model):
            layer.merge()
    saved = {name: m.merged_row_norms() for name, m in model.named_modules() if isinstance(m, AdapterLayer)}
    merged_weights = dorakit.merge_and_unload(model).state_dict()

    builder, _, targets = CASES[case]
    fresh = seeded(builder, seed=99)  # different weights: everything must come from the saved tensors
    fresh.load_state_dict(merged_weights)
    cfg = dorakit.DoraConfig(r=4, lora_alpha=8, target_modules=targets, fan_in_fan_out=case.startswith("gpt2"))
    fresh = dorakit.inject_adapters(fresh, cfg)
    fresh.load_state_dict(adapter, strict=False)
    for name, layer in fresh.named_modules():
        if isinstance(layer, AdapterLayer):
            layer.set_merged(**saved[name])
    restored = dorakit.unload(fresh)
    for key, value in restored.state_dict().items():
        assert rel_err(value, base_state[key]) < 1e-6, key


@pytest.mark.parametrize("use_dora", [True, False], ids=["dora", "lora"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_only_adapter_parameters_get_gradients(case, use_dora):
    model, x, _, _ = adapted(case, use_dora)
    output_of(model, x).square().sum().backward()
    for name, param in model.named_parameters():
        is_adapter = any(p in name for p in ("lora_A", "lora_B", "lora_embedding", "lora_magnitude"))
        assert param.requires_grad == is_adapter, name
        if is_adapter:
            assert param.grad is not None and torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None, name


@pytest.mark.parametrize("case", sorted(CASES))
def test_identity_at_init(case):
    builder, make_input, targets = CASES[case]
    base = seeded(builder)
    x = make_input()
    with torch.no_grad():
        expected = output_of(base, x)
        cfg = dorakit.DoraConfig(r=4, lora_alpha=8, target_modules=targets, fan_in_fan_out=case.startswith("gpt2"))
        model = dorakit.inject_adapters(base, cfg)
        assert rel_err(output_of(model, x), expected) < 1e-6


def test_zero_rows_stay_finite_and_zero():
    """Real checkpoints have all-zero rows; PEFT returns NaN there (DORA.md)."""
    lin = torch.nn.Linear(6, 4)
    with torch.no_grad():
        lin.weight[1] = 0
        lin.bias.zero_()
    model = dorakit.inject_adapters(torch.nn.Sequential(lin), dorakit.DoraConfig(r=2, target_modules=["0"]))
    x = torch.randn(3, 6)
    out = model(x)
    out.sum().backward()
    assert torch.isfinite(out).all() and out[:, 1].abs().max() == 0
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    model[0].merge()
    assert torch.isfinite(model[0].base_layer.weight).all()


def test_norm_is_detached_in_backward():
    """Paper section 4.3: no gradient flows through ||W0 + sBA||; only through B(A(x)) and m."""
    model, x, _, _ = adapted("linear")
    layer = model.fc1
    assert not layer.row_norm().requires_grad
    g = layer.dora_scale()
    assert g.requires_grad  # through the magnitude
    (grad_b,) = torch.autograd.grad(g.sum(), [layer.lora_B.weight], allow_unused=True)
    assert grad_b is None


def test_conv_rank_must_divide_groups():
    conv = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3, groups=4))
    with pytest.raises(ValueError, match="divisible by groups=4"):
        dorakit.inject_adapters(conv, dorakit.DoraConfig(r=6, target_modules=["0"]))
    assert isinstance(conv[0], torch.nn.Conv2d)


def test_conv1d_flag_disagreement_warns_and_is_corrected():
    from .conftest import tiny_gpt2

    model = seeded(tiny_gpt2)
    with pytest.warns(UserWarning, match="Conv1D"):
        dorakit.inject_adapters(model, dorakit.DoraConfig(target_modules=["c_attn"], fan_in_fan_out=False))
    assert model.transformer.h[0].attn.c_attn.fan_in_fan_out is True
    lin = torch.nn.Sequential(torch.nn.Linear(3, 3))
    with pytest.warns(UserWarning, match="torch.nn.Linear"):
        dorakit.inject_adapters(lin, dorakit.DoraConfig(target_modules=["0"], fan_in_fan_out=True))
    assert lin[0].fan_in_fan_out is False


@pytest.mark.parametrize("dropout, training, expect_second_matmul", [
    (0.0, True, False), (0.1, False, False), (0.1, True, True),
])
def test_second_base_matmul_only_with_active_dropout(monkeypatch, dropout, training, expect_second_matmul):
    from dorakit.layers import Linear

    calls = []
    original = Linear.base_forward_without_bias
    monkeypatch.setattr(Linear, "base_forward_without_bias", lambda self, x: calls.append(1) or original(self, x))
    model, x, _, _ = adapted("linear", lora_dropout=dropout)
    model.train(training)
    output_of(model, x)
    assert bool(calls) == expect_second_matmul
