"""What every benchmark shares: the models, the methods, interleaved timing and JSON output.

Methods (same base weights, same rank, alpha and targets):
    dorakit_dora, dorakit_lora, peft_dora, peft_lora,
    peft_dora_patched: PEFT's own DoRA model run under dorakit.patch_peft() (issue 15)
Ratios are taken to peft_lora, the cost users accept today.
"""

from __future__ import annotations

import contextlib
import copy
import json
import platform
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import dorakit

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("dorakit_dora", "dorakit_lora", "peft_dora", "peft_lora", "peft_dora_patched")
PATCHED = "_patched"  # methods run under dorakit.patch_peft()
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class ModelSpec:
    name: str
    r: int
    alpha: int
    batches: list[tuple[int, int]]  # (batch size, sequence length)
    vocab: int = 0
    extra: dict = field(default_factory=dict)


SPECS = {
    # Issue 4, configuration 1: random LLaMA, hidden 1024, intermediate 2752, 4 layers, 16 heads, vocab 8000.
    "llama-random": ModelSpec("llama-random", r=16, alpha=32, batches=[(4, 256), (1, 128)], vocab=8000),
    # Configuration 2: SmolLM2-135M-Instruct, real weights (dorakit.assets).
    "smollm2": ModelSpec("smollm2", r=8, alpha=16, batches=[(8, 128), (1, 128)], vocab=49152),
}


def build_base(spec: ModelSpec, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if spec.name == "llama-random":
        config = LlamaConfig(
            hidden_size=1024, intermediate_size=2752, num_hidden_layers=4, num_attention_heads=16,
            num_key_value_heads=16, vocab_size=8000, max_position_embeddings=512,
        )
        return LlamaForCausalLM(config).to(dtype)
    from dorakit.assets import smollm2_path

    return AutoModelForCausalLM.from_pretrained(smollm2_path(), dtype=dtype)


def adapt(base: torch.nn.Module, method: str, spec: ModelSpec, *, in_place: bool = False) -> torch.nn.Module:
    """``base`` adapted by one method: a deep copy, or ``base`` itself with ``in_place``."""
    model = base if in_place else copy.deepcopy(base)
    use_dora = method.removesuffix(PATCHED).endswith("dora")
    if method.startswith("dorakit"):
        cfg = dorakit.DoraConfig(r=spec.r, lora_alpha=spec.alpha, target_modules=TARGETS, use_dora=use_dora)
        return dorakit.inject_adapters(model, cfg)
    import peft

    cfg = peft.LoraConfig(r=spec.r, lora_alpha=spec.alpha, target_modules=TARGETS, use_dora=use_dora)
    with patched(method):
        return peft.get_peft_model(model, cfg)


def patched(method: str):
    """The context a method runs in: dorakit.patch_peft() for the ``*_patched`` methods, PEFT's own
    code (unpatched) for every other one, so methods can be interleaved in one process."""
    if method.endswith(PATCHED):
        return dorakit.patch_peft()
    dorakit.unpatch_peft()
    return contextlib.nullcontext()


def build_methods(base: torch.nn.Module, spec: ModelSpec) -> dict[str, torch.nn.Module]:
    """The four methods on copies of ``base``. The PEFT DoRA adapter gets a non-zero B (a
    non-identity adapter) and dorakit's DoRA model its exact values, so their outputs must agree."""
    import peft

    from dorakit.formats.keys import from_peft_key

    models = {method: adapt(base, method, spec) for method in METHODS}
    with torch.no_grad():
        for name, param in models["peft_dora"].named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.01)
    peft_state = peft.get_peft_model_state_dict(models["peft_dora"])
    models["dorakit_dora"].load_state_dict({from_peft_key(k): v for k, v in peft_state.items()}, strict=False)
    loaded = peft.set_peft_model_state_dict(models["peft_dora_patched"], peft_state)
    assert not loaded.unexpected_keys, loaded.unexpected_keys  # the same adapter, DoRA magnitudes included
    return models


def parse_batches(text: str | None, spec: ModelSpec) -> list[tuple[int, int]]:
    """"4x256,1x128" -> [(4, 256), (1, 128)]; None -> the model's default batches."""
    if not text:
        return spec.batches
    return [tuple(map(int, b.split("x"))) for b in text.split(",")]


def environment(threads: int, dtype: torch.dtype) -> dict:
    import peft
    import transformers

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or platform.machine()
    return {
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "device_name": device,
        "dtype": str(dtype).replace("torch.", ""),
        "threads": threads,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "dorakit": dorakit.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }


