"""The cached DoRA norm follows the parameters whatever writes them (issue 14; see dorakit.norm_cache).

Two oracles for every writer (optimizers, edits between steps, accumulation, checkpointing, DDP):

- PEFT's DoRA, which caches nothing, trained from the same start with the same writer: the losses of
  every step agree within 1e-4 relative, and so do the final logits;
- the same adapter saved and reloaded into a fresh copy of the base, which computes its norms afresh:
  the live model's logits agree within 1e-5.

A stale norm fails both: the live model trains against an old norm (its losses leave PEFT's) and
evaluates with one (its logits leave the reloaded adapter's).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dorakit

from .conftest import rel_err, tiny_llama
from .test_parity_peft import build_pair

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")
# bitsandbytes' paged optimizers run unpaged on CPUs, and say so at their first step.
pytestmark = pytest.mark.filterwarnings("ignore:Paged optimizers are not supported on CPU:UserWarning")

TARGETS = ["q_proj", "v_proj", "up_proj"]
STEPS = 4
IDS = torch.randint(0, 96, (4, 12), generator=torch.Generator().manual_seed(5))


def canonical(name: str) -> str:
    """PEFT's in-memory parameter name -> dorakit's (PEFT adds the adapter name and a magnitude module)."""
    return name.replace(".default", "").replace("lora_magnitude_vector.weight", "lora_magnitude_vector")


def adapter_params(model) -> dict[str, torch.nn.Parameter]:
    return {canonical(n): p for n, p in model.named_parameters() if p.requires_grad}


def pair():
    """PEFT's DoRA and dorakit's at the same non-identity weights (random B, perturbed magnitudes)."""
    return build_pair(tiny_llama, TARGETS)


def logits(model, ids=IDS):
    model.eval()
    with torch.no_grad():
        return model(ids).logits


def train(model, make_optimizer, *, steps=STEPS, micro_batches=1, edit=None, edit_at=2):
    """Per-step losses of ``steps`` optimizer steps on IDS (accumulated over ``micro_batches``).
    ``edit(model)`` runs before step ``edit_at``, after an evaluation forward filled every cache."""
    opt = make_optimizer(list(adapter_params(model).values()))
    logits(model)  # the inference cache is filled before training starts
    losses = []
    for step in range(steps):
        if edit is not None and step == edit_at:
            logits(model)
            edit(model)
        model.train()
        total = 0.0
        for chunk in IDS.chunk(micro_batches):
            loss = model(chunk, labels=chunk).loss / micro_batches
            loss.backward()
            total += loss.item()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total)
    return losses


def reloaded_logits(live, tmp_path):
    """The live adapter written in PEFT's format and loaded into a fresh base (norms computed anew)."""
    torch.manual_seed(0)
    base = tiny_llama()  # the same seed as build_pair's base
    dorakit.save_adapter(live, tmp_path / "adapter", overwrite=True)
    return logits(dorakit.load_adapter(base, tmp_path / "adapter"))


def assert_same_run(theirs, ours, their_losses, our_losses, tmp_path):
    worst = max(abs(a - b) / abs(b) for a, b in zip(our_losses, their_losses, strict=True))
    assert worst < 1e-4, f"losses leave PEFT's: ours {our_losses}, PEFT {their_losses}"
    live = logits(ours)
    assert rel_err(live, logits(theirs)) < 1e-4, "final logits differ from PEFT's"
    assert rel_err(live, reloaded_logits(ours, tmp_path)) < 1e-5, "the live model is not its own adapter reloaded"
    # The test must be able to fail: training moved the adapter well away from its start.
    assert abs(our_losses[-1] - our_losses[0]) > 1e-3 * abs(our_losses[0])


def adafactor(ps):
    from transformers.optimization import Adafactor

    return Adafactor(ps, lr=3e-2, relative_step=False, scale_parameter=False, warmup_init=False)


def bnb_optimizer(name):
    def make(ps):
        bnb = pytest.importorskip("bitsandbytes")
        # min_8bit_size=1: the tiny adapters would otherwise keep 32-bit state (bitsandbytes' default
        # threshold is 4096 elements), and the 8-bit path would go untested.
        return getattr(bnb.optim, name)(ps, lr=3e-2, min_8bit_size=1)
    return make


