"""What a run leaves for people and tools: metrics.jsonl, the loss curve, summary.json."""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

from .. import atomic
from ..figures import pyplot, save_png

METRICS_NAME = "metrics.jsonl"
SUMMARY_NAME = "summary.json"
PLOT_NAME = "loss.png"


def read_metrics(output: Path) -> list[dict[str, Any]]:
    """The records of metrics.jsonl. A last line cut short (a kill while it was written: it comes after the
    last checkpoint, which is written after its step's line) is left out; any other damage is named."""
    path = output / METRICS_NAME
    if not path.is_file():
        return []
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
        elif not (number == len(lines) and not text.endswith("\n")):
            raise ValueError(f"{path}:{number} is not a metrics record; remove that line (or the file) and run again.")
    return records


def truncate_metrics(output: Path, step: int) -> None:
    """Drop the lines of steps after ``step`` (written after the checkpoint a run resumes from), so the
    resumed run's file reads as if the run had never stopped."""
    kept = [m for m in read_metrics(output) if m["step"] <= step]
    text = "".join(json.dumps(m) + "\n" for m in kept)
    atomic.write_text(output / METRICS_NAME, text)


class MetricsLog:
    """Appends one JSON object per optimizer step, flushed at once (a crash loses no logged step)."""

    def __init__(self, output: Path) -> None:
        self.handle = open(output / METRICS_NAME, "a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self.handle.write(json.dumps(record) + "\n")
        self.handle.flush()

    def close(self) -> None:
        self.handle.close()


def plot_losses(output: Path, title: str) -> Path | None:
    """loss.png: training loss per step (and validation loss where evaluated). None without matplotlib."""
    try:
        plt = pyplot()
    except ImportError:
        return None
    metrics = read_metrics(output)
    if not metrics:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([m["step"] for m in metrics], [m["loss"] for m in metrics], lw=1, label="train loss")
    val = [m for m in metrics if "val_loss" in m]
    if val:
        ax.plot([m["step"] for m in val], [m["val_loss"] for m in val], "o-", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats per trained token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = output / PLOT_NAME
    save_png(fig, path)
    return path


def versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in ("dorakit", "torch", "transformers", "safetensors", "peft"):
        module = sys.modules.get(name)
        if module is not None and hasattr(module, "__version__"):
            out[name] = module.__version__
    return out


def write_summary(output: Path, summary: dict[str, Any]) -> Path:
    summary = {**summary, "versions": versions(), "host": {"cpus": os.cpu_count()}}
    text = json.dumps(summary, indent=2, default=str)
    atomic.write_text(output / SUMMARY_NAME, text)
    return output / SUMMARY_NAME


def closing_line(summary: dict[str, Any]) -> str:
    """The last line of a finished ``dorakit train``: final losses and where everything is (issue 14)."""
    output = Path(summary["config"]["output"])
    final = summary.get("final") or {}
    losses = [f"final train loss {final['loss']:.4f}" if final.get("loss") is not None else "no step ran"]
    if final.get("val_loss") is not None:
        losses.append(f"validation loss {final['val_loss']:.4f}")
    if final.get("val_accuracy") is not None:
        losses.append(f"validation accuracy {final['val_accuracy']:.1%}")
    result = (f"adapter (PEFT format) in {summary['adapter']}" if summary.get("adapter")
              else f"model in {summary.get('model')}")
    minutes = summary.get("train_seconds", 0) / 60
    return (f"dorakit train: finished {summary['steps']} steps in {minutes:.1f} min; {', '.join(losses)}; {result}; "
            f"metrics in {output / METRICS_NAME}, summary in {output / SUMMARY_NAME}"
            + (f", loss curve in {summary['loss_plot']}" if summary.get("loss_plot") else "") + ".")
