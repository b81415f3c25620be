"""fp32 / bf16 / fp16 bases, fp32 adapters over half-precision bases without an fp32 copy of the
base weight, and no_grad / inference_mode."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import dorakit
from dorakit import functional as F

from .conftest import output_of, perturb_adapters, rel_err, seeded, tiny_llama
from .test_functional import _LargestTensor


def adapted_llama(dtype, **extra):
    model = seeded(tiny_llama).to(dtype)
    dorakit.inject_adapters(model, dorakit.DoraConfig(r=4, lora_alpha=8, target_modules="all-linear", **extra))
    perturb_adapters(model)
    return model


@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 3e-2), (torch.float16, 5e-3)])
def test_half_precision_base_keeps_fp32_adapters_and_tracks_fp32(dtype, tol):
    ids = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(0))
    half = adapted_llama(dtype)
    layer = half.model.layers[0].self_attn.q_proj
    assert layer.base_layer.weight.dtype == dtype
    assert layer.lora_A.weight.dtype == layer.lora_magnitude_vector.dtype == torch.float32
    full = copy.deepcopy(half).float()
    out = output_of(half, ids)
    assert out.dtype == dtype
    assert rel_err(out, output_of(full, ids)) < tol
    out.float().square().mean().backward()
    grads = [p.grad for p in half.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_merge_and_unmerge_in_half_precision(dtype):
    ids = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(0))
    model = adapted_llama(dtype)
    layers = [layer for _, layer in dorakit.adapter_layers(model)]
    with torch.no_grad():
        plain = output_of(model, ids)
        before = [layer.base_layer.weight.clone() for layer in layers]
        for layer in layers:
            layer.merge()
        assert all(layer.base_layer.weight.dtype == dtype for layer in layers)
        assert rel_err(output_of(model, ids), plain) < 3e-2
        for layer in layers:
            layer.unmerge()
        # Only the rounding of the merged weight to `dtype` remains.
        assert max(rel_err(layer.base_layer.weight, w) for layer, w in zip(layers, before)) < 1e-2


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_no_fp32_copy_of_a_half_precision_base(monkeypatch, dropout):
    monkeypatch.setattr(F, "CHUNK_ELEMENTS", 8 * 512)  # eight rows per chunk
    base = nn.Sequential(nn.Linear(512, 256)).to(torch.bfloat16)
    model = dorakit.inject_adapters(base, dorakit.DoraConfig(r=8, lora_dropout=dropout, target_modules=["0"]))
    model.train()
    x = torch.randn(4, 512, dtype=torch.bfloat16)

    class Fp32Probe(_LargestTensor):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor) and t.dtype == torch.float32:
                    self.largest = max(self.largest, t.numel())
            return out

    with Fp32Probe() as probe:
        model(x).float().sum().backward()
    assert probe.largest < 512 * 256 // 4  # nothing near the size of the [256, 512] base weight


def test_no_grad_and_inference_mode_match_grad_mode():
    model = adapted_llama(torch.float32, lora_dropout=0.1).eval()
    ids = torch.randint(0, 96, (2, 10))
    expected = output_of(model, ids)
    with torch.no_grad():
        assert torch.equal(output_of(model, ids), expected)
    with torch.inference_mode():
        assert torch.equal(output_of(model, ids), expected)
    # A norm cached under inference_mode must not break training afterwards.
    model.train()
    output_of(model, ids).sum().backward()
    assert model.model.layers[0].self_attn.q_proj.lora_B.weight.grad is not None


def test_base_norm_cache_follows_in_place_base_updates():
    model = dorakit.inject_adapters(nn.Sequential(nn.Linear(8, 4)), dorakit.DoraConfig(target_modules=["0"]))
    layer = model[0]
    first = layer.row_norm().clone()
    with torch.no_grad():
        layer.base_layer.weight.mul_(2)  # e.g. load_state_dict into the base
    assert rel_err(layer.row_norm(), 2 * first) < 1e-6


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_matches_cpu():
    ids = torch.randint(0, 96, (2, 10))
    model = adapted_llama(torch.bfloat16)
    cpu = output_of(model, ids).float()
    gpu = output_of(model.cuda(), ids.cuda()).float().cpu()
    assert rel_err(gpu, cpu) < 3e-2
    output_of(model, ids.cuda()).float().sum().backward()
    with torch.no_grad():
        for _, layer in dorakit.adapter_layers(model):
            layer.merge()
    assert rel_err(output_of(model, ids.cuda()).float().cpu(), cpu) < 5e-2


def test_norm_is_computed_once_per_step_and_cached_for_inference(monkeypatch):
    calls = []
    original = F.dora_row_norm
    monkeypatch.setattr(F, "dora_row_norm", lambda *a, **k: calls.append(1) or original(*a, **k))
    model = adapted_llama(torch.float32)
    layers = len(dorakit.adapter_layers(model))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ids = torch.randint(0, 96, (2, 10))
    model.train()
    calls.clear()  # injection computed the initial magnitudes
    for _ in range(2):  # e.g. gradient accumulation, or checkpointing recomputing the forward
        output_of(model, ids).sum().backward()
    assert len(calls) == layers
    optimizer.step()  # changes A and B: the next forward must recompute
    calls.clear()
    output_of(model, ids).sum().backward()
    assert len(calls) == layers
    model.eval()
    calls.clear()
    with torch.no_grad():
        for _ in range(3):
            output_of(model, ids)
    assert len(calls) == 0  # nothing changed since the last training forward
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.lora_B.weight.add_(0.01)
        model.model.layers[0].self_attn.q_proj.scaling *= 2
        output_of(model, ids)
    assert len(calls) == 1  # only the changed layer


def test_norm_ignores_autocast():
    """Under bf16 autocast (mixed-precision training) the norm's matmuls stay fp32: the norm in the
    forward is the one computed without autocast (at init, or when merging)."""
    import dorakit

    torch.manual_seed(0)
    model = dorakit.inject_adapters(nn.Sequential(nn.Linear(64, 48)), dorakit.DoraConfig(r=4, target_modules=["0"]))
    layer = model[0]
    with torch.no_grad():
        layer.lora_B.weight.normal_(0, 0.1)  # a trained adapter: the factored terms now matter
    expected = F.dora_row_norm(layer.base_layer.weight, layer.lora_A.weight, layer.lora_B.weight, layer.scaling)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer._cache.clear()
        norm = layer.row_norm()
        product = layer.base_layer.weight @ layer.lora_A.weight.T  # what the norm's matmuls would be
    assert product.dtype == torch.bfloat16  # autocast is really on for matmuls here
    assert torch.equal(norm, expected)
