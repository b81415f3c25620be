"""transformers' Trainer and TRL's SFTTrainer, with their defaults, train a dorakit model as they train
PEFT's DoRA, and save, resume and reload its adapter (dorakit.integrations.trainer; issue 14).

Oracles: PEFT's DoRA from the same start under the same trainer (per-step losses within 1e-4 relative in
fp32); the adapter files every save wrote, loaded by dorakit.load_adapter and by peft.PeftModel, give the
live model's logits at that step (1e-5); a run resumed from a checkpoint ends where the straight run ends.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dorakit
from dorakit.formats.keys import adapter_state_dict, from_peft_key, to_peft_key

from .conftest import perturb_adapters, rel_err
from .train_assets import colour_records, make_tokenizer

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"), pytest.mark.filterwarnings("ignore::UserWarning")]

from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

TARGETS = ["q_proj", "v_proj", "up_proj"]
KWARGS = dict(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
TOKENIZER = make_tokenizer()
PROBE = torch.randint(0, len(TOKENIZER), (2, 10), generator=torch.Generator().manual_seed(3))


def base_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(TOKENIZER), max_position_embeddings=128,
                      tie_word_embeddings=False, pad_token_id=TOKENIZER.pad_token_id,
                      bos_token_id=TOKENIZER.bos_token_id, eos_token_id=TOKENIZER.eos_token_id)
    return LlamaForCausalLM(cfg)


def pair(base):
    """A PeftModel with PEFT's DoRA and a dorakit model holding the same non-identity adapter values."""
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(use_dora=True, **KWARGS))
    perturb_adapters(theirs)
    ours = dorakit.inject_adapters(copy.deepcopy(base), dorakit.DoraConfig(**KWARGS))
    ours.load_state_dict({from_peft_key(k): v for k, v in peft.get_peft_model_state_dict(theirs).items()}, strict=False)
    return theirs, ours


def probe_logits(model):
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model(PROBE).logits
    model.train(was_training)
    return out


class LogitsAtSave(TrainerCallback):
    """The live model's logits on PROBE whenever the trainer writes a checkpoint (by global step)."""

    def __init__(self):
        self.at = {}

    def on_save(self, args, state, control, model=None, **kwargs):
        self.at[state.global_step] = probe_logits(model)


def token_data(n=24, seed=1):
    ids = torch.randint(4, len(TOKENIZER), (n, 12), generator=torch.Generator().manual_seed(seed))
    return [{"input_ids": x, "labels": x} for x in ids]


def losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def close(ours, theirs, tol):
    return max(abs(a - b) / abs(b) for a, b in zip(ours, theirs, strict=True)) < tol


def assert_adapter_files(directory, logits):
    """``directory`` holds a PEFT-format adapter (no whole-model weights), and both loaders give ``logits``."""
    names = set(os.listdir(directory))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= names, names
    assert not names & {"model.safetensors", "pytorch_model.bin", "model.safetensors.index.json"}, names
    reloaded = dorakit.load_adapter(base_model(), directory)
    assert rel_err(probe_logits(reloaded), logits) < 1e-5
    theirs = peft.PeftModel.from_pretrained(base_model(), directory)
    assert rel_err(probe_logits(theirs), logits) < 1e-5


