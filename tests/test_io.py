"""PEFT's adapter format both ways: dorakit-saved adapters load in PEFT, PEFT-saved ones load here,
with the same logits; same keys and config fields; strict loading with errors that list the keys."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import dorakit
from dorakit.formats.peft import CONFIG_NAME, WEIGHTS_NAME

from .conftest import output_of, perturb_adapters, rel_err, seeded, tiny_gpt2, tiny_llama

peft = pytest.importorskip("peft")

TOL = 1e-5


class MixedNet(nn.Module):
    """Embeddings, 1-D and 2-D convolutions and linear layers, all adaptable."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(30, 8)
        self.conv1d = nn.Conv1d(8, 8, 3, padding=1)
        self.conv2d = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(8 * 4, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, ids):
        h = self.emb(ids).transpose(1, 2)  # (B, 8, T)
        h = torch.relu(self.conv1d(h))
        h = self.conv2d(h.unsqueeze(1))  # (B, 4, 8, T)
        h = h.mean(dim=-1).flatten(1)  # (B, 32)
        return self.head(torch.relu(self.fc(h)))


def mixed_net():
    return MixedNet()


MODELS = {
    "llama": (tiny_llama, ["q_proj", "v_proj", "down_proj", "embed_tokens"], 96, {}),
    "gpt2": (tiny_gpt2, ["c_attn", "c_proj", "c_fc"], 96, {"fan_in_fan_out": True}),
    "mixed": (mixed_net, ["emb", "conv1d", "conv2d", "fc"], 30, {}),
}


def ids_for(vocab):
    return torch.randint(0, vocab, (2, 9), generator=torch.Generator().manual_seed(4))


@pytest.mark.parametrize("use_dora", [True, False], ids=["dora", "lora"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_dorakit_adapter_loads_in_peft(tmp_path, name, use_dora):
    builder, targets, vocab, extra = MODELS[name]
    base = seeded(builder).eval()
    cfg = dorakit.DoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=use_dora, **extra)
    ours = dorakit.inject_adapters(copy.deepcopy(base), cfg)
    perturb_adapters(ours)
    dorakit.save_adapter(ours, tmp_path / "adapter")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter").eval()
    with torch.no_grad():
        assert rel_err(output_of(theirs, ids_for(vocab)), output_of(ours, ids_for(vocab))) < TOL


def with_patterns(use_dora):
    return lambda targets: dict(
        use_dora=use_dora, use_rslora=True, rank_pattern={targets[1]: 2}, alpha_pattern={targets[0]: 3}
    )


PEFT_VARIANTS = {
    "dora": lambda targets: dict(use_dora=True),
    "lora": lambda targets: dict(use_dora=False),
    "dora_rslora_patterns": with_patterns(True),
    "lora_rslora_patterns": with_patterns(False),
}


@pytest.mark.parametrize("variant", sorted(PEFT_VARIANTS))
@pytest.mark.parametrize("name", sorted(MODELS))
def test_peft_adapter_loads_in_dorakit(tmp_path, name, variant):
    builder, targets, vocab, extra = MODELS[name]
    base = seeded(builder).eval()
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False,
                          **extra, **PEFT_VARIANTS[variant](targets))
    theirs = peft.get_peft_model(copy.deepcopy(base), cfg)
    perturb_adapters(theirs)
    theirs.save_pretrained(tmp_path / "adapter", save_embedding_layers=False)
    ours = dorakit.load_adapter(copy.deepcopy(base), tmp_path / "adapter")
    with torch.no_grad():
        assert rel_err(output_of(ours, ids_for(vocab)), output_of(theirs.eval(), ids_for(vocab))) < TOL


@pytest.mark.parametrize("name", sorted(MODELS))
def test_same_keys_shapes_and_config_fields_as_peft(tmp_path, name):
    builder, targets, vocab, extra = MODELS[name]
    base = seeded(builder)
    common = dict(r=4, lora_alpha=8, target_modules=targets, use_dora=True, use_rslora=True,
                  rank_pattern={targets[0]: 2}, lora_dropout=0.05, **extra)
    peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**common)).save_pretrained(
        tmp_path / "peft", save_embedding_layers=False
    )
    dorakit.save_adapter(dorakit.inject_adapters(copy.deepcopy(base), dorakit.DoraConfig(**common)), tmp_path / "ours")
    theirs_t, ours_t = (load_file(tmp_path / d / WEIGHTS_NAME) for d in ("peft", "ours"))
    assert {k: tuple(v.shape) for k, v in ours_t.items()} == {k: tuple(v.shape) for k, v in theirs_t.items()}
    theirs_c, ours_c = (json.loads((tmp_path / d / CONFIG_NAME).read_text()) for d in ("peft", "ours"))
    assert set(ours_c) == set(theirs_c)
    for cfg in (theirs_c, ours_c):
        cfg["target_modules"] = sorted(cfg["target_modules"])
        cfg["auto_mapping"] = None  # the class path differs: a copy of the same class, or not
    assert ours_c == theirs_c


