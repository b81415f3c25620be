"""DoRA on mixture-of-experts stacks: training-step time and peak memory, expert DoRA against expert LoRA.

    python -m benchmarks.experts                       # step time interleaved in one process, then memory
    python -m benchmarks.experts --batches 8x256 --rounds 25

A random model of Qwen3-MoE's shape, scaled down (hidden 512 and expert width 192 in Qwen3-30B-A3B's
ratio 2048:768, 32 experts with top-4 routing, 4 layers), adapted on its expert stacks only
(target_parameters experts.gate_up_proj and experts.down_proj, r=16, alpha=32). Methods: dorakit_dora, dorakit_lora, peft_lora. PEFT refuses DoRA
on expert parameters (its ParamWrapper raises for use_dora=True), so there is no peft_dora; the
benchmark records PEFT's message. The goal (issue 17): dorakit's expert DoRA within 1.05x of its
expert LoRA. PEFT's LoRA folds W + s B A into a full [E, out, in] copy of each stack every forward;
dorakit's runs the experts on their routed tokens with the adapter beside the base matmul.

dorakit's LoRA gets the PEFT LoRA model's (non-identity) adapter values and the first losses are
compared, so a speed-up never comes from computing something else. Step time: all models in one
process, interleaved rounds, medians of the wall clock and of this process's CPU time. Memory: each method in its own process (RSS sampled during the
steps on CPU, max_memory_allocated on CUDA), peak and increase over the size before the first step.

What DoRA adds to LoRA here: the norm, once per optimizer step (E * r * out * in multiply-adds per stack,
against about 3 * tokens * top_k * out * in for the step's expert matmuls, so its share falls as the
tokens per step grow), and per expert two element-wise passes in backward over its [tokens, out] output,
whose base part is kept for the magnitude's gradient (as in every DoRA implementation).
"""

from __future__ import annotations

import argparse
import copy
import json

import torch

import dorakit

from .common import environment, interleaved, memory_by_method, memory_line, steps_memory, summarise, train_step, write_result

METHODS = ("dorakit_dora", "dorakit_lora", "peft_lora")
TARGET_PARAMETERS = ["experts.gate_up_proj", "experts.down_proj"]
R, ALPHA, VOCAB = 16, 32, 4000
SHAPE = dict(hidden_size=512, moe_intermediate_size=192, intermediate_size=1024, num_experts=32, num_experts_per_tok=4,
             num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4, head_dim=64, vocab_size=VOCAB,
             max_position_embeddings=512, tie_word_embeddings=False)


def build_base() -> torch.nn.Module:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**SHAPE))
    with torch.no_grad():  # transformers leaves expert stacks at small random values; give them a real spread
        for name, param in model.named_parameters():
            if param.dim() == 3:
                param.normal_(0, 0.02)
    return model


def adapt(base: torch.nn.Module, method: str, *, in_place: bool = False) -> torch.nn.Module:
    model = base if in_place else copy.deepcopy(base)
    if method.startswith("dorakit"):
        cfg = dorakit.DoraConfig(r=R, lora_alpha=ALPHA, target_parameters=TARGET_PARAMETERS,
                                 use_dora=method.endswith("dora"))
        return dorakit.inject_adapters(model, cfg)
    import peft

    cfg = peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=[], target_parameters=TARGET_PARAMETERS,
                          use_dora=method.endswith("dora"))
    return peft.get_peft_model(model, cfg)


def peft_refusal(base: torch.nn.Module) -> str:
    """What PEFT says when asked for DoRA on the expert stacks."""
    try:
        adapt(base, "peft_dora")
    except ValueError as err:
        return str(err)
    return "accepted"


def build_methods(base: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The methods on copies of ``base``; PEFT's LoRA gets non-zero B and dorakit's LoRA its values."""
    import peft

    from dorakit.formats.keys import from_peft_key

    models = {method: adapt(base, method) for method in METHODS}
    with torch.no_grad():
        for name, param in models["peft_lora"].named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.01)
    state = {from_peft_key(k): v for k, v in peft.get_peft_model_state_dict(models["peft_lora"]).items()}
    models["dorakit_lora"].load_state_dict(state, strict=False)
    return models


def child(method: str, batch: int, seq: int, steps: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    model = adapt(build_base(), method, in_place=True)
    ids = torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(1))
    if torch.cuda.is_available():
        model.cuda()
        ids = ids.cuda()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return steps_memory(train_step(model, optimizer, ids), steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="8x256,2x256", help="e.g. 8x256,2x256")
    parser.add_argument("--rounds", type=int, default=15, help="timed steps per method (medians reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per method first")
    parser.add_argument("--steps", type=int, default=3, help="steps per method in the memory runs")
    parser.add_argument("--threads", type=int, default=1, help="1 on a shared CPU: OpenMP threads that wait for "
                        "a core spin and distort the timings")
    parser.add_argument("--no-memory", action="store_true", help="step time only")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    batches = [tuple(map(int, b.split("x"))) for b in args.batches.split(",")]
    if args.child:
        print(json.dumps(child(args.child, *batches[0], args.steps, args.threads)))
        return
    torch.set_num_threads(args.threads)
    base = build_base()
    refusal = peft_refusal(base)
    models = build_methods(base)
    optimizers = {m: torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
                  for m, model in models.items()}
    results = []
    for batch, seq in batches:
        ids = torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(1))
        first = {m: models[m](input_ids=ids, labels=ids).loss.item() for m in ("peft_lora", "dorakit_lora")}
        cpu: dict[str, list[float]] = {}
        times = interleaved({m: train_step(models[m], optimizers[m], ids) for m in METHODS}, args.rounds, args.warmup,
                            cpu=cpu)
        summary = summarise(times, "peft_lora")
        cpu_summary = summarise(cpu, "dorakit_lora")
        for name, stats in summarise(times, "dorakit_lora").items():
            summary[name]["ratio_to_dorakit_lora"] = stats["ratio_to_dorakit_lora"]
            summary[name]["cpu_median_ms"] = cpu_summary[name]["median_ms"]
            summary[name]["cpu_ratio_to_dorakit_lora"] = cpu_summary[name]["ratio_to_dorakit_lora"]
        entry = {"batch": batch, "seq_len": seq, "methods": summary, "first_loss": first,
                 "loss_rel_diff": abs(first["dorakit_lora"] - first["peft_lora"]) / abs(first["peft_lora"])}
        if not args.no_memory:
            child_args = ["--batches", f"{batch}x{seq}", "--steps", str(args.steps), "--threads", str(args.threads)]
            entry["memory"] = memory_by_method("benchmarks.experts", child_args, METHODS, "dorakit_lora")
        results.append(entry)
        print(f"experts {batch}x{seq}: " + ", ".join(
            f"{m} {s['median_ms']:.0f} ms ({s['ratio_to_dorakit_lora']:.3f}x dorakit LoRA, "
            f"{s['ratio_to_peft_lora']:.3f}x PEFT LoRA; CPU time {s['cpu_ratio_to_dorakit_lora']:.3f}x dorakit LoRA)"
            for m, s in summary.items()))
        if "memory" in entry:
            print("    memory: " + memory_line(entry["memory"], "dorakit_lora"))
    write_result("experts_qwen3moe-random", {
        "benchmark": "experts", "model": "qwen3moe-random", "shape": SHAPE, "r": R, "lora_alpha": ALPHA,
        "target_parameters": TARGET_PARAMETERS, "peft_dora": refusal,
        "environment": environment(args.threads, torch.float32), "rounds": args.rounds, "warmup": args.warmup,
        "steps": args.steps, "results": results,
    })


if __name__ == "__main__":
    main()
