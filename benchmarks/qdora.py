"""QDoRA: training-step time and peak memory over a 4-bit base (SmolLM2-135M-Instruct, NF4 with
double quantization, loaded through transformers' BitsAndBytesConfig).

    python -m benchmarks.qdora                      # step time interleaved in one process, then memory
    python -m benchmarks.qdora --quant-type fp4 --batches 4x128

Methods over the same quantized base: dorakit_qdora, dorakit_qlora, peft_qdora, peft_qlora and
peft_qdora_patched (PEFT's QDoRA under dorakit.patch_peft()); ratios to peft_qlora, the cost QLoRA
users accept. PEFT's DoRA dequantizes each quantized weight whole on
every forward; dorakit's reads it a few rows at a time once per step for the norm and reuses the
quantized matmul's output. Step time: all four models in one process, interleaved rounds, medians.
Memory: each method in its own process (peak RSS on CPU, max_memory_allocated on CUDA).
"""

from __future__ import annotations

import argparse
import json

import torch

from .common import (TARGETS, environment, interleaved, memory_by_method, memory_line, patched, steps_memory,
                     summarise, train_step, write_result)

METHODS = ("dorakit_qdora", "dorakit_qlora", "peft_qdora", "peft_qlora", "peft_qdora_patched")
R, ALPHA = 8, 16


def load_quantized(quant_type: str):
    from dorakit.assets import smollm2_path
    from dorakit.integrations.transformers import load_pretrained
    from dorakit.integrations.bitsandbytes import Quantization

    # fp32 non-quantized parts and compute on CPU (bf16 is slower there); bf16 on GPUs.
    dtype = "bfloat16" if torch.cuda.is_available() else "float32"
    return load_pretrained(smollm2_path(), dtype, Quantization(4, quant_type, True))


def adapt(model, method: str):
    use_dora = "qdora" in method
    if method.startswith("dorakit"):
        import dorakit

        return dorakit.inject_adapters(model, dorakit.DoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS,
                                                                 use_dora=use_dora))
    import peft

    with patched(method):
        return peft.get_peft_model(model, peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS,
                                                          use_dora=use_dora))


def device_ids(batch: int, seq: int) -> torch.Tensor:
    ids = torch.randint(0, 49152, (batch, seq), generator=torch.Generator().manual_seed(1))
    return ids.cuda() if torch.cuda.is_available() else ids


def timing(args) -> list[dict]:
    import peft

    from dorakit.formats.keys import from_peft_key

    models = {m: adapt(load_quantized(args.quant_type), m) for m in METHODS}
    with torch.no_grad():  # a non-identity adapter, the same in both DoRA models
        for name, param in models["peft_qdora"].named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.01)
    peft_state = peft.get_peft_model_state_dict(models["peft_qdora"])
    models["dorakit_qdora"].load_state_dict({from_peft_key(k): v for k, v in peft_state.items()}, strict=False)
    loaded = peft.set_peft_model_state_dict(models["peft_qdora_patched"], peft_state)
    assert not loaded.unexpected_keys, loaded.unexpected_keys
    optimizers = {m: torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
                  for m, model in models.items()}
    results = []
    for batch, seq in args.batches:
        ids = device_ids(batch, seq)
        for model in models.values():
            model.train()
        first = {}
        with torch.no_grad():
            for m in ("peft_qdora", "dorakit_qdora", "peft_qdora_patched"):
                with patched(m):
                    first[m] = models[m](input_ids=ids, labels=ids).loss.item()
        times = interleaved({m: train_step(models[m], optimizers[m], ids) for m in METHODS}, args.rounds, args.warmup)
        summary = summarise(times, reference="peft_qlora")
        results.append({"batch": batch, "seq_len": seq, "methods": summary, "first_loss": first,
                        "loss_rel_diff": abs(first["dorakit_qdora"] - first["peft_qdora"]) / abs(first["peft_qdora"]),
                        "patched_loss_rel_diff": abs(first["peft_qdora_patched"] - first["peft_qdora"]) / abs(first["peft_qdora"])})
        print(f"step {batch}x{seq}: " + ", ".join(
            f"{m} {s['median_ms']:.0f} ms ({s['ratio_to_peft_qlora']:.3f}x)" for m, s in summary.items()), flush=True)
    return results


def child(method: str, args) -> dict:
    torch.set_num_threads(args.threads)
    batch, seq = args.batches[0]
    model = adapt(load_quantized(args.quant_type), method)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    with patched(method):
        return steps_memory(train_step(model, optimizer, device_ids(batch, seq)), args.steps)


def memory(args) -> list[dict]:
    results = []
    for batch, seq in args.batches:
        child_args = ["--quant-type", args.quant_type, "--batches", f"{batch}x{seq}", "--steps", str(args.steps),
                      "--threads", str(args.threads)]
        per_method = memory_by_method("benchmarks.qdora", child_args, METHODS, "peft_qlora")
        results.append({"batch": batch, "seq_len": seq, "methods": per_method})
        print(f"memory {batch}x{seq}: " + memory_line(per_method, "peft_qlora"), flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quant-type", choices=["nf4", "fp4"], default="nf4")
    parser.add_argument("--batches", default="8x128,1x128", help="e.g. 4x256,1x128")
    parser.add_argument("--rounds", type=int, default=7, help="timed steps per method (medians reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="steps per memory measurement")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.batches = [tuple(map(int, b.split("x"))) for b in args.batches.split(",")]
    if args.child:
        print(json.dumps(child(args.child, args)))
        return
    torch.set_num_threads(args.threads)
    import bitsandbytes

    steps = timing(args)
    peaks = memory(args)
    env = environment(args.threads, torch.bfloat16 if torch.cuda.is_available() else torch.float32)
    env["bitsandbytes"] = bitsandbytes.__version__
    write_result("qdora_smollm2", {
        "benchmark": "qdora", "model": "smollm2", "quantization": f"4bit {args.quant_type} double-quant", "r": R,
        "lora_alpha": ALPHA, "targets": "q,k,v,o,gate,up,down", "environment": env, "rounds": args.rounds,
        "warmup": args.warmup, "memory_steps": args.steps,
        "memory_measure": "cuda max_memory_allocated" if torch.cuda.is_available() else "RSS sampled every ms during the steps",
        "step": steps, "memory": peaks,
    })


if __name__ == "__main__":
    main()