def trainer_args(out, **overrides):
    args = dict(output_dir=str(out), max_steps=6, per_device_train_batch_size=4, learning_rate=1e-2, save_steps=3,
                logging_steps=1, report_to="none", use_cpu=True, seed=0)
    return TrainingArguments(**{**args, **overrides})


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "activation_checkpointing"])
def test_trainer_defaults_train_peft_trajectory_and_save_adapters(tmp_path, checkpointing):
    theirs, ours = pair(base_model())
    runs = {}
    for name, model in (("peft", theirs), ("ours", ours)):
        args = trainer_args(tmp_path / name, gradient_checkpointing=checkpointing)
        assert str(args.optim) == "OptimizerNames.ADAMW_TORCH_FUSED" or args.optim == "adamw_torch_fused"
        saves = LogitsAtSave()
        trainer = Trainer(model=model, args=args, train_dataset=token_data(), callbacks=[saves])
        trainer.train()
        runs[name] = (trainer, saves)
    (peft_trainer, _), (trainer, saves) = runs["peft"], runs["ours"]
    assert close(losses(trainer), losses(peft_trainer), 1e-4), (losses(trainer), losses(peft_trainer))
    assert rel_err(probe_logits(ours), probe_logits(theirs)) < 1e-4
    assert abs(losses(trainer)[-1] - losses(trainer)[0]) > 1e-3  # it trained: a stale norm would show
    for step in (3, 6):
        assert_adapter_files(tmp_path / "ours" / f"checkpoint-{step}", saves.at[step])
    trainer.save_model(str(tmp_path / "final"))
    assert_adapter_files(tmp_path / "final", probe_logits(ours))


def test_resume_from_checkpoint_continues_exactly(tmp_path):
    _, straight = pair(base_model())
    trainer = Trainer(model=straight, args=trainer_args(tmp_path / "run"), train_dataset=token_data())
    trainer.train()
    for resume in (str(tmp_path / "run" / "checkpoint-3"), True):
        _, resumed = pair(base_model())  # the start state; the checkpoint's adapter replaces it
        again = Trainer(model=resumed, args=trainer_args(tmp_path / "run"), train_dataset=token_data())
        again.train(resume_from_checkpoint=resume)
        assert losses(again)[-3:] == losses(trainer)[-3:]
        for (key, a), b in zip(adapter_state_dict(resumed).items(),
                               adapter_state_dict(straight).values()):
            assert torch.equal(a, b), key


