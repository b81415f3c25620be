"""Merging under dorakit.patch_peft(): PEFT's merge_adapter / unmerge_adapter / merge_and_unload with
dorakit's exact chunked merge (issue 15).

The property tested is the one users rely on: the merged model computes what the unmerged one does,
and unmerging gives the base weights back. Also where PEFT (at least before 0.21) gets it wrong:
several DoRA adapters merged on one layer, and Conv1D (fan_in_fan_out) unmerge.
"""

from __future__ import annotations

import copy

import pytest
import torch

import dorakit

from .conftest import TOY_CASES, output_of, rel_err, seeded, tiny_gpt2, tiny_llama
from .test_peft_patch import LLAMA_IDS, LLAMA_TARGETS, peft_dora, two_adapters, unpatched  # noqa: F401

peft = pytest.importorskip("peft")

TOL = 1e-5


def base_weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}


def assert_weights_restored(model, before, tol=1e-6):
    """Base weights back to fp32 storage rounding. An embedding's update here (PEFT's random B times a
    perturbed A) is ~100x its base rows, and W0 = W n/m - dW cancels: 100x the rounding of W."""
    after = base_weights(model)
    assert set(after) == set(before)
    for name in before:
        assert rel_err(after[name], before[name]) < (100 * tol if "emb" in name else tol), name


CASES = {**{name: TOY_CASES[name][:2] + (TOY_CASES[name][2], {}) for name in TOY_CASES},
         "gpt2_conv1d": (tiny_gpt2, lambda: LLAMA_IDS, ["c_attn", "c_proj", "c_fc"], {"fan_in_fan_out": True}),
         "llama": (tiny_llama, lambda: LLAMA_IDS, LLAMA_TARGETS, {})}


@pytest.mark.parametrize("safe_merge", [False, True], ids=["unsafe", "safe"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_merge_equals_unmerged_and_unmerge_restores_the_base(case, safe_merge):
    builder, make_input, targets, extra = CASES[case]
    model = peft_dora(builder, targets, **extra)
    before = base_weights(model)
    with dorakit.patch_peft(), torch.no_grad():
        unmerged = output_of(model, make_input())
        model.merge_adapter(safe_merge=safe_merge) if not safe_merge else [
            m.merge(safe_merge=True) for m in model.modules() if hasattr(m, "merged_adapters")]
        assert rel_err(output_of(model, make_input()), unmerged) < TOL
        model.unmerge_adapter()
    assert_weights_restored(model, before)


def test_single_adapter_merge_equals_peft_merge():
    model = peft_dora(tiny_llama, LLAMA_TARGETS)
    theirs = copy.deepcopy(model)
    theirs.merge_adapter()
    with dorakit.patch_peft():
        model.merge_adapter()
    ours, reference = base_weights(model), base_weights(theirs)
    for name in reference:
        assert rel_err(ours[name], reference[name]) < TOL, name


def test_conv1d_unmerge_restores_the_base():
    """GPT-2's Conv1D stores [in, out]; PEFT's DoRA unmerge divided along the wrong axis before 2026."""
    model = peft_dora(tiny_gpt2, ["c_attn", "c_fc"], fan_in_fan_out=True)
    before = base_weights(model)
    with dorakit.patch_peft():
        model.merge_adapter()
        model.unmerge_adapter()
    assert_weights_restored(model, before)


@pytest.mark.parametrize("case", ["linear", "embedding", "conv2d", "gpt2_conv1d"])
def test_several_dora_adapters_merged_on_one_layer(case):
    """Merged == unmerged with two active DoRA adapters, and unmerging restores the base exactly."""
    builder, make_input, targets, extra = CASES[case]
    model = two_adapters(builder, targets, **extra)
    before = base_weights(model)
    with dorakit.patch_peft(), torch.no_grad():
        unmerged = output_of(model, make_input())
        model.merge_adapter()
        assert rel_err(output_of(model, make_input()), unmerged) < TOL
        model.unmerge_adapter()
        assert rel_err(output_of(model, make_input()), unmerged) < TOL
    assert_weights_restored(model, before, tol=1e-5)  # two merges and unmerges, each rounded to fp32


def test_dora_merged_after_a_lora_adapter():
    builder, make_input, targets, _ = CASES["linear"]
    model = peft_dora(builder, targets)
    model.add_adapter("plain", peft.LoraConfig(r=3, lora_alpha=6, target_modules=targets, init_lora_weights=False))
    model.base_model.set_adapter(["plain", "default"])
    with dorakit.patch_peft(), torch.no_grad():
        unmerged = output_of(model, make_input())
        model.base_model.model.fc1.merge(adapter_names=["plain", "default"])
        model.base_model.model.fc2.merge(adapter_names=["plain", "default"])
        assert rel_err(output_of(model, make_input()), unmerged) < TOL


def test_merge_and_unload_gives_the_adapted_model():
    model = peft_dora(tiny_llama, LLAMA_TARGETS)
    with dorakit.patch_peft(), torch.no_grad():
        unmerged = output_of(model, LLAMA_IDS)
        plain = model.merge_and_unload()
    assert type(plain.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    with torch.no_grad():
        assert rel_err(output_of(plain, LLAMA_IDS), unmerged) < TOL


def test_merged_under_the_patch_unmerged_by_peft_after_unpatch():
    builder, make_input, targets, _ = CASES["conv2d"]
    model = peft_dora(builder, targets)
    before = base_weights(model)
    with dorakit.patch_peft():
        model.merge_adapter()
    model.unmerge_adapter()  # PEFT's own unmerge reads the norm the patched merge left in its cache
    assert_weights_restored(model, before, tol=1e-5)


def test_merged_by_peft_unmerged_under_the_patch():
    builder, make_input, targets, _ = CASES["linear"]
    model = peft_dora(builder, targets)
    before = base_weights(model)
    model.merge_adapter()
    with dorakit.patch_peft():
        model.unmerge_adapter()
    assert_weights_restored(model, before, tol=1e-5)


def test_exact_unmerge_after_a_reload_through_load_merged(tmp_path):
    """An adapter PEFT trained and saved under the patch -> dorakit's merged checkpoint -> reloaded in a
    fresh process's model -> unmerged exactly, and the merged model computes what PEFT's did."""
    from transformers import AutoModelForCausalLM

    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    with dorakit.patch_peft():
        model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=LLAMA_TARGETS[:-1], use_dora=True, init_lora_weights=False))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "magnitude" in name:
                    p.mul_(1.1)
            expected = output_of(model, LLAMA_IDS)
        model.save_pretrained(tmp_path / "adapter")
    adapted = dorakit.load_adapter(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "adapter")
    dorakit.save_merged(adapted, tmp_path / "merged")
    reloaded = dorakit.load_merged(AutoModelForCausalLM.from_pretrained(tmp_path / "merged"), tmp_path / "merged")
    with torch.no_grad():
        assert rel_err(output_of(reloaded, LLAMA_IDS), expected) < TOL
    restored = dorakit.unload(reloaded).state_dict()
    for name, value in base.state_dict().items():
        assert rel_err(restored[name], value) < 1e-6, name
