"""dorakit.patch_peft(): PEFT's own DoRA layers compute with dorakit's math (issue 15).

Unpatched PEFT is the oracle: the same PeftModel, at non-identity adapter weights, is run once with
PEFT's code and once under the patch (the patch replaces methods on PEFT's classes, so it applies to
models built before it), and outputs and the gradients of every trainable tensor must agree to fp32
rounding. Everything here also runs against an older PEFT: `make test-peft-old`.
"""

from __future__ import annotations

import copy
import inspect
import warnings

import pytest
import torch
from torch import nn

import dorakit
from dorakit.integrations import peft_patch
from dorakit.integrations.peft_layers import VIEW_ATTR

from .conftest import (EXTRA_CASES, TOY_CASES, LinearNet, output_of, perturb_adapters, rel_err, seeded, tiny_gpt2,
                       tiny_llama)

peft = pytest.importorskip("peft")

TOL = 1e-5
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens"]
LLAMA_IDS = torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(1))


@pytest.fixture(autouse=True)
def unpatched():
    """Every test starts and ends with PEFT unpatched, and with the one-time warnings reset."""
    dorakit.unpatch_peft()
    peft_patch._warned.clear()
    yield
    dorakit.unpatch_peft()


def peft_dora(builder, targets, *, seed=3, **extra):
    """A PEFT DoRA model (built unpatched) at non-identity weights: random B, perturbed magnitudes."""
    kwargs = dict(r=4, lora_alpha=8, target_modules=targets, use_dora=True, init_lora_weights=False)
    kwargs.update(extra)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fan_in_fan_out corrections for Conv1D
        model = peft.get_peft_model(seeded(builder), peft.LoraConfig(**kwargs))
    perturb_adapters(model, seed=seed)
    return model


def trainable_grads(model) -> dict:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


def run(model, inputs, *, seed=None):
    """Output and gradients of every trainable tensor for a fixed random weighting of the output."""
    model.zero_grad(set_to_none=True)
    if seed is not None:
        torch.manual_seed(seed)
    out = output_of(model, inputs)
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(7))).sum().backward()
    return out.detach(), trainable_grads(model)


def assert_parity(model, inputs, *, seed=None, tol=TOL):
    """The same model unpatched (PEFT's code) and patched (dorakit's): equal outputs and gradients."""
    out_p, grads_p = run(model, inputs, seed=seed)
    with dorakit.patch_peft():
        out_o, grads_o = run(model, inputs, seed=seed)
        assert covered_layers(model), "no layer computed with dorakit's math"
    assert rel_err(out_o, out_p) < tol
    assert set(grads_o) == set(grads_p) and grads_p
    for name in grads_p:
        assert rel_err(grads_o[name], grads_p[name]) < tol, name
    return out_o


def covered_layers(model) -> list[str]:
    """Paths of the PEFT layers whose DoRA adapters have a dorakit view (computed by dorakit)."""
    paths = []
    for path, module in model.named_modules():
        holders = getattr(module, "lora_magnitude_vector", None)
        if isinstance(holders, nn.ModuleDict) and any(
                not isinstance(h.__dict__.get(VIEW_ATTR, "none"), str) for h in holders.values()):
            paths.append(path)
    return paths


@pytest.mark.parametrize("case", sorted(TOY_CASES))
def test_parity_every_layer_type(case):
    from peft.tuners.lora import layer

    if case == "scaled_embedding" and not hasattr(layer.Embedding, "_get_embed_scale"):
        pytest.xfail("this PEFT ignores a scaled embedding's embed_scale (Gemma) in the adapter's share; dorakit "
                     "applies it, as PEFT does since 0.18")
    builder, make_input, targets = TOY_CASES[case]
    assert_parity(peft_dora(builder, targets), make_input())


