"""inject_adapters and friends: targeting rules, clear errors that leave the model untouched,
modules_to_save, bias modes, disable_adapters, and the trainable-parameter summary."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import dorakit
from dorakit.layers import AdapterLayer

from .conftest import LinearNet, output_of, perturb_adapters, rel_err, seeded, tiny_llama


def snapshot(model):
    return [(name, id(module)) for name, module in model.named_modules()], {
        k: v.clone() for k, v in model.state_dict().items()
    }, [p.requires_grad for p in model.parameters()]


def assert_untouched(model, snap):
    modules, state, flags = snapshot(model)
    assert modules == snap[0]
    assert state.keys() == snap[1].keys() and all(torch.equal(state[k], snap[1][k]) for k in state)
    assert flags == snap[2]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(target_modules=["nope"]), r"No module matched target_modules=\['nope'\].*fc1 \(Linear"),
        (dict(target_modules=["act"]), r"'act' of type torch\.nn\.modules\.activation\.ReLU.*Supported types"),
        (dict(target_modules=None), r"target_modules is not set"),
        (dict(target_modules=["fc1"], modules_to_save=["missing"]), r"modules_to_save names \['missing'\]"),
    ],
)
def test_bad_targets_raise_and_leave_the_model_untouched(kwargs, message):
    model = seeded(LinearNet)
    snap = snapshot(model)
    with pytest.raises(ValueError, match=message):
        dorakit.inject_adapters(model, dorakit.DoraConfig(**kwargs))
    assert_untouched(model, snap)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(r=0), "r must be a positive integer"),
        (dict(r=2.5), "r must be an integer, got 2.5"),
        (dict(lora_alpha=0), "lora_alpha must be a positive number"),
        (dict(lora_dropout=1.0), r"lora_dropout must be in \[0, 1\)"),
        (dict(lora_dropout=-0.1), r"lora_dropout must be in \[0, 1\)"),
        (dict(bias="some"), "bias must be one of"),
        (dict(init_lora_weights="pissa"), "init_lora_weights must be"),
        (dict(rank_pattern={"fc1": 0}), "r must be a positive integer"),
        (dict(target_modules="("), "not a valid regular expression"),
        (dict(target_modules=[1, 2]), "target_modules must be a list of strings"),
    ],
)
def test_bad_hyperparameters_raise_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        dorakit.DoraConfig(**{"target_modules": ["fc1"], **kwargs})


def test_injecting_twice_raises_and_changes_nothing():
    model = dorakit.inject_adapters(seeded(LinearNet), dorakit.DoraConfig(target_modules=["fc1"]))
    snap = snapshot(model)
    for targets in (["fc1"], ["fc2"]):
        with pytest.raises(ValueError, match="already has dorakit adapters"):
            dorakit.inject_adapters(model, dorakit.DoraConfig(target_modules=targets))
        assert_untouched(model, snap)
    from dorakit.layers import wrap_module

    with pytest.raises(ValueError, match="already has an adapter"):  # the layer level refuses too
        wrap_module(model.fc1, r=2, lora_alpha=2)


def test_failure_midway_leaves_no_partial_injection():
    """The second target fails (rank not divisible by groups) after the first was buildable."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Conv2d(4, 4, 1, groups=4))
    snap = snapshot(model)
    with pytest.raises(ValueError, match="divisible by groups"):
        dorakit.inject_adapters(model, dorakit.DoraConfig(r=2, target_modules=["0", "1"]))
    assert_untouched(model, snap)


def test_regex_exclude_and_patterns():
    model = seeded(tiny_llama)
    cfg = dorakit.DoraConfig(
        r=4, lora_alpha=8,
        target_modules=r".*\.(q_proj|v_proj|down_proj)",
        exclude_modules=["layers.1.self_attn.v_proj"],
        rank_pattern={r"layers\.0\.mlp\.down_proj": 2},
        alpha_pattern={"q_proj": 32},
    )
    dorakit.inject_adapters(model, cfg)
    adapted = {name: m for name, m in dorakit.adapter_layers(model)}
    assert set(adapted) == {
        "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj", "model.layers.0.mlp.down_proj",
        "model.layers.1.self_attn.q_proj", "model.layers.1.mlp.down_proj",
    }
    assert adapted["model.layers.0.mlp.down_proj"].r == 2
    assert adapted["model.layers.1.mlp.down_proj"].r == 4
    assert adapted["model.layers.0.self_attn.q_proj"].scaling == 32 / 4
    assert adapted["model.layers.0.self_attn.v_proj"].scaling == 8 / 4


