"""``dorakit compare``: one model, one dataset, one budget; full fine-tuning, LoRA, DoRA, DoRA at half
rank, VeRA and DVoRA over several seeds, as in the DoRA paper's comparisons (Tables 1-5, rank sweep Fig. 5).

Each run is a ``dorakit train`` subprocess (so peak memory is per run and one failure is reported,
not fatal), with its own output directory; the table is built from their summary.json files:

    dorakit compare --model DIR --data FILE --ranks 4 8 --seeds 0 1 2 --max-steps 200 --output runs/cmp
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from .. import atomic
from ..figures import pyplot, save_png

METHODS = ("full", "lora", "dora", "dora-half", "vera", "dvora")
VERA_METHODS = ("vera", "dvora")  # ranked by --vera-ranks: their rank costs no trainable parameters


def rank_used(method: str, rank: int) -> int:
    """The adapter rank a row of the table trains with: dora-half halves the row's rank."""
    return max(1, rank // 2) if method == "dora-half" else rank


@dataclass
class Planned:
    method: str  # as listed in --methods
    rank: int | None  # None for full fine-tuning
    seed: int

    @property
    def name(self) -> str:
        return f"{self.method}-s{self.seed}" if self.rank is None else f"{self.method}-r{self.rank}-s{self.seed}"

    def train_args(self) -> list[str]:
        if self.rank is None:
            return ["--method", "full", "--seed", str(self.seed)]
        rank = rank_used(self.method, self.rank)
        if self.method in VERA_METHODS:  # no scale to set: VeRA's vectors carry it
            return ["--method", self.method, "--r", str(rank), "--seed", str(self.seed)]
        method = "dora" if self.method.startswith("dora") else "lora"
        # alpha = 2 x the method's rank keeps s = 2 for every row of the table (the paper's setting)
        return ["--method", method, "--r", str(rank), "--lora-alpha", str(2 * rank), "--seed", str(self.seed)]


def plan(methods: list[str], ranks: list[int], seeds: list[int], vera_ranks: list[int] = [256]) -> list[Planned]:
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"Unknown method(s) {unknown}; choose from {', '.join(METHODS)}.")
    runs = []
    for method in methods:
        method_ranks = [None] if method == "full" else vera_ranks if method in VERA_METHODS else ranks
        for rank in method_ranks:
            runs.extend(Planned(method, rank, seed) for seed in seeds)
    return runs


def run_all(runs: list[Planned], common: list[str], full_lr: float | None, output: Path,
            vera_lr: float | None = None) -> list[dict]:
    """Train every planned run that has no finished summary yet; returns one record per run."""
    records = []
    for index, item in enumerate(runs, start=1):
        out = output / item.name
        summary_path = out / "summary.json"
        done = summary_path.is_file() and _status(summary_path) == "finished"
        if not done:
            own_lr = full_lr if item.rank is None else vera_lr if item.method in VERA_METHODS else None
            extra = ["--lr", str(own_lr)] if own_lr is not None else []
            print(f"[{index}/{len(runs)}] {item.name}", flush=True)
            command = [sys.executable, "-m", "dorakit", "train", *common, *item.train_args(), *extra,
                       "--output", str(out), "--overwrite", "--no-progress"]
            finished = subprocess.run(command, capture_output=True, text=True)
            if finished.returncode != 0:
                records.append({"run": item.name, "method": item.method, "rank": item.rank, "seed": item.seed,
                                "error": (finished.stderr.strip().splitlines() or ["failed"])[-1]})
                print(f"    failed: {records[-1]['error']}", flush=True)
                continue
        summary = json.loads(summary_path.read_text())
        final = summary["final"]
        records.append({
            "run": item.name, "method": item.method, "rank": item.rank, "seed": item.seed,
            "accuracy": final.get("val_accuracy"), "val_loss": final.get("val_loss"), "final_loss": final.get("loss"),
            "trainable_parameters": summary["trainable_parameters"],
            "seconds_per_step": summary["train_seconds"] / max(1, summary["steps"]),
            "peak_memory_mb": summary["peak_memory_mb"],
        })
    return records


