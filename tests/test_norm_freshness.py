"""The cached DoRA norm follows the parameters whatever writes them (issue 14; see dorakit.norm_cache).

Oracle: a second model that receives the live model's adapter tensors through ``load_state_dict`` and
computes its norms afresh. A stale norm makes the live model's logits differ from it.
"""

from __future__ import annotations

import copy

import pytest
import torch

import dorakit
from dorakit import DoraConfig

from .conftest import rel_err, tiny_llama

CFG = DoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"])


def fresh_copy_logits(base, live, ids):
    """Logits of a new adapted copy of ``base`` holding ``live``'s adapter tensors."""
    other = dorakit.inject_adapters(copy.deepcopy(base), CFG)
    other.load_state_dict(live.state_dict())
    with torch.no_grad():
        return other.eval()(ids).logits


def train_steps(model, make_optimizer, ids, steps=4):
    model.train()
    opt = make_optimizer([p for p in model.parameters() if p.requires_grad])
    for _ in range(steps):
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


OPTIMIZERS = {
    "adamw_fused": lambda ps: torch.optim.AdamW(ps, lr=5e-2, fused=True),
    "adamw_foreach": lambda ps: torch.optim.AdamW(ps, lr=5e-2, foreach=True),
    "sgd": lambda ps: torch.optim.SGD(ps, lr=5e-1),
}


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_live_model_equals_reloaded_adapter_after_training(name):
    torch.manual_seed(0)
    base = tiny_llama()
    live = dorakit.inject_adapters(copy.deepcopy(base), CFG)
    ids = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        live.eval()(ids)  # fill the inference cache before training
    train_steps(live, OPTIMIZERS[name], ids)
    with torch.no_grad():
        logits = live(ids).logits
    assert rel_err(logits, fresh_copy_logits(base, live, ids)) < 1e-5


def test_refresh_norms_after_a_write_through_data():
    """Writes through ``.data`` are invisible to version counters; ``refresh_norms`` is the documented remedy."""
    torch.manual_seed(0)
    base = tiny_llama()
    live = dorakit.inject_adapters(copy.deepcopy(base), CFG)
    ids = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        live.eval()(ids)
    for name, p in live.named_parameters():
        if name.endswith("lora_B.weight"):
            p.data.add_(0.5)
    dorakit.refresh_norms()
    with torch.no_grad():
        logits = live(ids).logits
    assert rel_err(logits, fresh_copy_logits(base, live, ids)) < 1e-5