def test_all_linear_skips_the_output_head():
    model = seeded(tiny_llama)
    dorakit.inject_adapters(model, dorakit.DoraConfig(target_modules="all-linear"))
    names = {name.split(".")[-1] for name, _ in dorakit.adapter_layers(model)}
    assert names == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert not isinstance(model.lm_head, AdapterLayer)


def test_modules_to_save_and_bias_modes():
    model = seeded(LinearNet)
    fc2_original = model.fc2
    cfg = dorakit.DoraConfig(target_modules=["fc1"], modules_to_save=["fc2"], bias="lora_only")
    dorakit.inject_adapters(model, cfg)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {
        "fc1.lora_A.weight", "fc1.lora_B.weight", "fc1.lora_magnitude_vector", "fc1.base_layer.bias",
        "fc2.modules_to_save.weight",
    }
    x = torch.randn(2, 10)
    with torch.no_grad():
        model.fc2.modules_to_save.weight.add_(1.0)  # "train" the copy
    with dorakit.disable_adapters(model):
        assert torch.allclose(model(x), fc2_original(torch.relu(model.fc1.base_layer(x))))
    trained_head = model.fc2.modules_to_save
    merged = dorakit.merge_and_unload(copy.deepcopy(model))
    assert isinstance(merged.fc2, nn.Linear) and torch.equal(merged.fc2.weight, trained_head.weight)
    restored = dorakit.unload(model)
    assert restored.fc2 is fc2_original

    model = seeded(LinearNet)
    dorakit.inject_adapters(model, dorakit.DoraConfig(target_modules=["fc1"], bias="all"))
    assert {n for n, p in model.named_parameters() if p.requires_grad} >= {"fc1.base_layer.bias"}
    assert "fc1.base_layer.weight" not in {n for n, p in model.named_parameters() if p.requires_grad}


def test_disable_adapters_gives_the_base_model_even_when_merged():
    base = seeded(tiny_llama)
    ids = torch.randint(0, 96, (2, 8))
    with torch.no_grad():
        expected = output_of(base, ids)
        model = dorakit.inject_adapters(copy.deepcopy(base), dorakit.DoraConfig(target_modules="all-linear"))
        perturb_adapters(model)
        adapted = output_of(model, ids)
        assert rel_err(adapted, expected) > 1e-3
        with dorakit.disable_adapters(model):
            assert rel_err(output_of(model, ids), expected) < 1e-6
        assert rel_err(output_of(model, ids), adapted) < 1e-6
        for _, layer in dorakit.adapter_layers(model):
            layer.merge()
        with dorakit.disable_adapters(model):
            assert rel_err(output_of(model, ids), expected) < 1e-5
        assert all(layer.merged for _, layer in dorakit.adapter_layers(model))
        assert rel_err(output_of(model, ids), adapted) < 1e-5


def test_unload_restores_requires_grad_flags():
    model = seeded(LinearNet)
    model.fc2.weight.requires_grad_(False)
    flags = [p.requires_grad for p in model.parameters()]
    dorakit.unload(dorakit.inject_adapters(model, dorakit.DoraConfig(target_modules=["fc1", "fc2"])))
    assert [p.requires_grad for p in model.parameters()] == flags


def test_trainable_parameter_summary(capsys):
    model = seeded(LinearNet)  # fc1: 10->24 with bias, fc2: 24->6 without
    total_base = 10 * 24 + 24 + 24 * 6
    dorakit.inject_adapters(model, dorakit.DoraConfig(r=2, target_modules=["fc1", "fc2"]))
    adapter = (2 * 10 + 24 * 2 + 24) + (2 * 24 + 6 * 2 + 6)
    assert dorakit.trainable_parameters(model) == (adapter, total_base + adapter)
    line = dorakit.print_trainable_parameters(model)
    assert capsys.readouterr().out.strip() == line
    assert line == f"trainable params: {adapter} || all params: {total_base + adapter} || trainable%: " + (
        f"{100 * adapter / (total_base + adapter):.4f}"
    )


def test_plain_lora_has_no_magnitude():
    model = dorakit.inject_adapters(seeded(LinearNet), dorakit.DoraConfig(target_modules=["fc1"], use_dora=False))
    assert model.fc1.lora_magnitude_vector is None
    assert "fc1.lora_magnitude_vector" not in model.state_dict()


def test_unused_rank_pattern_warns():
    with pytest.warns(UserWarning, match=r"rank_pattern keys \['fc9'\] match no targeted module"):
        dorakit.inject_adapters(seeded(LinearNet), dorakit.DoraConfig(target_modules=["fc1"], rank_pattern={"fc9": 2}))
