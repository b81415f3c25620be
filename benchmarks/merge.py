"""Merging one very wide layer (4096 x 14336, LLaMA-3-8B's down_proj shape): time and peak memory.

    python -m benchmarks.merge

Each (implementation, dtype) runs in its own process: wrap a Linear(14336 -> 4096) with a DoRA
adapter (r=16, non-zero B), then time ``merge()`` and ``unmerge()`` and sample the resident set
size during each. dorakit merges in row chunks of at most 64 MiB; PEFT builds [out, in]
temporaries (the update B@A and the weight plus update).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch
from torch import nn

import dorakit

from .common import PeakRSS, environment, write_result

OUT, IN, R = 4096, 14336, 16
IMPLS = ("dorakit", "peft")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def child(impl: str, dtype_name: str) -> dict:
    torch.manual_seed(0)
    dtype = DTYPES[dtype_name]
    model = nn.Sequential(nn.Linear(IN, OUT, bias=False, dtype=dtype))
    if impl == "dorakit":
        dorakit.inject_adapters(model, dorakit.DoraConfig(r=R, lora_alpha=2 * R, target_modules=["0"]))
        layer = model[0]
        b = layer.lora_B.weight
    else:
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=R, lora_alpha=2 * R, target_modules=["0"], use_dora=True))
        layer = model.base_model.model[0]
        b = layer.lora_B["default"].weight
    with torch.no_grad():
        b.normal_(0, 0.01)
    weight = layer.base_layer.weight
    original = weight.detach().clone()
    with PeakRSS() as merge_mem:
        start = time.perf_counter()
        layer.merge()
        merge_s = time.perf_counter() - start
    with PeakRSS() as unmerge_mem:
        start = time.perf_counter()
        layer.unmerge()
        unmerge_s = time.perf_counter() - start
    error = ((weight.detach().double() - original.double()).norm() / original.double().norm()).item()
    return {"merge_s": merge_s, "merge_peak_increase_mb": merge_mem.increase_mb,
            "unmerge_s": unmerge_s, "unmerge_peak_increase_mb": unmerge_mem.increase_mb,
            "unmerge_relative_error": error, "weight_mb": original.numel() * original.element_size() / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", nargs=2, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    results = {}
    for dtype_name in DTYPES:
        for impl in IMPLS:
            cmd = [sys.executable, "-m", "benchmarks.merge", "--threads", str(args.threads), "--child", impl, dtype_name]
            done = subprocess.run(cmd, capture_output=True, text=True, check=True)
            results[f"{impl}_{dtype_name}"] = row = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"{impl} {dtype_name}: merge {row['merge_s']:.2f} s (+{row['merge_peak_increase_mb']:.0f} MB), "
                  f"unmerge {row['unmerge_s']:.2f} s (+{row['unmerge_peak_increase_mb']:.0f} MB), "
                  f"restored to {row['unmerge_relative_error']:.1e}")
    write_result("merge", {"benchmark": "merge", "layer": f"{OUT}x{IN}", "r": R,
                           "environment": environment(args.threads, torch.float32), "results": results})


if __name__ == "__main__":
    main()
