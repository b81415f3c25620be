"""Per-process memory under FSDP2 with 1 and 2 (or more) processes: are the base weights sharded?

    python -m benchmarks.distributed                  # launches torchrun --nproc_per_node 1, then 2
    python -m benchmarks.distributed --processes 1 2 4

Each process builds the same random LLaMA (hidden 1024, intermediate 2752, 8 layers, vocab 8000;
~140M parameters, 535 MiB in fp32), adds DoRA r=16 to every projection, shards it with dorakit's
``--strategy fsdp`` wrapping (``dorakit.train.distributed.wrap``), and runs training steps on its
share of a global batch of 4 x 128 tokens. Reported per process: the bytes of parameters it holds
(frozen base and trainable adapter, local shards), its resident memory after sharding, and the
peak resident memory during the steps (sampled every millisecond). glibc is told to return freed
blocks to the system (MALLOC_MMAP_THRESHOLD_), so that resident memory shows what is held.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch

from .common import PeakRSS, environment, rss_mb, write_result

SEQ, GLOBAL_BATCH, R = 128, 4, 16


def local_bytes(tensors) -> int:
    return sum((t.to_local() if hasattr(t, "to_local") else t).numel() * t.element_size() for t in tensors)


def child(steps: int) -> dict:
    import gc

    from transformers import LlamaConfig, LlamaForCausalLM

    import dorakit
    from dorakit.train.distributed import TrainStep, init_distributed, wrap

    run = init_distributed("fsdp")
    torch.manual_seed(0)  # every process builds the same model: FSDP shards each process's own copy
    config = LlamaConfig(hidden_size=1024, intermediate_size=2752, num_hidden_layers=8, num_attention_heads=16,
                         num_key_value_heads=16, vocab_size=8000, max_position_embeddings=SEQ)
    model = dorakit.inject_adapters(LlamaForCausalLM(config), dorakit.DoraConfig(r=R, lora_alpha=2 * R,
                                                                                  target_modules="all-linear"))
    built = rss_mb()
    wrapped = wrap(TrainStep(model, "causal-lm", True), run, None)
    gc.collect()
    frozen = local_bytes(p for p in wrapped.parameters() if not p.requires_grad)
    trainable = local_bytes(p for p in wrapped.parameters() if p.requires_grad)
    sharded = rss_mb()
    optimizer = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, 8000, (GLOBAL_BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    mine = ids[run.rank :: run.world]
    batch = {"input_ids": mine, "attention_mask": torch.ones_like(mine), "labels": mine}
    with PeakRSS() as probe:
        for _ in range(steps):
            (wrapped(**batch) * (run.world / (GLOBAL_BATCH * (SEQ - 1)))).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    result = {"rank": run.rank, "processes": run.world, "frozen_mb": frozen / 2**20, "trainable_mb": trainable / 2**20,
              "rss_built_mb": built, "rss_sharded_mb": sharded, "peak_steps_mb": probe.peak_mb}
    gathered = run.gather(result)
    run.close()
    return gathered


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        gathered = child(args.steps)
        if int(os.environ.get("RANK", "0")) == 0:
            print(json.dumps(gathered))
        return
    results = []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": str(2**20)}
    for n in args.processes:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
               "-m", "benchmarks.distributed", "--child", "--steps", str(args.steps)]
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
        per_process = json.loads(done.stdout.strip().splitlines()[-1])
        results.append({"processes": n, "per_process": per_process})
        for p in per_process:
            print(f"{n} process(es), rank {p['rank']}: parameters held {p['frozen_mb']:.0f} MiB frozen + "
                  f"{p['trainable_mb']:.1f} MiB trainable; resident after sharding {p['rss_sharded_mb']:.0f} MiB "
                  f"(built {p['rss_built_mb']:.0f}), peak during steps {p['peak_steps_mb']:.0f} MiB", flush=True)
    write_result("distributed_fsdp", {
        "benchmark": "distributed", "strategy": "fsdp", "model": "llama-random hidden 1024 x 8 layers",
        "r": R, "global_batch": f"{GLOBAL_BATCH}x{SEQ}", "steps": args.steps,
        "environment": environment(1, torch.float32), "results": results,
    })


if __name__ == "__main__":
    main()
