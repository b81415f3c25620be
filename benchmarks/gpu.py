"""GPU benchmark (issue 18): training step, unmerged inference and peak memory, bf16, on a CUDA device.

    make bench-gpu                                  # = python -m benchmarks.gpu && python -m benchmarks.report
    python -m benchmarks.gpu --models llama-1b      # a smaller grid (e.g. a GPU under 80 GB)
    python -m benchmarks.gpu --profile              # also torch.profiler tables of one step (results/gpu_profile.txt)
    python -m benchmarks.gpu --dry-run --out DIR    # the whole logic on the CPU with a tiny model (tests)

Grid: random LLaMA-shaped models (Llama-3.2-1B's and Llama-3.1-8B's shapes, all 7 projections adapted,
alpha = 2r) x r 16 and 64 x batches 1x2048 and 8x512. Arms (``gpu_arms.ARMS``): dorakit DoRA eager,
with the Triton kernels, and compiled (regional torch.compile), dorakit LoRA, PEFT DoRA, PEFT LoRA,
all over the same frozen base tensors, fused AdamW, timed interleaved in a shuffled order per round
(medians; ratios to PEFT LoRA). Peak memory per arm = base + its own parameters and optimizer states
+ the largest rise of torch.cuda.max_memory_allocated over a step. The first losses of the DoRA arms
(same adapter values) are compared, so a speed-up cannot come from computing something else.

Unattended in under 8 minutes: a wall-clock budget (--budget-s) is checked before every model, cell
and compilation; whatever would not fit is skipped and recorded as skipped, loudly, never dropped.
Without CUDA it stops at once (exit 2) unless --dry-run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from . import gpu_arms
from .common import RESULTS, environment, interleaved, summarise

START = time.monotonic()
FULL = dict(models="llama-1b,llama-8b", ranks="16,64", batches="1x2048,8x512", rounds=5, warmup=1)
DRY = dict(models="tiny", ranks="4,8", batches="1x16,2x8", rounds=2, warmup=0)
FIRST_CELL_GUESS_S, COMPILE_GUESS_S, BUILD_GUESS_S = 60.0, 90.0, 30.0


class Budget:
    """The wall clock left, and the estimates that decide what still fits."""

    def __init__(self, seconds: float, dry_run: bool) -> None:
        self.deadline = START + seconds
        self.scale = 0.0 if dry_run else 1.0  # a dry run checks the logic, not the clock
        self.compile_s = COMPILE_GUESS_S

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def fits(self, estimate_s: float) -> bool:
        return self.left() > 1.3 * self.scale * estimate_s


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="tiny model on the CPU: check the script, measure nothing")
    parser.add_argument("--out", type=Path, default=None, help="directory for the JSON (default benchmarks/results; "
                        "required with --dry-run, which never writes there)")
    parser.add_argument("--models", default=None, help=f"comma-separated, of {', '.join(gpu_arms.SHAPES)}")
    parser.add_argument("--ranks", default=None, help="comma-separated adapter ranks")
    parser.add_argument("--batches", default=None, help="comma-separated BATCHxSEQ")
    parser.add_argument("--arms", default=",".join(gpu_arms.ARMS), help="comma-separated, of the default")
    parser.add_argument("--rounds", type=int, default=None, help="timed runs per arm and measure")
    parser.add_argument("--warmup", type=int, default=None, help="untimed runs per arm after the first step")
    parser.add_argument("--budget-s", type=float, default=420.0, help="wall-clock budget of the whole run")
    parser.add_argument("--compile-backend", default=None, help="torch.compile backend (default inductor; "
                        "eager, dynamo alone, in a dry run)")
    parser.add_argument("--compiled-inference", action="store_true", help="time the compiled arm's inference too "
                        "(one more compilation per configuration)")
    parser.add_argument("--profile", action="store_true", help="profile one step of dorakit DoRA and PEFT LoRA too")
    args = parser.parse_args(argv)
    defaults = DRY if args.dry_run else FULL
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.compile_backend = args.compile_backend or ("eager" if args.dry_run else "inductor")
    if args.dry_run and args.out is None:
        parser.error("--dry-run needs --out DIR (a dry run never writes benchmarks/results)")
    args.arms = args.arms.split(",")
    unknown = sorted(set(args.arms) - set(gpu_arms.ARMS)) + sorted(set(args.models.split(",")) - set(gpu_arms.SHAPES))
    if unknown or "peft_lora" not in args.arms:
        parser.error(f"unknown arms/models {unknown}; peft_lora (the reference of every ratio) must be among the arms")
    return args


def run_cell(arms: dict, ids: torch.Tensor, args, budget: Budget, cuda: bool) -> dict:
    """One (model, r, batch): a first step per arm (warm-up, compilation, out-of-memory check, the loss
    before any update: the DoRA arms' are compared), then interleaved timing of training steps and of
    inference forwards (the compiled arm's only with --compiled-inference)."""
    skipped, compile_s, losses = {}, None, {}
    live = {}
    for name, arm in arms.items():
        if arm.compiled and not budget.fits(budget.compile_s):
            skipped[name] = f"time budget ({budget.left():.0f} s left, compiling takes ~{budget.compile_s:.0f} s)"
            continue
        started = time.monotonic()
        try:
            losses[name] = gpu_arms.train_step(arm, ids).float().item()  # the loss before the update
            if not arm.compiled or args.compiled_inference:
                gpu_arms.inference_forward(arm, ids)
        except torch.cuda.OutOfMemoryError as err:
            skipped[name] = f"out of memory: {str(err).splitlines()[0]}"
            torch.cuda.empty_cache()
            continue
        if arm.compiled:
            compile_s = time.monotonic() - started
            budget.compile_s = max(COMPILE_GUESS_S if budget.scale else 0.0, compile_s)
        live[name] = arm
    for name, reason in skipped.items():
        print(f"  SKIPPED {name}: {reason}", flush=True)
    train = {n: gpu_arms.measured(lambda a=a: gpu_arms.train_step(a, ids), a, "step_increase_mb", cuda) for n, a in live.items()}
    infer = {n: gpu_arms.measured(lambda a=a: gpu_arms.inference_forward(a, ids), a, "inference_increase_mb", cuda)
             for n, a in live.items() if not a.compiled or args.compiled_inference}
    cell = {"skipped": skipped, "compile_s": compile_s, "first_loss": losses,
            "train": summarise(interleaved(train, rounds=args.rounds, warmup=args.warmup)),
            "inference": summarise(interleaved(infer, rounds=args.rounds, warmup=args.warmup))}
    dora = [n for n in ("dorakit_dora", "dorakit_dora_triton", "dorakit_dora_compiled") if n in losses]
    if "peft_dora" in losses and dora:
        cell["loss_rel_diff_vs_peft_dora"] = {n: abs(losses[n] - losses["peft_dora"]) / abs(losses["peft_dora"]) for n in dora}
        if max(cell["loss_rel_diff_vs_peft_dora"].values()) > 1e-2:
            print(f"  WARNING: DoRA arms disagree with PEFT DoRA: {cell['loss_rel_diff_vs_peft_dora']}", flush=True)
    cell["memory"] = memory_summary(live, cuda)
    return cell


def memory_summary(arms: dict, cuda: bool) -> dict:
    if not cuda:
        return {}
    base_mb = gpu_arms.tensor_mb([p for p in next(iter(arms.values())).model.parameters() if not p.requires_grad])
    out = {}
    for name, arm in arms.items():
        own = arm.own_mb()
        out[name] = {"base_mb": base_mb, "own_mb": own, "step_increase_mb": arm.stats.get("step_increase_mb", 0.0),
                     "inference_increase_mb": arm.stats.get("inference_increase_mb", 0.0),
                     "peak_mb": base_mb + own + arm.stats.get("step_increase_mb", 0.0)}
    ref = out.get("peft_lora")
    for values in out.values():
        values["peak_ratio_to_peft_lora"] = values["peak_mb"] / ref["peak_mb"] if ref else None
    return out


def profile_step(arms: dict, ids: torch.Tensor, out_dir: Path) -> Path:
    """torch.profiler tables (CUDA time by op) of one training step of dorakit DoRA and of PEFT LoRA."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    sort = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
    text = []
    for name in ("dorakit_dora", "dorakit_dora_triton", "peft_lora"):
        if name not in arms:
            continue
        with profile(activities=activities) as prof:
            gpu_arms.train_step(arms[name], ids)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
        text += [f"== {name}: one training step, batch {tuple(ids.shape)} ==", prof.key_averages().table(sort_by=sort, row_limit=30), ""]
    path = out_dir / "gpu_profile.txt"
    path.write_text("\n".join(text))
    return path


def main(argv=None) -> int:
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.dry_run:
        print(f"benchmarks.gpu needs a CUDA GPU: torch {torch.__version__} sees none. Run it on a GPU machine "
              "(make bench-gpu), or add --dry-run --out DIR to check the script on the CPU.", file=sys.stderr)
        return 2
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16
    budget = Budget(args.budget_s, args.dry_run)
    out_dir = args.out or RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    cells, skipped_cells, last_cell_s = [], [], {}
    for model_name in args.models.split(","):
        if not budget.fits(BUILD_GUESS_S):
            skipped_cells.append({"model": model_name, "reason": "time budget (model not built)"})
            continue
        base = gpu_arms.build_base(model_name, device, dtype)
        vocab = base.config.vocab_size
        for r in map(int, args.ranks.split(",")):
            arms = gpu_arms.build_arms(base, r, args.arms, args.compile_backend)
            for batch, seq in (tuple(map(int, b.split("x"))) for b in args.batches.split(",")):
                where = {"model": model_name, "r": r, "batch": batch, "seq_len": seq}
                if not budget.fits(last_cell_s.get(model_name, FIRST_CELL_GUESS_S)):
                    skipped_cells.append({**where, "reason": f"time budget ({budget.left():.0f} s left)"})
                    print(f"SKIPPED {where}: time budget", flush=True)
                    continue
                started = time.monotonic()
                ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(1)).to(device)
                print(f"{model_name} r={r} {batch}x{seq} ...", flush=True)
                cell = {**where, **run_cell(arms, ids, args, budget, cuda)}
                last_cell_s[model_name] = time.monotonic() - started
                cells.append(cell)
                print("  train: " + ", ".join(f"{m} {s['median_ms']:.1f} ms ({s['ratio_to_peft_lora']:.3f}x)"
                                              for m, s in cell["train"].items()), flush=True)
                if args.profile and len(cells) == 1:
                    print(f"  profile: {profile_step(arms, ids, out_dir)}", flush=True)
            del arms
            gpu_arms.release()
        del base
        gpu_arms.release()
    payload = {"benchmark": "gpu", "dry_run": args.dry_run, "environment": environment(torch.get_num_threads(), dtype),
               "grid": {k: getattr(args, k) for k in ("models", "ranks", "batches", "rounds", "warmup", "compile_backend")},
               "arms": args.arms, "budget_s": args.budget_s, "wall_s": time.monotonic() - START,
               "cells": cells, "skipped_cells": skipped_cells}
    path = out_dir / "gpu.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {path} ({payload['wall_s']:.0f} s; {len(cells)} cells measured, {len(skipped_cells)} skipped)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