OPTIMIZERS = {
    "adamw_fused": lambda ps: torch.optim.AdamW(ps, lr=3e-2, fused=True),
    "adamw_foreach": lambda ps: torch.optim.AdamW(ps, lr=3e-2, foreach=True),
    "adamw_for_loop": lambda ps: torch.optim.AdamW(ps, lr=3e-2, foreach=False),
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.5, momentum=0.9),
    "adafactor": adafactor,
    "bnb_adamw_8bit": bnb_optimizer("AdamW8bit"),
    "bnb_paged_adamw_8bit": bnb_optimizer("PagedAdamW8bit"),
    "bnb_paged_adamw_32bit": bnb_optimizer("PagedAdamW32bit"),
}
DEFAULT = OPTIMIZERS["adamw_fused"]  # transformers' Trainer and TRL's default


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_optimizer_trains_the_peft_trajectory_and_the_reloadable_model(name, tmp_path):
    theirs, ours = pair()
    their_losses = train(theirs, OPTIMIZERS[name])
    our_losses = train(ours, OPTIMIZERS[name])
    assert_same_run(theirs, ours, their_losses, our_losses, tmp_path)


def new_values(model, seed: int = 9) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    params = adapter_params(model)
    return {k: params[k].detach() * (1 + 0.3 * torch.randn(params[k].shape, generator=gen)) for k in sorted(params)}


def edit_copy(model):
    params = adapter_params(model)
    with torch.no_grad():
        for key, value in new_values(model).items():
            params[key].copy_(value)


def edit_in_place_no_grad(model):
    with torch.no_grad():
        for key, p in adapter_params(model).items():
            p.mul_(1.3) if "magnitude" not in key else p.add_(0.2)


def edit_in_place_inference_mode(model):
    with torch.inference_mode():
        for key, p in adapter_params(model).items():
            p.mul_(0.7) if "magnitude" not in key else p.sub_(0.1)


def edit_data_reassignment(model):
    """``p.data = t`` keeps p's version counter; repeating it until the allocator puts a new tensor at
    the address of the one the cache saw (glibc's allocator does within a few tries) makes the case an
    address-keyed cache cannot tell apart."""
    values, reused = new_values(model), 0
    for key, p in adapter_params(model).items():
        start = p.data_ptr()
        for _ in range(200):
            p.data = values[key].clone()
            if p.data_ptr() == start:
                reused += 1
                break
    assert reused, "the allocator never reused an address; this test did not exercise the case"


def edit_through_data_then_refresh(model):
    """Writes through ``.data`` are invisible to version counters and storages: refresh_norms() is the remedy."""
    params = adapter_params(model)
    for key, value in new_values(model).items():
        params[key].data.copy_(value)
    dorakit.refresh_norms()


def load_state_dict_edit(assign: bool):
    def edit(model):
        names = {canonical(n): n for n, p in model.named_parameters() if p.requires_grad}
        state = {names[k]: v for k, v in new_values(model).items()}
        result = model.load_state_dict(state, strict=False, assign=assign)
        assert not result.unexpected_keys
        if assign:  # assign=True puts new tensors in; they must stay trainable for the optimizer's next step
            for name in state:
                model.get_parameter(name).requires_grad_(True)
    return edit


EDITS = {
    "copy_": edit_copy,
    "in_place_no_grad": edit_in_place_no_grad,
    "in_place_inference_mode": edit_in_place_inference_mode,
    "data_reassignment": edit_data_reassignment,
    "load_state_dict": load_state_dict_edit(assign=False),
    "load_state_dict_assign": load_state_dict_edit(assign=True),
    "write_through_data_and_refresh_norms": edit_through_data_then_refresh,
}


@pytest.mark.parametrize("name", EDITS)
def test_edits_between_steps(name, tmp_path):
    theirs, ours = pair()
    their_losses = train(theirs, DEFAULT, edit=EDITS[name])
    our_losses = train(ours, DEFAULT, edit=EDITS[name])
    assert_same_run(theirs, ours, their_losses, our_losses, tmp_path)


def test_gradient_accumulation(tmp_path):
    theirs, ours = pair()
    their_losses = train(theirs, DEFAULT, micro_batches=2)
    our_losses = train(ours, DEFAULT, micro_batches=2)
    assert_same_run(theirs, ours, their_losses, our_losses, tmp_path)