def test_parity_gpt2_conv1d():
    model = peft_dora(tiny_gpt2, ["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)
    assert_parity(model, LLAMA_IDS)
    assert len(covered_layers(model)) == 8  # c_attn, attn.c_proj, c_fc, mlp.c_proj per block


def test_parity_tiny_llama_all_projections_and_embedding():
    model = peft_dora(tiny_llama, LLAMA_TARGETS)
    assert_parity(model, LLAMA_IDS)
    assert len(covered_layers(model)) == 15


@pytest.mark.parametrize("use_rslora", [False, True], ids=["alpha_over_r", "rslora"])
def test_parity_with_dropout_in_training(use_rslora):
    builder, make_input, targets = TOY_CASES["linear"]
    model = peft_dora(builder, targets, lora_dropout=0.3, use_rslora=use_rslora).train()
    assert_parity(model, make_input(), seed=11)


def test_parity_rank_and_alpha_patterns():
    model = peft_dora(tiny_llama, LLAMA_TARGETS, rank_pattern={"v_proj": 2, "down_proj": 6},
                      alpha_pattern={"q_proj": 3, "embed_tokens": 5}, use_rslora=True)
    assert_parity(model, LLAMA_IDS)


def two_adapters(builder, targets, **extra):
    """"default" (r=4) and "second" (r=2, other alpha, rsLoRA), both active, at non-identity weights."""
    model = peft_dora(builder, targets, **extra)
    second = dict(r=2, lora_alpha=5, target_modules=targets, use_dora=True, init_lora_weights=False, use_rslora=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.add_adapter("second", peft.LoraConfig(**second))
    perturb_adapters(model, seed=5)
    model.base_model.set_adapter(["default", "second"])
    return model


@pytest.mark.parametrize("case", ["linear", "embedding", "conv2d"])
def test_parity_two_active_adapters(case):
    builder, make_input, targets = TOY_CASES[case]
    model = two_adapters(builder, targets)
    assert_parity(model, make_input())


def test_initial_magnitudes_equal_peft_and_the_model_starts_as_the_base():
    builder, make_input, targets = TOY_CASES["linear"]
    theirs = peft_dora(builder, LLAMA_TARGETS[:0] + targets)
    with dorakit.patch_peft():
        ours = peft.get_peft_model(seeded(builder), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                                   use_dora=True))
        base = seeded(builder)
        assert rel_err(output_of(ours, make_input()), output_of(base, make_input())) < 1e-6
    torch.manual_seed(0)
    reference = peft.get_peft_model(seeded(builder), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                                     use_dora=True, init_lora_weights=False))
    with dorakit.patch_peft():
        torch.manual_seed(0)
        patched = peft.get_peft_model(seeded(builder), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                                       use_dora=True, init_lora_weights=False))
    mags = {n: p for n, p in patched.named_parameters() if "magnitude" in n}
    assert len(mags) == 2
    for name, p in reference.named_parameters():
        if "magnitude" in name:
            assert p.shape == mags[name].shape and p.dtype == mags[name].dtype
            assert rel_err(mags[name], p) < 1e-6, name
    del theirs


def test_patch_and_unpatch_restore_peft_exactly():
    from peft.tuners.lora import variants

    classes = [getattr(variants, name) for name in peft_patch.VARIANTS]
    four_bit = peft_patch._bnb_4bit_class()  # its forward too, where bitsandbytes is installed
    classes += [four_bit] if four_bit is not None else []
    before = {cls: dict(cls.__dict__) for cls in classes}
    handle = dorakit.patch_peft()
    assert peft_patch.is_patched() and handle.applied
    assert all(cls.__dict__["forward"] is not before[cls].get("forward") for cls in classes)
    assert not dorakit.patch_peft().applied  # idempotent
    dorakit.unpatch_peft()
    dorakit.unpatch_peft()
    for cls in classes:
        assert dict(cls.__dict__) == before[cls], cls.__name__


def test_context_manager_unpatches_only_what_it_patched():
    with dorakit.patch_peft():
        assert peft_patch.is_patched()
        with dorakit.patch_peft():
            pass
        assert peft_patch.is_patched()
    assert not peft_patch.is_patched()


def test_layers_built_under_the_patch_compute_with_peft_after_unpatch():
    builder, make_input, targets = TOY_CASES["conv2d"]
    with dorakit.patch_peft():
        model = peft_dora(builder, targets)
        out_patched = output_of(model, make_input()).detach()
    out_peft = output_of(model, make_input()).detach()
    assert rel_err(out_patched, out_peft) < TOL


@pytest.mark.parametrize("break_it", ["signature", "missing_class", "not_static", "layer_method"])
def test_refuses_an_unsupported_peft_and_patches_nothing(monkeypatch, break_it):
    from peft.tuners.lora import layer, variants

    if break_it == "signature":
        monkeypatch.setattr(variants.DoraLinearVariant, "forward", staticmethod(lambda module, adapter, inputs: None))
    elif break_it == "missing_class":
        monkeypatch.delattr(variants, "DoraConv3dVariant")
    elif break_it == "not_static":
        monkeypatch.setattr(variants.DoraEmbeddingVariant, "unmerge", lambda self, m, a, w: w)
    else:
        monkeypatch.delattr(layer.LoraLayer, "_cache_store")
    before = {name: dict(getattr(variants, name).__dict__) for name in peft_patch.VARIANTS if hasattr(variants, name)}
    with pytest.raises(peft_patch.PeftVersionError, match=r"supports PEFT 0\.17 to 0\.21.*Nothing was patched"):
        dorakit.patch_peft()
    assert not peft_patch.is_patched()
    assert before == {name: dict(getattr(variants, name).__dict__) for name in before}


