"""What only a CUDA device can show (issue 18); skipped without one (`pytest -m gpu` runs them there).

- real host syncs, caught by CUDA's own sync debug mode in a training step and inference forwards,
  beyond the bare base model's (the CPU probe, tests/test_host_syncs.py, counts the ops that would sync);
- CUDA-graph training under ``torch.compile(mode="reduce-overhead")``: no skipped graphs, no recaptures
  per step, the same losses as eager;
- fused AdamW on the GPU path: the norm follows the parameters it writes without bumping versions.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import dorakit
from dorakit import kernels

from .conftest import output_of, perturb_adapters, rel_err, seeded, tiny_llama

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens"]


def llama_pair(dtype=torch.bfloat16):
    base = seeded(tiny_llama).to("cuda", dtype)
    model = dorakit.inject_adapters(copy.deepcopy(base), dorakit.DoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    perturb_adapters(model)
    return base, model, torch.randint(0, 96, (2, 12), device="cuda")


def cuda_syncs(model, ids) -> int:
    """Synchronizing CUDA calls (torch.cuda's sync debug mode warns on each) in two training steps and
    two inference forwards, optimizer steps excluded."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, fused=True)
    model.train()
    output_of(model, ids).float().square().mean().backward()  # warm-up: lazy CUDA and Triton set-up
    optimizer.step()
    optimizer.zero_grad()
    torch.cuda.synchronize()
    count = 0
    for train in (True, True, False, False):
        model.train(train)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                with torch.set_grad_enabled(train):
                    out = output_of(model, ids)
                    if train:
                        out.float().square().mean().backward()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        count += sum("synchronizing" in str(w.message) for w in caught)
        if train:
            optimizer.step()
            optimizer.zero_grad()
    return count


@pytest.mark.parametrize("mode", ["auto", "torch"])
def test_no_cuda_syncs_beyond_the_base_model(mode):
    base, model, ids = llama_pair()
    with kernels.using(mode):
        assert cuda_syncs(model, ids) <= cuda_syncs(base, ids)


def test_cuda_graph_training_under_reduce_overhead():
    """One capture, replayed every step: no cudagraph skips (CPU tensors, mutated inputs, syncs), no
    recompilation as the optimizer steps, and the eager model's losses."""
    _, model, ids = llama_pair(torch.float32)
    eager_model = copy.deepcopy(model)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(model, mode="reduce-overhead")
    losses = {}
    for name, net, params in (("compiled", compiled, model), ("eager", eager_model, eager_model)):
        optimizer = torch.optim.AdamW([p for p in params.parameters() if p.requires_grad], lr=1e-2, fused=True)
        net.train()
        losses[name] = []
        for _ in range(4):
            torch.compiler.cudagraph_mark_step_begin()
            loss = output_of(net, ids).float().square().mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses[name].append(loss.item())
        if name == "compiled":
            graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    counters = torch._dynamo.utils.counters
    assert not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"])
    assert graphs == 1 and not counters["graph_break"], (graphs, dict(counters["graph_break"]))
    assert rel_err(torch.tensor(losses["compiled"]), torch.tensor(losses["eager"])) < 1e-3


def test_fused_adamw_on_cuda_keeps_the_norm_fresh():
    """Fused AdamW writes parameters without bumping version counters (issue 14); the cached norm on the
    GPU path (Triton kernels included) must follow it: the live model equals the adapter reloaded."""
    base, model, ids = llama_pair(torch.float32)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2, fused=True)
    with torch.no_grad():
        model.eval()(ids)  # fill the inference cache first
    model.train()
    for _ in range(4):
        output_of(model, ids).float().square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    fresh = dorakit.inject_adapters(copy.deepcopy(base), dorakit.DoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert rel_err(output_of(model.eval(), ids), output_of(fresh.eval(), ids)) < 1e-5
