"""Unmerged inference: forward time in eval mode under no_grad, interleaved in one process.

    python -m benchmarks.inference --model llama-random
    python -m benchmarks.inference --model smollm2

Methods: the adapted models unmerged (PEFT DoRA also under dorakit.patch_peft()), PEFT DoRA with its opt-in cache
(peft.tuners.lora.dora.ENABLE_DORA_CACHING), and the merged model (dorakit.merge_and_unload),
whose cost is the base model's. Ratios are to peft_lora.
"""

from __future__ import annotations

import argparse
import copy

import torch

import dorakit

from .common import (METHODS, SPECS, build_base, build_methods, environment, interleaved, parse_batches, patched, summarise,
                     write_result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(SPECS), default="llama-random")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    spec = SPECS[args.model]
    batches = parse_batches(args.batches, spec)
    import peft.tuners.lora.dora as peft_dora_module

    base = build_base(spec)
    models = {m: model.eval() for m, model in build_methods(base, spec).items()}
    merged = dorakit.merge_and_unload(copy.deepcopy(models["dorakit_dora"])).eval()
    # A separate copy: PEFT clears its DoRA cache whenever a forward runs with caching off.
    peft_cached = copy.deepcopy(models["peft_dora"]).eval()
    results = []
    for batch, seq in batches:
        ids = torch.randint(0, spec.vocab, (batch, seq), generator=torch.Generator().manual_seed(1))

        def forward(model, cached=False):
            def run():
                peft_dora_module.ENABLE_DORA_CACHING = cached
                try:
                    with torch.no_grad():
                        return model(input_ids=ids).logits
                finally:
                    peft_dora_module.ENABLE_DORA_CACHING = False
            return run

        runs = {m: forward(models[m]) for m in METHODS}
        runs["peft_dora_cached"] = forward(peft_cached, cached=True)
        runs["dorakit_dora_merged"] = forward(merged)
        with torch.no_grad():
            ref = runs["peft_dora"]()
            diff = (runs["dorakit_dora"]() - ref).norm() / ref.norm()
            merged_diff = (runs["dorakit_dora_merged"]() - ref).norm() / ref.norm()
            with patched("peft_dora_patched"):
                patched_diff = (runs["peft_dora_patched"]() - ref).norm() / ref.norm()
        times = interleaved(runs, rounds=args.rounds, warmup=args.warmup)
        summary = summarise(times)
        results.append({"batch": batch, "seq_len": seq, "methods": summary,
                        "logits_rel_diff_vs_peft_dora": diff.item(), "merged_logits_rel_diff": merged_diff.item(),
                        "patched_logits_rel_diff": patched_diff.item()})
        print(f"{args.model} {batch}x{seq}: " + ", ".join(
            f"{m} {s['median_ms']:.1f} ms ({s['ratio_to_peft_lora']:.3f}x)" for m, s in summary.items()))
    write_result(f"inference_{args.model}", {
        "benchmark": "inference", "model": args.model, "r": spec.r, "lora_alpha": spec.alpha,
        "environment": environment(args.threads, torch.float32), "rounds": args.rounds, "results": results,
    })


if __name__ == "__main__":
    main()
