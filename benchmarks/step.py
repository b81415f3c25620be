"""Training-step time: dorakit DoRA / LoRA against PEFT DoRA / LoRA and PEFT DoRA under
dorakit.patch_peft(), interleaved in one process.

    python -m benchmarks.step --model llama-random            # issue 4, configuration 1
    python -m benchmarks.step --model smollm2                 # configuration 2 (needs `make assets`)

One step = forward, causal-LM loss, backward, AdamW step, zero_grad. All models start from the
same base weights; the PEFT DoRA model's adapter values are copied into dorakit's DoRA model and
the patched PEFT DoRA model, and the first losses compared, so a speed-up can never come from
computing something else.
"""

from __future__ import annotations

import argparse

import torch

from .common import (METHODS, SPECS, build_base, build_methods, environment, interleaved, parse_batches, patched, summarise,
                     write_result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(SPECS), default="llama-random")
    parser.add_argument("--rounds", type=int, default=7, help="timed steps per method (medians reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per method first")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", default=None, help="e.g. 4x256,1x128 (default: the model's)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    spec = SPECS[args.model]
    batches = parse_batches(args.batches, spec)

    base = build_base(spec)
    models = build_methods(base, spec)
    optimizers = {
        m: torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4) for m, model in models.items()
    }
    results = []
    for batch, seq in batches:
        ids = torch.randint(0, spec.vocab, (batch, seq), generator=torch.Generator().manual_seed(1))
        first = {}
        for m in ("peft_dora", "dorakit_dora", "peft_dora_patched"):
            with patched(m):
                first[m] = models[m](input_ids=ids, labels=ids).loss.item()
        if abs(first["peft_dora_patched"] - first["peft_dora"]) > 1e-4 * abs(first["peft_dora"]):
            raise SystemExit(f"PEFT DoRA under patch_peft computes another loss than PEFT DoRA: {first}")

        def step(method):
            def run():
                model = models[method]
                model.train()
                model(input_ids=ids, labels=ids).loss.backward()
                optimizers[method].step()
                optimizers[method].zero_grad(set_to_none=True)
            return run

        times = interleaved({m: step(m) for m in METHODS}, rounds=args.rounds, warmup=args.warmup)
        summary = summarise(times)
        results.append({"batch": batch, "seq_len": seq, "methods": summary,
                         "first_loss": first, "loss_rel_diff": abs(first["dorakit_dora"] - first["peft_dora"]) / abs(first["peft_dora"]),
                         "patched_loss_rel_diff": abs(first["peft_dora_patched"] - first["peft_dora"]) / abs(first["peft_dora"])})
        print(f"{args.model} {batch}x{seq}: " + ", ".join(
            f"{m} {s['median_ms']:.0f} ms ({s['ratio_to_peft_lora']:.3f}x)" for m, s in summary.items()))
    write_result(f"step_{args.model}", {
        "benchmark": "step", "model": args.model, "r": spec.r, "lora_alpha": spec.alpha, "targets": "q,k,v,o,gate,up,down",
        "environment": environment(args.threads, torch.float32), "rounds": args.rounds, "warmup": args.warmup,
        "results": results,
    })


if __name__ == "__main__":
    main()
