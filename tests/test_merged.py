"""Merged checkpoints: plain transformers reloads them with the same logits, and the merge is undone
exactly in a new process from the saved files alone."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap

import pytest
import torch

import dorakit
from dorakit.formats.merged import ADAPTER_SUBDIR, INDEX_NAME, NORMS_NAME

from .conftest import output_of, perturb_adapters, rel_err, seeded, tiny_gpt2, tiny_llama

transformers = pytest.importorskip("transformers")

TOL = 1e-5
CASES = {
    "llama": (tiny_llama, "all-linear", {}),
    "gpt2": (tiny_gpt2, ["c_attn", "c_proj", "c_fc"], {"fan_in_fan_out": True}),
}


def adapted(name, **extra):
    builder, targets, kw = CASES[name]
    base = seeded(builder).eval()
    model = dorakit.inject_adapters(copy.deepcopy(base), dorakit.DoraConfig(r=4, lora_alpha=8, target_modules=targets, **kw, **extra))
    perturb_adapters(model)
    return base, model.eval()


IDS = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("use_dora", [True, False], ids=["dora", "lora"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_merged_checkpoint_reloads_in_plain_transformers(tmp_path, name, use_dora):
    _, model = adapted(name, use_dora=use_dora)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dorakit.save_merged(model, tmp_path / "merged")
    # The live model is not changed by saving.
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not any(layer.merged for _, layer in dorakit.adapter_layers(model))
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert not dorakit.adapter_layers(plain)
    with torch.no_grad():
        assert rel_err(output_of(plain, IDS), output_of(model, IDS)) < TOL


def test_sharded_checkpoint(tmp_path):
    _, model = adapted("llama")
    dorakit.save_merged(model, tmp_path / "merged", max_shard_bytes=20_000)
    index = json.loads((tmp_path / "merged" / INDEX_NAME).read_text())
    assert len(set(index["weight_map"].values())) > 1
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        assert rel_err(output_of(plain, IDS), output_of(model, IDS)) < TOL


UNMERGE_SCRIPT = textwrap.dedent(
    """
    import sys, torch, transformers, dorakit
    merged_dir, base_dir = sys.argv[1], sys.argv[2]
    model = transformers.AutoModelForCausalLM.from_pretrained(merged_dir)
    dorakit.load_merged(model, merged_dir)
    ids = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        merged_logits = model(ids).logits
        for _, layer in dorakit.adapter_layers(model):
            layer.unmerge()
        unmerged_logits = model(ids).logits  # the adapter now runs unmerged on the restored base
    base = dorakit.unload(model).state_dict()
    reference = transformers.AutoModelForCausalLM.from_pretrained(base_dir).state_dict()
    worst = max(((base[k] - v).norm() / v.norm().clamp_min(1e-30)).item() for k, v in reference.items())
    print(f"worst_relative_error {worst:.3e}")
    print(f"adapter_logits_error {((unmerged_logits - merged_logits).norm() / merged_logits.norm()).item():.3e}")
    """
)


@pytest.mark.parametrize("name", sorted(CASES))
def test_exact_unmerge_in_a_new_process(tmp_path, name):
    base, model = adapted(name)
    base.save_pretrained(tmp_path / "base")
    dorakit.save_merged(model, tmp_path / "merged")
    assert (tmp_path / "merged" / NORMS_NAME).is_file() and (tmp_path / "merged" / ADAPTER_SUBDIR).is_dir()
    done = subprocess.run(
        [sys.executable, "-c", UNMERGE_SCRIPT, str(tmp_path / "merged"), str(tmp_path / "base")],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    values = dict(line.split() for line in done.stdout.splitlines() if line.count(" ") == 1)
    assert float(values["worst_relative_error"]) < 1e-6
    assert float(values["adapter_logits_error"]) < TOL


def test_merging_a_tied_adapted_weight_is_refused(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=96, tie_word_embeddings=True)
    model = dorakit.inject_adapters(LlamaForCausalLM(cfg), dorakit.DoraConfig(target_modules=["embed_tokens"]))
    with pytest.raises(ValueError, match="tied weights"):
        dorakit.save_merged(model, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_existing_output_needs_overwrite(tmp_path):
    _, model = adapted("llama")
    (tmp_path / "merged").mkdir()
    (tmp_path / "merged" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        dorakit.save_merged(model, tmp_path / "merged")
    # overwrite replaces a merged checkpoint, never a directory of other files (issue 19)
    with pytest.raises(FileExistsError, match="is not a merged checkpoint .*overwrite only replaces"):
        dorakit.save_merged(model, tmp_path / "merged", overwrite=True)
    assert [p.name for p in (tmp_path / "merged").iterdir()] == ["keep.txt"]
    dorakit.save_merged(model, tmp_path / "other")
    dorakit.save_merged(model, tmp_path / "other", overwrite=True)
    assert (tmp_path / "other" / "model.safetensors").is_file()
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporary directories left


def test_load_merged_refuses_a_directory_without_dorakit_files(tmp_path):
    base, _ = adapted("llama")
    base.save_pretrained(tmp_path / "plain")
    with pytest.raises(FileNotFoundError, match="not written by dorakit.save_merged"):
        dorakit.load_merged(copy.deepcopy(base), tmp_path / "plain")


def test_merge_and_unload_refuses_a_tied_adapted_weight_and_changes_nothing():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=96, tie_word_embeddings=True)
    model = dorakit.inject_adapters(LlamaForCausalLM(cfg), dorakit.DoraConfig(target_modules=["embed_tokens"]))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="tied weights"):
        dorakit.merge_and_unload(model)
    assert dorakit.adapter_layers(model) and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
