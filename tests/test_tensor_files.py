"""What loads is checked (formats/tensor_files.py, issue 19): adapter tensors and merge norms must be
floating point and finite, a damaged file is named with the fix, a merged weight is never written
non-finite, and an adapter whose DoRA magnitudes are all zero is refused with the reason."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file, save_file

import dorakit

from .conftest import perturb_adapters, seeded, tiny_llama

TARGETS = ["q_proj", "v_proj"]


@pytest.fixture
def saved(tmp_path):
    base = seeded(tiny_llama)
    adapted = dorakit.inject_adapters(copy.deepcopy(base), dorakit.DoraConfig(r=2, target_modules=TARGETS))
    perturb_adapters(adapted)
    dorakit.save_adapter(adapted, tmp_path / "adapter")
    return base, adapted, tmp_path


def edit_weights(directory, change, name="adapter_model.safetensors"):
    path = directory / name
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path))
    return next(iter(tensors))


def first(tensors, part):
    return next(k for k in tensors if part in k)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_adapter_tensors_are_refused_and_the_model_is_left_alone(saved, value):
    base, _, tmp_path = saved
    keys = []
    edit_weights(tmp_path / "adapter", lambda t: (keys.append(first(t, "lora_B")), t[keys[0]].view(-1).__setitem__(0, value)))
    model = copy.deepcopy(base)
    with pytest.raises(ValueError, match=f"NaN or infinite values in 1 tensor\\(s\\): {keys[0]}"):
        dorakit.load_adapter(model, tmp_path / "adapter")
    assert not any("lora" in n for n, _ in model.named_parameters())


def test_integer_adapter_tensors_are_refused_not_cast(saved):
    base, _, tmp_path = saved
    edit_weights(tmp_path / "adapter", lambda t: t.update({k: v.round().to(torch.int32) for k, v in t.items() if "lora_A" in k}))
    with pytest.raises(ValueError, match=r"not floating point: .*lora_A.weight \(int32\)"):
        dorakit.load_adapter(copy.deepcopy(base), tmp_path / "adapter")


def test_all_zero_magnitudes_are_refused_with_the_reason(saved):
    base, _, tmp_path = saved
    edit_weights(tmp_path / "adapter", lambda t: [v.zero_() for k, v in t.items() if k.endswith("lora_magnitude_vector")])
    with pytest.raises(ValueError, match=r"magnitudes \(lora_magnitude_vector\) of 4 layer\(s\) are all zero.*every "
                                         r"output of those layers would be zero"):
        dorakit.load_adapter(copy.deepcopy(base), tmp_path / "adapter")


def test_a_config_rank_that_does_not_match_the_file_is_refused_before_allocating(saved, monkeypatch):
    import json

    import dorakit.formats.peft as peft_format

    base, _, tmp_path = saved
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    config["r"] = 10**9  # would allocate [1e9, 32] per layer if injected first
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(config))

    def never(*args, **kwargs):
        raise AssertionError("injected (allocated) before comparing the file's shapes")

    monkeypatch.setattr(peft_format, "inject_adapters", never)
    with pytest.raises(ValueError, match=r"gives rank 1000000000 for .* holds lora_A \[2, 32\]"):
        dorakit.load_adapter(copy.deepcopy(base), tmp_path / "adapter")


@pytest.fixture
def merged(saved):
    base, adapted, tmp_path = saved
    dorakit.save_merged(adapted, tmp_path / "merged")
    return base, tmp_path / "merged"


def load_plain(directory):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory)


def test_a_truncated_merge_norms_file_is_named_and_nothing_is_attached(merged):
    _, directory = merged
    path = directory / "dorakit_merge.safetensors"
    path.write_bytes(path.read_bytes()[:-40])
    model = load_plain(directory)
    with pytest.raises(ValueError, match="dorakit_merge.safetensors is not a readable safetensors file.*merge again"):
        dorakit.load_merged(model, directory)
    assert not any("lora" in n for n, _ in model.named_parameters())


def test_non_finite_merge_norms_are_refused_before_they_reach_the_weights(merged):
    _, directory = merged
    edit_weights(directory, lambda t: t[first(t, "row_norm")].view(-1).__setitem__(0, float("nan")),
                 name="dorakit_merge.safetensors")
    model = load_plain(directory)
    with pytest.raises(ValueError, match="NaN or infinite values"):
        dorakit.load_merged(model, directory)
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("broken", ["adapter", "base"])
def test_a_non_finite_merged_weight_is_never_written(tmp_path, broken):
    # LoRA: W0 + s B A overflows float32 for a huge (finite) B; or the base weight itself holds a NaN.
    model = dorakit.inject_adapters(seeded(tiny_llama), dorakit.DoraConfig(r=2, target_modules=TARGETS, use_dora=False))
    layer = model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        if broken == "adapter":
            layer.lora_A.weight.fill_(1.0)
            layer.lora_B.weight.fill_(3e38)
        else:
            layer.base_layer.weight[0, 0] = float("nan")
    cause = "the adapter's tensors or their scale overflow" if broken == "adapter" else "the base model's weight itself"
    with pytest.raises(ValueError, match=rf"Merging the adapter into 'model.layers.0.self_attn.q_proj' gives NaN or "
                                         rf"infinite weights \({cause}.*nothing was written"):
        dorakit.save_merged(model, tmp_path / "merged")
    assert not (tmp_path / "merged").exists() and not list(tmp_path.glob(".merged.*"))


def test_a_failed_write_is_an_oserror_with_the_system_error(tmp_path, monkeypatch):
    import errno

    import safetensors.torch
    from safetensors import SafetensorError

    from dorakit.formats.tensor_files import write_tensors

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(OSError) as raised:
        write_tensors({"a": torch.zeros(2)}, tmp_path / "x.safetensors")
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == str(tmp_path / "x.safetensors")
