"""dorakit in one screen: adapt a model, train a few steps, merge exactly, unmerge exactly.

Run:  .venv/bin/python examples/quickstart.py
(a tiny LLaMA built from a config, so nothing is downloaded)
"""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import dorakit

torch.manual_seed(0)
config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=256, max_position_embeddings=128)
model = LlamaForCausalLM(config)
ids = torch.randint(0, 256, (4, 32))
with torch.no_grad():
    base_logits = model(ids).logits

cfg = dorakit.DoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear")
model = dorakit.inject_adapters(model, cfg)
dorakit.print_trainable_parameters(model)

optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
model.train()
for step in range(20):
    loss = model(ids, labels=ids).loss  # memorise the batch
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    if step % 5 == 0 or step == 19:
        print(f"step {step:2d}  loss {loss.item():.4f}")

model.eval()
with torch.no_grad():
    adapted = model(ids).logits
    with dorakit.disable_adapters(model):
        print("disabled == base:", torch.allclose(model(ids).logits, base_logits, atol=1e-5))
    for _, layer in dorakit.adapter_layers(model):
        layer.merge()
    merged = model(ids).logits
    print(f"merged vs unmerged logits, max abs diff: {(merged - adapted).abs().max().item():.2e}")
    for _, layer in dorakit.adapter_layers(model):
        layer.unmerge()
    restored = dorakit.unload(model)
    print(f"after unmerge + unload, max abs diff to the base logits: "
          f"{(restored(ids).logits - base_logits).abs().max().item():.2e}")