def test_modules_to_save_round_trip_both_ways(tmp_path):
    base = seeded(tiny_llama).eval()
    ids = ids_for(96)
    ours = dorakit.inject_adapters(
        copy.deepcopy(base), dorakit.DoraConfig(target_modules=["q_proj"], modules_to_save=["lm_head"])
    )
    perturb_adapters(ours)
    with torch.no_grad():
        ours.lm_head.modules_to_save.weight.mul_(1.5)
    dorakit.save_adapter(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    with torch.no_grad():
        assert rel_err(output_of(theirs, ids), output_of(ours, ids)) < TOL
    theirs.save_pretrained(tmp_path / "peft")
    again = dorakit.load_adapter(copy.deepcopy(base), tmp_path / "peft")
    with torch.no_grad():
        assert rel_err(output_of(again, ids), output_of(ours, ids)) < TOL


def saved_adapter(tmp_path, **kwargs):
    base = seeded(tiny_llama)
    model = dorakit.inject_adapters(copy.deepcopy(base), dorakit.DoraConfig(target_modules=["q_proj", "v_proj"], **kwargs))
    perturb_adapters(model)
    return base, dorakit.save_adapter(model, tmp_path / "adapter")


def edit_tensors(directory, edit):
    tensors = load_file(directory / WEIGHTS_NAME)
    edit(tensors)
    save_file(tensors, directory / WEIGHTS_NAME)


def edit_config(directory, edit):
    path = directory / CONFIG_NAME
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def untouched(model, reference):
    return [n for n, _ in model.named_modules()] == [n for n, _ in reference.named_modules()] and all(
        torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values())
    )


def drop_magnitude(t):
    del t["base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"]


def add_stray(t):
    t["base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"] = torch.zeros(8, 32)


def bad_shape(t):
    t["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"] = torch.zeros(16, 3)


@pytest.mark.parametrize(
    "edit_file, edit, message",
    [
        (edit_tensors, drop_magnitude,
         r"1 missing tensor\(s\) \(DoRA magnitudes: PEFT would re-initialise.*layers\.0\.self_attn\.q_proj\.lora_magnitude_vector"),
        (edit_tensors, add_stray,
         r"1 unexpected tensor\(s\): base_model\.model\.model\.layers\.0\.self_attn\.k_proj\.lora_A\.weight"),
        (edit_tensors, bad_shape, r"1 shape mismatch\(es\).*v_proj\.lora_B\.weight: file \[16, 3\] vs model \[16, 8\]"),
        (edit_config, lambda c: c.update(peft_type="PREFIX_TUNING"), "peft_type='PREFIX_TUNING'"),
        (edit_config, lambda c: c.pop("peft_type"), "no 'peft_type'"),
        (edit_config, lambda c: c.pop("r"), r"lacks the required field\(s\) \['r'\]"),
        (edit_config, lambda c: c.update(layers_to_transform=[0]), "layers_to_transform=\\[0\\]"),
        (edit_config, lambda c: c.update(init_lora_weights="pissa"), "residual"),
        (edit_config, lambda c: c.update(r=-1), "r must be a positive integer"),
    ],
    ids=["missing_magnitude", "unexpected_key", "shape_mismatch", "peft_type", "no_peft_type", "no_r",
         "unsupported_feature", "pissa", "bad_r"],
)
def test_bad_adapters_raise_clear_errors_and_change_nothing(tmp_path, edit_file, edit, message):
    base, directory = saved_adapter(tmp_path)
    edit_file(directory, edit)
    model = copy.deepcopy(base)
    with pytest.raises(ValueError, match=message):
        dorakit.load_adapter(model, directory)
    assert untouched(model, base)


