"""Peak memory of a training step per method, each method in its own process.

    python -m benchmarks.memory --model llama-random
    python -m benchmarks.memory --model smollm2 --batches 8x128

On CPU the peak resident set size (ru_maxrss) is reported, whole and as the increase over the
resident size just before the first step (activations, gradients, optimizer states: the part the
method decides). On CUDA, torch.cuda.max_memory_allocated. Ratios are to peft_lora.
"""

from __future__ import annotations

import argparse
import json
import resource

import torch

from .common import (METHODS, SPECS, adapt, build_base, environment, memory_by_method, memory_line, parse_batches, patched,
                     rss_mb, write_result)


def child(method: str, model_name: str, batch: int, seq: int, steps: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    spec = SPECS[model_name]
    model = adapt(build_base(spec), method, spec, in_place=True)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, spec.vocab, (batch, seq), generator=torch.Generator().manual_seed(1))
    cuda = torch.cuda.is_available()
    if cuda:
        model.cuda()
        ids = ids.cuda()
        torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() / 2**20 if cuda else rss_mb()
    with patched(method):
        for _ in range(steps):
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"before_mb": before, "peak_mb": peak, "increase_mb": peak - before}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(SPECS), default="llama-random")
    parser.add_argument("--batches", default=None, help="e.g. 4x256,1x128 (default: the model's)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    spec = SPECS[args.model]
    batches = parse_batches(args.batches, spec)
    if args.child:
        batch, seq = batches[0]
        print(json.dumps(child(args.child, args.model, batch, seq, args.steps, args.threads)))
        return
    results = []
    for batch, seq in batches:
        child_args = ["--model", args.model, "--batches", f"{batch}x{seq}", "--steps", str(args.steps),
                      "--threads", str(args.threads)]
        per_method = memory_by_method("benchmarks.memory", child_args, METHODS, "peft_lora")
        results.append({"batch": batch, "seq_len": seq, "methods": per_method})
        print(f"{args.model} {batch}x{seq}: " + memory_line(per_method, "peft_lora"))
    write_result(f"memory_{args.model}", {
        "benchmark": "memory", "model": args.model, "r": spec.r, "lora_alpha": spec.alpha, "steps": args.steps,
        "measure": "cuda max_memory_allocated" if torch.cuda.is_available() else "peak RSS (ru_maxrss)",
        "environment": environment(args.threads, torch.float32), "results": results,
    })


if __name__ == "__main__":
    main()