@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_gradient_checkpointing(reentrant, tmp_path):
    theirs, ours = pair()
    for model in (theirs, ours):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    their_losses = train(theirs, DEFAULT, micro_batches=2)
    our_losses = train(ours, DEFAULT, micro_batches=2)
    assert_same_run(theirs, ours, their_losses, our_losses, tmp_path)


def test_parameters_frozen_with_a_gradient_still_follow_their_optimizer(tmp_path):
    """An optimizer updates every parameter that has a gradient, also one whose requires_grad was
    turned off after the gradient was made: AdamW's momentum keeps moving a frozen adapter whose
    gradient was zeroed rather than dropped."""

    def freeze_after_backward(model):
        params = adapter_params(model)
        opt = DEFAULT(list(params.values()))
        logits(model)
        losses = []
        for step in range(STEPS):
            model.train()
            loss = model(IDS, labels=IDS).loss if step < 2 else None
            if loss is not None:
                loss.backward()
                losses.append(loss.item())
            else:
                with torch.no_grad():
                    losses.append(model(IDS, labels=IDS).loss.item())
            if step == 1:
                for p in params.values():
                    p.requires_grad_(False)
            opt.step()
            opt.zero_grad(set_to_none=False)  # zeroed, not dropped: the frozen tensors keep a .grad
        for p in params.values():  # trainable again, so that both models save and compare the same tensors
            p.requires_grad_(True)
        return losses

    theirs, ours = pair()
    their_losses = freeze_after_backward(theirs)
    our_losses = freeze_after_backward(ours)
    assert_same_run(theirs, ours, their_losses, our_losses, tmp_path)


# ---- DDP: two gloo processes, each training PEFT's and dorakit's model on its half of the batch ----

def ddp_worker(out: str) -> None:
    """Run under torchrun (2 processes): rank 1 starts from different adapter values, which DDP's
    broadcast replaces with rank 0's; both models train STEPS fused-AdamW steps on half the batch."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    theirs, ours = pair()
    if rank == 1:
        for model in (theirs, ours):
            with torch.no_grad():
                for p in adapter_params(model).values():
                    p.mul_(1.5)
    logits(ours)  # rank 1's caches now hold its own (soon replaced) values
    result = {"rank": rank}
    for name, model in (("peft", theirs), ("ours", ours)):
        wrapped = DistributedDataParallel(model)
        opt = DEFAULT(list(adapter_params(model).values()))
        losses = []
        for _ in range(STEPS):
            wrapped.train()
            mine = IDS[rank::2]
            loss = wrapped(mine, labels=mine).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        result[name] = losses
        result[name + "_logits"] = logits(model).flatten()[:64].tolist()
    if rank == 0:
        tmp = Path(out)
        result["reload_rel_err"] = rel_err(logits(ours), reloaded_logits(ours, tmp))
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_two_gloo_processes(tmp_path):
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DORAKIT_DDP_OUT": str(tmp_path)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "tests.test_norm_freshness"]
    done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r in ranks:
        worst = max(abs(a - b) / abs(b) for a, b in zip(r["ours"], r["peft"], strict=True))
        assert worst < 1e-4, (r["ours"], r["peft"])
        assert rel_err(torch.tensor(r["ours_logits"]), torch.tensor(r["peft_logits"])) < 1e-4
    assert rel_err(torch.tensor(ranks[1]["ours_logits"]), torch.tensor(ranks[0]["ours_logits"])) < 1e-6
    assert ranks[0]["reload_rel_err"] < 1e-5


if __name__ == "__main__":
    ddp_worker(os.environ["DORAKIT_DDP_OUT"])


def test_a_model_with_filled_caches_saves_whole_and_its_copies_recompute(tmp_path):
    """The cache keys hold weak references to storages; torch.save (pickle) and deepcopy of the model
    still work, and the copy's first forward computes its own norms."""
    theirs, ours = pair()
    train(ours, DEFAULT, steps=2)
    live = logits(ours)
    torch.save(ours, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    assert rel_err(logits(loaded), live) == 0
    assert loaded.save_pretrained.args[0] is loaded  # the transformers integration's methods follow the copy
    copied = copy.deepcopy(ours)
    with torch.no_grad():
        for p in adapter_params(copied).values():
            p.mul_(1.1)
    assert rel_err(logits(copied), reloaded_logits(copied, tmp_path)) < 1e-5
