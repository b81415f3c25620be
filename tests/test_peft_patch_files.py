"""dorakit.patch_peft() in the stacks that reach DoRA through PEFT (issue 15): adapter files both ways,
training with fused AdamW (the Trainer/TRL default), TRL's SFTTrainer(peft_config=...) and a diffusers
UNet with add_adapter / load_lora_adapter.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import dorakit

from .conftest import output_of, rel_err, tiny_llama
from .test_peft_patch import LLAMA_IDS, LLAMA_TARGETS, assert_parity, covered_layers, peft_dora, unpatched  # noqa: F401

peft = pytest.importorskip("peft")

TOL = 1e-5


def test_saved_under_the_patch_loads_in_unpatched_peft_and_the_reverse(tmp_path):
    base = tiny_llama()
    with dorakit.patch_peft():
        ours = peft_dora(lambda: copy.deepcopy(base), LLAMA_TARGETS)
        with torch.no_grad():
            ours_logits = output_of(ours, LLAMA_IDS)
        ours.save_pretrained(tmp_path / "patched")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "patched")
    with torch.no_grad():
        assert rel_err(output_of(theirs, LLAMA_IDS), ours_logits) < TOL
    # The reverse: saved by unpatched PEFT, loaded under the patch (PeftModel.from_pretrained and load_adapter).
    trained = peft_dora(lambda: copy.deepcopy(base), LLAMA_TARGETS, seed=9)
    with torch.no_grad():
        peft_logits = output_of(trained, LLAMA_IDS)
    trained.save_pretrained(tmp_path / "unpatched")
    with dorakit.patch_peft():
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "unpatched")
        assert len(covered_layers(loaded)) == 15
        loaded.load_adapter(tmp_path / "patched", adapter_name="other", low_cpu_mem_usage=True)  # meta first
        with torch.no_grad():
            assert rel_err(output_of(loaded, LLAMA_IDS), peft_logits) < TOL
            loaded.set_adapter("other")
            assert rel_err(output_of(loaded, LLAMA_IDS), ours_logits) < TOL


def test_the_file_is_the_one_peft_writes(tmp_path):
    from safetensors.torch import load_file

    base = tiny_llama()
    model = peft_dora(lambda: copy.deepcopy(base), LLAMA_TARGETS)
    model.save_pretrained(tmp_path / "unpatched")
    with dorakit.patch_peft():
        model.save_pretrained(tmp_path / "patched")
    a, b = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("unpatched", "patched"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "unpatched" / "adapter_config.json").read_text() == (
        tmp_path / "patched" / "adapter_config.json").read_text()


def train_losses(model, steps: int, accumulation: int = 2) -> list[float]:
    """Fused AdamW, gradient accumulation, dropout on: the Trainer's defaults where they matter here."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2, fused=True)
    model.train()
    losses = []
    batches = [torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(m)) for m in range(accumulation)]
    for step in range(steps):
        for micro, ids in enumerate(batches):  # the same batches each step: the loss must fall
            torch.manual_seed(step * 10 + micro)  # the same dropout masks for both models
            loss = model(input_ids=ids, labels=ids).loss / accumulation
            loss.backward()
            losses.append(loss.item())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return losses


def test_fused_adamw_trains_the_patched_model_to_peft_losses():
    model = peft_dora(tiny_llama, LLAMA_TARGETS, lora_dropout=0.1)
    reference = copy.deepcopy(model)
    expected = train_losses(reference, steps=6)
    with dorakit.patch_peft():
        got = train_losses(model, steps=6)
    assert expected[-1] < expected[0] - 0.05  # it trains
    for a, b in zip(got, expected):
        assert abs(a - b) < 1e-5 * abs(b), (got, expected)


def test_trl_sft_trainer_with_peft_config(tmp_path):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from transformers import LlamaConfig, LlamaForCausalLM

    from .train_assets import colour_records, make_tokenizer

    tok = make_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tok),
                                         pad_token_id=tok.pad_token_id, tie_word_embeddings=False))
    base = copy.deepcopy(model)  # TRL wraps `model` itself
    data = datasets.Dataset.from_list([{"text": f"{r['text']} : {r['label']}"} for r in colour_records(16)])
    args = trl.SFTConfig(output_dir=str(tmp_path / "run"), max_steps=3, per_device_train_batch_size=4,
                         gradient_accumulation_steps=2, learning_rate=1e-2, logging_steps=1, report_to="none",
                         save_strategy="no", max_length=32, use_cpu=True, dataloader_num_workers=0,
                         bf16=False)  # fp32, so that the reloaded adapter can be compared to fp32 rounding
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True,
                             task_type="CAUSAL_LM")
    with dorakit.patch_peft(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = trl.SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok,
                                 peft_config=config)
        assert isinstance(trainer.model, peft.PeftModel)
        assert len(covered_layers(trainer.model)) == 6
        result = trainer.train()
        trainer.save_model(str(tmp_path / "adapter"))
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    # What TRL saved loads in unpatched PEFT and computes what the trained model computes.
    ids = torch.tensor([tok("red sky : warm")["input_ids"]])
    with dorakit.patch_peft(), torch.no_grad():
        trained = output_of(trainer.model.eval(), ids)
    reloaded = peft.PeftModel.from_pretrained(base, tmp_path / "adapter")
    with torch.no_grad():
        assert rel_err(output_of(reloaded, ids), trained) < TOL


def tiny_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=8,
    ).eval()


def unet_inputs():
    gen = torch.Generator().manual_seed(1)
    return (torch.randn(2, 4, 8, 8, generator=gen), torch.tensor([3, 7]), torch.randn(2, 5, 16, generator=gen))


def test_diffusers_unet_add_adapter_and_load_lora_adapter(tmp_path):
    pytest.importorskip("diffusers")
    sample, timestep, text = unet_inputs()
    config = peft.LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", use_dora=True,
                             target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "proj_in"])
    unet = tiny_unet()
    with dorakit.patch_peft():
        unet.add_adapter(config)
        assert len(covered_layers(unet)) >= 20
        with torch.no_grad():
            for name, p in unet.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    out = lambda m: m(sample, timestep, encoder_hidden_states=text).sample  # noqa: E731
    with torch.no_grad():
        expected = out(unet)
    with dorakit.patch_peft():
        with torch.no_grad():
            assert rel_err(out(unet), expected) < TOL
        unet.train()
        loss = out(unet).square().mean()
        loss.backward()
        assert all(p.grad is not None for n, p in unet.named_parameters() if "magnitude" in n)
        unet.zero_grad()
        unet.eval()
        unet.save_lora_adapter(tmp_path / "unet_lora")
        fresh = tiny_unet()
        fresh.load_lora_adapter(tmp_path / "unet_lora", weight_name="pytorch_lora_weights.safetensors",
                                prefix=None, adapter_name="default")
        assert len(covered_layers(fresh)) == len(covered_layers(unet))
        with torch.no_grad():
            assert rel_err(out(fresh), expected) < TOL