def test_an_adapter_on_the_wrong_base_model_gets_a_short_error_naming_its_base(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    _, directory = saved_adapter(tmp_path, base_model_name_or_path="models/tiny-llama-2-layers")
    base = seeded(tiny_llama)
    deeper = LlamaForCausalLM(LlamaConfig(**{**base.config.to_dict(), "num_hidden_layers": 3}))
    wider = LlamaForCausalLM(LlamaConfig(**{**base.config.to_dict(), "hidden_size": 48}))
    for model, problem in ((deeper, "2 adapted layer(s) of this model have no tensors in the file"),
                           (wider, "shape mismatch(es)")):
        with pytest.raises(ValueError) as raised:
            dorakit.load_adapter(model, directory)
        message = str(raised.value)
        assert problem in message and "DoRA magnitudes" not in message  # whole layers, not magnitudes, are missing
        assert message.endswith("The adapter was trained on models/tiny-llama-2-layers (adapter_config.json): "
                                "use that model (--model models/tiny-llama-2-layers).")
        assert len(message) < 600  # the two kinds of problem, two keys each, and the fix


def test_unreadable_files_and_directories(tmp_path):
    base, directory = saved_adapter(tmp_path)
    model = copy.deepcopy(base)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        dorakit.load_adapter(model, tmp_path / "nowhere")
    (directory / CONFIG_NAME).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        dorakit.load_adapter(model, directory)
    _, directory = saved_adapter(tmp_path / "b")
    data = (directory / WEIGHTS_NAME).read_bytes()
    (directory / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])  # truncated download
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        dorakit.load_adapter(model, directory)
    (directory / WEIGHTS_NAME).unlink()
    torch.save({"x": torch.zeros(1)}, directory / "adapter_model.bin")
    with pytest.raises(ValueError, match="pickle file, which dorakit never loads"):
        dorakit.load_adapter(model, directory)
    assert untouched(model, base)


def test_saving_over_an_adapter_needs_overwrite(tmp_path):
    base, directory = saved_adapter(tmp_path)
    other = dorakit.inject_adapters(copy.deepcopy(base), dorakit.DoraConfig(r=2, target_modules=["k_proj"]))
    before = {p.name: p.read_bytes() for p in directory.iterdir()}
    with pytest.raises(FileExistsError, match="overwrite=True"):
        dorakit.save_adapter(other, directory)
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == before
    dorakit.save_adapter(other, directory, overwrite=True)
    assert dorakit.read_adapter_config(directory).r == 2


def test_interrupted_save_leaves_the_old_adapter_and_no_temporary_files(tmp_path, monkeypatch):
    base, directory = saved_adapter(tmp_path)
    before = {p.name: p.read_bytes() for p in directory.iterdir()}
    other = dorakit.inject_adapters(copy.deepcopy(base), dorakit.DoraConfig(r=2, target_modules=["k_proj"]))

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C while writing the weights

    monkeypatch.setattr("safetensors.torch.save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        dorakit.save_adapter(other, directory, overwrite=True)
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == before
    assert sorted(os.listdir(directory)) == [CONFIG_NAME, WEIGHTS_NAME]


def test_base_model_name_is_recorded(tmp_path):
    base = seeded(tiny_llama)
    base.name_or_path = "org/tiny-llama"
    model = dorakit.inject_adapters(base, dorakit.DoraConfig(target_modules=["q_proj"], task_type="CAUSAL_LM"))
    data = json.loads((dorakit.save_adapter(model, tmp_path / "a") / CONFIG_NAME).read_text())
    assert data["base_model_name_or_path"] == "org/tiny-llama" and data["use_dora"] is True
    assert "auto_mapping" not in data  # PEFT writes it only without a task type


def test_saved_files_get_the_usual_permissions(tmp_path):
    from dorakit import atomic

    old = os.umask(0o022)
    try:
        model = dorakit.inject_adapters(seeded(tiny_llama), dorakit.DoraConfig(r=2, target_modules=["q_proj"]))
        dorakit.save_adapter(model, tmp_path / "adapter")
        atomic.write_file(tmp_path / "one.txt", lambda p: p.write_text("x"))
        with atomic.new_directory(tmp_path / "dir", overwrite=False, what="test") as tmp:
            (tmp / "f").write_text("y")
    finally:
        os.umask(old)
    for path in [*(tmp_path / "adapter").iterdir(), tmp_path / "one.txt"]:
        assert path.stat().st_mode & 0o777 == 0o644, path  # not mkstemp's 0600
    assert (tmp_path / "dir").stat().st_mode & 0o777 == 0o755


def test_a_save_that_fails_leaves_no_directory(tmp_path, monkeypatch):
    """safetensors' save_file needs numpy (declared in the package metadata); without it, or on any
    failure of a first save, no empty adapter directory is left behind (issue 14)."""
    import sys

    model = dorakit.inject_adapters(seeded(tiny_llama), dorakit.DoraConfig(r=2, target_modules=["q_proj"]))
    monkeypatch.setitem(sys.modules, "numpy", None)  # as on an install without numpy
    with pytest.raises(ImportError):
        dorakit.save_adapter(model, tmp_path / "runs" / "adapter")
    assert not (tmp_path / "runs").exists()