def test_uncovered_layers_fall_back_to_peft_with_one_warning():
    builder, make_input, targets = EXTRA_CASES["conv2d_groups"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(seeded(builder), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                                     use_dora=True, init_lora_weights=False))
    perturb_adapters(model)
    expected = output_of(model, make_input()).detach()
    with dorakit.patch_peft():
        with pytest.warns(UserWarning, match="groups, dilation .* PEFT's own DoRA code runs") as caught:
            out = output_of(model, make_input())
            output_of(model, make_input())
    assert sum("dorakit.patch_peft" in str(w.message) for w in caught) == 1  # both convs are grouped: one kind
    assert covered_layers(model) == []
    assert rel_err(out, expected) < TOL


def test_zero_rows_stay_finite_where_peft_gives_nan():
    """Real checkpoints have all-zero rows (DORA.md); PEFT divides 0 by their zero norm."""
    base = seeded(LinearNet)
    with torch.no_grad():
        base.fc1.weight[:5] = 0
    x = torch.randn(3, 5, 10, generator=torch.Generator().manual_seed(1))
    config = dict(r=4, lora_alpha=8, target_modules=["fc1", "fc2"], use_dora=True)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config))
    assert torch.isnan(output_of(theirs, x)).any()
    with dorakit.patch_peft():
        ours = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config))
        out, grads = run(ours, x)
        assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads.values())
        assert rel_err(out, base(x)) < 1e-6  # identity at init, zero rows included
        hidden = ours.base_model.model.fc1(x)
        assert torch.equal(hidden[..., :5], base.fc1.bias[:5].expand_as(hidden[..., :5]))


def test_norm_computed_once_per_optimizer_step_with_fused_adamw(monkeypatch):
    """Gradient accumulation reuses the norm; a fused AdamW step (no version-counter bump) renews it."""
    from dorakit import functional

    calls = []
    real = functional.dora_row_norm
    monkeypatch.setattr(functional, "dora_row_norm", lambda *a, **k: calls.append(1) or real(*a, **k))
    builder, make_input, targets = TOY_CASES["linear"]
    model = peft_dora(builder, targets).train()
    reference = copy.deepcopy(model)
    with dorakit.patch_peft():
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, fused=True)
        calls.clear()
        for _ in range(3):  # accumulation: one norm per layer
            output_of(model, make_input()).sum().backward()
        assert len(calls) == 2
        optimizer.step()
        out = output_of(model, make_input())
        assert len(calls) == 4
    ref_opt = torch.optim.AdamW([p for p in reference.parameters() if p.requires_grad], lr=1e-2, fused=True)
    for _ in range(3):
        output_of(reference, make_input()).sum().backward()
    ref_opt.step()
    assert rel_err(out, output_of(reference, make_input())) < TOL


def test_disable_adapter_and_set_adapter_stay_peft():
    builder, make_input, targets = TOY_CASES["linear"]
    model = two_adapters(builder, targets)
    base_out = output_of(seeded(builder), make_input())
    with dorakit.patch_peft():
        with model.disable_adapter():
            assert rel_err(output_of(model, make_input()), base_out) < 1e-7
        model.set_adapter("second")
        only_second = output_of(model, make_input()).detach()
    assert rel_err(only_second, output_of(model, make_input())) < TOL


def test_autocast_keeps_the_norm_in_fp32():
    builder, make_input, targets = TOY_CASES["linear"]
    model = peft_dora(builder, targets)
    with dorakit.patch_peft(), torch.autocast("cpu", dtype=torch.bfloat16):
        output_of(model, make_input())
        view = model.base_model.model.fc1.lora_magnitude_vector["default"].__dict__[VIEW_ATTR]
        assert view.row_norm().dtype == torch.float32
        exact = torch.linalg.vector_norm(
            model.base_model.model.fc1.base_layer.weight.double()
            + view.scaling * (view.lora_B.weight.double() @ view.lora_A.weight.double()), dim=1)
        assert rel_err(view.row_norm(), exact) < 1e-6


def test_public_names():
    assert dorakit.patch_peft is peft_patch.patch_peft and dorakit.unpatch_peft is peft_patch.unpatch_peft
    assert "patch_peft" in dorakit.__all__ and "unpatch_peft" in dorakit.__all__
    assert inspect.getdoc(dorakit.patch_peft)