def interleaved(runs: dict, rounds: int, warmup: int, seed: int = 0,
                cpu: dict[str, list[float]] | None = None) -> dict[str, list[float]]:
    """Time each callable ``rounds`` times, interleaved in a shuffled order each round, so that
    drift of the machine (thermal, other load) hits every method alike. Returns seconds per run;
    with ``cpu`` given, also fills it with this process's CPU seconds per run (on a CPU shared with
    other work, less disturbed by waiting for a core than the wall clock). Each method runs in its
    ``patched`` context, entered outside the timed region."""
    order = list(runs)
    rng = random.Random(seed)
    for _ in range(warmup):
        for name in order:
            with patched(name):
                runs[name]()
    times: dict[str, list[float]] = {name: [] for name in order}
    for _ in range(rounds):
        rng.shuffle(order)
        for name in order:
            with patched(name):
                start, cpu_start = time.perf_counter(), time.process_time()
                runs[name]()
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                times[name].append(time.perf_counter() - start)
                if cpu is not None:
                    cpu.setdefault(name, []).append(time.process_time() - cpu_start)
    return times


def summarise(times: dict[str, list[float]], reference: str = "peft_lora") -> dict[str, dict]:
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    out = {}
    for name, ts in times.items():
        q = statistics.quantiles(ts, n=4) if len(ts) > 1 else [ts[0]] * 3
        out[name] = {
            "median_ms": 1000 * medians[name],
            "p25_ms": 1000 * q[0],
            "p75_ms": 1000 * q[2],
            "runs": len(ts),
            f"ratio_to_{reference}": medians[name] / medians[reference] if reference in medians else None,
        }
    return out


def write_result(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {path.relative_to(RESULTS.parent.parent)}")
    return path


def rss_mb() -> float:
    """Resident set size of this process now (Linux)."""
    import resource

    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 2**20


class PeakRSS:
    """Highest resident set size seen while the block runs (sampled every millisecond by a thread),
    so one phase's peak can be told apart from the process's lifetime peak."""

    def __enter__(self):
        import threading

        self.start_mb = self.peak_mb = rss_mb()
        self._stop = threading.Event()

        def sample():
            while not self._stop.is_set():
                self.peak_mb = max(self.peak_mb, rss_mb())
                self._stop.wait(0.001)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, rss_mb())
        self.increase_mb = self.peak_mb - self.start_mb


def train_step(model: torch.nn.Module, optimizer, ids: torch.Tensor):
    """One training step as a callable: causal-LM loss on ``ids``, backward, optimizer step, zero_grad."""
    def run():
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return run


def steps_memory(run, steps: int) -> dict:
    """Peak memory while ``run()`` runs ``steps`` times, the size just before, and the increase: on CUDA
    max_memory_allocated; on CPU the RSS sampled during the steps only (the process's lifetime peak is
    set by building or loading the model, the same for every method)."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
        for _ in range(steps):
            run()
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        with PeakRSS() as probe:
            for _ in range(steps):
                run()
        before, peak = probe.start_mb, probe.peak_mb
    return {"before_mb": before, "peak_mb": peak, "increase_mb": peak - before}


def memory_by_method(module: str, args: list[str], methods, reference: str) -> dict[str, dict]:
    """Run ``python -m MODULE ARGS --child METHOD`` once per method (so each peak is its own process's)
    and read the JSON line each prints; adds peak and increase ratios to ``reference``."""
    import subprocess
    import sys

    per_method = {}
    for method in methods:
        done = subprocess.run([sys.executable, "-m", module, *args, "--child", method], capture_output=True, text=True,
                              check=True)
        per_method[method] = json.loads(done.stdout.strip().splitlines()[-1])
    ref = per_method[reference]
    for values in per_method.values():
        values[f"peak_ratio_to_{reference}"] = values["peak_mb"] / ref["peak_mb"]
        values[f"increase_ratio_to_{reference}"] = values["increase_mb"] / ref["increase_mb"]
    return per_method


def memory_line(per_method: dict[str, dict], reference: str) -> str:
    return ", ".join(
        f"{m} peak {v['peak_mb']:.0f} MB ({v[f'peak_ratio_to_{reference}']:.3f}x), +{v['increase_mb']:.0f} MB "
        f"({v[f'increase_ratio_to_{reference}']:.3f}x)" for m, v in per_method.items())