def test_load_best_model_at_end_loads_the_best_adapter(tmp_path):
    _, ours = pair(base_model())
    saves = LogitsAtSave()
    # "Best" is the higher eval loss here, so that the best checkpoint is the earlier one (training lowers
    # the loss) and loading it changes the live model.
    args = trainer_args(tmp_path / "run", eval_strategy="steps", eval_steps=3, load_best_model_at_end=True,
                        metric_for_best_model="loss", greater_is_better=True)
    trainer = Trainer(model=ours, args=args, train_dataset=token_data(), eval_dataset=token_data(8, seed=2),
                      callbacks=[saves])
    trainer.train()
    assert Path(trainer.state.best_model_checkpoint).name == "checkpoint-3"
    assert rel_err(saves.at[6], saves.at[3]) > 1e-3
    assert rel_err(probe_logits(ours), saves.at[3]) < 1e-6


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_base_is_accepted_and_its_adapter_reloads(tmp_path, bits):
    pytest.importorskip("bitsandbytes")
    from transformers import LlamaConfig, LlamaForCausalLM

    from dorakit.integrations.bitsandbytes import Quantization
    from dorakit.integrations.transformers import load_pretrained

    # Rows of whole 64-element blocks, as bitsandbytes' CPU kernels need (see test_quantized.py).
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=128, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(TOKENIZER), tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "base")
    quantization = Quantization(4, "nf4", True) if bits == 4 else Quantization(8)
    model = load_pretrained(tmp_path / "base", "float32", quantization)
    with pytest.raises(ValueError, match="purely quantized"):  # transformers' rule, before adapters
        Trainer(model=model, args=trainer_args(tmp_path / "refused"), train_dataset=token_data())
    dorakit.inject_adapters(model, dorakit.DoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    trainer = Trainer(model=model, args=trainer_args(tmp_path / "run", max_steps=2, save_steps=2),
                      train_dataset=token_data(8))
    trainer.train()
    assert losses(trainer)[-1] != losses(trainer)[0]
    directory = tmp_path / "run" / "checkpoint-2"
    assert "model.safetensors" not in os.listdir(directory)
    reloaded = dorakit.load_adapter(load_pretrained(tmp_path / "base", "float32", quantization), directory)
    assert rel_err(probe_logits(reloaded), probe_logits(model)) < 1e-5


def sft_data():
    from datasets import Dataset

    return Dataset.from_list([{"text": r["text"] + " " + r["label"]} for r in colour_records(48)])


def sft_run(model, out, **overrides):
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(output_dir=str(out), max_steps=4, per_device_train_batch_size=8, learning_rate=1e-2,
                     logging_steps=1, save_steps=2, report_to="none", use_cpu=True, max_length=64, seed=0, **overrides)
    saves = LogitsAtSave()
    trainer = SFTTrainer(model=model, args=args, train_dataset=sft_data(), processing_class=TOKENIZER, callbacks=[saves])
    trainer.train()
    return trainer, saves, args


@pytest.mark.parametrize("packing", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["unpacked", "packed"])
def test_sft_trainer_defaults_train_peft_trajectory(tmp_path, packing):
    """SFTConfig's defaults: fused AdamW, activation checkpointing, bf16 autocast (on this CPU too).
    Under bf16 both implementations round (their gradients are each about 1% off fp32), so their losses
    are compared within 1e-3; the same runs in fp32 agree within 1e-4."""
    pytest.importorskip("trl")
    results = {}
    for precision in ("bf16", "fp32"):
        theirs, ours = pair(base_model())
        for name, model in (("peft", theirs), ("ours", ours)):
            extra = {"packing": packing} if precision == "bf16" else {"packing": packing, "bf16": False}
            trainer, saves, args = sft_run(model, tmp_path / f"{name}-{precision}", **extra)
            results[name, precision] = (losses(trainer), model, saves)
        if precision == "bf16":
            assert args.bf16 and args.gradient_checkpointing and str(args.optim).endswith(("ADAMW_TORCH_FUSED", "adamw_torch_fused"))
    assert close(results["ours", "fp32"][0], results["peft", "fp32"][0], 1e-4)
    assert close(results["ours", "bf16"][0], results["peft", "bf16"][0], 1e-3)
    assert close(results["ours", "bf16"][0], results["ours", "fp32"][0], 1e-3)
    _, ours, saves = results["ours", "fp32"]
    assert_adapter_files(tmp_path / "ours-fp32" / "checkpoint-2", saves.at[2])
    assert_adapter_files(tmp_path / "ours-fp32" / "checkpoint-4", probe_logits(ours))


def test_sft_trainer_resumes_exactly(tmp_path):
    pytest.importorskip("trl")
    _, straight = pair(base_model())
    trainer, _, _ = sft_run(straight, tmp_path / "run", bf16=False)
    _, resumed = pair(base_model())
    from trl import SFTTrainer

    again = SFTTrainer(model=resumed, args=trainer.args, train_dataset=sft_data(), processing_class=TOKENIZER)
    again.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    assert losses(again)[-2:] == losses(trainer)[-2:]
    assert rel_err(probe_logits(resumed), probe_logits(straight)) == 0


def test_trl_refuses_an_adapter_on_the_output_head(tmp_path):
    pytest.importorskip("trl")
    model = dorakit.inject_adapters(base_model(), dorakit.DoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"]))
    with pytest.raises(ValueError, match="lm_head.weight directly"):
        sft_run(model, tmp_path / "run")


def test_model_methods_transformers_calls(tmp_path):
    base = base_model()
    model = dorakit.inject_adapters(copy.deepcopy(base), dorakit.DoraConfig(**KWARGS))
    perturb_adapters(model)
    assert model._hf_peft_config_loaded and model.active_adapters() == ["default"]
    expected = {to_peft_key(k)[len("base_model.model."):] for k in adapter_state_dict(model)}
    assert set(model.get_adapter_state_dict()) == expected
    model.disable_adapters()
    assert rel_err(probe_logits(model), probe_logits(base)) == 0
    model.enable_adapters()
    assert rel_err(probe_logits(model), probe_logits(base)) > 1e-3
    with pytest.raises(ValueError, match="dorakit.unload"):
        model.load_adapter(str(tmp_path))
    model.save_pretrained(tmp_path / "adapter")  # the adapter, as Trainer.save_model writes it
    assert_adapter_files(tmp_path / "adapter", probe_logits(model))
    twin = copy.deepcopy(model)  # the methods follow the copy, not the original
    with torch.no_grad():
        for p in twin.parameters():
            if p.requires_grad:
                p.mul_(0.5)
    twin.save_pretrained(tmp_path / "twin")
    assert_adapter_files(tmp_path / "twin", probe_logits(twin))
    dorakit.merge_and_unload(model)  # no adapter any more: transformers' own methods are back
    assert not model._hf_peft_config_loaded and "save_pretrained" not in vars(model)
    model.save_pretrained(tmp_path / "merged")
    assert "model.safetensors" in os.listdir(tmp_path / "merged")


def test_trainer_imported_after_injection_is_patched_on_import(tmp_path):
    """The patch waits for transformers.trainer to be imported (importing it for every injection would
    cost seconds), then resuming works as when it was imported first."""
    script = f"""
import sys
import torch, dorakit
from transformers import LlamaConfig, LlamaForCausalLM
model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                     num_key_value_heads=2, vocab_size=50))
dorakit.inject_adapters(model, dorakit.DoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
assert "transformers.trainer" not in sys.modules
from transformers import Trainer, TrainingArguments
assert Trainer._dorakit_patched
ids = torch.randint(0, 50, (4, 8))
args = TrainingArguments(output_dir={str(tmp_path)!r}, max_steps=2, save_steps=1, per_device_train_batch_size=2,
                         report_to="none", use_cpu=True)
Trainer(model=model, args=args, train_dataset=[{{"input_ids": x, "labels": x}} for x in ids]).train()
Trainer(model=model, args=args, train_dataset=[{{"input_ids": x, "labels": x}} for x in ids]).train(
    resume_from_checkpoint={str(tmp_path / "checkpoint-1")!r})
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]


DDP_SCRIPT = """
import json, os, sys, torch, dorakit
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments
out = sys.argv[1]
torch.manual_seed(0)
base = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, vocab_size=64))
if int(os.environ["RANK"]) == 0:
    base.save_pretrained(out + "/base")
