"""The fused Triton kernels (dorakit.kernels) against their PyTorch twins in dorakit.functional.

Without a GPU they run in Triton's CPU interpreter (TRITON_INTERPRET=1, set here before the kernels
are defined): the same kernel code, slowly, so the shapes stay small. fp32 and bf16 inputs, odd
shapes (nothing a multiple of a block), zero rows in W0, empty token batches.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import dorakit
from dorakit import functional as F
from dorakit import kernels

from .conftest import rel_err

pytest.importorskip("triton")


@pytest.fixture(scope="module")
def tk():
    """The kernel modules; without CUDA, interpreted (tests/conftest.py sets TRITON_INTERPRET=1 first)."""
    from triton.runtime.interpreter import InterpretedFunction

    from dorakit.kernels import triton_compose, triton_norm

    if not torch.cuda.is_available():
        assert isinstance(triton_norm._row_norm_kernel, InterpretedFunction), (
            "Triton was imported before TRITON_INTERPRET=1 was set: run the tests through tests/conftest.py")
    return triton_norm, triton_compose


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def adapter(out_f, in_f, r, dtype, seed=0, zero_rows=()):
    gen = torch.Generator().manual_seed(seed)
    w0 = torch.randn(out_f, in_f, generator=gen)
    w0[list(zero_rows)] = 0
    a = torch.randn(r, in_f, generator=gen) / in_f**0.5
    b = torch.randn(out_f, r, generator=gen) * 0.3
    return w0.to(dtype).to(DEVICE), a.to(DEVICE), b.to(DEVICE)


def exact_norm(w0, a, b, s):
    return torch.linalg.vector_norm(w0.double() + s * (b.double() @ a.double()), dim=1)


def worst_row_error(norm, exact):
    return ((norm.double() - exact).abs() / exact.clamp_min(1e-12)).max().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("out_f, in_f, r", [(37, 53, 5), (70, 130, 17), (1, 1, 1), (3, 200, 64)])
def test_row_norm_kernel_equals_pytorch_and_the_exact_norm(tk, dtype, out_f, in_f, r):
    triton_norm, _ = tk
    w0, a, b = adapter(out_f, in_f, r, dtype, zero_rows=[0] if out_f > 1 else [])
    ours = triton_norm.row_norm(w0, a, b, 1.7)
    assert ours.dtype == torch.float32 and ours.shape == (out_f,)
    assert worst_row_error(ours, exact_norm(w0, a, b, 1.7)) < 1e-5
    assert rel_err(ours, F.dora_row_norm(w0, a, b, 1.7)) < 1e-6
    base_sq = F.squared_row_norms(w0)  # a cached ||W0||^2 is used as it is
    assert rel_err(triton_norm.row_norm(w0, a, b, 1.7, base_sq=base_sq), ours) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_norm_kernel_recomputes_every_cancelled_row(tk, dtype):
    """More cancelled rows than the PyTorch twin's EXACT_ROWS: the kernel's device-side branch makes all
    of them exact (fp64), the zero rows stay at the clamp, never NaN."""
    triton_norm, _ = tk
    out_f, in_f, r = 2 * F.EXACT_ROWS + 5, 40, 4
    w0, a, b = adapter(out_f, in_f, r, torch.float32, seed=2)
    cancelled = list(range(1, out_f, 2))
    w0[cancelled] = -(b[cancelled] @ a) + 1e-4 * torch.randn(len(cancelled), in_f, generator=torch.Generator().manual_seed(3))
    w0[0], b[0] = 0.0, 0.0  # a zero row with a zero update
    w0 = w0.to(dtype)
    ratio = F.cancellation_ratio(F.row_terms(w0, a, b), a, b, 1.0)
    assert (ratio[cancelled] < F.CANCELLATION).sum() > F.EXACT_ROWS
    norm = triton_norm.row_norm(w0, a, b, 1.0)
    assert norm[0].item() == pytest.approx(F.NORM_EPS)
    assert worst_row_error(norm[1:], exact_norm(w0, a, b, 1.0)[1:]) < 1e-5


def test_row_norm_kernel_reads_strided_views_and_empty_layers(tk):
    triton_norm, _ = tk
    w0, a, b = adapter(24, 40, 4, torch.float32)
    view = w0.T.contiguous().T  # [out, in] view with strides (1, out), as GPT-2's Conv1D and embeddings give
    assert rel_err(triton_norm.row_norm(view, a, b, 2.0), F.dora_row_norm(view, a, b, 2.0)) < 1e-6
    assert triton_norm.row_norm(w0[:0], a, b[:0], 2.0).shape == (0,)


def test_bf16_split_of_A_is_exact_to_fp32():
    from dorakit.kernels.triton_norm import _split_bf16

    a = torch.randn(64, 33)
    hi, mid, lo = _split_bf16(a)
    assert hi.dtype == mid.dtype == lo.dtype == torch.bfloat16
    assert ((hi.double() + mid.double() + lo.double() - a.double()).abs() <= 2**-24 * a.abs().double()).all()


def compose_twin(base_out, lora_out, scale):
    return F.dora_compose(base_out, lora_out, scale).to(base_out.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 7, 45), (1, 130), (0, 9)])
def test_compose_kernel_forward_and_backward_equal_pytorch(tk, dtype, shape):
    _, triton_compose = tk
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(shape, generator=gen).to(dtype).to(DEVICE)
    lora = torch.randn(shape, generator=gen).to(DEVICE)  # the LoRA branch runs in the fp32 adapters' dtype
    scale = (1 + 0.1 * torch.randn(shape[-1], generator=gen)).to(DEVICE)
    grad = torch.randn(shape, generator=gen).to(dtype).to(DEVICE)
    results = []
    for fn in (triton_compose.compose, compose_twin):
        inputs = [t.clone().requires_grad_() for t in (base, lora, scale)]
        out = fn(*inputs)
        out.backward(grad)
        results.append((out, *(t.grad for t in inputs)))
    tolerance = 1e-6 if dtype == torch.float32 else 1e-2  # one bf16 rounding of the output may differ
    (out, g_base, g_lora, g_scale), (ref, r_base, r_lora, r_scale) = results
    assert out.dtype == ref.dtype == dtype and g_base.dtype == dtype and g_lora.dtype == torch.float32
    assert rel_err(out, ref) < tolerance and rel_err(g_base, r_base) < tolerance
    assert torch.equal(g_lora, r_lora)
    assert rel_err(g_scale, r_scale) < 1e-5


def test_layers_use_the_kernels_in_triton_mode_and_match_pytorch(tk, monkeypatch):
    """Through the dispatch point of dorakit.layers.base: same logits and gradients as the PyTorch path."""
    from .conftest import output_of, perturb_adapters, seeded, tiny_llama

    model = seeded(tiny_llama).to(DEVICE)
    dorakit.inject_adapters(model, dorakit.DoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "embed_tokens"]))
    perturb_adapters(model)
    ids = torch.randint(0, 96, (2, 9), device=DEVICE)
    calls = []
    for name in ("row_norm", "compose"):
        original = getattr(kernels.Dispatch, name)
        monkeypatch.setattr(kernels.Dispatch, name, staticmethod(lambda *a, _f=original, _n=name: calls.append(_n) or _f(*a)))
    results = {}
    for mode in ("torch", "triton"):
        with kernels.using(mode):
            for _, layer in dorakit.adapter_layers(model):
                layer._cache.clear()
            model.zero_grad()
            out = output_of(model.train(), ids)
            out.square().mean().backward()
            results[mode] = (out, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert "row_norm" in calls and "compose" in calls
    assert rel_err(results["triton"][0], results["torch"][0]) < 1e-5
    for name, grad in results["torch"][1].items():
        assert rel_err(results["triton"][1][name], grad) < 1e-4, name


def test_auto_mode_keeps_cpu_tensors_on_pytorch_and_bad_modes_are_named(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    t = torch.zeros(2, 3)
    assert kernels.Dispatch.compose(t, t, torch.ones(3)) is None  # "auto": CUDA only
    with kernels.using("triton"), pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        kernels.Dispatch.compose(t, t, torch.ones(3))
    with pytest.raises(ValueError, match="auto, torch, triton"):
        kernels.set_mode("fast")
    assert kernels.mode() == "auto"


def test_convolutions_and_quantized_rows_keep_the_pytorch_path(tk):
    """Channels not last (conv outputs) and non-tensor weights (quantized rows) are not the kernels' job."""
    conv_out = torch.zeros(2, 6, 4, 4)
    with kernels.using("torch"):
        assert kernels.Dispatch.compose(conv_out, conv_out, torch.ones(1, 6, 1, 1)) is None
    _, triton_compose = tk
    assert not triton_compose.supports(conv_out, conv_out, torch.ones(1, 6, 1, 1))
    assert kernels.Dispatch.row_norm(object(), torch.zeros(2, 3), torch.zeros(4, 2), 1.0, None) is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_auto_mode_uses_the_kernels_on_cuda_and_not_under_compile():
    layer = dorakit.inject_adapters(nn.Sequential(nn.Linear(64, 48)).cuda().bfloat16(),
                                    dorakit.DoraConfig(r=8, target_modules=["0"]))[0]
    a, b = layer.lora_A.weight, layer.lora_B.weight
    assert kernels.Dispatch.row_norm(layer.base_layer.weight, a, b, layer.scaling, None) is not None
    x = torch.randn(4, 64, device="cuda", dtype=torch.bfloat16)
    assert kernels.Dispatch.compose(x[:, :48], x[:, :48].float(), torch.ones(48, device="cuda")) is not None
