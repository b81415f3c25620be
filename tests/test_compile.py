"""torch.compile on models with DoRA layers: one graph, no breaks, same results as eager."""

from __future__ import annotations

import pytest
import torch

import dorakit

from .conftest import output_of, perturb_adapters, rel_err, seeded, tiny_llama


def adapted():
    model = seeded(tiny_llama)
    dorakit.inject_adapters(model, dorakit.DoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    perturb_adapters(model)
    return model


def test_dynamo_traces_without_graph_breaks():
    model = adapted()
    explanation = torch._dynamo.explain(model)(torch.randint(0, 96, (2, 16)))
    assert explanation.graph_break_count == 0, [b.reason for b in explanation.break_reasons]
    assert explanation.graph_count == 1


@pytest.mark.slow
def test_compiled_training_step_matches_eager():
    model = adapted()
    ids = torch.randint(0, 96, (2, 16))
    eager = output_of(model, ids)
    eager.square().mean().backward()
    eager_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    compiled = torch.compile(model)
    out = output_of(compiled, ids)
    out.square().mean().backward()
    assert rel_err(out, eager) < 1e-5
    for name, grad in eager_grads.items():
        assert rel_err(dict(model.named_parameters())[name].grad, grad) < 1e-4, name