def _status(summary_path: Path) -> str | None:
    """A run's status from its summary.json; None (run it again) when the file is damaged."""
    try:
        return json.loads(summary_path.read_text(encoding="utf-8")).get("status")
    except (OSError, ValueError, AttributeError):
        return None


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def table(records: list[dict]) -> list[dict]:
    """One row per (method, rank): means over seeds (accuracy also with its standard deviation)."""
    groups: dict[tuple, list[dict]] = {}
    for record in records:
        groups.setdefault((record["method"], record["rank"]), []).append(record)
    rows = []
    for (method, rank), members in groups.items():
        ok = [m for m in members if "error" not in m]
        acc, acc_std = _mean_std([m["accuracy"] for m in ok])
        rows.append({
            "method": method, "rank": rank, "seeds": len(ok), "failed": len(members) - len(ok),
            "accuracy": acc, "accuracy_std": acc_std,
            "final_loss": _mean_std([m["final_loss"] for m in ok])[0],
            "val_loss": _mean_std([m["val_loss"] for m in ok])[0],
            "trainable_parameters": ok[0]["trainable_parameters"] if ok else None,
            "seconds_per_step": _mean_std([m["seconds_per_step"] for m in ok])[0],
            "peak_memory_mb": _mean_std([m["peak_memory_mb"] for m in ok])[0],
        })
    return rows


def format_table(rows: list[dict]) -> str:
    def cell(value, fmt):
        return "n/a" if value is None else format(value, fmt)

    lines = [f"{'method':<10} {'rank':>4} {'seeds':>5} {'accuracy (mean ± std)':>22} {'final loss':>10} "
             f"{'val loss':>9} {'trainable':>11} {'s/step':>7} {'peak MB':>8}"]
    for r in rows:
        acc = "n/a" if r["accuracy"] is None else f"{r['accuracy']:.1%} ± {r['accuracy_std']:.1%}"
        rank = "-" if r["rank"] is None else str(rank_used(r["method"], r["rank"]))
        lines.append(f"{r['method']:<10} {rank:>4} {r['seeds']:>5} {acc:>22} {cell(r['final_loss'], '.4f'):>10} "
                     f"{cell(r['val_loss'], '.4f'):>9} {cell(r['trainable_parameters'], ','):>11} "
                     f"{cell(r['seconds_per_step'], '.3f'):>7} {cell(r['peak_memory_mb'], '.0f'):>8}"
                     + (f"  ({r['failed']} failed)" if r["failed"] else ""))
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """Accuracy (mean ± std over seeds) per method, grouped by rank."""
    plt = pyplot()
    shown = [r for r in rows if r["accuracy"] is not None]
    fig, ax = plt.subplots(figsize=(max(5, 0.9 * len(shown) + 2), 4))
    labels = [r["method"] if r["rank"] is None else f"{r['method']}\nr={rank_used(r['method'], r['rank'])}" for r in shown]
    colours = {"full": "tab:gray", "lora": "tab:blue", "dora": "tab:orange", "dora-half": "tab:red",
               "vera": "tab:green", "dvora": "tab:purple"}
    ax.bar(range(len(shown)), [r["accuracy"] for r in shown], yerr=[r["accuracy_std"] for r in shown],
           color=[colours.get(r["method"], "tab:green") for r in shown], capsize=4)
    ax.set_xticks(range(len(shown)), labels, fontsize=8)
    ax.set_ylabel("validation accuracy")
    ax.set_ylim(0, 1)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    save_png(fig, path)


def write(records: list[dict], rows: list[dict], output: Path) -> None:
    text = json.dumps({"table": rows, "runs": records}, indent=1)
    atomic.write_text(output / "compare.json", text)
    atomic.write_csv(output / "compare.csv", rows, list(rows[0]))
    plot(rows, output / "compare.png")
