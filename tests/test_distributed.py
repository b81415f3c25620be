"""Several processes through torchrun (gloo, CPU): DDP and FSDP2 give the one-process run's losses at
the same global batch, the adapter they save loads in one process with the same outputs, and an
interrupted run resumes from its torch.distributed.checkpoint on another number of processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from .train_assets import colour_records, make_model_dir, write_jsonl

pytest.importorskip("transformers")
if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

STEPS = 40


def train_command(processes: int | None, *args, pause_after: int | None = None) -> list[str]:
    # pause_after: the run waits after that step for the test's signal (tests/pause_after.py: no race)
    module = ["dorakit"] if pause_after is None else ["tests.pause_after", str(pause_after)]
    tail = ["-m", *module, "train", *map(str, args)]
    if processes is None:
        return [sys.executable, *tail]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes), *tail]


def run(processes, *args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(train_command(processes, *args), capture_output=True, text=True, timeout=600, env=env)


def metrics(out):
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def losses(out):
    return [m["loss"] for m in metrics(out)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    make_model_dir(root / "model")
    write_jsonl(root / "train.jsonl", colour_records(200, seed=0))
    # No dropout: its masks are per process, so they (rightly) differ with the process count.
    args = ("--model", root / "model", "--data", root / "train.jsonl", "--batch-size", 8, "--lr", 1e-2,
            "--lora-dropout", 0, "--max-steps", STEPS, "--eval-every", 20, "--save-every", 0, "--no-progress")
    single = root / "single"
    done = run(None, *args, "--output", single)
    assert done.returncode == 0, done.stderr
    return root, args, single


def close(a, b, tol=1e-4):
    return all(abs(x - y) <= tol * max(abs(x), abs(y)) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_train_the_one_process_run(setup, strategy):
    from transformers import AutoModelForCausalLM

    import dorakit

    root, args, single = setup
    out = root / strategy
    done = run(2, *args, "--strategy", strategy, "--micro-batch-size", 2, "--output", out)
    assert done.returncode == 0, done.stderr
    assert close(losses(out), losses(single)), (losses(out)[:5], losses(single)[:5])
    assert close([m["grad_norm"] for m in metrics(out)], [m["grad_norm"] for m in metrics(single)], 1e-3)
    assert metrics(out)[-1]["val_loss"] == pytest.approx(metrics(single)[-1]["val_loss"], rel=1e-4)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["processes"] == 2 and len(summary["peak_memory_mb_per_process"]) == 2
    # The adapter was gathered and written once in PEFT's format: it loads in one process.
    ids = torch.tensor([[1, 5, 9, 12, 3]])
    outputs = []
    for directory in (out, single):
        model = dorakit.load_adapter(AutoModelForCausalLM.from_pretrained(root / "model"), directory / "adapter")
        with torch.no_grad():
            outputs.append(model(ids).logits)
    assert torch.allclose(outputs[0], outputs[1], rtol=1e-3, atol=1e-4)
    assert not list(out.glob(".*tmp"))


def interrupt(processes, *args):
    """Start a run, SIGTERM it (torchrun passes the signal on) after its third step; the steps done.
    The run waits after step 3 until the signal comes, so a slow test process cannot miss the window."""
    out = args[args.index("--output") + 1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(train_command(processes, *args, pause_after=3), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=Path(__file__).resolve().parents[1])
    end = time.monotonic() + 300
    path = out / "metrics.jsonl"  # whole lines only: the run may be writing the next one
    while (not path.is_file() or path.read_text().count("\n") < 3) and proc.poll() is None and time.monotonic() < end:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    stopped = len(metrics(out))
    assert 3 <= stopped < STEPS, stderr
    return stopped


def test_interrupted_fsdp_run_resumes_on_one_process(setup):
    root, args, single = setup
    cut = root / "cut"
    stopped = interrupt(2, *args, "--strategy", "fsdp", "--output", cut)
    state = json.loads((cut / "checkpoint" / "state.json").read_text())
    assert state["processes"] == 2 and state["progress"]["step"] == stopped
    assert (cut / "checkpoint" / "dcp").is_dir() and (cut / "checkpoint" / "adapter" / "adapter_config.json").is_file()
    # Resharded from 2 processes into 1 (no torchrun at all), to the end of the run.
    done = run(None, *args, "--output", cut, "--resume")
    assert done.returncode == 0, done.stderr
    assert [m["step"] for m in metrics(cut)] == list(range(1, STEPS + 1))
    assert close(losses(cut), losses(single))


def test_interrupted_one_process_run_resumes_on_two_fsdp_processes(setup):
    root, args, single = setup
    cut = root / "cut-single"
    interrupt(None, *args, "--output", cut)
    assert not (cut / "checkpoint" / "dcp").exists()  # the one-process format: whole tensors
    done = run(2, *args, "--strategy", "fsdp", "--output", cut, "--resume")
    assert done.returncode == 0, done.stderr
    assert [m["step"] for m in metrics(cut)] == list(range(1, STEPS + 1))
    assert close(losses(cut), losses(single))


def test_bad_distributed_setups_are_refused(setup):
    root, args, _ = setup
    alone = run(None, *args, "--strategy", "fsdp", "--output", root / "x")
    assert alone.returncode == 2 and "torchrun --nproc_per_node" in alone.stderr
    odd = run(2, *args, "--strategy", "ddp", "--batch-size", 7, "--output", root / "y")
    assert odd.returncode != 0 and "does not split over 2 processes" in odd.stderr


@pytest.mark.parametrize("extra", [("--method", "full", "--lr", 1e-3), ("--quantize", "4bit")], ids=["full", "qdora"])
def test_ddp_runs_full_fine_tuning_and_quantized_bases(setup, extra):
    if "--quantize" in extra:
        pytest.importorskip("bitsandbytes")
    root, args, _ = setup
    out = root / f"ddp-{extra[1]}"
    short = [a if a != STEPS else 4 for a in args]
    done = run(2, *short, "--strategy", "ddp", *extra, "--output", out)
    assert done.returncode == 0, done.stderr
    assert len(metrics(out)) == 4
    assert (out / ("model" if "full" in extra else "adapter")).is_dir()


# ---- accelerate launch (issue 14): its --multi_gpu launcher runs torchrun's, with gloo on CPUs ----

def accelerate(flags: list[str], *args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *flags, "-m", "dorakit", "train", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_accelerate_launch_multi_gpu_on_cpus_trains_the_one_process_run(setup, strategy):
    pytest.importorskip("accelerate")
    root, args, single = setup
    out = root / f"accelerate-{strategy}"
    done = accelerate(["--multi_gpu", "--num_processes", "2"], *args, "--strategy", strategy,
                      "--micro-batch-size", 2, "--output", out)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((out / "summary.json").read_text())["processes"] == 2
    assert close(losses(out), losses(single)), (losses(out)[:5], losses(single)[:5])


def test_accelerate_launch_cpu_with_several_processes_names_the_working_command(setup):
    """accelerate's --cpu (and any launch without --multi_gpu) starts one process whatever --num_processes
    says; training that one process would silently not be the run asked for."""
    pytest.importorskip("accelerate")
    root, args, _ = setup
    done = accelerate(["--cpu", "--num_processes", "2"], *args, "--strategy", "ddp", "--output", root / "acc-cpu")
    assert done.returncode != 0
    assert "dorakit: error: accelerate launch without --multi_gpu" in done.stderr
    assert "accelerate launch --multi_gpu --num_processes N -m dorakit train --strategy ddp" in done.stderr
    assert not (root / "acc-cpu").exists()
