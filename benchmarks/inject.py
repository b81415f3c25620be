"""Adapter injection time on SmolLM2-135M (210 target layers), dorakit against PEFT.

    python -m benchmarks.inject --model smollm2

Each run adapts a fresh copy of the base model (the copy is not timed). DoRA's injection includes
the magnitude initialisation (the row norms of every targeted weight); PEFT computes them through
an identity matrix of size in_features.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from .common import METHODS, SPECS, adapt, build_base, environment, summarise, write_result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(SPECS), default="smollm2")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    spec = SPECS[args.model]
    base = build_base(spec)
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    for _ in range(args.rounds):
        for method in METHODS:  # interleaved; the deep copy is outside the timed region
            fresh = copy.deepcopy(base)
            start = time.perf_counter()
            adapt(fresh, method, spec, in_place=True)
            times[method].append(time.perf_counter() - start)
            del fresh
    summary = summarise(times)
    print(f"{args.model} injection: " + ", ".join(
        f"{m} {s['median_ms']:.0f} ms ({s['ratio_to_peft_lora']:.2f}x)" for m, s in summary.items()))
    write_result(f"inject_{args.model}", {"benchmark": "inject", "model": args.model, "r": spec.r,
                                          "environment": environment(args.threads, torch.float32),
                                          "rounds": args.rounds, "methods": summary})


if __name__ == "__main__":
    main()