model = dorakit.inject_adapters(base, dorakit.DoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
ids = torch.randint(0, 64, (32, 12), generator=torch.Generator().manual_seed(1))
args = TrainingArguments(output_dir=out, max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2, save_steps=4,
                         report_to="none", logging_steps=1, use_cpu=True)  # on CPUs, DDP needs use_cpu
trainer = Trainer(model=model, args=args, train_dataset=[{"input_ids": x, "labels": x} for x in ids])
trainer.train()
assert trainer.args.world_size == 2
model.eval()
with torch.no_grad():
    logits = model(ids[:2]).logits
torch.save(logits, f"{out}/logits-{os.environ['RANK']}.pt")
"""


@pytest.mark.slow
def test_trainer_under_accelerate_ddp_saves_one_adapter_that_reloads(tmp_path):
    pytest.importorskip("accelerate")
    script = tmp_path / "train.py"
    script.write_text(DDP_SCRIPT)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", str(script),
           str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    checkpoint = tmp_path / "checkpoint-4"
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(checkpoint))
    assert "model.safetensors" not in os.listdir(checkpoint)
    from transformers import LlamaForCausalLM

    ranks = [torch.load(tmp_path / f"logits-{r}.pt") for r in (0, 1)]
    assert rel_err(ranks[1], ranks[0]) < 1e-6  # DDP kept the replicas equal
    reloaded = dorakit.load_adapter(LlamaForCausalLM.from_pretrained(tmp_path / "base"), checkpoint).eval()
    ids = torch.randint(0, 64, (32, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert rel_err(reloaded(ids[:2]).logits, ranks[0]) < 1e-5
